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

from curvwatch.names import GGN_CRITERION, GGN_LM_HEAD, Method

Precision = Literal["auto", "fp32", "tf32"]
PRECISIONS = ("auto", "fp32", "tf32")
EXACT_METHODS = (Method.DOUBLE_BACKWARD, Method.FORWARD_OVER_REVERSE, GGN_CRITERION, GGN_LM_HEAD)


#: what products in a dtype other than float32 run in (TF32 only rounds float32 matmuls)
DTYPE_PRECISIONS = {torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


def resolve_precision(
    precision: str, method: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> str:
    """What the products of ``method`` on ``device`` in ``dtype`` run in: ``"fp32"``, ``"tf32"``...

    ``"auto"``: TF32 for exact float32 products on CUDA; float32 otherwise.
    Finite differences are always float32, whatever was asked. A model in
    another dtype is measured in its dtype: ``"fp64"``, ``"fp16"``, ``"bf16"``
    (a float64 model is no float32 one, and TF32 does not touch it).
    """
    if dtype in DTYPE_PRECISIONS:
        return DTYPE_PRECISIONS[dtype]
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
