"""Budgeted Lanczos for the largest algebraic eigenvalues of a symmetric operator.

:func:`lanczos` runs thick-restarted Lanczos (Krylov-Schur) with full
reorthogonalization against a basis of at most ``max_basis`` vectors, so its
memory does not grow with the number of products, and stops at the first of

* every wanted eigenvalue is within ``tol * |theta_i|`` by the error bound
  :func:`eigenvalue_error_bounds`, and its residual is at most
  ``sqrt(tol) * |theta_i|`` (converged). The gap in that bound is read from
  the Ritz values only once the Krylov space has :func:`gap_steps` vectors;
  before that only the plain residual bound ``r_i <= tol |theta_i|`` certifies;
* ``max_matvecs`` products (never exceeded) or ``max_seconds`` elapsed;
* the Krylov space fills all ``n`` dimensions.

What ``converged`` guarantees: each reported ``theta_i`` is
within its ``error_bounds[i]`` of an eigenvalue of ``A`` (the residual bound
holds for any symmetric ``A``; the gap bound holds when no eigenvalue the
Krylov space has not resolved lies closer to ``theta_i`` than the Ritz gap).
That the eigenvalue is the ``i``-th largest is probabilistic: an eigenvector
enters the space through the start vector's component along it (a random
normal start, or a warm start's 1% random part), amplified by Chebyshev growth
in the gap. No affordable a-priori bound exists at network sizes (the
Kuczynski-Wozniakowski bound for a random start, P(miss by eps) <=
1.648 sqrt(n) exp(-sqrt(eps) (2m - 1)), needs m ~ 120 products for a 1%
chance at eps = 2e-3 and n = 1e5); ``benchmarks/truth.py`` measures how often a
certified value misses against an exact reference at trained states.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from curvwatch._errors import CurvatureError
from curvwatch.operators._base import CurvatureOperator
from curvwatch.solvers._krylov import LanczosProcess

# Relative size of the random perturbation added to a warm start, so that a
# start that is (numerically) an exact eigenvector still spans new directions.
WARM_START_NOISE = 1e-1

MIN_GAP_STEPS = 4

# A warm start carries the next GUARD_VECTORS Ritz vectors below the top k, each
# at GUARD_WEIGHT of a top vector's weight: where training swaps the order of the
# top eigenvalues between two measurements, the new top is in the Krylov space
# from the first products instead of only in the 1% noise (a tiny GPT-2's
# preconditioned top was certified 5.9% low, at the old second eigenvalue).
GUARD_VECTORS = 2
GUARD_WEIGHT = 0.03

# The widest gap, relative to |theta|, that eigenvalue_error_bounds takes from the
# Ritz values (which bound the eigenvalues from inside, so an unseen neighbour
# makes their gap too wide): a certified value then has r <= sqrt(tol * 0.05) |theta|.
MAX_TRUSTED_GAP = 0.05


@dataclass(frozen=True)
class LanczosResult:
    """Top-``k`` eigenpairs from :func:`lanczos`.

    Attributes:
        eigenvalues: ``(k,)`` float64 CPU tensor, descending (largest algebraic first).
        eigenvectors: ``(n, k)`` orthonormal Ritz vectors on the operator's device.
        residuals: ``(k,)`` float64, ``||A y - theta y||`` of each pair (same units
            as the eigenvalues).
        matvecs: products of ``A`` spent.
        converged: every eigenvalue's error bound is at most ``tol * |theta|``.
        error_bounds: ``(k,)`` float64, the a-posteriori bound on ``|theta - lambda|``
            of each pair, :func:`eigenvalue_error_bounds` (same units).
        guard: ``(n,)`` on the host: the next :data:`GUARD_VECTORS` Ritz vectors
            below the top ``k``, summed and scaled by :data:`GUARD_WEIGHT`
            (``None`` where the basis held no more). A warm start that carries it
            as a column beside the Ritz vectors sees an eigenvalue that overtakes
            the top between two measurements.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    matvecs: int
    converged: bool
    error_bounds: torch.Tensor | None = None
    guard: torch.Tensor | None = None

    @property
    def lambda_max(self) -> float:
        """The largest algebraic eigenvalue (sharpness) as a float."""
        return float(self.eigenvalues[0])

    @property
    def relative_error_bound(self) -> float:
        """The top eigenvalue's error bound over ``|lambda_max|`` (inf when unknown)."""
        if self.error_bounds is None:
            return math.inf
        return float(self.error_bounds[0]) / max(abs(self.lambda_max), 1e-300)


