"""What a measurement holds, counted tensor by tensor: the working vectors of the memory plan.

:class:`LiveBytes` sees every tensor an aten operator returns while it is active
(autograd's included) and frees its bytes when the last tensor on that storage
dies, so its peak is exactly the most bytes that the measured code held at
once, on the CPU, deterministically (no allocator caching, no RSS noise).
Storages that existed before (the parameters, the optimizer state, the vector
passed in) are not counted. The tests divide by one parameter-sized vector.
"""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import curvwatch as cw
from curvwatch.planning.memory import WORKING_VECTORS


class LiveBytes(TorchDispatchMode):
    """Bytes of the CPU storages created under this mode and still alive; ``peak`` is their maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[int, int] = {}  # storage pointer -> tensors alive on it
        self.nbytes: dict[int, int] = {}
        self.live = self.peak = 0

    def _release(self, key: int) -> None:
        self.tensors[key] -= 1
        if self.tensors[key] == 0:
            self.live -= self.nbytes.pop(key)
            del self.tensors[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or (key in inputs and key not in self.tensors):  # a view of an older storage
                continue
            if key not in self.tensors:
                self.tensors[key], self.nbytes[key] = 0, storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.tensors[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def _deep_mlp(width: int = 256, depth: int = 32):
    """Many equal layers: no one parameter is a large share of the vector (as in a transformer)."""
    torch.manual_seed(0)
    layers = [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()) for _ in range(depth)]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    x, y = torch.randn(2, width), torch.randint(0, 10, (2,))
    return model, x, y


def _vector_bytes(model) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_a_preconditioned_difference_holds_two_vectors(scheme):
    """``P^{-1/2} H P^{-1/2} v`` by differences: the saved parameters and the output, nothing more.

    Before 2026-12-03 the same product held 4 (forward) and 5 (central) vectors:
    the scaled copy of ``v``, a flat copy of each gradient beside its
    per-parameter tensors, and the second gradient of a central difference.
    """
    model, x, y = _deep_mlp()
    params = list(model.parameters())
    op = cw.HessianOperator(lambda: torch.nn.functional.cross_entropy(model(x), y), params,
                            method="finite_difference", scheme=scheme)
    n = op.size
    diagonal = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.5
    pre = cw.PreconditionedOperator(op, diagonal)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2))
    expected = pre.matvec(v)  # the forward scheme's cached gradient is formed here
    tracker = LiveBytes()
    with tracker:
        got = pre.matvec(v)
    assert torch.equal(got, expected)
    vectors = tracker.peak / _vector_bytes(model)
    assert 1.9 < vectors < 2.2, vectors


def test_the_difference_matches_the_scaled_copy_it_replaced():
    """Shifting along ``P^{-1/2} v`` inside the difference equals differencing along a scaled copy."""
    model, x, y = _deep_mlp(width=32, depth=4)
    params = list(model.parameters())
    op = cw.HessianOperator(lambda: torch.nn.functional.cross_entropy(model(x), y), params,
                            method="finite_difference", scheme="central")
    diagonal = torch.rand(op.size, generator=torch.Generator().manual_seed(1)) + 0.5
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(2))
    fused = cw.PreconditionedOperator(op, diagonal).matvec(v)
    copied = op.matvec(v * diagonal.rsqrt()) * diagonal.rsqrt()
    torch.testing.assert_close(fused, copied, rtol=1e-4, atol=1e-6)
    exact = cw.HessianOperator(lambda: torch.nn.functional.cross_entropy(model(x), y), params)
    reference = exact.matvec(v * diagonal.rsqrt()) * diagonal.rsqrt()
    assert (fused - reference).norm() <= 2e-3 * reference.norm()


@pytest.mark.parametrize("method", ["forward_difference", "finite_difference"])
def test_a_measurement_holds_its_basis_and_the_planned_working_vectors(method):
    """An AdamW threshold measurement by differences holds at most ``basis + WORKING_VECTORS`` vectors.

    The memory plan reserves ``WORKING_VECTORS[method]`` besides the basis; this
    is the count it rests on. (On the CPU the warm start is the Ritz vector
    itself, where on a GPU it waits on the host: one vector of the count; and the
    preconditioned solve's kept warm start carries its guard column beside it,
    which on a GPU waits on the host too: one vector more here.)
    """
    model, x, y = _deep_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    basis = 4
    monitor = cw.CurvatureMonitor(
        model, (x, y), optimizer=opt, criterion=torch.nn.CrossEntropyLoss(), method=method, top_k=1,
        trace=False, budget=cw.Budget(overhead=None, max_basis=basis, max_hvps=30),
    )
    tracker = LiveBytes()
    with tracker, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # this state is far past 38/lr: a crossing warning
        result = monitor.measure(0)
    assert result is not None and result.hvps >= 20
    vectors = tracker.peak / _vector_bytes(model)
    assert vectors <= basis + WORKING_VECTORS[method] + 1 + 0.5, vectors
