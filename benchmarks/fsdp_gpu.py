"""FSDP2 on one GPU (NCCL, world size 1): the sharded path against the plain model.

Measured side by side in one run on one card, on a small causal transformer
(``fully_shard`` per block and on the root, fp32, Adam):

1. correctness: after 3 training steps under FSDP2, the monitor on the FSDP2
   model (``method="auto"`` -> sharded central finite differences) against the
   monitor on a plain copy holding the same full parameters and Adam state
   (exact double-backward products, and plain finite differences): top-2
   eigenvalues and preconditioned sharpness, relative differences; parameters
   bit-exact and ``.grad`` unchanged after the measurement;
2. memory: peak GPU memory of a measurement (called right after
   ``optimizer.step()``, as :meth:`CurvatureMonitor.attach` does, gradients
   still alive) against the peak of a training step (forward, backward, Adam
   step, ``zero_grad``), both as ``torch.cuda.max_memory_allocated`` after
   ``reset_peak_memory_stats``; target: at most 1.3x. The Lanczos basis lives on
   the host (``--basis-device cpu``, default), as docs/design.md asks for big models;
3. time: median training step, one measurement, and one Hessian-vector
   product as a multiple of a training step.

Writes ``benchmarks/results/fsdp_<card>.json`` and ``.md`` (``--out`` to change the
folder). On a machine without CUDA it falls back to gloo on the CPU with a
smaller model (memory rows are then ``null``), so the script itself can be
checked anywhere; it also runs with several processes (each rank holds its
share of the batches).

Usage::

    torchrun --nproc_per_node 1 benchmarks/fsdp_gpu.py [--layers 4] [--d 512] [--out DIR]
    python benchmarks/fsdp_gpu.py            # world size 1 without torchrun

(from the repository root, with curvwatch installed or ``PYTHONPATH=.``). The
model uses GELU on purpose: on ReLU networks finite differences pick up the
kinks that double backward ignores (a 2.5x larger lambda_max on a ReLU version
of this model on the CPU), so the two methods legitimately disagree there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from curvwatch import Budget, CurvatureMonitor

MiB = 2**20


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (an FSDP2 shard), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class TinyLM(nn.Module):
    """A pre-norm causal transformer: embedding, ``layers`` blocks, LM head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        h = self.embed(ids) + self.pos[:n]
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy of ``batch = (ids, targets)``."""
    ids, targets = batch
    return F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())


def make_batch(args, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic tokens with a learnable rule (target = next token of a fixed walk)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    ids[:, 1::2] = (ids[:, 0:-1:2] * 7 + 3) % args.vocab
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def share(batch, rank: int, world: int):
    """This rank's equal share of a batch."""
    return tuple(t.chunk(world)[rank] for t in batch)


def init_distributed() -> tuple[int, int, torch.device]:
    """NCCL on CUDA (one GPU per rank), gloo on the CPU; world size 1 without torchrun."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def shard(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """``fully_shard`` every block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def plain_copy(args, sharded: nn.Module, opt: torch.optim.Optimizer, device):
    """A plain model with the full parameters of ``sharded``, and Adam with its full state."""
    plain = TinyLM(args.vocab, args.d, args.layers, args.heads, args.seq).to(device)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=args.lr)
    with torch.no_grad():
        for q, p in zip(plain.parameters(), sharded.parameters()):
            q.copy_(p.full_tensor())
            state = opt.state[p]
            plain_opt.state[q] = {
                "step": state["step"].clone(),
                "exp_avg": state["exp_avg"].full_tensor(),
                "exp_avg_sq": state["exp_avg_sq"].full_tensor(),
            }
    return plain, plain_opt


def train_step(model, opt, batch) -> float:
    """Forward, backward, Adam step, zero_grad; the loss."""
    loss = lm_loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_of(fn, device):
    """``(result, peak bytes allocated during fn, bytes allocated before)``; peaks are None on CPU."""
    if device.type != "cuda":
        return fn(), None, None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    return out, torch.cuda.max_memory_allocated(device), before


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def monitor(model, batch, opt, args, method="auto") -> CurvatureMonitor:
    return CurvatureMonitor(
        model, batch, loss_fn=lm_loss, top_k=2, trace=False, method=method, optimizer=opt,
        strict=True, budget=Budget(max_hvps=args.hvps, trace_hvps=0, tol=args.tol),
        basis_device=args.basis_device,
    )


