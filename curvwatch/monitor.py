"""CurvatureMonitor: every ``every`` optimizer steps, measure and log curvature.

One measurement (:meth:`CurvatureMonitor.measure`): plan what it may spend
(:mod:`curvwatch.planning`: the share of training time saved up, the memory
allowed, the products they buy); enter :func:`~curvwatch.guard.measurement_guard`
(modes, RNG, buffers, autocast off, math attention); measure
(:func:`curvwatch.measurement.measure`); hand the result to ``on_threshold``
(ratios crossing 1) and the sinks. A failure inside is one warning and a
skipped point, unless ``strict=True``. The settings are one
:class:`~curvwatch.options.MonitorOptions`; the monitor keeps the schedule, the
failure policy, the sinks and the state a checkpoint carries.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch

from curvwatch._errors import CurvatureError, CurvatureWarning
from curvwatch.crossings import Crossings
from curvwatch.guard import measurement_guard, normalization_mismatch
from curvwatch.measurement import MeasurementState, Probe, measure, prepare
from curvwatch.names import Method
from curvwatch.optim import check_optimizer
from curvwatch.options import MonitorOptions, checked_step
from curvwatch.planning import Allowance, DoesNotFit, MemoryPlan, Planner
from curvwatch.probe import LossFn
from curvwatch.results import CurvatureResult, ThresholdEvent

logger = logging.getLogger("curvwatch")

Sink = Callable[[CurvatureResult], Any]

# Every name the constructor takes: what the monitor works with, then its settings (MonitorOptions fields).
ARGUMENTS = ("model", "batch", "loss_fn", "criterion", "optimizer", "sinks", "on_threshold", "minibatches",
             *MonitorOptions.names())


class CurvatureMonitor:
    r"""Measure sharpness, trace and the edge-of-stability ratio on a probe batch.

    Args:
        model: the live model (unwrapped from DDP; the monitor never changes it).
        batch: the held-out probe batch (moved to the model's device once).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        criterion: shortcut for ``(inputs, targets)`` batches:
            ``criterion(model(inputs), targets)``.
        optimizer: where thresholds and the preconditioner come from; ``None``:
            sharpness is logged without a threshold.
        sinks: callables receiving each :class:`~curvwatch.CurvatureResult`.
        on_threshold: ``on_threshold(event)`` called when ``sharpness_ratio``
            crosses 1 upwards or falls back below it, and when an early-warning
            ratio (``update_sharpness_ratio``, ``critical_sharpness_ratio``)
            crosses 1 upwards. ``event`` is a
            :class:`~curvwatch.results.ThresholdEvent`: the
            :class:`~curvwatch.CurvatureResult` with ``quantity`` (which ratio
            crossed), ``ratio`` and ``stable_lr`` (``lr / ratio``). A callback
            that raises is one warning (``strict=True`` raises).
        minibatches: an iterable of training mini-batches (e.g. the training
            ``DataLoader``); batch sharpness then draws from it (cycling) instead
            of subsampling the probe batch. Needs ``batch_size`` (documentation of
            the size; the batches are used as they come).
        options: a :class:`~curvwatch.options.MonitorOptions` to start from.
        **settings: :class:`~curvwatch.options.MonitorOptions` fields, grouped
            there with their defaults: ``every``, ``top_k``, ``trace``,
            ``budget``, ``method``, ``curvature``, ``strict``, ``train_mode``,
            ``blocks``, ``reduce``, ... (each also reads as an attribute:
            ``monitor.top_k``).

    Raises:
        CurvatureError: bad arguments (named in the message), including a
            ``curvature="ggn"`` setup with no known output Hessian, an
            ``optimizer`` that holds none of the model's parameters, a
            non-callable ``on_threshold`` and ``Budget.max_basis <= top_k``.

    Example::

        monitor = CurvatureMonitor(model, (x_val, y_val), criterion=nn.CrossEntropyLoss(),
                                   every=100, optimizer=opt, sinks=[TensorBoardSink("runs/a")])
        monitor.attach(opt)          # measures after every 100th opt.step()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: Any,
        loss_fn: LossFn | None = None,
        criterion: Callable | None = None,
        *,
        optimizer: Any = None,
        sinks: Iterable[Sink] = (),
        on_threshold: Callable[[ThresholdEvent], Any] | None = None,
        minibatches: Iterable[Any] | None = None,
        options: MonitorOptions | None = None,
        **settings: Any,
    ) -> None:
        options = MonitorOptions(**settings) if options is None else replace(options, **settings)
        probe, self.options, self.minibatches = prepare(model, batch, loss_fn, criterion, options, minibatches)
        self.model, self.batch, self.loss_fn, self.criterion = model, probe.batch, probe.loss_fn, criterion
        self._output_kind = probe.output_kind  # "ggn" or "ggn_lm_head": which output-space path (None: Hessian)
        self._draw = probe.minibatch
        if optimizer is not None:
            check_optimizer(optimizer, model, self.options.param_group)
        if on_threshold is not None and not callable(on_threshold):
            raise CurvatureError(
                f"on_threshold must be a callable on_threshold(event), got {on_threshold!r} "
                f"({type(on_threshold).__name__}); pass a function, or None"
            )
        self.optimizer, self.on_threshold, self.sinks = optimizer, on_threshold, _checked_sinks(sinks)
        self.history: list[CurvatureResult] = []
        fixed = None if self.options.method == Method.AUTO else str(self.options.method)
        self._state = MeasurementState(resolved_method=fixed)
        self._crossings = Crossings()
        self._warned: set[str] = set()
        self._attached_steps = 0
        self._attached: tuple[Any, Any] | None = None
        self._planner = Planner(next(p for p in model.parameters() if p.requires_grad).device)

    def __getattr__(self, name: str) -> Any:
        """A setting reads as an attribute: ``monitor.top_k`` is ``monitor.options.top_k``."""
        options = self.__dict__.get("options")
        if options is not None and name in MonitorOptions.names():
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- scheduling ------------------------------------------------------------
    def due(self, step: int) -> bool:
        """True when ``step`` (optimizer steps taken) is a positive multiple of ``every``."""
        return step > 0 and step % self.options.every == 0

    def maybe_measure(self, step: int) -> CurvatureResult | None:
        """A scheduled :meth:`measure`, within the time share, if :meth:`due`; else ``None``."""
        return self.measure(step, scheduled=True) if self.due(step) else None

    def attach(self, optimizer: Any) -> torch.utils.hooks.RemovableHandle:
        """Measure right after every ``every``-th ``optimizer.step()``.

        Also makes ``optimizer`` the source of thresholds if none was given.
        Returns the hook handle (``handle.remove()`` detaches).

        Raises:
            CurvatureError: ``optimizer`` holds none of the model's parameters
                (its steps are not this model's), or the monitor is attached
                to another optimizer.
        """
        inner = check_optimizer(optimizer, self.model)
        if self._attached is not None:
            attached_to, handle = self._attached
            if attached_to is inner and handle.id in inner._optimizer_step_post_hooks:
                return handle  # attaching twice would count every step twice
            if handle.id in attached_to._optimizer_step_post_hooks:
                raise CurvatureError(
                    "this monitor is already attached to another optimizer: call "
                    "handle.remove() on the handle attach() returned first"
                )
        if self.optimizer is None:
            self.optimizer = check_optimizer(inner, self.model, self.options.param_group)

        def hook(opt, args, kwargs) -> None:
            self._attached_steps += 1
            self.maybe_measure(self._attached_steps)

        handle = inner.register_step_post_hook(hook)
        self._attached = (inner, handle)
        return handle

    # -- measuring --------------------------------------------------------------
    def measure(self, step: int | None = None, *, scheduled: bool = False) -> CurvatureResult | None:
        """Measure now, within the budget; return the result.

        Returns ``None`` when the measurement failed (not strict), was deferred
        because the share of training time is spent (:attr:`Budget.overhead`,
        scheduled measurements only), or would not fit in memory (one warning
        with the numbers and the fix).

        Args:
            step: the optimizer step to log at; default: number of measurements.
            scheduled: part of the schedule (:meth:`maybe_measure`, :meth:`attach`
                and the framework callbacks): held to the share of training
                time. Default False: a measurement asked for directly runs within
                the hard caps only, and its time still counts in the share.

        Raises:
            CurvatureError: ``step`` is not a non-negative integer.
        """
        step = self.measurements if step is None else checked_step(step)
        planner, started = self._planner, time.perf_counter()
        try:
            allowance = planner.plan(step, scheduled, self.options, self.model, self._probe(), self._state, self._warn)
            if allowance is None:
                return None  # deferred: the share saved up does not cover it
            result = self._measure_within(step, allowance)
        except Exception as error:  # noqa: BLE001 - the failure policy
            planner.charge(time.perf_counter() - started, 0)
            return self._skipped(step, error)
        finally:
            planner.done()
        seconds = time.perf_counter() - started
        result = replace(result, overhead=planner.share_after(seconds), seconds=seconds)
        self.history.append(result)
        self._crossings_of(result)
        for sink in self.sinks:
            dropped = "its results are dropped, training continues"
            self._guarded(f"sink {id(sink)}", sink, result, f"sink {sink!r}", dropped)
        # every second is charged, the sinks' too (part of what every measurement costs
        # beyond its products); the line search is neither
        planner.charge(time.perf_counter() - started, result.hvps, result.critical_sharpness_seconds, allowance.meter)
        return result

    def _measure_within(self, step: int, allowance: Allowance) -> CurvatureResult:
        """One measurement inside the guard, within ``allowance``; its notes warned once each."""
        mismatch = normalization_mismatch(self.model, self.options.train_mode)  # before the guard sets modes
        if mismatch is not None and self.optimizer is not None:  # a ratio to compare: say why not
            self._warn("normalization-mode", mismatch, stacklevel=4)
        with measurement_guard(self.model, self.options.train_mode):
            result, self._state, notes = measure(
                self.options, self._state, self.model, self._probe(), step, self.optimizer, allowance
            )
        self._planner.finished(allowance)
        for key, message in notes:
            self._warn(key, message, stacklevel=4)  # at the call of measure(), as the others
        return result

    def _skipped(self, step: int, error: Exception) -> None:
        """The failure policy: raise under ``strict``, else one warning per cause and a skipped point."""
        if self.options.strict:
            raise error
        memory = isinstance(error, DoesNotFit)
        why = f"it does not fit in the memory allowed: {error}" if memory else f"{type(error).__name__}: {error}"
        self._warn(
            "memory" if memory else f"{type(error).__name__}: {error}",
            f"curvwatch: measurement at step {step} skipped ({why}); training continues (strict=True raises instead)",
        )

    def _plan_memory(self) -> tuple[MemoryPlan, str | None, int]:
        """The memory plan, the method it forces (or ``None``) and the probe's pieces (:meth:`Planner.memory`)."""
        return self._planner.memory(self.options, self.model, self._probe(), self._state, self._warn)

    @property
    def last_plan(self) -> MemoryPlan | None:
        """Where the last measurement put its basis, and why (``None`` before the first)."""
        return self._planner.last

    @contextlib.contextmanager
    def not_training(self) -> Iterator[None]:
        """Seconds inside are neither training nor measuring time for the share (``Budget.overhead``).

        The share is ``overhead`` x the wall-clock seconds between measurements;
        wrap what should not buy measuring time: a long validation pass, a
        checkpoint written to a slow disk, or a second model stepped side by
        side in a benchmark::

            with monitor.not_training():
                evaluate(model, val_loader)
        """
        started = time.perf_counter()
        try:
            yield
        finally:
            self._cost.skip(time.perf_counter() - started)

    @property
    def measurements(self) -> int:
        """Measurements made so far (the schedule's default step)."""
        return self._state.measurements

    _cost = property(lambda self: self._planner.account, doc="The time account.")
    _gauge = property(lambda self: self._planner.gauge, doc="One product's activations, as measured.")

    def _config(self) -> MonitorOptions:
        """What a measurement reads (:func:`curvwatch.measurement.measure`'s ``options``)."""
        return self.options

    def _probe(self) -> Probe:
        return Probe(self.batch, self.loss_fn, self._draw, self.criterion, self._output_kind)

    def _crossings_of(self, result: CurvatureResult) -> None:
        """Log, warn and call ``on_threshold`` for each ratio ``result`` takes across 1 (:mod:`curvwatch.crossings`)."""
        for crossing in self._crossings.observe(result):
            logger.log(crossing.level, crossing.log)
            if crossing.warning is not None:
                self._warn(crossing.warning_key, crossing.warning)
            if self.on_threshold is not None:
                self._guarded(
                    "on_threshold", self.on_threshold, crossing.event, "on_threshold",
                    "training continues (strict=True raises instead)",
                )

    def _guarded(self, key: str, call: Callable[[Any], Any], value: Any, what: str, then: str) -> None:
        """``call(value)`` under the failure policy: one warning per ``key`` saying what happens ``then``."""
        try:
            call(value)
        except Exception as error:  # noqa: BLE001 - a broken sink or callback must not stop training
            if self.options.strict:
                raise
            self._warn(key, f"curvwatch: {what} failed ({type(error).__name__}: {error}); {then}")

    def _warn(self, key: str, message: str, stacklevel: int = 3) -> None:
        """One :class:`~curvwatch.CurvatureWarning` per ``key``."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, CurvatureWarning, stacklevel=stacklevel)

    # -- checkpointing ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole state (CPU tensors), for checkpoints.

        The measurement's state (:class:`~curvwatch.measurement.MeasurementState`:
        count, warm starts, resolved method), the schedule of :meth:`attach`, the
        threshold-crossing state and the time account.
        """
        state = self._state.to_dict()
        return {
            "measurements": state.pop("measurements"),
            "attached_steps": self._attached_steps,
            **state,
            **self._crossings.state_dict(),
            "cost": self._planner.account.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Warm starts stay where they were saved (on the host, in bfloat16, when
        they came from a GPU): a measurement moves them to the device when it
        starts from them, and drops one that does not fit the model.

        Raises:
            CurvatureError: ``state`` is not a :meth:`state_dict` of a monitor.
        """
        missing = [key for key in ("measurements", "warm") if key not in state] if isinstance(state, dict) else []
        if not isinstance(state, dict) or missing:
            raise CurvatureError(
                f"not a CurvatureMonitor.state_dict(): missing {missing or 'everything'}; pass what "
                "state_dict() returned (saved with the training checkpoint)"
            )
        resolved = self._state.resolved_method
        if self.options.method == Method.AUTO and not self.options.output_space:
            resolved = state.get("method")
        self._state = MeasurementState.from_dict(state, resolved)
        self._attached_steps = int(state.get("attached_steps", 0))
        self._crossings.load_state_dict(state)
        if "cost" in state:
            self._planner.account.load_state_dict(state["cost"])


def _checked_sinks(sinks: Any) -> tuple[Sink, ...]:
    """``sinks`` as a tuple of callables (one sink not in a list is refused with the fix)."""
    if callable(sinks) and not isinstance(sinks, Iterable):
        raise CurvatureError(
            f"sinks must be a list of callables: pass sinks=[<the {type(sinks).__name__}>], not the sink itself"
        )
    sinks = tuple(sinks)
    for sink in sinks:
        if not callable(sink):
            raise CurvatureError(f"sinks must be callables sink(result), got {type(sink).__name__}")
    return sinks
