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
would read the lr after the scheduler moved it (the rule is the lr of the
update, :mod:`curvwatch.integrations._common`), and would lose the measurement
due at the last update of a run.

Trackers. Each tracker of the Accelerator gets the values at ``step=updates``,
except wandb: wandb drops every point logged at a step below its current one,
and a loop that logs with its own counter (0-based, or micro-batches under
gradient accumulation) would lose either its own points or curvwatch's. So
curvature points join the loop's current wandb row (no step of their own,
never a dropped point) and carry ``curvature/step`` = updates, declared with
``define_metric`` as the x axis of ``curvature/*``: wandb's own way to log on
a second axis.

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

from curvwatch import CurvatureError, CurvatureMonitor, CurvatureResult, CurvatureWarning
from curvwatch.probe import LossFn, loss_closure_factory
from curvwatch.results import DIAGNOSTICS_PREFIX

from ._common import (
    Processes,
    Target,
    WarnOnce,
    build_monitor,
    check_adapter_arguments,
    is_sharded,
    process_share,
    tensorboard_writer,
    torch_optimizer,
)

__all__ = ["watch"]

# CurvatureMonitor arguments that watch() sets itself.
_OWN_ARGUMENTS = ("model", "batch", "loss_fn", "criterion", "every")
# The wandb metric that is the x axis of the curvature/* points.
WANDB_STEP = "curvature/step"


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
            Extra ``sinks`` run on the main process only, like the trackers; a
            tracker that fails to take the values is one warning and training
            continues (``strict=True`` raises).

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
    check_adapter_arguments(
        every, loss_fn, criterion, batch_sharpness, batch_sharpness_source, monitor_options, _OWN_ARGUMENTS
    )
    if not batch_sharpness and train_dataloader is not None:
        raise CurvatureError("train_dataloader=... is for batch sharpness: also pass batch_sharpness=True")
    inner = torch_optimizer(optimizer)
    # FSDP: measure the sharded module itself (unwrapping FSDP1 leaves flat-parameter
    # views whose forward does not gather); the sharded operator reduces itself.
    sharded = is_sharded(model)
    unwrapped = model if sharded else accelerator.unwrap_model(model)
    loss_closure_factory(batch, loss_fn, criterion)  # a bad loss specification raises before the split
    if split_batch:
        batch = process_share(batch, accelerator.process_index, accelerator.num_processes)
    processes = Processes(
        accelerator.num_processes, accelerator.is_main_process, lambda t: accelerator.reduce(t, reduction="mean"),
        sharded,
    )
    # the user's loss_fn / criterion as given: the Gauss-Newton and Fisher curvatures
    # read the criterion itself (a wrapped closure would be a loss_fn they cannot take)
    monitor = build_monitor(
        unwrapped, batch, monitor_options, processes, _Trackers(accelerator), WarnOnce(), every=every,
        loss_fn=loss_fn, criterion=criterion, optimizer=inner, loader=train_dataloader, owner="watch",
        batch_sharpness=batch_sharpness_source if batch_sharpness else None, monitor=_FullPrecisionMonitor,
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


class _Trackers:
    """``targets()`` of the logging sink: every tracker of the Accelerator, at ``step=updates``.

    A TensorBoard tracker's writer also gets the chart and the spectrum; wandb
    goes through :class:`_WandbAxis`.
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self._wandb: dict[int, _WandbAxis] = {}

    def __call__(self) -> list[Target]:
        targets = []
        for tracker in self.accelerator.trackers:
            name = getattr(tracker, "name", type(tracker).__name__)
            if name == "wandb":
                axis = self._wandb.setdefault(id(tracker), _WandbAxis(tracker))
                targets.append(Target(name, axis.log))
                continue
            writer = tensorboard_writer(getattr(tracker, "tracker", None))
            targets.append(Target(name, lambda m, s, tracker=tracker: tracker.log(m, step=s), writer))
        return targets


class _WandbAxis:
    """Curvature points on the loop's own wandb axis, never at a step wandb would drop.

    Each point joins wandb's current row (``commit=False``, no ``step``), which
    the loop's next ``log`` commits, with ``curvature/step`` = updates as the x
    axis of ``curvature/*`` (``define_metric``). If the loop has not logged
    since the previous point, that point's row is closed first, so no point
    overwrites another.
    """

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self._defined = False
        self._open_row: int | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        run = self.tracker.tracker
        if not self._defined:
            run.define_metric(WANDB_STEP)
            run.define_metric("curvature/*", step_metric=WANDB_STEP)
            run.define_metric(DIAGNOSTICS_PREFIX + "*", step_metric=WANDB_STEP)
            self._defined = True
        if self._open_row is not None and run.step == self._open_row:
            run.log({}, commit=True)
        run.log({**metrics, WANDB_STEP: step}, commit=False)
        self._open_row = run.step


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


class _FullPrecisionMonitor(CurvatureMonitor):
    """A :class:`~curvwatch.CurvatureMonitor` whose measurements run with :func:`_plain_forward`.

    Every forward of a measurement (the loss closure, the batch sharpness's
    mini-batches, the ``model(inputs)`` of the Gauss-Newton and Fisher
    operators) then runs in the parameters' dtype, not under the autocast
    wrapper of ``accelerator.prepare``; training keeps the wrapper.
    """

    def measure(self, step: int | None = None, *, scheduled: bool = False) -> CurvatureResult | None:
        with _plain_forward(self.model):
            return super().measure(step, scheduled=scheduled)
