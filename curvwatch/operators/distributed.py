r"""Operators across processes: data-parallel products averaged over ranks.

Under data parallelism (DDP, Accelerate's multi-process launch) every rank holds
the full parameters and a shard of the probe batch. With a mean-reduced loss and
equal shard sizes the Hessian of the whole probe batch is the mean of the
ranks' Hessians, so

.. math::

    H v = \frac{1}{R} \sum_{r=1}^{R} H_r v ,

one all-reduce of an ``n``-vector per product. Every rank then holds the same
``H v`` and runs the same Lanczos iteration from the same seed, so all ranks
agree on the result without further communication.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from curvwatch.operators._base import CurvatureOperator

Reduce = Callable[[torch.Tensor], torch.Tensor]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over the default ``torch.distributed`` process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(dist.get_world_size())


class ReducedOperator(CurvatureOperator):
    """``x -> reduce(A_rank x)``: average a per-rank operator over processes.

    Args:
        operator: this rank's operator (its share of the probe batch).
        reduce: mean over ranks, e.g. :func:`all_reduce_mean` or
            ``lambda t: accelerator.reduce(t, reduction="mean")``.
    """

    def __init__(self, operator: CurvatureOperator, reduce: Reduce = all_reduce_mean) -> None:
        super().__init__(operator.size, operator.dtype, operator.device)
        self.operator = operator
        self.reduce = reduce

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.operator.matvec(v))

    def any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is true on any rank (its indicator averaged by ``reduce``)."""
        flag_tensor = torch.tensor([1.0 if flag else 0.0], dtype=self.dtype, device=self.device)
        return self.reduce(flag_tensor).item() > 0

    def mean_over_ranks(self, value: float) -> float:
        """The mean of a per-process scalar, by ``reduce``."""
        return self.reduce(torch.tensor([value], dtype=self.dtype, device=self.device)).item()

    # what the wrapped operator can do, and its state (gradient, loss, step) passed through
    forms_gradient = property(lambda self: self.operator.forms_gradient)
    scales_step = property(lambda self: self.operator.scales_step)
    loss = property(lambda self: self.operator.loss)
    step_scale = property(
        lambda self: self.operator.step_scale, lambda self, scale: setattr(self.operator, "step_scale", scale)
    )

    def gradient_at_theta(self, keep: bool = True) -> torch.Tensor:
        """This rank's gradient at ``theta`` (the wrapped operator's: products are reduced, this is not)."""
        return self.operator.gradient_at_theta(keep)

    def release(self) -> None:
        """Free what the wrapped operator keeps."""
        self.operator.release()

    def __getattr__(self, name: str):
        # anything else of the wrapped operator (its gradient, parameters, ...)
        return getattr(self.__dict__["operator"], name)
