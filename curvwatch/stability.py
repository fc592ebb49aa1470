r"""Edge-of-stability thresholds read from an optimizer.

For a quadratic with curvature ``lambda`` along an eigenvector, the iteration is
stable iff ``lambda`` is below a threshold set by the optimizer:

* gradient descent, lr ``eta``: ``2 / eta`` (Cohen et al. 2021);
* heavy-ball momentum ``beta``: ``(2 + 2 beta) / eta``;
* Nesterov momentum ``beta``: ``(2 + 2 beta) / ((1 + 2 beta) eta)``;
* Adam / AdamW with ``beta1``: the *preconditioned* sharpness
  ``lambda_max(P^-1 H)``, ``P = diag(sqrt(v_hat) + eps)``, against
  ``(2 + 2 beta1) / ((1 - beta1) eta)`` = ``38 / eta`` at ``beta1 = 0.9``
  (Cohen et al. 2022);
* RMSprop (momentum ``beta``): ``lambda_max(P^-1 H)``, ``P = diag(sqrt(v) + eps)``,
  against ``(2 + 2 beta) / eta``.

The learning rate is the one in the parameter group *now*, so schedulers are
followed. At ``lr = 0`` (the end of a linear decay, the start of a warmup) every
curvature is stable: the threshold is ``inf`` and the ratio 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from curvwatch._errors import CurvatureError
from curvwatch._flat import flatten, local


@dataclass(frozen=True)
class Threshold:
    """A stability threshold.

    Attributes:
        value: the threshold in curvature units (1 / lr units).
        lr: the learning rate it was computed from.
        rule: ``"gd"``, ``"heavy_ball"``, ``"nesterov"``, ``"adam"`` or ``"rmsprop"``.
        adaptive: compare against the preconditioned sharpness.
        param_group: index of the parameter group used.
    """

    value: float
    lr: float
    rule: str
    adaptive: bool
    param_group: int = 0


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (Accelerate, Lightning, HF)."""
    for _ in range(5):  # AcceleratedOptimizer & co. subclass Optimizer and hold the real one
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise CurvatureError(
            f"expected a torch.optim.Optimizer (or a wrapper with .optimizer), got "
            f"{type(optimizer).__name__}"
        )
    return optimizer


def threshold(optimizer, param_group: int = 0) -> Threshold:
    """The edge-of-stability threshold of ``optimizer`` at its current lr.

    Args:
        optimizer: a torch optimizer or a framework wrapper around one.
        param_group: which parameter group's lr and momentum to use.

    Raises:
        CurvatureError: no such group, or a negative or non-finite lr.
    """
    optimizer = unwrap_optimizer(optimizer)
    if not 0 <= param_group < len(optimizer.param_groups):
        raise CurvatureError(
            f"param_group={param_group}, but the optimizer has {len(optimizer.param_groups)} groups"
        )
    group = optimizer.param_groups[param_group]
    lr = float(group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"])
    if not lr >= 0 or math.isinf(lr):
        raise CurvatureError(f"learning rate is {lr}; thresholds need a finite lr >= 0")

    def per_lr(numerator: float, denominator: float = 1.0) -> float:
        return numerator / (denominator * lr) if lr > 0 else math.inf

    if "betas" in group:
        beta1 = float(group["betas"][0])
        return Threshold(per_lr(2 + 2 * beta1, 1 - beta1), lr, "adam", True, param_group)
    if isinstance(optimizer, torch.optim.RMSprop) or "alpha" in group and "centered" in group:
        beta = float(group.get("momentum", 0.0))
        return Threshold(per_lr(2 + 2 * beta), lr, "rmsprop", True, param_group)
    beta = float(group.get("momentum", 0.0) or 0.0)
    if beta == 0.0:
        return Threshold(per_lr(2.0), lr, "gd", False, param_group)
    if group.get("nesterov", False):
        return Threshold(per_lr(2 + 2 * beta, 1 + 2 * beta), lr, "nesterov", False, param_group)
    return Threshold(per_lr(2 + 2 * beta), lr, "heavy_ball", False, param_group)


def preconditioner_diagonal(optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    r"""Flat diagonal of Adam's / RMSprop's preconditioner ``P`` for ``params``.

    Adam: ``P = sqrt(v / (1 - beta2^t)) + eps``; RMSprop: ``P = sqrt(v) + eps``,
    with ``v`` the second-moment state of each parameter (``exp_avg_sq`` or
    ``square_avg``) and ``t`` its step count. Returns ``None`` before the first
    step (no state yet) or when a parameter is not optimized. Under FSDP the
    diagonal is this rank's local shard (DTensor states are read with ``to_local()``).
    """
    optimizer = unwrap_optimizer(optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p in params:
        group, state = group_of.get(id(p)), optimizer.state.get(p, {})
        if group is None:
            return None
        if local(p).numel() == 0:  # FSDP1: no piece of p on this rank, hence no state
            parts.append(local(p).detach().reshape(-1))
            continue
        if "exp_avg_sq" in state:
            v = local(state["exp_avg_sq"])  # FSDP2: the local shard
            t = state["step"]
            t = float(t.item() if isinstance(t, torch.Tensor) else t)
            beta2 = float(group["betas"][1])
            p_diag = (v / (1 - beta2**t)).sqrt() + group["eps"]
        elif "square_avg" in state:
            p_diag = local(state["square_avg"]).sqrt() + group["eps"]
        else:
            return None
        parts.append(p_diag.to(p.dtype))
    return flatten(parts)
