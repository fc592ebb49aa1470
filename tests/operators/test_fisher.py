"""Fisher operators: the Monte-Carlo (true) Fisher and the empirical Fisher, against dense references."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import curvwatch as cw
from curvwatch.operators.factory import (
    FISHER_CURVATURES,
    GGN_CRITERION,
    GGN_LM_HEAD,
    build_fisher_operator,
    build_ggn_operator,
    ggn_kind,
)
from tests.cases import dense_hessian, tanh_mlp_ce

# Relative Frobenius error of the Monte-Carlo Fisher against its expectation (the GGN), measured
# as c / sqrt(N * mc_samples): c = 2.4 on average over 100 seeds (sd 0.6, max 4.2) for the linear
# softmax model below, 2.6 (max 3.8) for the token model, 2.8 (max 3.8) for the MSE one over 20
# seeds: each example's block errs by O(1/sqrt(mc_samples)) and N independent blocks average.
# The tests allow c = 8 (mean + 9 sd): seeds are fixed, so nothing is flaky, and a bias of 1.2%
# or more (e.g. a missing or doubled 1/N) fails.
MC_SLACK = 8.0


def dense(op: cw.CurvatureOperator) -> torch.Tensor:
    """The operator's matrix, one product per unit vector (column j = A e_j)."""
    eye = torch.eye(op.size, dtype=op.dtype)
    return torch.stack([op.matvec(eye[j]) for j in range(op.size)], dim=1)


def flat_grad(loss: torch.Tensor, params) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def linear_softmax(n: int = 24, d: int = 4, classes: int = 3):
    """Softmax regression: logits linear in the parameters, so Hessian = GGN = E[Fisher]."""
    torch.manual_seed(0)
    model = torch.nn.Linear(d, classes).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, x, y


def test_true_fisher_of_softmax_regression_is_the_hessian():
    model, x, y = linear_softmax()
    params = list(model.parameters())
    H = dense_hessian(model, lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))
    G = dense(cw.GGNOperator(lambda: model(x), params, targets=y))
    torch.testing.assert_close(G, H, rtol=1e-10, atol=1e-12)
    n, samples = x.shape[0], 20_000
    fisher = cw.MonteCarloFisherOperator(lambda: model(x), params, mc_samples=samples, seed=0)
    Fmc = dense(fisher)
    assert fisher.examples == n
    assert rel_err(Fmc, H) < MC_SLACK / math.sqrt(n * samples)  # 1.15%; measured 0.61% (seed 0)
    assert rel_err(Fmc, H) > 1e-6  # an estimate, not the closed form
    # one sample per example is a rank-N estimate, far from it: Monte Carlo, not a copy of the GGN
    one = dense(cw.MonteCarloFisherOperator(lambda: model(x), params, mc_samples=1, seed=0))
    assert torch.linalg.matrix_rank(one).item() <= n
    assert rel_err(one, H) > 0.1


def test_monte_carlo_fisher_is_the_mean_of_sampled_label_gradients():
    """Exactly (1/(N S)) sum_ik g_ik g_ik^T, g_ik the gradient of l_i at its k-th drawn label."""
    model, x, y = tanh_mlp_ce()
    params = list(model.parameters())
    samples = 3
    op = cw.MonteCarloFisherOperator(lambda: model(x), params, mc_samples=samples, seed=5)
    Fmc = dense(op)
    drawn = op._b.labels  # (S, N), drawn from softmax(model(x)) with seed 5
    assert drawn.shape == (samples, x.shape[0])
    logits = model(x)
    ref = torch.zeros_like(Fmc)
    for i in range(x.shape[0]):
        for k in range(samples):
            g = flat_grad(F.cross_entropy(logits[i : i + 1], drawn[k, i : i + 1]), params)
            ref += torch.outer(g, g)
    ref /= x.shape[0] * samples
    torch.testing.assert_close(Fmc, ref, rtol=1e-10, atol=1e-13)
    # the same draws as labels of the empirical Fisher give the same matrix (S = 1)
    one = cw.MonteCarloFisherOperator(lambda: model(x), params, seed=5)
    emp = cw.EmpiricalFisherOperator(lambda: model(x), params, targets=dense_labels(one))
    torch.testing.assert_close(dense(one), dense(emp), rtol=1e-12, atol=1e-14)


