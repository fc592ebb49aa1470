"""The held-out probe batch turned into a scalar-loss closure.

Three ways to say what the loss is, checked at construction:

* ``loss_fn(model, batch) -> scalar``: anything;
* ``criterion(model(inputs), targets)``: ``batch = (inputs, targets)``;
* neither: ``model(**batch).loss`` (Hugging Face models with ``labels``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from curvwatch._errors import CurvatureError

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor (dicts, lists, tuples, namedtuples)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (dicts, lists, tuples, HF BatchEncoding)."""
    return map_tensors(batch, lambda t: t.to(device))


def _hf_loss(model: torch.nn.Module, batch: Mapping) -> torch.Tensor:
    outputs = model(**batch)
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise CurvatureError(
            "model(**batch) returned no loss: put 'labels' in the probe batch, or pass "
            "loss_fn=lambda model, batch: ... / criterion=..."
        )
    return loss


def loss_closure_factory(
    batch: Any, loss_fn: LossFn | None = None, criterion: Callable | None = None
) -> LossFn:
    """Validate the loss specification and return ``loss_fn(model, batch)``.

    Raises:
        CurvatureError: both ``loss_fn`` and ``criterion`` given, a batch shape
            that does not fit the specification, or no batch.
    """
    if batch is None:
        raise CurvatureError("no probe batch: pass batch=<a held-out batch of inputs (and targets)>")
    if loss_fn is not None and criterion is not None:
        raise CurvatureError("pass loss_fn or criterion, not both")
    if loss_fn is not None:
        if not callable(loss_fn):
            raise CurvatureError("loss_fn must be callable: loss_fn(model, batch) -> scalar loss")
        return loss_fn
    if criterion is not None:
        if not callable(criterion):
            raise CurvatureError("criterion must be callable: criterion(outputs, targets) -> loss")
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise CurvatureError(
                f"with criterion=..., the probe batch must be (inputs, targets); got "
                f"{type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        return lambda model, b: criterion(model(b[0]), b[1])
    if isinstance(batch, Mapping):
        return _hf_loss
    raise CurvatureError(
        f"the probe batch is a {type(batch).__name__} and no loss was given: for "
        "(inputs, targets) batches pass criterion=torch.nn.CrossEntropyLoss() (or "
        "similar); otherwise pass loss_fn=lambda model, batch: ...; dict batches with "
        "'labels' work as they are (model(**batch).loss)"
    )


def first_batch(loader: Any) -> Any:
    """The first batch of ``loader``, leaving training exactly as it was.

    Fetching a batch must not change what training sees next, so a
    ``torch.utils.data.DataLoader`` is read through a single-process copy (same
    dataset and collate function, its own copy of the sampler): no workers are
    started, a ``persistent_workers`` iterator that training is using is never
    reset, and a sampler's own generator is not advanced; the global random
    states (torch CPU, Python ``random``, NumPy if loaded) are restored
    afterwards. See :mod:`curvwatch.loaders`.

    Args:
        loader: any iterable of batches (a ``DataLoader``, a list, ...).

    Raises:
        CurvatureError: ``loader`` yields no batch.
    """
    from curvwatch.loaders import TrainingBatches

    return next(iter(TrainingBatches(loader, empty="cannot take a probe batch from it")))