def fixed_lanczos(model: nn.Module, probe) -> list[float]:
    """Top-2 Ritz values after exactly 20 sharded finite-difference products (seed 3)."""
    from curvwatch.guard import measurement_guard
    from curvwatch.operators.sharded import ShardedHessianOperator
    from curvwatch.solvers.lanczos import lanczos

    with measurement_guard(model):
        op = ShardedHessianOperator(lambda: lm_loss(model, probe), list(model.parameters()), module=model)
        return lanczos(op, k=2, tol=1e-12, max_matvecs=20, seed=3).eigenvalues.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--d", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hvps", type=int, default=120, help="products per measurement")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--basis-device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    rank, world, device = init_distributed()
    gpu = device.type == "cuda"
    sizes = (("vocab", 8192, 512), ("d", 512, 64), ("layers", 4, 2), ("seq", 256, 32), ("batch", 16, 8))
    for name, on_gpu, on_cpu in sizes:
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if not gpu:
        args.heads = min(args.heads, 4)
    torch.manual_seed(0)
    model = shard(TinyLM(args.vocab, args.d, args.layers, args.heads, args.seq).to(device), device, world)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n_params = sum(p.numel() for p in model.parameters())

    # -- training steps (the last three are timed; their peak is the reference) ------------------
    step_times, losses = [], []
    for step in range(5):
        batch = share(make_batch(args, 100 + step, device), rank, world)
        (loss, peak_train, base_train), seconds = timed(
            lambda batch=batch: peak_of(lambda: train_step(model, opt, batch), device), device
        )
        losses.append(loss)
        if step >= 2:
            step_times.append(seconds)

    # -- a measurement right after a step, gradients alive (what attach() does) -------------------
    probe = make_batch(args, 7, device)
    batch = share(make_batch(args, 200, device), rank, world)
    lm_loss(model, batch).backward()
    opt.step()
    params = list(model.parameters())
    with torch.no_grad():
        before = [local(p).clone() for p in params]
        grads = [p.grad for p in params]
        grad_values = [local(g).clone() for g in grads]
    mon = monitor(model, share(probe, rank, world), opt, args)
    (result, peak_measure, base_measure), measure_seconds = timed(
        lambda: peak_of(lambda: mon.measure(5), device), device
    )
    with torch.no_grad():
        params_exact = all(torch.equal(a, local(p)) for a, p in zip(before, params))
        grads_exact = all(g is p.grad for g, p in zip(grads, params)) and all(
            torch.equal(a, local(p.grad)) for a, p in zip(grad_values, params)
        )
    opt.zero_grad()

    # -- the plain model with the same parameters and Adam state ---------------------------------
    plain, plain_opt = plain_copy(args, model, opt, device)
    exact = monitor(plain, probe, plain_opt, args, method="double_backward").measure(5)
    plain_fd = monitor(plain, probe, plain_opt, args, method="finite_difference").measure(5)
    same_start = None
    if world == 1:  # like for like: the same global start vector and step, 20 products each
        same_start = {"fsdp": fixed_lanczos(model, probe), "plain": fixed_lanczos(plain, probe)}
        same_start["rel_diff_lambda_1"] = rel(same_start["fsdp"][0], same_start["plain"][0])

    step_median = statistics.median(step_times)
    report = {
        "what": "FSDP2 sharded finite-difference curvature vs the plain model; memory and time",
        "device": torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "backend": dist.get_backend(),
        "world_size": world,
        "torch": torch.__version__,
        "config": {
            k: getattr(args, k)
            for k in ("vocab", "d", "layers", "heads", "seq", "batch", "lr", "hvps", "tol", "basis_device")
        },
        "parameters": n_params,
        "training_losses": losses,
        "fsdp": {"eigenvalues": list(result.eigenvalues), "preconditioned": result.preconditioned_lambda_max,
                 "method": result.method, "hvps": result.hvps, "converged": result.converged},
        "plain_exact": {"eigenvalues": list(exact.eigenvalues), "preconditioned": exact.preconditioned_lambda_max,
                        "method": exact.method, "hvps": exact.hvps, "converged": exact.converged},
        "plain_finite_difference": {"eigenvalues": list(plain_fd.eigenvalues),
                                    "preconditioned": plain_fd.preconditioned_lambda_max,
                                    "hvps": plain_fd.hvps, "converged": plain_fd.converged},
        "rel_diff_vs_exact": {
            "lambda_1": rel(result.eigenvalues[0], exact.eigenvalues[0]),
            "lambda_2": rel(result.eigenvalues[1], exact.eigenvalues[1]),
            "preconditioned": rel(result.preconditioned_lambda_max, exact.preconditioned_lambda_max),
        },
        "rel_diff_plain_fd_vs_exact": {"lambda_1": rel(plain_fd.eigenvalues[0], exact.eigenvalues[0])},
        "same_start_vector_20_products": same_start,
        "params_bit_exact": params_exact,
        "grads_unchanged": grads_exact,
        "memory_mib": None if not gpu else {
            "training_step_peak": peak_train / MiB,
            "training_step_start": base_train / MiB,
            "measurement_peak": peak_measure / MiB,
            "measurement_start": base_measure / MiB,
            "peak_ratio": peak_measure / peak_train,
            "target_ratio": 1.3,
        },
        "time_s": {
            "training_step_median": step_median,
            "measurement": measure_seconds,
            "hvp_over_training_step": measure_seconds / max(result.hvps, 1) / step_median,
        },
    }
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        card = re.sub(r"[^a-z0-9]+", "_", report["device"].lower()).strip("_") if gpu else "cpu"
        (out / f"fsdp_{card}.json").write_text(json.dumps(report, indent=2))
        (out / f"fsdp_{card}.md").write_text(markdown(report))
        print(markdown(report))
    dist.destroy_process_group()


