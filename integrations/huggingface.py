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
* the logger: the ``SummaryWriter`` of the Trainer's ``TensorBoardCallback``
  (``report_to="tensorboard"``), so ``curvature/*`` lands in the same event
  files as ``train/loss``;
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
import sys
import warnings
from collections.abc import Iterator
from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from curvwatch._errors import CurvatureError, CurvatureWarning
from curvwatch.loaders import TrainingBatches
from curvwatch._methods import is_sharded
from curvwatch.monitor import CurvatureMonitor, check_adapter_arguments
from curvwatch.operators.distributed import all_reduce_mean
from curvwatch.probe import first_batch
from curvwatch.results import CurvatureResult
from curvwatch.sinks import TensorBoardSink

__all__ = ["CurvatureTrainerCallback"]

# CurvatureMonitor arguments that the callback sets itself.
_OWN_ARGUMENTS = ("model", "batch", "loss_fn", "criterion", "every", "optimizer")
# Attention implementations whose backward has a second derivative under the guard.
_DOUBLE_BACKWARD_ATTENTION = (None, "eager", "sdpa", "paged|eager")
# How far up the stack the hooks look for the Trainer that called them.
_MAX_FRAMES = 50


class CurvatureTrainerCallback(TrainerCallback):
    r"""Log sharpness, trace and the edge-of-stability ratio from a ``Trainer``.

    Every ``every`` optimizer steps (at ``on_step_end`` when
    ``state.global_step % every == 0``, so gradient accumulation counts real
    updates) the callback runs :meth:`curvwatch.CurvatureMonitor.measure` on the
    live model and a fixed probe batch, and writes ``curvature/lambda_max``,
    ``curvature/threshold``, ``curvature/sharpness_ratio``,
    ``curvature/preconditioned_lambda_max`` (Adam-type optimizers), ... into the
    Trainer's TensorBoard run at ``step = state.global_step``, beside
    ``train/loss``, together with a custom-scalars chart overlaying the
    sharpness with its threshold.

    The threshold uses the learning rate in the optimizer's parameter group at
    the measurement, i.e. after the scheduler's step: the rate that the next
    update applies to the measured weights. For AdamW it is
    :math:`(2 + 2\beta_1) / ((1 - \beta_1)\,\eta)` = 38/lr at
    :math:`\beta_1 = 0.9`, compared with the preconditioned sharpness
    (Cohen et al. 2022). At lr = 0 (the last step of a linear decay) the
    threshold is infinite and not logged.

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
        batch_sharpness: also measure the batch sharpness at the training
            batch size (an explicit ``batch_size=`` option wins). Default False.
        batch_sharpness_source: where its mini-batches come from: ``"train"``
            (default) the training dataloader, ``"probe"`` random subsets of the
            probe batch.
        **monitor_options: passed to :class:`~curvwatch.CurvatureMonitor`
            (``top_k``, ``trace``, ``budget``, ``method``, ``sinks``,
            ``strict``, ``train_mode``, ``param_group``, ``seed``, ``reduce``,
            ``basis_device``, ``batch_size``, ``spectrum_every``, ...). Extra
            ``sinks`` are called on world process zero only.

    Attributes:
        monitor: the :class:`~curvwatch.CurvatureMonitor` (``None`` before
            training starts); ``monitor.history`` holds every result.

    Raises:
        CurvatureError: ``every`` is not a positive integer, both ``loss_fn``
            and ``criterion`` are given, or an option is unknown or one the
            callback sets itself, or ``batch_sharpness_source`` is neither
            ``"train"`` nor ``"probe"``.

    A Trainer without ``report_to="tensorboard"`` gets one warning at the start
    of training; the curves then only reach ``monitor.history`` and the extra
    ``sinks``.

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

    def __init__(
        self,
        every: int = 100,
        batch: Any = None,
        loss_fn: Any = None,
        criterion: Any = None,
        batch_sharpness: bool = False,
        batch_sharpness_source: Literal["train", "probe"] = "train",
        **monitor_options: Any,
    ) -> None:
        check_adapter_arguments(
            every, loss_fn, criterion, batch_sharpness, batch_sharpness_source, monitor_options, _OWN_ARGUMENTS
        )
        self.every = every
        self.batch = batch
        self.loss_fn = loss_fn
        self.criterion = criterion
        self.monitor_options = monitor_options
        self.batch_sharpness = batch_sharpness
        self.batch_sharpness_source = batch_sharpness_source
        self.monitor: CurvatureMonitor | None = None
        self._tensorboard: TensorBoardCallback | None = None
        self._sink: TensorBoardSink | None = None
        self._warned: set[str] = set()

    # -- hooks ------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        """Find the Trainer's TensorBoard writer and the probe batch; build the monitor."""
        trainer = _calling_trainer(self)
        self._tensorboard = _tensorboard_callback(trainer)
        if self._tensorboard is None and state.is_world_process_zero:
            self._warn_once(
                "no-tensorboard",
                "curvwatch: the Trainer has no TensorBoardCallback (report_to does not include "
                "'tensorboard'): curvature is kept in callback.monitor.history and the extra sinks only",
            )
        if self.monitor is not None and self.monitor.model is model:
            return  # a later trainer.train() on the same model: keep schedule and warm start
        batch = self.batch
        if batch is None:
            batch = _probe_batch(trainer, kwargs.get("eval_dataloader"), kwargs.get("train_dataloader"))
        options = dict(self.monitor_options)
        if "reduce" not in options and args.world_size > 1 and not is_sharded(model):
            options["reduce"] = all_reduce_mean
        if self.batch_sharpness:
            options.setdefault("batch_size", args.per_device_train_batch_size)
            if self.batch_sharpness_source == "train" and "minibatches" not in options:
                options["minibatches"] = _training_batches(kwargs.get("train_dataloader"))
        extra_sinks = tuple(options.pop("sinks", ()))
        sinks = (*extra_sinks, self._write) if state.is_world_process_zero else ()
        self.monitor = CurvatureMonitor(
            model, batch, loss_fn=self.loss_fn, criterion=self.criterion, every=self.every,
            optimizer=optimizer, sinks=sinks, **options,
        )

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        """Measure when ``state.global_step`` is a positive multiple of ``every``."""
        if self.monitor is None or not self.monitor.due(state.global_step):
            return
        if optimizer is not None:
            self.monitor.optimizer = optimizer
        with _double_backward_attention(self.monitor.model, self.monitor.method):
            self.monitor.measure(state.global_step)

    # -- helpers ----------------------------------------------------------------
    def _write(self, result: CurvatureResult) -> None:
        """Sink: the Trainer's current TensorBoard writer (the layout once per writer)."""
        writer = None if self._tensorboard is None else self._tensorboard.tb_writer
        if writer is None:
            return
        if self._sink is None or self._sink.writer is not writer:
            self._sink = TensorBoardSink(writer)
        self._sink(result)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, CurvatureWarning, stacklevel=3)


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
    so the plain ``base_dataloader`` underneath (same sampler shard and collator)
    is read, through :func:`curvwatch.probe.first_batch` (random states restored).
    """
    return first_batch(getattr(loader, "base_dataloader", loader))


def _training_batches(loader: Any) -> TrainingBatches:
    """The training mini-batches, read like :func:`_first_batch` reads (the plain loader underneath)."""
    if loader is None:
        raise CurvatureError(
            "CurvatureTrainerCallback(batch_sharpness=True) got no train_dataloader from the Trainer: "
            "pass batch_sharpness_source='probe' to subsample the probe batch instead"
        )
    return TrainingBatches(getattr(loader, "base_dataloader", loader))


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
