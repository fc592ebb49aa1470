"""Hutchinson trace estimation, optionally deflated by Lanczos Ritz vectors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curvwatch._errors import CurvatureError
from curvwatch.operators._base import CurvatureOperator
from curvwatch.solvers.lanczos import LanczosResult


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate.

    Attributes:
        estimate: the estimate of ``tr(A)`` (units of ``A`` times dimension).
        stderr: its standard error, ``std(samples) / sqrt(num_samples)``
            (NaN with one sample).
        matvecs: new products spent (the deflation's products are not counted).
        samples: the per-probe values ``z^T A z`` (deflated when deflating).
    """

    estimate: float
    stderr: float
    matvecs: int
    samples: tuple[float, ...]


def hutchinson(
    operator: CurvatureOperator,
    num_matvecs: int = 20,
    seed: int = 0,
    deflation: LanczosResult | None = None,
) -> TraceResult:
    r"""Estimate ``tr(A)`` from Rademacher probes, one product each.

    Plain (Hutchinson 1989; Girard 1987): for ``z`` with independent +-1 entries
    ``E[z^T A z] = tr(A)``, so the mean of ``num_matvecs`` samples is unbiased,
    with variance ``2 (||A||_F^2 - sum_i A_ii^2) / num_matvecs``.

    Deflated by a :class:`LanczosResult` with orthonormal Ritz vectors ``Y``
    (``k`` columns): ``tr(A) = tr(Y^T A Y) + tr(P A P)``, ``P = I - Y Y^T``.
    For Ritz vectors ``Y^T A Y = diag(theta)`` exactly, so the first term is
    ``sum(theta)`` at no extra cost (it reuses the products Lanczos already
    spent); the second is estimated from ``(P z)^T A (P z)``, whose variance no
    longer contains the top eigenvalues (the idea of Hutch++, Meyer et al. 2021,
    with the low-rank part taken from Lanczos).

    Args:
        operator: any symmetric operator.
        num_matvecs: number of probes (= products). Default 20.
        seed: seeds the probes (CPU generator; same on every device and rank).
        deflation: a :func:`lanczos` result on the same operator, or ``None``.

    Returns:
        :class:`TraceResult`.

    Raises:
        CurvatureError: ``num_matvecs < 1`` or a deflation basis of the wrong size.

    References:
        Hutchinson (1989); Meyer, Musco, Musco & Woodruff, "Hutch++" (2021).
    """
    if num_matvecs < 1:
        raise CurvatureError(f"num_matvecs must be >= 1, got {num_matvecs}")
    basis, base = None, 0.0
    if deflation is not None:
        basis = deflation.eigenvectors.to(device=operator.device, dtype=operator.dtype)
        if basis.shape[0] != operator.size:
            raise CurvatureError(
                f"deflation vectors have length {basis.shape[0]}, operator size is {operator.size}"
            )
        base = float(deflation.eigenvalues.sum())
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_matvecs):
        z = operator.random_vector(generator, "rademacher")
        if basis is not None:
            coeffs = torch.stack([operator.dot(basis[:, j], z) for j in range(basis.shape[1])])
            z = z - basis @ coeffs
        samples.append(operator.dot(z, operator.matvec(z)).item())
    values = torch.tensor(samples, dtype=torch.float64)
    stderr = values.std().item() / math.sqrt(num_matvecs) if num_matvecs > 1 else math.nan
    return TraceResult(base + values.mean().item(), stderr, num_matvecs, tuple(samples))
