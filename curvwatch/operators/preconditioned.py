r"""Symmetric diagonal preconditioning ``P^{-1/2} A P^{-1/2}`` of another operator.

For Adam-type optimizers ``P = diag(sqrt(v_hat) + eps)`` and the eigenvalues of
``P^{-1/2} H P^{-1/2}`` are those of ``P^{-1} H`` (similar matrices): the
preconditioned sharpness of Cohen et al. (2022), "Adaptive gradient methods at
the edge of stability".
"""

from __future__ import annotations

import math

import torch

from curvwatch._errors import CurvatureError
from curvwatch._flat import inverse_sqrt_scale_
from curvwatch.operators._base import CurvatureOperator


class PreconditionedOperator(CurvatureOperator):
    """``x -> P^{-1/2} A P^{-1/2} x`` for a positive diagonal ``P``.

    Args:
        operator: the operator ``A`` to wrap.
        diagonal: flat positive tensor, the diagonal of ``P`` (length ``operator.size``).

    Raises:
        CurvatureError: wrong length, or a non-positive / non-finite entry.
    """

    def __init__(self, operator: CurvatureOperator, diagonal: torch.Tensor) -> None:
        if diagonal.shape != (operator.size,):
            raise CurvatureError(
                f"preconditioner diagonal has shape {tuple(diagonal.shape)}, expected ({operator.size},)"
            )
        if not bool(torch.all((diagonal > 0) & (diagonal < math.inf))):  # positive and finite: one read back
            raise CurvatureError("preconditioner diagonal must be positive and finite")
        super().__init__(operator.size, operator.dtype, operator.device)
        self.operator = operator
        # P itself, shared with the caller where dtype and device already match:
        # P^{-1/2} is applied a slice at a time, so no vector of its own is kept
        # (one parameter-sized vector less per operator: 1.3 GiB at 355M).
        self.diagonal = diagonal.to(device=operator.device, dtype=operator.dtype)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``P^{-1/2} (A P^{-1/2} v)``: the inner scaling as the wrapped operator applies it, the outer in place."""
        return inverse_sqrt_scale_(self.operator.preconditioned_matvec(v, self.diagonal), self.diagonal)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The wrapped operator's inner product (all-reduced when it is sharded)."""
        return self.operator.dot(a, b)

    def any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any process, as the wrapped operator decides."""
        return self.operator.any_rank(flag)

    # the wrapped operator's finite-difference step, scaled through the preconditioning
    scales_step = property(lambda self: self.operator.scales_step)
    step_scale = property(
        lambda self: self.operator.step_scale, lambda self, scale: setattr(self.operator, "step_scale", scale)
    )
