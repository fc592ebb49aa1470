"""Matmul precision on a GPU: TF32 set by the training script must not reach a finite difference (CUDA only).

A training script that turns TF32 on (``torch.set_float32_matmul_precision("high")``,
``TrainingArguments(tf32=True)``) rounds every float32 matmul to a 10-bit
mantissa; a finite difference divides a gradient difference of relative size
``h`` by ``h`` and would amplify that rounding to tens of percent (+22% at 355M,
+58% at 124M with one-sided differences, measured on an H200). The measurement
runs its differences in full float32 whatever the script set, and gives the
script's setting back afterwards. On a CPU the setting has no effect: skipped.
"""

from __future__ import annotations

import pytest
import torch

import curvwatch as cw

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpt2_state():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2048, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        ids = torch.randint(0, 2048, (8, 128), generator=g).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ids = torch.randint(0, 2048, (8, 128), generator=g).cuda()
    return model, opt, {"input_ids": ids, "labels": ids}


def _measure(model, opt, probe, method, precision="auto"):
    monitor = cw.CurvatureMonitor(
        model, probe, optimizer=opt, top_k=1, trace=False, method=method, precision=precision, strict=True,
        update_sharpness=False, critical_sharpness=False,
        budget=cw.Budget(max_hvps=80, tol=1e-4, overhead=None),
    )
    return monitor.measure(0)


@pytest.mark.parametrize("method", ["finite_difference", "forward_difference"])
def test_differences_ignore_the_scripts_tf32(method):
    model, opt, probe = _gpt2_state()
    reference = _measure(model, opt, probe, "double_backward", precision="fp32")
    torch.set_float32_matmul_precision("high")  # what Lightning suggests on an H100/H200
    try:
        measured = _measure(model, opt, probe, method)
        assert torch.backends.cuda.matmul.allow_tf32  # the script's setting, given back
    finally:
        torch.set_float32_matmul_precision("highest")
    assert measured.precision == "fp32" and measured.method == method
    assert measured.preconditioned_lambda_max == pytest.approx(reference.preconditioned_lambda_max, rel=1e-2)
    assert measured.lambda_max == pytest.approx(reference.lambda_max, rel=1e-2)


def test_exact_products_in_tf32_stay_within_1e3():
    model, opt, probe = _gpt2_state()
    reference = _measure(model, opt, probe, "double_backward", precision="fp32")
    tf32 = _measure(model, opt, probe, "double_backward", precision="tf32")
    assert tf32.precision == "tf32"
    assert tf32.preconditioned_lambda_max == pytest.approx(reference.preconditioned_lambda_max, rel=1e-3)
