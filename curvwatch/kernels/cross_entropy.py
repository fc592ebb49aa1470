r"""Softmax cross-entropy Hessian with respect to the logits, applied to a tangent.

For logits ``z`` of shape ``(N, C)`` and ``p = softmax(z)``, the Hessian of the
mean cross-entropy ``L = 1/N_valid sum_i CE(z_i, y_i)`` with respect to ``z_i`` is

.. math::

    \nabla^2_{z_i} L = \frac{1}{N_\text{valid}} \left(\operatorname{diag}(p_i) - p_i p_i^\top\right),

independent of the target ``y_i`` except that rows with ``y_i == ignore_index``
contribute nothing. Applied to a tangent ``u_i``:
``(p_i * u_i - p_i <p_i, u_i>) / N_valid``, O(N C) memory and no C x C matrix.
"""

from __future__ import annotations

import torch


def cross_entropy_logit_hvp_eager(
    logits: torch.Tensor,
    tangent: torch.Tensor,
    targets: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Return ``H_z u`` for the mean softmax cross-entropy (eager reference).

    Args:
        logits: ``(..., C)`` logits, any float dtype (accumulated in float32 or
            higher).
        tangent: ``(..., C)`` tangent ``u``, same shape as ``logits``.
        targets: ``(...)`` class indices; rows equal to ``ignore_index`` are
            masked and excluded from the mean. ``None``: every row counts.
        ignore_index: the masked target value.

    Returns:
        ``(..., C)`` tensor in ``tangent``'s dtype.
    """
    compute = torch.promote_types(logits.dtype, torch.float32)
    z = logits.reshape(-1, logits.shape[-1]).to(compute)
    u = tangent.reshape(-1, tangent.shape[-1]).to(compute)
    p = torch.softmax(z, dim=-1)
    out = p * u - p * (p * u).sum(-1, keepdim=True)
    if targets is None:
        count = z.shape[0]
    else:
        valid = (targets.reshape(-1) != ignore_index).to(compute)
        count = valid.sum().clamp_min(1)
        out = out * valid[:, None]
    return (out / count).to(tangent.dtype).reshape(tangent.shape)


def mean_row_weights(
    targets: torch.Tensor | None,
    rows: int,
    ignore_index: int = -100,
    device: torch.device | str | None = None,
    count: torch.Tensor | int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-row weights ``w_i`` of the mean cross-entropy: ``valid_i / N_valid``.

    Every fused path computes ``w_i (p_i * u_i - p_i <p_i, u_i>)``, so the ignore
    mask and the mean reduction are one ``(N,)`` float32 vector, built on the
    device without a host synchronization.

    Args:
        targets: ``(N,)`` class indices or ``None`` (every row counts).
        rows: ``N``.
        ignore_index: the masked target value.
        device: where the weights live (default: ``targets``' device, else CPU).
        count: the mean's denominator when the rows are a chunk of a larger
            batch (default: the valid rows among these ``N``, at least 1).
        dtype: of the weights (float32 for the fused kernels, float64 for a
            float64 reference).

    Returns:
        ``(N,)`` tensor of ``dtype``.
    """
    if targets is None:
        valid = torch.ones(rows, dtype=dtype, device=device)
    else:
        valid = (targets.reshape(-1) != ignore_index).to(
            device=targets.device if device is None else device, dtype=dtype
        )
    if count is None:
        denom = valid.sum()
    else:
        denom = torch.as_tensor(count, dtype=dtype, device=valid.device)
    return valid / denom.clamp_min(1)


def logit_hvp_rows_eager(
    logits: torch.Tensor, tangent: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``w_i (p_i * u_i - p_i <p_i, u_i>)`` row by row, in eager PyTorch.

    The row form shared by every backend: ``logits`` and ``tangent`` are
    ``(N, C)``, ``weights`` is ``(N,)`` (see :func:`mean_row_weights`).
    Accumulates in float32 (or float64 for float64 inputs); returns
    ``tangent``'s dtype.
    """
    compute = torch.promote_types(torch.promote_types(logits.dtype, tangent.dtype), torch.float32)
    z = logits.to(compute)
    u = tangent.to(compute)
    p = torch.softmax(z, dim=-1)
    pu = (p * u).sum(-1, keepdim=True)
    out = p * (u - pu) * weights.to(compute)[:, None]
    return out.to(tangent.dtype)
