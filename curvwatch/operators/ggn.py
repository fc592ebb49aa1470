r"""The generalized Gauss-Newton matrix ``G = J^T H_out J`` (positive semi-definite).

With ``f(theta)`` the model outputs and ``ell(f)`` a convex loss of them,

.. math::

    G = J^\top \, \nabla^2_f \ell \, J, \qquad J = \partial f / \partial \theta,

the Hessian with the second-order term of the network dropped (Schraudolph
2002). ``G v`` costs one Jacobian-vector product (the double-vjp trick), one
logit-space product and one vector-Jacobian product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from curvwatch._errors import CurvatureError
from curvwatch._flat import flatten, unflatten
from curvwatch.kernels import cross_entropy_logit_hvp
from curvwatch.operators._base import CurvatureOperator
from curvwatch.operators._closure import check_params, zeros_for_none

OutputLoss = Callable[[torch.Tensor], torch.Tensor]


class GGNOperator(CurvatureOperator):
    """Gauss-Newton products ``G v = J^T H_out J v``.

    Args:
        model_fn: ``model_fn() -> outputs`` (e.g. ``lambda: model(x)``), a tensor
            built from ``params``; called once per operator.
        params: the parameters, all with ``requires_grad=True``.
        loss: ``"cross_entropy"`` (outputs are logits ``(..., C)``, mean
            reduction; ``H_out = (diag(p) - p p^T) / N``, applied by
            :func:`curvwatch.kernels.cross_entropy_logit_hvp`: Triton on CUDA,
            ``CURVWATCH_CE_BACKEND`` forces a path; for a causal LM with a large
            vocabulary, :func:`curvwatch.operators.lm_head.causal_lm_ggn_operator`
            never holds the full logits), ``"mse"`` (mean of
            squared errors over all output elements; ``H_out = 2/numel I``), or
            a callable ``loss(outputs) -> scalar`` whose output-space Hessian is
            applied by autograd.
        targets: for ``"cross_entropy"``: targets whose ``ignore_index`` rows
            are masked. Not needed otherwise (the Hessians above do not depend
            on them).
        ignore_index: the masked target value.
    """

    def __init__(
        self,
        model_fn: Callable[[], torch.Tensor],
        params: Iterable[torch.Tensor],
        loss: str | OutputLoss = "cross_entropy",
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> None:
        if not (callable(loss) or loss in ("cross_entropy", "mse")):
            raise CurvatureError(
                f"loss must be 'cross_entropy', 'mse' or a callable, got {loss!r}"
            )
        self.params = check_params(params)
        super().__init__(sum(p.numel() for p in self.params), self.params[0].dtype, self.params[0].device)
        self.model_fn = model_fn
        self.output_loss = loss
        self.targets = targets
        self.ignore_index = ignore_index
        self._outputs: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        if self._outputs is None:
            outputs = self.model_fn()
            if not isinstance(outputs, torch.Tensor) or not outputs.requires_grad:
                raise CurvatureError(
                    "model_fn must return the output tensor computed from the parameters"
                )
            self._outputs = outputs
        return self._outputs

    def output_hvp(self, outputs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Apply the loss Hessian with respect to the outputs to ``u``."""
        if self.output_loss == "cross_entropy":
            return cross_entropy_logit_hvp(outputs.detach(), u, self.targets, self.ignore_index)
        if self.output_loss == "mse":
            return u * (2.0 / outputs.numel())
        out = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.output_loss(out), out, create_graph=True)
            (hu,) = torch.autograd.grad(g, out, u)
        return hu

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        outputs = self._forward()
        return output_space_product(outputs, self.params, v, lambda jv: self.output_hvp(outputs, jv))

    def release(self) -> None:
        """Free the cached forward graph."""
        self._outputs = None


def output_space_product(
    outputs: torch.Tensor,
    params: list[torch.Tensor],
    v: torch.Tensor,
    output_product: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    r"""``J^T M J v`` for the Jacobian ``J`` of ``outputs`` and ``M`` applied by ``output_product``.

    ``J v`` by the double-vjp trick (the vjp of a zero cotangent, differentiated
    with respect to that cotangent), ``M (J v)`` in output space, ``J^T`` by one
    vjp through the cached forward graph (kept for the next product). Shared by
    the Gauss-Newton (``M = H_out``) and the Fisher operators (``M = B``).
    Parameters the outputs do not depend on get zeros.
    """
    dummy = torch.zeros_like(outputs, requires_grad=True)
    vjp = torch.autograd.grad(outputs, params, dummy, create_graph=True, allow_unused=True)
    live = [(g, t) for g, t in zip(vjp, unflatten(v, params)) if g is not None]
    if not live:
        return torch.zeros_like(v)
    (jv,) = torch.autograd.grad([g for g, _ in live], dummy, [t for _, t in live])
    out = torch.autograd.grad(outputs, params, output_product(jv.detach()), retain_graph=True, allow_unused=True)
    return flatten(zeros_for_none(out, params)).detach()
