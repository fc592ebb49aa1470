"""The Lanczos three-term recurrence with full reorthogonalization.

Shared by :func:`curvwatch.lanczos` (extreme eigenpairs) and
:func:`curvwatch.slq` (spectral density). Only ``operator.matvec`` and
``operator.dot`` are called, so the process runs unchanged on distributed and
sharded operators.
"""

from __future__ import annotations

import torch

from curvwatch.operators._base import CurvatureOperator
from curvwatch.solvers import _host
from curvwatch.solvers._host import HostVector

# A recurrence coefficient beta below this multiple of the largest |alpha|, |beta|
# seen means the Krylov space is invariant (numerically exact eigenpairs).
BREAKDOWN_RTOL = 1e-10


class LanczosProcess:
    r"""Lanczos with full reorthogonalization and, optionally, a bounded basis (Krylov-Schur).

    Keeps the orthonormal vectors ``V`` (at most ``max_basis`` of them) and the projected
    matrix ``H = V^T A V`` (float64, small), with the Krylov-Schur relation

    .. math::

        A V = V H + f e_m^T, \qquad V^T f = 0 ,

    so the residual of a Ritz pair ``(theta_i, V s_i)`` is
    ``||f|| |s_{m,i}|`` exactly as in plain Lanczos. When the basis is full, it
    is compressed in place to the ``keep`` wanted Ritz vectors (``H`` becomes
    ``diag(theta)``) and the iteration continues from ``f / ||f||``: the extra
    memory of a solve is ``max_basis + 2`` vectors whatever the number of
    products (Stewart 2001). Without restarts ``H`` is the Lanczos tridiagonal
    matrix ``T`` (what :func:`curvwatch.slq` needs). Full reorthogonalization
    against the stored basis (:meth:`_project_out`) keeps ``V`` orthonormal, and it
    computes the couplings of ``H`` explicitly, so the arrow-shaped ``H`` after a
    restart needs no special case.

    Args:
        operator: the symmetric operator ``A``.
        start: starting vector (any nonzero norm).
        generator: fresh random directions after a breakdown come from here.
        max_basis: most basis vectors kept (>= 2); ``None``: never restart.
        basis_device: where the basis lives (``"cpu"`` for a CUDA operator: host
            memory in page-locked chunks, :class:`~curvwatch.solvers._host.HostVector`).
    """

    def __init__(
        self,
        operator: CurvatureOperator,
        start: torch.Tensor,
        generator: torch.Generator,
        max_basis: int | None = None,
        basis_device: torch.device | str | None = None,
    ) -> None:
        self.operator = operator
        self.generator = generator
        self.max_basis = None if max_basis is None else max(2, int(max_basis))
        self.basis_device = torch.device(basis_device) if basis_device is not None else operator.device
        self.basis: list[torch.Tensor] = []
        self.projected = torch.zeros(0, 0, dtype=torch.float64)
        self.beta = 0.0
        self.steps = 0  # products applied
        self.restarts = 0
        self._scale = 0.0
        self._next = start / operator.norm(start)

    def _store(self, q: torch.Tensor) -> None:
        """Keep ``q`` in the basis.

        On the same device: ``q`` itself, which is not reused. From a GPU to the
        host: a :class:`~curvwatch.solvers._host.HostVector` (page-locked chunks).
        """
        if q.is_cuda and self.basis_device.type == "cpu":
            self.basis.append(HostVector(q))
        else:
            self.basis.append(q.to(self.basis_device, non_blocking=True))

    def _project_out(self, w: torch.Tensor) -> tuple[torch.Tensor, list[float], float]:
        """``w - V V^T w`` in place; returns it, the coefficients ``V^T w`` and ``||w||`` after.

        Classical Gram-Schmidt, repeated once when the first pass removed most
        of ``w`` (the DGKS criterion ``||w'|| < ||w|| / sqrt(2)``): a second
        pass is needed only then, and each pass reads the whole basis (from the
        host when it lives there). The coefficients are summed as Python floats
        (float64, as the projected matrix): one host scalar per inner product,
        no tensor operation per entry.
        """
        dot, device = self.operator.dot, w.device
        moved = self.basis_device != device  # a basis elsewhere (the host) is read over to w's device
        coefficients = [0.0] * len(self.basis)
        norm = self.operator.norm(w).item()
        for _ in range(2):
            for i, q in enumerate(self.basis):
                if moved:
                    q = q.to(device, non_blocking=True)
                c = dot(q, w).item()
                w.add_(q, alpha=-c)
                coefficients[i] += c
            reduced = self.operator.norm(w).item()
            if reduced >= norm / 2**0.5 or not self.basis:
                break
            norm = reduced
        return w, coefficients, reduced

    def step(self) -> None:
        """Apply ``A`` once, extend ``V`` and ``H`` by one (restarting first if full)."""
        q = self._next
        self._store(q)
        w, coefficients, beta = self._project_out(self.operator.matvec(q))
        self.steps += 1
        self.projected = _bordered(self.projected, coefficients)
        self._scale = max(self._scale, max(abs(c) for c in coefficients), beta)
        if beta <= BREAKDOWN_RTOL * max(self._scale, 1e-300) and len(self.basis) < self.operator.size:
            # Invariant subspace: its Ritz pairs are exact; go on in a fresh direction.
            fresh, _, _ = self._project_out(self.operator.random_vector(self.generator))
            self.beta, self._next = 0.0, fresh / self.operator.norm(fresh)
            return
        self.beta = beta
        self._next = w.div_(max(beta, 1e-300))  # in place: the product's output is not kept elsewhere

    def discard_next(self) -> None:
        """Free the next Lanczos vector (the iteration is over; :meth:`step` must not follow)."""
        self._next = None

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values (ascending), eigenvectors of ``H``, residual norms ``||f|| |s_m|``."""
        theta, s = torch.linalg.eigh(self.projected)
        return theta, s, self.beta * s[-1, :].abs()

    @property
    def full(self) -> bool:
        """True when the next step needs a restart first."""
        return self.max_basis is not None and len(self.basis) >= self.max_basis

    def restart(self, keep: int) -> None:
        """Compress ``V`` in place to the ``keep`` largest Ritz vectors."""
        theta, s, _ = self.ritz()
        keep = max(1, min(keep, len(self.basis) - 1))
        # The next vector f/||f|| couples to each kept Ritz vector by beta * s_m;
        # the next step's reorthogonalization computes those entries of H.
        self._combine_in_place(s[:, -keep:])
        del self.basis[keep:]
        self.projected = torch.diag(theta[-keep:])
        self.restarts += 1

    def _combine_in_place(self, coefficients: torch.Tensor) -> None:
        """``V[:, :j] <- V @ coefficients`` in place, a block of entries at a time, on the operator's device.

        Blocks of a power of two entries, at most a host chunk (they never cross one), at most
        an eighth of a vector for the whole basis together: few enough launches
        for a 355M-entry vector (85 blocks where fixed blocks of 2^18 took 1,352),
        little memory beside the basis.
        """
        j, m = coefficients.shape[1], len(self.basis)
        device = self.operator.device
        c = coefficients.to(device=device, dtype=self.operator.dtype)
        n = self.basis[0].shape[0]
        block = min(1 << max(18, (max(1, n // (8 * m))).bit_length() - 1), _host.HOST_CHUNK)
        for a in range(0, n, block):
            b = min(n, a + block)
            rows = torch.stack([q[a:b].to(device, non_blocking=True) for q in self.basis])  # (m, block)
            mixed = c.T @ rows  # (j, block)
            for i in range(j):
                self.basis[i][a:b].copy_(mixed[i], non_blocking=True)
        if device.type == "cuda":
            # the copies back into host memory are asynchronous: complete before the basis is read or freed
            torch.cuda.current_stream(device).synchronize()

    def combine_on_host(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``V @ coefficients`` for one column, formed a block at a time and kept on the host.

        On the CPU in the operator's dtype; from a GPU in bfloat16 (a warm start's
        precision), so the device holds only a block of it at a time.
        """
        op = self.operator
        cuda = op.device.type == "cuda"
        out = torch.empty(op.size, dtype=torch.bfloat16 if cuda else op.dtype)
        c = coefficients.to(device=op.device, dtype=op.dtype)
        n = self.basis[0].shape[0]
        block = min(1 << max(18, (max(1, n // (8 * len(self.basis)))).bit_length() - 1), _host.HOST_CHUNK)
        for a in range(0, n, block):
            b = min(n, a + block)
            rows = torch.stack([q[a:b].to(op.device, non_blocking=True) for q in self.basis])  # (m, block)
            out[a:b].copy_(c @ rows)
        return out

    def combine(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``V @ coefficients`` on the operator's device: ``(n, j)`` Ritz vectors."""
        op = self.operator
        out = torch.zeros(op.size, coefficients.shape[1], dtype=op.dtype, device=op.device)
        coefficients = coefficients.to(device=op.device, dtype=op.dtype)
        for i, q in enumerate(self.basis):
            out += q.to(op.device, non_blocking=True)[:, None] * coefficients[i][None, :]
        return out


def _bordered(projected: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """``projected`` grown by one row and column, both ``coefficients`` (float64).

    Built from Python floats in one tensor construction: the same entries as
    writing the border into a zero matrix, without its four tensor operations.
    """
    rows = projected.tolist()
    for row, c in zip(rows, coefficients):
        row.append(c)
    rows.append(coefficients)
    return torch.tensor(rows, dtype=torch.float64)
