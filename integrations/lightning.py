"""PyTorch Lightning: ``CurvatureCallback`` logs curvature next to the loss.

The callback is a thin adapter around :class:`~curvwatch.CurvatureMonitor`: it
finds the model (``pl_module``, never the DDP wrapper), the probe batch, the
optimizer step (``trainer.global_step``), the loggers and the process rank;
the measurement itself is the monitor's.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # only the older package name is installed
    import pytorch_lightning as pl  # type: ignore[no-redef]

from curvwatch import CurvatureError, CurvatureWarning
from curvwatch.probe import first_batch

from ._common import (
    CallbackSettings,
    Processes,
    Target,
    UpdateLearningRate,
    is_sharded,
    process_share,
    tensorboard_writer,
)

Callback = pl.Callback
rank_zero_warn = pl.utilities.rank_zero_warn
MisconfigurationException = importlib.import_module(f"{pl.__name__}.utilities.exceptions").MisconfigurationException
is_param_in_hook_signature = importlib.import_module(
    f"{pl.__name__}.utilities.signature_utils"
).is_param_in_hook_signature

__all__ = ["CurvatureCallback"]


class CurvatureCallback(CallbackSettings, Callback):
    r"""Measure and log the loss curvature every ``every`` optimizer steps.

    After every ``every``-th optimizer step (``trainer.global_step``, so
    gradient accumulation, the short last accumulation window of an epoch and
    manual optimization all count real updates only) the callback measures the
    top Hessian eigenvalues, the trace and the edge-of-stability ratio of the
    loss on a fixed probe batch, and logs ``result.scalars()``
    (``curvature/lambda_max``, ``curvature/threshold``, ...) with
    ``logger.log_metrics(..., step=trainer.global_step)`` on every logger of the
    trainer (TensorBoard, CSV, wandb, MLflow, ...), next to the module's own
    curves. A TensorBoard logger (of ``lightning.pytorch`` or
    ``pytorch_lightning``) also gets the custom-scalars chart (sharpness
    overlaid with its threshold) and, with ``spectrum_every``, the
    ``curvature/spectrum`` histogram. The values also enter
    ``trainer.callback_metrics`` on every process, so
    ``EarlyStopping(monitor="curvature/sharpness_ratio")`` and
    ``ModelCheckpoint(monitor=...)`` can use them.

    The probe batch is ``batch`` if given, else the first batch of the
    validation dataloader (taken at train start, before any validation run),
    else the first batch of the training dataloader; it is moved with the
    module's ``transfer_batch_to_device`` hooks. Under DDP each process
    measures its share (the first validation batch of its sampler, or its
    slice of ``batch``) and the Hessian-vector products are averaged with the
    strategy's ``reduce``, so the result is that of the whole probe batch;
    every process runs the same solver, process zero writes. Under
    ``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``
    (FSDP2, DTensor parameters; runs on the CPU with gloo) the products are
    finite differences on the local shards and the operator all-reduces its
    own dot products (no ``reduce``). ``FSDPStrategy`` (FSDP1) requires a GPU
    accelerator in Lightning 2.6 (``Trainer(accelerator="cpu")`` raises
    ``ValueError``); on a GPU it needs ``use_orig_params=True``.

    The loss is the module's own ``training_step`` on the probe batch (a
    tensor, or the ``"loss"`` entry of a dict), with its ``self.log`` calls
    muted, unless ``loss_fn`` or ``criterion`` is given. The threshold comes
    from ``trainer.optimizers[0]`` at the learning rate of the update just
    measured (before a step-interval scheduler moved it; see
    :mod:`curvwatch.integrations._common`).

    With ``batch_sharpness=True`` the callback also logs the batch sharpness
    (``curvature/batch_sharpness`` and ``_stderr``, mini-batch SGD's stability
    quantity) at the training dataloader's ``batch_size`` (per device), on
    mini-batches drawn from the training data: a private single-process copy
    of the training dataloader (its own copy of the sampler; no workers; the
    random states put back), moved like training's batches, so training sees
    the same data in the same order. ``batch_sharpness_source="probe"``
    subsamples the probe batch instead.

    Args:
        every: measure after every ``every``-th optimizer step. Default 100.
        batch: the probe batch (as a dataloader yields it); ``None``: the first
            validation batch, else the first training batch.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar loss`` instead of
            ``training_step``.
        criterion: shortcut for ``(inputs, targets)`` batches:
            ``criterion(pl_module(inputs), targets)``.
        batch_sharpness, batch_sharpness_source, **monitor_options: as for every
            callback (:class:`~curvwatch.integrations._common.CallbackSettings`):
            the batch sharpness at the training batch size, and the monitor's
            settings (``top_k``, ``trace``, ``budget``, ``method``, ...) and
            extra ``sinks``, which run on process zero only, like the loggers.

    Raises:
        CurvatureError: ``every`` is not a positive integer, both ``loss_fn`` and
            ``criterion`` are given, or an unknown monitor option; at train start,
            manual optimization without ``loss_fn``/``criterion`` (its
            ``training_step`` steps the optimizer itself), or batch sharpness from
            several training dataloaders, or from one without a ``batch_size``
            (pass ``batch_size=``).
        MisconfigurationException: at train start, the ``Trainer`` has no logger.

    A measurement that fails, or a logger that fails to take its values, is
    one warning (``CurvatureWarning``) and a skipped point; training continues
    (``strict=True`` raises instead). ``state_dict``/``load_state_dict`` carry
    the schedule and the warm-start vectors through checkpoints, under a
    ``state_key`` built from the settings, so several callbacks with different
    settings (``every``, ``curvature``, ``top_k``, ...) can share a Trainer.
    For the identical probe batch after a resume, pass ``batch`` or use an
    unshuffled validation dataloader.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from curvwatch.integrations.lightning import CurvatureCallback
        >>> trainer = Trainer(callbacks=[CurvatureCallback(every=100)])
        >>> sgd = CurvatureCallback(every=100, batch_sharpness=True)  # mini-batch SGD
    """

    _last_step: int | None = None  # the last global step seen
    _loaded_state: dict[str, Any] | None = None  # load_state_dict's, applied when training starts

    @property
    def state_key(self) -> str:
        """Checkpoint key: the class and its plain settings (unique per distinct callback)."""
        plain = {k: v for k, v in sorted(self.monitor_options.items()) if isinstance(v, (bool, int, float, str))}
        return self._generate_state_key(
            every=self.every, batch_sharpness=self.batch_sharpness, probe=self.batch is not None, **plain
        )

    # -- hooks -------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the trainer, take the probe batch and build the monitor.

        Raises:
            MisconfigurationException: the ``Trainer`` has no logger.
            CurvatureError: manual optimization without ``loss_fn``/``criterion``.
        """
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `CurvatureCallback` callback with `Trainer` that has no logger."
            )
        manual = not pl_module.automatic_optimization
        if manual and self.loss_fn is None and self.criterion is None:
            raise CurvatureError(
                "CurvatureCallback under manual optimization needs loss_fn=... or criterion=...: "
                "the module's training_step steps the optimizer itself, so it cannot be the probe loss"
            )
        loss_fn = self.loss_fn if self.loss_fn is not None or self.criterion is not None else _training_step_loss
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._update_lr = UpdateLearningRate(optimizer) if optimizer is not None else None
        loader = trainer.train_dataloader if self.batch_sharpness else None
        mean = _strategy_mean(trainer)
        processes = Processes(trainer.world_size, trainer.is_global_zero, mean, is_sharded(pl_module))
        self.monitor = self._new_monitor(
            pl_module, self._probe_batch(trainer, pl_module), optimizer, processes, lambda: _logger_targets(trainer),
            loss_fn, loader=None if isinstance(loader, (list, tuple, dict)) else loader,  # several: combined batches
            transform=trainer.strategy.batch_to_device,
        )
        if self._loaded_state is not None:
            self.monitor.load_state_dict(self._loaded_state["monitor"])
            self._last_step = self._loaded_state["last_step"]
            self._loaded_state = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Measure when the optimizer step count moved to a multiple of ``every``."""
        step = trainer.global_step
        if self.monitor is None or step == self._last_step:
            return
        self._last_step = step
        if not self.monitor.due(step):
            return
        with self._update_lr.applied() if self._update_lr is not None else contextlib.nullcontext():
            result = self.monitor.maybe_measure(step)
        if result is not None:  # every process: EarlyStopping and ModelCheckpoint read them
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in result.scalars().items()})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Detach the optimizer hook."""
        if self._update_lr is not None:
            self._update_lr.remove()
            self._update_lr = None

    # -- checkpointing -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The monitor's schedule and warm-start state, and the last step seen."""
        if self.monitor is None:
            return dict(self._loaded_state) if self._loaded_state is not None else {}
        return {"every": self.every, "last_step": self._last_step, "monitor": self.monitor.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (applied when training starts)."""
        if state_dict:
            self._loaded_state = dict(state_dict)

    # -- helpers ---------------------------------------------------------------------
    def _probe_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The given batch (this rank's slice), else the first validation or training batch."""
        if self.batch is not None:
            batch = _rank_share(self.batch, trainer.global_rank, trainer.world_size)
        else:
            loader = _first_loader(_validation_loaders(trainer)) or _first_loader(trainer.train_dataloader)
            if loader is None:
                raise CurvatureError(
                    "CurvatureCallback found no probe batch: pass batch=<a held-out batch>, or give the "
                    "Trainer a validation or training dataloader"
                )
            batch = first_batch(loader)
        return trainer.strategy.batch_to_device(batch)


def _logger_targets(trainer: pl.Trainer) -> list[Target]:
    """Every logger of the trainer; a TensorBoard one with its writer (duck-typed, any package)."""
    return [
        Target(type(logger).__name__, lambda m, s, logger=logger: logger.log_metrics(m, step=s),
               tensorboard_writer(getattr(logger, "experiment", None)))
        for logger in trainer.loggers
    ]


def _training_step_loss(pl_module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """``pl_module.training_step(batch, 0)`` as a loss, with ``self.log`` muted."""
    args = (batch, 0) if is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2) else (batch,)
    with _muted_logging(pl_module):
        output = pl_module.training_step(*args)
    if isinstance(output, dict):
        output = output.get("loss")
    if not isinstance(output, torch.Tensor):
        raise CurvatureError(
            f"training_step returned {type(output).__name__} on the probe batch, expected the loss (a tensor "
            "or a dict with 'loss'); pass loss_fn=lambda module, batch: ... to CurvatureCallback"
        )
    return output


@contextlib.contextmanager
def _muted_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    """Replace ``pl_module.log``/``log_dict`` with no-ops for the duration."""
    saved = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}
    pl_module.__dict__["log"] = pl_module.__dict__["log_dict"] = _no_op
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            pl_module.__dict__.pop(name, None)
        pl_module.__dict__.update(saved)


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def _strategy_mean(trainer: pl.Trainer) -> Callable[[torch.Tensor], torch.Tensor]:
    """Mean over processes through the strategy (a copy: Lightning reduces in place)."""
    return lambda tensor: trainer.strategy.reduce(tensor.clone(), reduce_op="mean")


def _validation_loaders(trainer: pl.Trainer) -> Any:
    """``trainer.val_dataloaders``, set up now if Lightning has not validated yet."""
    if trainer.val_dataloaders is None and trainer.enable_validation:
        # the same setup Lightning runs before its first validation (sources, samplers)
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
    return trainer.val_dataloaders


def _first_loader(loaders: Any) -> Any:
    """The first dataloader of ``loaders`` (one loader, a sequence or a mapping of them)."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _rank_share(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's contiguous slice of ``batch``; the whole batch if it does not split evenly."""
    try:
        return process_share(batch, rank, world_size)
    except CurvatureError as error:
        rank_zero_warn(f"curvwatch: {error}; every process measures the whole batch", category=CurvatureWarning)
        return batch
