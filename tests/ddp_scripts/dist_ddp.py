"""DDP, 2 gloo processes: HVPs on the unwrapped module, averaged over ranks.

Trains a DDP-wrapped MLP for 3 SGD steps, then measures on ``ddp.module`` with
``reduce=all_reduce_mean``, each rank holding half of the probe batch; every
rank also measures a plain copy on the whole probe batch (no communication),
the single-process reference. Writes ``--out/rank{i}.json``.
"""

from __future__ import annotations

import copy

import torch
from dist_common import (
    PROBE,
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
from torch.nn.parallel import DistributedDataParallel as DDP

from curvwatch import Budget
from curvwatch.operators.distributed import all_reduce_mean


def main() -> None:
    """Train, measure, compare, write."""
    rank, world, args = init()
    ddp = DDP(make_mlp())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = share(make_data(32, seed=100 + step), rank, world)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    nn.functional.cross_entropy(ddp(x), y).backward()  # leave grads to check

    probe = make_data(PROBE, seed=7)
    module = ddp.module
    params, grads = snapshot(module.parameters()), [p.grad for p in module.parameters()]
    grad_values = snapshot(grads)
    mon = monitor(module, share(probe, rank, world), optimizer=opt, reduce=all_reduce_mean)
    first = summary(mon.measure(3))
    plain = copy.deepcopy(module)
    second = summary(mon.measure(4))  # warm-started: overlap with the first
    # Ranks with different wall-clock budgets still stop Lanczos at the same step
    # (rank 0 runs out at once; without a shared decision rank 1 would wait forever).
    budget = Budget(max_hvps=60, trace_hvps=0, tol=1e-12, max_seconds=1e-9 if rank == 0 else 1e3,
                    overhead=None)
    timed = summary(
        monitor(module, share(probe, rank, world), reduce=all_reduce_mean, budget=budget, trace=False).measure(5)
    )
    dump(
        args.out,
        rank,
        {
            "distributed": first,
            "second": second,
            "timed": timed,
            "reference": reference(plain, probe, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)),
            "params_exact": same(params, snapshot(module.parameters())),
            "grads_same_objects": all(g is p.grad for g, p in zip(grads, module.parameters())),
            "grads_exact": same(grad_values, snapshot(p.grad for p in module.parameters())),
        },
    )


if __name__ == "__main__":
    main()
