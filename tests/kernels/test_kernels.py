"""Cross-entropy curvature kernels: eager/compiled agreement, dispatcher, chunked LM head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import curvwatch as cw
from curvwatch.kernels import (
    cross_entropy_logit_hvp,
    logit_hvp_rows,
    mean_row_weights,
    select_backend,
)
from curvwatch.kernels.cross_entropy import cross_entropy_logit_hvp_eager as eager_reference
from curvwatch.operators.lm_head import (
    LMHeadGGNOperator,
    causal_lm_ggn_operator,
    lm_head_ggn_product,
)


def _problem(n=12, c=37, dtype=torch.float64, ignored=(1, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    u = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[list(ignored)] = -100
    return z, u, y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _double_backward(z, u, y):
    z = z.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(z, y, ignore_index=-100), z, create_graph=True)
    (hu,) = torch.autograd.grad(g, z, u)
    return hu


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_matches_autograd_double_backward_with_ignore_index(backend):
    z, u, y = _problem()
    out = cross_entropy_logit_hvp(z, u, y, -100, backend=backend)
    torch.testing.assert_close(out, _double_backward(z, u, y), rtol=1e-10, atol=1e-13)
    assert out[1].abs().max() == 0 and out[5].abs().max() == 0


def test_row_form_with_chunked_mean_equals_reference():
    z, u, y = _problem(n=10)
    whole = eager_reference(z, u, y)
    count = int((y != -100).sum())
    parts = [
        logit_hvp_rows(
            z[s : s + 4],
            u[s : s + 4],
            mean_row_weights(y[s : s + 4], len(y[s : s + 4]), count=count, dtype=z.dtype),
        )
        for s in range(0, 10, 4)
    ]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-15)


def test_auto_is_eager_on_cpu_and_env_forces(monkeypatch):
    z, u, _ = _problem(dtype=torch.float32)
    assert select_backend(z, u) == "eager"
    monkeypatch.setenv("CURVWATCH_CE_BACKEND", "compile")
    assert select_backend(z, u) == "compile"
    monkeypatch.setenv("CURVWATCH_CE_BACKEND", "fast")
    with pytest.raises(cw.CurvatureError, match="CURVWATCH_CE_BACKEND"):
        select_backend(z, u)


def test_bad_backend_and_shapes_name_the_fix():
    z, u, y = _problem(dtype=torch.float32)
    with pytest.raises(cw.CurvatureError, match="backend must be one of"):
        cross_entropy_logit_hvp(z, u, y, backend="cuda")
    with pytest.raises(cw.CurvatureError, match="does not match"):
        cross_entropy_logit_hvp(z, u[:, :-1], y)
    with pytest.raises(cw.CurvatureError, match="one per row"):
        cross_entropy_logit_hvp(z, u, y[:-1])
    if not torch.cuda.is_available():
        with pytest.raises(cw.CurvatureError, match="triton"):
            cross_entropy_logit_hvp(z, u, y, backend="triton")


def test_bf16_inputs_accumulate_in_float32():
    # A wide row: a bf16 accumulation of <p, u> over 8192 classes would be off
    # by ~1e-2; float32 accumulation leaves only the output's bf16 rounding.
    z, u, y = _problem(n=8, c=8192, dtype=torch.bfloat16, ignored=(3,))
    exact = eager_reference(z.double(), u.double(), y)
    out = cross_entropy_logit_hvp(z, u, y, backend="eager")
    assert out.dtype == torch.bfloat16
    assert _rel(out, exact) < 4e-3


@pytest.mark.slow
def test_compiled_agrees_with_eager():
    # torch.compile on a 2-core CPU: about 10-25 s for the two compilations.
    z, u, y = _problem(n=64, c=1000, dtype=torch.float32, ignored=(0, 7, 63))
    ref = eager_reference(z, u, y)
    out = cross_entropy_logit_hvp(z, u, y, backend="compile")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    zb, ub, yb = _problem(n=8, c=8192, dtype=torch.bfloat16, ignored=(3,))
    outb = cross_entropy_logit_hvp(zb, ub, yb, backend="compile")
    assert outb.dtype == torch.bfloat16
    assert _rel(outb, eager_reference(zb.double(), ub.double(), yb)) < 4e-3


# -- the chunked LM head ----------------------------------------------------------


def test_lm_head_product_matches_dense_head_with_bias():
    g = torch.Generator().manual_seed(0)
    n, d, v = 13, 6, 29
    h, dh = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    W, dW = torch.randn(v, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)
    b, db = torch.randn(v, generator=g, dtype=torch.float64), torch.randn(v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    y[[2, 9]] = -100
    gz = eager_reference(h @ W.T + b, dh @ W.T + h @ dW.T + db, y)
    for chunk in (1, 5, n):
        out = lm_head_ggn_product(
            h, W, b, hidden_tangent=dh, weight_tangent=dW, bias_tangent=db, targets=y, chunk_size=chunk
        )
        torch.testing.assert_close(out.hidden, gz @ W, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out.weight, gz.T @ h, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(out.bias, gz.sum(0), rtol=1e-10, atol=1e-14)


def test_lm_head_operator_equals_ggn_on_untied_biased_head():
    torch.manual_seed(0)
    emb, body = torch.nn.Embedding(31, 8).double(), torch.nn.Linear(8, 8).double()
    head = torch.nn.Linear(8, 31).double()
    ids = torch.randint(0, 31, (3, 7))
    y = torch.randint(0, 31, (3, 7))
    y[0, :2] = -100
    params = [*emb.parameters(), *body.parameters(), *head.parameters()]

    def hidden():
        return torch.tanh(body(emb(ids)))

    ggn = cw.GGNOperator(lambda: head(hidden()), params, "cross_entropy", targets=y)
    fused = LMHeadGGNOperator(hidden, params, head.weight, head.bias, y, chunk_size=4)
    v = torch.randn(fused.size, dtype=torch.float64)
    torch.testing.assert_close(fused.matvec(v), ggn.matvec(v), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(fused.matvec(2 * v), 2 * ggn.matvec(v), rtol=1e-10, atol=1e-13)


def _tiny_gpt2(tied: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 1000, (2, 16))
    labels = ids.clone()
    labels[1, :3] = -100
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_causal_lm_chunked_ggn_equals_plain_ggn(tied):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, batch = _tiny_gpt2(tied)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def logits():
        with sdpa_kernel(SDPBackend.MATH):
            return model(**inputs).logits[:, :-1]

    plain = cw.GGNOperator(logits, params, "cross_entropy", targets=batch["labels"][:, 1:])
    fused = causal_lm_ggn_operator(model, batch, chunk_size=7)
    v = torch.randn(plain.size)
    ref = plain.matvec(v)
    torch.testing.assert_close(fused.matvec(v), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    a = cw.lanczos(plain, k=1, tol=1e-6, max_matvecs=12, seed=0).lambda_max
    b = cw.lanczos(fused, k=1, tol=1e-6, max_matvecs=12, seed=0).lambda_max
    assert b == pytest.approx(a, rel=1e-4)


def test_causal_lm_rejects_transformed_logits():
    model, batch = _tiny_gpt2(tied=True)

    def soft_cap(module, args, out):  # logit soft-capping after the head
        out.logits = 0.05 * torch.tanh(out.logits / 0.05)
        return out

    model.register_forward_hook(soft_cap)
    with pytest.raises(cw.CurvatureError, match="transforms them"):
        causal_lm_ggn_operator(model, batch)
