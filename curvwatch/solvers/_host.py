"""Basis vectors kept on the host, in page-locked chunks, for a solve that runs on a GPU.

Page-locked (pinned) memory is what makes host-device copies fast and
asynchronous, but torch's caching host allocator rounds every block up to a
power of two: a 1.42 GB vector (355M parameters in float32) took a 2 GiB block,
a 6.2 GB one 8 GiB. Pageable memory of the exact size avoids that, at a
fraction of the copy speed: on an H200 a measurement at 355M with its basis in
pageable memory spent most of its time reading it back. So a host vector here is
a list of pinned chunks of :data:`HOST_CHUNK` entries (a power of two, so only
the last chunk is rounded up), read and written a chunk at a time.
"""

from __future__ import annotations

import torch

HOST_CHUNK = 1 << 25  # entries per page-locked chunk (128 MiB in float32)


class HostVector:
    """A flat vector of a CUDA solve, kept on the host in page-locked chunks of :data:`HOST_CHUNK` entries.

    Args:
        vector: the flat device vector to copy (asynchronously, on the current stream).
    """

    def __init__(self, vector: torch.Tensor) -> None:
        self.shape = vector.shape
        self.dtype = vector.dtype
        self.chunks: list[torch.Tensor] = []
        for a in range(0, vector.shape[0], HOST_CHUNK):
            part = vector[a : a + HOST_CHUNK]
            pinned = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
            self.chunks.append(pinned.copy_(part, non_blocking=True))

    def to(self, device: torch.device | str, non_blocking: bool = True) -> torch.Tensor:
        """The whole vector on ``device`` (a new tensor)."""
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        for a, chunk in zip(range(0, self.shape[0], HOST_CHUNK), self.chunks):
            out[a : a + chunk.shape[0]].copy_(chunk, non_blocking=non_blocking)
        return out

    def __getitem__(self, entries: slice) -> torch.Tensor:
        """Entries ``a:b`` (a view of the host memory) where they lie within one chunk."""
        a, b = entries.start, entries.stop
        first = a // HOST_CHUNK
        if (b - 1) // HOST_CHUNK != first:
            raise IndexError(f"entries {a}:{b} cross a chunk boundary ({HOST_CHUNK} entries per chunk)")
        return self.chunks[first][a - first * HOST_CHUNK : b - first * HOST_CHUNK]
