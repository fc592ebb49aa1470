"""Spectral density by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curvwatch._errors import CurvatureError
from curvwatch.operators._base import CurvatureOperator
from curvwatch.solvers._krylov import LanczosProcess


@dataclass(frozen=True)
class SpectralDensity:
    r"""An SLQ estimate of the eigenvalue density ``phi(t) = 1/n sum_i delta(t - lambda_i)``.

    ``phi ~ 1/num_probes sum_l sum_j w_{lj} delta(t - theta_{lj})``: Gauss
    quadrature nodes ``theta`` (Ritz values) and weights ``w`` (squared first
    components of the eigenvectors of ``T``) per probe.

    Attributes:
        nodes: ``(num_probes, m)`` float64 Ritz values.
        weights: ``(num_probes, m)`` float64 weights; each row sums to 1.
        matvecs: products spent.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    matvecs: int

    def moment(self, power: int) -> float:
        """Estimate of ``tr(A^power) / n`` (exact per probe for power < 2m)."""
        return float((self.weights * self.nodes.pow(power)).sum(1).mean())

    def histogram(self, bins: int = 50, range_: tuple[float, float] | None = None):
        """Density mass per bin: ``(edges (bins+1,), mass (bins,))``, mass sums to 1."""
        nodes = self.nodes.flatten()
        weights = self.weights.flatten() / self.nodes.shape[0]
        lo, hi = range_ if range_ is not None else (nodes.min().item(), nodes.max().item())
        if hi <= lo:
            hi = lo + 1.0
        mass, edges = torch.histogram(nodes, bins=bins, range=(lo, hi), weight=weights)
        return edges, mass

    def density(self, grid: torch.Tensor, sigma: float) -> torch.Tensor:
        """The density smoothed by a Gaussian of width ``sigma`` on ``grid``."""
        nodes = self.nodes.flatten()[None, :]
        weights = self.weights.flatten()[None, :] / self.nodes.shape[0]
        kernel = torch.exp(-0.5 * ((grid[:, None].double() - nodes) / sigma) ** 2)
        return (weights * kernel).sum(1) / (sigma * math.sqrt(2 * math.pi))


def slq(
    operator: CurvatureOperator,
    num_probes: int = 4,
    num_steps: int = 20,
    seed: int = 0,
) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature of the spectral density of ``A``.

    For each Rademacher probe ``v`` (normalized), ``num_steps`` Lanczos steps
    give ``T = S diag(theta) S^T`` and ``v^T f(A) v ~ sum_j S_{0j}^2 f(theta_j)``,
    exact for polynomials of degree < ``2 num_steps``. Cost:
    ``num_probes * num_steps`` products.

    Args:
        operator: any symmetric operator.
        num_probes: independent probes. Default 4.
        num_steps: Lanczos steps per probe (nodes per probe). Default 20.
        seed: seeds the probes.

    References:
        Lin, Saad & Yang (2016), "Approximating spectral densities of large
        matrices"; Ghorbani, Krishnan & Xiao (2019).
    """
    if num_probes < 1 or num_steps < 1:
        raise CurvatureError("num_probes and num_steps must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    nodes, weights, matvecs = [], [], 0
    steps = min(num_steps, operator.size)
    for _ in range(num_probes):
        process = LanczosProcess(operator, operator.random_vector(generator, "rademacher"), generator)
        for _ in range(steps):
            process.step()
        theta, s = torch.linalg.eigh(process.projected)
        nodes.append(theta)
        weights.append(s[0, :] ** 2)
        matvecs += process.steps
    return SpectralDensity(torch.stack(nodes), torch.stack(weights), matvecs)
