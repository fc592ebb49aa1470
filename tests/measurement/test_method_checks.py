"""auto verifies its double backward once; explicit central differences are checked once."""

import copy
import shutil
import warnings

import pytest
import torch

import curvwatch as cw
from tests.cases import Kink, dense_hessian


class _TanhOnce(torch.autograd.Function):
    """tanh whose backward is @once_differentiable: double backward drops its second-order terms."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _OnceNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(4, 8, dtype=torch.float64)
        self.second = torch.nn.Linear(8, 1, dtype=torch.float64)

    def forward(self, x):
        return self.second(_TanhOnce.apply(self.first(x)))


def _measure(model, x, y, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), top_k=1, trace=False,
                                     budget=cw.Budget(tol=1e-8), **options).measure(1)
    return result, [str(w.message) for w in caught]


def test_auto_falls_back_when_double_backward_is_silently_wrong():
    torch.manual_seed(0)
    model = _OnceNet()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)

    def loss(params):
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.mse_loss(out, y)

    reference = _TanhNet(model)  # the same function with torch's tanh: the true Hessian
    exact = torch.linalg.eigvalsh(dense_hessian(reference, lambda p: loss_of(reference, p, x, y)))[-1].item()
    result, messages = _measure(model, x, y)
    assert result.method == "finite_difference"
    assert abs(result.lambda_max - exact) <= 1e-4 * exact
    assert any("non-symmetric" in m for m in messages)
    wrong, _ = _measure(model, x, y, method="double_backward")  # asked for: not second-guessed
    assert abs(wrong.lambda_max - exact) > 1e-3 * exact


def test_auto_keeps_double_backward_on_a_relu_network():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16, dtype=torch.float64), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1, dtype=torch.float64))
    x, y = torch.randn(64, 4, dtype=torch.float64), torch.randn(64, 1, dtype=torch.float64)
    result, messages = _measure(model, x, y)
    assert result.method == "double_backward" and result.converged
    assert not any("non-symmetric" in m for m in messages)


def test_central_differences_across_relu_kinks_are_flagged():
    """Half the probe rows sit exactly on every kink: differences see curvature that is not there."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    torch.nn.init.zeros_(model[0].bias)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    x[::2] = 0  # pre-activations exactly 0
    exact, _ = _measure(model, x, y, method="double_backward")
    differences, messages = _measure(model, x, y, method="finite_difference")
    assert differences.lambda_max > 2 * exact.lambda_max  # the kinks, seen by differences only
    assert not differences.converged
    assert any("central differences give lambda_max" in m for m in messages)
    torch.nn.init.normal_(model[0].bias)  # away from the kinks: no flag
    x[::2] = torch.randn(128, 8)
    smooth, messages = _measure(model, x, y, method="finite_difference")
    assert smooth.converged and not any("central differences give" in m for m in messages)


class _TanhNet(torch.nn.Module):
    """The model of _OnceNet with torch's own tanh (a full second derivative)."""

    def __init__(self, other):
        super().__init__()
        self.first, self.second = other.first, other.second

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def loss_of(model, params, x, y):
    return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)


_NO_COMPILER = shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None
_INDUCTOR = pytest.param(  # the default backend: C++ kernels (~1 min cold on 2 cores, ~5 s cached)
    "inductor", marks=[pytest.mark.slow, pytest.mark.skipif(_NO_COMPILER, reason="inductor needs a C++ compiler")]
)


