r"""Edge-of-stability thresholds read from an optimizer.

For a quadratic with curvature ``lambda`` along an eigenvector, the iteration is
stable iff ``lambda`` is below a threshold set by the optimizer:

* gradient descent, lr ``eta``: ``2 / eta`` (Cohen et al. 2021);
* heavy-ball momentum ``beta`` with dampening ``tau`` (``torch.optim.SGD``:
  ``b_t = beta b_{t-1} + (1 - tau) g_t``, ``theta_{t+1} = theta_t - eta b_t``):
  ``(2 + 2 beta) / ((1 - tau) eta)``; ``tau = 0`` is plain heavy ball,
  ``(2 + 2 beta) / eta``. Derivation: on ``g = lambda theta`` the two-step
  recurrence is ``theta_{t+1} = (1 + beta - a) theta_t - beta theta_{t-1}`` with
  ``a = (1 - tau) eta lambda``; both roots of ``z^2 - (1 + beta - a) z + beta``
  lie inside the unit circle iff ``0 < a < 2 + 2 beta`` (for ``0 <= beta < 1``).
  Dampening only rescales the lr, and ``tau = 1`` lets no gradient in after the
  first step (threshold ``inf``). torch skips the dampening on the first step, a
  transient that does not change stability;
* Nesterov momentum ``beta``: ``(2 + 2 beta) / ((1 + 2 beta) eta)`` (torch
  allows Nesterov only without dampening);
* Adam / AdamW with ``beta1``: the *preconditioned* sharpness
  ``lambda_max(P^-1 H)``, ``P = diag(sqrt(v_hat) + eps)``
  (``sqrt(max v_hat) + eps`` with ``amsgrad``), against
  ``(2 + 2 beta1) / ((1 - beta1) eta)`` = ``38 / eta`` at ``beta1 = 0.9``
  (Cohen et al. 2022). This is the heavy-ball rule above with ``beta = tau =
  beta1``: Adam's first moment is heavy ball with dampening ``beta1`` on the
  preconditioned gradient;
* Adamax with ``beta1``: the same rule and threshold, with its own
  preconditioner ``P = diag(u_t)``, the infinity-norm state ``exp_inf``
  (``u_t = max(beta2 u_{t-1}, |g_t| + eps)``: eps sits inside the max, and ``u``
  has no bias correction);
* RMSprop (momentum ``beta``): ``lambda_max(P^-1 H)``, ``P = diag(sqrt(v) + eps)``
  (``sqrt(v - mean(g)^2) + eps`` when ``centered``), against ``(2 + 2 beta) / eta``.

Adam's and Adamax's step also carries the first-moment bias correction
``1 / (1 - beta1^t)``, which tends to 1 (0.5 % at ``t = 50`` for ``beta1 = 0.9``);
the thresholds use the asymptotic step, as Cohen et al. do.

Optimizers without a known rule get no threshold: a :class:`Threshold` whose
``value`` is NaN (so the ratio is NaN), ``rule="unknown"`` and a ``note`` naming
the optimizer. That covers Adagrad, Adadelta, Rprop, ASGD, LBFGS, NAdam and RAdam
(their effective step follows the step count: a momentum schedule, a
rectification), SparseAdam, Adafactor, Muon, ``maximize=True`` (the optimizer
climbs; EoS is about descent), and every optimizer that is not one of the
``torch.optim`` classes above or a subclass of one: the rule is chosen by class,
never guessed from group keys such as ``betas`` (Lion has ``betas`` too). A
parameter group without a numeric ``lr`` also gets a NaN threshold with a note;
the measurement itself goes on.

The learning rate is the one in the parameter group *now*, so schedulers are
followed. At ``lr = 0`` (the end of a linear decay, the start of a warmup) every
curvature is stable: the threshold is ``inf`` and the ratio 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from curvwatch._errors import CurvatureError
from curvwatch._flat import flatten, local

KNOWN = "SGD (plain, heavy ball with dampening, Nesterov), Adam, AdamW, Adamax and RMSprop"


@dataclass(frozen=True)
class Threshold:
    """A stability threshold.

    Attributes:
        value: the threshold in curvature units (1 / lr units); NaN when there is
            none (an optimizer without a known rule, or no numeric lr): the
            ratio is then NaN too.
        lr: the learning rate it was computed from (NaN if the group has none).
        rule: ``"gd"``, ``"heavy_ball"``, ``"nesterov"``, ``"adam"``,
            ``"adamax"``, ``"rmsprop"`` or ``"unknown"``.
        adaptive: compare against the preconditioned sharpness.
        param_group: index of the parameter group used.
        note: why there is no threshold (a warning text naming the optimizer);
            empty when ``value`` is a number.
    """

    value: float
    lr: float
    rule: str
    adaptive: bool
    param_group: int = 0
    note: str = ""


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


def check_optimizer(optimizer: Any, model: torch.nn.Module, param_group: int | None = None) -> torch.optim.Optimizer:
    """The torch optimizer inside ``optimizer``, checked against ``model`` (and ``param_group``).

    Thresholds, the preconditioner and the update are read from the
    optimizer's entries for the model's parameters: from an optimizer of
    another model, SGD's ratio came silently from the wrong lr. Checked once,
    where the optimizer is given, not at every measurement.

    Raises:
        CurvatureError: not an optimizer; one that holds none of ``model``'s
            parameters; a ``param_group`` it does not have (not checked when
            ``None``).
    """
    inner = unwrap_optimizer(optimizer)
    if param_group is not None:
        groups = len(inner.param_groups)
        if not isinstance(param_group, int) or isinstance(param_group, bool) or not 0 <= param_group < max(groups, 1):
            raise CurvatureError(
                f"param_group={param_group!r} but the optimizer has {groups} parameter group(s): "
                f"pass an index in 0..{groups - 1}"
            )
    held = {id(p) for group in inner.param_groups for p in group["params"]}
    if not any(id(p) in held for p in model.parameters()):
        raise CurvatureError(
            f"the optimizer ({type(inner).__name__}, {len(held)} parameter tensor(s)) holds none of the "
            "model's parameters, so its lr and state say nothing about this model: pass the optimizer that "
            "trains this model (built from model.parameters()), or optimizer=None for no threshold"
        )
    return inner


def threshold(optimizer, param_group: int = 0) -> Threshold:
    """The edge-of-stability threshold of ``optimizer`` at its current lr.

    Args:
        optimizer: a torch optimizer or a framework wrapper around one.
        param_group: which parameter group's lr and momentum to use.

    Returns:
        The threshold; for an optimizer without a known rule, or a group
        without a numeric ``lr``, one with ``value`` NaN and a ``note`` saying why.

    Raises:
        CurvatureError: not an optimizer, no such group, or a negative or
            infinite lr.
    """
    optimizer = unwrap_optimizer(optimizer)
    if not 0 <= param_group < len(optimizer.param_groups):
        raise CurvatureError(
            f"param_group={param_group}, but the optimizer has {len(optimizer.param_groups)} groups"
        )
    group = optimizer.param_groups[param_group]
    name = type(optimizer).__name__
    lr = group_lr(group)
    if lr is not None and (not lr >= 0 or math.isinf(lr)):
        raise CurvatureError(f"learning rate is {lr}; thresholds need a finite lr >= 0")
    rule = _rule(optimizer, group)
    if isinstance(rule, str):  # no rule: the reason
        return Threshold(math.nan, math.nan if lr is None else lr, "unknown", False, param_group, rule)
    kind, numerator, denominator, adaptive = rule
    if lr is None:
        return Threshold(
            math.nan, math.nan, kind, adaptive, param_group,
            f"{name}: parameter group {param_group} has no numeric 'lr' ("
            + (f"lr={group['lr']!r}" if "lr" in group else "no 'lr' key")
            + "), so there is no edge-of-stability threshold; sharpness is logged without one",
        )
    value = numerator / (denominator * lr) if lr > 0 and denominator > 0 else math.inf
    return Threshold(value, lr, kind, adaptive, param_group)


def group_lr(group: dict[str, Any]) -> float | None:
    """A parameter group's lr as a float, ``None`` when it has none (or not a number)."""
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        return float(lr.item())
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    return None


