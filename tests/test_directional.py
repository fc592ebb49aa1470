"""Directional and critical sharpness against closed forms; update directions against real steps."""

import copy
import math

import pytest
import torch

from curvwatch._errors import CurvatureError
from curvwatch.directional import (
    CriticalSharpness,
    critical_sharpness,
    directional_sharpness,
    perturbed_loss,
)
from curvwatch.operators import DenseOperator
from curvwatch.operators.factory import build_operator
from curvwatch.optim import preconditioner_diagonal, update_direction
from tests.cases import tanh_mlp_ce

DTYPE = torch.float64


# -- a quadratic with known Hessian ------------------------------------------------------------------
class _Quadratic(torch.nn.Module):
    """``L = 1/2 theta^T A theta - b^T theta`` with ``theta`` split over two parameters."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.w = torch.nn.Parameter(theta[:4].clone().view(2, 2))
        self.v = torch.nn.Parameter(theta[4:].clone())

    def theta(self) -> torch.Tensor:
        return torch.cat([self.w.reshape(-1), self.v])

    def forward(self, batch=None) -> torch.Tensor:
        theta = self.theta()
        return 0.5 * theta @ self.A @ theta - self.b @ theta

    def gradient(self) -> torch.Tensor:
        return (self.A @ self.theta() - self.b).detach()


def _quadratic(eigenvalues=(4.0, 2.0, 1.0, 0.5, 0.25, 0.1), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    A = Q @ torch.diag(torch.tensor(eigenvalues, dtype=DTYPE)) @ Q.T
    A = (A + A.T) / 2
    b = torch.randn(n, generator=g, dtype=DTYPE)
    theta = torch.randn(n, generator=g, dtype=DTYPE)
    return _Quadratic(A, b, theta)


def _loss(model, batch):
    return model(batch)


def _hessian(model):
    params = list(model.parameters())
    return build_operator(model, lambda: model(), params, "double_backward")


# -- directional sharpness ----------------------------------------------------------------------------
def test_directional_sharpness_is_the_rayleigh_quotient():
    model = _quadratic()
    A = model.A
    u = torch.randn(6, dtype=DTYPE)
    expected = (u @ A @ u / (u @ u)).item()
    for op in (DenseOperator(A), _hessian(model)):
        assert directional_sharpness(op, u) == pytest.approx(expected, rel=1e-12)
        assert op.matvecs == 1
    assert expected <= 4.0 + 1e-12


def test_preconditioned_directional_sharpness_closed_form():
    model = _quadratic()
    A = model.A
    u = torch.randn(6, dtype=DTYPE)
    P = torch.rand(6, dtype=DTYPE) + 0.1
    expected = (u @ A @ u / (u @ (P * u))).item()
    value = directional_sharpness(_hessian(model), u, P)
    assert value == pytest.approx(expected, rel=1e-12)
    # the Rayleigh quotient of P^-1/2 A P^-1/2 at P^1/2 u, at most lambda_max(P^-1 A)
    s = P.rsqrt()
    M = s[:, None] * A * s[None, :]
    w = P.sqrt() * u
    assert value == pytest.approx((w @ M @ w / (w @ w)).item(), rel=1e-12)
    assert value <= torch.linalg.eigvalsh(M).max().item() + 1e-12


def test_preconditioned_directional_sharpness_from_adam():
    model = _quadratic()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model().backward()
        opt.step()
    u = update_direction(opt, params)
    P = preconditioner_diagonal(opt, params)
    expected = (u @ model.A @ u / (u @ (P * u))).item()
    assert directional_sharpness(_hessian(model), u, P) == pytest.approx(expected, rel=1e-12)


def test_directional_sharpness_degenerate_inputs():
    op = DenseOperator(torch.eye(3, dtype=DTYPE))
    assert math.isnan(directional_sharpness(op, torch.zeros(3, dtype=DTYPE)))
    with pytest.raises(CurvatureError, match="diagonal has shape"):
        directional_sharpness(op, torch.ones(3, dtype=DTYPE), torch.ones(4, dtype=DTYPE))


# -- critical sharpness -------------------------------------------------------------------------------
@pytest.mark.parametrize("lr_over_eta_c", [0.3, 0.9, 1.4, 5.0])
def test_critical_sharpness_along_the_gradient(lr_over_eta_c):
    """Quadratic, ``u = g``: ``lambda_c = g^T A g / |g|^2``, the directional sharpness."""
    model = _quadratic()
    params = list(model.parameters())
    g = model.gradient()
    expected = (g @ model.A @ g / (g @ g)).item()
    lr = lr_over_eta_c * 2 / expected
    result = critical_sharpness(perturbed_loss(model, params, g, _loss, None), lr, max_evals=10)
    assert isinstance(result, CriticalSharpness)
    assert result.bracketed
    assert result.value == pytest.approx(expected, rel=1e-2)
    assert abs(result.value - expected) / expected <= result.precision <= 1e-2
    assert result.evals <= 11
    assert result.value == pytest.approx(directional_sharpness(_hessian(model), g), rel=1e-2)
    # the threshold is 2 / lr: the step of lr raised the loss iff lambda_c > 2 / lr
    loss0 = model().item()
    assert (perturbed_loss(model, params, g, _loss, None)(lr) > loss0) == (expected > 2 / lr)


def test_critical_sharpness_along_any_descent_direction():
    """Quadratic, any ``u`` with ``g^T u > 0``: ``lambda_c = u^T A u / (g^T u)``."""
    model = _quadratic()
    params = list(model.parameters())
    g = model.gradient()
    u = torch.randn(6, dtype=DTYPE)
    u = u if g @ u > 0 else -u
    expected = (u @ model.A @ u / (g @ u)).item()
    result = critical_sharpness(perturbed_loss(model, params, u, _loss, None), 2 / expected, rtol=1e-3, max_evals=20)
    assert result.bracketed and result.precision <= 1e-3
    assert result.value == pytest.approx(expected, rel=1e-3)
    # Adam-like u = P^-1 g: lambda_c is the preconditioned directional sharpness
    P = torch.rand(6, dtype=DTYPE) + 0.1
    u = g / P
    result = critical_sharpness(perturbed_loss(model, params, u, _loss, None), 0.1)
    assert result.bracketed
    assert result.value == pytest.approx(directional_sharpness(_hessian(model), u, P), rel=1e-2)


def test_critical_sharpness_without_a_bracket():
    # every step raises the loss (u = -g): eta_c is the smallest step tried, an upper bound
    model = _quadratic()
    params = list(model.parameters())
    g = model.gradient()
    result = critical_sharpness(perturbed_loss(model, params, -g, _loss, None), 0.5, max_evals=6)
    assert not result.bracketed and result.precision == math.inf
    assert result.evals == 7
    assert result.eta_c == 0.5 / 2**5 and result.value == 2 / result.eta_c
    # negative curvature along u with g^T u > 0: no step raises it; eta_c is the largest step tried
    model = _quadratic(eigenvalues=(-1.0, 2.0, 1.0, 0.5, 0.25, 0.1))
    params = list(model.parameters())
    eigenvalues, vectors = torch.linalg.eigh(model.A)
    u = vectors[:, 0] * torch.sign(model.gradient() @ vectors[:, 0])
    result = critical_sharpness(perturbed_loss(model, params, u, _loss, None), 0.5, max_evals=6)
    assert eigenvalues[0] == pytest.approx(-1.0)
    assert not result.bracketed
    assert result.eta_c == 0.5 * 2**5 and result.value == 2 / result.eta_c


def test_critical_sharpness_counts_and_checks():
    calls = []

    def loss_at(eta):  # a parabola with eta_c = 1
        calls.append(eta)
        return eta * (eta - 1.0)

    result = critical_sharpness(loss_at, 0.3, loss0=0.0, max_evals=10, rtol=1e-2)
    assert 0.0 not in calls and result.evals == len(calls) <= 10
    assert result.eta_c == pytest.approx(1.0, rel=1e-2) and result.value == pytest.approx(2.0, rel=1e-2)
    assert critical_sharpness(lambda eta: math.nan if eta > 1 else -eta, 0.75).eta_c == pytest.approx(1.0, rel=1e-2)
    for kwargs in ({"lr": 0.0}, {"lr": math.inf}, {"lr": 1.0, "max_evals": 0}, {"lr": 1.0, "rtol": 0.0}):
        with pytest.raises(CurvatureError):
            critical_sharpness(loss_at, **kwargs)
    with pytest.raises(CurvatureError, match="finite loss"):
        critical_sharpness(lambda eta: math.nan, 1.0)


# -- perturbed_loss -----------------------------------------------------------------------------------
def test_perturbed_loss_restores_parameters_bit_exactly():
    model, x, y = tanh_mlp_ce(dtype=torch.float32)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    n = sum(p.numel() for p in params)
    u = torch.randn(n) * 3.7
    loss_fn = lambda m, batch: torch.nn.functional.cross_entropy(m(batch[0]), batch[1])  # noqa: E731
    loss_at = perturbed_loss(model, params, u, loss_fn, (x, y))
    for eta in (0.0, 1e-3, 0.1234567, 3.0, -0.7):
        value = loss_at(eta)
        assert all(torch.equal(p, p0) for p, p0 in zip(params, before))
        assert all(p.grad is None for p in params)
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            offset = 0
            for p in shifted.parameters():
                p.sub_(eta * u[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        assert value == pytest.approx(loss_fn(shifted, (x, y)).item(), rel=1e-5)
    assert loss_at(0.0) == loss_fn(model, (x, y)).item()

    def failing(m, batch):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        perturbed_loss(model, params, u, failing, (x, y))(1.0)
    assert all(torch.equal(p, p0) for p, p0 in zip(params, before))
    assert perturbed_loss(model, params, u, loss_fn, (x, y), reduce=lambda v: v + 1)(0.0) == loss_at(0.0) + 1
    with pytest.raises(CurvatureError, match="scalar"):
        perturbed_loss(model, params, u, lambda m, b: m(b[0]), (x, y))(0.5)


# -- update_direction: the last step taken ------------------------------------------------------------
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_wd": lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.3),
    "sgd_maximize": lambda p: torch.optim.SGD(p, lr=0.1, maximize=True),
    "heavy_ball": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "heavy_ball_dampening_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.1),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, betas=(0.8, 0.9)),
    "adam_maximize": lambda p: torch.optim.Adam(p, lr=1e-2, maximize=True),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "adamax_wd": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2),
    "rmsprop_centered_wd": lambda p: torch.optim.RMSprop(p, lr=1e-2, centered=True, weight_decay=0.2),
    "rmsprop_momentum": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, weight_decay=0.1),
}


def _train(model, x, y, opt, steps):
    """``steps`` optimizer steps on random halves of the data; ``theta`` before the last one."""
    g = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    previous = None
    for _ in range(steps):
        idx = torch.randperm(len(x), generator=g)[: len(x) // 2]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        previous = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        opt.step()
    return previous


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_direction_is_the_last_step(name):
    """``theta_3 - theta_2 = -lr u`` (AdamW: ``- lr wd theta_2`` besides), ``u`` read after step 3."""
    model, x, y = tanh_mlp_ce()
    params = list(model.parameters())
    opt = OPTIMIZERS[name](params)
    theta_2 = _train(model, x, y, opt, 3)
    theta_3 = torch.cat([p.detach().reshape(-1) for p in params])
    u = update_direction(opt, params)
    lr = opt.param_groups[0]["lr"]
    expected = -lr * u
    if name == "adamw":
        expected = expected - lr * 0.5 * theta_2
    assert u.dtype == DTYPE and u.shape == theta_3.shape
    assert u.abs().max() > 0
    torch.testing.assert_close(theta_3 - theta_2, expected, rtol=1e-9, atol=1e-14)


def test_update_direction_by_hand():
    """Adam and Nesterov SGD from the recurrences on the recorded gradients."""
    for name in ("adam", "nesterov", "heavy_ball"):
        model, x, y = tanh_mlp_ce()
        params = list(model.parameters())
        opt = OPTIMIZERS[name](params)
        g = torch.Generator().manual_seed(1)
        m = v = buf = None
        for t in range(1, 4):
            idx = torch.randperm(len(x), generator=g)[: len(x) // 2]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            grad = torch.cat([p.grad.reshape(-1) for p in params])
            opt.step()
            if name == "adam":
                m = 0.1 * grad if m is None else 0.9 * m + 0.1 * grad
                v = 0.001 * grad**2 if v is None else 0.999 * v + 0.001 * grad**2
                expected = (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
            else:
                buf = grad.clone() if buf is None else 0.9 * buf + grad
                expected = grad + 0.9 * buf if name == "nesterov" else buf
        torch.testing.assert_close(update_direction(opt, params), expected, rtol=1e-10, atol=1e-14)


def test_update_direction_param_groups_and_foreign_parameters():
    model, x, y = tanh_mlp_ce()
    first, second = model[0], model[2]
    opt = torch.optim.Adam(
        [{"params": first.parameters(), "lr": 0.1}, {"params": [second.weight], "lr": 0.01}],
    )
    params = list(model.parameters())  # second.bias is not the optimizer's: it never moves
    theta_2 = _train(model, x, y, opt, 3)
    delta = torch.cat([p.detach().reshape(-1) for p in params]) - theta_2
    u0 = update_direction(opt, params)
    torch.testing.assert_close(delta, -0.1 * u0, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(delta, -0.01 * update_direction(opt, params, param_group=1), rtol=1e-9, atol=1e-14)
    assert torch.equal(u0[-second.bias.numel() :], torch.zeros(second.bias.numel(), dtype=DTYPE))
    with pytest.raises(CurvatureError, match="param_group=2"):
        update_direction(opt, params, param_group=2)


class _Wrapped:
    """A framework wrapper (Accelerate, Lightning): the optimizer is ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_update_direction_wrapped_and_after_zero_grad():
    model, x, y = tanh_mlp_ce()
    params = list(model.parameters())
    adam = torch.optim.Adam(params, lr=1e-2)
    sgd = torch.optim.SGD(params, lr=0.1)
    _train(model, x, y, adam, 2)
    u = update_direction(adam, params)
    assert torch.equal(update_direction(_Wrapped(adam), params), u)
    adam.zero_grad(set_to_none=True)
    assert torch.equal(update_direction(adam, params), u)  # the state is enough
    assert update_direction(sgd, params) is None  # plain SGD needs the gradient


