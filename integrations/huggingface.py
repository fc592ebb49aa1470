"""Hugging Face ``transformers``: curvature curves in the Trainer's own TensorBoard run.

:class:`CurvatureTrainerCallback` is a thin adapter around
:class:`~curvwatch.CurvatureMonitor`. It finds

* the model: ``kwargs["model"]`` of the hooks, the Trainer's unwrapped model;
* the probe batch: the ``batch`` argument, else the first batch of the
  evaluation dataset through the Trainer's collator, else the first training
  batch (fetched once, at ``on_train_begin``, without touching the training
  data order or the random number generators);
* the step: ``state.global_step``, the optimizer step the Trainer logs at;
* the optimizer: ``kwargs["optimizer"]``, read at every measurement, so the
  threshold follows the learning-rate schedule and AdamW's second moments give
  the preconditioned sharpness;
* the loggers: the ``SummaryWriter`` of the Trainer's ``TensorBoardCallback``
  (``report_to="tensorboard"``), so ``curvature/*`` lands in the same event
  files as ``train/loss``, and every other ``report_to`` integration (wandb,
  MLflow, ...), whose ``on_log`` receives the values at the measured step;
  ``trainer.state.log_history`` gets them too;
* the rank: only world process zero writes; under multi-process data
  parallelism every rank measures on its share of the probe batch and the
  Hessian-vector products are averaged over ranks. Under FSDP
  (``TrainingArguments(fsdp=...)``) the sharded operator works on the local
  shards and reduces itself. On a CPU machine FSDP does not run: with
  ``use_cpu=True`` Accelerate 1.15 ignores the FSDP2 plugin (the model is
  wrapped in DDP) and the FSDP1 plugin raises ``RuntimeError: There are
  currently no available devices found``.

The measurement itself is the core's. The only model-level intervention here is
the attention implementation: SDPA (the default) needs nothing, the guard runs
it on the math backend, which has a double backward; a fused kernel without a
double backward (``flash_attention_2``, a registered custom kernel, ...) is
switched to ``"eager"`` for the measurement and back afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import (
    DefaultFlowCallback,
    ExportableState,
    PrinterCallback,
    ProgressCallback,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from curvwatch import CurvatureError, all_reduce_mean
from curvwatch.probe import first_batch

from ._common import (
    CallbackSettings,
    Processes,
    StepGradients,
    Target,
    UpdateLearningRate,
    is_sharded,
    logged_scalars,
    split_state,
    unwrap_loader,
    writer_target,
)

__all__ = ["CurvatureTrainerCallback"]

# Attention implementations whose backward has a second derivative under the guard.
_DOUBLE_BACKWARD_ATTENTION = (None, "eager", "sdpa", "paged|eager")
# How far up the stack the hooks look for the Trainer that called them.
_MAX_FRAMES = 50
# The Trainer's own flow and console callbacks: not trackers, they get no curvature logs.
_NOT_TRACKERS = (TensorBoardCallback, DefaultFlowCallback, ProgressCallback, PrinterCallback)


class CurvatureTrainerCallback(CallbackSettings, TrainerCallback, ExportableState):
    r"""Log sharpness, trace and the edge-of-stability ratio from a ``Trainer``.

    Every ``every`` optimizer steps (at ``on_step_end`` when
    ``state.global_step % every == 0``, so gradient accumulation counts real
    updates) the callback runs :meth:`curvwatch.CurvatureMonitor.measure` on the
    live model and a fixed probe batch, and writes ``curvature/lambda_max``,
    ``curvature/threshold``, ``curvature/sharpness_ratio``,
    ``curvature/preconditioned_lambda_max`` (Adam-type optimizers), ... into the
    Trainer's TensorBoard run at ``step = state.global_step``, beside
    ``train/loss``, together with a custom-scalars chart overlaying the
    sharpness with its threshold. Every other ``report_to`` integration gets the
    same values through its ``on_log`` at that step (so wandb shows
    ``train/curvature/...`` next to ``train/loss``, MLflow ``curvature/...``),
    and ``trainer.state.log_history`` gets one entry per measurement. The
    Trainer's own logging is untouched (``trainer.log`` is not called: it would
    reset ``control.should_log`` and drop the loss entry of that step).

    The threshold uses the learning rate of the update just measured, the one
    in the optimizer when its ``step()`` ran, before the scheduler's step (see
    :mod:`curvwatch.integrations._common`). For AdamW it is
    :math:`(2 + 2\beta_1) / ((1 - \beta_1)\,\eta)` = 38/lr at
    :math:`\beta_1 = 0.9`, compared with the preconditioned sharpness
    (Cohen et al. 2022).

    With ``batch_sharpness=True`` the callback also logs the batch sharpness
    (``curvature/batch_sharpness`` and ``_stderr``, mini-batch SGD's stability
    quantity) at ``args.per_device_train_batch_size``, on mini-batches drawn
    from the training data: a private single-process copy of the Trainer's
    training dataloader (same dataset, collator and sampler shard, its own copy
    of the sampler; no workers; the random states put back), so training sees
    the same data in the same order. ``batch_sharpness_source="probe"``
    subsamples the probe batch instead.

    Args:
        every: measure after every ``every``-th optimizer step. Default 100.
        batch: the probe batch, a dict the model accepts as ``model(**batch)``
            with ``labels`` (or any batch that ``loss_fn``/``criterion`` takes).
            ``None``: the first batch of the Trainer's evaluation dataset through
            its collator (the first dataset of a dict of them), else the first
            training batch.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default
            ``model(**batch).loss``.
        criterion: for ``(inputs, targets)`` batches:
            ``criterion(model(inputs), targets)``.
        batch_sharpness, batch_sharpness_source, **monitor_options: as for every
            callback (:class:`~curvwatch.integrations._common.CallbackSettings`):
            the batch sharpness at the training batch size, and the monitor's
            settings (``top_k``, ``trace``, ``budget``, ``method``, ...) and
            extra ``sinks``, which run on world process zero only.

    Attributes:
        monitor: the :class:`~curvwatch.CurvatureMonitor` (``None`` before
            training starts); ``monitor.history`` holds every result.

    Raises:
        CurvatureError: ``every`` is not a positive integer, both ``loss_fn``
            and ``criterion`` are given, or an option is unknown or one the
            callback sets itself, or ``batch_sharpness_source`` is neither
            ``"train"`` nor ``"probe"``.

    A Trainer that reports to no tracker (``report_to="none"``) gets one warning
    at the start of training; the curves then only reach ``monitor.history``,
    ``trainer.state.log_history`` and the extra ``sinks``. A tracker that fails
    to take the values is one warning and training continues (``strict=True``
    raises).

    Checkpoints: the callback is an ``ExportableState``. Its schedule and the
    other small state go into the checkpoint's ``trainer_state.json``
    (``stateful_callbacks``), the warm-start vectors into
    ``curvwatch-rank<i>.pt`` beside it (each process its own: shards under
    FSDP); ``trainer.train(resume_from_checkpoint=...)`` restores both, with
    ``restore_callback_states_from_checkpoint`` left at its default (``False``).
    With it set to ``True`` the Trainer replaces the callback by a new one
    built from the JSON-serialisable arguments only (``every``, ``top_k``, ...;
    not ``batch``, ``loss_fn``, ``criterion``, ``budget`` or ``sinks``).

    Example::

        from curvwatch.integrations.huggingface import CurvatureTrainerCallback

        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir="out", report_to="tensorboard", logging_steps=10),
            train_dataset=train_ds,
            eval_dataset=eval_ds,          # its first batch becomes the probe batch
            callbacks=[CurvatureTrainerCallback(every=100)],
        )
        trainer.train()                    # tensorboard --logdir out

        # mini-batch SGD: batch sharpness on training mini-batches of the Trainer's batch size
        CurvatureTrainerCallback(every=100, batch_sharpness=True)
    """

    _resume: dict[str, Any] | None = None  # set by the Trainer when it restores callback states
    _trainer: Trainer | None = None
    _gradients: StepGradients | None = None  # the update's .grad, which zero_grad() clears before on_step_end
    _hook: tuple[Any, ...] = ()  # (args, state, control, kwargs) of the hook that is measuring

    # -- hooks ------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        """Find the Trainer and its trackers, take the probe batch, build (or restore) the monitor."""
        self._trainer = _calling_trainer(self)
        if not self._trackers(self._trainer) and state.is_world_process_zero:
            self._warn(
                "no-tracker",
                "curvwatch: the Trainer reports to no tracker (report_to='none'): curvature is kept in "
                "trainer.state.log_history, callback.monitor.history and the extra sinks only",
            )
        if self._update_lr is not None:
            self._update_lr.remove()
        self._update_lr = UpdateLearningRate(optimizer) if optimizer is not None else None
        if self._gradients is not None:
            self._gradients.remove()
        self._gradients = StepGradients(optimizer) if optimizer is not None else None
        if self.monitor is not None and self.monitor.model is model:
            return  # a later trainer.train() on the same model: keep schedule and warm start
        batch = self.batch
        if batch is None:
            batch = _probe_batch(self._trainer, kwargs.get("eval_dataloader"), kwargs.get("train_dataloader"))
        processes = Processes(args.world_size, state.is_world_process_zero, all_reduce_mean, is_sharded(model))
        self.monitor = self._new_monitor(
            model, batch, optimizer, processes, self._targets, self.loss_fn, loader=kwargs.get("train_dataloader")
        )
        if state.global_step > 0:  # resuming from a checkpoint
            self._restore(args, state)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        """Measure when ``state.global_step`` is a positive multiple of ``every``; log it.

        The Trainer has cleared the gradients (``model.zero_grad()``) by now; the
        update's own are put back for the measurement (:class:`StepGradients`):
        SGD's update direction without momentum is the step's gradient.
        """
        try:
            if self.monitor is not None and self.monitor.due(state.global_step):
                with self._gradients.restored() if self._gradients is not None else contextlib.nullcontext():
                    self._measure(args, state, control, model, optimizer, kwargs)
        finally:
            if self._gradients is not None:
                self._gradients.release()

    def _measure(self, args, state, control, model, optimizer, kwargs) -> None:
        """The due measurement of :meth:`on_step_end`, logged."""
        if optimizer is not None:
            self.monitor.optimizer = optimizer
        self._hook = (args, state, control, {"model": model, "optimizer": optimizer, **kwargs})
        lr = self._update_lr.applied() if self._update_lr is not None else contextlib.nullcontext()
        try:
            with lr, _double_backward_attention(self.monitor.model, self.monitor.method):
                result = self.monitor.maybe_measure(state.global_step)
        finally:
            self._hook = ()
        if result is not None:  # every process, like the Trainer's own entries
            state.log_history.append({**logged_scalars(result), "epoch": state.epoch, "step": state.global_step})

    def on_save(self, args, state, control, **kwargs) -> None:
        """Write this process's warm-start vectors beside the checkpoint the Trainer just saved."""
        if self.monitor is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        _, tensors = split_state(self.monitor.state_dict())
        torch.save(tensors, os.path.join(folder, _tensor_file(args)))

    def on_train_end(self, args, state, control, **kwargs) -> None:
        """Detach the optimizer hooks."""
        if self._update_lr is not None:
            self._update_lr.remove()
            self._update_lr = None
        if self._gradients is not None:
            self._gradients.remove()
            self._gradients = None

    # -- ExportableState ------------------------------------------------------------
    def state(self) -> dict:
        """The JSON part of the checkpoint: plain arguments and the small monitor state."""
        config = {"every": self.every, "batch_sharpness": self.batch_sharpness,
                  "batch_sharpness_source": self.batch_sharpness_source}
        config.update(split_state(self.monitor_options)[0])
        small = split_state(self.monitor.state_dict())[0] if self.monitor is not None else self._resume
        return {"args": config, "attributes": {"_resume": small}}

    # -- helpers ----------------------------------------------------------------
    def _restore(self, args, state) -> None:
        """Load the monitor state of the checkpoint being resumed (JSON part and tensor file)."""
        small = self._resume
        saved = state.stateful_callbacks.get(type(self).__name__)
        if small is None and saved is not None:
            mine = [cb for cb in self._trainer.callback_handler.callbacks if type(cb) is type(self)]
            entries = saved if isinstance(saved, list) else [saved]
            index = next((i for i, cb in enumerate(mine) if cb is self), 0)
            small = entries[index].get("attributes", {}).get("_resume") if index < len(entries) else None
        self._resume = None
        if not small:
            return
        folder = _resumed_checkpoint() or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, _tensor_file(args))
        tensors = torch.load(path, weights_only=True) if os.path.isfile(path) else None
        if tensors is None:
            self._warn(
                "no-tensors",
                f"curvwatch: {path} not found: the schedule is restored, the warm start is not "
                "(the next measurement starts cold)",
            )
            tensors = {key: None for key in self.monitor.state_dict() if key not in small}
        self.monitor.load_state_dict({**small, **tensors})

    def _trackers(self, trainer: Trainer | None) -> list[TrainerCallback]:
        """The Trainer's reporting integrations (TensorBoard included)."""
        if trainer is None:
            return []
        return [
            cb for cb in trainer.callback_handler.callbacks
            if isinstance(cb, TensorBoardCallback) or not isinstance(cb, (*_NOT_TRACKERS, type(self)))
        ]

    def _targets(self) -> list[Target]:
        """TensorBoard written directly (``curvature/*`` tags, the chart), the others through ``on_log``."""
        if not self._hook:
            return []
        args, state, control, kwargs = self._hook
        targets = []
        for tracker in self._trackers(self._trainer):
            if isinstance(tracker, TensorBoardCallback):
                if tracker.tb_writer is not None:
                    targets.append(writer_target("TensorBoardCallback", tracker.tb_writer))
                continue

            def on_log(metrics: dict[str, float], step: int, tracker: TrainerCallback = tracker) -> None:
                tracker.on_log(args, state, control, logs=dict(metrics), **kwargs)

            targets.append(Target(type(tracker).__name__, on_log))
        return targets


