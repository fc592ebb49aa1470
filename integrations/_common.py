"""What the framework adapters share: one set of rules for Lightning, transformers and Accelerate.

Each adapter finds what only its framework knows (the model, the probe batch,
the step, the loggers, the process rank) and hands it to the pieces here, so
the three behave the same:

* **Options.** :class:`CallbackSettings` is the constructor Lightning's and
  transformers' callbacks share: :func:`check_adapter_arguments` validates the
  arguments every adapter shares at construction, against the names a
  :class:`~curvwatch.CurvatureMonitor` takes (``ARGUMENTS``).
  :func:`build_monitor` builds every adapter's monitor the same way:
  :func:`batch_sharpness_options` turns ``batch_sharpness=True`` into the
  monitor's ``batch_size`` and ``minibatches`` (read from the plain loader
  under a framework's wrapper, :func:`unwrap_loader`), ``reduce`` defaults to
  the mean over processes (:class:`Processes`; not when the model is sharded:
  the sharded operator reduces itself), and the sinks are the framework's
  logging sink and the user's, on process zero.
* **Processes.** Every process measures (each Hessian-vector product is
  averaged over processes, so all of them run the same solver and hold the same
  result in ``monitor.history``); only process zero writes: the framework's
  loggers and the user's ``sinks=`` alike (:func:`rank_zero_sinks`).
* **Step.** The number of optimizer updates, the step the loss curves use.
* **Learning rate of the threshold.** The lr that produced the update just
  measured, i.e. the lr in the optimizer when its ``step()`` ran
  (:class:`UpdateLearningRate`), not the lr a scheduler set afterwards. The
  edge-of-stability argument is about the update map
  ``theta_{t+1} = theta_t - eta_t * grad L(theta_t)``: gradient descent on a
  quadratic with curvature ``lambda`` is stable while ``|1 - eta_t lambda| <=
  1``, i.e. ``lambda <= 2 / eta_t`` (Cohen et al. 2021), and sharpness
  self-stabilises at ``2 / eta_t`` of the steps that were actually taken.
  The measured weights are the result of the updates with ``eta_1..eta_t``; the
  threshold that the logged sharpness is compared with is the one those updates
  obeyed. With a constant lr the two rules agree; with a schedule the rate the
  scheduler sets next (0 at the end of a linear decay) describes an update that
  has not happened. Lightning and transformers step the scheduler before their
  step-end hooks, so they measure with the lr of the update put back into the
  optimizer for the measurement; Accelerate measures inside the optimizer's
  post-step hook, where it still is.
* **Logging.** :class:`LoggingSink` writes each result to the framework's
  targets (loggers, trackers), each guarded on its own: a failure is one
  :class:`~curvwatch.CurvatureWarning` per target and that point is dropped
  there, training continues; with ``strict=True`` it raises. A TensorBoard
  writer among the targets also gets the custom-scalars chart (sharpness over
  its threshold; written as :class:`~curvwatch.sinks.ChartLayout` says, the
  rule of :class:`~curvwatch.TensorBoardSink` too) and the
  ``curvature/spectrum`` histogram.

References:
    Cohen, Kaur, Li, Kolter, Talwalkar (2021). Gradient Descent on Neural
    Networks Typically Occurs at the Edge of Stability. ICLR.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from curvwatch import (
    CurvatureError,
    CurvatureMonitor,
    CurvatureResult,
    CurvatureWarning,
)
from curvwatch.loaders import TrainingBatches, loader_batch_size
from curvwatch.monitor import ARGUMENTS
from curvwatch.operators import is_sharded  # noqa: F401 - re-exported to the adapters (FSDP detection)
from curvwatch.optim import unwrap_optimizer
from curvwatch.probe import LossFn, process_share  # noqa: F401 - re-exported to the adapters
from curvwatch.sinks import ChartLayout, margin_scalars, write_spectrum

Sink = Callable[[CurvatureResult], Any]
Mean = Callable[[torch.Tensor], torch.Tensor]

# CurvatureMonitor arguments the framework callbacks fill in themselves.
CALLBACK_ARGUMENTS = ("model", "batch", "loss_fn", "criterion", "every", "optimizer")


def check_adapter_arguments(
    every: Any,
    loss_fn: Any,
    criterion: Any,
    batch_sharpness: Any,
    batch_sharpness_source: Any,
    options: dict[str, Any],
    reserved: Iterable[str],
) -> None:
    """Validate the arguments every framework adapter shares, at construction.

    Raises:
        CurvatureError: a bad ``every``, both or non-callable ``loss_fn`` /
            ``criterion``, a bad batch-sharpness switch, an option the adapter
            sets itself (``reserved``), or a name :class:`~curvwatch.CurvatureMonitor`
            does not take.
    """
    if not isinstance(batch_sharpness, bool):
        raise CurvatureError(f"batch_sharpness must be True or False, got {batch_sharpness!r}")
    if batch_sharpness_source not in ("train", "probe"):
        raise CurvatureError(f"batch_sharpness_source must be 'train' or 'probe', got {batch_sharpness_source!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise CurvatureError(f"every must be a positive integer, got {every!r}")
    if loss_fn is not None and criterion is not None:
        raise CurvatureError("pass loss_fn or criterion, not both")
    for name, value in (("loss_fn", loss_fn), ("criterion", criterion)):
        if value is not None and not callable(value):
            raise CurvatureError(f"{name} must be callable, got {type(value).__name__}")
    reserved = set(reserved)
    own = sorted(set(options) & reserved)
    if own:
        raise CurvatureError(f"{own} are set by the callback; remove them from the options")
    known = set(ARGUMENTS) - reserved
    unknown = sorted(set(options) - known)
    if unknown:
        raise CurvatureError(f"unknown CurvatureMonitor options {unknown}; choose from {sorted(known)}")


def unwrap_loader(loader: Any) -> Any:
    """The plain loader under a framework's wrapper (Accelerate's ``base_dataloader``), else ``loader``."""
    return getattr(loader, "base_dataloader", loader)


def batch_sharpness_options(
    source: str,
    loader: Any,
    options: dict[str, Any],
    owner: str,
    transform: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
    """The monitor options that ``batch_sharpness=True`` adds to ``options``.

    ``batch_size``: the per-process batch size of ``loader`` unless given;
    ``minibatches``: for ``source="train"`` (unless given) the training
    mini-batches, drawn from a private copy of the plain loader under
    ``loader`` (see :class:`curvwatch.loaders.TrainingBatches`), each passed
    through ``transform`` (a framework's device transfer).

    Args:
        source: ``"train"`` or ``"probe"`` (subsample the probe batch).
        loader: the training dataloader (wrapped or not), or ``None``.
        options: the monitor options the user gave.
        owner: the adapter call, for the error messages.
        transform: applied to every drawn mini-batch.

    Raises:
        CurvatureError: the batch size cannot be told from ``loader``, or
            ``source="train"`` without a (single) training loader.
    """
    added: dict[str, Any] = {}
    plain = None if loader is None else unwrap_loader(loader)
    if "batch_size" not in options:
        added["batch_size"] = None if plain is None else loader_batch_size(plain)
        if added["batch_size"] is None:
            raise CurvatureError(
                f"{owner}(batch_sharpness=True) cannot tell the training batch size (no single training "
                "dataloader with a batch_size): pass batch_size=<training batch size per process>"
            )
    if source == "train" and "minibatches" not in options:
        if plain is None:
            raise CurvatureError(
                f"{owner}(batch_sharpness=True) draws mini-batches from one training dataloader and has none: "
                "pass batch_sharpness_source='probe' to subsample the probe batch (or minibatches=...)"
            )
        added["minibatches"] = TrainingBatches(plain, transform=transform)
    return added


@dataclass(frozen=True)
class Processes:
    """The processes a framework runs the model on.

    Attributes:
        world_size: how many.
        is_zero: this one writes (the loggers, the user's sinks).
        mean: the mean of a tensor over them (the default ``reduce``).
        sharded: the model is sharded over them (FSDP): its operator reduces itself.
    """

    world_size: int
    is_zero: bool
    mean: Mean
    sharded: bool


def build_monitor(
    model: torch.nn.Module,
    batch: Any,
    settings: dict[str, Any],
    processes: Processes,
    targets: Callable[[], Iterable[Target]],
    warn: WarnOnce,
    *,
    every: int,
    loss_fn: LossFn | None,
    criterion: Callable | None,
    optimizer: Any,
    batch_sharpness: str | None = None,
    loader: Any = None,
    owner: str = "",
    transform: Callable[[Any], Any] | None = None,
    monitor: type[CurvatureMonitor] = CurvatureMonitor,
) -> CurvatureMonitor:
    """A framework's monitor: the user's ``settings`` and what every adapter adds to them.

    ``batch_sharpness``: the mini-batches' source (``"train"``, ``"probe"``) when
    batch sharpness is on (:func:`batch_sharpness_options`, from ``loader``
    through ``transform``), else ``None``. ``reduce`` defaults to the mean over
    the processes (not under sharding); the user's ``sinks`` and the logging
    sink that writes to ``targets`` run on process zero only (:func:`rank_zero_sinks`);
    ``optimizer`` is the source of thresholds unless ``settings`` name one.
    """
    options = dict(settings)
    if batch_sharpness is not None:
        options.update(batch_sharpness_options(batch_sharpness, loader, options, owner, transform))
    if processes.world_size > 1 and not processes.sharded:
        options.setdefault("reduce", processes.mean)
    log = LoggingSink(targets, options.get("strict", False), warn)
    sinks = rank_zero_sinks(options, processes.is_zero, log)
    options.setdefault("optimizer", optimizer)
    return monitor(model, batch, loss_fn=loss_fn, criterion=criterion, every=every, sinks=sinks, **options)


class CallbackSettings:
    """The constructor Lightning's and transformers' callbacks share: checked once, kept as given.

    :meth:`_new_monitor` builds the monitor when training starts.

    Args:
        every: measure after every ``every``-th optimizer step. Default 100.
        batch: the probe batch; ``None``: the framework's first validation (or
            evaluation) batch, else its first training batch.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; ``None``: the
            framework's own loss of the model.
        criterion: shortcut for ``(inputs, targets)`` batches:
            ``criterion(model(inputs), targets)``.
        batch_sharpness: also measure the batch sharpness at the training
            batch size (an explicit ``batch_size=`` option wins). Default False.
        batch_sharpness_source: where its mini-batches come from: ``"train"``
            (default) the training dataloader, ``"probe"`` random subsets of the
            probe batch.
        **monitor_options: passed to :class:`~curvwatch.CurvatureMonitor`: its
            settings (:class:`~curvwatch.options.MonitorOptions`: ``top_k``,
            ``trace``, ``budget``, ``method``, ``train_mode``, ``param_group``,
            ``seed``, ``batch_size``, ``reduce``, ``strict``, ...) and
            ``sinks``, ``on_threshold``, ``minibatches``. Extra ``sinks`` run on
            process zero only, like the loggers.

    Raises:
        CurvatureError: see :func:`check_adapter_arguments`.
    """

    monitor: CurvatureMonitor | None = None  # built when training starts
    _update_lr: UpdateLearningRate | None = None  # the lr of the last update, put back while measuring

    def __init__(
        self,
        every: int = 100,
        batch: Any = None,
        loss_fn: LossFn | None = None,
        criterion: Callable | None = None,
        batch_sharpness: bool = False,
        batch_sharpness_source: Literal["train", "probe"] = "train",
        **monitor_options: Any,
    ) -> None:
        check_adapter_arguments(
            every, loss_fn, criterion, batch_sharpness, batch_sharpness_source, monitor_options, CALLBACK_ARGUMENTS
        )
        super().__init__()
        self.every, self.batch, self.loss_fn, self.criterion = every, batch, loss_fn, criterion
        self.batch_sharpness, self.batch_sharpness_source = batch_sharpness, batch_sharpness_source
        self.monitor_options = monitor_options
        self._warn = WarnOnce()

    def _new_monitor(
        self, model: torch.nn.Module, batch: Any, optimizer: Any, processes: Processes,
        targets: Callable[[], Iterable[Target]], loss_fn: LossFn | None, loader: Any = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> CurvatureMonitor:
        """The callback's monitor (:func:`build_monitor` with its settings)."""
        return build_monitor(
            model, batch, self.monitor_options, processes, targets, self._warn, every=self.every, loss_fn=loss_fn,
            criterion=self.criterion, optimizer=optimizer, loader=loader, owner=type(self).__name__,
            batch_sharpness=self.batch_sharpness_source if self.batch_sharpness else None, transform=transform,
        )


def rank_zero_sinks(options: dict[str, Any], is_zero: bool, *own: Sink) -> tuple[Sink, ...]:
    """Pop the user's ``sinks`` from ``options``; all sinks on process zero, none elsewhere.

    Every process measures (the products are averaged over processes); only
    process zero writes, so a user's sink sees each result once, as the
    framework's loggers do.
    """
    sinks = tuple(options.pop("sinks", ()))
    for sink in sinks:
        if not callable(sink):
            raise CurvatureError(f"sinks must be callables sink(result), got {type(sink).__name__}")
    return (*sinks, *own) if is_zero else ()


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Return the torch optimizer inside a framework's wrapper, whose ``step`` applies the update.

    Wrappers such as ``AcceleratedOptimizer`` subclass ``torch.optim.Optimizer``
    without its hook machinery, so step hooks go on the optimizer inside.

    Raises:
        CurvatureError: no torch optimizer inside ``optimizer``.
    """
    try:
        return unwrap_optimizer(optimizer)
    except CurvatureError:
        raise CurvatureError(
            "optimizer must be a torch.optim.Optimizer or the prepared optimizer around one "
            f"(accelerator.prepare(...)), got {type(optimizer).__name__}"
        ) from None


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a monitor ``state_dict`` into (its JSON-serialisable entries, the rest: tensors)."""

    def plain(value: Any) -> bool:
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            return False
        return True

    small = {k: v for k, v in state.items() if plain(v)}
    return small, {k: v for k, v in state.items() if k not in small}


class WarnOnce:
    """``warn(key, message)``: one :class:`~curvwatch.CurvatureWarning` per key."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            warnings.warn(message, CurvatureWarning, stacklevel=3)


class UpdateLearningRate:
    """The lr of every parameter group when the optimizer's ``step()`` last ran.

    Registers a post-step hook on the torch optimizer (inside a framework's
    wrapper), which fires on applied updates only (not on an fp16 step the
    ``GradScaler`` skipped). :meth:`applied` puts those rates into the
    parameter groups for the duration of a measurement and the current objects
    back afterwards, so the threshold is the one of the update that was
    measured (see the module docstring) and training is unchanged.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = torch_optimizer(optimizer)
        self.rates: list[float] | None = None
        self._handle = self.optimizer.register_step_post_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.rates = [float(g["lr"]) for g in optimizer.param_groups]  # tensor lrs change in place

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The recorded rates in the parameter groups, the current ones restored afterwards."""
        groups = self.optimizer.param_groups
        if self.rates is None or len(self.rates) != len(groups):
            yield
            return
        current = [g["lr"] for g in groups]
        for group, rate in zip(groups, self.rates, strict=True):
            group["lr"] = rate
        try:
            yield
        finally:
            for group, rate in zip(groups, current, strict=True):
                group["lr"] = rate

    def remove(self) -> None:
        """Detach the hook."""
        self._handle.remove()


class StepGradients:
    """The ``.grad`` tensors of the last applied update, back in place for a measurement after ``zero_grad()``.

    The update directions built from the step's gradient (SGD without
    momentum, Nesterov, RMSprop without momentum:
    :func:`curvwatch.optim.update_direction`) read ``.grad``, which a
    framework that clears it between ``optimizer.step()`` and its step-end hook
    (transformers' Trainer: ``model.zero_grad()``) leaves empty. A post-step
    hook on the torch optimizer (applied updates only) keeps references to the
    gradients; ``zero_grad()`` (``set_to_none=True``) drops them from the
    parameters, not the tensors, so nothing is copied. :meth:`restored` puts
    them into the ``.grad`` that is empty for the duration of a measurement and
    empties it again afterwards; :meth:`release` lets the tensors go (call it at
    every step end, so no gradient outlives its step).
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = torch_optimizer(optimizer)
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle = self.optimizer.register_step_post_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.kept = [(p, p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """The kept gradients in every empty ``.grad``, emptied again afterwards."""
        filled = [p for p, _ in self.kept if p.grad is None]
        for p, grad in self.kept:
            if p.grad is None:
                p.grad = grad
        try:
            yield
        finally:
            for p in filled:
                p.grad = None

    def release(self) -> None:
        """Drop the references to the last update's gradients."""
        self.kept = []

    def remove(self) -> None:
        """Detach the hook and drop the gradients."""
        self._handle.remove()
        self.release()


def tensorboard_writer(candidate: Any) -> Any:
    """``candidate`` if it is a TensorBoard ``SummaryWriter`` (duck-typed), else ``None``.

    Duck typing finds the writer of every logger class (``lightning.pytorch``,
    ``pytorch_lightning``, transformers, Accelerate), whatever package it came from.
    """
    if all(hasattr(candidate, name) for name in ("add_scalar", "add_custom_scalars", "add_histogram_raw")):
        return candidate
    return None


@dataclass(frozen=True)
class Target:
    """One place a result is logged to.

    Attributes:
        name: how warnings name it (``"TensorBoardLogger"``, ``"wandb"``, ...).
        log: ``log(metrics, step)`` with ``metrics = {"curvature/<name>": float}``.
        writer: a TensorBoard ``SummaryWriter`` behind it, or ``None``; it also
            gets the custom-scalars chart and the spectrum histogram.
    """

    name: str
    log: Callable[[dict[str, float], int], Any]
    writer: Any = None


def logged_scalars(result: CurvatureResult) -> dict[str, float]:
    """What a logger receives: ``result.scalars()`` and the trace band of the chart."""
    return {**result.scalars(), **margin_scalars(result)}


class LoggingSink:
    """A monitor sink that writes every result to the framework's targets.

    Args:
        targets: ``targets() -> iterable of Target``, asked at every result (the
            framework's loggers may change during training).
        strict: raise a logging failure instead of warning.
        warn: the adapter's :class:`WarnOnce`.
        spectrum_bins: bins of the ``curvature/spectrum`` histogram.

    Failure policy: each target is written on its own; a failure is one
    ``CurvatureWarning`` per target ("... failed ...; dropped there, training
    continues") and the other targets still get the point. ``strict=True``
    raises the first failure.
    """

    def __init__(
        self,
        targets: Callable[[], Iterable[Target]],
        strict: bool = False,
        warn: WarnOnce | None = None,
        spectrum_bins: int = 60,
    ) -> None:
        self.targets = targets
        self.strict = strict
        self.warn = warn if warn is not None else WarnOnce()
        self.spectrum_bins = spectrum_bins
        self._layouts: list[tuple[Any, ChartLayout]] = []  # each writer's layout

    def __call__(self, result: CurvatureResult) -> None:
        metrics = logged_scalars(result)
        for target in self.targets():
            try:
                self._write(target, metrics, result)
            except Exception as error:  # noqa: BLE001 - the failure policy
                if self.strict:
                    raise
                self.warn(
                    f"log {target.name}",
                    f"curvwatch: logging step {result.step} to {target.name} failed ({type(error).__name__}: "
                    f"{error}); the curvature points are dropped there, training continues "
                    "(strict=True raises instead)",
                )

    def _write(self, target: Target, metrics: dict[str, float], result: CurvatureResult) -> None:
        writer = target.writer
        if writer is not None:
            layout = next((layout for w, layout in self._layouts if w is writer), None)
            if layout is None:
                self._layouts.append((writer, layout := ChartLayout()))
            layout.update(writer, result)
        target.log(metrics, result.step)
        if writer is not None:
            if result.spectrum is not None:
                write_spectrum(writer, result, self.spectrum_bins)
            writer.flush()


def writer_target(name: str, writer: Any) -> Target:
    """A target that writes every scalar with a TensorBoard ``writer`` itself."""

    def log(metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, step)

    return Target(name, log, writer)
