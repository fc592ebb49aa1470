"""torch.compile path for the softmax cross-entropy logit HVP.

The row form ``w_i p_i * (u_i - <p_i, u_i>)`` written as one function for
Inductor to fuse into a few passes over ``(N, C)``. Compiled on first use and
cached per process; a new ``N`` (the last chunk of the LM-head path) triggers
one dynamic-shape recompile, then no more.
"""

from __future__ import annotations

import torch

_compiled = None


def _logit_hvp_rows(logits: torch.Tensor, tangent: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    compute = torch.promote_types(torch.promote_types(logits.dtype, tangent.dtype), torch.float32)
    z = logits.to(compute)
    u = tangent.to(compute)
    e = torch.exp(z - z.amax(-1, keepdim=True))
    inv_s = 1.0 / e.sum(-1, keepdim=True)
    pu = (e * u).sum(-1, keepdim=True) * inv_s
    out = (e * (inv_s * weights.to(compute)[:, None])) * (u - pu)
    return out.to(tangent.dtype)


def logit_hvp_rows_compiled(
    logits: torch.Tensor, tangent: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``w_i (p_i * u_i - p_i <p_i, u_i>)`` for ``(N, C)`` rows, via torch.compile.

    Args:
        logits: ``(N, C)`` any float dtype.
        tangent: ``(N, C)``.
        weights: ``(N,)`` per-row weights.

    Returns:
        ``(N, C)`` tensor in ``tangent``'s dtype (float32 accumulation, float64
        for float64 inputs).
    """
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_logit_hvp_rows, fullgraph=True)
    return _compiled(logits, tangent, weights)