def dense_labels(op: cw.MonteCarloFisherOperator) -> torch.Tensor:
    op.matvec(torch.zeros(op.size, dtype=op.dtype))  # draws the labels
    return op._b.labels[0]


@pytest.mark.parametrize(
    "ignored, smoothing", [(0, 0.0), (7, 0.0), (0, 0.1), (7, 0.2)],
    ids=["plain", "ignore_index", "label_smoothing", "both"],
)
def test_empirical_fisher_equals_per_example_gradient_outer_products(ignored, smoothing):
    model, x, y = tanh_mlp_ce()
    params = list(model.parameters())
    y = y.clone()
    y[:ignored] = -100
    op = cw.EmpiricalFisherOperator(lambda: model(x), params, targets=y, label_smoothing=smoothing)
    E = dense(op)
    logits = model(x)
    grads = [
        flat_grad(F.cross_entropy(logits[i : i + 1], y[i : i + 1], label_smoothing=smoothing), params)
        for i in range(x.shape[0]) if y[i] != -100
    ]
    n = len(grads)
    assert op.examples == n == x.shape[0] - ignored
    ref = sum(torch.outer(g, g) for g in grads) / n
    torch.testing.assert_close(E, ref, rtol=1e-5, atol=1e-12)
    # the l_i are the examples of the mean loss: their mean gradient is the loss's gradient
    full = flat_grad(F.cross_entropy(logits, y, label_smoothing=smoothing), params)
    torch.testing.assert_close(sum(grads) / n, full, rtol=1e-10, atol=1e-14)


def test_empirical_fisher_with_soft_targets():
    model, x, y = tanh_mlp_ce()
    params = list(model.parameters())
    soft = torch.softmax(torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(3), dtype=x.dtype), -1)
    E = dense(cw.EmpiricalFisherOperator(lambda: model(x), params, targets=soft, label_smoothing=0.1))
    logits = model(x)
    grads = [flat_grad(F.cross_entropy(logits[i : i + 1], soft[i : i + 1], label_smoothing=0.1), params)
             for i in range(x.shape[0])]
    ref = sum(torch.outer(g, g) for g in grads) / len(grads)
    torch.testing.assert_close(E, ref, rtol=1e-10, atol=1e-13)


