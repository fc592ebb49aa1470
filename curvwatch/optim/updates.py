r"""The optimizer's update, read back from its state: ``theta_t = theta_{t-1} - lr u``.

Two directions, flat over the measured parameters (local shards under FSDP):

* the last update ``u`` (:func:`update_direction`), read from the optimizer
  state after ``optimizer.step()``, so nothing is copied at step time: what the
  update sharpness ``u^T H u / u^T u`` looks along;
* the update it would take now from a given gradient
  (:func:`next_update_direction`), its state read and left as it is: what the
  critical sharpness's line search walks along (the last update, at the edge of
  stability, overshot and goes uphill from where it landed).

The rules are those of ``torch.optim``'s SGD (heavy ball with dampening,
Nesterov), Adam, AdamW, Adamax and RMSprop, subclasses included; any other
optimizer has no known update (``None``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from curvwatch._errors import CurvatureError
from curvwatch._flat import flatten, local, unflatten
from curvwatch.optim.thresholds import group_lr, unwrap_optimizer

_KNOWN = (torch.optim.SGD, torch.optim.Adam, torch.optim.Adamax, torch.optim.RMSprop)  # AdamW subclasses Adam

def update_direction(optimizer, params: Sequence[torch.Tensor], param_group: int = 0) -> torch.Tensor | None:
    r"""Flat direction ``u`` of the optimizer's last update: ``theta_t = theta_{t-1} - lr u``.

    Read from the optimizer state after ``optimizer.step()``, so nothing is
    copied at step time. ``lr`` is the learning rate of ``param_group`` (now);
    a group with another lr gets its ``u`` scaled by ``lr_group / lr`` so that
    one ``lr`` describes the whole step (unscaled when that lr is 0 or not a
    number).

    * SGD: ``u = b_t``, the state ``momentum_buffer`` (momentum > 0); with
      Nesterov ``u = g_t + beta b_t``; without momentum ``u = g_t``;
    * Adam / AdamW: ``u = m_hat / (sqrt(v_hat) + eps)``, ``m_hat = m / (1 -
      beta1^t)``, ``v_hat = v / (1 - beta2^t)`` from ``exp_avg``, ``exp_avg_sq``
      (``max_exp_avg_sq`` with ``amsgrad``) and ``step``;
    * Adamax: ``u = m_hat / u_t`` with the state ``exp_inf`` (eps is inside it);
    * RMSprop: ``u = b_t`` (momentum > 0), else ``g_t / (sqrt(v) + eps)``
      (``sqrt(v - mean(g)^2) + eps`` when ``centered``).

    ``g_t`` is the gradient the step used: ``p.grad`` (negated with
    ``maximize``) plus the coupled weight decay ``wd theta_{t-1}``; since
    ``theta_{t-1} = theta_t + lr u``, solving for ``u`` gives it exactly from
    ``theta_t`` (e.g. ``u = (g + wd theta_t) / (1 - lr wd)`` for plain SGD). The
    directions that use ``g_t`` (SGD without momentum, Nesterov, RMSprop without
    momentum) need ``.grad`` as the step left it: read them between ``step()``
    and the next ``zero_grad()``. The others only read the state, in which the
    coupled weight decay (SGD, Adam, Adamax, RMSprop) already sits.

    AdamW's *decoupled* weight decay is not part of ``u``: its step is
    ``theta_t = (1 - lr wd) theta_{t-1} - lr u``; the shrink is a step along
    ``-theta``, not along the loss's landscape, and is left out (as it is from
    the thresholds).

    A parameter this optimizer does not update (in none of its groups, no state,
    or, for the gradient-based directions, no ``.grad``) gets zeros. A parameter
    that skipped the last step (``.grad`` None) but has state from earlier steps
    gets the update its state describes. Under FSDP ``u`` is this rank's local
    shard (states, gradients and parameters read with ``to_local()``), flat over
    ``local(p)`` like :func:`~curvwatch.optim.thresholds.preconditioner_diagonal`.

    Args:
        optimizer: a torch optimizer or a framework wrapper (Lightning, Accelerate).
        params: the parameters ``u`` is flat over, in this order.
        param_group: the group whose lr is ``lr``.

    Returns:
        ``u`` in the parameters' dtype, or ``None`` for an optimizer other than
        SGD, Adam, AdamW, Adamax, RMSprop (or subclasses) and when none of
        ``params`` has what its direction needs (before the first step).

    Raises:
        CurvatureError: not an optimizer, or no such ``param_group``.
    """
    optimizer = _known(optimizer, param_group)
    if optimizer is None:
        return None
    lr_ref = group_lr(optimizer.param_groups[param_group])
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts, found = [], False
    for p in params:
        lp = local(p).detach()
        group = group_of.get(id(p))
        direction = None
        if lp.numel() > 0 and group is not None:
            direction = _direction(optimizer, group, optimizer.state.get(p, {}), p)
        if direction is None:
            parts.append(torch.zeros_like(lp).reshape(-1))
            continue
        found = True
        lr = group_lr(group)
        if lr_ref and lr is not None and lr != lr_ref:
            direction = direction * (lr / lr_ref)
        parts.append(direction.to(p.dtype).reshape(-1))
    return flatten(parts) if found else None


def missing_update_reason(optimizer, params: Sequence[torch.Tensor]) -> str | None:
    """Why :func:`update_direction` found no update, where the user can act on it; else ``None``.

    The one case said: the optimizer's rule builds the update from the step's
    gradient (SGD without momentum or with Nesterov, RMSprop without momentum)
    and none of ``params`` it holds has a ``.grad``: ``zero_grad()`` ran
    between ``optimizer.step()`` and the measurement (or no step was taken).
    """
    optimizer = _known(optimizer, 0)
    if optimizer is None:
        return None
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    held = [p for p in params if id(p) in group_of]
    rules = {_gradient_rule(optimizer, group_of[id(p)]) for p in held} - {None}
    if not rules or any(p.grad is not None for p in held):
        return None
    return (
        f"curvwatch: the update sharpness needs the last step's gradient ({', '.join(sorted(rules))}: the update "
        "is built from .grad), but .grad is empty: zero_grad() ran between optimizer.step() and the "
        "measurement, or no step was taken yet; it is logged as NaN. Measure between step() and "
        "zero_grad() (monitor.attach(optimizer) does), or use momentum (its buffer holds the update)"
    )


def _gradient_rule(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> str | None:
    """The name of ``group``'s update rule if it reads ``.grad`` (see :func:`update_direction`), else ``None``."""
    momentum = float(group.get("momentum", 0.0) or 0.0)
    if isinstance(optimizer, torch.optim.SGD):
        if momentum == 0.0:
            return "SGD without momentum"
        return "SGD with Nesterov momentum" if group.get("nesterov", False) else None
    if isinstance(optimizer, torch.optim.RMSprop) and momentum == 0.0:
        return "RMSprop without momentum"
    return None


