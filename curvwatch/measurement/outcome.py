"""What a measurement hands back: the frozen result, the next state, and the notes.

The steps of :mod:`curvwatch.measurement.procedure` fill one :class:`Measured`;
:func:`outcome` turns it into a :class:`~curvwatch.CurvatureResult` of plain
floats (the ratios only where the sharpness is known to
:data:`~curvwatch.measurement.context.RATIO_MAX_ERROR`; eigenvalues not
certified to ``Budget.tol`` named in ``uncertified``) and the
:class:`~curvwatch.measurement.context.MeasurementState` of the next measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from curvwatch.measurement.context import RATIO_MAX_ERROR, Context, MeasurementState, Note, adaptive, certified_to
from curvwatch.optim import Threshold
from curvwatch.results import BlockResult, CurvatureResult
from curvwatch.solvers.lanczos import LanczosResult

NAN = math.nan


@dataclass
class Measured:
    """What the steps of one measurement found (filled in as they run; NaN or ``None``: not measured)."""

    limit: Threshold | None = None
    diagonal: torch.Tensor | None = None
    precision: str = "fp32"
    update: float = NAN
    pre: LanczosResult | None = None
    full_pre: LanczosResult | None = None
    excluded: float | None = None
    eig: LanczosResult | None = None
    warm: torch.Tensor | None = None
    warm_pre: torch.Tensor | None = None
    overlap: float = NAN
    trace: tuple[float, float] = (NAN, NAN)
    spectrum: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    batch: tuple[float, float, int] = (NAN, NAN, 0)
    hvps: int = 0
    loss: float | None = None
    critical: tuple[float, float, int] = (NAN, NAN, 0)
    critical_seconds: float = 0.0
    blocks: dict[str, BlockResult] = field(default_factory=dict)
    block_warm: dict | None = None

    @property
    def threshold_solve(self) -> LanczosResult:
        """The solve the threshold compares against: the preconditioned one for Adam-type, else the raw one."""
        return self.pre if self.pre is not None else self.eig


def outcome(ctx: Context, got: Measured) -> tuple[CurvatureResult, MeasurementState, list[Note]]:
    """The result, the state handed to the next measurement, and the notes."""
    return _result(ctx, got), _next_state(ctx, got), ctx.notes


def _result(ctx: Context, got: Measured) -> CurvatureResult:
    limit, eig, pre = got.limit, got.eig, got.pre
    value = limit.value if limit else NAN
    critical, critical_ratio, critical_evals = got.critical
    sharp = _sharpness(ctx, got)  # its note first, then the uncertified one
    return CurvatureResult(
        step=ctx.step,
        lambda_max=eig.lambda_max if eig is not None else NAN,
        eigenvalues=tuple(eig.eigenvalues.tolist()) if eig is not None else (),
        residuals=tuple(eig.residuals.tolist()) if eig is not None else (),
        trace=got.trace[0],
        trace_stderr=got.trace[1],
        threshold=value,
        sharpness_ratio=sharp / value if limit else NAN,
        preconditioned_lambda_max=pre.lambda_max if pre is not None else NAN,
        full_preconditioned_lambda_max=_full_preconditioned(got),
        excluded_fraction=NAN if got.excluded is None else got.excluded,
        hvps=got.hvps,
        seconds=ctx.clock.elapsed(),
        converged=_converged(ctx, got),
        lr=limit.lr if limit else NAN,
        loss=NAN if got.loss is None else float(got.loss),
        method=ctx.source.name(),
        top_overlap=got.overlap,
        batch_sharpness=got.batch[0],
        batch_sharpness_stderr=got.batch[1],
        spectrum=got.spectrum,
        error_bound=got.threshold_solve.relative_error_bound,
        precision=str(got.precision),
        update_sharpness=got.update,
        update_sharpness_ratio=got.update / value if limit else NAN,
        critical_sharpness=critical,
        critical_sharpness_ratio=critical_ratio,
        critical_sharpness_evals=critical_evals,
        critical_sharpness_seconds=got.critical_seconds,
        blocks=got.blocks,
        uncertified=_uncertified(ctx, eig, pre),
    )


def _full_preconditioned(got: Measured) -> float:
    """The unrestricted preconditioned sharpness where certified (the restricted one where nothing was left out)."""
    if got.excluded == 0 and got.pre is not None and got.pre.converged:
        return got.pre.lambda_max
    full = got.full_pre
    return full.lambda_max if full is not None and full.converged else NAN


def _converged(ctx: Context, got: Measured) -> bool:
    """Every solve met its tolerance, and the differences were not found unreliable."""
    eig = got.eig
    return got.threshold_solve.converged and (eig is None or eig.converged) and not ctx.differences_disagree


def _sharpness(ctx: Context, got: Measured) -> float:
    """The sharpness the threshold is compared with (NaN: no ratio), with a note where it is a lower bound."""
    options, limit, solve = ctx.options, got.limit, got.threshold_solve
    batch = got.diagonal is None and options.batch_size is not None and not adaptive(limit)
    if got.diagonal is not None:
        sharp = got.pre.lambda_max if got.pre is not None else NAN
    else:
        sharp = got.batch[0] if batch else (got.eig.lambda_max if got.eig is not None else NAN)
    if adaptive(limit) and got.diagonal is None:
        # an adaptive threshold (38/lr for Adam) is in preconditioned units: the raw
        # lambda_max over it is no ratio at all (the "no-state" note says why)
        sharp = NAN
    if not batch and not certified_to(solve, RATIO_MAX_ERROR):
        # a Ritz value that has not converged is only a lower bound of the
        # sharpness: no ratio (and no crossing) from it; error_bound says why
        ctx.note(
            "unconverged",
            f"curvwatch: step {ctx.step}: the threshold's eigenvalue is not certified to "
            f"Budget.tol (error bound {solve.relative_error_bound:.2g}) after "
            f"{got.hvps} products: it is a lower bound, logged without a sharpness ratio. Raise "
            "Budget.max_hvps / max_seconds / overhead",
        )
        sharp = NAN
    return sharp


def _uncertified(ctx: Context, eig: LanczosResult | None, pre: LanczosResult | None) -> tuple[str, ...]:
    """The eigenvalue fields not certified to ``Budget.tol``; one note says where they go."""
    unreliable = ctx.differences_disagree
    fields = []
    if eig is not None and (unreliable or not eig.converged):
        fields += ["lambda_max", "eigenvalues"]
    if pre is not None and (unreliable or not pre.converged):
        fields.append("preconditioned_lambda_max")
    if fields:
        ctx.note(
            "uncertified",
            f"curvwatch: step {ctx.step}: {', '.join(fields)} not certified to Budget.tol "
            f"({ctx.options.budget.tol:g}): logged under curvature_diagnostics/ (with "
            "curvature_diagnostics/error_bound), not on the curvature/ curves; this happens when the "
            "products or seconds run out (raise Budget.max_hvps / overhead) or differences are unreliable",
        )
    return tuple(fields)


def _next_state(ctx: Context, got: Measured) -> MeasurementState:
    source = ctx.source
    return MeasurementState(
        measurements=ctx.state.measurements + 1,
        warm=got.warm,
        warm_preconditioned=got.warm_pre,
        resolved_method=None if source.resolved is None else str(source.resolved),
        ggn_checked=source.output_checked,
        checked=ctx.checked,
        differences_disagree=ctx.differences_disagree,
        block_warm=got.block_warm,
    )
