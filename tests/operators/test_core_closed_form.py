"""Operators and solvers against closed forms and dense references (float64)."""

import pytest
import torch

import curvwatch as cw
from tests.cases import dense_ggn_ce, dense_hessian, linear_regression, tanh_mlp_ce

EXACT = ("double_backward", "forward_over_reverse")


def _op(method, model, closure):
    return cw.HessianOperator(closure, list(model.parameters()), method=method, module=model)


@pytest.mark.parametrize("method", EXACT + ("finite_difference",))
def test_linear_regression_top3(method):
    model, closure, H = linear_regression()
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    eig = cw.lanczos(_op(method, model, closure), k=3, tol=1e-10, max_matvecs=6)
    rtol = 1e-8 if method in EXACT else 1e-4
    torch.testing.assert_close(eig.eigenvalues, exact, rtol=rtol, atol=0)
    assert eig.converged and eig.matvecs <= 6


def test_hvp_matches_dense_hessian_all_methods():
    model, closure, H = linear_regression()
    v = torch.randn(H.shape[0], dtype=torch.float64)
    for method in EXACT + ("finite_difference",):
        hv = _op(method, model, closure).matvec(v)
        torch.testing.assert_close(hv, H @ v, rtol=1e-7, atol=1e-9)


def test_trace_within_four_standard_errors():
    model, closure, H = linear_regression(d=30)
    tr = cw.hutchinson(_op("double_backward", model, closure), num_matvecs=40, seed=3)
    exact = torch.trace(H).item()
    assert tr.matvecs == 40
    assert abs(tr.estimate - exact) <= 4 * tr.stderr
    assert 0 < tr.stderr < 0.5 * exact


def test_deflated_trace_is_exact_when_basis_spans_everything():
    _, _, H = linear_regression(d=8)
    op = cw.DenseOperator(H)
    eig = cw.lanczos(op, k=8, tol=1e-12, max_matvecs=8)
    tr = cw.hutchinson(op, num_matvecs=3, deflation=eig)
    assert tr.estimate == pytest.approx(torch.trace(H).item(), rel=1e-10)


def test_deflation_lowers_the_standard_error():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([100.0, 50.0, 20.0]), torch.rand(57, generator=g)]).double()
    op = cw.DenseOperator(q @ torch.diag(spectrum) @ q.T)
    eig = cw.lanczos(op, k=3, tol=1e-8, max_matvecs=40)
    plain = cw.hutchinson(op, num_matvecs=20, seed=1)
    deflated = cw.hutchinson(op, num_matvecs=20, seed=1, deflation=eig)
    exact = spectrum.sum().item()
    assert deflated.stderr < plain.stderr / 10
    assert abs(deflated.estimate - exact) <= 4 * deflated.stderr + 1e-9


def test_indefinite_quadratic_returns_largest_algebraic():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    spectrum = torch.linspace(-1.0, 2.0, 30, dtype=torch.float64)
    spectrum[0] = -50.0  # most negative, largest in magnitude
    A = q @ torch.diag(spectrum) @ q.T
    w = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    op = cw.HessianOperator(lambda: 0.5 * w @ A @ w + w.sum(), [w])
    eig = cw.lanczos(op, k=2, tol=1e-8, max_matvecs=30)
    torch.testing.assert_close(eig.eigenvalues, spectrum.sort(descending=True).values[:2], rtol=1e-8, atol=1e-10)
    assert eig.eigenvalues[0] > 0


def _mlp_problem():
    model, x, y = tanh_mlp_ce()
    closure = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    H = dense_hessian(
        model,
        lambda ps: torch.nn.functional.cross_entropy(torch.func.functional_call(model, ps, (x,)), y),
    )
    return model, x, y, closure, H


@pytest.mark.parametrize("method", EXACT + ("finite_difference",))
def test_tanh_mlp_against_dense_hessian(method):
    model, _, _, closure, H = _mlp_problem()
    exact = torch.linalg.eigvalsh(H).flip(0)
    eig = cw.lanczos(_op(method, model, closure), k=3, tol=1e-9, max_matvecs=H.shape[0])
    rtol = 1e-8 if method in EXACT else 1e-5
    torch.testing.assert_close(eig.eigenvalues, exact[:3], rtol=rtol, atol=1e-10)
    full = cw.lanczos(_op(method, model, closure), k=H.shape[0], tol=1e-12, max_matvecs=H.shape[0])
    assert full.eigenvalues.sum().item() == pytest.approx(torch.trace(H).item(), rel=1e-6)


def test_ggn_matches_softmax_ce_closed_form():
    model, x, y = tanh_mlp_ce()
    params = list(model.parameters())
    G = dense_ggn_ce(model, x)
    op = cw.GGNOperator(lambda: model(x), params, loss="cross_entropy", targets=y)
    v = torch.randn(op.size, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), G @ v, rtol=1e-9, atol=1e-12)
    eig = cw.lanczos(op, k=3, tol=1e-10, max_matvecs=op.size)
    torch.testing.assert_close(eig.eigenvalues, torch.linalg.eigvalsh(G).flip(0)[:3], rtol=1e-8, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD
    generic = cw.GGNOperator(lambda: model(x), params, loss=lambda z: torch.nn.functional.cross_entropy(z, y))
    torch.testing.assert_close(generic.matvec(v), G @ v, rtol=1e-9, atol=1e-12)


def test_ggn_mse_equals_hessian_for_linear_model():
    model, _, H = linear_regression()
    X, y = model.probe
    op = cw.GGNOperator(lambda: model(X).squeeze(-1) - y, list(model.parameters()), loss="mse")
    v = torch.randn(op.size, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)


def test_preconditioned_operator_similar_to_inverse_preconditioned_hessian():
    _, _, H = linear_regression(d=5)
    d = torch.tensor([1.0, 2.0, 0.5, 4.0, 3.0], dtype=torch.float64)
    op = cw.PreconditionedOperator(cw.DenseOperator(H), d)
    eig = cw.lanczos(op, k=2, tol=1e-12, max_matvecs=5)
    exact = torch.linalg.eigvals(torch.diag(1 / d) @ H).real.sort(descending=True).values[:2]
    torch.testing.assert_close(eig.eigenvalues, exact, rtol=1e-9, atol=0)