def eigenvalue_error_bounds(theta: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
    r"""A-posteriori bounds on the eigenvalue error of each Ritz pair.

    .. math::

        |\theta_i - \lambda_i| \le \min\left(r_i,\; r_i^2 / \delta_i\right),
        \qquad \delta_i = \min\left(\min_{j \ne i} |\theta_i - \theta_j| - r_j,\;
        g\,|\theta_i|\right) ,

    with ``r_i = ||A y_i - theta_i y_i||``. The first term holds for any
    symmetric ``A`` (some eigenvalue lies within ``r_i``); the second is the
    gap theorem (Kato-Temple; Parlett 1998, Thm. 11.7.1), with the unknown
    spectral gap estimated from the Ritz values, each widened by its own
    residual (a neighbour that is itself uncertain shrinks the gap, and no
    positive gap means the plain residual bound), and never taken wider than
    ``g = MAX_TRUSTED_GAP`` (5%) of ``|theta_i|``: Ritz values only bound the
    eigenvalues from inside, so a gap read from them is too wide exactly where
    an eigenvalue has not been seen (GPT-2 124M at step 750: a second Ritz value
    17.77 certified between eigenvalues 18.54 and 17.58). With the cap, a
    certified value has ``r_i <= sqrt(tol g) |theta_i|``, so it is within 0.7%
    of an eigenvalue whatever the gap, and within ``tol`` of it where the true
    gap is at least 5%. The bound is
    quadratic in the residual, so a warm-started top eigenvalue reaches 1e-3
    long before its raw residual does.

    Args:
        theta: all Ritz values (any order), float64.
        residuals: their residual norms, same order.
    """
    if theta.numel() < 2:
        return residuals.clone()
    distance = (theta[:, None] - theta[None, :]).abs() - residuals[None, :]
    distance.fill_diagonal_(math.inf)
    gap = torch.minimum(distance.min(dim=1).values, MAX_TRUSTED_GAP * theta.abs())
    quadratic = torch.where(gap > 0, residuals.square() / gap.clamp_min(1e-300), math.inf)
    return torch.minimum(residuals, quadratic)


def gap_steps(k: int) -> int:
    """Products before :func:`lanczos` reads the gap from the Ritz values: ``max(MIN_GAP_STEPS, 2 k + 2)``.

    A warm start from converged vectors certifies in about this many products.
    """
    return max(MIN_GAP_STEPS, 2 * k + 2)


def default_max_basis(k: int) -> int:
    """Basis vectors kept by :func:`lanczos` by default: ``max(10, 2 k + 2)``."""
    return max(10, 2 * k + 2)


def lanczos(
    operator: CurvatureOperator,
    k: int = 1,
    tol: float = 1e-3,
    max_matvecs: int = 60,
    max_seconds: float | None = None,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    basis_device: torch.device | str | None = None,
    max_basis: int | None = None,
) -> LanczosResult:
    r"""The ``k`` largest algebraic eigenvalues of a symmetric operator.

    Solves ``A y_i = theta_i y_i`` for ``theta_1 >= ... >= theta_k``, the top of
    the spectrum in the *algebraic* order (``which='LA'`` in scipy's ``eigsh``):
    sharpness is the largest eigenvalue even when a negative one is larger in
    magnitude. How it iterates, when it stops and what ``converged`` guarantees
    are in the module's documentation.

    Args:
        operator: any :class:`~curvwatch.operators.CurvatureOperator`.
        k: number of eigenpairs. Default 1.
        tol: relative eigenvalue error bound at which to stop. Default ``1e-3``.
        max_matvecs: budget of products. Default 60.
        max_seconds: wall-clock budget, checked after each product. Default none.
        v0: warm start: a vector ``(n,)`` or previous eigenvectors ``(n, j)``
            (summed), plus 1% random noise. Default: a random normal vector.
        seed: seeds the start vector and the noise (CPU generator: the same on
            every device and every rank).
        basis_device: where the Krylov basis lives (``"cpu"`` for large models).
        max_basis: most basis vectors kept; the solve holds ``max_basis + k + 2``
            vectors of length ``n`` at most. Default :func:`default_max_basis`.

    Returns:
        :class:`LanczosResult`, partial (``converged=False``) when the budget ran
        out: its eigenvalues are then lower bounds (Ritz values of a symmetric
        matrix never exceed its eigenvalues).

    Raises:
        CurvatureError: ``k < 1``, ``max_matvecs < k``, ``max_basis <= k`` or ``v0``
            of the wrong size.

    References:
        Lanczos (1950); Parlett, *The Symmetric Eigenvalue Problem* (1998);
        Stewart, "A Krylov-Schur algorithm for large eigenproblems" (2001).

    Example:
        >>> import torch
        >>> from curvwatch.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=torch.float64)))
        >>> lanczos(op, k=1).eigenvalues   # 3, not -5: largest algebraic
        tensor([3.], dtype=torch.float64)
    """
    max_basis = _checked_basis(k, max_matvecs, max_basis)
    k = min(k, operator.size)
    generator = torch.Generator().manual_seed(seed)
    # the start vector is not held beside the process's normalized copy of it
    process = LanczosProcess(operator, start_vector(operator, v0, generator), generator, max_basis, basis_device)
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    budget = min(max_matvecs, operator.size)
    keep = max(k + 1, max_basis // 2)
    while True:
        if process.full:
            process.restart(keep)
        process.step()
        theta, s, residuals, bounds, top, converged = _ritz_check(process, operator.size, k, tol)
        out_of_time = deadline is not None and operator.any_rank(time.perf_counter() >= deadline)
        if converged or process.steps >= budget or out_of_time:
            break
    process.discard_next()  # not needed for the Ritz vectors: one vector less beside the basis
    guard = _guard(process, len(theta), len(top), s)  # on the host, before the Ritz vectors on the device
    return LanczosResult(  # indexing by the list top copies: nothing here shares the check's tensors
        eigenvalues=theta[top],
        eigenvectors=process.combine(s[:, top]),
        residuals=residuals[top],
        matvecs=process.steps,
        converged=converged,
        error_bounds=bounds[top],
        guard=guard,
    )


def _guard(process: LanczosProcess, ritz: int, top: int, s: torch.Tensor) -> torch.Tensor | None:
    """:attr:`LanczosResult.guard`: the next :data:`GUARD_VECTORS` of ``ritz`` pairs below the ``top``, scaled.

    On the host, a block at a time: no device vector beyond the Ritz vectors.
    """
    below = list(range(ritz - 1 - top, max(ritz - 1 - top - GUARD_VECTORS, -1), -1))
    return process.combine_on_host(GUARD_WEIGHT * s[:, below].sum(dim=1)) if below else None


def _checked_basis(k: int, max_matvecs: int, max_basis: int | None) -> int:
    """The basis :func:`lanczos` keeps (:func:`default_max_basis` for ``None``), its arguments checked.

    Raises:
        CurvatureError: ``k < 1``, ``max_matvecs < k`` or ``max_basis <= k``.
    """
    if k < 1:
        raise CurvatureError(f"k must be >= 1, got {k}")
    if max_matvecs < k:
        raise CurvatureError(f"max_matvecs ({max_matvecs}) must be at least k ({k})")
    max_basis = default_max_basis(k) if max_basis is None else int(max_basis)
    if max_basis <= k:
        raise CurvatureError(f"max_basis ({max_basis}) must exceed k ({k})")
    return max_basis


def _ritz_check(process: LanczosProcess, size: int, k: int, tol: float):
    """``(theta, s, residuals, bounds, top, converged)`` after the process's last step.

    The Ritz pairs, their error bounds (the gap bound once the space has
    :func:`gap_steps` vectors, the residual before), the indices of the ``k``
    largest, and whether each of those is within ``tol`` (its residual within
    ``sqrt(tol)``).
    """
    theta, s, residuals = process.ritz()
    trusted_gap = process.steps >= min(gap_steps(k), size)
    # the plain residual bound is the residuals themselves: read only, never written
    bounds = eigenvalue_error_bounds(theta, residuals) if trusted_gap else residuals
    top = list(range(len(theta) - 1, max(len(theta) - 1 - k, -1), -1))
    # decided on the host in float64, as the tensors would: a few scalars, no tensor operation each
    values, bound, residual = theta.tolist(), bounds.tolist(), residuals.tolist()
    converged = len(top) == k and all(
        bound[i] <= tol * abs(values[i]) and residual[i] <= tol**0.5 * abs(values[i]) for i in top
    )
    return theta, s, residuals, bounds, top, converged


def start_vector(
    operator: CurvatureOperator, v0: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """The first Lanczos vector: ``v0`` (columns summed) plus 1% noise, or noise alone."""
    noise = operator.random_vector(generator)
    if v0 is None:
        return noise
    if v0.ndim == 2:
        v0 = v0.sum(dim=1)
    if v0.shape != (operator.size,):
        raise CurvatureError(
            f"v0 has shape {tuple(v0.shape)}, expected ({operator.size},) or ({operator.size}, j)"
        )
    # copied as it is kept (bfloat16 on the host: half the bytes), converted on the device
    v0 = v0.to(operator.device).to(operator.dtype)
    scale = operator.norm(v0) / operator.norm(noise)
    value = scale.item()  # one read of the scale for both checks
    if not math.isfinite(value) or value == 0.0:
        return noise
    return v0 + WARM_START_NOISE * scale * noise