def test_monitor_says_once_why_the_update_sharpness_is_missing_after_zero_grad():
    """Plain SGD's update is ``.grad``: after ``zero_grad()`` a NaN update sharpness with the reason, once."""
    import warnings

    from curvwatch import CurvatureMonitor, CurvatureWarning

    model, x, y = tanh_mlp_ce()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = CurvatureMonitor(model, (x, y), criterion=torch.nn.CrossEntropyLoss(), optimizer=sgd, trace=False)
    _train(model, x, y, sgd, 2)
    assert math.isfinite(monitor.measure(2).update_sharpness)  # between step() and zero_grad()
    sgd.zero_grad()
    with pytest.warns(CurvatureWarning, match=r"update sharpness needs the last step's gradient \(SGD without "
                      r"momentum.*\.grad is empty: zero_grad\(\) ran between optimizer\.step\(\)"):
        missing = monitor.measure(3)
    assert math.isnan(missing.update_sharpness) and math.isfinite(missing.lambda_max)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.measure(4)
    heavy_ball = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, x, y, heavy_ball, 2)
    heavy_ball.zero_grad()  # the buffer holds the update: nothing missing, nothing said
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureWarning)
        result = CurvatureMonitor(model, (x, y), criterion=torch.nn.CrossEntropyLoss(), optimizer=heavy_ball,
                                  trace=False).measure(2)
    assert math.isfinite(result.update_sharpness)


