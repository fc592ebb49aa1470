r"""Measuring never changes training, and measures the loss that training descends.

:func:`measurement_guard` is entered around every measurement. Inside it:

* modules are in the measurement's modes (below); their ``training`` flags are
  restored afterwards;
* every buffer (BatchNorm running statistics, counters) is restored afterwards;
* the CPU and CUDA random number generator states are restored afterwards;
* autocast is off (curvature is measured in the parameters' dtype);
* ``scaled_dot_product_attention`` uses the math backend, which has a double
  backward (the fused CPU/CUDA kernels do not);
* gradients are enabled even when the caller runs under ``torch.no_grad()`` or
  ``torch.inference_mode()``.

``.grad`` is never read or written by the operators (they use
``torch.autograd.grad``), and finite differences restore the parameters from a
saved copy, so parameters and optimizer state are bit-exact afterwards.

A model that cannot be measured is refused on entry with the reason: parameters
or buffers on the ``meta`` device (no data), or parameters created under
``torch.inference_mode()`` (inference tensors never take part in autograd).

Which modes, and why
--------------------
The edge-of-stability comparison is about the optimizer's own dynamics, so the
curvature that matters is the curvature of the loss the optimizer descends: the
training loss, in the configuration training runs in. Two kinds of modules act
differently in train and eval mode, and they call for opposite treatment.

*Normalization layers with running statistics* (``BatchNorm*``,
``SyncBatchNorm``, ``InstanceNorm*`` with ``track_running_stats``: torch's
``_NormBase``) normalize with the batch's statistics in training. That makes the
training loss invariant along some directions (a bias feeding a BatchNorm, the
scale of the weights feeding it): gradient and curvature there are ~0. In eval
mode the running statistics are constants, those directions matter, and the
Hessian gains curvature the optimizer never meets. Under Adam it is worse: the
invariant directions have ``v ~ 0``, so ``P^-1 ~ 1 / eps``, and eval-mode
curvature there turns into a huge preconditioned sharpness. Measured on
Linear(10, 32) with bias -> BatchNorm1d -> ReLU -> Linear, 50 AdamW steps at
lr 1e-3: eval mode reports a preconditioned sharpness of 9.2e6, ratio 243, and
a spurious "crossed the edge-of-stability threshold"; with batch statistics the
same state gives 43, ratio 0.001 (``tests/test_train_mode.py``). So
normalization layers keep the mode training uses, which is their mode when the
measurement starts: train mode during training, eval mode for a BatchNorm that
training keeps frozen (fine-tuning with ``bn.eval()``, ``norm_eval=True``). The
statistics are those of the probe batch (of each rank's share under data
parallelism), so a probe batch of the training batch size measures the closest
thing to the training loss.

*Dropout* (and every other module that reads ``self.training`` to draw
randomness: attention dropout, stochastic depth, RNN dropout, router jitter)
draws a new mask at each forward. A loss closure with a new mask per call is a
different function at each call: Lanczos no longer iterates on one symmetric
matrix, and finite differences subtract losses of two different networks. Two
deterministic choices are cheap:

* one fixed mask for all products of a measurement. It measures the Hessian of
  one random draw of the training loss. Its top eigenvalue is biased upwards
  (``lambda_max`` is convex, so ``E[lambda_max(H_mask)] >= lambda_max(E[H_mask])``)
  and jumps from one measurement to the next with the mask;
* dropout off: the mean network. The expected training loss differs from its
  loss by the dropout penalty (a data-dependent regularizer that grows with the
  drop rate; Wager et al. 2013), but the difference changes slowly, the curve
  is smooth and comparable across steps, and it is the network one evaluates.

Dropout off is the default; the fixed mask is what ``train_mode=True`` gives.

So ``train_mode`` takes three values:

* ``None`` (auto): every module in eval mode except the normalization layers
  above, which keep their current mode. During training that is batch
  statistics with dropout off. A custom normalization layer that is not a
  ``_NormBase`` is measured in eval mode (pass ``train_mode=True`` for it).
* ``False``: every module in eval mode: the curvature of the inference loss
  (running statistics).
* ``True``: every module keeps its current mode (training's own configuration,
  dropout on), with one dropout mask per measurement: before every forward of
  ``model`` the random generators are reset to their state at entry, so every
  product of the measurement sees the same masks. (A ``loss_fn`` that calls a
  submodule directly, bypassing ``model.forward``, does not get this reset.)

When the measured normalization is not training's, the ratio is not comparable
with the threshold, and :func:`normalization_mismatch` says so (one warning of
the monitor): normalization layers with running statistics measured in eval
mode while the optimizer's statistics (its lr, Adam's second moments) were
gathered with them in train mode. That happens with ``train_mode=False``
during training, and with a ``measure()`` called while the whole model is in
``eval()`` (after a validation pass). Which mode training used is read off the
model as the measurement starts: a normalization layer in eval mode inside a
model in train mode is frozen by training itself (no warning); in a model
that is all in ``eval()``, training is taken to have used train mode.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch

from curvwatch._errors import CurvatureError

# BatchNorm*, SyncBatchNorm, LazyBatchNorm*, InstanceNorm*: layers with running statistics
_NORM_BASE = getattr(torch.nn.modules.batchnorm, "_NormBase", torch.nn.modules.batchnorm._BatchNorm)


def _math_attention() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    for device_type in {"cpu", device.type}:
        if device_type in ("cpu", "cuda", "xpu", "mps"):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
    return stack


def check_measurable(model: torch.nn.Module) -> None:
    """Refuse a model whose curvature cannot be computed, saying why.

    Raises:
        CurvatureError: a parameter or buffer on the meta device, or a parameter
            that is an inference tensor (created under ``torch.inference_mode()``).
    """
    parameters = list(model.named_parameters())  # one walk of the modules serves both checks
    for name, tensor in itertools.chain(parameters, model.named_buffers()):
        if tensor.is_meta:
            raise CurvatureError(
                f"meta tensors cannot be measured: {name} is on the meta device (a shape "
                "without data); materialize the model first, e.g. "
                "model.to_empty(device=...) and load its weights"
            )
    for name, param in parameters:
        if param.is_inference():
            raise CurvatureError(
                f"{name} was created under torch.inference_mode(): inference tensors cannot "
                "take part in autograd, so no curvature can be computed; create (or load) "
                "the model outside torch.inference_mode() (torch.no_grad() is fine)"
            )


def set_measurement_modes(model: torch.nn.Module, train_mode: bool | None) -> None:
    """Put ``model``'s modules in the modes of a measurement (see the module doc)."""
    if train_mode is True:
        return
    norm_modes = [(m, m.training) for m in model.modules() if isinstance(m, _NORM_BASE)]
    model.eval()
    if train_mode is None:
        for module, mode in norm_modes:
            module.training = mode


