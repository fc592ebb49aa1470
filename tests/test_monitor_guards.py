"""Bad schedules and late checks: refused at construction, never a crash in training."""

import math
import warnings

import pytest
import torch

import curvwatch as cw


def _setup(**kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    kwargs.setdefault("budget", cw.Budget(overhead=None))
    return model, x, y, cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), **kwargs)


def _train(model, x, y, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_attach_twice_counts_each_step_once():
    model, x, y, monitor = _setup(every=1, top_k=1, trace=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first = monitor.attach(opt)
    assert monitor.attach(opt) is first
    _train(model, x, y, opt, 4)
    assert [r.step for r in monitor.history] == [1, 2, 3, 4]
    other = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(cw.CurvatureError, match="already attached"):
        monitor.attach(other)
    first.remove()
    monitor.attach(other)  # after remove(), a new optimizer is fine


def test_on_threshold_that_raises_is_a_warning_not_a_crash():
    def broken(result):
        raise RuntimeError("user callback bug")

    model, x, y, monitor = _setup(every=1, top_k=1, trace=False, on_threshold=broken)
    opt = torch.optim.SGD(model.parameters(), lr=100.0)  # threshold 0.02: crossed at once
    monitor.optimizer = opt
    monitor.attach(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, x, y, opt, 2)  # the post-step hook must not raise out of opt.step()
    assert any("on_threshold failed" in str(w.message) for w in caught)
    assert monitor.history and monitor.history[0].sharpness_ratio > 1

    model, x, y, strict = _setup(every=1, top_k=1, trace=False, on_threshold=broken, strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=100.0)
    strict.optimizer = opt
    with pytest.raises(RuntimeError, match="user callback bug"):
        strict.measure(1)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_spectrum_every_must_be_a_count(bad):
    with pytest.raises(cw.CurvatureError, match="spectrum_every"):
        _setup(spectrum_every=bad)


def test_param_group_out_of_range_is_refused_at_construction():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(cw.CurvatureError, match="param_group=3 but the optimizer has 1 parameter group"):
        cw.CurvatureMonitor(model, (torch.randn(8, 4), torch.randn(8, 1)), criterion=torch.nn.MSELoss(),
                            optimizer=opt, param_group=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_basis_without_cuda_is_refused_at_construction():
    with pytest.raises(cw.CurvatureError, match="CUDA is not available"):
        _setup(basis_device="cuda")


def test_top_k_above_the_parameter_count_names_the_count():
    model = torch.nn.Linear(2, 1)  # 3 parameters
    with pytest.raises(cw.CurvatureError, match=r"top_k=5 exceeds the number of trainable parameters \(3\)"):
        cw.CurvatureMonitor(model, (torch.randn(8, 2), torch.randn(8, 1)), criterion=torch.nn.MSELoss(), top_k=5)


def test_an_unconverged_sharpness_is_not_logged_as_a_ratio():
    """Out of time after 2 products: the Ritz value is a lower bound, so no ratio, no crossing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    x, y = torch.randn(128, 20), torch.randn(128, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e4)  # threshold far below the sharpness
    crossings = []
    monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), optimizer=opt, top_k=1,
                                  trace=False, on_threshold=crossings.append,
                                  budget=cw.Budget(max_hvps=2, trace_hvps=0, overhead=None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = monitor.measure(1)
    assert not r.converged and r.error_bound > 1e-2
    assert math.isfinite(r.lambda_max) and math.isfinite(r.threshold)
    assert math.isnan(r.sharpness_ratio) and "curvature/sharpness_ratio" not in r.scalars()
    assert crossings == []
    assert any("lower bound" in str(w.message) for w in caught)
    full = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), optimizer=opt, top_k=1,
                               trace=False, budget=cw.Budget(overhead=None)).measure(1)
    assert full.converged and full.sharpness_ratio > 1 and r.lambda_max <= full.lambda_max * (1 + 1e-6)


def test_the_measurement_is_a_pure_function_of_config_state_and_model():
    """measure(config, state, ...) twice from the same state gives the same result and state."""
    from curvwatch.measurement import Allowance, measure
    from curvwatch.planning import MemoryPlan

    model, x, y, monitor = _setup(top_k=2, trace=True, optimizer=None)
    monitor.measure(1)
    config, state, probe = monitor._config(), monitor._state, monitor._probe()
    plan = MemoryPlan(True, "cpu", 10, 0.0, 0.0, 1e12, "")
    allowance = Allowance(products=60, seconds=None, plan=plan)
    a, state_a, _ = measure(config, state, model, probe, 2, None, allowance)
    b, state_b, _ = measure(config, state, model, probe, 2, None, allowance)
    assert (a.eigenvalues, a.trace, a.hvps) == (b.eigenvalues, b.trace, b.hvps)
    assert torch.equal(state_a.warm, state_b.warm) and state_a.measurements == state.measurements + 1
    assert state.measurements == 1  # the state passed in is left alone


def test_a_restored_monitor_continues_exactly_like_the_original():
    """state_dict is the whole state: warm starts, method, crossings and the time account."""
    model, x, y, monitor = _setup(top_k=1, trace=False)
    opt = torch.optim.SGD(model.parameters(), lr=100.0)  # crossed at once
    monitor.optimizer = opt
    crossings = []
    monitor.on_threshold = crossings.append
    monitor.measure(1)
    # the sharpness and the critical sharpness along the next update (SGD: the gradient) cross at once
    assert sorted(e.quantity for e in crossings) == ["critical_sharpness_ratio", "sharpness_ratio"]
    state = monitor.state_dict()
    assert state["above"] is True and state["crossed_before"] is True and state["method"] == "double_backward"
    _, _, _, fresh = _setup(top_k=1, trace=False)
    fresh.optimizer, fresh.on_threshold = opt, crossings.append
    fresh.load_state_dict(state)
    again, original = fresh.measure(2), monitor.measure(2)
    assert again.eigenvalues == original.eigenvalues and again.hvps == original.hvps
    assert len(crossings) == 2  # still above: no second crossing of either after the restore