def markdown(r: dict) -> str:
    """A short human-readable summary of the report."""
    lines = [
        f"# FSDP2 curvature on {r['device']} ({r['backend']}, world size {r['world_size']}, torch {r['torch']})",
        "",
        f"Model: causal transformer, {r['parameters']:,} parameters, config {r['config']}.",
        "",
        "| | lambda_1 | lambda_2 | preconditioned | HVPs | converged |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("fsdp", "plain_exact", "plain_finite_difference"):
        e = r[key]
        lines.append(
            f"| {key} | {e['eigenvalues'][0]:.6g} | {e['eigenvalues'][1]:.6g} | {e['preconditioned']:.6g} "
            f"| {e['hvps']} | {e['converged']} |"
        )
    d = r["rel_diff_vs_exact"]
    lines += [
        "",
        f"Relative difference FSDP2 vs exact: lambda_1 {d['lambda_1']:.2e}, lambda_2 {d['lambda_2']:.2e}, "
        f"preconditioned {d['preconditioned']:.2e}. Parameters bit-exact: {r['params_bit_exact']}; "
        f".grad unchanged: {r['grads_unchanged']}.",
    ]
    if r["same_start_vector_20_products"]:
        s = r["same_start_vector_20_products"]
        lines.append(
            f"Same start vector, 20 products: FSDP2 {s['fsdp'][0]:.8g}, plain {s['plain'][0]:.8g} "
            f"(relative difference {s['rel_diff_lambda_1']:.2e})."
        )
    m = r["memory_mib"]
    if m:
        lines.append(
            f"Peak memory: training step {m['training_step_peak']:.1f} MiB, measurement "
            f"{m['measurement_peak']:.1f} MiB, ratio {m['peak_ratio']:.3f} (target <= {m['target_ratio']})."
        )
    t = r["time_s"]
    lines.append(
        f"Time: training step {1e3 * t['training_step_median']:.1f} ms, measurement {t['measurement']:.2f} s, "
        f"one HVP = {t['hvp_over_training_step']:.2f} training steps."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
