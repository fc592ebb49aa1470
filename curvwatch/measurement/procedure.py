"""One measurement, as a pure procedure: ``(options, state, model, probe, step) -> (result, state)``.

:func:`measure` runs, inside the guard the monitor has entered, these steps
over one :class:`~curvwatch.measurement.context.Context`:

1. read the threshold (and Adam's preconditioner) from the optimizer;
2. build the operator (:mod:`curvwatch.measurement.source`), resolving
   ``method="auto"`` on first use and falling back to finite differences where
   double backward fails its check (:mod:`curvwatch.measurement.checks`); the
   update sharpness (one product along the optimizer's last update ``u``,
   :mod:`curvwatch.measurement.early_warnings`) comes first;
3. measure the threshold's quantity first: the preconditioned sharpness for
   Adam-type optimizers, on the coordinates where Adam's linearization holds
   (:mod:`curvwatch.optim.linearization`), else the top-``k`` eigenvalues
   (warm-started Lanczos, certified by a central difference under one-sided
   differences);
4. then, as the allowance permits: the raw top-``k`` (adaptive optimizers); the
   batch sharpness; within the share proper (:attr:`~curvwatch.planning.Allowance.extra_seconds`)
   the deflated Hutchinson trace, the SLQ spectrum, the unrestricted
   preconditioned sharpness (adaptive optimizers, a diagnostic), the critical
   sharpness by a line search and, with ``blocks=``, each block's lambda_max
   (:mod:`curvwatch.measurement.per_block`) with the products left;
5. return the frozen :class:`~curvwatch.CurvatureResult`, the new
   :class:`~curvwatch.measurement.context.MeasurementState` (warm starts,
   resolved method) and the notes to warn about once
   (:mod:`curvwatch.measurement.outcome`).

The monitor (:class:`~curvwatch.CurvatureMonitor`) owns the schedule, the
guard, the failure policy and the sinks; :mod:`curvwatch.planning` what a
measurement may spend.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch

from curvwatch._errors import CurvatureError, NoSecondDerivativeError
from curvwatch.measurement import checks, early_warnings
from curvwatch.measurement.batch_sharpness import batch_sharpness
from curvwatch.measurement.context import (
    RAW_SOLVE_PRODUCTS,
    Context,
    MeasurementState,
    Note,
    Probe,
    fitting,
    overlap,
    warm_start,
)
from curvwatch.measurement.outcome import Measured, outcome
from curvwatch.measurement.per_block import measure_blocks
from curvwatch.names import Method
from curvwatch.operators._base import CurvatureOperator
from curvwatch.operators.preconditioned import PreconditionedOperator
from curvwatch.optim import Threshold, preconditioner_diagonal, threshold
from curvwatch.optim.linearization import restrict_to_linear_, unbounded_step_note
from curvwatch.planning import Allowance
from curvwatch.precision import matmul_precision, resolve_precision
from curvwatch.results import CurvatureResult
from curvwatch.solvers.density import slq
from curvwatch.solvers.lanczos import LanczosResult, gap_steps
from curvwatch.solvers.trace import hutchinson


def measure(
    options: Any,
    state: MeasurementState,
    model: torch.nn.Module,
    probe: Probe,
    step: int,
    optimizer: Any,
    allowance: Allowance,
) -> tuple[CurvatureResult, MeasurementState, list[Note]]:
    """Measure once; return the result, the new state and the notes to warn about.

    Args:
        options: the monitor's :class:`~curvwatch.options.MonitorOptions`.
        state: what the last measurement handed over (left as it is).
        model: the model, inside the monitor's guard.
        probe: the probe batch and its loss.
        step: the optimizer step it belongs to (seeds ``options.seed + step``).
        optimizer: where the threshold, the preconditioner and the update come from, or ``None``.
        allowance: what it may spend (:class:`~curvwatch.planning.Allowance`).

    Raises:
        CurvatureError: bad input found while measuring (the message names the fix).
    """
    ctx = Context.start(options, state, model, probe, step, optimizer, allowance)
    got = Measured(limit=read_threshold(ctx))
    got.diagonal = read_preconditioner(ctx, got.limit)
    operator = ctx.source.operator()
    got.precision = resolve_precision(options.precision, ctx.source.method, operator.device, operator.dtype)
    with matmul_precision(got.precision):
        eigen_solves(ctx, got, threshold_quantity(ctx, got, operator))  # no name keeps the first solve
        checks.check_differences(ctx, got.eig)
        got.trace = trace(ctx, got.eig)
        got.spectrum = spectrum(ctx)
        got.batch = batch_sharpness_of(ctx)
        got.full_pre = full_preconditioned(ctx, got)
        got.hvps = ctx.spent() + got.batch[2]
        got.loss = probe_loss(ctx)
        ctx.operator.release()
        # forward passes only, once the products' graph is gone (the line search
        # moves the parameters in place and restores them bit-exactly)
        started = time.perf_counter()
        got.critical = early_warnings.critical_sharpness(ctx, got.limit, ctx.operator)
        got.critical_seconds = time.perf_counter() - started
        left = max(ctx.extra_left() - got.batch[2], 0)
        got.blocks, got.block_warm, block_products = measure_blocks(ctx, got.limit, left)
        got.hvps += block_products
    return outcome(ctx, got)


def read_threshold(ctx: Context) -> Threshold | None:
    """The optimizer's edge-of-stability threshold (``None`` without an optimizer, with a note)."""
    if ctx.optimizer is None:
        ctx.note("no-optimizer", "curvwatch: no optimizer given: sharpness is logged without a threshold")
        return None
    limit = threshold(ctx.optimizer, ctx.options.param_group)
    if limit.note:  # no rule for this optimizer, or no lr: NaN threshold, said once
        ctx.note(f"threshold-note {limit.rule}", f"curvwatch: {limit.note}")
    unbounded = unbounded_step_note(ctx.optimizer, ctx.options.param_group)
    if unbounded:
        ctx.note("unbounded-step", f"curvwatch: {unbounded}")
    return limit


