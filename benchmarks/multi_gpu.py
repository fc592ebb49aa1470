"""DDP and FSDP2 curvature on several GPUs against one GPU on the same global batch.

Run with ``torchrun --nproc_per_node N benchmarks/multi_gpu.py --out DIR``. Rank 0
first measures the plain model on the WHOLE probe batch (the one-GPU reference);
then every rank takes its contiguous share of the batch and measures

* DDP: the unwrapped module, Hessian-vector products averaged over ranks
  (``reduce=all_reduce_mean``);
* FSDP2: ``fully_shard`` per block and on the root; ``method="auto"`` picks the
  sharded finite-difference operator (vectors are local shards).

Models: a GPT-2 built from a config (GPT-2 small shape on CUDA, a tiny one on the
CPU fallback) and an MLP. Per mode and GPU it also records a training step's
time and peak memory against one measurement's (products, time, peak). NVLink
multicast stays off (NCCL_NVLS_ENABLE=0). Writes ``multi_gpu_<card>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import curvwatch as cw  # noqa: E402
from curvwatch.operators.distributed import all_reduce_mean  # noqa: E402


def build(kind: str, cuda: bool):
    torch.manual_seed(0)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        shape = dict(n_layer=12, n_embd=768, n_head=12) if cuda else dict(n_layer=2, n_embd=64, n_head=4)
        cfg = GPT2Config(vocab_size=50257 if cuda else 512, n_positions=256 if cuda else 32,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape)
        model = GPT2LMHeadModel(cfg)
        seq, bsz = (256, 8) if cuda else (32, 8)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (bsz, seq), generator=g)
        return model, {"input_ids": ids, "labels": ids.clone()}, None, list(model.transformer.h)
    width = 2048 if cuda else 64
    model = torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                torch.nn.Tanh(), torch.nn.Linear(width, 10))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)
    return model, (x, y), torch.nn.CrossEntropyLoss(), [model[0], model[2]]


def share(batch, rank, world):
    take = lambda t: t.chunk(world)[rank]  # noqa: E731
    return {k: take(v) for k, v in batch.items()} if isinstance(batch, dict) else tuple(take(t) for t in batch)


def loss_of(model, batch, criterion):
    return criterion(model(batch[0]), batch[1]) if criterion is not None else model(**batch).loss


def peak_and_time(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return out, time.perf_counter() - t, peak


def measure(model, batch, criterion, device, opt, reduce=None, method="auto"):
    kwargs = {"criterion": criterion} if criterion is not None else {}
    mon = cw.CurvatureMonitor(model, cw.probe.move_to(batch, device), top_k=1, trace=False, method=method,
                              optimizer=opt, reduce=reduce, strict=True, basis_device="cpu",
                              budget=cw.Budget(max_hvps=40, trace_hvps=0, tol=1e-4), **kwargs)
    r, seconds, peak = peak_and_time(lambda: mon.measure(1), device)
    return {"lambda_max": r.lambda_max, "preconditioned": r.preconditioned_lambda_max, "hvps": r.hvps,
            "method": r.method, "converged": r.converged, "seconds": seconds, "peak_gib": peak}


def step_cost(model, batch, criterion, opt, device):
    def step():
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch, criterion).backward()
        opt.step()
    step()  # warm-up (optimizer state allocated)
    times, peak = [], None
    for _ in range(3):
        _, t, peak = peak_and_time(step, device)
        times.append(t)
    return {"seconds": sorted(times)[1], "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--models", default="mlp,gpt2")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    results = {"world_size": world, "card": torch.cuda.get_device_name(device) if cuda else "cpu",
               "torch": torch.__version__, "models": {}}
    for kind in args.models.split(","):
        base, batch, criterion, blocks = build(kind, cuda)
        row = {"parameters": sum(p.numel() for p in base.parameters())}
        local_batch = share(batch, rank, world)
        # one GPU, whole batch (rank 0); the others wait
        if rank == 0:
            plain = copy.deepcopy(base).to(device)
            opt = torch.optim.SGD(plain.parameters(), lr=1e-3)
            row["single"] = measure(plain, batch, criterion, device, opt)
            row["single_exact"] = measure(plain, batch, criterion, device, opt, method="double_backward")
            row["single_step"] = step_cost(plain, cw.probe.move_to(batch, device), criterion,
                                           torch.optim.AdamW(plain.parameters(), lr=0.0), device)
            del plain, opt
        dist.barrier()
        # DDP
        ddp_model = copy.deepcopy(base).to(device)
        wrapped = torch.nn.parallel.DistributedDataParallel(ddp_model, device_ids=[device.index] if cuda else None)
        opt = torch.optim.SGD(ddp_model.parameters(), lr=1e-3)
        row["ddp"] = measure(ddp_model, local_batch, criterion, device, opt, reduce=all_reduce_mean)
        row["ddp_step"] = step_cost(wrapped, cw.probe.move_to(local_batch, device), criterion,
                                    torch.optim.AdamW(ddp_model.parameters(), lr=0.0), device)
        del wrapped, ddp_model, opt
        # FSDP2
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        fsdp_model = copy.deepcopy(base).to(device)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(fsdp_model, mesh=mesh)
        opt = torch.optim.SGD(fsdp_model.parameters(), lr=1e-3)
        row["fsdp2"] = measure(fsdp_model, local_batch, criterion, device, opt)
        row["fsdp2_step"] = step_cost(fsdp_model, cw.probe.move_to(local_batch, device), criterion,
                                      torch.optim.AdamW(fsdp_model.parameters(), lr=0.0), device)
        del fsdp_model, opt
        if cuda:
            torch.cuda.empty_cache()
        gathered = [None] * world
        dist.all_gather_object(gathered, row)
        if rank == 0:
            ref = gathered[0]["single"]["lambda_max"]
            for r in gathered:
                for mode in ("ddp", "fsdp2"):
                    r[mode]["rel_diff_vs_single"] = abs(r[mode]["lambda_max"] - ref) / abs(ref)
            results["models"][kind] = gathered
            print(kind, json.dumps(gathered[0], indent=1), flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        card = results["card"].replace(" ", "_").lower()[:24]
        path = os.path.join(args.out, f"multi_gpu_{world}x_{card}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print("wrote", path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
