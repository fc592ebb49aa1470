r"""Batch sharpness: the curvature of each mini-batch loss along its own gradient.

.. math::

    S_B = \mathbb{E}_B\!\left[\frac{g_B^\top H_B\, g_B}{\lVert g_B\rVert^2}\right],
    \qquad g_B = \nabla L_B(\theta),\; H_B = \nabla^2 L_B(\theta),

over mini-batches ``B`` of size ``batch_size``. Under mini-batch SGD it is this
quantity, not the full-batch ``lambda_max``, that settles at ``2 / lr``
(Andreyev & Beneventano 2024, "Edge of stochastic stability"). One gradient
and one Hessian-vector product per mini-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from curvwatch._errors import CurvatureError
from curvwatch.operators.distributed import Reduce
from curvwatch.operators.factory import build_operator
from curvwatch.operators.sharded import is_sharded
from curvwatch.probe import LossFn, batch_length, take

# Stop averaging once the standard error is below this fraction of the mean.
RELATIVE_STDERR = 0.01
MIN_BATCHES = 4


def batch_sharpness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Sequence[torch.Tensor],
    batch_size: int,
    method: str = "double_backward",
    max_batches: int = 32,
    seed: int = 0,
    reduce: Reduce | None = None,
    source: Callable[[], Any] | None = None,
    sharded: bool | None = None,
) -> tuple[float, float, int]:
    """Estimate the batch sharpness and its standard error.

    Draws mini-batches of ``batch_size`` examples without replacement within a
    mini-batch from ``batch`` and averages ``g^T H g / |g|^2`` until the
    standard error is below 1% of the mean (at least 4 mini-batches) or
    ``max_batches`` were used. With ``source``, mini-batches come from
    ``source()`` instead (e.g. the next training batches), used as they are.
    Under data parallelism (``reduce``) each rank
    draws from its own share and the per-batch values are averaged over ranks;
    under FSDP the sharded operator's gradient and inner products already span
    every rank's share. The operator comes from
    :func:`~curvwatch.operators.factory.build_operator`, so every ``method`` of
    the monitor works here (finite differences under FSDP). ``sharded``: whether
    ``model`` is sharded, where the caller knows (else it is read here).

    Returns:
        ``(mean, stderr, products)``.
    """
    n = batch_length(batch)
    if source is None and batch_size > n:
        raise CurvatureError(f"batch_size={batch_size} is larger than the probe batch ({n} examples)")
    generator = torch.Generator().manual_seed(seed)
    sharded = is_sharded(model) if sharded is None else sharded
    values: list[float] = []
    products = 0
    for _ in range(max_batches):
        if source is None:
            sub = take(batch, torch.randperm(n, generator=generator)[:batch_size])
        else:
            sub = source()
        op = build_operator(model, lambda sub=sub: loss_fn(model, sub), params, method, sharded=sharded)
        g = op.gradient_at_theta()
        hg = op.matvec(g)
        value = (op.dot(g, hg) / op.dot(g, g).clamp_min(1e-300)).reshape(1)
        if reduce is not None and not sharded:
            value = reduce(value)
        values.append(value.item())
        products += op.matvecs
        op.release()
        if len(values) >= MIN_BATCHES:
            mean, stderr = _mean_stderr(values)
            if stderr <= RELATIVE_STDERR * abs(mean):
                break
    return (*_mean_stderr(values), products)


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    stderr = t.std().item() / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return t.mean().item(), stderr
