"""Certify a cheaply computed top eigenvalue with one accurate product."""

from __future__ import annotations

from dataclasses import replace

import torch

from curvwatch.operators._base import CurvatureOperator
from curvwatch.solvers.lanczos import LanczosResult

# One-sided and central estimates of lambda_max further apart than this (relative)
# mean the finite-difference steps are outside their accurate range at this point.
FD_AGREEMENT_RTOL = 1e-2


def certify_top(operator: CurvatureOperator, eig: LanczosResult, tol: float | None) -> LanczosResult:
    r"""Replace the top Ritz value by the Rayleigh quotient ``y^T A y`` under ``operator``.

    Lanczos driven by cheap, slightly biased products (one-sided differences,
    O(h) error) gives a Ritz vector ``y`` whose error is first order in the
    bias; the Rayleigh quotient of a more accurate operator (central
    differences, O(h^2)) at ``y`` is off by only the *square* of that error
    (Parlett 1998, Thm. 11.7.1). One product. The residual becomes
    ``||A y - theta y||`` under the accurate operator, and so do the top
    pair's error bound (:func:`~curvwatch.solvers.lanczos.eigenvalue_error_bounds`)
    and ``converged`` (that bound within ``tol |theta|``): a Rayleigh quotient
    alone certifies nothing. A one-sided solve can settle on a mixture of the
    top eigenvectors whose quotient agrees under both operators (GPT-2 with the
    full vocabulary, Adam's preconditioned operator at step 100: 4,489 from
    one-sided and central differences alike, between the eigenvalues 5,256
    and 4,299); its central residual says so. ``tol=None``: the value and
    residual only, for a caller that bounds the error its own way (the
    Richardson step-down at sharp states).

    Where the accurate value falls below another Ritz value, the pairs are
    re-sorted (``eigenvalues`` stay descending, ``lambda_max`` their largest) and
    the result is not converged: the cheap solve's top pair was not the top.
    """
    y = eig.eigenvectors[:, 0]
    ay = operator.matvec(y.contiguous())
    theta = operator.dot(y, ay) / operator.dot(y, y)
    residual = operator.norm(ay.sub_(y, alpha=theta.item()))  # in place: one vector fewer
    values = eig.eigenvalues.clone()
    residuals = eig.residuals.clone()
    values[0], residuals[0] = theta.item(), residual.item()
    bounds, converged = eig.error_bounds, eig.converged
    if bounds is not None and tol is not None:
        bounds = bounds.clone()
        bounds[0] = _bound_at_the_same_gap(residual.item(), float(eig.residuals[0]), float(eig.error_bounds[0]))
        converged = converged and float(bounds[0]) <= tol * abs(values[0].item())
    return descending(replace(eig, eigenvalues=values, residuals=residuals, error_bounds=bounds, converged=converged))


def _bound_at_the_same_gap(residual: float, cheap_residual: float, cheap_bound: float) -> float:
    """``min(r, r^2 / gap)`` with the gap the cheap solve's bound used (``r^2 / bound`` where quadratic).

    Only the top pair is re-measured, so the spectral gap is the one the cheap
    solve read from all its Ritz values (:func:`~curvwatch.solvers.lanczos.eigenvalue_error_bounds`,
    capped at 5% of the value); where its bound was the plain residual, so is this one.
    """
    if not 0 < cheap_bound < cheap_residual:
        return residual
    gap = cheap_residual**2 / cheap_bound
    return min(residual, residual**2 / gap)


def descending(eig: LanczosResult) -> LanczosResult:
    """``eig`` with its pairs in descending order; not converged if they were not."""
    order = torch.argsort(eig.eigenvalues, descending=True, stable=True)
    if torch.equal(order, torch.arange(len(order))):
        return eig
    bounds = None if eig.error_bounds is None else eig.error_bounds[order]
    return replace(
        eig, eigenvalues=eig.eigenvalues[order], eigenvectors=eig.eigenvectors[:, order],
        residuals=eig.residuals[order], error_bounds=bounds, converged=False,
    )


def disagree(central: float, one_sided: float) -> bool:
    """True when two estimates of lambda_max differ by more than :data:`FD_AGREEMENT_RTOL`."""
    return abs(central - one_sided) > FD_AGREEMENT_RTOL * max(abs(central), 1e-30)


def richardson(coarse: float, fine: float) -> tuple[float, float]:
    r"""Richardson extrapolation of central differences at steps ``h`` and ``h/2``.

    A central difference is ``lambda + a h^2 + O(h^4)``, so

    .. math::

        \lambda \approx \frac{4\,C(h/2) - C(h)}{3}, \qquad
        \text{error of } C(h/2) \approx \frac{C(h) - C(h/2)}{3} ,

    returns the extrapolated value and that error estimate (an upper bound on
    the extrapolated value's error while the expansion holds). At a sharp state,
    where the step is large against the scale on which the curvature changes,
    this is the step that follows the curvature: half of it, and the known
    order of its error.
    """
    extrapolated = (4.0 * fine - coarse) / 3.0
    return extrapolated, abs(extrapolated - fine)
