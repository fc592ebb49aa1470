"""Reading a training loader's batches without changing what training sees.

The integrations take the probe batch, and the mini-batches of the batch
sharpness, from the loaders that training iterates. Reading them must leave
training exactly as it was:

* a ``torch.utils.data.DataLoader`` is read through a plain, single-process
  copy (same dataset and collate function, deep copies of its sampler and of
  its generator, so a copy made before an epoch repeats that epoch's order):
  no worker process starts, a ``persistent_workers`` iterator of training is
  never reset, wrappers such as Accelerate's prepared loaders (which register
  with the gradient-accumulation state and synchronize RNGs when iterated) are
  bypassed, and a sampler's own ``generator`` or epoch counter is not advanced;
* around every batch drawn, the global random states (torch CPU, Python
  ``random``, NumPy if loaded) and the states of generators held by the
  collate function or the dataset are put back (a ``RandomSampler`` draws its
  seed from torch's, a seeded masking collator owns one).

An ``IterableDataset`` is re-iterated with ``iter(dataset)``; its ``__iter__``
must start an independent stream.
"""

from __future__ import annotations

import contextlib
import copy
import random
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from curvwatch._errors import CurvatureError, CurvatureWarning

# Depth of the attribute walk that finds generators inside a collate function
# (e.g. transformers' RemoveColumnsCollator -> DataCollatorForLanguageModeling.generator).
_COLLATE_DEPTH = 2


def plain_loader(loader: Any) -> Any:
    """A single-process ``DataLoader`` over the same data as ``loader``, sharing no iteration state.

    ``loader`` that is no ``DataLoader`` (a list of batches, ...) is returned as it is.
    """
    from torch.utils.data import DataLoader, IterableDataset

    if not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        return DataLoader(
            loader.dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, collate_fn=loader.collate_fn
        )
    # one memo: the copied sampler and loader share their copied generator, as the originals do
    memo = {id(loader.dataset): loader.dataset}
    generator = _private_copy(loader.generator, memo)
    common = {"collate_fn": loader.collate_fn, "generator": generator}
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=_private_copy(loader.batch_sampler, memo), **common)
    return DataLoader(loader.dataset, sampler=_private_copy(loader.sampler, memo), batch_size=None, **common)


def _private_copy(obj: Any, memo: dict) -> Any:
    """A deep copy of a sampler or generator (the dataset in ``memo`` shared); ``obj`` if it cannot be copied."""
    try:
        return copy.deepcopy(obj, memo)
    except Exception as error:  # noqa: BLE001 - an uncopyable sampler is read as it is
        warnings.warn(
            f"curvwatch: the {type(obj).__name__} of the training loader cannot be copied "
            f"({type(error).__name__}: {error}); reading batches iterates it directly, which can "
            "advance its own random generator",
            CurvatureWarning,
            stacklevel=3,
        )
        return obj


def loader_batch_size(loader: Any) -> int | None:
    """The per-process batch size ``loader`` yields, or ``None`` if it does not say.

    ``loader.batch_size``, else its batch sampler's (divided by the number of
    processes for an Accelerate ``BatchSamplerShard`` with ``split_batches``).
    """
    size = getattr(loader, "batch_size", None)
    if isinstance(size, int) and size > 0:
        return size
    batch_sampler = getattr(loader, "batch_sampler", None)
    size = getattr(batch_sampler, "batch_size", None)
    if not isinstance(size, int) or size < 1:
        return None
    if getattr(batch_sampler, "split_batches", False):
        size //= max(1, int(getattr(batch_sampler, "num_processes", 1)))
    return size


class TrainingBatches:
    """The batches of a training loader, drawn without disturbing training.

    Iterating gives one pass over a :func:`plain_loader` copy of ``loader``;
    each batch is drawn (and passed through ``transform``, e.g. a framework's
    device transfer) with the random states put back afterwards (see the
    module docstring). Pass it as ``CurvatureMonitor(minibatches=...)``, which
    cycles through the passes.

    Args:
        loader: the training ``DataLoader`` (prepared or not), or any iterable
            of batches.
        transform: ``transform(batch) -> batch`` applied to every batch.
        empty: the end of the error message for a pass without batches.

    Raises:
        CurvatureError: while iterating, a pass that yields no batch.
    """

    def __init__(
        self, loader: Any, transform: Callable[[Any], Any] | None = None,
        empty: str = "cannot draw training mini-batches from it",
    ) -> None:
        self.name = type(loader).__name__
        self.loader = plain_loader(loader)
        self.transform = transform
        self.empty = empty
        self._owners = _generator_owners(self.loader)

    def __iter__(self) -> Iterator[Any]:
        timeline: dict = {}  # this pass draws as one uninterrupted iteration would
        with preserved_random_state(self._owners, timeline):
            iterator = iter(self.loader)
        empty = True
        while True:
            with preserved_random_state(self._owners, timeline):
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                if self.transform is not None:
                    batch = self.transform(batch)
            empty = False
            yield batch
        if empty:
            raise CurvatureError(f"the {self.name} yields no batch: {self.empty}")