def read_preconditioner(ctx: Context, limit: Threshold | None) -> torch.Tensor | None:
    """Adam's diagonal ``P`` for an adaptive threshold (``None`` before its first step, with a note)."""
    if limit is None or not limit.adaptive:
        return None
    diagonal = preconditioner_diagonal(ctx.optimizer, ctx.source.params)
    if diagonal is None:
        ctx.note(
            "no-state",
            "curvwatch: the optimizer has no second-moment state for the measured "
            "parameters yet (before its first step?): preconditioned sharpness and the sharpness "
            "ratio skipped (the raw lambda_max is logged; the threshold is in preconditioned units)",
        )
    return diagonal


def threshold_quantity(ctx: Context, got: Measured, operator: CurvatureOperator) -> LanczosResult:
    """The update sharpness, then the threshold's quantity (uncertified); the certificate is built after.

    Under ``method="auto"`` a double backward that fails its check
    (:class:`~curvwatch.NoSecondDerivativeError`) is given up: its products
    count as checks, and central differences measure from now on.
    """
    ctx.operator = operator
    try:
        checks.check_symmetry(ctx, operator)
        reserve = 1 if checks.should_check(ctx, Method.FINITE_DIFFERENCE) else 0  # for the check of differences
        got.update = early_warnings.update_sharpness(ctx, operator, got.limit, got.diagonal, ctx.left() - reserve)
        restrict_to_linear(ctx, got, operator)
        first = first_solve(ctx, got.diagonal, ctx.left() - reserve)
    except CurvatureError as error:
        if ctx.probe.output_kind is not None or ctx.options.method != Method.AUTO or not isinstance(
            error, NoSecondDerivativeError
        ):
            raise
        ctx.source.fall_back()
        ctx.note("auto-fd", f"curvwatch: {error}. Using finite differences from now on.")
        ctx.checks += operator.matvecs  # spent on the operator given up
        ctx.operator = operator = ctx.source.operator()
        got.precision = resolve_precision(
            ctx.options.precision, Method.FINITE_DIFFERENCE, operator.device, operator.dtype
        )
        if got.excluded is None:  # P is still whole
            got.update = early_warnings.update_sharpness(ctx, operator, got.limit, got.diagonal, ctx.left())
        restrict_to_linear(ctx, got, operator)
        first = first_solve(ctx, got.diagonal, ctx.left())
    ctx.certificate = ctx.source.certificate()
    return first


def restrict_to_linear(ctx: Context, got: Measured, operator: CurvatureOperator) -> None:
    """Remove from Adam's ``P`` the coordinates where its frozen linearization fails (once, in place).

    The set is read from the probe gradient (:mod:`curvwatch.optim.linearization`);
    ``got.excluded`` is the fraction of coordinates removed. The update
    sharpness, measured before, used the whole ``P``: the update moves every coordinate.
    """
    if got.diagonal is None or got.excluded is not None:
        return
    gradient = early_warnings.probe_gradient(ctx, operator, keep=False)
    removed = restrict_to_linear_(got.diagonal, ctx.optimizer, ctx.source.params, gradient)
    got.excluded = removed / max(got.diagonal.numel(), 1)


def first_solve(ctx: Context, diagonal: torch.Tensor | None, products: int) -> LanczosResult:
    """The threshold's quantity: preconditioned sharpness (adaptive) or the top-k eigenvalues."""
    operator, state = ctx.operator, ctx.state
    if diagonal is not None:
        warm = fitting(state.warm_preconditioned, operator)
        return ctx.lanczos(PreconditionedOperator(operator, diagonal), 1, products, warm, ctx.seed + 1)
    return ctx.lanczos(operator, ctx.options.top_k, products, fitting(state.warm, operator), ctx.seed)


