r"""The Hessian of a scalar loss with respect to a list of parameters.

.. math::

    H = \nabla^2_\theta \, L(\theta), \qquad L = \text{closure}() ,

applied to flat vectors ``v`` of length ``n = sum(p.numel() for p in params)``.
Three ways to apply it (Pearlmutter 1994 for the first two):

``double_backward``
    Build the first-order graph ``g = dL/dtheta`` (``create_graph=True``) once,
    then ``H v = d<g, v>/dtheta`` per product, reusing the graph.
``forward_over_reverse``
    ``H v = jvp(grad(L), theta, v)`` with :mod:`torch.func`; needs the module
    owning the parameters so they can be substituted functionally.
``finite_difference``
    Two ordinary gradients per product (central) or one against the cached
    gradient (forward); parameters perturbed in place and restored bit-exactly
    from a saved copy. Works where double backward cannot (fused kernels, FSDP).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from curvwatch._errors import CurvatureError, NoSecondDerivativeError
from curvwatch._flat import flatten, unflatten
from curvwatch.names import HESSIAN_METHODS, Method
from curvwatch.operators._base import CurvatureOperator
from curvwatch.operators._closure import (
    NO_SECOND_DERIVATIVE_MSG,
    Closure,
    check_params,
    checked_loss,
    is_missing_derivative,
    zeros_for_none,
)
from curvwatch.operators._difference import accumulate_gradient, difference_product, scaled_squared_norm

METHODS = HESSIAN_METHODS

# Parameter-space step |eps * v| of a finite difference, relative to 1 + rms(theta),
# as a multiple of machine epsilon's cube root (central) or square root (forward).
# Measured on a tiny GPT-2 in float32: |eps v| = 1e-3 central -> 3.8e-5 relative
# error of lambda_max, 1e-2 -> 3.7e-3; one-sided 1e-4 -> 5.0e-5 (docs/design.md).
CENTRAL_STEP_FACTOR = 0.2
FORWARD_STEP_FACTOR = 0.3


def finite_difference_step(
    dtype: torch.dtype, param_rms: float, scheme: Literal["central", "forward"] = "central"
) -> float:
    r"""Length of the parameter-space step ``h = |eps * v|`` of a finite difference.

    .. math::

        h_\text{central} = 0.2\,\epsilon_\text{mach}^{1/3}\,(1 + \text{rms}(\theta)),
        \qquad
        h_\text{forward} = 0.3\,\epsilon_\text{mach}^{1/2}\,(1 + \text{rms}(\theta))

    i.e. about 1e-3 (central) and 1e-4 (forward) in float32 for unit-scale
    weights, and 1.2e-6 / 4.5e-9 in float64: the steps that balance truncation
    (O(h^2) central, O(h) forward) against rounding (O(eps_mach / h)) in the
    measurements recorded in docs/design.md. The textbook
    ``(1 + |theta|) eps_mach^(1/3) / |v|`` with the full norm was 35% off.
    """
    machine_eps = torch.finfo(dtype).eps
    if scheme == "central":
        return CENTRAL_STEP_FACTOR * machine_eps ** (1 / 3) * (1.0 + param_rms)
    return FORWARD_STEP_FACTOR * machine_eps**0.5 * (1.0 + param_rms)


class HessianOperator(CurvatureOperator):
    """Hessian-vector products of ``closure()`` with respect to ``params``.

    Args:
        closure: ``closure() -> loss``, a scalar tensor computed from ``params``
            (e.g. ``lambda: criterion(model(x), y)``). Called once per operator
            (``double_backward``), or once per gradient (``finite_difference``).
        params: the parameters, all with ``requires_grad=True`` and one dtype.
        method: ``"double_backward"`` (default), ``"forward_over_reverse"`` or
            ``"finite_difference"``.
        module: the ``nn.Module`` that owns ``params``; needed only by
            ``forward_over_reverse``.
        scheme: finite differences only: ``"central"`` (two gradients per
            product, O(h^2)) or ``"forward"`` (one gradient against the cached
            gradient at ``theta``, O(h)).
        step: finite differences only: the parameter-space step ``|eps v|``;
            default :func:`finite_difference_step`.
        pieces: finite differences only: ``[(closure_i, w_i)]`` with
            ``closure() == sum_i w_i closure_i()`` (:func:`curvwatch.measurement.chunked.split_probe`);
            each gradient is summed over the pieces, so its activations are one
            piece's. ``closure`` is then not called.

    ``.grad`` is never read or written. The loss at ``theta`` and its gradient
    are available as :attr:`loss` and :attr:`gradient` after the first product.

    Raises:
        CurvatureError: bad parameters or method; at the first product, a loss
            that is not a finite scalar, or a model without a second derivative
            under the exact methods.

    Example:
        >>> import torch
        >>> w = torch.zeros(2, requires_grad=True)
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> op = HessianOperator(lambda: (X @ w).pow(2).sum(), [w])
        >>> op.matvec(torch.tensor([1.0, 1.0]))  # H = 2 X^T X = diag(2, 8)
        tensor([2., 8.])
    """

    forms_gradient = True

    def __init__(
        self,
        closure: Closure,
        params: Iterable[torch.Tensor],
        method: str = Method.DOUBLE_BACKWARD,
        module: torch.nn.Module | None = None,
        scheme: Literal["central", "forward"] = "central",
        step: float | None = None,
        pieces: Sequence[tuple[Closure, float]] | None = None,
    ) -> None:
        if method not in METHODS:
            raise CurvatureError(f"unknown method {method!r}; choose one of {METHODS}")
        if scheme not in ("central", "forward"):
            raise CurvatureError(f"unknown scheme {scheme!r}; choose 'central' or 'forward'")
        if not callable(closure):
            raise CurvatureError("closure must be callable: closure() -> scalar loss")
        self.params = check_params(params)
        if pieces is not None and method != Method.FINITE_DIFFERENCE:
            raise CurvatureError(
                f"a probe batch split into pieces needs method='finite_difference', got {method!r}: "
                "the exact methods differentiate one graph of the whole batch"
            )
        if method == Method.FORWARD_OVER_REVERSE and module is None:
            raise CurvatureError(
                "method='forward_over_reverse' needs module=<the nn.Module owning the "
                "parameters> so torch.func can substitute them; or use 'double_backward'"
            )
        super().__init__(sum(p.numel() for p in self.params), self.params[0].dtype, self.params[0].device)
        self.closure = closure
        self.method = method
        self.scales_step = method == Method.FINITE_DIFFERENCE
        self.module = module
        self.scheme = scheme
        self.step = step
        self.step_scale = 1.0  # multiplies the step (a Richardson certificate halves it)
        self._rms: float | None = None
        self.pieces = list(pieces) if pieces is not None else None
        self.loss: float | None = None
        self.gradient: torch.Tensor | None = None
        self._graph_grads: list[torch.Tensor] | None = None

    # -- exact methods -------------------------------------------------------
    def _first_order_graph(self) -> list[torch.Tensor]:
        if self._graph_grads is None:
            loss = checked_loss(self.closure)
            try:
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            except RuntimeError as error:  # torch.compile's backward with donated buffers
                if is_missing_derivative(error):
                    raise NoSecondDerivativeError(NO_SECOND_DERIVATIVE_MSG.format(cause=error)) from error
                raise
            grads = zeros_for_none(grads, self.params)
            self.loss = loss.item()
            self.gradient = flatten([g.detach() for g in grads])
            self._graph_grads = grads
        return self._graph_grads

    def _double_backward(self, v: torch.Tensor) -> torch.Tensor:
        grads = self._first_order_graph()
        pairs = [(g, t, p) for g, t, p in zip(grads, unflatten(v, self.params), self.params) if g.requires_grad]
        if not pairs:
            raise NoSecondDerivativeError(
                NO_SECOND_DERIVATIVE_MSG.format(
                    cause="the gradient has no graph back to the parameters: a custom "
                    "autograd.Function or @once_differentiable backward, or a loss "
                    "linear in every parameter"
                )
            )
        try:
            hv = torch.autograd.grad(
                [g for g, _, _ in pairs],
                self.params,
                grad_outputs=[t for _, t, _ in pairs],
                retain_graph=True,
                allow_unused=True,
            )
        except RuntimeError as error:
            if is_missing_derivative(error):
                raise NoSecondDerivativeError(NO_SECOND_DERIVATIVE_MSG.format(cause=error)) from error
            raise
        return flatten(zeros_for_none(hv, self.params)).detach()

    def _forward_over_reverse(self, v: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, grad, jvp

        names = _parameter_names(self.module, self.params)
        closure = self.closure

        def loss_of(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return functional_call(_ClosureModule(self.module, closure), dict(zip(names, values)), ())

        if self.loss is None:  # validate once, eagerly: torch.func forbids .item()
            self.loss = checked_loss(closure).item()
        primals = tuple(p.detach() for p in self.params)
        tangents = tuple(unflatten(v, self.params))
        try:
            _, hv = jvp(grad(loss_of), (primals,), (tangents,))
        except RuntimeError as error:
            if is_missing_derivative(error):
                raise NoSecondDerivativeError(NO_SECOND_DERIVATIVE_MSG.format(cause=error)) from error
            raise
        return flatten(hv).detach()

    # -- finite differences --------------------------------------------------
    def _accumulate(self, out: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """``out += weight * g`` for the flat gradient ``g`` at the current parameters; returns the loss.

        Summed over the pieces when the probe is split; each parameter's
        gradient goes into ``out`` as it is formed
        (:func:`~curvwatch.operators._difference.accumulate_gradient`). The loss
        is a float64 CPU scalar.
        """
        slots = unflatten(out, self.params)
        loss = torch.zeros((), dtype=torch.float64)
        for closure, share in self.pieces if self.pieces is not None else [(self.closure, 1.0)]:
            piece = checked_loss(closure)
            accumulate_gradient(piece, self.params, slots, weight * share)
            loss += share * piece.detach().double().cpu()
        return loss

    def _ensure_base_gradient(self) -> None:
        if self.gradient is None:
            gradient = torch.zeros(self.size, dtype=self.dtype, device=self.device)
            loss = self._accumulate(gradient)
            self.gradient, self.loss = gradient, loss.item()

    def _finite_difference(self, v: torch.Tensor, preconditioner: torch.Tensor | None = None) -> torch.Tensor:
        vnorm = math.sqrt(scaled_squared_norm(v, preconditioner).item())
        if vnorm == 0.0:
            return torch.zeros_like(v)
        if self.scheme == "forward":
            self._ensure_base_gradient()
        h = self.step if self.step is not None else finite_difference_step(self.dtype, self._param_rms(), self.scheme)
        h *= self.step_scale
        with torch.enable_grad():
            return difference_product(
                self.params, v, h, vnorm, self._accumulate, self.scheme, self.gradient, preconditioner
            )

    def _param_rms(self) -> float:
        """``rms(theta)`` for the step, summed on the device with one synchronisation, once per operator.

        theta is the same for every product of this operator (the differences
        restore it bit-exactly; the cached gradient and graph assume it too).
        """
        if self._rms is None:
            squares = torch.zeros((), dtype=torch.float64, device=self.device)
            with torch.no_grad():
                for p in self.params:
                    squares += p.detach().double().pow(2).sum()
            self._rms = math.sqrt(squares.item() / self.size)
        return self._rms

    def _preconditioned_matvec(self, v: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
        if self.method != Method.FINITE_DIFFERENCE:
            return super()._preconditioned_matvec(v, diagonal)
        return self._finite_difference(v, diagonal)

    def gradient_at_theta(self, keep: bool = True) -> torch.Tensor:
        """The flat gradient at the current parameters (computed once, cached).

        ``keep=False``: not cached where the products do not hold it anyway
        (central differences), so it is freed with the caller's last reference.
        """
        if self.gradient is None:
            if self.method == Method.DOUBLE_BACKWARD:
                self._first_order_graph()
            elif not keep and self.scheme != "forward":
                gradient = torch.zeros(self.size, dtype=self.dtype, device=self.device)
                self.loss = self._accumulate(gradient).item()
                return gradient
            else:
                self._ensure_base_gradient()
        return self.gradient

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self.method == Method.DOUBLE_BACKWARD:
            return self._double_backward(v)
        if self.method == Method.FORWARD_OVER_REVERSE:
            return self._forward_over_reverse(v)
        return self._finite_difference(v)

    def release(self) -> None:
        """Free the cached first-order graph and gradient (end of a measurement)."""
        self._graph_grads = None


class _ClosureModule(torch.nn.Module):
    """Wraps ``closure`` so ``torch.func.functional_call`` can swap the parameters."""

    def __init__(self, module: torch.nn.Module, closure: Closure) -> None:
        super().__init__()
        self.inner = module
        self._closure = closure

    def forward(self) -> torch.Tensor:
        return self._closure().reshape(())


def _parameter_names(module: torch.nn.Module, params: list[torch.Tensor]) -> list[str]:
    by_id = {id(p): "inner." + name for name, p in module.named_parameters(remove_duplicate=False)}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise CurvatureError(
            f"parameters #{missing} do not belong to the given module; pass the "
            "module that owns every parameter"
        )
    return [by_id[id(p)] for p in params]
