"""Leave it on: a share of training time, memory that does not grow, and a clean skip."""

import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import curvwatch as cw
import curvwatch.monitor
import curvwatch.planning.cost


class FakeClock:
    """``time.perf_counter`` under the test's control: training and products advance it."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(curvwatch.planning.cost.time, "perf_counter", fake)
    monkeypatch.setattr(curvwatch.monitor.time, "perf_counter", fake)
    return fake


def _model_with_forward_cost(clock, seconds_per_forward):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def tick(module, args, output):
        clock.now += seconds_per_forward

    model.register_forward_hook(tick)
    return model


def test_overhead_share_is_kept_by_deferring(clock):
    """Steps of 1 s, forwards of 0.1 s: measuring stays within 5% of training time."""
    model = _model_with_forward_cost(clock, 0.1)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = cw.CurvatureMonitor(
        model, (x, y), criterion=torch.nn.MSELoss(), every=1, top_k=1, trace=False, optimizer=opt,
        method="finite_difference", budget=cw.Budget(overhead=0.05, negligible_seconds=0.0),
    )
    measured = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 401):
            clock.now += 1.0 - 0.1  # the training step (its forward adds 0.1 s)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            result = monitor.maybe_measure(step)
            if result is not None:
                measured.append(result)
    first, later = measured[0], measured[1:]
    assert first.step == 1 and len(later) >= 3
    assert len(measured) < 100  # most due steps were deferred
    deferred = [w for w in caught if "deferred" in str(w.message)]
    assert len(deferred) == 1 and "Budget(overhead=0.05)" in str(deferred[0].message)
    # The first measurement (step 1, 0.03 s saved up) stops after one product: a
    # lower bound, no ratio, but it learns what a product costs. From then on,
    # measuring never runs ahead of 5% of the training time by more than the
    # product that crossed its deadline (two forwards and a loss here).
    assert first.hvps <= 2 and not first.converged and math.isnan(first.sharpness_ratio)  # + the difference check
    assert monitor._cost.measuring_seconds <= 0.05 * 400 + 0.3
    assert all(r.overhead <= 0.05 + 0.5 / r.step for r in measured)  # one product of up to 0.5 s over
    assert "curvature_diagnostics/overhead" in later[-1].scalars()
    assert all(r.converged for r in measured[-10:])  # warm starts: within the share, and exact
    assert all(math.isnan(r.sharpness_ratio) for r in measured if r.error_bound > 1e-2)


def test_overhead_none_measures_every_due_step(clock):
    model = _model_with_forward_cost(clock, 0.1)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), every=1, top_k=1,
                                  trace=False, budget=cw.Budget(overhead=None))
    for step in range(1, 6):
        clock.now += 1.0
        assert monitor.measure(step) is not None
    assert monitor.history[-1].overhead > 0.05  # measured, and the share says what it cost


def test_cost_state_is_checkpointed(clock):
    model = _model_with_forward_cost(clock, 0.1)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    kwargs = dict(criterion=torch.nn.MSELoss(), top_k=1, trace=False, budget=cw.Budget(negligible_seconds=0.0))
    monitor = cw.CurvatureMonitor(model, (x, y), **kwargs)
    clock.now += 100.0
    monitor.measure(10)
    fresh = cw.CurvatureMonitor(model, (x, y), **kwargs)
    fresh.load_state_dict(monitor.state_dict())
    assert fresh._cost.measuring_seconds == monitor._cost.measuring_seconds > 0
    assert fresh._cost.seconds_per_product == monitor._cost.seconds_per_product


def test_a_measurement_that_cannot_fit_skips_once_and_training_is_bit_identical():
    def train(with_monitor):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = torch.randn(64, 8), torch.randn(64, 1)
        monitor = None
        if with_monitor:
            monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), every=2,
                                          budget=cw.Budget(max_memory=1000, overhead=None))
            monitor.attach(opt)
        losses = []
        for _ in range(8):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()], monitor

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, params, monitor = train(True)
    plain_losses, plain_params, _ = train(False)
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(params, plain_params))
    assert monitor.history == []
    messages = [str(w.message) for w in caught if isinstance(w.message, cw.CurvatureWarning)]
    assert len(messages) == 1
    assert "needs about" in messages[0] and "is allowed" in messages[0] and "fix:" in messages[0]


def test_strict_raises_the_memory_message():
    model = torch.nn.Linear(4, 1)
    monitor = cw.CurvatureMonitor(model, (torch.randn(8, 4), torch.randn(8, 1)), criterion=torch.nn.MSELoss(),
                                  strict=True, budget=cw.Budget(max_memory=100))
    with pytest.raises(cw.CurvatureError, match="needs about .* GiB"):
        monitor.measure(1)


_PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch, curvwatch as cw
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024),
                                torch.nn.Tanh(), torch.nn.Linear(1024, 1))
    x, y = torch.randn(16, 512), torch.randn(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), top_k=1, trace=False,
                                  strict=True, budget=cw.Budget(max_hvps=int(sys.argv[1]), trace_hvps=0,
                                                                tol=1e-12, overhead=None))
    r = monitor.measure(1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = sum(p.numel() for p in model.parameters())
    print(r.hvps, n, (after - before) * 1024)
    """
)


