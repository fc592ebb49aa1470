r"""Logit-space curvature kernels (softmax cross-entropy), with a backend dispatcher.

The product of the mean softmax cross-entropy's logit Hessian with a tangent,

.. math::

    (H_z u)_i = w_i \left(p_i \odot u_i - p_i \langle p_i, u_i \rangle\right),
    \qquad w_i = [y_i \ne \text{ignore\_index}] / N_\text{valid},

has three implementations that compute the same function:

* ``"triton"``: a fused two-pass Triton kernel (CUDA), allocating only its output;
* ``"compile"``: the same math through ``torch.compile`` (any device);
* ``"eager"``: the plain PyTorch reference
  (:func:`curvwatch.kernels.cross_entropy.cross_entropy_logit_hvp_eager`).

``backend="auto"`` picks ``"triton"`` for float32/float16/bfloat16 CUDA tensors
when ``triton`` imports, else ``"eager"``; also ``"eager"`` whenever autograd
must see through the product (the fused paths are not differentiable). The
environment variable ``CURVWATCH_CE_BACKEND`` (``triton``, ``compile`` or
``eager``) forces a path wherever ``"auto"`` is asked for, e.g. inside
:class:`~curvwatch.operators.GGNOperator`.

The dispatcher lives in :mod:`curvwatch.kernels.dispatch`. This package is a
leaf: it imports no operator. The chunked LM-head GGN operator that never holds
the ``(tokens, vocab)`` logits is :mod:`curvwatch.operators.lm_head`.
"""

from curvwatch.kernels.cross_entropy import (
    cross_entropy_logit_hvp_eager,
    logit_hvp_rows_eager,
    mean_row_weights,
)
from curvwatch.kernels.dispatch import (
    BACKENDS,
    cross_entropy_logit_hvp,
    logit_hvp_rows,
    select_backend,
    triton_available,
)

__all__ = [
    # the dispatcher
    "BACKENDS",
    "cross_entropy_logit_hvp",
    "logit_hvp_rows",
    "select_backend",
    "triton_available",
    # the eager reference and its parts
    "cross_entropy_logit_hvp_eager",
    "logit_hvp_rows_eager",
    "mean_row_weights",
]