def _rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[str, float, float, bool] | str:
    """``(rule, numerator, denominator, adaptive)``: threshold ``numerator / (denominator lr)``.

    A string instead: the reason there is no rule.
    """
    name = type(optimizer).__name__
    if group.get("maximize", False):
        return (
            f"{name} with maximize=True climbs the loss; curvwatch's edge-of-stability "
            "thresholds are for descent, so sharpness is logged without one"
        )
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax)):
        beta1 = float(group["betas"][0])
        kind = "adamax" if isinstance(optimizer, torch.optim.Adamax) else "adam"
        return kind, 2 + 2 * beta1, 1 - beta1, True
    if isinstance(optimizer, torch.optim.RMSprop):
        return "rmsprop", 2 + 2 * float(group.get("momentum", 0.0) or 0.0), 1.0, True
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0) or 0.0)
        if beta == 0.0:  # torch ignores dampening without momentum
            return "gd", 2.0, 1.0, False
        if group.get("nesterov", False):
            return "nesterov", 2 + 2 * beta, 1 + 2 * beta, False
        tau = float(group.get("dampening", 0.0) or 0.0)
        if tau > 1:
            return (
                f"SGD with dampening={tau} > 1 moves against the gradient; no "
                "edge-of-stability threshold, sharpness is logged without one"
            )
        return "heavy_ball", 2 + 2 * beta, 1 - tau, False  # tau = 1: no gradient enters, inf
    return (
        f"{name} has no known edge-of-stability rule (curvwatch knows {KNOWN}); "
        "sharpness is logged without a threshold"
    )


