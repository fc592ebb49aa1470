"""The float32 matmul precision of a measurement's products.

Training scripts often enable TF32 (``torch.set_float32_matmul_precision("high")``,
``TrainingArguments(tf32=True)``). Double backward under TF32 stays within 1e-4
of float32 on GPT-2-shaped models at about half the time (benchmarks/results), but
a finite difference divides a gradient difference of relative size ``h`` by
``h``: TF32's 1e-3 rounding of each gradient is then amplified to tens of
percent. So finite differences always run in full float32 (the precision their
step was chosen for), and exact products run in TF32 on CUDA unless the user
asks for ``precision="fp32"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "tf32"]
PRECISIONS = ("auto", "fp32", "tf32")
EXACT_METHODS = ("double_backward", "forward_over_reverse", "ggn", "ggn_lm_head")


def resolve_precision(precision: str, method: str, device: torch.device) -> str:
    """``"fp32"`` or ``"tf32"``: what the products of ``method`` on ``device`` run in.

    ``"auto"``: TF32 for exact products on CUDA; float32 otherwise. Finite
    differences are always float32, whatever was asked.
    """
    if method not in EXACT_METHODS or device.type != "cuda":
        return "fp32"
    return "tf32" if precision in ("auto", "tf32") else "fp32"


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Run float32 matmuls and convolutions in ``precision``; restore the settings after."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