@pytest.mark.slow
def test_measurement_memory_does_not_grow_with_products():
    """max_hvps=60 peaks no higher than max_hvps=15, and at most c * n * 4 bytes above the step."""
    peaks = {}
    for hvps in (15, 60):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(hvps)], capture_output=True, text=True,
                             check=True, timeout=300).stdout.split()
        spent, n, growth = int(out[0]), int(out[1]), float(out[2])
        assert spent == hvps or (hvps == 60 and spent >= 35)  # or an invariant subspace, found exactly
        peaks[hvps] = growth
    vector = 4 * n  # ~6 MB
    # a basis of 10, the graph's gradient, the product and Lanczos' working vectors,
    # and the allocator's slack: measured ~25 vectors; a growing basis would add 60
    assert peaks[60] <= 32 * vector, peaks
    assert peaks[60] - peaks[15] <= 6 * vector, peaks  # allocator noise; 45 more basis vectors would be 280 MB


def test_memory_plan_prefers_the_device_then_a_smaller_basis_then_the_host():
    """The plan on the numbers of a 1.56B-parameter model on a 140 GiB GPU (float32 vectors)."""
    from curvwatch.planning.memory import DEVICE_FILL, GIB, plan_memory

    n, cuda = 1_556_792_000, torch.device("cuda")

    def plan(allowed, activations=10 * GIB, host=120 * GIB):
        return plan_memory(n, torch.float32, cuda, 1, 10, "forward_difference", allowed * GIB,
                           activations, host_available=host)

    roomy = plan(200)
    assert roomy.fits and roomy.basis_device == "cuda" and roomy.max_basis == 10
    tighter = plan(100)  # 5 working vectors (29 GiB) + 10 GiB, then what fits of 90% of 100 GiB
    assert tighter.fits and tighter.basis_device == "cuda" and 3 <= tighter.max_basis < 10
    assert tighter.device_bytes <= DEVICE_FILL * 100 * GIB
    host = plan(55)  # the working set fits in 90% of 55 GiB, no basis of 3 beside it
    assert host.fits and host.basis_device == "cpu" and host.max_basis == 6
    assert host.host_bytes == 6 * 4 * n
    smallest = plan(55, host=40 * GIB)  # half of 40 GiB: the smallest basis, k + 2 vectors
    assert smallest.fits and smallest.basis_device == "cpu" and smallest.max_basis == 3
    none = plan(55, host=30 * GIB)  # half of 30 GiB: not even 3 vectors
    assert not none.fits and "needs about" in none.message and "fix:" in none.message


def test_a_measurement_asked_for_directly_is_not_held_to_the_share(clock):
    """No training has happened, so no share is saved up: measure() still measures fully."""
    model = _model_with_forward_cost(clock, 0.1)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), every=1, top_k=1, trace=False,
                                  budget=cw.Budget(overhead=0.05, negligible_seconds=0.0))
    direct = monitor.measure(1)
    assert direct.converged and monitor._cost.measuring_seconds > 0  # and its cost is on the account
    clock.now += 1.0
    assert monitor.maybe_measure(2) is None  # the schedule waits for the share to catch up