def eigen_solves(ctx: Context, got: Measured, first: LanczosResult) -> None:
    """Certify the first solve; for adaptive optimizers also the raw top-``k`` with the products left."""
    operator, certificate, top_k = ctx.operator, ctx.certificate, ctx.options.top_k
    # the last measurement's Ritz vectors, where they still fit the operator
    got.warm, got.warm_pre = fitting(ctx.state.warm, operator), fitting(ctx.state.warm_preconditioned, operator)
    if got.diagonal is not None:
        pre_certificate = PreconditionedOperator(certificate, got.diagonal) if certificate else None
        pre = checks.certified(ctx, first, pre_certificate)
        got.warm_pre = warm_start(pre)
        got.pre = replace(pre, eigenvectors=got.warm_pre[:, :1], guard=None)
        # the device copy is not read again: dropping both names (first holds the same
        # vector) frees it, one vector less during the solve below
        del first, pre
        # the raw top-k, within the share proper (the fixed allowance buys the threshold's
        # quantity only), where its products can certify it (else it is noise off the curves)
        if ctx.extra_left() >= RAW_SOLVE_PRODUCTS * gap_steps(top_k) and not ctx.extra_past():
            eig = ctx.lanczos(operator, top_k, ctx.extra_left(), got.warm, ctx.seed)
            got.eig = checks.certified(ctx, eig, certificate)
    else:
        got.eig = checks.certified(ctx, first, certificate)
    if got.eig is not None:
        got.overlap = overlap(got.warm, got.eig.eigenvectors, operator.dot)
        got.warm = warm_start(got.eig)
        if got.warm.device == got.eig.eigenvectors.device:  # on the CPU: one copy, not two
            got.eig = replace(got.eig, eigenvectors=got.warm[:, : got.eig.eigenvectors.shape[1]], guard=None)


def full_preconditioned(ctx: Context, got: Measured) -> LanczosResult | None:
    """The unrestricted ``lambda_max(P^-1/2 H P^-1/2)``, a diagnostic, with the products left (cold).

    Only where the linear set left coordinates out (else it is the threshold
    solve's value) and where its products can certify it. The restricted
    ``P`` is dropped first: one diagonal on the device at a time.
    """
    left = ctx.extra_left()
    if not got.excluded or left < gap_steps(1) or ctx.extra_past():
        return None
    got.diagonal = None
    got.diagonal = whole = preconditioner_diagonal(ctx.optimizer, ctx.source.params)
    solve = ctx.lanczos(PreconditionedOperator(ctx.operator, whole), 1, left, None, ctx.seed + 5)
    certificate = PreconditionedOperator(ctx.certificate, whole) if ctx.certificate else None
    return replace(checks.certified(ctx, solve, certificate), eigenvectors=solve.eigenvectors[:, :0], guard=None)


def trace(ctx: Context, deflation: LanczosResult | None) -> tuple[float, float]:
    """Hutchinson's trace and its standard error, deflated by the Ritz vectors (NaN: not measured)."""
    left, probes = ctx.extra_left(), ctx.options.budget.trace_hvps
    if not ctx.options.trace or probes <= 0 or left < min(2, probes) or ctx.extra_past():
        return math.nan, math.nan
    estimate = hutchinson(ctx.operator, min(probes, left), seed=ctx.seed + 2, deflation=deflation)
    return estimate.estimate, estimate.stderr


def spectrum(ctx: Context) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The SLQ density ``(nodes, weights)`` at every ``spectrum_every``-th measurement, as products allow."""
    every, operator = ctx.options.spectrum_every, ctx.operator
    if not every or ctx.state.measurements % every != 0:
        return None
    steps = min(30, operator.size, ctx.extra_left() // 2)  # two probes
    if steps < min(5, operator.size) or ctx.extra_past():
        return None
    density = slq(operator, num_probes=2, num_steps=steps, seed=ctx.seed + 3)
    weights = density.weights / density.weights.shape[0]
    return tuple(density.nodes.flatten().tolist()), tuple(weights.flatten().tolist())


def batch_sharpness_of(ctx: Context) -> tuple[float, float, int]:
    """``(batch sharpness, its standard error, products)`` with ``batch_size`` (NaN, NaN, 0 without)."""
    options, probe = ctx.options, ctx.probe
    if options.batch_size is None:
        return math.nan, math.nan, 0
    return batch_sharpness(
        ctx.model, probe.loss_fn, probe.batch, ctx.source.params, options.batch_size,
        method=ctx.source.method, max_batches=options.batch_sharpness_batches, seed=ctx.seed + 4,
        reduce=options.reduce, source=probe.minibatch, sharded=ctx.sharded,
    )


def probe_loss(ctx: Context) -> float:
    """The probe loss at theta, averaged over ranks (a forward of its own where no product formed it)."""
    operator = ctx.operator
    loss = operator.loss  # None for the output-space operators, and for central differences at theta
    if loss is None:
        if ctx.sharded:  # FSDP1 must not run a forward without backward
            operator.gradient_at_theta()
            loss = operator.loss
        else:
            with torch.no_grad():
                loss = float(ctx.probe.loss_fn(ctx.model, ctx.probe.batch))
    return operator.mean_over_ranks(loss)