def test_update_direction_none():
    model, x, y = tanh_mlp_ce()
    params = list(model.parameters())
    assert update_direction(torch.optim.Adam(params), params) is None  # before the first step
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert update_direction(torch.optim.SGD(params, lr=0.1, momentum=0.9), params) is None  # no buffer yet
    assert update_direction(torch.optim.SGD(params, lr=0.1), params) is not None  # the gradient is the step
    adagrad = torch.optim.Adagrad(params)
    adagrad.step()
    assert update_direction(adagrad, params) is None  # no known update rule
    with pytest.raises(CurvatureError, match="torch.optim.Optimizer"):
        update_direction(object(), params)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, maximize=True),
    lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01, amsgrad=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.0),
    lambda ps: torch.optim.Adamax(ps, lr=0.01),
    lambda ps: torch.optim.RMSprop(ps, lr=0.01, centered=True),
    lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
], ids=["sgd", "heavy-ball-wd", "nesterov-max", "adam-ams-wd", "adamw", "adamax", "rmsprop-c", "rmsprop-mom"])
@pytest.mark.parametrize("steps_before", [0, 3])
def test_next_update_direction_is_the_step_the_optimizer_takes(make, steps_before):
    """theta_{t+1} - theta_t == -lr u for u from the gradient the step is then given (state left as it was)."""
    import copy

    from curvwatch.optim import next_update_direction

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    opt = make(model.parameters())
    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(steps_before):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    params = list(model.parameters())
    state_before = copy.deepcopy(opt.state_dict())
    grads = torch.autograd.grad(model(x).sin().mean(), params)  # another loss: the probe's gradient
    u = next_update_direction(opt, params, torch.cat([g.reshape(-1) for g in grads]))
    assert opt.state_dict()["state"].keys() == state_before["state"].keys()  # nothing written
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(after - theta, -0.1 * u if isinstance(opt, torch.optim.SGD) else -0.01 * u,
                               rtol=1e-9, atol=1e-12)
