"""Measuring never changes training.

:func:`measurement_guard` is entered around every measurement. Inside it:

* modules are in eval mode (dropout off), unless ``train_mode=True``;
* every buffer (BatchNorm running statistics, counters) is restored afterwards;
* the CPU and CUDA random number generator states are restored afterwards;
* autocast is off (curvature is measured in the parameters' dtype);
* ``scaled_dot_product_attention`` uses the math backend, which has a double
  backward (the fused CPU/CUDA kernels do not);
* gradients are enabled even when the caller runs under ``no_grad``.

``.grad`` is never read or written by the operators (they use
``torch.autograd.grad``), and finite differences restore the parameters from a
saved copy, so parameters and optimizer state are bit-exact afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


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


@contextlib.contextmanager
def measurement_guard(model: torch.nn.Module, train_mode: bool = False) -> Iterator[None]:
    """Run a measurement on ``model`` without leaving a trace on it (see module doc)."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    if not train_mode:
        model.eval()
    try:
        with torch.enable_grad(), _autocast_off(device), _math_attention():
            yield
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