def test_the_plan_splits_the_probe_before_it_moves_the_basis_to_the_host():
    """355M on an H200 at Budget(memory_ratio=2.0): 15.92 GiB allowed, 11.9 GiB of float32 activations.

    With 2 pieces the basis only fits on the host (read at every product: 825 steps
    there, 2026-12-03); with 4 pieces a basis of 3 fits on the device: the plan takes that.
    """
    from curvwatch.planning.memory import DEVICE_FILL, GIB, WORKING_VECTORS, plan_with_pieces

    n, cuda = 354_298_880, torch.device("cuda")
    vector = 4 * n
    allowed, activations = 15.92 * GIB, 11.9 * GIB
    plan, pieces = plan_with_pieces(n, torch.float32, cuda, 1, 10, "forward_difference", allowed, activations,
                                    None, 4)
    assert plan.fits and plan.basis_device == "cuda" and pieces == 4
    assert plan.max_basis == int((DEVICE_FILL * allowed - WORKING_VECTORS["forward_difference"] * vector
                                  - activations / 4) // vector) >= 3
    # a single sequence cannot be split: then the host
    plan, pieces = plan_with_pieces(n, torch.float32, cuda, 1, 10, "forward_difference", allowed, activations,
                                    None, 1)
    assert pieces == 1 and not plan.fits  # 5 vectors + 11.9 GiB do not fit at all
    plan, pieces = plan_with_pieces(n, torch.float32, cuda, 1, 10, "forward_difference", allowed, activations / 2,
                                    None, 1)
    assert plan.fits and plan.basis_device == "cpu" and pieces == 1


def test_the_first_measurement_of_a_model_that_costs_milliseconds_is_made_in_full():
    """Scheduled at once, with no training time saved up: negligible_seconds covers it, not one product."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64)
    monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), every=1, top_k=1, trace=False,
                                  budget=cw.Budget(overhead=0.05))
    first = monitor.maybe_measure(1)
    assert first is not None and first.converged and first.hvps > 1
    assert "curvature/lambda_max" in first.scalars()


def test_the_share_is_a_contract_on_every_second_sinks_included(clock):
    """Steps of 1 s, forwards of 0.01 s, a sink that takes 0.2 s: measuring, sinks included,
    stays within 5% of training time plus the fixed allowance (and one measurement's overshoot)."""
    model = _model_with_forward_cost(clock, 0.01)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def slow_sink(result):
        clock.now += 0.2

    budget = cw.Budget(overhead=0.05, negligible_seconds=0.1)
    monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), every=10, top_k=1, trace=False,
                                  optimizer=opt, budget=budget, sinks=(slow_sink,))
    training = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, 301):
            clock.now += 1.0 - 0.01
            training += 1.0
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            monitor.maybe_measure(step)
    measured = monitor.history
    assert len(measured) >= 3
    # the sinks' 0.2 s each is charged: without it the account would read 0.2 s a measurement less
    assert monitor._cost.measuring_seconds >= sum(r.seconds for r in measured) + 0.2 * len(measured) - 1e-9
    worst_measurement = max(r.seconds for r in measured) + 0.2
    assert monitor._cost.measuring_seconds <= 0.05 * training + 0.1 + worst_measurement


def test_time_not_training_buys_no_measuring_time(clock):
    """Validation inside ``not_training()`` is out of the account: 10 steps of 1 s, 5 s of validation."""
    model = _model_with_forward_cost(clock, 0.0)
    x, y = torch.randn(8, 6), torch.randn(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), every=5, optimizer=opt,
                                  top_k=1, trace=False, budget=cw.Budget(overhead=0.05))
    for step in range(1, 11):
        clock.now += 1.0
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        monitor.maybe_measure(step)
        with monitor.not_training():
            clock.now += 0.5
    # counted at step 10's measurement: 10 steps, not the 4.5 s of validation before it
    assert monitor._cost.training_seconds == pytest.approx(10.0)
    assert [r.step for r in monitor.history] == [5, 10]


