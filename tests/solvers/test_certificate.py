"""A converged value is a bound: warm starts, ordering, and what reaches the main curves."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import curvwatch as cw
from curvwatch.results import BlockResult
from curvwatch.solvers.certificate import certify_top
from curvwatch.solvers.lanczos import gap_steps
from tests._helpers import curves
from tests.cases import Kink

# The top of a tiny GPT-2's Hessian at initialization (issue 22): two eigenvalues 2.4% apart.
TOP = (13.164, 12.850, 12.015, 11.761)


def _close_top_operator(n: int = 300, seed: int = 0) -> tuple[cw.DenseOperator, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    bulk = torch.linspace(-2.0, 6.0, n - len(TOP), dtype=torch.float64)
    spectrum = torch.cat([torch.tensor(TOP, dtype=torch.float64), bulk])
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return cw.DenseOperator(q @ torch.diag(spectrum) @ q.T), q


@pytest.mark.parametrize("products", range(1, 16))
def test_a_warm_start_between_two_eigenvectors_is_never_certified_off_the_top(products):
    """A warm vector mixing the top two eigenvectors (Rayleigh quotient 12.90, no
    eigenvalue) once "converged" after 2 products with bound 9.5e-4: the gap came
    from a Krylov space of two vectors. Now a certified value is within tol."""
    op, q = _close_top_operator()
    warm = (0.166**0.5) * q[:, 0] + (0.834**0.5) * q[:, 1]
    eig = cw.lanczos(op, k=1, tol=1e-3, max_matvecs=products, v0=warm, seed=1)
    if eig.converged:
        assert abs(eig.lambda_max - TOP[0]) <= 2e-3 * TOP[0]
        assert abs(eig.lambda_max - TOP[0]) <= float(eig.error_bounds[0]) + 1e-9
    if products < gap_steps(1):
        assert not eig.converged  # the residual alone (0.12) is far from tol * theta


def test_the_warm_start_still_certifies_within_the_gap_steps():
    op, q = _close_top_operator()
    cold = cw.lanczos(op, k=1, tol=1e-3, max_matvecs=200)
    warm = cw.lanczos(op, k=1, tol=1e-3, max_matvecs=200, v0=cold.eigenvectors, seed=1)
    assert cold.converged and warm.converged
    assert warm.matvecs <= gap_steps(1) + 2 < cold.matvecs
    assert warm.lambda_max == pytest.approx(TOP[0], rel=1e-3)


def test_the_second_eigenvalue_waits_for_a_space_of_2k_plus_2():
    op, q = _close_top_operator()
    warm = torch.stack([q[:, 0], q[:, 1]], dim=1)
    for products in range(2, 12):
        eig = cw.lanczos(op, k=2, tol=1e-3, max_matvecs=products, v0=warm, seed=2)
        if eig.converged:
            torch.testing.assert_close(eig.eigenvalues, torch.tensor(TOP[:2], dtype=torch.float64), rtol=2e-3, atol=0)


def test_a_certificate_below_the_second_ritz_value_reorders_and_is_not_converged():
    op, _ = _close_top_operator()
    eig = cw.lanczos(op, k=2, tol=1e-6, max_matvecs=200)
    assert eig.converged

    # an "accurate" operator whose value at the top Ritz vector is lower: the order breaks
    shifted = cw.DenseOperator(op.matrix - 0.5 * torch.outer(eig.eigenvectors[:, 0], eig.eigenvectors[:, 0]))
    certified = certify_top(shifted, eig, 1e-6)
    assert certified.lambda_max == max(certified.eigenvalues.tolist()) == pytest.approx(TOP[1], rel=1e-6)
    assert certified.eigenvalues[1] == pytest.approx(TOP[0] - 0.5, rel=1e-6)
    assert not certified.converged


# -- only certified values on the curves ----------------------------------------------------------
def _mlp_monitor(tmp_path, budget: cw.Budget):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 1, dtype=torch.float64)
    sink = cw.TensorBoardSink(str(tmp_path))
    monitor = cw.CurvatureMonitor(
        model, (x, y), criterion=torch.nn.MSELoss(), top_k=2, trace=False, budget=budget, sinks=(sink,),
    )
    return monitor, sink


def test_an_uncertified_lambda_max_goes_to_the_diagnostics_not_the_curves(tmp_path):
    monitor, sink = _mlp_monitor(tmp_path, cw.Budget(max_hvps=3, trace_hvps=0, overhead=None))
    with pytest.warns(cw.CurvatureWarning, match="curvature_diagnostics/"):
        result = monitor.measure(1)
    sink.close()
    assert not result.converged and set(result.uncertified) == {"lambda_max", "eigenvalues"}
    scalars = result.scalars()
    assert "curvature/lambda_max" not in scalars and "curvature/lambda_1" not in scalars
    assert scalars["curvature_diagnostics/lambda_max"] == result.lambda_max
    assert scalars["curvature_diagnostics/lambda_2"] == result.eigenvalues[1]
    logged = curves(tmp_path)
    assert "curvature/lambda_max" not in logged
    assert logged["curvature_diagnostics/lambda_max"] == {1: pytest.approx(result.lambda_max)}
    assert logged["curvature_diagnostics/error_bound"][1] > 1e-3


def test_a_certified_lambda_max_is_on_the_curves(tmp_path):
    monitor, sink = _mlp_monitor(tmp_path, cw.Budget(max_hvps=80, trace_hvps=0, overhead=None))
    result = monitor.measure(1)
    sink.close()
    assert result.converged and result.uncertified == ()
    logged = curves(tmp_path)
    assert logged["curvature/lambda_max"] == {1: pytest.approx(result.lambda_max)}
    assert "curvature_diagnostics/lambda_max" not in logged
    assert result.lambda_max == max(result.eigenvalues) and not math.isnan(result.lambda_max)


def test_an_unconverged_block_is_logged_under_the_diagnostics():
    block = BlockResult(lambda_max=0.0179, hvps=2, converged=False)
    assert block.tags("fc") == {"curvature_diagnostics/block/fc/lambda_max": 0.0179}
    done = BlockResult(lambda_max=0.2771, hvps=9, converged=True)
    assert done.tags("fc") == {"curvature/block/fc/lambda_max": 0.2771}


# -- differences that know when they are wrong ---------------------------------------------------
def _kink_monitor(strict: bool) -> cw.CurvatureMonitor:
    # 3 float32 parameters: double backward needs (7 + 3) x 12 bytes, one-sided differences (5 + 3) x 12
    return cw.CurvatureMonitor(Kink(), torch.zeros(1), loss_fn=lambda m, b: m(b), top_k=1, trace=False,
                               strict=strict, budget=cw.Budget(max_memory=100, overhead=None))


def test_unreliable_differences_where_nothing_exact_fits_are_skipped_not_logged():
    monitor = _kink_monitor(strict=False)
    with pytest.warns(cw.CurvatureWarning) as caught:
        result = monitor.measure(1)
    messages = [str(w.message) for w in caught]
    assert result is None and monitor.history == []
    assert any("double backward would not fit" in m for m in messages), messages
    assert any("skipped" in m and "no reliable product fits" in m for m in messages), messages


def test_unreliable_differences_raise_under_strict():
    with pytest.raises(cw.CurvatureError, match="no reliable product fits"):
        with pytest.warns(cw.CurvatureWarning, match="double backward would not fit"):
            _kink_monitor(strict=True).measure(1)


def test_a_warm_start_sees_the_eigenvalue_that_overtook_the_top():
    """Between two measurements the second eigenvalue rises past the first (9.5 -> 10.6 over 10):
    from the old top vector alone Lanczos certifies 10; with the guard column it finds 10.6."""
    n = 2000
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    bulk = torch.linspace(-1.0, 4.0, n - 3, dtype=torch.float64)
    before = torch.cat([torch.tensor([10.0, 9.5, 8.0], dtype=torch.float64), bulk])
    after = before.clone()
    after[1] = 10.6
    first = cw.lanczos(cw.DenseOperator((q * before) @ q.T), k=1, tol=1e-6, max_matvecs=200, seed=0)
    assert first.converged and first.guard is not None
    operator = cw.DenseOperator((q * after) @ q.T)
    carried = torch.stack([first.eigenvectors[:, 0], first.guard], dim=1)  # what a monitor keeps
    warm = cw.lanczos(operator, k=1, tol=1e-3, max_matvecs=60, v0=carried, seed=1)
    assert warm.converged and warm.lambda_max == pytest.approx(10.6, rel=1e-3)
    blind = cw.lanczos(operator, k=1, tol=1e-3, max_matvecs=60, v0=first.eigenvectors, seed=1)
    assert blind.lambda_max < 10.6 * (1 - 1e-2)  # the old vector alone: the new top unseen


def test_a_rayleigh_quotient_that_agrees_certifies_nothing_its_residual_decides():
    """A one-sided solve settled on a mixture of the top two eigenvectors; the accurate quotient agrees.

    diag(2, 1, 0.5): y = (e1 + e2) / sqrt(2) has quotient 1.5 under the exact operator too, and residual
    0.5. Before, the certificate kept the cheap solve's "converged" and its bound (1.5 on a curve).
    """
    matrix = torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
    y = torch.tensor([[2**-0.5, 0.0], [2**-0.5, 0.0], [0.0, 1.0]], dtype=torch.float64)
    cheap = cw.LanczosResult(
        eigenvalues=torch.tensor([1.5, 0.5], dtype=torch.float64), eigenvectors=y,
        residuals=torch.tensor([1e-6, 1e-6], dtype=torch.float64), matvecs=10, converged=True,
        error_bounds=torch.tensor([1e-9, 1e-9], dtype=torch.float64),
    )
    checked = certify_top(cw.DenseOperator(matrix), cheap, 1e-3)
    assert checked.lambda_max == pytest.approx(1.5)
    assert checked.residuals[0] == pytest.approx(0.5)
    assert not checked.converged
    assert checked.relative_error_bound > 1e-3
    exact_vector = cheap.eigenvectors.clone()
    exact_vector[:, 0] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    good = certify_top(cw.DenseOperator(matrix), replace(cheap, eigenvectors=exact_vector), 1e-3)
    assert good.converged and good.lambda_max == pytest.approx(2.0)
