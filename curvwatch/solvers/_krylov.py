"""The Lanczos three-term recurrence with full reorthogonalization.

Shared by :func:`curvwatch.lanczos` (extreme eigenpairs) and
:func:`curvwatch.slq` (spectral density). Only ``operator.matvec`` and
``operator.dot`` are called, so the process runs unchanged on distributed and
sharded operators.
"""

from __future__ import annotations

import torch

from curvwatch.operators._base import CurvatureOperator

# A recurrence coefficient beta below this multiple of the largest |alpha|, |beta|
# seen means the Krylov space is invariant (numerically exact eigenpairs).
BREAKDOWN_RTOL = 1e-10


class LanczosProcess:
    """Build an orthonormal Krylov basis ``Q`` and tridiagonal ``T = Q^T A Q``.

    Args:
        operator: the symmetric operator ``A``.
        start: the starting vector (any nonzero norm).
        generator: fresh random directions after a breakdown come from here.
        basis_device: where the basis vectors are stored (``"cpu"`` keeps one
            vector per step off the accelerator); default: the operator's device.
    """

    def __init__(
        self,
        operator: CurvatureOperator,
        start: torch.Tensor,
        generator: torch.Generator,
        basis_device: torch.device | str | None = None,
    ) -> None:
        self.operator = operator
        self.generator = generator
        self.basis_device = torch.device(basis_device) if basis_device is not None else operator.device
        self.basis: list[torch.Tensor] = []
        self.alphas: list[float] = []
        self.betas: list[float] = []  # betas[j] couples basis[j] and basis[j + 1]
        self._scale = 0.0
        self._next = self._normalize(start)

    @property
    def steps(self) -> int:
        """Number of basis vectors (= products applied)."""
        return len(self.basis)

    def _normalize(self, v: torch.Tensor) -> torch.Tensor:
        return v / self.operator.norm(v)

    def _store(self, q: torch.Tensor) -> None:
        if q.is_cuda and self.basis_device.type == "cpu":
            # page-locked host memory: the copies back to the GPU run asynchronously
            # and about twice as fast as from pageable memory
            host = torch.empty(q.shape, dtype=q.dtype, pin_memory=True)
            self.basis.append(host.copy_(q, non_blocking=True))
        else:
            self.basis.append(q.to(self.basis_device, non_blocking=True))

    def _orthogonalize(self, w: torch.Tensor) -> torch.Tensor:
        for _ in range(2):  # "twice is enough" (Parlett)
            for q in self.basis:
                q = q.to(w.device, non_blocking=True)
                w = w - self.operator.dot(q, w) * q
        return w

    def step(self) -> None:
        """Apply ``A`` once and extend the basis and ``T`` by one."""
        q = self._next
        self._store(q)
        w = self.operator.matvec(q)
        alpha = self.operator.dot(q, w).item()
        self.alphas.append(alpha)
        w = self._orthogonalize(w)
        beta = self.operator.norm(w).item()
        self._scale = max(self._scale, abs(alpha), beta)
        if self.steps >= self.operator.size:
            self.betas.append(0.0)
            return
        if beta <= BREAKDOWN_RTOL * max(self._scale, 1e-300):
            # Invariant subspace: its Ritz pairs are exact. Continue in a fresh
            # direction orthogonal to it (T gets a zero coupling).
            self.betas.append(0.0)
            fresh = self.operator.random_vector(self.generator)
            self._next = self._normalize(self._orthogonalize(fresh))
            return
        self.betas.append(beta)
        self._next = w / beta

    def tridiagonal(self) -> torch.Tensor:
        """``T``, ``(m, m)`` float64 on the CPU."""
        m = self.steps
        t = torch.diag(torch.tensor(self.alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(self.betas[: m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        return t

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values (ascending), eigenvectors of ``T``, and residual norms.

        The residual of Ritz pair ``j`` is ``||A y_j - theta_j y_j|| =
        |beta_m| |s_{m,j}|``, exact up to rounding with full reorthogonalization.
        """
        theta, s = torch.linalg.eigh(self.tridiagonal())
        residuals = abs(self.betas[-1]) * s[-1, :].abs()
        return theta, s, residuals

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``Q @ coefficients`` on the operator's device: ``(n, j)`` Ritz vectors."""
        op = self.operator
        out = torch.zeros(op.size, coefficients.shape[1], dtype=op.dtype, device=op.device)
        coefficients = coefficients.to(device=op.device, dtype=op.dtype)
        for i, q in enumerate(self.basis):
            out += q.to(op.device, non_blocking=True)[:, None] * coefficients[i][None, :]
        return out