def normalization_mismatch(model: torch.nn.Module, train_mode: bool | None) -> str | None:
    """Why the measurement's normalization is not the one training used, or ``None`` (see the module doc).

    Called before :func:`measurement_guard` sets the measurement's modes.
    Only layers with running statistics count (``track_running_stats``): the
    others normalize with the batch's statistics in both modes.
    """
    mismatched = []
    for name, module in model.named_modules():
        if not isinstance(module, _NORM_BASE) or getattr(module, "running_mean", None) is None:
            continue
        trained_in_train_mode = module.training or not model.training
        measured_in_train_mode = module.training and train_mode is not False
        if trained_in_train_mode and not measured_in_train_mode:
            mismatched.append(f"{type(module).__name__} {name!r}")
    if not mismatched:
        return None
    shown = ", ".join(mismatched[:3]) + (f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else "")
    if train_mode is False:
        cause = "train_mode=False puts them in eval mode"
        fix = "pass train_mode=None (the default) or True to measure with training's batch statistics"
    else:
        cause = "the model is in eval() mode as the measurement starts"
        fix = "call measure() while the model is in train() mode (model.train() after a validation pass)"
    return (
        f"curvwatch: the curvature is measured with {shown} in eval mode (running statistics; {cause}), "
        "but the optimizer's statistics and lr were gathered with them in train mode (batch statistics): "
        "this is not the loss training descends, so the sharpness and its ratio to the threshold are not "
        "comparable (directions the batch statistics make flat have Adam second moments ~0, so their "
        "eval-mode curvature is divided by ~eps: ratios far above 1 that training never meets); "
        f"{fix}"
    )


@contextlib.contextmanager
def measurement_guard(model: torch.nn.Module, train_mode: bool | None = None) -> Iterator[None]:
    """Run a measurement on ``model`` without leaving a trace on it (see module doc).

    Args:
        model: the model to measure.
        train_mode: ``None`` (auto: normalization layers in the mode training
            uses, everything else in eval mode), ``False`` (eval mode) or
            ``True`` (modes as they are, one dropout mask per measurement).

    Raises:
        CurvatureError: on entry, a model on the meta device or with parameters
            created under ``torch.inference_mode()``; a ``train_mode`` that is
            not ``None``, ``True`` or ``False``.
    """
    if train_mode not in (None, True, False):
        raise CurvatureError(f"train_mode must be None (auto), True or False, got {train_mode!r}")
    check_measurable(model)
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    def same_masks(module, args) -> None:  # one dropout mask for every product
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    hook = model.register_forward_pre_hook(same_masks) if train_mode is True else None
    try:
        set_measurement_modes(model, train_mode)
        with torch.inference_mode(False), torch.enable_grad(), _autocast_off(device), _math_attention():
            yield
    finally:
        if hook is not None:
            hook.remove()
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
