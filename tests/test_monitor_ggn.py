"""CurvatureMonitor(curvature="ggn"): the Gauss-Newton matrix in place of the Hessian."""

import pytest
import torch

import curvwatch as cw
from curvwatch.operators.lm_head import causal_lm_ggn_operator
from tests.cases import dense_ggn_ce, linear_regression, tanh_mlp_ce


def test_mlp_cross_entropy_ggn_matches_direct_operator_and_dense():
    model, x, y = tanh_mlp_ce()
    G = dense_ggn_ce(model, x)
    exact = torch.linalg.eigvalsh(G)
    assert exact.min().item() >= -1e-10  # positive semi-definite
    budget = cw.Budget(max_hvps=G.shape[0] + 10, trace_hvps=10, tol=1e-10)
    monitor = cw.CurvatureMonitor(
        model, (x, y), criterion=torch.nn.CrossEntropyLoss(), curvature="ggn",
        top_k=3, budget=budget, method="forward_difference", strict=True,
    )
    result = monitor.measure(0)
    assert result.method == "ggn"
    assert result.lambda_max == pytest.approx(exact[-1].item(), rel=1e-6)
    direct = cw.GGNOperator(lambda: model(x), list(model.parameters()), loss="cross_entropy", targets=y)
    eig = cw.lanczos(direct, k=3, tol=1e-10, max_matvecs=G.shape[0], seed=0)
    assert result.lambda_max == pytest.approx(eig.lambda_max, rel=1e-6)
    assert min(result.eigenvalues) >= -1e-10
    # the Hessian of the same loss differs (this MLP is not linear in its parameters)
    hessian = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.CrossEntropyLoss(),
                                  top_k=1, budget=budget, strict=True).measure(0)
    assert hessian.method == "double_backward"
    assert abs(hessian.lambda_max - result.lambda_max) > 1e-6 * result.lambda_max
    assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(model(x), y).item())


def test_cross_entropy_ignore_index_is_honoured():
    model, x, y = tanh_mlp_ce()
    y = y.clone()
    y[:8] = 7
    monitor = cw.CurvatureMonitor(
        model, (x, y), criterion=torch.nn.CrossEntropyLoss(ignore_index=7), curvature="ggn",
        top_k=1, trace=False, budget=cw.Budget(max_hvps=60, trace_hvps=0, tol=1e-10), strict=True,
    )
    kept = dense_ggn_ce(model, x[8:])
    assert monitor.measure(0).lambda_max == pytest.approx(torch.linalg.eigvalsh(kept)[-1].item(), rel=1e-6)


def test_linear_mse_ggn_equals_hessian():
    model, _, H = linear_regression()
    X, y = model.probe
    common = dict(criterion=torch.nn.MSELoss(), top_k=2, trace=False, strict=True,
                  budget=cw.Budget(max_hvps=H.shape[0] + 2, trace_hvps=0, tol=1e-10))  # + auto's symmetry check
    ggn = cw.CurvatureMonitor(model, (X, y.unsqueeze(-1)), curvature="ggn", **common).measure(0)
    hess = cw.CurvatureMonitor(model, (X, y.unsqueeze(-1)), **common).measure(0)
    assert ggn.method == "ggn" and hess.method == "double_backward"
    top = torch.linalg.eigvalsh(H)[-1].item()
    assert ggn.lambda_max == pytest.approx(hess.lambda_max, rel=1e-6)
    assert ggn.lambda_max == pytest.approx(top, rel=1e-6)


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 16), generator=g)
    labels = ids.clone()
    labels[1, :3] = -100
    return model, {"input_ids": ids, "labels": labels}


def test_causal_lm_ggn_uses_the_lm_head_path():
    model, batch = _tiny_gpt2()
    monitor = cw.CurvatureMonitor(
        model, batch, curvature="ggn", top_k=1, trace=False, strict=True,
        budget=cw.Budget(max_hvps=40, trace_hvps=0, tol=1e-8),
    )
    result = monitor.measure(0)
    assert result.method == "ggn_lm_head"
    direct = causal_lm_ggn_operator(model, batch)
    eig = cw.lanczos(direct, k=1, tol=1e-8, max_matvecs=40, seed=0)
    assert result.lambda_max > 0
    assert result.lambda_max == pytest.approx(eig.lambda_max, rel=1e-4)
    with torch.no_grad():
        assert result.loss == pytest.approx(model(**batch).loss.item(), rel=1e-6)
    assert monitor.measure(1).method == "ggn_lm_head"  # the head check ran only once; still works


def test_data_parallel_reduce_wraps_the_ggn():
    model, x, y = tanh_mlp_ce()
    calls = []

    def reduce(t):  # one process: the mean over ranks is the tensor itself
        calls.append(t.shape)
        return t

    result = cw.CurvatureMonitor(
        model, (x, y), criterion=torch.nn.CrossEntropyLoss(), curvature="ggn", reduce=reduce,
        top_k=1, trace=False, strict=True, budget=cw.Budget(max_hvps=20, trace_hvps=0),
    ).measure(0)
    assert result.method == "ggn" and len(calls) >= result.hvps


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(criterion=torch.nn.L1Loss()), "L1Loss.*curvature='hessian'"),
        (dict(criterion=torch.nn.CrossEntropyLoss(reduction="sum")), "reduction='mean'"),
        (dict(criterion=torch.nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64))), "weight"),
        (dict(criterion=torch.nn.MSELoss(reduction="sum")), "MSELoss"),
        (dict(loss_fn=lambda m, b: m(b[0]).sum()), "loss_fn"),
        (dict(criterion=torch.nn.CrossEntropyLoss(), batch_size=4), "batch sharpness"),
        (dict(criterion=torch.nn.CrossEntropyLoss(), curvature="kfac"), "unknown curvature"),
    ],
)
def test_bad_combinations_raise_at_construction(kwargs, match):
    model, x, y = tanh_mlp_ce()
    kwargs = {"curvature": "ggn", **kwargs}
    with pytest.raises(cw.CurvatureError, match=match):
        cw.CurvatureMonitor(model, (x, y), **kwargs)


def test_dict_batch_needs_a_causal_lm():
    model, x, _ = tanh_mlp_ce()
    with pytest.raises(cw.CurvatureError, match="causal LM"):
        cw.CurvatureMonitor(model, {"input_ids": x, "labels": x}, curvature="ggn")
    gpt, batch = _tiny_gpt2()
    with pytest.raises(cw.CurvatureError, match="'labels'"):
        cw.CurvatureMonitor(gpt, {"input_ids": batch["input_ids"]}, curvature="ggn")
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    ))
    with pytest.raises(cw.CurvatureError, match="BertForMaskedLM is not one"):
        cw.CurvatureMonitor(bert, batch, curvature="ggn")