def test_a_product_and_the_rest_of_a_measurement_are_learned_apart():
    """The solves' own seconds per product, and the rest as a fixed part (checkpointed), for the plan."""
    from curvwatch.planning.cost import OverheadAccount, ProductMeter, affordable_products, seconds_allowed

    account = OverheadAccount(training_seconds=100.0)
    meter = ProductMeter(seconds=0.04, products=10)  # 4 ms a product inside the solves
    account.measured(0.10, 12, other_seconds=0.01, meter=meter)  # 12 products, 10 ms of line search
    assert account.seconds_per_product == pytest.approx(0.004)
    assert account.fixed_seconds == pytest.approx(0.10 - 0.01 - 12 * 0.004)
    fresh = OverheadAccount()
    fresh.load_state_dict(account.state_dict())
    assert fresh.fixed_seconds == account.fixed_seconds
    budget = cw.Budget(overhead=0.05, negligible_seconds=0.0)
    # 5 s of share saved up less 0.1 s spent: products beyond the fixed part
    assert affordable_products(budget, 2, 0.2, account.seconds_per_product, account.fixed_seconds) == int(
        (0.2 - account.fixed_seconds) / 0.004)
    # a warm k=1 solve needs the fixed part and gap_steps(1) + 1 = 5 products: 0.042 + 0.02 = 0.062 s
    account.measuring_seconds = 0.0
    account.training_seconds = 1.0  # 0.05 s saved up: deferred
    seconds, note = seconds_allowed(budget, account, 1, True, 7)
    assert seconds == 0.0 and note is not None and "needs about 0.062 s" in note[1]
    account.training_seconds = 2.0  # 0.1 s saved up: measured, with all of it
    assert seconds_allowed(budget, account, 1, True, 7) == (pytest.approx(0.1), None)


def test_the_optional_quantities_run_within_the_share_not_the_fixed_allowance(clock):
    """A measurement paid by the fixed allowance certifies its eigenvalue; trace, update and critical
    sharpness wait for the share proper (the old monitor spent the fixed allowance on them too)."""
    model = _model_with_forward_cost(clock, 0.0)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    kwargs = dict(criterion=torch.nn.MSELoss(), every=1, top_k=1, optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = cw.CurvatureMonitor(model, (x, y), budget=cw.Budget(overhead=0.05, negligible_seconds=10.0), **kwargs)
        fixed.maybe_measure(1)  # learns the costs
        second = fixed.maybe_measure(2)  # no training time has passed: no share saved up
        free = cw.CurvatureMonitor(model, (x, y), budget=cw.Budget(overhead=None), **kwargs)
        free.measure(1)
        unlimited = free.measure(2)
    assert second is not None and second.converged and math.isfinite(second.preconditioned_lambda_max)
    assert math.isnan(second.trace) and math.isnan(second.update_sharpness)
    assert math.isnan(second.critical_sharpness) and second.critical_sharpness_evals == 0
    assert math.isfinite(unlimited.trace) and math.isfinite(unlimited.update_sharpness)
    assert unlimited.critical_sharpness_evals > 0


def test_the_products_left_are_what_the_seconds_left_buy(clock):
    """Context.left: the allowance's products, fewer where the seconds left buy fewer (a solve that cannot
    finish is not begun); the optional quantities' within the share proper."""
    from curvwatch.measurement.context import Context, MeasurementState, Probe
    from curvwatch.options import MonitorOptions
    from curvwatch.planning import Allowance
    from curvwatch.planning.memory import MemoryPlan

    model = torch.nn.Linear(3, 1)
    plan = MemoryPlan(fits=True, basis_device="cpu", max_basis=10, device_bytes=0.0, host_bytes=0.0,
                      allowed_device_bytes=math.inf, message="")
    allowance = Allowance(products=50, seconds=0.35, plan=plan, extra_seconds=0.15, seconds_per_product=0.1)
    probe = Probe((torch.randn(4, 3), torch.randn(4, 1)), lambda m, b: ((m(b[0]) - b[1]) ** 2).mean())
    ctx = Context.start(MonitorOptions(), MeasurementState(), model, probe, 1, None, allowance)
    assert ctx.left() == 3 and ctx.extra_left() == 1
    clock.now += 0.2
    assert ctx.left() == 1 and ctx.extra_left() == 0 and ctx.extra_past() and not ctx.past()
    unknown = Allowance(products=50, seconds=0.35, plan=plan)
    assert Context.start(MonitorOptions(), MeasurementState(), model, probe, 1, None, unknown).left() == 50