def _token_model():
    """(N, d, T) -> (N, C, T) logits (class dimension 1, as CrossEntropyLoss takes them)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(3, 4, 1), torch.nn.Tanh(), torch.nn.Conv1d(4, 5, 1)
    ).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (3, 6), generator=g)
    y[0, :2] = -100
    y[2, 5] = -100
    return model, x, y


def test_factory_token_outputs_each_counted_token_is_an_example():
    model, x, y = _token_model()
    params = list(model.parameters())
    criterion = torch.nn.CrossEntropyLoss()
    assert ggn_kind(model, (x, y), None, criterion, curvature="empirical_fisher") == GGN_CRITERION
    op = build_fisher_operator(model, (x, y), criterion, params, GGN_CRITERION, empirical=True)
    assert isinstance(op, cw.EmpiricalFisherOperator)
    E = dense(op)
    logits = model(x)  # (N, C, T)
    grads = [
        flat_grad(F.cross_entropy(logits[i, :, t][None], y[i, t][None]), params)
        for i in range(y.shape[0]) for t in range(y.shape[1]) if y[i, t] != -100
    ]
    assert op.examples == len(grads) == 15
    ref = sum(torch.outer(g, g) for g in grads) / len(grads)
    torch.testing.assert_close(E, ref, rtol=1e-5, atol=1e-13)
    torch.testing.assert_close(sum(grads) / len(grads), flat_grad(criterion(logits, y), params))
    # the true Fisher through the factory: its expectation is the factory's GGN
    samples = 20_000
    mc = build_fisher_operator(model, (x, y), criterion, params, GGN_CRITERION, empirical=False,
                               mc_samples=samples, seed=1)
    assert isinstance(mc, cw.MonteCarloFisherOperator) and mc.mc_samples == samples
    G = dense(build_ggn_operator(model, (x, y), criterion, params, GGN_CRITERION))
    assert rel_err(dense(mc), G) < MC_SLACK / math.sqrt(15 * samples)


def _tanh_regression(n: int = 30):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return model, x, y


def test_mse_monte_carlo_fisher_expectation_is_the_ggn():
    model, x, y = _tanh_regression()
    params = list(model.parameters())
    G = dense(cw.GGNOperator(lambda: model(x), params, loss="mse"))
    samples = 20_000
    Fmc = dense(cw.MonteCarloFisherOperator(lambda: model(x), params, loss="mse", mc_samples=samples, seed=0))
    assert rel_err(Fmc, G) < MC_SLACK / math.sqrt(x.shape[0] * samples)  # 1.03%; measured 0.33% (seed 0)
    # and through the factory, MSELoss(mean): the same draws
    op = build_fisher_operator(model, (x, y), torch.nn.MSELoss(), params, GGN_CRITERION,
                               empirical=False, mc_samples=samples, seed=0)
    torch.testing.assert_close(dense(op), Fmc, rtol=1e-12, atol=1e-15)


def test_mse_empirical_fisher_equals_per_example_gradient_outer_products():
    model, x, y = _tanh_regression()
    params = list(model.parameters())
    op = build_fisher_operator(model, (x, y), torch.nn.MSELoss(), params, GGN_CRITERION, empirical=True)
    E = dense(op)
    out = model(x)
    grads = [flat_grad(F.mse_loss(out[i], y[i]), params) for i in range(x.shape[0])]
    ref = sum(torch.outer(g, g) for g in grads) / len(grads)
    torch.testing.assert_close(E, ref, rtol=1e-5, atol=1e-13)
    torch.testing.assert_close(sum(grads) / len(grads), flat_grad(F.mse_loss(out, y), params))


def test_symmetric_psd_and_deterministic():
    model, x, y = tanh_mlp_ce()
    params = list(model.parameters())
    op = cw.MonteCarloFisherOperator(lambda: model(x), params, targets=y, mc_samples=2, seed=3)
    M = dense(op)
    torch.testing.assert_close(M, M.T, rtol=0, atol=1e-15)
    eig = torch.linalg.eigvalsh(M)
    assert eig.min().item() > -1e-14 * eig.max().item()
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    first = op.matvec(v)
    assert torch.equal(op.matvec(v), first)  # the draws are fixed across products
    op.release()
    assert torch.equal(op.matvec(v), first)  # and redrawn identically after release()
    same = cw.MonteCarloFisherOperator(lambda: model(x), params, targets=y, mc_samples=2, seed=3)
    assert torch.equal(same.matvec(v), first)
    other = cw.MonteCarloFisherOperator(lambda: model(x), params, targets=y, mc_samples=2, seed=4)
    assert not torch.allclose(other.matvec(v), first)
    # a fixed matrix is what Lanczos needs: its top eigenvalue is the dense one
    top = cw.lanczos(op, k=1, tol=1e-10, max_matvecs=op.size, seed=0)
    assert top.lambda_max == pytest.approx(eig[-1].item(), rel=1e-8)
    E = dense(cw.EmpiricalFisherOperator(lambda: model(x), params, targets=y))
    torch.testing.assert_close(E, E.T, rtol=0, atol=1e-15)


def test_bad_inputs_name_the_fix():
    model, x, y = tanh_mlp_ce()
    params = list(model.parameters())
    assert FISHER_CURVATURES == ("fisher", "empirical_fisher")
    with pytest.raises(cw.CurvatureError, match=r"curvature='fisher' does not know .*L1Loss.*CrossEntropyLoss"):
        ggn_kind(model, (x, y), None, torch.nn.L1Loss(), curvature="fisher")
    with pytest.raises(cw.CurvatureError, match=r"curvature='empirical_fisher' cannot take loss_fn.*likelihood"):
        ggn_kind(model, (x, y), lambda m, b: m(b[0]).sum(), None, curvature="empirical_fisher")
    with pytest.raises(cw.CurvatureError, match=r"L1Loss.*pass curvature='hessian'"):
        build_fisher_operator(model, (x, y), torch.nn.L1Loss(), params, GGN_CRITERION, empirical=False)
    with pytest.raises(cw.CurvatureError, match=r"'cross_entropy' or 'mse', got 'l1'"):
        cw.MonteCarloFisherOperator(lambda: model(x), params, loss="l1")
    with pytest.raises(cw.CurvatureError, match=r"use GGNOperator"):
        cw.EmpiricalFisherOperator(lambda: model(x), params, loss=lambda out: out.sum(), targets=y)
    with pytest.raises(cw.CurvatureError, match=r"pass targets=y"):
        cw.EmpiricalFisherOperator(lambda: model(x), params)
    with pytest.raises(cw.CurvatureError, match=r"mc_samples must be an integer >= 1, got 0"):
        cw.MonteCarloFisherOperator(lambda: model(x), params, mc_samples=0)
    op = cw.EmpiricalFisherOperator(lambda: model(x), params, targets=y[:5])
    with pytest.raises(cw.CurvatureError, match=r"5 entries for 24 rows.*one class index per row"):
        op.matvec(torch.zeros(op.size, dtype=torch.float64))
    op = cw.MonteCarloFisherOperator(lambda: model(x), params, targets=torch.full_like(y, -100))
    with pytest.raises(cw.CurvatureError, match=r"every target is ignore_index=-100"):
        op.matvec(torch.zeros(op.size, dtype=torch.float64))
    op = cw.EmpiricalFisherOperator(lambda: model(x).detach(), params, targets=y)
    with pytest.raises(cw.CurvatureError, match=r"not detached"):
        op.matvec(torch.zeros(op.size, dtype=torch.float64))


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (2, 8), generator=g)
    labels = ids.clone()
    labels[1, :3] = -100
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_causal_lm_fisher_shifts_the_labels():
    model, batch = _tiny_gpt2()
    params = [p for p in model.parameters() if p.requires_grad]
    kind = ggn_kind(model, batch, None, None, curvature="empirical_fisher")
    assert kind == GGN_LM_HEAD
    op = build_fisher_operator(model, batch, None, params, kind, empirical=True)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ev = op.matvec(v)
    logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"]
    grads = [
        flat_grad(F.cross_entropy(logits[b, t][None], labels[b, t + 1][None]), params)
        for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1) if labels[b, t + 1] != -100
    ]
    assert op.examples == len(grads) == 2 * 7 - 2  # the first label of each row predicts nothing
    torch.testing.assert_close(sum(grads) / len(grads), flat_grad(model(**batch).loss, params))
    ref = sum(g * torch.dot(g, v) for g in grads) / len(grads)
    torch.testing.assert_close(ev, ref, rtol=1e-5, atol=1e-12)
    mc = build_fisher_operator(model, batch, None, params, kind, empirical=False, mc_samples=2, seed=0)
    u = torch.randn(op.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.dot(u, mc.matvec(v)).item() == pytest.approx(torch.dot(v, mc.matvec(u)).item(), rel=1e-10)
    assert torch.dot(v, mc.matvec(v)).item() > 0


# -- the monitor ------------------------------------------------------------------------------------
def _monitor(model, x, y, curvature, **kwargs):
    return cw.CurvatureMonitor(
        model, (x, y), criterion=torch.nn.CrossEntropyLoss(), curvature=curvature, top_k=1, trace=False,
        strict=True, budget=cw.Budget(max_hvps=40, trace_hvps=0, tol=1e-8, overhead=None), **kwargs,
    )


def test_monitor_fisher_top_eigenvalue_is_the_ggns_within_monte_carlo_error():
    """Softmax regression is linear in its parameters: E[Fisher] = GGN = Hessian; one label per example."""
    n = 4000
    model, x, y = linear_softmax(n=n)
    ggn = _monitor(model, x, y, "ggn").measure(3)
    fisher = _monitor(model, x, y, "fisher").measure(3)
    assert fisher.method == "fisher" and ggn.method == "ggn" and fisher.converged
    assert fisher.lambda_max == pytest.approx(ggn.lambda_max, rel=MC_SLACK / math.sqrt(n))  # 12.6%
    assert fisher.lambda_max != ggn.lambda_max  # an estimate
    # the labels are drawn with seed + step: the same step gives the same matrix, another step another one
    again = _monitor(model, x, y, "fisher").measure(3)
    other = _monitor(model, x, y, "fisher").measure(4)
    assert again.lambda_max == pytest.approx(fisher.lambda_max, rel=1e-8)
    assert other.lambda_max != pytest.approx(fisher.lambda_max, rel=1e-8)
    H = dense_hessian(model, lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))
    assert ggn.lambda_max == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-6)


def test_monitor_empirical_fisher_top_eigenvalue_is_the_dense_one():
    model, x, y = linear_softmax(n=40)
    params = list(model.parameters())
    grads = torch.stack([flat_grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params) for i in range(40)])
    dense_emp = grads.T @ grads / 40
    result = _monitor(model, x, y, "empirical_fisher").measure(0)
    assert result.method == "empirical_fisher" and result.converged
    assert result.lambda_max == pytest.approx(torch.linalg.eigvalsh(dense_emp)[-1].item(), rel=1e-6)


def test_monitor_fisher_refuses_batch_sharpness_and_unknown_losses():
    model, x, y = linear_softmax()
    with pytest.raises(cw.CurvatureError, match="curvature='fisher'.*drop batch_size"):
        cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.CrossEntropyLoss(), curvature="fisher", batch_size=4)
    with pytest.raises(cw.CurvatureError, match=r"curvature='empirical_fisher' does not know .*L1Loss"):
        cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.L1Loss(), curvature="empirical_fisher")


def test_monitor_fisher_with_more_samples_per_example_is_closer_to_the_ggn():
    """mc_samples=S draws S labels per example: the error bound falls as 1/sqrt(N S)."""
    n = 400
    model, x, y = linear_softmax(n=n)
    ggn = _monitor(model, x, y, "ggn").measure(3).lambda_max
    many = _monitor(model, x, y, "fisher", mc_samples=50).measure(3).lambda_max
    assert many == pytest.approx(ggn, rel=MC_SLACK / math.sqrt(n * 50))  # 5.7%; one sample: 40%
    with pytest.raises(cw.CurvatureError, match="mc_samples must be a positive integer"):
        _monitor(model, x, y, "fisher", mc_samples=0)


# -- a probe batch with NaN or inf (issue 25, item 10) ------------------------------------------------
@pytest.mark.parametrize("curvature", ["hessian", "ggn", *FISHER_CURVATURES])
@pytest.mark.parametrize(
    ("case", "loss"),
    [("nan input", "nan"), ("inf input", "nan"), ("nan target", "nan"), ("inf target", "inf")],
)
def test_non_finite_probe_batch_names_the_loss_like_the_hessian(curvature, case, loss):
    """Not a linear-algebra error ('linalg.eigh failed', 'probability tensor contains inf, nan')."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    bad = float(case.split()[0])
    if case.endswith("input"):
        x[3, 1] = bad
    else:
        y[5, 0] = bad
    monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), curvature=curvature, top_k=1,
                                  trace=False, strict=True)
    message = rf"^the loss is {loss} on the probe batch; curvature of a non-finite"
    if case == "inf input" and curvature != "hessian":  # tanh saturates: a finite loss, a NaN Jacobian (0 * inf)
        message = r"^the probe batch holds NaN/inf \(the loss is 1\.\d+, a saturating layer hides them\)"
    with pytest.raises(cw.CurvatureError, match=message):
        monitor.measure(1)


@pytest.mark.parametrize("curvature", ["ggn", *FISHER_CURVATURES])
def test_non_finite_cross_entropy_probe_batch_names_the_loss(curvature):
    model, x, y = tanh_mlp_ce()
    x = x.clone()
    x[0, 0] = math.nan
    monitor = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.CrossEntropyLoss(), curvature=curvature,
                                  top_k=1, trace=False, strict=True)
    with pytest.raises(cw.CurvatureError, match=r"^the loss is nan on the probe batch"):
        monitor.measure(1)
