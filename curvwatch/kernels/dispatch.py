"""The backend dispatcher of the logit-space cross-entropy curvature product (see :mod:`curvwatch.kernels`)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from curvwatch._errors import CurvatureError
from curvwatch.kernels.cross_entropy import (
    cross_entropy_logit_hvp_eager,
    logit_hvp_rows_eager,
    mean_row_weights,
)

BACKENDS = ("auto", "triton", "compile", "eager")
BACKEND_ENV = "CURVWATCH_CE_BACKEND"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (no CUDA check)."""
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(
    logits: torch.Tensor, tangent: torch.Tensor | None = None, backend: str = "auto"
) -> str:
    """Resolve ``backend`` to the path that will run on these tensors.

    Args:
        logits: the logits (device, dtype and ``requires_grad`` decide).
        tangent: the tangent, if any (its ``requires_grad`` counts too).
        backend: ``"auto"``, ``"triton"``, ``"compile"`` or ``"eager"``.

    Returns:
        ``"triton"``, ``"compile"`` or ``"eager"``.

    Raises:
        CurvatureError: an unknown backend, or ``"triton"`` where it cannot run.
    """
    if backend not in BACKENDS:
        raise CurvatureError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
        if forced not in BACKENDS:
            raise CurvatureError(
                f"{BACKEND_ENV}={forced!r}: expected one of {BACKENDS}; unset it "
                "to let curvwatch choose"
            )
        backend = forced
    if backend == "auto":
        differentiable = torch.is_grad_enabled() and (
            logits.requires_grad or (tangent is not None and tangent.requires_grad)
        )
        if (
            not differentiable
            and logits.is_cuda
            and logits.dtype in _TRITON_DTYPES
            and triton_available()
        ):
            return "triton"
        return "eager"
    if backend == "triton":
        if not triton_available():
            raise CurvatureError(
                "backend='triton' needs the triton package (pip install triton); "
                "use backend='compile' or 'eager'"
            )
        if not (logits.is_cuda or _triton_interpreted()):
            raise CurvatureError(
                f"backend='triton' needs CUDA tensors, got device {logits.device}; "
                "move the tensors with .cuda() or use backend='eager'"
            )
        if logits.dtype not in _TRITON_DTYPES:
            raise CurvatureError(
                f"backend='triton' takes float32, float16 or bfloat16 logits, got "
                f"{logits.dtype}; use backend='eager' for {logits.dtype}"
            )
    return backend


def logit_hvp_rows(
    logits: torch.Tensor,
    tangent: torch.Tensor,
    weights: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """Row form ``w_i (p_i * u_i - p_i <p_i, u_i>)`` on ``(N, C)`` tensors.

    The building block of the chunked LM-head path: the caller supplies the
    per-row weights (:func:`mean_row_weights`), so a chunk of rows can carry the
    mean over the whole batch.

    Args:
        logits: ``(N, C)`` logits.
        tangent: ``(N, C)`` tangent.
        weights: ``(N,)`` per-row weights.
        backend: see :func:`select_backend`.

    Returns:
        ``(N, C)`` tensor in ``tangent``'s dtype.
    """
    path = select_backend(logits, tangent, backend)
    if path == "triton":
        from curvwatch.kernels._triton_ce import logit_hvp_rows_triton

        return logit_hvp_rows_triton(logits, tangent, weights)
    if path == "compile":
        from curvwatch.kernels._compiled import logit_hvp_rows_compiled

        return logit_hvp_rows_compiled(logits, tangent, weights)
    return logit_hvp_rows_eager(logits, tangent, weights)


def cross_entropy_logit_hvp(
    logits: torch.Tensor,
    tangent: torch.Tensor,
    targets: torch.Tensor | None = None,
    ignore_index: int = -100,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Return ``H_z u`` for the mean softmax cross-entropy, on the chosen backend.

    Same contract as the eager reference
    :func:`curvwatch.kernels.cross_entropy.cross_entropy_logit_hvp_eager`: rows whose
    target equals ``ignore_index`` are zero and excluded from the mean.

    Args:
        logits: ``(..., C)`` logits; float32/bfloat16/float16 accumulate in
            float32, float64 in float64.
        tangent: ``(..., C)`` tangent ``u``, same shape.
        targets: ``(...)`` class indices, or ``None`` (every row counts).
        ignore_index: the masked target value.
        backend: ``"auto"`` (default), ``"triton"``, ``"compile"`` or ``"eager"``.

    Returns:
        ``(..., C)`` tensor in ``tangent``'s dtype.

    Raises:
        CurvatureError: shapes disagree, or the backend cannot run here.

    Example:
        >>> z = torch.zeros(1, 2, dtype=torch.float64)
        >>> cross_entropy_logit_hvp(z, torch.tensor([[1.0, -1.0]], dtype=torch.float64))
        tensor([[ 0.5000, -0.5000]], dtype=torch.float64)
    """
    if logits.shape != tangent.shape:
        raise CurvatureError(
            f"tangent shape {tuple(tangent.shape)} does not match the logits' "
            f"{tuple(logits.shape)}"
        )
    rows = logits.numel() // max(logits.shape[-1], 1) if logits.ndim else 0
    if targets is not None and targets.numel() != rows:
        raise CurvatureError(
            f"targets have {targets.numel()} entries, expected one per row of the "
            f"logits ({rows})"
        )
    path = select_backend(logits, tangent, backend)
    if path == "eager":
        return cross_entropy_logit_hvp_eager(logits, tangent, targets, ignore_index)
    classes = logits.shape[-1]
    weights = mean_row_weights(targets, rows, ignore_index, device=logits.device)
    out = logit_hvp_rows(
        logits.reshape(rows, classes), tangent.reshape(rows, classes), weights, path
    )
    return out.reshape(tangent.shape)
