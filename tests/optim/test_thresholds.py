"""Edge-of-stability thresholds and the Adam preconditioner, from real optimizers."""

import math
import warnings

import pytest
import torch

import curvwatch as cw
from tests.cases import dense_hessian


def _params():
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]


@pytest.mark.parametrize(
    ("make", "expected", "rule"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 2 / 0.1, "gd"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), (2 + 1.8) / 0.1, "heavy_ball"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / (2.8 * 0.1), "nesterov"),
        (lambda p: torch.optim.Adam(p, lr=1e-3), 38 / 1e-3, "adam"),
        (lambda p: torch.optim.AdamW(p, lr=2e-3, betas=(0.8, 0.99)), 3.6 / (0.2 * 2e-3), "adam"),
        (lambda p: torch.optim.RMSprop(p, lr=1e-2), 2 / 1e-2, "rmsprop"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), 3.8 / (0.5 * 0.1), "heavy_ball"),
        (lambda p: torch.optim.SGD(p, lr=0.1, dampening=0.5), 2 / 0.1, "gd"),  # torch ignores it
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=1.0), math.inf, "heavy_ball"),
        (lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True), 38 / 1e-3, "adam"),
        (lambda p: torch.optim.Adamax(p, lr=2e-3), 38 / 2e-3, "adamax"),
        (lambda p: torch.optim.Adamax(p, lr=2e-3, betas=(0.5, 0.9)), 3 / (0.5 * 2e-3), "adamax"),
    ],
)
def test_threshold_rules(make, expected, rule):
    t = cw.threshold(make(_params()))
    assert t.value == pytest.approx(expected, rel=1e-12)
    assert t.rule == rule
    assert t.adaptive == (rule in ("adam", "adamax", "rmsprop"))
    assert t.note == ""


class _SignDescent(torch.optim.Optimizer):
    """A custom optimizer: curvwatch cannot know its stability rule."""

    def __init__(self, params, lr=0.01, betas=(0.9, 0.99)):  # betas, like Lion: no Adam
        super().__init__(params, {"lr": lr, "betas": betas})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class _NoLr(torch.optim.Optimizer):
    """A custom optimizer whose groups have no 'lr' (today: KeyError 'lr')."""

    def __init__(self, params):
        super().__init__(params, {"scale": 1.0})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["scale"] * p.grad / (1 + p.grad.norm()))


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda p: torch.optim.Adagrad(p, lr=0.1), "Adagrad"),
        (lambda p: torch.optim.Adadelta(p, lr=0.1), "Adadelta"),
        (lambda p: torch.optim.Rprop(p, lr=0.1), "Rprop"),
        (lambda p: torch.optim.ASGD(p, lr=0.1), "ASGD"),
        (lambda p: torch.optim.LBFGS(p, lr=0.1), "LBFGS"),
        (lambda p: torch.optim.NAdam(p, lr=0.1), "NAdam"),
        (lambda p: torch.optim.RAdam(p, lr=0.1), "RAdam"),
        (lambda p: _SignDescent(p, lr=0.1), "_SignDescent"),
        (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "SGD"),
    ],
)
def test_no_known_rule_means_no_threshold(make, name):
    t = cw.threshold(make(_params()))
    assert math.isnan(t.value) and t.rule == "unknown" and not t.adaptive
    assert t.lr == pytest.approx(0.1)  # the lr is still reported
    assert name in t.note and "threshold" in t.note


def test_a_group_without_lr_gives_no_threshold_and_no_error():
    t = cw.threshold(_NoLr(_params()))
    assert math.isnan(t.value) and math.isnan(t.lr) and t.rule == "unknown" and "_NoLr" in t.note
    opt = torch.optim.SGD(_params(), lr=0.1)
    del opt.param_groups[0]["lr"]
    t = cw.threshold(opt)
    assert math.isnan(t.value) and math.isnan(t.lr) and t.rule == "gd" and "'lr'" in t.note


def _final_distance(make, curvature: float, steps: int = 3000) -> float:
    """|theta| after running a torch optimizer on 0.5 * curvature * theta^2 from theta = 1."""
    theta = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = make([theta])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * theta**2).sum().backward()
        opt.step()
        if not theta.abs().item() < 1e6:
            return math.inf
    return theta.abs().item()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.9, "dampening": 0.5},
        {"momentum": 0.9, "dampening": 0.9},
        {"momentum": 0.5, "dampening": 0.3},
    ],
)
def test_sgd_thresholds_match_the_torch_iteration_on_a_quadratic(kwargs):
    def make(params):
        return torch.optim.SGD(params, lr=0.1, **kwargs)

    limit = cw.threshold(make([torch.nn.Parameter(torch.ones(1))])).value
    assert _final_distance(make, 0.97 * limit) < 1e-6  # just below: converges
    assert _final_distance(make, 1.03 * limit) == math.inf  # just above: diverges


