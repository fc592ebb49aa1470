"""Early warnings along the update: update sharpness, critical sharpness, their crossings, on a quadratic."""

import logging
import math
import re
import warnings

import pytest
import torch

import curvwatch as cw
from curvwatch.results import ThresholdEvent
from tests._helpers import curves
from tests.cases import OnceDifferentiableCube, assert_same_training, train_bn_dropout

torch.set_num_threads(1)

N = 10


class Quadratic(torch.nn.Module):
    """``L(theta) = 1/2 theta^T A theta - b^T theta`` (the batch is ignored): H = A everywhere."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(theta.clone())
        self.register_buffer("A", A)
        self.register_buffer("b", b)

    def forward(self, _batch=None) -> torch.Tensor:
        return 0.5 * self.theta @ self.A @ self.theta - self.b @ self.theta


def quadratic(seed: int = 0) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(0.5, 4.0, N, dtype=torch.float64)) @ q.T
    b = torch.randn(N, generator=g, dtype=torch.float64)
    return Quadratic(A, b, torch.randn(N, generator=g, dtype=torch.float64))


def loss_fn(model, batch):
    return model(batch)


def monitor_for(model, optimizer=None, **kwargs) -> cw.CurvatureMonitor:
    kwargs = {"top_k": 1, "trace": False, "budget": cw.Budget(max_hvps=40, trace_hvps=0, tol=1e-10, overhead=None),
              **kwargs}
    return cw.CurvatureMonitor(model, torch.zeros(1), loss_fn=loss_fn, optimizer=optimizer, **kwargs)


def step(model, opt) -> torch.Tensor:
    """One training step; returns ``u = (theta_{t-1} - theta_t) / lr`` (the update taken)."""
    before = model.theta.detach().clone()
    opt.zero_grad()
    model().backward()
    opt.step()
    return (before - model.theta.detach()) / opt.param_groups[0]["lr"]


def rayleigh(A, u, P=None):
    return (u @ A @ u / (u @ u if P is None else u @ (P * u))).item()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_update_sharpness_is_the_curvature_along_the_last_update(momentum):
    model = quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    for _ in range(3):
        u = step(model, opt)
    monitor = monitor_for(model, opt, strict=True)
    r = monitor.measure(3)
    A = model.A
    assert r.update_sharpness == pytest.approx(rayleigh(A, u), rel=1e-10)
    assert r.update_sharpness_ratio == pytest.approx(r.update_sharpness / r.threshold, rel=1e-12)
    assert r.threshold == pytest.approx((2 + 2 * momentum) / 0.1)  # the sharpness's threshold
    assert r.update_sharpness <= r.lambda_max * (1 + 1e-9)  # a Rayleigh quotient
    # measured first, within the budget: one product more than the sharpness alone
    alone = monitor_for(model, opt, strict=True, update_sharpness=False, critical_sharpness=False).measure(3)
    assert math.isnan(alone.update_sharpness) and math.isnan(alone.critical_sharpness)
    assert alone.critical_sharpness_evals == 0
    assert r.hvps == alone.hvps + 1
    assert r.lambda_max == pytest.approx(alone.lambda_max, rel=1e-9)


def test_adam_update_sharpness_is_preconditioned_and_read_against_38_over_lr():
    model = quadratic()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(4):
        u = step(model, opt)
    state = opt.state[model.theta]
    t = state["step"].item()
    P = state["exp_avg_sq"].sqrt() / math.sqrt(1 - 0.999**t) + 1e-8
    r = monitor_for(model, opt, strict=True).measure(4)
    assert r.update_sharpness == pytest.approx(rayleigh(model.A, u, P), rel=1e-8)
    assert r.threshold == pytest.approx(38 / 0.05)
    assert r.update_sharpness_ratio == pytest.approx(r.update_sharpness / r.threshold, rel=1e-12)
    assert r.update_sharpness <= r.preconditioned_lambda_max * (1 + 1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_critical_sharpness_is_the_curvature_along_the_next_update(momentum):
    """On a quadratic, lambda_c = u^T A u / (g^T u): u the step SGD would take now from the gradient g.

    Plain SGD: u = g, so lambda_c = g^T A g / |g|^2, the update sharpness of the
    step about to be taken. Heavy ball: u = beta b + g with the state's buffer b.
    """
    model = quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum)
    for _ in range(3):
        step(model, opt)
    monitor = monitor_for(model, opt, strict=True)
    r = monitor.measure(3)
    A, theta = model.A, model.theta.detach()
    g = A @ theta - model.b
    u = g if momentum == 0 else momentum * opt.state[model.theta]["momentum_buffer"] + g
    assert r.critical_sharpness == pytest.approx((u @ A @ u / (g @ u)).item(), rel=1e-2)
    assert r.critical_sharpness_ratio == pytest.approx(r.critical_sharpness * 0.3 / 2, rel=1e-12)
    assert 0 < r.critical_sharpness_evals <= 11
    if momentum == 0:
        assert r.critical_sharpness == pytest.approx(rayleigh(A, g), rel=1e-2)


def test_critical_sharpness_needs_no_second_derivative():
    """A model without a double backward: method='auto' falls back to differences, the line search still runs."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(3, 4).double(), torch.nn.Linear(4, 1).double()
    model = torch.nn.ModuleList([lin1, lin2])
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)

    def loss(m, batch):
        return torch.nn.functional.mse_loss(m[1](OnceDifferentiableCube.apply(m[0](batch[0]))), batch[1])

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        loss(model, (x, y)).backward()
        opt.step()
    monitor = cw.CurvatureMonitor(model, (x, y), loss_fn=loss, optimizer=opt, top_k=1, trace=False,
                                  budget=cw.Budget(overhead=None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = monitor.measure(2)
    assert r.method == "finite_difference"
    assert math.isfinite(r.critical_sharpness) and r.critical_sharpness_evals > 0
    assert math.isfinite(r.update_sharpness)


def test_tensorboard_has_the_new_tags(tmp_path):
    model = quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    monitor = monitor_for(model, opt, every=2, sinks=[cw.TensorBoardSink(str(tmp_path))])
    monitor.attach(opt)
    for _ in range(6):
        step(model, opt)
    monitor.sinks[0].close()
    logged = curves(tmp_path)
    last = monitor.history[-1]
    for name in ("update_sharpness", "update_sharpness_ratio", "critical_sharpness", "critical_sharpness_ratio"):
        assert sorted(logged["curvature/" + name]) == [2, 4, 6], name
        assert logged["curvature/" + name][6] == pytest.approx(getattr(last, name), rel=1e-6), name
        assert "curvature_diagnostics/" + name not in logged
    evals = logged["curvature_diagnostics/critical_sharpness_evals"]
    assert evals[6] == last.critical_sharpness_evals > 0
    assert "curvature/critical_sharpness_evals" not in logged


def test_unbracketed_critical_sharpness_is_nan_with_one_note():
    """Along an ascent direction every step raises the loss: no bracket, NaN, a note."""
    model = quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, maximize=True)
    step(model, opt)
    monitor = monitor_for(model, opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = monitor.measure(1)
        monitor.measure(2)
    assert math.isnan(r.critical_sharpness) and math.isnan(r.critical_sharpness_ratio)
    assert r.critical_sharpness_evals == 11
    assert "curvature/critical_sharpness" not in r.scalars()
    assert "curvature_diagnostics/critical_sharpness_evals" in r.scalars()
    assert sum("found no bracket" in str(w.message) for w in caught) == 1


def test_no_optimizer_or_unknown_optimizer_skips_silently():
    model = quadratic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = monitor_for(model).measure(0)
    assert math.isnan(r.update_sharpness) and math.isnan(r.critical_sharpness)
    assert not any("update" in str(w.message) or "critical" in str(w.message) for w in caught)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)  # no known update direction
    step(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = monitor_for(model, opt).measure(1)
    assert math.isnan(r.update_sharpness) and r.critical_sharpness_evals == 0


def test_bad_flags_raise():
    with pytest.raises(cw.CurvatureError, match="update_sharpness must be True or False"):
        monitor_for(quadratic(), update_sharpness=1)
    with pytest.raises(cw.CurvatureError, match="critical_sharpness must be True or False"):
        monitor_for(quadratic(), critical_sharpness="yes")


# -- the early warning ------------------------------------------------------------------------------
def test_early_warning_fires_once_with_the_stable_lr_and_calls_on_threshold(caplog):
    caplog.set_level(logging.INFO, logger="curvwatch")
    model = quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    model().backward()  # plain SGD's u is .grad: the same u at every lr below
    A, g = model.A, model.theta.grad.detach().clone()
    kappa = rayleigh(A, g)  # both ratios are kappa lr / 2 here; the sharpness's is lambda_max lr / 2
    events = []
    monitor = monitor_for(model, opt, on_threshold=events.append)
    factors = [0.5, 1.0, 3.0, 3.5, 1.0, 3.0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, factor in enumerate(factors, start=1):
            opt.param_groups[0]["lr"] = factor / kappa
            monitor.measure(i)
    early = [e for e in events if e.quantity != "sharpness_ratio"]
    assert [(e.step, e.quantity) for e in early] == [
        (3, "update_sharpness_ratio"), (3, "critical_sharpness_ratio"),
        (6, "update_sharpness_ratio"), (6, "critical_sharpness_ratio"),
    ]
    for e in early:
        assert isinstance(e, ThresholdEvent) and isinstance(e, cw.CurvatureResult)
        assert e.ratio == getattr(e, e.quantity) >= 1
        assert e.ratio == pytest.approx(1.5, rel=1e-2)
        assert e.stable_lr == pytest.approx(e.lr / e.ratio, rel=1e-12)
        assert e.stable_lr == pytest.approx(2 / kappa, rel=1e-2)  # the lr at which the step is stable
    # the sharpness's own crossings still reach on_threshold, as events of the same kind
    assert all(e.quantity == "sharpness_ratio" for e in events if e not in early)
    assert any(e.quantity == "sharpness_ratio" and e.sharpness_ratio >= 1 for e in events)
    messages = [str(w.message) for w in caught if "early warning" in str(w.message)]
    assert len(messages) == 2  # once per quantity, though each crossed twice
    for message, e in zip(messages, early[:2]):
        assert f"at lr {3.0 / kappa:.4g}" in message
        stable = float(re.search(r"would be stable is about ([0-9.e+-]+)", message).group(1))
        assert stable == pytest.approx(e.stable_lr, rel=1e-3)
    assert sum("early warning" in m for m in caplog.messages) == 4  # every crossing is logged
    # the crossing state is checkpointed: a restored monitor still above sends no new event
    fresh = monitor_for(model, opt, on_threshold=events.append)
    fresh.load_state_dict(monitor.state_dict())
    count = len(events)
    fresh.measure(7)
    assert len(events) == count


def test_a_raising_on_threshold_is_a_warning_unless_strict():
    model = quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # every ratio above 1
    opt.zero_grad()
    model().backward()

    def broken(event):
        raise RuntimeError("boom")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = monitor_for(model, opt, on_threshold=broken).measure(1)
    assert r is not None and r.critical_sharpness_ratio > 1 and r.update_sharpness_ratio > 1
    assert any("on_threshold failed" in str(w.message) for w in caught)
    with pytest.raises(RuntimeError, match="boom"):
        monitor_for(model, opt, on_threshold=broken, strict=True).measure(1)


# -- measuring never changes training ---------------------------------------------------------------
@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.5),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2),
], ids=["sgd", "nesterov", "adamw"])
def test_training_with_the_early_warnings_is_bit_identical(make_opt):
    reference = train_bn_dropout(None, make_opt, steps=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = train_bn_dropout({"budget": cw.Budget(overhead=None)}, make_opt, steps=9)
    monitor = run[-1]
    assert len(monitor.history) == 3
    assert all(r.critical_sharpness_evals > 0 and math.isfinite(r.update_sharpness) for r in monitor.history)
    assert any(math.isfinite(r.critical_sharpness) for r in monitor.history)  # the line search moved theta
    assert_same_training(run, reference)
