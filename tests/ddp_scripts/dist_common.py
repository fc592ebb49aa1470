"""Shared pieces of the ``dist_*.py`` scripts run by tests/operators/test_distributed.py.

Every script runs under ``torch.distributed.run --nproc_per_node 2`` on the CPU
with gloo, writes ``--out/rank{i}.json`` on every rank and, where noted, tensors
with ``torch.save`` on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from curvwatch import Budget, CurvatureMonitor

PROBE = 64  # examples in the whole probe batch
TOL = 1e-4  # Lanczos residual tolerance of the comparisons


def init() -> tuple[int, int, argparse.Namespace]:
    """Join the gloo process group; parse ``--out``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--wrap", default="fsdp2", choices=("fsdp2", "hsdp", "fsdp1"))
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    return dist.get_rank(), dist.get_world_size(), args


def make_mlp() -> nn.Module:
    """The model, identical on every rank (seeded): 1,507 parameters."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three-class data from two linear boundaries, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] + 0.5 * x[:, 2] > 0).long()
    return x, y


def share(batch, rank: int, world: int):
    """This rank's equal share of a batch."""
    return tuple(t.chunk(world)[rank] for t in batch)


def monitor(model, batch, **kwargs) -> CurvatureMonitor:
    """The monitor every comparison uses (strict: failures raise)."""
    kwargs.setdefault("budget", Budget(max_hvps=60, trace_hvps=4, tol=TOL, overhead=None))
    return CurvatureMonitor(
        model, batch, criterion=nn.CrossEntropyLoss(), top_k=2, strict=True, **kwargs
    )


def reference(plain: nn.Module, batch, optimizer=None) -> dict:
    """One process, whole probe batch, exact (double-backward) products.

    ``plain`` is an unwrapped model holding the full parameters (no
    communication happens here); ``optimizer`` optimizes ``plain``.
    """
    exact = monitor(plain, batch, optimizer=optimizer, method="double_backward")
    return summary(exact.measure(0))


def summary(result) -> dict:
    """The fields the tests compare."""
    return {
        "eigenvalues": list(result.eigenvalues),
        "converged": result.converged,
        "preconditioned": result.preconditioned_lambda_max,
        "trace": result.trace,
        "loss": result.loss,
        "method": result.method,
        "hvps": result.hvps,
        "threshold": result.threshold,
        "top_overlap": result.top_overlap,
    }


def snapshot(tensors) -> list[torch.Tensor | None]:
    """Detached clones (``None`` stays ``None``)."""
    return [None if t is None else t.detach().clone() for t in tensors]


def same(a, b) -> bool:
    """Bit-exact equality of two lists of tensors (``None`` matches only ``None``)."""
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b)
    )


def dump(out: str, rank: int, data: dict) -> None:
    """Write this rank's results, then leave the process group cleanly.

    (Exiting with gloo groups alive can abort a rank at shutdown, "terminate
    called without an active exception"; torch 2.13 does so now and then when
    ``init_device_mesh`` was called more than once, so the scripts build one mesh.)
    """
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(data, f)
    dist.barrier()
    dist.destroy_process_group()
    # gloo's threads still abort the interpreter's teardown now and then in torch
    # 2.13 ("terminate called without an active exception"): skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