def test_threshold_follows_the_scheduler():
    opt = torch.optim.SGD(_params(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert cw.threshold(opt).value == pytest.approx(2 / 0.05)


def test_adam_preconditioner_matches_the_update_rule():
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    assert cw.preconditioner_diagonal(opt, params) is None  # no state before step 1
    for _ in range(3):
        opt.zero_grad()
        sum((p**2).sum() for p in params).backward()
        opt.step()
    diag = cw.preconditioner_diagonal(opt, params)
    v = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in params])
    torch.testing.assert_close(diag, (v / (1 - 0.99**3)).sqrt() + 1e-8)


def _update_is_lr_times_moment_over_p(opt, params, moment, scale):
    """Take a step and check ``theta_t - theta_{t+1} == lr_t * moment / P`` with P from curvwatch."""
    group = opt.param_groups[0]
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    sum(scale * (torch.arange(1.0, p.numel() + 1, dtype=p.dtype) * p.flatten() ** 4).sum() for p in params).backward()
    opt.step()
    diag = cw.preconditioner_diagonal(opt, params)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])
    expected = torch.cat([moment(opt.state[p], p).flatten() for p in params]) / diag
    t = float(opt.state[params[0]]["step"])
    lr = group["lr"] / (1 - group["betas"][0] ** t) if "betas" in group else group["lr"]
    torch.testing.assert_close(step, lr * expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    ("make", "moment"),
    [
        (lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99)), lambda s, p: s["exp_avg"]),
        (lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99), amsgrad=True), lambda s, p: s["exp_avg"]),
        (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0), lambda s, p: s["exp_avg"]),
        (lambda p: torch.optim.Adamax(p, lr=1e-2, betas=(0.8, 0.95)), lambda s, p: s["exp_avg"]),
        (lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9), lambda s, p: p.grad),
        (lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.9, centered=True), lambda s, p: p.grad),
    ],
    ids=["adam", "adam-amsgrad", "adamw", "adamax", "rmsprop", "rmsprop-centered"],
)
def test_preconditioner_is_the_one_in_the_update(make, moment):
    """P is exactly the denominator torch divides by (amsgrad's max, Adamax's exp_inf, centered RMSprop)."""
    params = [
        torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(4, dtype=torch.float64)),
    ]
    opt = make(params)
    for scale in (1.0, 100.0, 0.01, 1.0):  # shrinking gradients: amsgrad's max(v) is not v
        _update_is_lr_times_moment_over_p(opt, params, moment, scale)


def test_preconditioner_of_adam_over_part_of_the_parameters():
    """Parameters Adam does not update get P^-1 = 0: the preconditioned sharpness is that of Adam's block."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    head = list(model[2].parameters())
    opt = torch.optim.Adam(head, lr=1e-2)  # the first layer is trainable but not in the optimizer
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    params = list(model.parameters())
    diag = cw.preconditioner_diagonal(opt, params)
    n_body = sum(p.numel() for p in model[0].parameters())
    assert diag is not None and torch.all(diag[:n_body] == torch.finfo(torch.float64).max)
    assert torch.all(diag[n_body:] < 1)  # sqrt(v_hat) + eps of the head

    monitor = cw.CurvatureMonitor(
        model, (x, y), criterion=torch.nn.MSELoss(), optimizer=opt, trace=False, top_k=1, strict=True,
        budget=cw.Budget(max_hvps=60, tol=1e-8),
    )
    r = monitor.measure(5)
    H = dense_hessian(model, lambda ps: torch.nn.functional.mse_loss(torch.func.functional_call(model, ps, (x,)), y))
    block = H[n_body:, n_body:] / torch.outer(diag[n_body:], diag[n_body:]).sqrt()
    assert r.preconditioned_lambda_max == pytest.approx(torch.linalg.eigvalsh(block)[-1].item(), rel=1e-5)
    assert r.sharpness_ratio == pytest.approx(r.preconditioned_lambda_max / (38 / 1e-2))


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adagrad(p, lr=0.1), _NoLr], ids=["Adagrad", "no-lr"])
def test_monitor_measures_without_a_threshold(make):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = make(model.parameters())
    batch = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    monitor = cw.CurvatureMonitor(model, batch, criterion=torch.nn.CrossEntropyLoss(), optimizer=opt,
                                  strict=True, budget=cw.Budget())
    r = monitor.measure(1)
    assert math.isfinite(r.lambda_max)
    assert math.isnan(r.threshold) and math.isnan(r.sharpness_ratio) and math.isnan(r.preconditioned_lambda_max)


def test_monitor_warns_once_with_the_note_naming_the_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    opt = torch.optim.Rprop(model.parameters(), lr=0.1)
    batch = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    monitor = cw.CurvatureMonitor(model, batch, criterion=torch.nn.CrossEntropyLoss(), optimizer=opt,
                                  strict=True, budget=cw.Budget())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.measure(1)
        monitor.measure(2)
    notes = [w for w in caught if "Rprop" in str(w.message)]
    assert len(notes) == 1 and issubclass(notes[0].category, cw.CurvatureWarning)


def test_param_group_choice_and_errors():
    a, b = _params()
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.5}])
    assert cw.threshold(opt, param_group=1).value == pytest.approx(4.0)
    with pytest.raises(cw.CurvatureError, match="has 2 groups"):
        cw.threshold(opt, param_group=2)
    with pytest.raises(cw.CurvatureError, match="torch.optim.Optimizer"):
        cw.threshold(object())
