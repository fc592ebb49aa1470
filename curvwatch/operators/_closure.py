"""Plumbing shared by the model-based operators: checked losses and parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from curvwatch._errors import CurvatureError

Closure = Callable[[], torch.Tensor]

NO_SECOND_DERIVATIVE_MSG = (
    "the model has no second derivative here ({cause}). Use "
    "method='finite_difference' (two ordinary gradients per product), or, for "
    "scaled_dot_product_attention, run under "
    "torch.nn.attention.sdpa_kernel(SDPBackend.MATH); CurvatureMonitor does both "
    "with method='auto'"
)


def check_params(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Validate and listify the parameters a curvature operator differentiates.

    Raises:
        CurvatureError: no parameters, a parameter without ``requires_grad``, or
            mixed dtypes.
    """
    params = list(params)
    if not params:
        raise CurvatureError(
            "no trainable parameters: pass [p for p in model.parameters() if "
            "p.requires_grad] and make sure at least one requires grad"
        )
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise CurvatureError(f"parameter #{i} is a {type(p).__name__}, expected a tensor")
        if not p.requires_grad:
            raise CurvatureError(
                f"parameter #{i} (shape {tuple(p.shape)}) does not require grad; "
                "pass only trainable parameters"
            )
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise CurvatureError(
            f"parameters have mixed dtypes {sorted(map(str, dtypes))}; curvature "
            "vectors need one dtype: cast the model with model.to(dtype)"
        )
    if not params[0].dtype.is_floating_point:
        raise CurvatureError(f"parameters must be floating point, got {params[0].dtype}")
    return params


def checked_loss(closure: Closure) -> torch.Tensor:
    """Call ``closure`` and check that it returned a finite scalar tensor.

    Raises:
        CurvatureError: not a tensor, not a scalar, not differentiable, or NaN/inf.
    """
    loss = closure()
    if not isinstance(loss, torch.Tensor):
        raise CurvatureError(
            f"the loss closure returned {type(loss).__name__}, expected a scalar "
            "tensor; return the loss itself, e.g. criterion(model(x), y)"
        )
    if loss.numel() != 1:
        raise CurvatureError(
            f"the loss is not a scalar: shape {tuple(loss.shape)}; reduce it with "
            ".mean() (or use reduction='mean' in the criterion)"
        )
    loss = loss.reshape(())
    if not loss.requires_grad:
        raise CurvatureError(
            "the loss does not depend on the parameters (requires_grad=False); "
            "do not compute it under torch.no_grad() or from detached outputs"
        )
    if not torch.isfinite(loss.detach()).item():
        raise CurvatureError(non_finite_loss_message(loss.item()))
    return loss


def non_finite_loss_message(loss: float) -> str:
    """What a measurement says when the probe loss is NaN or inf (every curvature, the same words)."""
    return (
        f"the loss is {loss} on the probe batch; curvature of a non-finite "
        "loss is undefined: check the batch and the model for NaN/inf"
    )


def non_finite_batch_message(loss: float) -> str:
    """What a measurement says when the probe batch holds NaN/inf that the (finite) loss does not show."""
    return (
        f"the probe batch holds NaN/inf (the loss is {loss:.6g}, a saturating layer hides them); its "
        "curvature is undefined (the Jacobian multiplies inf by 0): check the batch for NaN/inf"
    )


def zeros_for_none(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]):
    """Replace ``None`` gradients (parameters unused by the loss) with zeros."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def is_missing_derivative(error: BaseException) -> bool:
    """True when autograd failed because an op has no (double) backward."""
    text = str(error)
    return (
        ("derivative for" in text and "not implemented" in text)
        or "differentiate twice" in text
        or "double backward" in text
        or "donated buffer" in text  # torch.compile's backward, compiled for a plain training step
    )