@contextlib.contextmanager
def preserved_random_state(owners: tuple[Any, ...] = (), timeline: dict | None = None) -> Iterator[None]:
    """Put back the global random states, and those of generators held by ``owners``, on exit.

    Global: torch CPU, Python ``random``, NumPy (if imported). ``owners``:
    objects whose attributes hold a ``torch.Generator``, a NumPy
    ``Generator``/``RandomState`` or a ``random.Random``; an attribute that
    became a generator inside the block (created lazily) gets its old value back.

    ``timeline``: a dict that carries the global states from one block to the
    next, so that the draws of consecutive blocks continue each other (as one
    uninterrupted iteration would) while the caller's states stay untouched.
    """
    outer = _global_state()
    if timeline and "state" in timeline:
        _set_global_state(timeline["state"])
    saved = [(owner, dict(vars(owner)), {n: _get_state(g) for n, g in _generators(owner).items()}) for owner in owners]
    try:
        yield
    finally:
        if timeline is not None:
            timeline["state"] = _global_state()
        _set_global_state(outer)
        for owner, attributes, states in saved:
            for name in _generators(owner):
                if name not in states:  # created inside the block
                    if name in attributes:
                        setattr(owner, name, attributes[name])
                    else:
                        vars(owner).pop(name, None)
            for name, state in states.items():
                setattr(owner, name, attributes[name])
                _set_state(attributes[name], state)


def _global_state() -> tuple[Any, Any, Any]:
    numpy = sys.modules.get("numpy")
    return torch.get_rng_state(), random.getstate(), numpy.random.get_state() if numpy is not None else None


def _set_global_state(state: tuple[Any, Any, Any]) -> None:
    torch.set_rng_state(state[0])
    random.setstate(state[1])
    numpy = sys.modules.get("numpy")
    if numpy is not None and state[2] is not None:
        numpy.random.set_state(state[2])


def _is_generator(value: Any) -> bool:
    if isinstance(value, (torch.Generator, random.Random)):
        return True
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, (numpy.random.Generator, numpy.random.RandomState))


def _generators(owner: Any) -> dict[str, Any]:
    return {name: value for name, value in vars(owner).items() if _is_generator(value)}


def _get_state(generator: Any) -> Any:
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, random.Random):
        return generator.getstate()
    if hasattr(generator, "bit_generator"):  # numpy.random.Generator
        return generator.bit_generator.state
    return generator.get_state()  # numpy.random.RandomState


def _set_state(generator: Any, state: Any) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, random.Random):
        generator.setstate(state)
    elif hasattr(generator, "bit_generator"):
        generator.bit_generator.state = state
    else:
        generator.set_state(state)


def _generator_owners(loader: Any) -> tuple[Any, ...]:
    """Objects that may hold generators used while drawing: the collate function (and what it wraps), the dataset."""
    owners: list[Any] = []
    frontier = [getattr(loader, "collate_fn", None)]
    for _ in range(_COLLATE_DEPTH):
        children = []
        for obj in frontier:
            obj = getattr(obj, "__self__", obj)  # a bound method: its instance
            if _plain_object(obj) and all(obj is not o for o in owners):
                owners.append(obj)
                children.extend(vars(obj).values())
        frontier = children
    dataset = getattr(loader, "dataset", None)
    if _plain_object(dataset) and all(dataset is not o for o in owners):
        owners.append(dataset)
    return tuple(owners)


def _plain_object(obj: Any) -> bool:
    """An instance with a ``__dict__`` (not a module, class, function or tensor)."""
    import types

    return (
        obj is not None
        and isinstance(getattr(obj, "__dict__", None), dict)
        and not isinstance(obj, (type, types.FunctionType, types.ModuleType, torch.nn.Module, torch.Tensor))
        and not _is_generator(obj)
    )
