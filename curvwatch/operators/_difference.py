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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from curvwatch._flat import unflatten


def difference_product(
    tensors: Sequence[torch.Tensor],
    v: torch.Tensor,
    step: float,
    vnorm: float,
    gradient: Callable[[], torch.Tensor],
    scheme: str,
    gradient_at_theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """``H v`` by differences of ``gradient()`` with ``tensors`` shifted along ``v``.

    Args:
        tensors: the (local) parameter tensors that ``v`` is flat over.
        v: the flat direction.
        step: the parameter-space step ``h = |eps v|``.
        vnorm: ``||v||`` (all-reduced by the caller when ``v`` is a shard).
        gradient: the flat (local) gradient at the current ``tensors``.
        scheme: ``"central"`` or ``"forward"``.
        gradient_at_theta: the gradient at the unshifted tensors (``"forward"``).
    """
    eps = step / vnorm
    with torch.no_grad():
        saved = [t.detach().clone() for t in tensors]
    try:
        _shift(tensors, saved, v, eps)
        g_plus = gradient()
        if scheme == "central":
            _shift(tensors, saved, v, -eps)
            return g_plus.sub_(gradient()).div_(2 * eps)
        return g_plus.sub_(gradient_at_theta).div_(eps)
    finally:
        with torch.no_grad():
            for t, t0 in zip(tensors, saved):
                t.copy_(t0)


@torch.no_grad()
def _shift(
    tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor], direction: torch.Tensor, scale: float
) -> None:
    for t, t0, d in zip(tensors, saved, unflatten(direction, saved)):
        t.copy_(t0 + scale * d)