@pytest.mark.parametrize("backend", ["aot_eager", _INDUCTOR])
def test_a_compiled_model_falls_back_to_differences_under_auto(backend):
    """torch.compile's AOT autograd has no double backward: auto measures by differences."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    compiled, messages = _measure(torch.compile(model, backend=backend), x, y)
    exact, _ = _measure(model, x, y)
    assert compiled.method == "finite_difference" and compiled.converged
    assert abs(compiled.lambda_max - exact.lambda_max) <= 1e-3 * exact.lambda_max
    assert any("Using finite differences from now on" in m for m in messages)


@pytest.mark.parametrize("backend", ["aot_eager", _INDUCTOR])
@pytest.mark.parametrize("method", ["auto", "finite_difference"])
def test_a_compiled_model_is_measured_in_a_training_loop(method, backend):
    """Compiled by the first training step (grad mode on) before the monitor measures.

    Its backward donates its saved buffers, so ``create_graph=True`` raises ("compiled with
    non-empty donated buffers"): read as a missing second derivative, auto falls back to
    differences and explicit differences skip their once-per-run exact check (both were
    skipped at every step).
    """
    torch._dynamo.reset()  # not the graphs an earlier test compiled (same code, parameters as inputs)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    compiled = torch.compile(model, backend=backend)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = cw.CurvatureMonitor(compiled, (x, y), criterion=torch.nn.MSELoss(), top_k=1, trace=False, every=1,
                                  method=method, budget=cw.Budget(tol=1e-8))
    monitor.attach(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.mse_loss(compiled(x), y).backward()
            opt.step()
    messages = [str(w.message) for w in caught]
    assert not any("skipped" in m for m in messages), messages
    assert [r.step for r in monitor.history] == [1, 2]
    exact, _ = _measure(model, x, y)  # the eager model at the weights after step 2
    assert [r.method for r in monitor.history] == ["finite_difference"] * 2
    assert all(r.converged for r in monitor.history)
    assert abs(monitor.history[-1].lambda_max - exact.lambda_max) <= 1e-3 * exact.lambda_max


class _Quartic(torch.nn.Module):
    """``L = c sum(theta^4)`` near ``theta = 0``: sharp (H = 12 c theta^2) and fast-changing.

    A central difference of the gradient ``4 c theta^3`` is off by ``h^2 / (3 theta^2)``
    relative: with float32's step ``h ~ 1e-3`` and ``theta ~ 2e-3``, about 8%, at a
    curvature in the thousands: the case of a sharp state where the step does not
    follow the scale of the curvature (+66% on GPT-2 small at lambda_max 888).
    """

    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.linspace(1e-3, 2e-3, 8))

    def forward(self, _batch):
        return (1e8 * self.theta.pow(4)).sum()


def _measure_quartic(model, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cw.CurvatureMonitor(model, torch.zeros(1), loss_fn=lambda m, b: m(b), top_k=1, trace=False,
                                     budget=cw.Budget(tol=1e-8), **options).measure(1)
    return result, [str(w.message) for w in caught]


def test_central_differences_at_a_sharp_state_are_flagged_not_logged_as_converged():
    model = _Quartic()
    exact = 12e8 * model.theta.detach().double().pow(2).max().item()  # 4800
    result, messages = _measure_quartic(model, method="finite_difference")
    off = abs(result.lambda_max - exact) / exact
    assert off > 0.02  # the step is outside its accurate range here
    assert not result.converged  # and the result says so
    assert any("not converged" in m for m in messages), messages
    auto, _ = _measure_quartic(model)  # double backward: exact
    assert auto.converged and auto.lambda_max == pytest.approx(exact, rel=1e-5)


def test_one_sided_differences_at_a_sharp_state_follow_the_step_down_and_extrapolate():
    """The certificate halves its step until Richardson's error estimate is within 1%.

    One-sided Lanczos is 7.8% off here and the central certificate at the usual
    step 7.8% too (its step is larger); at 1/2 and 1/4 of it, 1.8% and 0.3%:
    the extrapolation of the last two is within 0.2% of 4,800 and says so.
    """
    model = _Quartic()
    exact = 12e8 * model.theta.detach().double().pow(2).max().item()
    result, messages = _measure_quartic(model, method="forward_difference")
    assert result.lambda_max == pytest.approx(exact, rel=5e-3)
    assert result.converged and result.error_bound <= 1e-2
    assert abs(result.lambda_max - exact) / exact <= result.error_bound  # the estimate covers the error
    note = [m for m in messages if "Richardson" in m]
    assert len(note) == 1 and "5172.31, 4886.49, 4815.03" in note[0], messages


def test_richardson_removes_the_h_squared_term():
    from curvwatch.solvers.certificate import richardson

    def central(h):  # lambda + a h^2 + b h^4
        return 3.0 + 40.0 * h**2 + 900.0 * h**4

    value, error = richardson(central(0.1), central(0.05))
    assert value == pytest.approx(3.0 - 900.0 * 0.1**2 * 0.05**2, rel=1e-12)  # only the h^4 term is left
    assert abs(value - 3.0) < error == pytest.approx(abs(value - central(0.05)))


def test_a_kink_does_not_settle_under_the_step_down_and_is_reported_not_converged():
    """``|w|`` at ``w = 1e-6``: every step crosses the kink, so halving it never settles (H = diag(1, 2, 3))."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cw.CurvatureMonitor(Kink(), torch.zeros(1), loss_fn=lambda m, b: m(b), top_k=1, trace=False,
                                     method="forward_difference").measure(1)
    messages = [str(w.message) for w in caught]
    assert not result.converged and abs(result.lambda_max - 3.0) > 1.0  # not certified: off the curves
    assert any("disagree" in m and "not converged" in m for m in messages), messages
    assert not any("Richardson" in m for m in messages)
    # the central re-solve from the one-sided vectors does not settle across the kink either
    assert any("re-solved with central differences" in m and "(not converged)" in m for m in messages), messages


def _sharp_tanh_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]:
    """A float32 tanh MLP with weights x5 (a sharp state) and its float64 dense lambda_max."""
    torch.manual_seed(12)
    model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    double = copy.deepcopy(model).double()
    exact = dense_hessian(
        double, lambda p: torch.nn.functional.cross_entropy(torch.func.functional_call(double, p, (x.double(),)), y)
    )
    return model, x, y, torch.linalg.eigvalsh(exact)[-1].item()


def _one_sided(model, x, y, max_hvps: int) -> tuple[cw.CurvatureResult, list[str]]:
    monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.CrossEntropyLoss(), top_k=2, trace=False,
                                  method="forward_difference",
                                  budget=cw.Budget(tol=1e-4, max_hvps=max_hvps, overhead=None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = monitor.measure(1)
    return result, [str(w.message) for w in caught]


def test_an_unconfirmed_one_sided_solve_is_re_solved_with_central_differences():
    """One-sided Lanczos stops at 14 products; the central residual at its top vector gives a bound
    of 2.7e-4, above tol 1e-4 (before: not converged, off the curves). Central Lanczos from its
    vectors certifies within tol of the dense float64 value."""
    model, x, y, exact = _sharp_tanh_mlp()
    result, messages = _one_sided(model, x, y, max_hvps=60)
    assert any("re-solved with central differences" in m for m in messages), messages
    assert result.converged and result.error_bound <= 1e-4
    assert result.lambda_max == pytest.approx(exact, rel=1e-4)
    assert result.hvps > 14  # the central solve's products, on top of the one-sided solve's
    # without the products for it, the one-sided value stays uncertified
    short, messages = _one_sided(model, x, y, max_hvps=15)
    assert not short.converged and short.error_bound > 1e-4
    assert not any("re-solved" in m for m in messages), messages
