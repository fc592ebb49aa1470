"""Triton cross-entropy curvature kernel against the eager reference (CUDA only).

Skipped without CUDA and triton. ``TRITON_INTERPRET=1`` with triton installed
runs the same checks on the CPU through Triton's interpreter (slow, debugging).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from curvwatch.kernels import cross_entropy_logit_hvp, select_backend
from curvwatch.kernels.cross_entropy import cross_entropy_logit_hvp_eager as eager_reference
from curvwatch.operators.lm_head import lm_head_ggn_product

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not HAS_TRITON or not (torch.cuda.is_available() or INTERPRET),
        reason="needs CUDA and triton (or TRITON_INTERPRET=1 with triton)",
    ),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(7, 37), (33, 1000)] if INTERPRET else [(7, 37), (33, 1000), (129, 50257), (64, 50304)]


def _problem(n, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c, generator=g) * 4).to(device=DEVICE, dtype=dtype)
    u = torch.randn(n, c, generator=g).to(device=DEVICE, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    y[:: max(n // 3, 2)] = -100
    return z, u, y.to(DEVICE)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n,c", SHAPES)
def test_triton_fp32_matches_eager(n, c):
    z, u, y = _problem(n, c, torch.float32)
    ref = eager_reference(z, u, y)
    out = cross_entropy_logit_hvp(z, u, y, backend="triton")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert out[y == -100].abs().max() == 0


@pytest.mark.parametrize("n,c", SHAPES)
def test_triton_bf16_accumulates_in_float32(n, c):
    z, u, y = _problem(n, c, torch.bfloat16, seed=1)
    exact = eager_reference(z.double(), u.double(), y)
    out = cross_entropy_logit_hvp(z, u, y, backend="triton")
    assert out.dtype == torch.bfloat16
    # only the output's bf16 rounding (2^-9 relative) remains
    assert _rel(out, exact) < 4e-3
    assert _rel(out, eager_reference(z, u, y)) < 8e-3


def test_triton_strided_rows_and_auto_choice():
    z, u, y = _problem(16, 2100, torch.float32, seed=2)
    zs, us = z[:, :2000], u[:, :2000]  # rows strided by 2100
    ref = eager_reference(zs, us, y)
    out = cross_entropy_logit_hvp(zs, us, y, backend="triton")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    if torch.cuda.is_available():
        assert select_backend(z, u) == "triton"


def test_compiled_matches_eager_on_device():
    if INTERPRET and not torch.cuda.is_available():
        pytest.skip("the compile path is covered on the CPU by tests/kernels/test_kernels.py")
    z, u, y = _problem(33, 50304, torch.float32, seed=3)
    ref = eager_reference(z, u, y)
    out = cross_entropy_logit_hvp(z, u, y, backend="compile")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_lm_head_product_triton_equals_eager():
    g = torch.Generator().manual_seed(4)
    n, d, v = 300, 32, 1000
    h, dh = (torch.randn(n, d, generator=g).to(DEVICE) for _ in range(2))
    W, dW = (torch.randn(v, d, generator=g).to(DEVICE) * 0.3 for _ in range(2))
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    y[:50] = -100
    kw = dict(hidden_tangent=dh, weight_tangent=dW, targets=y, chunk_size=128)
    a = lm_head_ggn_product(h, W, backend="triton", **kw)
    b = lm_head_ggn_product(h, W, backend="eager", **kw)
    # the head's matmuls may run in TF32 on the GPU: compare at 1e-4
    assert _rel(a.hidden, b.hidden) < 1e-4
    assert _rel(a.weight, b.weight) < 1e-4


def test_causal_lm_fused_ggn_on_device_equals_plain_ggn():
    if not torch.cuda.is_available():
        pytest.skip("CUDA only (the CPU version is in tests/kernels/test_kernels.py)")
    transformers = pytest.importorskip("transformers")
    import curvwatch as cw
    from curvwatch.operators.lm_head import causal_lm_ggn_operator

    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).cuda().eval()
    ids = torch.randint(0, 1000, (4, 32), device="cuda")
    labels = ids.clone()
    labels[0, :5] = -100
    params = [p for p in model.parameters() if p.requires_grad]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def logits():
        with sdpa_kernel(SDPBackend.MATH):
            return model(input_ids=ids).logits[:, :-1]

    plain = cw.GGNOperator(logits, params, "cross_entropy", targets=labels[:, 1:])
    fused = causal_lm_ggn_operator(model, {"input_ids": ids, "labels": labels}, chunk_size=40)
    a = cw.lanczos(plain, k=1, tol=1e-6, max_matvecs=25, seed=0).lambda_max
    b = cw.lanczos(fused, k=1, tol=1e-6, max_matvecs=25, seed=0).lambda_max
    assert b == pytest.approx(a, rel=1e-4)