def _known(optimizer, param_group: int) -> torch.optim.Optimizer | None:
    """The unwrapped optimizer if its update rule is known here, else ``None``.

    Raises:
        CurvatureError: not an optimizer, or no such ``param_group``.
    """
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, _KNOWN):
        return None
    if not 0 <= param_group < len(optimizer.param_groups):
        raise CurvatureError(
            f"param_group={param_group}, but the optimizer has {len(optimizer.param_groups)} groups"
        )
    return optimizer


def _grad(group: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
    """``p.grad`` as the step used it (sign of ``maximize``), local; ``None`` without one."""
    if p.grad is None:
        return None
    g = local(p.grad).detach()
    return -g if group.get("maximize", False) else g


def _direction(optimizer, group: dict[str, Any], state: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
    """One parameter's (local) ``u``, ``None`` when it cannot be had."""
    if isinstance(optimizer, torch.optim.SGD):
        return _sgd(group, state, p)
    if isinstance(optimizer, torch.optim.RMSprop):
        return _rmsprop(group, state, p)
    if "exp_avg" not in state or "step" not in state:
        return None
    t = state["step"]
    t = float(t.item() if isinstance(t, torch.Tensor) else t)
    beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])
    m_hat = local(state["exp_avg"]) / (1 - beta1**t)
    if isinstance(optimizer, torch.optim.Adamax):
        return m_hat / local(state["exp_inf"])
    key = "max_exp_avg_sq" if group.get("amsgrad", False) and "max_exp_avg_sq" in state else "exp_avg_sq"
    return m_hat / ((local(state[key]).sqrt() / math.sqrt(1 - beta2**t)) + group["eps"])