def preconditioner_diagonal(optimizer, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
    r"""Flat diagonal of the adaptive optimizer's preconditioner ``P`` for ``params``.

    * Adam / AdamW: ``P = sqrt(v / (1 - beta2^t)) + eps`` with ``v`` the state
      ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``) and ``t`` its step;
    * Adamax: ``P = u``, the state ``exp_inf`` (eps is already inside it);
    * RMSprop: ``P = sqrt(v) + eps`` with ``v`` = ``square_avg``
      (``square_avg - grad_avg^2`` when ``centered``).

    A parameter this optimizer does not update (in none of its groups, or
    never given a gradient, hence no state) does not move, so only the block of
    the parameters it updates governs its stability: such a parameter gets
    ``P`` = the largest finite number of its dtype, i.e. ``P^-1 = 0`` to within
    rounding (``P^-1/2`` is ``5e-20`` in float32), which removes its rows and
    columns from ``P^-1/2 H P^-1/2``. (``P = 1`` would mix that parameter's raw
    curvature, in other units, into the preconditioned sharpness.)

    Returns ``None`` for optimizers without such a preconditioner (SGD, unknown
    ones) and when none of ``params`` has state yet (before the first step).
    Under FSDP the diagonal is this rank's local shard (DTensor states are read
    with ``to_local()``).
    """
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(
        optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.RMSprop)
    ):
        return None
    runs = moment_runs(optimizer, params, lambda group, state, p: _moment(optimizer, group, state, p))
    if all(run.key is None for run in runs):
        return None
    return flatten([_filled(run.param) if run.key is None else _diagonal(run.key, run.moments) for run in runs])


@dataclass
class MomentRun:
    """Adjacent parameters sharing one rule (``key``), at ``[start, end)`` of the flat layout.

    Attributes:
        start, end: the run's flat offsets (local shards under FSDP).
        key: the rule the caller's ``rule_of`` gave; ``None``: a parameter of its own
            without one (no group, no state, no piece on this rank).
        moments: the run's local moments, flat, in order (empty where ``key`` is ``None``).
        param: the run's first parameter.
    """

    start: int
    end: int
    key: Any
    moments: list[torch.Tensor]
    param: torch.Tensor


