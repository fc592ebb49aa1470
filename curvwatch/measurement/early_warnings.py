"""The early warnings along the optimizer's step: the update sharpness and the critical sharpness.

* :func:`update_sharpness`: the curvature along the last update ``u``, one
  product, measured first (:func:`~curvwatch.directional.directional_sharpness`);
* :func:`critical_sharpness`: ``2 / eta_c`` along the update the optimizer
  would take now, a forward-only line search run after the products
  (:func:`~curvwatch.directional.critical_sharpness`).

Both are optional quantities: they run within the share proper
(:attr:`~curvwatch.planning.Allowance.extra_seconds`), never on the fixed
allowance that buys the certified solves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from curvwatch._errors import CurvatureError
from curvwatch._flat import flatten
from curvwatch.directional import critical_sharpness as line_search
from curvwatch.directional import directional_sharpness, perturbed_loss
from curvwatch.measurement.context import Context, adaptive
from curvwatch.operators._base import CurvatureOperator
from curvwatch.operators._closure import zeros_for_none
from curvwatch.optim import Threshold, missing_update_reason, next_update_direction, update_direction
from curvwatch.solvers.lanczos import gap_steps

# The critical sharpness's line search: forward passes at eta > 0 (one more at
# eta = 0), and the relative width of the final bracket of eta_c.
CRITICAL_MAX_EVALS = 10
CRITICAL_RTOL = 1e-2


class _OutOfTime(Exception):
    """The critical sharpness's line search reached the measurement's deadline."""


def last_update(ctx: Context, limit: Threshold | None) -> torch.Tensor | None:
    """The optimizer's last update ``u`` (``theta_t = theta_{t-1} - lr u``), or ``None``.

    ``None`` without an optimizer, for one whose update is not known
    (:func:`~curvwatch.optim.update_direction`), before its first step, and
    when the update sharpness is not asked for (the critical sharpness
    searches along the next update instead).
    """
    if limit is None or not ctx.options.update_sharpness:
        return None
    params = ctx.source.params
    u = update_direction(ctx.optimizer, params, ctx.options.param_group)
    why = missing_update_reason(ctx.optimizer, params) if u is None else None
    if why is not None:  # the step's gradient was cleared: say once why the update sharpness is NaN
        ctx.note("update-missing", why)
    return u


def update_sharpness(
    ctx: Context, operator: CurvatureOperator, limit: Threshold | None, diagonal: torch.Tensor | None, left: int
) -> float:
    """The curvature along ``u``: ``u^T H u / u^T u`` (``/ u^T P u`` for Adam-type), one product.

    NaN when not asked for, without ``u``, for an adaptive threshold without
    the preconditioner, when it would leave the threshold's solve fewer
    products than it needs (of ``left``), when the share proper does not
    cover it beside the certified solves (their
    :func:`~curvwatch.solvers.lanczos.gap_steps`: it is measured first, they
    come after), and in the first measurement under a time limit (which
    learns what a product costs with the threshold's quantity: its seconds
    may cover one product only). The share is checked before ``u`` is formed.
    """
    if not ctx.options.update_sharpness or (adaptive(limit) and diagonal is None) or ctx.extra_past():
        return math.nan
    if ctx.clock.deadline is not None and ctx.state.measurements == 0:
        return math.nan
    top_k = ctx.options.top_k
    if left < 1 + (1 if diagonal is not None else top_k):
        return math.nan
    solves = gap_steps(top_k) + (gap_steps(1) if diagonal is not None else 0)
    if ctx.extra_left() < 1 + solves:
        return math.nan
    u = last_update(ctx, limit)
    return math.nan if u is None else directional_sharpness(operator, u, diagonal)


def probe_gradient(
    ctx: Context, operator: CurvatureOperator, params: Sequence[torch.Tensor] | None = None, keep: bool = True
) -> torch.Tensor:
    """The probe loss's flat gradient at theta for ``params`` (default: all measured; mean over ranks).

    The Hessian operator's own (cached by its products; under differences
    summed over the probe's pieces, so it fits where they fit); one
    backward of the probe loss for the output-space operators (GGN,
    Fisher), which form no gradient. ``operator`` is over ``params``;
    ``keep=False``: the operator caches it only where its products need it.
    """
    probe, params = ctx.probe, ctx.source.params if params is None else params
    with torch.enable_grad():
        if operator.forms_gradient:  # this rank's: a ReducedOperator reduces products, not its gradient
            gradient = operator.gradient_at_theta(keep)
        else:
            loss = probe.loss_fn(ctx.model, probe.batch)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            gradient = flatten(zeros_for_none(grads, params))
    reduce = ctx.options.reduce
    return gradient if reduce is None else reduce(gradient)


def critical_sharpness(ctx: Context, limit: Threshold | None, operator: CurvatureOperator) -> tuple[float, float, int]:
    """``(2 / eta_c, its ratio to 2 / lr, forward passes)`` along ``-u``: a line search, no products.

    ``u`` is the step the optimizer would take now from the probe's gradient
    (:func:`~curvwatch.optim.next_update_direction`), not the last step: at
    the edge of stability the last step overshot along the top eigenvector,
    so from where it landed its direction goes uphill at once and no
    ``eta_c`` can be bracketed (seen on the digits demo: 5 values in 64
    measurements; with the next step, 64 in 64, 0.95 lambda_max).

    Run after the products, within the share proper
    (:attr:`~curvwatch.planning.Allowance.extra_seconds`, stopped there): it
    moves the parameters in place, which a graph built for products would not
    survive, and the threshold's quantity comes first.

    The loss at ``theta - eta u`` on the probe batch (parameters set in place
    and restored bit-exactly, :func:`~curvwatch.directional.perturbed_loss`),
    averaged over ranks so every rank takes the same branch. The threshold is
    ``2 / lr`` of the step taken, whatever the optimizer (momentum and the
    preconditioner are inside ``u``). NaN (with a note) when the search does
    not bracket ``eta_c``.
    """
    nan = (math.nan, math.nan, 0)
    lr = limit.lr if limit is not None else None
    if not ctx.options.critical_sharpness or ctx.optimizer is None or limit is None or ctx.extra_past():
        return nan
    if lr is None or not (math.isfinite(lr) and lr > 0):
        return nan
    if ctx.sharded:  # FSDP1 must not run a forward without backward
        ctx.note(
            "critical-sharded",
            "curvwatch: critical sharpness is not measured under FSDP (its line search runs forward "
            "passes without a backward); the update sharpness is",
        )
        return nan
    params = ctx.source.params
    u = next_update_direction(ctx.optimizer, params, probe_gradient(ctx, operator), ctx.options.param_group)
    if u is None:
        return nan
    loss_at = perturbed_loss(ctx.model, params, u, ctx.probe.loss_fn, ctx.probe.batch, operator.mean_over_ranks)
    return _search(ctx, loss_at, lr)


def _search(ctx: Context, loss_at, lr: float) -> tuple[float, float, int]:
    """The line search of :func:`critical_sharpness`, within the measurement's seconds; notes where it fails."""
    evals = 0

    def timed(eta: float) -> float:  # within the share proper, like the other optional quantities
        nonlocal evals
        if evals > 0 and ctx.extra_past():
            raise _OutOfTime
        evals += 1
        return loss_at(eta)

    try:
        found = line_search(timed, lr, max_evals=CRITICAL_MAX_EVALS, rtol=CRITICAL_RTOL)
    except _OutOfTime:
        ctx.note(
            "critical-time",
            f"curvwatch: step {ctx.step}: the critical sharpness's line search ran out of the "
            f"share's seconds after {evals} forward passes (it runs after the products, within the "
            "share saved up): not logged at such steps",
        )
        return math.nan, math.nan, evals
    except CurvatureError as error:
        ctx.note("critical-failed", f"curvwatch: step {ctx.step}: critical sharpness not measured: {error}")
        return math.nan, math.nan, 0
    if not found.bracketed:
        case = (
            f"no step up to eta={found.eta_c:.3g} raised the probe loss"
            if found.eta_c >= lr
            else f"every step down to eta={found.eta_c:.3g} raised the probe loss"
        )
        ctx.note(
            "critical-unbracketed",
            f"curvwatch: step {ctx.step}: the critical sharpness's line search along the update "
            f"(lr={lr:.4g}) found no bracket in {found.evals} forward passes ({case}); it is logged "
            "only when bracketed",
        )
        return math.nan, math.nan, found.evals
    return found.value, found.value * lr / 2, found.evals
