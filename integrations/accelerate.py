"""Hugging Face Accelerate: one line in a script that runs under ``accelerate launch``.

Accelerate has no callback system, so :func:`watch` hooks the one place every
real update passes through: the inner torch optimizer's ``step``
(``AcceleratedOptimizer.optimizer``). Its post-step hook fires exactly when the
parameters changed:

* not while accumulating: under ``accelerator.accumulate(model)`` the
  ``AcceleratedOptimizer.step`` skips the inner step until gradients sync;
* not after an fp16 step that the ``GradScaler`` skipped (inf/NaN gradients):
  the scaler then never calls the inner step, so the hook does not fire and
  ``accelerator.optimizer_step_was_skipped`` is True.

Why the measurement runs inside that hook. The hook runs after the inner
``step`` has returned, so the update is complete: parameters and optimizer state
(Adam's second moments, its step count) are final. What is still to come in
``AcceleratedOptimizer.step`` (``scaler.update()``) and after it
(``lr_scheduler.step()``, ``optimizer.zero_grad()``) is neither read nor changed
by a measurement: it reads the lr that produced this update (the right one for
the threshold), never reads or writes ``.grad`` (``torch.autograd.grad`` only),
turns gradients on and autocast off itself, and restores modes, buffers and RNG
states. Every process reaches the hook at the same update (gradients are
synchronized before the step, so the scaler's overflow decision agrees), which
makes the all-reduce of each Hessian-vector product safe there. Deferring the
measurement to a later call instead would need a hook Accelerate does not offer,
would read the lr after the scheduler moved it, and would lose the measurement
due at the last update of a run.

Processes. Each process holds its share of the probe batch and every
Hessian-vector product is averaged with ``accelerator.reduce(...,
reduction="mean")``; with equal shares this is the Hessian of the whole probe
batch, so the result equals a single-process measurement on the whole batch.
By default ``batch`` is the *whole* probe batch, the same on every process, and
:func:`watch` keeps this process's contiguous slice (``split_batch=True``); pass
``split_batch=False`` when ``batch`` already is this process's share (e.g. the
first batch of a prepared evaluation dataloader).

On a CPU machine the multi-process launch is::

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 script.py

(``--multi_gpu`` starts the processes; ``ACCELERATE_USE_CPU=1``, or
``Accelerator(cpu=True)`` in the script, makes them ``MULTI_CPU`` with gloo.
``accelerate launch --cpu`` alone starts a single process. ``torchrun
--nproc_per_node 2`` with ``ACCELERATE_USE_CPU=1`` works too.) Call
``accelerator.end_training()`` at the end, or gloo may abort at exit.

FSDP (``FullyShardedDataParallelPlugin``, versions 1 and 2): the prepared
(sharded) model is measured, not unwrapped, with finite differences on the
local shards; the sharded operator all-reduces its own dot products, so no
``reduce`` is set. Accelerate 1.15 enables FSDP only on accelerator devices:
on a CPU machine (``MULTI_CPU``) the plugin is ignored and the model is
wrapped in DDP (measured as DDP above); an FSDP1 plugin with
``sync_module_states=True`` raises ``RuntimeError: There are currently no
available devices found``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch

from curvwatch._errors import CurvatureError, CurvatureWarning
from curvwatch._methods import is_sharded
from curvwatch.batch_sharpness import process_share
from curvwatch.loaders import TrainingBatches, loader_batch_size
from curvwatch.monitor import CurvatureMonitor
from curvwatch.probe import LossFn, loss_closure_factory
from curvwatch.results import CurvatureResult
from curvwatch.sinks import margin_scalars, write_layout, write_spectrum

__all__ = ["watch"]


def watch(
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    batch: Any,
    every: int = 100,
    loss_fn: LossFn | None = None,
    criterion: Callable | None = None,
    *,
    split_batch: bool = True,
    checkpoint: bool = True,
    batch_sharpness: bool = False,
    batch_sharpness_source: Literal["train", "probe"] = "train",
    train_dataloader: Any = None,
    **monitor_options: Any,
) -> CurvatureMonitor:
    r"""Measure curvature after every ``every``-th real update of an Accelerate loop.

    Registers a post-step hook on the inner torch optimizer; after every
    ``every``-th update that was applied (not while accumulating gradients, not
    after an fp16 step the ``GradScaler`` skipped) it measures on
    ``accelerator.unwrap_model(model)`` (under FSDP on the prepared model) and
    the probe batch, and logs
    ``curvature/*`` through ``accelerator.log(..., step=updates)`` to every
    tracker. The step is the number of applied updates since :func:`watch`
    (restored by ``accelerator.load_state``), the same as a loop's own
    ``completed_steps`` counter. With a TensorBoard tracker, the custom-scalars
    chart (sharpness overlaid with its threshold) is written once on the main
    process through ``accelerator.get_tracker("tensorboard", unwrap=True)``.

    With ``batch_sharpness=True`` it also logs the batch sharpness
    (``curvature/batch_sharpness`` and ``_stderr``, mini-batch SGD's stability
    quantity) at the per-process batch size of ``train_dataloader`` (or an
    explicit ``batch_size=``), on mini-batches drawn from ``train_dataloader``
    through a private single-process copy of the plain loader underneath the
    prepared one (same dataset, collate function and sampler shard, its own
    copy of the sampler; no workers, no gradient-accumulation bookkeeping, the
    random states put back), so the loop sees the same data in the same order.
    ``batch_sharpness_source="probe"`` subsamples the probe batch instead.

    The measurement runs in the parameters' dtype: under
    ``mixed_precision="bf16"``/``"fp16"`` the autocast wrapper that
    ``accelerator.prepare`` put around ``forward`` is bypassed while measuring.

    Args:
        accelerator: the ``accelerate.Accelerator`` of the loop.
        model: the model (prepared or not; measured unwrapped).
        optimizer: the prepared optimizer (``AcceleratedOptimizer``) or the torch
            optimizer inside it; thresholds and the preconditioner come from it.
        batch: the probe batch; with ``split_batch=True`` (default) the whole
            batch, identical on every process, whose length must be divisible by
            ``accelerator.num_processes``; else this process's equal share.
        every: measure after every ``every``-th applied update. Default 100.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        criterion: for ``(inputs, targets)`` batches:
            ``criterion(model(inputs), targets)``. Neither: ``model(**batch).loss``.
        split_batch: keep this process's contiguous slice of ``batch``.
        checkpoint: ``accelerator.register_for_checkpointing(monitor)``, so
            ``save_state``/``load_state`` keep the schedule and the warm start
            (call :func:`watch` at the same point of the resumed script).
        batch_sharpness: also measure the batch sharpness at the training batch
            size. Default False.
        batch_sharpness_source: where its mini-batches come from: ``"train"``
            (default) ``train_dataloader``, ``"probe"`` random subsets of this
            process's probe batch.
        train_dataloader: the training dataloader (prepared or not); gives the
            batch size (an explicit ``batch_size=`` option wins) and the
            mini-batches.
        **monitor_options: passed to :class:`~curvwatch.CurvatureMonitor`
            (``top_k``, ``budget``, ``trace``, ``sinks``, ``strict``, ...).
            ``reduce`` defaults to ``accelerator.reduce(t, reduction="mean")``
            when there are several processes and the model is not sharded.

    Returns:
        The :class:`~curvwatch.CurvatureMonitor` (``.history`` holds every result
        on every process).

    Raises:
        CurvatureError: not an ``Accelerator``, an optimizer without a torch
            optimizer inside, a probe batch that does not split evenly across
            processes, a bad monitor option, or ``batch_sharpness=True`` without
            a ``train_dataloader`` (or, with ``batch_sharpness_source="probe"``, a
            ``batch_size=``).

    Example::

        accelerator = Accelerator(log_with="tensorboard", project_dir="runs")
        accelerator.init_trackers("exp")
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        watch(accelerator, model, optimizer, (x_val, y_val), every=100,
              criterion=torch.nn.CrossEntropyLoss())
        for x, y in loader:                  # unchanged training loop
            with accelerator.accumulate(model):
                loss = criterion(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        accelerator.end_training()

    For mini-batch SGD, ``watch(..., batch_sharpness=True, train_dataloader=loader)``.
    """
    for name in ("unwrap_model", "log", "reduce", "num_processes", "process_index"):
        if not hasattr(accelerator, name):
            raise CurvatureError(
                f"accelerator must be an accelerate.Accelerator (no .{name} on a "
                f"{type(accelerator).__name__})"
            )
    inner = _inner_optimizer(optimizer)
    # FSDP: measure the sharded module itself (unwrapping FSDP1 leaves flat-parameter
    # views whose forward does not gather); the sharded operator reduces itself.
    sharded = is_sharded(model)
    unwrapped = model if sharded else accelerator.unwrap_model(model)
    loss = _full_precision(loss_closure_factory(batch, loss_fn, criterion))
    if split_batch:
        batch = process_share(batch, accelerator.process_index, accelerator.num_processes)
    monitor_options.update(
        _batch_sharpness_options(batch_sharpness, batch_sharpness_source, train_dataloader, monitor_options)
    )
    if accelerator.num_processes > 1 and not sharded:
        monitor_options.setdefault("reduce", lambda t: accelerator.reduce(t, reduction="mean"))
    sinks = (*monitor_options.pop("sinks", ()), AcceleratorLogSink(accelerator))
    monitor_options.setdefault("optimizer", inner)
    monitor = CurvatureMonitor(
        unwrapped, batch, loss_fn=loss, every=every, sinks=sinks, **monitor_options
    )
    if accelerator.is_main_process and not getattr(accelerator, "log_with", None):
        warnings.warn(
            "curvwatch: the Accelerator has no trackers (log_with=...): curvature values "
            "are kept only in the returned monitor's .history",
            CurvatureWarning,
            stacklevel=2,
        )
    monitor.attach(inner)
    if checkpoint:
        accelerator.register_for_checkpointing(monitor)
    return monitor


class AcceleratorLogSink:
    """Send each result through ``accelerator.log`` (main process only).

    Logs ``result.scalars()`` plus the trace band (``curvature/trace_lower`` /
    ``_upper``) at ``result.step``; on a TensorBoard tracker also the
    custom-scalars chart (once) and the SLQ spectrum histogram. A logging failure
    is one warning; training continues.
    """

    def __init__(self, accelerator: Any, spectrum_bins: int = 60) -> None:
        self.accelerator = accelerator
        self.spectrum_bins = spectrum_bins
        self._layout_written = False
        self._warned = False

    def __call__(self, result: CurvatureResult) -> None:
        if not self.accelerator.is_main_process:
            return
        try:
            writer = self._tensorboard_writer()
            if writer is not None and not self._layout_written:
                adaptive = result.preconditioned_lambda_max == result.preconditioned_lambda_max
                write_layout(writer, adaptive=adaptive)
                self._layout_written = True
            self.accelerator.log({**result.scalars(), **margin_scalars(result)}, step=result.step)
            if writer is not None and result.spectrum is not None:
                write_spectrum(writer, result, self.spectrum_bins)
                writer.flush()
        except Exception as error:  # noqa: BLE001 - logging never stops training
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"curvwatch: logging the measurement at step {result.step} through "
                    f"accelerator.log failed ({type(error).__name__}: {error}); training continues",
                    CurvatureWarning,
                    stacklevel=2,
                )

    def _tensorboard_writer(self) -> Any:
        """The raw ``SummaryWriter`` of the TensorBoard tracker, or ``None``."""
        if not any(getattr(t, "name", None) == "tensorboard" for t in self.accelerator.trackers):
            return None
        return self.accelerator.get_tracker("tensorboard", unwrap=True)


def _batch_sharpness_options(enabled: bool, source: str, loader: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``batch_size`` from ``loader`` (unless given) and, for ``source="train"``, its mini-batches."""
    if not isinstance(enabled, bool):
        raise CurvatureError(f"batch_sharpness must be True or False, got {enabled!r}")
    if source not in ("train", "probe"):
        raise CurvatureError(f"batch_sharpness_source must be 'train' or 'probe', got {source!r}")
    if not enabled:
        if loader is not None:
            raise CurvatureError("train_dataloader=... is for batch sharpness: also pass batch_sharpness=True")
        return {}
    added: dict[str, Any] = {}
    if "batch_size" not in options:
        added["batch_size"] = loader_batch_size(loader) if loader is not None else None
        if added["batch_size"] is None:
            raise CurvatureError(
                "watch(batch_sharpness=True) needs the training batch size: pass "
                "train_dataloader=<the training DataLoader> (its batch_size is used) or batch_size=<per process>"
            )
    if source == "train" and "minibatches" not in options:
        if loader is None:
            raise CurvatureError(
                "watch(batch_sharpness=True) draws mini-batches from the training data: pass "
                "train_dataloader=<the training DataLoader>, or batch_sharpness_source='probe' to "
                "subsample the probe batch"
            )
        added["minibatches"] = TrainingBatches(getattr(loader, "base_dataloader", loader))
    return added


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer whose ``step`` applies the update.

    ``AcceleratedOptimizer`` subclasses ``torch.optim.Optimizer`` without its
    hook machinery, so hooks go on ``.optimizer`` inside it.
    """
    seen = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 5:
            break
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise CurvatureError(
            "optimizer must be the prepared optimizer (accelerator.prepare(...)) or a "
            f"torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    return optimizer


@contextlib.contextmanager
def _plain_forward(model: torch.nn.Module) -> Iterator[None]:
    """Bypass the autocast wrapper ``accelerator.prepare`` puts on ``model.forward``.

    Under mixed precision ``prepare`` stores the original bound method as
    ``model._original_forward`` and replaces ``model.forward`` by an autocast
    (and fp32-output) wrapper; the guard's ``autocast(enabled=False)`` cannot
    reach inside it. The original is swapped in and the wrapper put back.
    """
    original = model.__dict__.get("_original_forward")
    wrapped = model.__dict__.get("forward")
    if original is None or wrapped is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def _full_precision(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` evaluated with :func:`_plain_forward`."""

    def loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        with _plain_forward(model):
            return loss_fn(model, batch)

    return loss
