"""The held-out probe batch: its structure (examples, shares, subsets, devices) and its loss closure.

Three ways to say what the loss is, checked at construction:

* ``loss_fn(model, batch) -> scalar``: anything;
* ``criterion(model(inputs), targets)``: ``batch = (inputs, targets)``;
* neither: ``model(**batch).loss`` (Hugging Face models with ``labels``).

Also checked at construction, so that a bad probe fails with its reason rather
than as a NaN loss or a raw error deep inside a measurement: a probe batch with
no examples, a batch holding meta tensors, a ``loss_fn`` or ``criterion`` that
cannot be called with two arguments, and a loss module (``nn.CrossEntropyLoss()``)
passed as ``loss_fn``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from curvwatch._errors import CurvatureError

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor (dicts, lists, tuples, namedtuples).

    Not ``torch.utils._pytree.tree_map``: pytree treats a ``Mapping`` subclass
    it has no registration for (Hugging Face's ``BatchEncoding``) as a leaf, and
    would leave the tensors inside it where they are.
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def tensors_of(batch: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``batch`` (dicts, lists, tuples, namedtuples), depth first."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from tensors_of(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from tensors_of(value)


def batch_length(batch: Any) -> int:
    """Number of examples in a batch (leading dimension of its tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return batch_length(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return batch_length(batch[0])
    raise CurvatureError(f"cannot find the batch dimension of a {type(batch).__name__}")


def known_length(batch: Any) -> float:
    """Examples in ``batch``; infinity where its batch dimension cannot be told."""
    try:
        return batch_length(batch)
    except CurvatureError:
        return math.inf


def take(batch: Any, index: torch.Tensor) -> Any:
    """The examples ``index`` of a batch (tensors indexed on dim 0)."""
    return map_tensors(batch, lambda t: t[index.to(t.device)])


def process_share(batch: Any, rank: int, world_size: int) -> Any:
    """Rows ``[rank * n / R, (rank + 1) * n / R)`` of a batch of ``n`` examples.

    Under data parallelism each of ``R`` processes measures its share; with a
    mean loss the average of the shares' Hessians is the whole batch's.

    Raises:
        CurvatureError: ``n`` is not a multiple of ``R``.
    """
    if world_size == 1:
        return batch
    n = batch_length(batch)
    if n % world_size:
        raise CurvatureError(
            f"the probe batch has {n} examples, which does not split evenly across "
            f"{world_size} processes: pass a multiple of {world_size} examples, or give "
            "each process its own equal share"
        )
    size = n // world_size
    return take(batch, torch.arange(rank * size, (rank + 1) * size))


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (dicts, lists, tuples, HF BatchEncoding).

    An inference tensor (made under ``torch.inference_mode()``) is copied into
    an ordinary one when this runs outside inference mode, so that autograd can
    use it.

    Raises:
        CurvatureError: a tensor on the meta device (no data to move).
    """
    target = torch.device(device)

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.is_meta and target.type != "meta":
            raise CurvatureError(_META_BATCH.format(shape=tuple(t.shape)))
        t = t.to(target)
        if t.is_inference() and not torch.is_inference_mode_enabled():
            t = t.clone()
        return t

    return map_tensors(batch, move)


_META_BATCH = (
    "meta tensors cannot be measured: the probe batch holds a tensor on the meta device "
    "(shape {shape}, no data); pass a batch with real data"
)


def hf_loss(model: torch.nn.Module, batch: Mapping) -> torch.Tensor:
    """``model(**batch).loss``: the loss of a Hugging Face model given ``labels`` (the default)."""
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

    A batch made under ``torch.inference_mode()`` (inference tensors, which
    autograd refuses) is passed to the loss as an ordinary copy.

    Raises:
        CurvatureError: both ``loss_fn`` and ``criterion`` given, one that cannot
            be called with two arguments, a batch shape that does not fit the
            specification, no batch, an empty batch or one with meta tensors.
    """
    if batch is None:
        raise CurvatureError("no probe batch: pass batch=<a held-out batch of inputs (and targets)>")
    check_batch(batch)
    fn = _loss_fn(batch, loss_fn, criterion)
    if any(t.is_inference() for t in tensors_of(batch)):
        return lambda model, b: fn(model, _ordinary(b))
    return fn


def _ordinary(batch: Any) -> Any:
    """``batch`` with every inference tensor replaced by an ordinary copy."""
    if not any(t.is_inference() for t in tensors_of(batch)):
        return batch
    with torch.inference_mode(False):
        return map_tensors(batch, lambda t: t.clone() if t.is_inference() else t)


def _loss_fn(batch: Any, loss_fn: LossFn | None, criterion: Callable | None) -> LossFn:
    if loss_fn is not None and criterion is not None:
        raise CurvatureError("pass loss_fn or criterion, not both")
    if loss_fn is not None:
        if not callable(loss_fn):
            raise CurvatureError("loss_fn must be callable: loss_fn(model, batch) -> scalar loss")
        if isinstance(loss_fn, torch.nn.modules.loss._Loss):
            raise CurvatureError(
                f"loss_fn={type(loss_fn).__name__}() is a criterion, called as "
                "criterion(outputs, targets): pass it as criterion=... for (inputs, targets) "
                "batches, or pass loss_fn(model, batch) -> scalar loss"
            )
        _check_two_arguments(loss_fn, "loss_fn", "loss_fn(model, batch) -> scalar loss")
        return loss_fn
    if criterion is not None:
        if not callable(criterion):
            raise CurvatureError("criterion must be callable: criterion(outputs, targets) -> loss")
        _check_two_arguments(criterion, "criterion", "criterion(outputs, targets) -> scalar loss")
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise CurvatureError(
                f"with criterion=..., the probe batch must be (inputs, targets); got "
                f"{type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        return lambda model, b: criterion(model(b[0]), b[1])
    if isinstance(batch, Mapping):
        return hf_loss
    raise CurvatureError(
        f"the probe batch is a {type(batch).__name__} and no loss was given: for "
        "(inputs, targets) batches pass criterion=torch.nn.CrossEntropyLoss() (or "
        "similar); otherwise pass loss_fn=lambda model, batch: ...; dict batches with "
        "'labels' work as they are (model(**batch).loss)"
    )


def check_batch(batch: Any) -> None:
    """Refuse a probe batch that cannot be measured, saying why.

    Raises:
        CurvatureError: the batch is empty (an empty container, or every tensor
            with a dimension has no elements), or holds a meta tensor.
    """
    if isinstance(batch, (Mapping, list, tuple)) and len(batch) == 0:
        raise CurvatureError(
            f"the probe batch is empty (an empty {type(batch).__name__}): pass a held-out "
            "batch with examples"
        )
    tensors = list(tensors_of(batch))
    for t in tensors:
        if t.is_meta:
            raise CurvatureError(_META_BATCH.format(shape=tuple(t.shape)))
    shaped = [t for t in tensors if t.dim() > 0]
    if shaped and all(t.numel() == 0 for t in shaped):
        raise CurvatureError(
            "the probe batch is empty: its tensors have no elements (shapes "
            f"{', '.join(str(tuple(t.shape)) for t in shaped[:4])}); a loss over no examples "
            "is NaN. Pass a held-out batch with examples"
        )


def _check_two_arguments(fn: Callable, name: str, expected: str) -> None:
    """Refuse ``fn`` when its signature cannot take two positional arguments."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        signature.bind(None, None)
    except TypeError as error:
        label = getattr(fn, "__qualname__", type(fn).__name__)
        raise CurvatureError(
            f"{name} is called as {expected}, but {label}{signature} cannot be called "
            f"that way ({error})"
        ) from None


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
