r"""The finite-difference Hessian-vector product, shared by the plain and the sharded operator.

.. math::

    H v \approx \frac{g(\theta + \epsilon v) - g(\theta - \epsilon v)}{2 \epsilon}
    \quad\text{(central)}, \qquad
    H v \approx \frac{g(\theta + \epsilon v) - g(\theta)}{\epsilon}
    \quad\text{(forward)}, \qquad \epsilon = h / \lVert v \rVert ,

with ``h`` the parameter-space step of
:func:`~curvwatch.operators.hessian.finite_difference_step`. The tensors are
perturbed in place and restored bit-exactly from a saved copy, whatever happens
in between.

Memory: one product holds the saved parameters and one output vector; both
gradients of a central difference are accumulated into that output (the second
with weight -1), and a gradient goes into it one parameter at a time
(:func:`accumulate_gradient`), so no flat copy of a whole gradient is made
beside it. ``preconditioner`` ``P`` shifts along ``P^{-1/2} v`` (``H P^{-1/2} v``
without a scaled copy of ``v``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from curvwatch._flat import SLICE, unflatten

# accumulate(out, weight): out += weight * (the flat gradient at the current tensors)
Accumulate = Callable[[torch.Tensor, float], None]

def accumulate_gradient(
    loss: torch.Tensor, params: Sequence[torch.Tensor], out: Sequence[torch.Tensor], weight: float
) -> None:
    """``out_i += weight * d loss / d params_i`` without holding the whole gradient at once.

    Each parameter's gradient is added to its slot by a hook as soon as autograd
    forms it, and the hook hands autograd a zero of stride 0 in its place, so
    the gradients of ``torch.autograd.grad`` never exist side by side: the
    extra memory is the largest parameter's gradient, not a parameter-sized
    vector. ``.grad`` is neither read nor written; hooks the user registered on
    the parameters run first, as in any backward.
    """

    def hook_for(slot: torch.Tensor):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            slot.add_(grad, alpha=weight)
            return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

        return hook

    handles = [p.register_hook(hook_for(slot)) for p, slot in zip(params, out)]
    try:
        torch.autograd.grad(loss, list(params), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()


def scaled_squared_norm(v: torch.Tensor, preconditioner: torch.Tensor | None) -> torch.Tensor:
    """``||P^{-1/2} v||^2`` as a float64 0-d tensor, a slice at a time (``P = 1`` for ``None``)."""
    if preconditioner is None:
        return torch.dot(v, v).double()
    squares = torch.zeros((), dtype=torch.float64, device=v.device)
    for a in range(0, v.shape[0], SLICE):
        scaled = preconditioner[a : a + SLICE].rsqrt().mul_(v[a : a + SLICE])
        squares += torch.dot(scaled, scaled).double()
    return squares


def difference_product(
    tensors: Sequence[torch.Tensor],
    v: torch.Tensor,
    step: float,
    vnorm: float,
    accumulate: Accumulate,
    scheme: str,
    gradient_at_theta: torch.Tensor | None = None,
    preconditioner: torch.Tensor | None = None,
) -> torch.Tensor:
    """``H P^{-1/2} v`` by differences of gradients with ``tensors`` shifted along ``P^{-1/2} v``.

    Args:
        tensors: the (local) parameter tensors that ``v`` is flat over.
        v: the flat direction.
        step: the parameter-space step ``h = |eps P^{-1/2} v|``.
        vnorm: ``||P^{-1/2} v||`` (all-reduced by the caller when ``v`` is a shard).
        accumulate: ``accumulate(out, w)`` adds ``w`` times the flat (local)
            gradient at the current ``tensors`` to ``out``.
        scheme: ``"central"`` or ``"forward"``.
        gradient_at_theta: the gradient at the unshifted tensors (``"forward"``).
        preconditioner: the flat positive diagonal ``P`` (``None``: the identity).
    """
    eps = step / vnorm
    with torch.no_grad():
        saved = [t.detach().clone() for t in tensors]
    out = torch.zeros_like(v)
    try:
        _shift(tensors, saved, v, eps, preconditioner)
        accumulate(out, 1.0)
        if scheme == "central":
            _shift(tensors, saved, v, -eps, preconditioner)
            accumulate(out, -1.0)
            return out.div_(2 * eps)
        return out.sub_(gradient_at_theta).div_(eps)
    finally:
        with torch.no_grad():
            for t, t0 in zip(tensors, saved):
                t.copy_(t0)


@torch.no_grad()
def _shift(
    tensors: Sequence[torch.Tensor],
    saved: Sequence[torch.Tensor],
    direction: torch.Tensor,
    scale: float,
    preconditioner: torch.Tensor | None,
) -> None:
    diagonals = [None] * len(saved) if preconditioner is None else unflatten(preconditioner, saved)
    for t, t0, d, p in zip(tensors, saved, unflatten(direction, saved), diagonals):
        if p is None:
            t.copy_(t0 + scale * d)
        else:
            torch.add(t0, p.rsqrt().mul_(d).mul_(scale), out=t)
