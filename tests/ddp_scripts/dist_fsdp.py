"""FSDP, 2 gloo processes: finite differences on the local shards.

``--wrap fsdp2`` (``fully_shard`` per layer and on the root), ``--wrap hsdp``
(the same on a 2 x 1 mesh: replicated over the two ranks, sharded over one), or
``--wrap fsdp1`` (``FullyShardedDataParallel(use_orig_params=True)`` on the
CPU). Three parts:

1. Train 3 Adam steps, leave gradients (one set to ``None``), then measure twice
   (central differences, the second warm-started) and once with one-sided
   differences, each rank holding half of the probe batch; check that parameters and
   ``.grad`` are bit-exact afterwards. Every rank gathers the full parameters
   and Adam state into a plain model and measures it on the whole probe batch
   (double backward, no communication): the single-process reference.
2. One random vector of the sharded operator, gathered to full (rank 0 saves
   ``--out/random_vector.pt``) for the world-size-independence check.
3. Train 6 steps twice from the same initialization, with and without a
   monitor attached (``every=2``): losses and final shards must agree bit for bit.

Writes ``--out/rank{i}.json``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from dist_common import (
    PROBE,
    TOL,
    dump,
    init,
    make_data,
    make_mlp,
    monitor,
    reference,
    same,
    share,
    snapshot,
    summary,
)
from torch import nn

from curvwatch import Budget
from curvwatch.operators.sharded import ShardedHessianOperator

LR = 1e-2
_MESHES: dict = {}


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (an FSDP2 shard), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def wrap(model: nn.Module, kind: str) -> nn.Module:
    """Shard ``model`` with FSDP2 (per layer, then the root; HSDP: 2 x 1 mesh) or FSDP1."""
    if kind in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if kind not in _MESHES:  # one mesh per process (see dist_common.dump)
            world = dist.get_world_size()
            _MESHES[kind] = (
                init_device_mesh("cpu", (world,))
                if kind == "fsdp2"
                else init_device_mesh("cpu", (world, 1), mesh_dim_names=("replicate", "shard"))
            )
        mesh = _MESHES[kind]
        for layer in model:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))


def local_values(tensors) -> list[torch.Tensor | None]:
    """Clones of the local shards (``None`` stays ``None``)."""
    with torch.no_grad():
        return snapshot(None if t is None else local(t) for t in tensors)


def gather(pieces, layouts) -> list[torch.Tensor]:
    """Full tensors from every rank's local boxes (layouts of ShardedHessianOperator)."""
    mine = [(lay.shape, lay.offset, t.detach().reshape(lay.shape).clone()) for lay, t in zip(layouts, pieces)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    full = [torch.zeros(lay.global_shape, dtype=torch.float32) for lay in layouts]
    for boxes in everyone:
        for f, (shape, offset, values) in zip(full, boxes):
            f[tuple(slice(o, o + n) for o, n in zip(offset, shape))] = values
    return full


def single_process_copy(model: nn.Module, opt: torch.optim.Optimizer, layouts):
    """A plain model with the full parameters, and Adam with the full state."""
    params = list(model.parameters())
    plain = make_mlp()
    ref_opt = torch.optim.Adam(plain.parameters(), lr=LR)
    full_params = gather(local_values(params), layouts)
    with torch.no_grad():
        for q, f in zip(plain.parameters(), full_params):
            q.copy_(f.view_as(q))
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        states = [local(opt.state[p][key]) if p in opt.state else torch.zeros(0) for p in params]
        moments[key] = gather(states, layouts)
    steps = [opt.state[p]["step"] for p in params if p in opt.state]
    for i, q in enumerate(plain.parameters()):
        ref_opt.state[q] = {
            "step": steps[0].clone(),
            "exp_avg": moments["exp_avg"][i].view_as(q).clone(),
            "exp_avg_sq": moments["exp_avg_sq"][i].view_as(q).clone(),
        }
    return plain, ref_opt


def trained(kind: str, rank: int, world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The MLP wrapped as ``kind``, after 3 Adam steps on this rank's shares, with gradients left to check."""
    model = wrap(make_mlp(), kind)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(3):
        x, y = share(make_data(32, seed=100 + step), rank, world)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    nn.functional.cross_entropy(model(x), y).backward()  # leave gradients to check
    return model, opt


def measure_and_compare(kind: str, rank: int, world: int) -> dict:
    """Part 1 and 2."""
    model, opt = trained(kind, rank, world)
    params = list(model.parameters())
    params[-1].grad = None  # and one None gradient

    probe = make_data(PROBE, seed=7)
    local_probe = share(probe, rank, world)
    before = local_values(params)
    grads = [p.grad for p in params]
    grad_values = local_values(grads)
    mon = monitor(model, local_probe, optimizer=opt)
    first = summary(mon.measure(3))
    second = summary(mon.measure(4))  # warm-started: overlap with the first
    forward = monitor(model, local_probe, optimizer=opt, method="forward_difference").measure(5)
    # batch sharpness builds its operators through the same factory: differences under FSDP
    batch = monitor(model, local_probe, batch_size=8).measure(6)
    after = {
        "params_exact": same(before, local_values(params)),
        "grads_same_objects": all(g is p.grad for g, p in zip(grads, params)),
        "grads_exact": same(grad_values, local_values(p.grad for p in params)),
        "none_grad_kept": params[-1].grad is None,
    }

    op = ShardedHessianOperator(lambda: torch.zeros(()), params, module=model)
    plain, ref_opt = single_process_copy(model, opt, op._layouts)
    vector = op.random_vector(torch.Generator().manual_seed(5))
    full = gather(list(vector.split([lay.numel for lay in op._layouts])), op._layouts)
    return {
        "sharded": first,
        "second": second,
        "forward": summary(forward),
        "batch_sharpness": [batch.batch_sharpness, batch.batch_sharpness_stderr, batch.method],
        "reference": reference(plain, probe, ref_opt),
        "local_size": op.size,
        "global_size": op.global_size,
        "replicas": op._replicas,
        "random_vector": torch.cat([f.reshape(-1) for f in full]).tolist() if rank == 0 else None,
        **after,
    }


def train(kind: str, rank: int, world: int, watched: bool) -> dict:
    """Part 3: 6 Adam steps, with or without a monitor attached."""
    model = wrap(make_mlp(), kind)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    mon = None
    if watched:
        budget = Budget(max_hvps=40, trace_hvps=4, tol=TOL, overhead=None)  # preconditioned first, then raw
        mon = monitor(model, share(make_data(PROBE, seed=7), rank, world), every=2, optimizer=opt, budget=budget)
        mon.attach(opt)
    losses = []
    for step in range(6):
        x, y = share(make_data(32, seed=200 + step), rank, world)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item().hex())
    return {
        "losses": losses,
        "final": local_values(model.parameters()),
        "measurements": 0 if mon is None else len(mon.history),
        "lambda_max": None if mon is None else [r.lambda_max for r in mon.history],
    }


def main() -> None:
    """Run the three parts, write the results."""
    rank, world, args = init()
    results = measure_and_compare(args.wrap, rank, world)
    if rank == 0:
        torch.save(torch.tensor(results.pop("random_vector")), os.path.join(args.out, "random_vector.pt"))
    else:
        results.pop("random_vector")
    plain, watched = train(args.wrap, rank, world, False), train(args.wrap, rank, world, True)
    results["training"] = {
        "losses_plain": plain["losses"],
        "losses_watched": watched["losses"],
        "final_exact": same(plain["final"], watched["final"]),
        "measurements": watched["measurements"],
        "lambda_max": watched["lambda_max"],
    }
    dump(args.out, rank, results)


if __name__ == "__main__":
    main()