def _tensor_file(args: Any) -> str:
    return f"curvwatch-rank{args.process_index}.pt"


def _resumed_checkpoint() -> str | None:
    """``resume_from_checkpoint`` of the training loop that is calling ``callback``'s hook."""
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        if isinstance(frame.f_locals.get("self"), Trainer) and frame.f_locals.get("resume_from_checkpoint"):
            checkpoint = frame.f_locals["resume_from_checkpoint"]
            return checkpoint if isinstance(checkpoint, str) else None
        frame = frame.f_back
    return None


def _calling_trainer(callback: TrainerCallback) -> Trainer | None:
    """The ``Trainer`` whose callback handler is calling ``callback`` right now.

    Hooks receive neither the Trainer nor its callback list, so look up the call
    stack (``Trainer.train`` -> ``_inner_training_loop`` -> ``CallbackHandler``)
    for a Trainer that holds this very callback instance.
    """
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and any(cb is callback for cb in owner.callback_handler.callbacks):
            return owner
        frame = frame.f_back
    return None


def _tensorboard_callback(trainer: Trainer | None) -> TensorBoardCallback | None:
    if trainer is None:
        return None
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)), None)


def _probe_batch(trainer: Trainer | None, eval_dataloader: Any, train_dataloader: Any) -> Any:
    """First batch of the evaluation data through the Trainer's collator, else of the training data."""
    if trainer is not None and trainer.eval_dataset is not None:
        name = next(iter(trainer.eval_dataset)) if isinstance(trainer.eval_dataset, dict) else None
        eval_dataloader = trainer.get_eval_dataloader(name)
    for loader in (eval_dataloader, train_dataloader):
        if loader is not None:
            return _first_batch(loader)
    raise CurvatureError(
        "no probe batch: pass CurvatureTrainerCallback(batch=...), or give the Trainer an "
        "eval_dataset or a train_dataset"
    )


def _first_batch(loader: Any) -> Any:
    """The loader's first batch, leaving training exactly as it was.

    Accelerate's prepared loaders register themselves with the gradient state
    while iterated (gradient accumulation syncs at the end of the active loader),
    so the plain loader underneath (same sampler shard and collator) is read,
    through :func:`curvwatch.probe.first_batch` (random states restored).
    """
    return first_batch(unwrap_loader(loader))


@contextlib.contextmanager
def _double_backward_attention(model: torch.nn.Module, method: str) -> Iterator[None]:
    """Switch a fused attention kernel without double backward to ``"eager"`` and back."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if (
        method == "finite_difference"
        or implementation in _DOUBLE_BACKWARD_ATTENTION
        or not hasattr(model, "set_attn_implementation")
    ):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(implementation)