def _coupled(group: dict[str, Any], p: torch.Tensor, numerator: torch.Tensor, scale: Any = 1.0) -> torch.Tensor:
    r"""Solve ``scale u = numerator + wd theta_{t-1}`` with ``theta_{t-1} = theta_t + lr u`` for ``u``.

    ``u = (numerator + wd theta_t) / (scale - lr wd)``; plain ``numerator / scale``
    without weight decay.
    """
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if wd == 0.0:
        return numerator / scale
    lr = group_lr(group) or 0.0
    return (numerator + wd * local(p).detach()) / (scale - lr * wd)


def _sgd(group: dict[str, Any], state: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
    beta = float(group.get("momentum", 0.0) or 0.0)
    buf = state.get("momentum_buffer")
    if beta != 0.0 and buf is None:
        return None
    if beta != 0.0 and not group.get("nesterov", False):
        return local(buf)  # b_t = beta b_{t-1} + (1 - tau) g_t, weight decay inside g_t
    g = _grad(group, p)
    if g is None:
        return None
    if beta == 0.0:
        return _coupled(group, p, g)
    return _coupled(group, p, g + beta * local(buf))  # Nesterov: u = g_t + beta b_t


def _rmsprop(group: dict[str, Any], state: dict[str, Any], p: torch.Tensor) -> torch.Tensor | None:
    if float(group.get("momentum", 0.0) or 0.0) > 0:
        buf = state.get("momentum_buffer")
        return None if buf is None else local(buf)  # b_t = beta b_{t-1} + g_t / avg
    g = _grad(group, p)
    if g is None or "square_avg" not in state:
        return None
    v = local(state["square_avg"])
    if group.get("centered", False) and "grad_avg" in state:
        v = v - local(state["grad_avg"]) ** 2
    return _coupled(group, p, g, v.sqrt() + group["eps"])


def next_update_direction(
    optimizer, params: Sequence[torch.Tensor], gradient: torch.Tensor, param_group: int = 0
) -> torch.Tensor | None:
    r"""Flat direction ``u`` of the step the optimizer would take now from ``gradient``: ``theta - lr u``.

    The optimizer's update rule applied once to the flat ``gradient`` (of the
    probe loss, say) with its present state, which is read and left as it is:

    * SGD: ``g' = g + wd theta``; with momentum ``b' = beta b + (1 - tau) g'``
      (``g'`` when there is no buffer yet), ``u = b'`` (Nesterov: ``g' + beta b'``);
      without, ``u = g'``;
    * Adam / AdamW: ``m' = beta1 m + (1 - beta1) g'``, ``v' = beta2 v + (1 - beta2) g'^2``,
      ``u = m'/(1 - beta1^{t+1}) / (sqrt(v'/(1 - beta2^{t+1})) + eps)`` (``max(v_max, v')``
      with ``amsgrad``; AdamW's decoupled decay left out, ``g' = g``);
    * Adamax: ``u = m'/(1 - beta1^{t+1}) / max(beta2 u_t, |g'| + eps)``;
    * RMSprop: ``v' = alpha v + (1 - alpha) g'^2``, ``a = sqrt(v') + eps``
      (centered: ``sqrt(v' - mean'^2) + eps``); ``u = beta b + g'/a`` with
      momentum, else ``g'/a``.

    ``g'`` includes the coupled weight decay and the sign of ``maximize``. A
    group with another lr is scaled by ``lr_group / lr`` as in
    :func:`update_direction`. This is the direction a critical-sharpness line
    search needs: the step about to be taken starts downhill (``g^T u > 0`` for
    these rules), while the last step, at the edge of stability, overshot along
    the top eigenvector and goes uphill from where it landed.

    Returns:
        ``u`` in the parameters' dtype (zeros for parameters this optimizer
        does not hold), or ``None`` for an optimizer other than SGD, Adam,
        AdamW, Adamax, RMSprop (or subclasses).

    Raises:
        CurvatureError: not an optimizer, no such ``param_group``, or a
            gradient of the wrong length.
    """
    optimizer = _known(optimizer, param_group)
    if optimizer is None:
        return None
    size = sum(local(p).numel() for p in params)
    if gradient.shape != (size,):
        raise CurvatureError(f"gradient has shape {tuple(gradient.shape)}, expected ({size},)")
    lr_ref = group_lr(optimizer.param_groups[param_group])
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p, g in zip(params, unflatten(gradient, [local(p) for p in params])):
        group = group_of.get(id(p))
        if group is None or g.numel() == 0:
            parts.append(torch.zeros_like(g).reshape(-1))
            continue
        direction = _next(optimizer, group, optimizer.state.get(p, {}), local(p).detach(), g.detach())
        lr = group_lr(group)
        if lr_ref and lr is not None and lr != lr_ref:
            direction = direction * (lr / lr_ref)
        parts.append(direction.to(p.dtype).reshape(-1))
    return flatten(parts)


def _next(optimizer, group: dict[str, Any], state: dict[str, Any], theta: torch.Tensor, g: torch.Tensor):
    """One parameter's next ``u`` from gradient ``g`` (see :func:`next_update_direction`)."""
    if group.get("maximize", False):
        g = -g
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if wd and not isinstance(optimizer, torch.optim.AdamW):
        g = g + wd * theta
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(group.get("momentum", 0.0) or 0.0)
        if beta == 0.0:
            return g
        buf = state.get("momentum_buffer")
        tau = float(group.get("dampening", 0.0) or 0.0)
        buf = g if buf is None else beta * local(buf) + (1 - tau) * g
        return g + beta * buf if group.get("nesterov", False) else buf
    if isinstance(optimizer, torch.optim.RMSprop):
        alpha, eps = float(group["alpha"]), float(group["eps"])
        v = alpha * local(state["square_avg"]) + (1 - alpha) * g * g if "square_avg" in state else (1 - alpha) * g * g
        if group.get("centered", False):
            mean = alpha * local(state["grad_avg"]) + (1 - alpha) * g if "grad_avg" in state else (1 - alpha) * g
            v = v - mean * mean
        step = g / (v.sqrt() + eps)
        beta = float(group.get("momentum", 0.0) or 0.0)
        if beta > 0 and "momentum_buffer" in state:
            return beta * local(state["momentum_buffer"]) + step
        return step
    beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])
    t = state.get("step", 0)
    t = float(t.item() if isinstance(t, torch.Tensor) else t) + 1
    m = beta1 * local(state["exp_avg"]) + (1 - beta1) * g if "exp_avg" in state else (1 - beta1) * g
    m_hat = m / (1 - beta1**t)
    if isinstance(optimizer, torch.optim.Adamax):
        scaled = g.abs() + group["eps"]
        inf = torch.maximum(beta2 * local(state["exp_inf"]), scaled) if "exp_inf" in state else scaled
        return m_hat / inf
    v = beta2 * local(state["exp_avg_sq"]) + (1 - beta2) * g * g if "exp_avg_sq" in state else (1 - beta2) * g * g
    if group.get("amsgrad", False) and "max_exp_avg_sq" in state:
        v = torch.maximum(local(state["max_exp_avg_sq"]), v)
    return m_hat / ((v.sqrt() / math.sqrt(1 - beta2**t)) + group["eps"])
