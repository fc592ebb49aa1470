"""What a monitor measures on, checked once when it is built: the model, the loss, the probe, the blocks.

:func:`prepare` checks the model against the settings (trainable parameters, a
supported layout, ``top_k`` within its size, blocks that match), turns the
loss specification into the probe's loss (:func:`curvwatch.probe.loss_closure_factory`)
and, for a curvature other than the Hessian, finds its output-space path
(:func:`~curvwatch.operators.factory.ggn_kind`); it moves the probe batch to the
model's device and wraps the training mini-batches of batch sharpness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, NamedTuple

import torch

from curvwatch._errors import CurvatureError
from curvwatch.blocks import block_patterns, resolve_blocks
from curvwatch.loaders import TrainingBatches
from curvwatch.measurement.context import Probe
from curvwatch.operators.factory import ggn_kind
from curvwatch.operators.sharded import check_supported
from curvwatch.probe import LossFn, known_length, loss_closure_factory, move_to


class Setup(NamedTuple):
    """What :func:`prepare` returns."""

    probe: Probe  # the batch on the model's device, its loss, where mini-batches come from
    options: Any  # the settings, blocks spelled out on the model
    minibatches: Iterable[Any] | None  # the training mini-batches, read through a private copy of a DataLoader


def prepare(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn | None,
    criterion: Callable | None,
    options: Any,
    minibatches: Iterable[Any] | None = None,
) -> Setup:
    """Check what is measured against ``options`` (:class:`~curvwatch.options.MonitorOptions`); build the probe.

    The ``blocks=`` shorthands are spelled out on ``model`` now: parameters
    frozen later must not move the blocks.

    Raises:
        CurvatureError: no ``nn.Module`` or no trainable parameter; an
            unsupported layout (DeepSpeed ZeRO-3); ``top_k`` above the number
            of trainable parameters; blocks that match nothing; a loss class
            where an instance is meant, or a bad loss specification; a
            curvature other than the Hessian without a known output-space
            path; ``minibatches`` without ``batch_size``, or a ``batch_size``
            above the probe batch it subsamples.
    """
    _check_model(model, options)
    resolve_blocks(model, options.blocks)  # a malformed spec or a pattern matching nothing raises here
    _check_loss_spec(loss_fn, criterion)
    if minibatches is not None and options.batch_size is None:
        raise CurvatureError("minibatches=... is for batch sharpness: also pass batch_size=<training batch size>")
    closure = loss_closure_factory(batch, loss_fn, criterion)
    kind = ggn_kind(model, batch, loss_fn, criterion, curvature=options.curvature) if options.output_space else None
    device = next(p for p in model.parameters() if p.requires_grad).device
    batch = move_to(batch, device) if device.type != "meta" else batch
    if options.batch_size is not None and minibatches is None and known_length(batch) < options.batch_size:
        raise CurvatureError(
            f"batch_size={options.batch_size} is larger than the probe batch ({known_length(batch)} "
            "examples), which batch sharpness subsamples: pass a larger probe batch, or "
            "minibatches=<the training loader>"
        )
    # A raw DataLoader is read through a private copy, so drawing from it never
    # advances training's sampler, generator or workers.
    if isinstance(minibatches, torch.utils.data.DataLoader):
        minibatches = TrainingBatches(minibatches)
    draw = None if minibatches is None else _Cycle(minibatches, model)
    probe = Probe(batch, closure, draw, criterion, kind)
    return Setup(probe, replace(options, blocks=block_patterns(model, options.blocks)), minibatches)


def _check_model(model: Any, options: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise CurvatureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise CurvatureError("the model has no trainable parameters (requires_grad=True)")
    check_supported(model)
    if options.top_k > trainable:
        raise CurvatureError(
            f"top_k={options.top_k} exceeds the number of trainable parameters ({trainable}): "
            f"the Hessian has {trainable} eigenvalues; pass top_k <= {trainable}"
        )


def _check_loss_spec(loss_fn: Any, criterion: Any) -> None:
    """Refuse a loss class where an instance is meant (it failed deep inside the first measurement)."""
    for name, fn in (("criterion", criterion), ("loss_fn", loss_fn)):
        if isinstance(fn, type):  # nn.CrossEntropyLoss, not nn.CrossEntropyLoss()
            cls = fn.__name__
            fix = f"criterion={cls}()" if issubclass(fn, torch.nn.Module) else f"an instance of {cls}"
            raise CurvatureError(f"{name}={cls} is a class: pass {fix}")


class _Cycle:
    """``draw()``: the next mini-batch of ``source`` (cycling through it), on the model's device."""

    def __init__(self, source: Iterable[Any], model: torch.nn.Module) -> None:
        self.source, self.model = source, model
        self._iterator: Any = None

    def __call__(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self.source)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.source)
            batch = next(self._iterator)
        return move_to(batch, next(self.model.parameters()).device)

