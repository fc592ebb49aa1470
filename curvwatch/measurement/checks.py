"""The checks that decide whether a product can be trusted: symmetry, differences, the certificate.

* :func:`symmetric`: double backward is trusted when ``u^T H v == v^T H u``; a
  second derivative with missing terms (a ``@once_differentiable`` backward) is
  not symmetric, and ``method="auto"`` then falls back to differences;
* :func:`check_differences`: central differences against the exact Rayleigh
  quotient at the top Ritz vector, once per run (kinks of ReLU-type activations);
* :func:`certified`: one-sided differences certified by a central Rayleigh
  quotient, re-solved with central differences from the one-sided vectors where
  the central residual does not confirm them, stepped down and extrapolated at a
  sharp state (:func:`~curvwatch.solvers.certificate.richardson`), and reported as
  not converged, or refused, where they still disagree.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from curvwatch._errors import CurvatureError, NoSecondDerivativeError
from curvwatch.measurement.context import Context
from curvwatch.names import Method
from curvwatch.operators._base import CurvatureOperator
from curvwatch.solvers.certificate import FD_AGREEMENT_RTOL, certify_top, descending, disagree, richardson
from curvwatch.solvers.lanczos import MAX_TRUSTED_GAP, LanczosResult, gap_steps

# Double backward is trusted when u^T H v and v^T H u agree to this (relative to
# |u| |Hv|): a Hessian is symmetric, while a second derivative with missing terms
# (a custom autograd.Function with a @once_differentiable backward) is not.
SYMMETRY_RTOL = 1e-2

# Central differences are trusted when their Rayleigh quotient at the top Ritz
# vector agrees with the exact one to this (kinks of ReLU-type activations break it).
DIFFERENCE_RTOL = 1e-2

# Where one-sided and central differences disagree (a sharp state), the central
# step is halved up to this many times (one central product each) for a
# Richardson extrapolation; the rounding error grows as 1/h, so not further.
RICHARDSON_HALVINGS = 3

# method="auto" measures with one-sided differences only where the memory plan
# says double backward does not fit; where those then disagree with central
# differences (Adam's P^-1/2 moves low-v coordinates by up to 1e4 times more:
# one-sided 6.9e8 vs central -3.4e6 at 355M), no reliable product fits.
UNRELIABLE_DIFFERENCES = (
    "one-sided and central differences disagree at this state, and double backward does not fit "
    "in the memory allowed, so no reliable product fits: the measurement is skipped rather than "
    "logged. Fix: more memory for the measurement (Budget(memory_ratio=...) or max_memory=...), "
    "a smaller probe batch, or fewer trainable parameters"
)

NOT_SYMMETRIC = (
    "double backward gives a non-symmetric Hessian here (u^T H v != v^T H u: "
    "a custom autograd.Function with a @once_differentiable backward drops "
    "second-order terms)"
)


def should_check(ctx: Context, method: str) -> bool:
    """Cross-check ``method`` once per run (not under FSDP, not for the output-space curvatures)."""
    return (
        not ctx.checked
        and ctx.probe.output_kind is None
        and ctx.source.method == method
        and (method != Method.DOUBLE_BACKWARD or ctx.options.method == Method.AUTO)
        and not ctx.sharded
    )


def check_symmetry(ctx: Context, operator: CurvatureOperator) -> None:
    """Under ``method="auto"``, double backward's symmetry once per run (two products), if the products allow.

    Raises:
        NoSecondDerivativeError: ``u^T H v != v^T H u`` beyond :data:`SYMMETRY_RTOL`.
    """
    if should_check(ctx, Method.DOUBLE_BACKWARD) and ctx.allowance.products >= ctx.options.top_k + 4:
        if not symmetric(ctx, operator):
            raise NoSecondDerivativeError(NOT_SYMMETRIC)


def symmetric(ctx: Context, operator: CurvatureOperator) -> bool:
    """``u^T H v == v^T H u`` to :data:`SYMMETRY_RTOL` (two products, once per run)."""
    ctx.checked = True
    generator = torch.Generator().manual_seed(ctx.seed + 5)
    u, v = operator.random_vector(generator), operator.random_vector(generator)
    hu, hv = operator.matvec(u), operator.matvec(v)
    scale = (operator.norm(u) * operator.norm(hv)).item() + (operator.norm(v) * operator.norm(hu)).item()
    gap = abs(operator.dot(u, hv).item() - operator.dot(v, hu).item())
    return gap <= SYMMETRY_RTOL * max(scale / 2, 1e-300)


def check_differences(ctx: Context, eig: LanczosResult | None) -> None:
    """Compare the central-difference top eigenvalue with the exact Rayleigh quotient once (one product).

    Central differences on a ReLU network see the kinks (+69% on one) that
    double backward does not; where they disagree, every result of this run
    is reported as not converged, with one note.
    """
    if eig is None or not should_check(ctx, Method.FINITE_DIFFERENCE) or ctx.left() < 1:
        return
    ctx.checked = True
    try:
        exact = ctx.source.exact()
        y = eig.eigenvectors[:, 0].contiguous()
        theta = (exact.dot(y, exact.matvec(y)) / exact.dot(y, y)).item()
    except NoSecondDerivativeError:
        return  # differences are the only way here
    finally:
        ctx.checks += 1
    if abs(theta - eig.lambda_max) > DIFFERENCE_RTOL * max(abs(theta), 1e-30):
        ctx.differences_disagree = True
        ctx.note(
            "differences-disagree",
            f"curvwatch: step {ctx.step}: central differences give lambda_max "
            f"{eig.lambda_max:.6g} where double backward gives {theta:.6g} on the same vector "
            "(kinks of ReLU-type activations, or a step outside its accurate range): results "
            "of this run are reported as not converged; method='auto' measures exactly",
        )


def certified(ctx: Context, eig: LanczosResult, certificate: CurvatureOperator | None) -> LanczosResult:
    """With one-sided differences: the top value re-measured by a central Rayleigh quotient.

    Where that does not confirm it, re-solved with central differences from the
    one-sided vectors (:func:`_polished`); where the two disagree, first stepped down
    and extrapolated (:func:`_extrapolated`).

    Raises:
        CurvatureError: the two disagree beyond the step-down's reach under a
            method the memory plan forced (:data:`UNRELIABLE_DIFFERENCES`).
    """
    if certificate is None:
        return eig
    checked = certify_top(certificate, eig, ctx.options.budget.tol)
    if not disagree(checked.lambda_max, eig.lambda_max):
        return checked if checked.converged else _polished(ctx, certificate, eig, checked)
    extrapolated = _extrapolated(ctx, certificate, eig, checked)
    if extrapolated is not None:
        return extrapolated
    polished = _polished(ctx, certificate, eig, checked, step_checked=True)
    if polished.converged:
        return polished
    # The finite-difference steps are outside their accurate range here
    # (kinks, strong third-order terms): say so rather than hide it.
    if ctx.allowance.method is not None:
        raise CurvatureError(UNRELIABLE_DIFFERENCES)
    ctx.note(
        "fd-disagree",
        f"curvwatch: step {ctx.step}: one-sided and central differences disagree "
        f"({eig.lambda_max:.6g} vs {checked.lambda_max:.6g}); such measurements "
        "are reported as not converged (method='auto' measures exactly)",
    )
    # the re-solve, where it ran, started from the vector checked measured: its top Ritz value
    # is the larger lower bound of the central operator's lambda_max (for the diagnostics)
    return replace(polished, converged=False)


def _polished(
    ctx: Context,
    certificate: CurvatureOperator,
    eig: LanczosResult,
    checked: LanczosResult,
    step_checked: bool = False,
) -> LanczosResult:
    """Where the central residual does not confirm the one-sided top pair: Lanczos on central differences.

    The one-sided solve can settle on a mixture of the top eigenvectors whose
    quotient agrees under both operators (Adam's preconditioned operator at
    trained language-model states: 1-15% off, bounds 3-39%); its Ritz vectors
    still span the top well. Central differences (O(h^2)) from them, with the
    products left, certify by their own residual rule, as a central solve
    would from the start. Returns ``checked`` (not converged) where fewer than
    :func:`~curvwatch.solvers.lanczos.gap_steps` products are left.

    ``step_checked``: where one-sided and central differences disagreed (the
    one-sided top vector was a mixture, or the state is sharp), the central
    value must also hold at half the step (one more product): within
    ``Budget.tol`` of it, the O(h^2) bias is within a third of that; else the
    result is not converged.
    """
    k = eig.eigenvalues.numel()
    if ctx.left() < gap_steps(k) + int(step_checked) or ctx.past():
        return checked
    polished = ctx.lanczos(certificate, k, ctx.left() - int(step_checked), eig.eigenvectors, ctx.seed + 7)
    if step_checked and polished.converged:
        polished = _holds_at_half_step(ctx, certificate, polished)
    ctx.note(
        "fd-polished",
        f"curvwatch: step {ctx.step}: the one-sided solve's top pair ({eig.lambda_max:.6g}) did not certify "
        f"under central differences; re-solved with central differences from its vectors: "
        f"{polished.lambda_max:.6g} ({'converged' if polished.converged else 'not converged'})",
    )
    return polished


def _holds_at_half_step(ctx: Context, certificate: CurvatureOperator, eig: LanczosResult) -> LanczosResult:
    """``eig``, not converged where the central quotient at half the step moves its top value beyond tol."""
    if not certificate.scales_step:
        return replace(eig, converged=False)
    half = _top_at_step(certificate, eig, 0.5)
    if abs(half.lambda_max - eig.lambda_max) > ctx.options.budget.tol * abs(eig.lambda_max):
        return replace(eig, converged=False)
    return eig


def _top_at_step(certificate: CurvatureOperator, eig: LanczosResult, scale: float) -> LanczosResult:
    """:func:`~curvwatch.solvers.certificate.certify_top` (value and residual) at ``scale`` times the step."""
    certificate.step_scale = scale
    try:
        return certify_top(certificate, eig, None)
    finally:
        certificate.step_scale = 1.0


def _extrapolated(
    ctx: Context, certificate: CurvatureOperator, eig: LanczosResult, coarse: LanczosResult
) -> LanczosResult | None:
    """At a sharp state: the central Rayleigh quotient again at smaller steps, extrapolated.

    The step is halved up to :data:`RICHARDSON_HALVINGS` times, one central
    product each, and each pair of neighbouring steps is extrapolated
    (:func:`~curvwatch.solvers.certificate.richardson`) until the smaller
    step's estimated error is within
    :data:`~curvwatch.solvers.certificate.FD_AGREEMENT_RTOL`. Returns that
    extrapolated result, or ``None`` (the caller reports the disagreement
    as not converged).
    """
    if not certificate.scales_step:
        return None
    steps = [coarse.lambda_max]
    for halving in range(1, RICHARDSON_HALVINGS + 1):
        fine = _top_at_step(certificate, eig, 0.5**halving)  # Richardson's error estimate bounds the value here
        steps.append(fine.lambda_max)
        value, error = richardson(steps[-2], steps[-1])
        if error <= FD_AGREEMENT_RTOL * abs(value):
            break
    else:
        return None
    # the value is a Rayleigh quotient: it certifies only with a vector that is nearly an
    # eigenvector of the accurate operator, r^2 / (g |value|) within the extrapolation's
    # accuracy at the widest gap the bounds trust (r <= 2.2% of the value; a mixture of
    # the top eigenvectors, whose quotient agrees at every step, has a larger residual)
    if float(fine.residuals[0]) ** 2 > FD_AGREEMENT_RTOL * MAX_TRUSTED_GAP * value**2:
        return None
    ctx.note(
        "fd-extrapolated",
        f"curvwatch: step {ctx.step}: a sharp state: central differences at 1, 1/2, ... of the usual "
        f"step give {', '.join(f'{v:.6g}' for v in steps)}; lambda_max is the Richardson extrapolation "
        f"of the last two, {value:.6g} (estimated error {error / abs(value):.1e})",
    )
    values = fine.eigenvalues.clone()
    values[0] = value
    bounds = None if fine.error_bounds is None else fine.error_bounds.clone()
    if bounds is not None:
        bounds[0] = max(float(bounds[0]), error)
    return descending(replace(fine, eigenvalues=values, error_bounds=bounds))
