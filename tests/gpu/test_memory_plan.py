"""The memory plan comes from the monitor's own products, never from a peak it did not cause (CUDA only)."""

from __future__ import annotations

import pytest
import torch

import curvwatch as cw

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model_and_batch() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024), torch.nn.Tanh(),
        torch.nn.Linear(1024, 10),
    ).cuda()
    x, y = torch.randn(4096, 256, device="cuda"), torch.randint(0, 10, (4096,), device="cuda")
    return model, (x, y)


def _plan_after_one_measurement(model, batch):
    monitor = cw.CurvatureMonitor(
        model, batch, criterion=torch.nn.CrossEntropyLoss(), top_k=1, trace=False,
        budget=cw.Budget(max_hvps=8, overhead=None),
    )
    result = monitor.measure(0)
    return monitor.last_plan, result.method, monitor._gauge.forward_bytes


def test_a_foreign_peak_before_the_monitor_leaves_its_plan_and_method_unchanged():
    model, batch = _model_and_batch()
    plan, method, forward = _plan_after_one_measurement(model, batch)
    assert method == "double_backward" and plan.fits and forward > 0
    # something else in the process (an evaluation, a second model) peaks at 40% of what is free:
    # five times that (the old estimate from the allocator's lifetime peak) would not fit
    free, _ = torch.cuda.mem_get_info()
    foreign = torch.empty(int(0.4 * free), dtype=torch.uint8, device="cuda")
    del foreign
    again, method_again, forward_again = _plan_after_one_measurement(model, batch)
    assert method_again == method
    assert (again.basis_device, again.max_basis) == (plan.basis_device, plan.max_basis)
    assert forward_again == pytest.approx(forward, rel=0.05)


def test_the_estimate_is_learned_from_the_measurement():
    model, batch = _model_and_batch()
    monitor = cw.CurvatureMonitor(
        model, batch, criterion=torch.nn.CrossEntropyLoss(), top_k=1, trace=False,
        budget=cw.Budget(max_hvps=8, overhead=None),
    )
    monitor.measure(0)
    gauge = monitor._gauge
    assert gauge.forward_bytes > 0
    # what a double-backward product took, measured: within a factor of the forward's graph
    assert 0 < gauge.activations("double_backward") <= 8 * gauge.forward_bytes
