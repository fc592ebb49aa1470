"""Budgets, seeds, warm starts, agreement of methods, and clear errors."""

import math

import pytest
import torch

import curvwatch as cw
from curvwatch.solvers.lanczos import gap_steps
from tests.cases import OnceDifferentiableCube, tanh_mlp_ce


def _spread_operator(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.linspace(0, 1, n, dtype=torch.float64) ** 3 * 10
    return cw.DenseOperator(q @ torch.diag(spectrum) @ q.T), spectrum


@pytest.mark.parametrize("budget", [1, 2, 5, 13])
def test_budget_is_honoured_exactly(budget):
    op, _ = _spread_operator()
    eig = cw.lanczos(op, k=1, tol=1e-14, max_matvecs=budget)
    assert eig.matvecs == budget == op.matvecs
    assert not eig.converged
    tr = cw.hutchinson(op, num_matvecs=budget)
    assert tr.matvecs == budget and op.matvecs == 2 * budget


def test_max_seconds_stops_early():
    op, _ = _spread_operator()
    eig = cw.lanczos(op, k=1, tol=1e-14, max_matvecs=150, max_seconds=0.0)
    assert eig.matvecs == 1


def test_same_seed_same_result_different_seed_different_start():
    op, _ = _spread_operator()
    a = cw.lanczos(op, k=2, max_matvecs=8, seed=5)
    b = cw.lanczos(op, k=2, max_matvecs=8, seed=5)
    c = cw.lanczos(op, k=2, max_matvecs=8, seed=6)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert not torch.equal(a.eigenvalues, c.eigenvalues)
    assert cw.hutchinson(op, 5, seed=1).samples == cw.hutchinson(op, 5, seed=1).samples


def test_residuals_are_true_residuals_and_bounds_hold():
    op, spectrum = _spread_operator()
    eig = cw.lanczos(op, k=2, tol=1e-4, max_matvecs=40)
    assert eig.converged
    for j in range(2):
        y = eig.eigenvectors[:, j]
        true = (op.matrix @ y - eig.eigenvalues[j] * y).norm().item()
        assert eig.residuals[j].item() == pytest.approx(true, rel=1e-4, abs=1e-10)
        assert eig.error_bounds[j] <= 1e-4 * abs(eig.eigenvalues[j])
        error = abs(eig.eigenvalues[j].item() - spectrum[-1 - j].item())
        assert error <= eig.error_bounds[j].item() * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("max_basis", [4, 6, 10])
def test_restarted_lanczos_keeps_the_basis_bounded_and_converges(max_basis):
    """Thick restarts: a basis of max_basis vectors reaches the same eigenvalues."""
    op, spectrum = _spread_operator()
    eig = cw.lanczos(op, k=2, tol=1e-8, max_matvecs=150, max_basis=max_basis)
    assert eig.converged
    torch.testing.assert_close(eig.eigenvalues, spectrum.flip(0)[:2], rtol=1e-7, atol=0)
    for j in range(2):  # the Ritz vectors are still true eigenvectors
        y = eig.eigenvectors[:, j]
        assert (op.matrix @ y - spectrum[-1 - j] * y).norm() < 1e-3


def _outlier_operator(n=300, seed=0):
    """A Hessian-like spectrum: three outliers (10, 7, 5) above a bulk in [0, 2]."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    bulk = torch.linspace(0, 1, n - 3, dtype=torch.float64) ** 3 * 2
    spectrum = torch.cat([bulk, torch.tensor([5.0, 7.0, 10.0], dtype=torch.float64)])
    return cw.DenseOperator(q @ torch.diag(spectrum) @ q.T), spectrum


def test_stopping_rule_is_on_the_eigenvalue_not_the_residual():
    """The error bound r^2/gap stops well before the raw residual reaches tol."""
    op, spectrum = _outlier_operator()
    eig = cw.lanczos(op, k=1, tol=1e-3, max_matvecs=150)
    assert eig.converged and eig.residuals[0] > 1e-3 * eig.lambda_max
    error = abs(eig.lambda_max - 10.0)
    assert error <= eig.error_bounds[0].item() <= 1e-3 * eig.lambda_max
    by_residual = next(m for m in range(1, 150) if cw.lanczos(op, k=1, tol=1e-14, max_matvecs=m).residuals[0] <= 1e-2)
    assert eig.matvecs < by_residual


def test_warm_start_converges_in_few_matvecs():
    op, spectrum = _outlier_operator()
    cold = cw.lanczos(op, k=1, tol=1e-3, max_matvecs=60)
    warm = cw.lanczos(op, k=1, tol=1e-3, max_matvecs=60, v0=cold.eigenvectors, seed=1)
    assert cold.converged and warm.converged
    # the gap is read from the Ritz values once the space has gap_steps(1) = 4 vectors
    assert warm.matvecs <= gap_steps(1) < cold.matvecs <= 20
    assert warm.lambda_max == pytest.approx(spectrum.max().item(), rel=1e-3)


def test_three_methods_agree_on_mlp():
    model, x, y = tanh_mlp_ce()
    closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    out = {
        m: cw.HessianOperator(closure, list(model.parameters()), method=m, module=model).matvec(v)
        for m in ("double_backward", "forward_over_reverse", "finite_difference")
    }
    torch.testing.assert_close(out["forward_over_reverse"], out["double_backward"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out["finite_difference"], out["double_backward"], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_finite_difference_restores_parameters_bit_exactly_and_leaves_grad(scheme):
    model, x, y = tanh_mlp_ce(dtype=torch.float32)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = [p.detach().clone() for p in model.parameters()]
    closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    op = cw.HessianOperator(closure, list(model.parameters()), method="finite_difference", scheme=scheme)
    cw.lanczos(op, k=2, max_matvecs=10)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, torch.full_like(p, 7.0))


def test_finite_difference_float32_accuracy():
    model, x, y = tanh_mlp_ce(n=64, hidden=16)
    closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    exact = cw.lanczos(cw.HessianOperator(closure, list(model.parameters())), k=1, tol=1e-10, max_matvecs=80)
    model32 = model.float()
    x32 = x.float()
    closure32 = lambda: torch.nn.functional.cross_entropy(model32(x32), y)  # noqa: E731
    fd = cw.lanczos(
        cw.HessianOperator(closure32, list(model32.parameters()), method="finite_difference"),
        k=1, tol=1e-6, max_matvecs=80,
    )
    assert fd.lambda_max == pytest.approx(exact.lambda_max, rel=1e-3)


def test_step_formula_per_dtype():
    assert cw.operators.finite_difference_step(torch.float32, 0.0) == pytest.approx(0.2 * 2**(-23 / 3), rel=1e-12)
    assert 5e-4 < cw.operators.finite_difference_step(torch.float32, 0.0) < 2e-3
    assert 1e-6 < cw.operators.finite_difference_step(torch.float64, 0.0) < 2e-6
    assert 5e-5 < cw.operators.finite_difference_step(torch.float32, 0.0, "forward") < 2e-4


def test_slq_moments_match_dense_eigenvalues():
    op, spectrum = _spread_operator(n=100)
    density = cw.slq(op, num_probes=30, num_steps=25, seed=0)
    assert density.matvecs == 30 * 25
    assert density.moment(0) == pytest.approx(1.0, rel=1e-10)
    for power in (1, 2):
        exact = spectrum.pow(power).mean().item()
        assert density.moment(power) == pytest.approx(exact, rel=0.1)
    edges, mass = density.histogram(bins=10)
    assert mass.sum().item() == pytest.approx(1.0, rel=1e-9)
    # most eigenvalues are small (cubic spacing): most mass in the lowest bins
    exact_mass, _ = torch.histogram(spectrum, bins=edges)
    assert mass[:3].sum().item() == pytest.approx(exact_mass[:3].sum().item() / 100, abs=0.15)


# -- errors -----------------------------------------------------------------
def test_errors_name_the_problem():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(cw.CurvatureError, match="no trainable parameters"):
        cw.HessianOperator(lambda: w.sum(), [])
    with pytest.raises(cw.CurvatureError, match="does not require grad"):
        cw.HessianOperator(lambda: w.sum(), [torch.zeros(3)])
    with pytest.raises(cw.CurvatureError, match="not a scalar"):
        cw.HessianOperator(lambda: w * w, [w]).matvec(torch.ones(3))
    with pytest.raises(cw.CurvatureError, match="nan"):
        cw.HessianOperator(lambda: (w * w).sum() * math.nan, [w]).matvec(torch.ones(3))
    with pytest.raises(cw.CurvatureError, match="expected a scalar tensor"):
        cw.HessianOperator(lambda: 1.0, [w]).matvec(torch.ones(3))
    op = cw.HessianOperator(lambda: (w * w).sum(), [w])
    with pytest.raises(cw.CurvatureError, match=r"expected \(3,\)"):
        op.matvec(torch.ones(4))
    with pytest.raises(cw.CurvatureError, match="dtype mismatch"):
        op.matvec(torch.ones(3, dtype=torch.float64))
    with pytest.raises(cw.CurvatureError, match="unknown method"):
        cw.HessianOperator(lambda: w.sum(), [w], method="newton")
    with pytest.raises(cw.CurvatureError, match="module="):
        cw.HessianOperator(lambda: w.sum(), [w], method="forward_over_reverse")
    with pytest.raises(cw.CurvatureError, match="at least k"):
        cw.lanczos(op, k=3, max_matvecs=2)


def test_model_without_second_derivative_gets_a_clear_error_and_fd_works():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    closure = lambda: OnceDifferentiableCube.apply(w).sum()  # noqa: E731
    with pytest.raises(cw.CurvatureError, match="finite_difference"):
        cw.HessianOperator(closure, [w]).matvec(torch.ones(2, dtype=torch.float64))
    fd = cw.HessianOperator(closure, [w], method="finite_difference")
    torch.testing.assert_close(fd.matvec(torch.ones(2, dtype=torch.float64)), 6 * w.detach(), rtol=1e-7, atol=0)


def test_fused_attention_without_double_backward_gets_a_clear_error():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    closure = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).pow(2).sum()  # noqa: E731
    with pytest.raises(cw.CurvatureError, match="SDPBackend.MATH"):
        cw.HessianOperator(closure, [q]).matvec(torch.ones(q.numel()))
