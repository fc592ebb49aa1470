r"""Triton kernel for the softmax cross-entropy logit HVP (CUDA only).

Imported lazily by :mod:`curvwatch.kernels` and only where ``triton`` imports.
One program per row ``i`` of ``(N, C)`` logits ``z`` and tangent ``u``:

1. pass 1 streams ``z_i`` and ``u_i`` once, in float32, keeping per-lane online
   statistics (Milakov & Gimelshein 2018): the running max ``m``, ``s = sum
   exp(z - m)`` and ``t = sum exp(z - m) u``, rescaled whenever ``m`` grows;
   the lanes are merged at the end, so ``<p_i, u_i> = t / s``;
2. pass 2 streams ``z_i`` and ``u_i`` again, last block first (the blocks read
   last in pass 1 are the likeliest to still sit in L2), and writes

   .. math:: out_i = w_i \, p_i \odot (u_i - \langle p_i, u_i \rangle).

Memory traffic: two reads of ``z`` and ``u`` and one write of ``out``; nothing
else is allocated. float32, float16 and bfloat16 inputs, float32 accumulation,
output in ``u``'s dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 2048}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=16),
    triton.Config({"BLOCK": 4096}, num_warps=16, num_stages=1),
    triton.Config({"BLOCK": 8192}, num_warps=16),
]


def _prune(configs, named_args, **kwargs):
    """Drop blocks wider than the row needs (a 37-class row tunes nothing)."""
    widest = max(1024, triton.next_power_of_2(int(named_args["C"])))
    return [c for c in configs if c.kwargs["BLOCK"] <= widest]


@triton.jit
def _ce_logit_hvp_kernel(
    z_ptr,
    u_ptr,
    w_ptr,
    out_ptr,
    C,
    stride_z,
    stride_u,
    stride_out,
    BLOCK: tl.constexpr,
    REVERSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    u_row = u_ptr + row * stride_u
    out_row = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK)

    # pass 1: per-lane online max, sum exp, sum exp * u. The running max starts
    # at a finite -3e38, not -inf, so exp(m - m_new) stays 0 or 1 (never NaN)
    # in lanes that have seen only masked (-inf) entries.
    m = tl.full([BLOCK], -3.0e38, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    t = tl.zeros([BLOCK], tl.float32)
    for start in range(0, C, BLOCK):
        cols = start + offs
        mask = cols < C
        z = tl.load(z_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        u = tl.load(u_row + cols, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, z)
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s = s * rescale + e
        t = t * rescale + e * u
        m = m_new
    m_row = tl.max(m, axis=0)
    lane = tl.exp(m - m_row)
    s_row = tl.sum(s * lane, axis=0)
    t_row = tl.sum(t * lane, axis=0)
    inv_s = 1.0 / s_row
    pu = t_row * inv_s
    w = tl.load(w_ptr + row).to(tl.float32)
    scale = w * inv_s

    # pass 2: out = w * p * (u - <p, u>), last block first when REVERSE
    num_blocks = tl.cdiv(C, BLOCK)
    for i in range(0, num_blocks):
        if REVERSE:
            cols = (num_blocks - 1 - i) * BLOCK + offs
        else:
            cols = i * BLOCK + offs
        mask = cols < C
        z = tl.load(z_row + cols, mask=mask, other=-float("inf"), eviction_policy="evict_first")
        u = tl.load(u_row + cols, mask=mask, other=0.0, eviction_policy="evict_first")
        p_w = tl.exp(z.to(tl.float32) - m_row) * scale
        out = p_w * (u.to(tl.float32) - pu)
        tl.store(out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


# Tuned once per (C, dtypes) on the GPU; the interpreter (TRITON_INTERPRET=1,
# for debugging on a CPU) cannot time configs, so it runs the plain kernel.
_ce_logit_hvp_tuned = triton.autotune(
    configs=_CONFIGS, key=["C"], prune_configs_by={"early_config_prune": _prune}
)(_ce_logit_hvp_kernel)


def logit_hvp_rows_triton(
    logits: torch.Tensor, tangent: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``w_i (p_i * u_i - p_i <p_i, u_i>)`` for ``(N, C)`` rows, by the Triton kernel.

    Args:
        logits: ``(N, C)`` float32/float16/bfloat16 on a CUDA device (or any
            device under ``TRITON_INTERPRET=1``).
        tangent: ``(N, C)``, same device.
        weights: ``(N,)`` per-row weights (cast to float32).

    Returns:
        ``(N, C)`` tensor in ``tangent``'s dtype; the only allocation.
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if tangent.stride(-1) != 1:
        tangent = tangent.contiguous()
    rows, classes = logits.shape
    out = torch.empty((rows, classes), dtype=tangent.dtype, device=tangent.device)
    if rows == 0 or classes == 0:
        return out
    w = weights.to(device=logits.device, dtype=torch.float32).contiguous()
    args = (logits, tangent, w, out, classes, logits.stride(0), tangent.stride(0), out.stride(0))
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        _ce_logit_hvp_kernel[(rows,)](*args, BLOCK=1024, REVERSE=True)
    else:
        _ce_logit_hvp_tuned[(rows,)](*args, REVERSE=True)
    return out