def moment_runs(optimizer, params: Sequence[torch.Tensor], rule_of: Callable) -> list[MomentRun]:
    """``params`` in runs of adjacent parameters with one rule, and their moments.

    ``rule_of(group, state, param)`` gives a parameter's ``(key, moment)``, or
    ``None`` (no state, or no rule). ``P`` and Adam's linear set are elementwise,
    so a run (the usual case: one group, one step count) is formed in one pass
    over its moments, entry for entry as parameter by parameter.
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    runs: list[MomentRun] = []
    offset = 0
    for p in params:
        n = local(p).numel()
        group = group_of.get(id(p))
        found = None if group is None or n == 0 else rule_of(group, optimizer.state.get(p, {}), p)
        if found is not None and runs and runs[-1].key == found[0]:
            runs[-1].end = offset + n
            runs[-1].moments.append(found[1].reshape(-1))
        elif found is not None:
            runs.append(MomentRun(offset, offset + n, found[0], [found[1].reshape(-1)], p))
        else:
            runs.append(MomentRun(offset, offset + n, None, [], p))
        offset += n
    return runs


def _filled(p: torch.Tensor) -> torch.Tensor:
    """``P`` of a parameter the optimizer does not update: the dtype's largest number (``P^-1 = 0``)."""
    return torch.full_like(local(p).detach(), torch.finfo(p.dtype).max).reshape(-1)


def _moment(
    optimizer, group: dict[str, Any], state: dict[str, Any], p: torch.Tensor
) -> tuple[tuple, torch.Tensor] | None:
    """One parameter's key for ``P`` and its local moment, ``None`` without state.

    The key: the rule's kind and constants, the moment's and ``p``'s dtypes (a run shares all).

    Adamax: ``P = u``; RMSprop: ``P = sqrt(v) + eps``; Adam: ``P = sqrt(v / (1 - beta2^t)) + eps``.
    """
    if isinstance(optimizer, torch.optim.Adamax):
        if "exp_inf" not in state:
            return None
        rule, v = ("adamax",), local(state["exp_inf"])
    elif isinstance(optimizer, torch.optim.RMSprop):
        if "square_avg" not in state:
            return None
        v = local(state["square_avg"])
        if group.get("centered", False) and "grad_avg" in state:
            v = (v - local(state["grad_avg"]) ** 2).clamp_min(0)
        rule = ("rmsprop", group["eps"])
    else:
        moment = adam_second_moment(group, state)
        if moment is None:
            return None
        v, t = moment
        rule = ("adam", 1 - float(group["betas"][1]) ** t, group["eps"])
    return (rule, v.dtype, p.dtype), v


def _diagonal(key: tuple, moments: list[torch.Tensor]) -> torch.Tensor:
    """``P`` of a run of parameters sharing one rule, moment dtype and dtype (``key``), from their flat moments.

    ``P`` is elementwise: one pass over the run's moments gives each entry as
    parameter by parameter, with fewer operations.
    """
    rule, _, dtype = key
    v = moments[0] if len(moments) == 1 else torch.cat(moments)
    if rule[0] == "rmsprop":
        v = v.sqrt() + rule[1]
    elif rule[0] == "adam":
        v = (v / rule[1]).sqrt() + rule[2]
    return v.to(dtype)


def adam_second_moment(group: dict[str, Any], state: dict[str, Any]) -> tuple[torch.Tensor, float] | None:
    """Adam's ``(v, t)``: the local ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad) and its step count.

    ``None`` before the parameter's first step (no state).
    """
    key = "max_exp_avg_sq" if group.get("amsgrad", False) and "max_exp_avg_sq" in state else "exp_avg_sq"
    if key not in state:
        return None
    t = state["step"]
    return local(state[key]), float(t.item() if isinstance(t, torch.Tensor) else t)  # FSDP2: the local shard
