"""The operator interface shared by every curvature operator and every solver.

An operator is a symmetric linear map ``A: R^n -> R^n`` on flat 1-D tensors. It
only multiplies: solvers in :mod:`curvwatch.solvers` call :meth:`matvec` and
:meth:`dot` and nothing else, so a distributed operator can all-reduce inside
``dot`` and a sharded one can work on local shards.
"""

from __future__ import annotations

import torch

from curvwatch._errors import CurvatureError
from curvwatch._flat import inverse_sqrt_scale_


class CurvatureOperator:
    """Base class: a symmetric linear operator on flat vectors of length ``size``.

    Subclasses implement :meth:`_matvec`; :meth:`matvec` validates the vector and
    counts the products. ``dot`` is the Euclidean inner product (overridden by
    operators whose vectors are shards of a larger vector).

    What an operator can do beyond products is declared by flags, which
    wrapping operators (:class:`~curvwatch.operators.distributed.ReducedOperator`,
    :class:`~curvwatch.PreconditionedOperator`) pass on from the operator they
    wrap, so a caller reads a flag instead of probing for attributes.

    Attributes:
        size: length ``n`` of the vectors the operator acts on (local length for
            sharded operators).
        dtype: dtype of the vectors.
        device: device of the vectors.
        matvecs: number of products applied so far.
        forms_gradient: :meth:`gradient_at_theta` gives the loss's gradient at
            ``theta`` (a Hessian of a loss: the probe loss's first order,
            cached by its products), and :attr:`loss` the loss once formed.
            False for the output-space operators, which never form the loss.
        scales_step: the products are finite differences whose step is
            multiplied by :attr:`step_scale` (a Richardson step-down halves it).
        loss: the loss at ``theta`` once a product formed it, else ``None``.
    """

    size: int
    dtype: torch.dtype
    device: torch.device
    forms_gradient: bool = False
    scales_step: bool = False
    loss: float | None = None

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.size = int(size)
        self.dtype = dtype
        self.device = torch.device(device)
        self.matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A v`` for a flat vector ``v`` of shape ``(size,)``.

        Raises:
            CurvatureError: ``v`` has the wrong shape, dtype or device.
        """
        self._check_vector(v)
        self.matvecs += 1
        return self._matvec(v)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("operators implement _matvec(v) -> A v")

    def gradient_at_theta(self, keep: bool = True) -> torch.Tensor:
        """The flat gradient of the loss at ``theta`` (operators with :attr:`forms_gradient` only).

        ``keep``: cache it for the products (``False``: where they do not need it, do not).

        Raises:
            NotImplementedError: the operator forms no gradient.
        """
        raise NotImplementedError(f"{type(self).__name__} forms no gradient (forms_gradient is False)")

    def release(self) -> None:
        """Free what the products keep between calls (graphs, caches); nothing here."""

    def preconditioned_matvec(self, v: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
        """Return ``A P^{-1/2} v`` for the flat positive diagonal ``P``; ``v`` is left as it is.

        One product. Here through a scaled copy of ``v``; operators that can
        apply the scaling inside the product (finite differences shift the
        parameters along ``P^{-1/2} v`` a tensor at a time) override
        :meth:`_preconditioned_matvec` and save that parameter-sized copy.
        """
        self._check_vector(v)
        self.matvecs += 1
        return self._preconditioned_matvec(v, diagonal)

    def _preconditioned_matvec(self, v: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
        return self._matvec(inverse_sqrt_scale_(v.clone(), diagonal))

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Inner product ``<a, b>`` as a 0-d tensor (all-reduced when sharded)."""
        return torch.dot(a, b)

    def any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any process (a solver's shared stop decision).

        Single-process operators return ``flag``; distributed ones all-reduce it,
        so every rank leaves an iteration at the same step (a per-rank wall-clock
        check would otherwise leave the others waiting in a collective).
        """
        return flag

    def mean_over_ranks(self, value: float) -> float:
        """The mean of a per-process scalar (e.g. the probe loss of each rank's share)."""
        return value

    def norm(self, a: torch.Tensor) -> torch.Tensor:
        """Euclidean norm ``sqrt(<a, a>)`` as a 0-d tensor."""
        return self.dot(a, a).clamp_min(0).sqrt()

    def random_vector(self, generator: torch.Generator, kind: str = "normal") -> torch.Tensor:
        """A random vector (standard normal or Rademacher +-1) on ``device``.

        ``generator`` (a CPU generator) gives one seed per vector; the vector is
        drawn on the operator's device from a generator seeded with it, so the
        same seed gives the same vector on every rank of one device type and
        nothing of size ``n`` crosses the host-device link (drawing 124M floats
        on the host and copying took 4.4 s on an H100 machine; on the GPU, 0.3 ms).
        """
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        local = torch.Generator(device=self.device).manual_seed(seed)
        if kind == "rademacher":
            v = torch.randint(0, 2, (self.size,), generator=local, device=self.device, dtype=self.dtype)
            return v.mul_(2).sub_(1)
        return torch.randn(self.size, generator=local, device=self.device, dtype=self.dtype)

    def _check_vector(self, v: torch.Tensor) -> None:
        if not isinstance(v, torch.Tensor):
            raise CurvatureError(
                f"matvec expects a torch.Tensor, got {type(v).__name__}; "
                "flatten parameter-shaped vectors with torch.cat([t.flatten() ...])"
            )
        if v.shape != (self.size,):
            raise CurvatureError(
                f"vector has shape {tuple(v.shape)}, expected ({self.size},): "
                "vectors are flat, one entry per trainable parameter"
            )
        if v.dtype != self.dtype:
            raise CurvatureError(
                f"dtype mismatch: expected {self.dtype}, got {v.dtype}; "
                f"call v.to({self.dtype})"
            )
        if v.device != self.device and not (
            v.device.type == self.device.type and self.device.index is None
        ):
            raise CurvatureError(
                f"device mismatch: expected {self.device}, got {v.device}; "
                f"call v.to('{self.device}')"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, dtype={self.dtype}, device={self.device})"


class DenseOperator(CurvatureOperator):
    """A symmetric matrix wrapped as an operator; the oracle in tests.

    Example:
        >>> import torch
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, -5.0, 1.0])))
        >>> op.matvec(torch.ones(3))
        tensor([ 3., -5.,  1.])
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise CurvatureError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v
