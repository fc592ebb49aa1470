"""Batch sharpness (edge of stochastic stability), its stopping rule, and sources."""

import pytest
import torch

import curvwatch as cw
from curvwatch.demo import digits_problem
from curvwatch.measurement.batch_sharpness import MIN_BATCHES, batch_sharpness


def test_constant_curvature_stops_at_the_minimum_number_of_batches():
    # L_B(w) = c/2 |w|^2 + <mean_B x, w>: H_B = c I, so g^T H g / |g|^2 = c for every B.
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    model = torch.nn.Module()
    model.w = w
    x = torch.randn(64, 5, dtype=torch.float64)
    loss_fn = lambda m, b: 1.5 * m.w.pow(2).sum() + (b @ m.w).mean()  # noqa: E731
    value, stderr, products = batch_sharpness(model, loss_fn, x, [w], batch_size=8, max_batches=50)
    assert value == pytest.approx(3.0, rel=1e-12)
    assert stderr == pytest.approx(0.0, abs=1e-12)


def test_noisy_curvature_uses_the_whole_budget_and_reports_stderr():
    model, x, y = digits_problem()
    loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    params = list(model.parameters())
    value, stderr, products = batch_sharpness(model, loss_fn, (x[:256], y[:256]), params, batch_size=8, max_batches=12)
    assert value > 0 and 0 < stderr < value
    # by hand: the same mini-batches, the same formula
    generator = torch.Generator().manual_seed(0)
    vals = []
    for _ in range(12):
        i = torch.randperm(256, generator=generator)[:8]
        op = cw.HessianOperator(lambda i=i: loss_fn(model, (x[:256][i], y[:256][i])), params)
        g = op.gradient_at_theta()
        vals.append((g @ op.matvec(g) / (g @ g)).item())
    assert value == pytest.approx(sum(vals) / 12, rel=1e-6)
    assert MIN_BATCHES <= 12


def test_minibatches_from_a_training_loader():
    model, x, y = digits_problem()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:64], y[:64]), batch_size=16)
    monitor = cw.CurvatureMonitor(model, (x[:128], y[:128]), criterion=torch.nn.MSELoss(), trace=False,
                                  batch_size=16, minibatches=loader, batch_sharpness_batches=6, strict=True)
    r = monitor.measure(1)
    loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    vals = []
    for i, b in enumerate(list(loader) * 2):
        if i == 6:
            break
        op = cw.HessianOperator(lambda b=b: loss_fn(model, b), list(model.parameters()))
        g = op.gradient_at_theta()
        vals.append((g @ op.matvec(g) / (g @ g)).item())
    assert r.batch_sharpness == pytest.approx(sum(vals) / 6, rel=1e-5)
    with pytest.raises(cw.CurvatureError, match="batch_size"):
        cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), minibatches=loader)


@pytest.mark.slow
def test_minibatch_sgd_batch_sharpness_settles_at_two_over_lr():
    """Andreyev & Beneventano (2024): under mini-batch SGD the batch sharpness, not
    lambda_max, rises to 2/lr and stays there."""
    model, x, y = digits_problem()
    lr, batch = 4.0, 16
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = cw.CurvatureMonitor(model, (x[:512], y[:512]), criterion=torch.nn.MSELoss(), every=200, top_k=1,
                                  trace=False, optimizer=opt, batch_size=batch, batch_sharpness_batches=24)
    monitor.attach(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(4000):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    ratios = [r.sharpness_ratio for r in monitor.history]
    assert all(r.sharpness_ratio == pytest.approx(r.batch_sharpness * lr / 2) for r in monitor.history)
    assert min(ratios[:3]) < 0.75  # starts well below the edge
    assert all(0.75 <= v <= 1.15 for v in ratios[-8:]), ratios
    assert sum(ratios[-8:]) / 8 > sum(ratios[:3]) / 3 + 0.1  # it rose
    assert all(r.batch_sharpness_stderr < 0.15 * r.batch_sharpness for r in monitor.history)
