"""A basis on the host, in page-locked chunks, gives the device basis's eigenvalues (CUDA only)."""

from __future__ import annotations

import pytest
import torch

import curvwatch as cw
import curvwatch.solvers._host as host

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_a_host_basis_in_chunks_matches_the_device_basis(monkeypatch):
    """Chunks of 4,096 entries, a vector of 10,000 (the last chunk partial), restarts every 4 products."""
    monkeypatch.setattr(host, "HOST_CHUNK", 1 << 12)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(10_000, 40, generator=g, dtype=torch.float64))
    spectrum = torch.linspace(1, 2, 40, dtype=torch.float64)
    spectrum[-3:] = torch.tensor([5.0, 7.0, 10.0], dtype=torch.float64)
    matrix = ((q * spectrum) @ q.T).cuda()
    op = cw.DenseOperator(matrix)
    on_device = cw.lanczos(op, k=2, tol=1e-8, max_matvecs=40, max_basis=4, seed=3)
    on_host = cw.lanczos(op, k=2, tol=1e-8, max_matvecs=40, max_basis=4, seed=3, basis_device="cpu")
    torch.testing.assert_close(on_host.eigenvalues, torch.tensor([10.0, 7.0], dtype=torch.float64), rtol=1e-7, atol=0)
    torch.testing.assert_close(on_host.eigenvalues, on_device.eigenvalues, rtol=1e-10, atol=0)
    assert on_host.matvecs == on_device.matvecs and on_host.converged


def test_host_vector_round_trip_and_slices(monkeypatch):
    monkeypatch.setattr(host, "HOST_CHUNK", 1 << 10)
    v = torch.randn(3_000, device="cuda")
    kept = host.HostVector(v)
    assert len(kept.chunks) == 3 and all(c.is_pinned() for c in kept.chunks)
    assert torch.equal(kept.to("cuda"), v)
    assert torch.equal(kept[1024:2048].cuda(), v[1024:2048])
    with pytest.raises(IndexError, match="cross a chunk"):
        kept[1000:1100]
