"""Flat-vector helpers: parameter lists <-> one 1-D tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat 1-D tensor (row-major per tensor)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[offset : offset + n].view_as(t))
        offset += n
    return out


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (FSDP2 shard), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


SLICE = 1 << 24  # entries of P^{-1/2} formed at a time (64 MiB in float32)


def inverse_sqrt_scale_(v: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """``v <- P^{-1/2} v`` in place for the flat positive diagonal ``P``, :data:`SLICE` entries at a time.

    No vector of ``P^{-1/2}`` is formed: one slice of it at a time.
    """
    for a in range(0, v.shape[0], SLICE):
        v[a : a + SLICE].mul_(diagonal[a : a + SLICE].rsqrt())
    return v
