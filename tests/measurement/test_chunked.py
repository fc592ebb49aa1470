"""A probe batch split into pieces: the same products, one piece's activations, and a refusal when it cannot be."""

import warnings

import pytest
import torch

import curvwatch as cw
import curvwatch.measurement.source
import curvwatch.monitor
from curvwatch.measurement.chunked import pieces_of, split_probe
from curvwatch.operators.hessian import HessianOperator
from curvwatch.planning.memory import WORKING_VECTORS, ActivationGauge
from curvwatch.probe import hf_loss


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()


def _products(model, batch, loss_fn, pieces, scheme="central"):
    params = [p for p in model.parameters() if p.requires_grad]
    split = split_probe(model, batch, loss_fn, pieces) if pieces > 1 else None
    op = HessianOperator(lambda: loss_fn(model, batch), params, "finite_difference", scheme=scheme, pieces=split)
    torch.manual_seed(1)
    v = torch.randn(op.size, dtype=torch.float64)
    return op.matvec(v), op


def test_pieces_cover_the_batch_in_order():
    x = torch.arange(10).reshape(10, 1)
    parts = pieces_of((x, x), 4)
    assert [len(p[0]) for p in parts] == [2, 3, 2, 3]  # bounds i * 10 // 4
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert len(pieces_of((x, x), 50)) == 10  # never more pieces than examples


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_split_batch_gives_the_same_product(reduction):
    """Mean and sum losses over uneven pieces (3 pieces of 7 examples): the product of the whole batch."""
    model = _mlp()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    criterion = torch.nn.CrossEntropyLoss(reduction=reduction)

    def loss_fn(m, b):
        return criterion(m(b[0]), b[1])

    whole, op_whole = _products(model, (x, y), loss_fn, 1)
    split, _ = _products(model, (x, y), loss_fn, 3)
    # float64 differences at a step of ~1e-6 amplify the order of summation to ~1e-10
    torch.testing.assert_close(split, whole, rtol=1e-7, atol=1e-8)
    # forward differences: the cached gradient at theta and the loss are the sums too
    fwd_whole, op_a = _products(model, (x, y), loss_fn, 1, scheme="forward")
    fwd_split, op_b = _products(model, (x, y), loss_fn, 3, scheme="forward")
    torch.testing.assert_close(fwd_split, fwd_whole, rtol=1e-4, atol=1e-6)  # a step of 4.5e-9: rounding / h
    assert op_b.loss == pytest.approx(op_a.loss, rel=1e-12)


def test_a_causal_lm_with_ignored_labels_is_weighted_by_counted_tokens():
    """GPT-2's loss is a mean over shifted labels != -100: pieces with padding weigh by their tokens.

    (Its loss upcasts the logits to float32, so this runs in float32, where
    central differences of the same gradients agree to about 1e-4.)
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=31, n_positions=12,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 31, (4, 12))
    labels = ids.clone()
    labels[0, 5:] = -100  # padded sequences of different lengths
    labels[2, 9:] = -100
    batch = {"input_ids": ids, "labels": labels}
    params = list(model.parameters())
    pieces = split_probe(model, batch, hf_loss, 4)  # the monitor's loss for a dict batch without loss_fn
    assert [round(w * 34) for _, w in pieces] == [4, 11, 8, 11]  # shifted tokens counted per sequence
    by_examples = [(closure, 0.25) for closure, _ in pieces]
    torch.manual_seed(1)
    v = torch.randn(sum(p.numel() for p in params))

    def product(split):
        return HessianOperator(lambda: hf_loss(model, batch), params, "finite_difference", pieces=split).matvec(v)

    whole = product(None)
    assert (product(pieces) - whole).norm() <= 1e-3 * whole.norm()
    assert (product(by_examples) - whole).norm() >= 1e-1 * whole.norm()  # what equal weights would give


def test_a_loss_that_is_no_mean_over_the_pieces_is_not_split():
    """A median over examples is neither a mean nor a sum of pieces: a clear refusal."""
    model = _mlp()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)

    def loss_fn(m, b):
        return (m(b[0]) - b[1]).pow(2).sum(1).median()

    with pytest.raises(cw.CurvatureError, match="cannot be split into 2 pieces.*not a mean"):
        split_probe(model, (x, y), loss_fn, 2)


def test_exact_methods_refuse_pieces():
    model = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    split = split_probe(model, (x,), lambda m, b: m(b[0]).pow(2).mean(), 2)
    with pytest.raises(cw.CurvatureError, match="needs method='finite_difference'"):
        HessianOperator(lambda: None, list(model.parameters()), "double_backward", pieces=split)


def test_the_monitor_splits_the_probe_when_one_gradient_would_not_fit(monkeypatch):
    """With one product's activations larger than allowed, differences run on pieces of the probe.

    The activation estimate is CUDA-only, so it is set here to a number of our
    own: 8 parameter-sized vectors, with room for about 4 of them besides the
    working vectors and the basis. The measurement must then split the 16
    examples into pieces and give the unsplit value.
    """
    model = _mlp()
    torch.manual_seed(3)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    n = sum(p.numel() for p in model.parameters())
    vector = 8 * n
    monkeypatch.setattr(ActivationGauge, "activations", lambda self, method: 8 * vector)
    kwargs = dict(criterion=torch.nn.CrossEntropyLoss(), top_k=1, trace=False, method="finite_difference",
                  budget=cw.Budget(max_hvps=40, overhead=None, max_basis=4, tol=1e-6))
    # the working vectors + a basis of 4 + 8/pieces vectors of activations, with room for 2.5: 4 pieces
    working = WORKING_VECTORS["finite_difference"] + 4
    tight = cw.CurvatureMonitor(model, (x, y), budget=cw.Budget(
        max_hvps=40, overhead=None, max_basis=4, tol=1e-6, max_memory=(working + 2.5) * vector),
        **{k: v for k, v in kwargs.items() if k != "budget"})
    roomy = cw.CurvatureMonitor(model, (x, y), **kwargs)
    calls = []

    def spy(model, batch, loss_fn, pieces):  # the real split, recorded
        calls.append(pieces)
        return split_probe(model, batch, loss_fn, pieces)

    monkeypatch.setattr(curvwatch.measurement.source, "split_probe", spy)
    plan, method, pieces = tight._plan_memory()
    assert plan.fits and method is None and pieces == 4
    assert roomy._plan_memory()[2] == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*skipped")
        split, whole = tight.measure(0), roomy.measure(0)
    assert calls == [4]  # once per measurement, for the tight monitor only
    assert split.converged and whole.converged
    assert split.lambda_max == pytest.approx(whole.lambda_max, rel=1e-6)
