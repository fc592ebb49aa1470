r"""Curvature along the update the optimizer takes: directional and critical sharpness.

The top eigenvalue of the Hessian measures the sharpest direction, which the
optimizer's step may barely touch. Three cheaper quantities look along the step
``theta_t = theta_{t-1} - lr u`` itself:

* the update direction ``u``, read back from the optimizer state
  (:func:`update_direction`, the last step; no parameter copy at step time), or
  the step it would take now from a given gradient (:func:`next_update_direction`);
* the directional sharpness (:func:`directional_sharpness`), one
  Hessian-vector product:

  .. math::

      \lambda_u = \frac{u^\top H u}{u^\top u} ,
      \qquad
      \lambda_u^P = \frac{u^\top H u}{u^\top P u}
      \quad\text{(Adam's preconditioner } P\text{)} ;

* the critical sharpness (:func:`critical_sharpness`; Kalra et al. 2026,
  arXiv:2601.16979), forward passes only: ``lambda_c = 2 / eta_c`` with
  ``eta_c`` the smallest step ``eta > 0`` along ``-u`` that raises the loss.
  On a quadratic ``L = 1/2 theta^T A theta - b^T theta`` with gradient ``g``,

  .. math::

      L(\theta - \eta u) - L(\theta) = -\eta\, g^\top u + \tfrac{\eta^2}{2}\, u^\top A u ,
      \qquad
      \eta_c = \frac{2\, g^\top u}{u^\top A u} ,
      \qquad
      \lambda_c = \frac{u^\top A u}{g^\top u} ,

  which is ``lambda_u`` for ``u = g`` (gradient descent) and ``lambda_u^P`` for
  ``u = P^-1 g`` (``g^T u = u^T P u``). Beyond quadratics it also sees the
  higher-order terms the step meets.

Thresholds: ``lambda_u`` and ``lambda_u^P`` are Rayleigh quotients, at most the
sharpness and the preconditioned sharpness, and are read against the same
thresholds (:func:`curvwatch.stability.threshold`). ``lambda_c`` is measured in
units of the step actually taken: the step of ``lr`` raised the loss iff
``lr > eta_c``, i.e. iff ``lambda_c > 2 / lr``, whatever the optimizer
(momentum and the preconditioner are already inside ``u``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from curvwatch._errors import CurvatureError
from curvwatch._flat import flatten, local, unflatten
from curvwatch.operators._base import CurvatureOperator
from curvwatch.stability import _lr, unwrap_optimizer

_KNOWN = (torch.optim.SGD, torch.optim.Adam, torch.optim.Adamax, torch.optim.RMSprop)  # AdamW subclasses Adam


# -- the update direction ---------------------------------------------------------------------------
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
    ``local(p)`` like :func:`~curvwatch.stability.preconditioner_diagonal`.

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
    lr_ref = _lr(optimizer.param_groups[param_group])
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
        lr = _lr(group)
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
    lr = _lr(group) or 0.0
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
    lr_ref = _lr(optimizer.param_groups[param_group])
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p, g in zip(params, unflatten(gradient, [local(p) for p in params])):
        group = group_of.get(id(p))
        if group is None or g.numel() == 0:
            parts.append(torch.zeros_like(g).reshape(-1))
            continue
        direction = _next(optimizer, group, optimizer.state.get(p, {}), local(p).detach(), g.detach())
        lr = _lr(group)
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


# -- directional sharpness --------------------------------------------------------------------------
def directional_sharpness(
    operator: CurvatureOperator, u: torch.Tensor, diagonal: torch.Tensor | None = None
) -> float:
    r"""The curvature along ``u``: one product with ``operator``.

    .. math::

        \lambda_u = \frac{u^\top H u}{u^\top u} ,
        \qquad
        \lambda_u^P = \frac{u^\top H u}{u^\top P u}
        = \frac{w^\top P^{-1/2} H P^{-1/2}\, w}{w^\top w}\Big|_{w = P^{1/2} u} .

    Without ``diagonal`` it is the Rayleigh quotient of ``H`` at ``u``, at most
    ``lambda_max(H)``, read against the optimizer's threshold. With
    ``diagonal`` = Adam's preconditioner ``P`` (the flat diagonal of
    :func:`~curvwatch.stability.preconditioner_diagonal`) it is the Rayleigh
    quotient of ``P^-1/2 H P^-1/2`` at ``P^1/2 u``, the update ``u`` in the
    coordinates ``P^1/2 theta`` in which Adam is heavy ball; so it is at most the
    preconditioned sharpness ``lambda_max(P^-1 H)`` and has the same threshold
    (``38 / lr`` for Adam at ``beta1 = 0.9``). Parameters the optimizer does not
    update (``P`` = the dtype's max) have ``u = 0`` and drop out.

    Inner products go through ``operator.dot``, so a sharded operator's local
    ``u`` (and ``diagonal``) give the global quotient.

    Args:
        operator: the curvature operator ``H``.
        u: the flat direction (operator's size, dtype and device).
        diagonal: optional flat diagonal ``P > 0`` of the same shape.

    Returns:
        The quotient as a float; NaN for ``u = 0`` (no direction).

    Raises:
        CurvatureError: ``u`` or ``diagonal`` do not fit the operator.
    """
    hu = operator.matvec(u)
    if diagonal is None:
        denominator = operator.dot(u, u)
    else:
        if diagonal.shape != u.shape:
            raise CurvatureError(
                f"diagonal has shape {tuple(diagonal.shape)}, expected {tuple(u.shape)} (the shape of u)"
            )
        denominator = operator.dot(u, diagonal.to(u.dtype) * u)
    denominator = float(denominator)
    if denominator == 0.0:
        return math.nan
    return float(operator.dot(u, hu)) / denominator


# -- critical sharpness -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CriticalSharpness:
    """The result of :func:`critical_sharpness`.

    Attributes:
        value: ``lambda_c = 2 / eta_c``, against the threshold ``2 / lr``.
        eta_c: the critical step: the midpoint of the final bracket when
            ``bracketed``; otherwise the bound the search reached (see
            :func:`critical_sharpness`).
        evals: calls of ``loss_at``, the one at ``eta = 0`` included.
        bracketed: a step that raised the loss and a smaller one that did not
            were found.
        precision: bound on the relative error of ``eta_c`` and ``value``
            (``(hi - lo) / (2 lo)`` of the bracket); ``inf`` when not bracketed.
    """

    value: float
    eta_c: float
    evals: int
    bracketed: bool
    precision: float = math.inf


def critical_sharpness(
    loss_at: Callable[[float], float],
    lr: float,
    *,
    max_evals: int = 10,
    rtol: float = 1e-2,
    loss0: float | None = None,
) -> CriticalSharpness:
    r"""Critical sharpness ``lambda_c = 2 / eta_c`` along ``-u`` by a forward-only line search.

    ``eta_c`` is the smallest ``eta > 0`` with ``L(theta - eta u) > L(theta)``
    (Kalra et al. 2026, arXiv:2601.16979). On a quadratic
    ``L = 1/2 theta^T A theta - b^T theta`` with gradient ``g``,
    ``eta_c = 2 (g^T u) / (u^T A u)``, so ``lambda_c = u^T A u / (g^T u)``: for
    ``u = g`` it is the curvature along ``u``, ``u^T A u / |u|^2`` (see the
    module doc). The step of ``lr`` raises the loss iff ``lr > eta_c``: compare
    ``value`` with ``2 / lr``.

    Search: ``L(theta)`` (one evaluation, none when ``loss0`` is given), then
    ``eta = lr``, the step actually taken; doubled until the loss rises, or
    halved until it does not; then bisection of the bracket ``[lo, hi]`` (``lo``
    does not raise the loss, ``hi`` does) until ``(hi - lo) / (2 lo) <= rtol``;
    ``eta_c`` is the bracket's midpoint. At most ``max_evals`` evaluations
    besides ``L(theta)``. A non-finite loss counts as a rise. Where the loss
    along the line is not convex the bracket holds a crossing, not necessarily
    the first.

    Without a bracket (``bracketed=False``): if no step raised the loss (a
    direction of negative or tiny curvature, ``u = 0``), ``eta_c`` is the
    largest step tried, a lower bound, and ``value`` an upper bound on
    ``lambda_c``; if every step raised it (``u`` not a descent direction at any
    scale tried), ``eta_c`` is the smallest step tried, an upper bound, and
    ``value`` a lower bound.

    Args:
        loss_at: ``loss_at(eta) -> float``, the loss at ``theta - eta u``, with
            the parameters unchanged afterwards (:func:`perturbed_loss`).
        lr: the learning rate of the step taken (``theta_t = theta_{t-1} - lr u``).
        max_evals: evaluations of ``loss_at`` at ``eta > 0``.
        rtol: relative precision of ``eta_c`` at which the bisection stops.
        loss0: ``L(theta)`` when the caller already has it from the same batch
            and modes (saves one forward pass).

    Returns:
        The :class:`CriticalSharpness`.

    Raises:
        CurvatureError: ``lr`` not finite and positive, ``max_evals < 1``,
            ``rtol <= 0``, or a non-finite ``L(theta)``.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise CurvatureError(f"lr must be finite and > 0 (the step taken), got {lr}")
    if max_evals < 1:
        raise CurvatureError(f"max_evals must be at least 1, got {max_evals}")
    if not rtol > 0:
        raise CurvatureError(f"rtol must be > 0, got {rtol}")
    evals = 0
    if loss0 is None:
        loss0 = float(loss_at(0.0))
        evals += 1
    if not math.isfinite(loss0):
        raise CurvatureError(f"the loss at theta is {loss0}; the line search needs a finite loss")
    lo, hi, eta = 0.0, math.inf, float(lr)  # lo: no rise (eta = 0 trivially); hi: a rise
    for _ in range(max_evals):
        evals += 1
        if float(loss_at(eta)) <= loss0:  # NaN and inf count as a rise
            lo = eta
        else:
            hi = eta
        if hi == math.inf:
            eta = 2 * lo
        elif lo == 0.0:
            eta = hi / 2
        elif (hi - lo) <= 2 * rtol * lo:
            break
        else:
            eta = (lo + hi) / 2
    if lo > 0.0 and hi < math.inf:
        eta_c = (lo + hi) / 2
        return CriticalSharpness(2 / eta_c, eta_c, evals, True, (hi - lo) / (2 * lo))
    bound = lo if hi == math.inf else hi
    return CriticalSharpness(2 / bound, bound, evals, False)


def perturbed_loss(
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
    u: torch.Tensor,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batch: Any,
    reduce: Callable[[float], float] | None = None,
) -> Callable[[float], float]:
    """``loss_at(eta)``: the loss at ``theta - eta u``, parameters restored bit-exactly.

    Each call saves a copy of the (local) parameter tensors, sets them to
    ``theta - eta u`` in place, computes ``loss_fn(model, batch)`` under
    ``torch.no_grad()`` and copies the saved values back (also when the loss
    raises), so the parameters are bit-identical afterwards. Modes, buffers
    (BatchNorm statistics) and random states are the caller's:
    run it inside :func:`curvwatch.guard.measurement_guard`.

    Args:
        model: the model owning ``params``.
        params: the parameters ``u`` is flat over (local shards under FSDP).
        u: the flat direction.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        batch: the probe batch.
        reduce: averages a per-process loss over processes (e.g. an operator's
            ``mean_over_ranks``) so that every rank takes the same branch of
            the line search.

    Returns:
        ``loss_at(eta) -> float``.
    """

    def loss_at(eta: float) -> float:
        with torch.no_grad():
            tensors = [local(p) for p in params]
            saved = [t.detach().clone() for t in tensors]
            try:
                for t, t0, d in zip(tensors, saved, unflatten(u, saved)):
                    t.copy_(t0 - eta * d)
                loss = loss_fn(model, batch)
            finally:
                for t, t0 in zip(tensors, saved):
                    t.copy_(t0)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise CurvatureError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
        value = loss.detach().item()
        return value if reduce is None else float(reduce(value))

    return loss_at
