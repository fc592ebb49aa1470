"""Budgeted Lanczos for the largest algebraic eigenvalues of a symmetric operator."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from curvwatch._errors import CurvatureError
from curvwatch.operators._base import CurvatureOperator
from curvwatch.solvers._krylov import LanczosProcess

# Relative size of the random perturbation added to a warm start, so that a
# start that is (numerically) an exact eigenvector still spans new directions.
WARM_START_NOISE = 1e-2


@dataclass(frozen=True)
class LanczosResult:
    """Top-``k`` eigenpairs from :func:`lanczos`.

    Attributes:
        eigenvalues: ``(k,)`` float64 CPU tensor, descending (largest algebraic first).
        eigenvectors: ``(n, k)`` orthonormal Ritz vectors on the operator's device.
        residuals: ``(k,)`` float64, ``||A y - theta y||`` of each pair (same units
            as the eigenvalues).
        matvecs: products of ``A`` spent.
        converged: every residual is at most ``tol * |theta|``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    matvecs: int
    converged: bool

    @property
    def lambda_max(self) -> float:
        """The largest algebraic eigenvalue (sharpness) as a float."""
        return float(self.eigenvalues[0])


def lanczos(
    operator: CurvatureOperator,
    k: int = 1,
    tol: float = 1e-3,
    max_matvecs: int = 60,
    max_seconds: float | None = None,
    v0: torch.Tensor | None = None,
    seed: int = 0,
    basis_device: torch.device | str | None = None,
) -> LanczosResult:
    r"""The ``k`` largest algebraic eigenvalues of a symmetric operator.

    Solves ``A y_i = theta_i y_i`` for ``theta_1 >= ... >= theta_k``, the top of
    the spectrum in the *algebraic* order (``which='LA'`` in scipy's ``eigsh``):
    sharpness is the largest eigenvalue even when a negative one is larger in
    magnitude. Runs the Lanczos recurrence with full reorthogonalization and
    stops at the first of

    * every residual ``||A y_i - theta_i y_i|| <= tol * |theta_i|`` (converged);
    * ``max_matvecs`` products (never exceeded) or ``max_seconds`` elapsed;
    * the Krylov space fills all ``n`` dimensions.

    Args:
        operator: any :class:`~curvwatch.operators.CurvatureOperator`.
        k: number of eigenpairs. Default 1.
        tol: relative residual tolerance. Default ``1e-3``; the eigenvalue error
            is then about ``tol**2 * |theta| / gap`` or smaller.
        max_matvecs: budget of products. Default 60.
        max_seconds: wall-clock budget, checked after each product. Default none.
        v0: warm start: a vector ``(n,)`` or previous eigenvectors ``(n, j)``
            (summed), plus 1% random noise. Default: a random normal vector.
        seed: seeds the start vector and the noise (CPU generator: the same on
            every device and every rank).
        basis_device: where the Krylov basis lives (``"cpu"`` for large models).

    Returns:
        :class:`LanczosResult`, partial (``converged=False``) when the budget ran out.

    Raises:
        CurvatureError: ``k < 1``, ``max_matvecs < k``, or ``v0`` of the wrong size.

    References:
        Lanczos (1950); Parlett, *The Symmetric Eigenvalue Problem* (1998);
        Golub & Van Loan, *Matrix Computations*, ch. 10.

    Example:
        >>> import torch
        >>> from curvwatch.operators import DenseOperator
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, -5.0, 1.0], dtype=torch.float64)))
        >>> lanczos(op, k=1).eigenvalues   # 3, not -5: largest algebraic
        tensor([3.], dtype=torch.float64)
    """
    if k < 1:
        raise CurvatureError(f"k must be >= 1, got {k}")
    if max_matvecs < k:
        raise CurvatureError(f"max_matvecs ({max_matvecs}) must be at least k ({k})")
    k = min(k, operator.size)
    generator = torch.Generator().manual_seed(seed)
    start = _start_vector(operator, v0, generator)
    process = LanczosProcess(operator, start, generator, basis_device)
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    budget = min(max_matvecs, operator.size)
    while True:
        process.step()
        theta, s, residuals = process.ritz()
        top = torch.arange(process.steps - 1, max(process.steps - 1 - k, -1), -1)
        converged = len(top) == k and bool(
            torch.all(residuals[top] <= tol * theta[top].abs())
        )
        out_of_time = deadline is not None and operator.any_rank(time.perf_counter() >= deadline)
        if converged or process.steps >= budget or out_of_time:
            break
    return LanczosResult(
        eigenvalues=theta[top].clone(),
        eigenvectors=process.combine(s[:, top]),
        residuals=residuals[top].clone(),
        matvecs=process.steps,
        converged=converged,
    )


def _start_vector(
    operator: CurvatureOperator, v0: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    noise = operator.random_vector(generator)
    if v0 is None:
        return noise
    if v0.ndim == 2:
        v0 = v0.sum(dim=1)
    if v0.shape != (operator.size,):
        raise CurvatureError(
            f"v0 has shape {tuple(v0.shape)}, expected ({operator.size},) or ({operator.size}, j)"
        )
    v0 = v0.to(device=operator.device, dtype=operator.dtype)
    scale = operator.norm(v0) / operator.norm(noise)
    if not bool(torch.isfinite(scale)) or scale.item() == 0.0:
        return noise
    return v0 + WARM_START_NOISE * scale * noise
