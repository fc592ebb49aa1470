r"""What the next measurement may spend: seconds, products, memory, and the method that fits.

:class:`Planner` keeps what measuring has spent so far (the time account, one
product's activations as measured, the training step's peak memory) and turns it
into an :class:`Allowance` before each measurement (:meth:`Planner.plan`):

1. seconds: :func:`~curvwatch.planning.cost.seconds_allowed` for a scheduled
   measurement (a share of training time plus a small fixed allowance per run;
   a measurement that does not fit is deferred), :attr:`Budget.max_seconds` for one asked for directly;
2. memory: where the Lanczos basis goes and whether the probe batch is split
   (:mod:`curvwatch.planning.memory`), and, under ``method="auto"``, one-sided
   differences where double backward would not fit but they would;
3. products: what those seconds buy at the learned cost of one, beyond the
   learned fixed part of a measurement (:func:`~curvwatch.planning.cost.affordable_products`);
4. the optional quantities' seconds: the share proper saved up, without the fixed
   allowance (:func:`~curvwatch.planning.cost.share_seconds`).

The measurement spends within the allowance; the monitor hands back what it
took (:meth:`Planner.finished`, :meth:`Planner.charge`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from curvwatch._errors import CurvatureError
from curvwatch._flat import local
from curvwatch.guard import measurement_guard
from curvwatch.names import DIFFERENCES, Method
from curvwatch.operators.sharded import is_sharded
from curvwatch.planning.cost import OverheadAccount, ProductMeter, affordable_products, seconds_allowed, share_seconds
from curvwatch.planning.memory import (
    ActivationGauge,
    MemoryPlan,
    TrainingPeak,
    device_allowance,
    host_available_bytes,
    plan_with_pieces,
)
from curvwatch.probe import known_length
from curvwatch.solvers.lanczos import default_max_basis

Warn = Callable[[str, str], None]  # warn(key, message): the monitor's warn-once


@dataclass(frozen=True)
class Allowance:
    """What one measurement may spend: products, seconds, memory (the plan).

    Attributes:
        products: products it may apply, all solves together.
        seconds: wall-clock seconds it may take (``None``: no limit).
        plan: where its basis goes, and what it is expected to take.
        method: a method the memory plan forces on this measurement only
            (``"forward_difference"`` where double backward does not fit), else ``None``.
        pieces: differences: the probe batch split so one gradient's activations fit.
        extra_seconds: seconds from its start within which the optional
            quantities (update and critical sharpness, trace, spectrum, blocks)
            may run: the share proper saved up (``None``: no limit).
        seconds_per_product: the learned cost of one product (NaN: not known yet).
        meter: counts the seconds and products of its solves (the cost of one product, learned).
    """

    products: int
    seconds: float | None
    plan: MemoryPlan
    method: str | None = None
    pieces: int = 1
    extra_seconds: float | None = None
    seconds_per_product: float = math.nan
    meter: ProductMeter = field(default_factory=ProductMeter)


class DoesNotFit(CurvatureError):
    """A measurement that would not fit in the memory allowed (the message says why)."""


class Planner:
    """What measuring has spent so far, turned into the next measurement's :class:`Allowance`.

    Args:
        device: the model's device (the training step's peak is read there now).

    Attributes:
        account: the time account (:class:`~curvwatch.planning.cost.OverheadAccount`).
        gauge: one product's activations, from the monitor's own measurements.
        peak: the training step's peak memory (CUDA).
        last: the memory plan of the last measurement (``None`` before the first).
    """

    def __init__(self, device: torch.device) -> None:
        self.account = OverheadAccount()
        self.account.start()
        self.gauge = ActivationGauge()
        self.peak = TrainingPeak()
        self.peak.observe(device)
        self.last: MemoryPlan | None = None
        self._under_way: torch.device | None = None  # the device of the measurement under way
        self._method = ""  # the method whose activations it gauges

    def plan(
        self, step: int, scheduled: bool, options: Any, model: torch.nn.Module, probe: Any, state: Any, warn: Warn
    ) -> Allowance | None:
        """The allowance of a measurement at ``step``; ``None``: deferred (the share saved up does not cover it).

        Args:
            step: the optimizer step (for the deferral's note).
            scheduled: held to the share of training time (else the hard caps only).
            options: the monitor's :class:`~curvwatch.options.MonitorOptions`.
            model: the model measured.
            probe: the measurement's :class:`~curvwatch.measurement.Probe`.
            state: the :class:`~curvwatch.measurement.MeasurementState` the measurement starts from.
            warn: ``warn(key, message)``, once per key (a deferral, a method forced by memory).

        Raises:
            DoesNotFit: the measurement would not fit in the memory allowed.
        """
        self.account.training_until_now()
        seconds = extra = options.budget.max_seconds
        if scheduled:
            warm = state.warm is not None or state.warm_preconditioned is not None
            # the threshold's quantity: one preconditioned eigenvalue for Adam-type optimizers
            k = 1 if state.warm_preconditioned is not None else options.top_k
            seconds, note = seconds_allowed(options.budget, self.account, k, warm, step)
            extra = share_seconds(options.budget, self.account, seconds)
            if note is not None:
                warn(*note)
        if seconds is not None and seconds <= 0:
            return None
        self._under_way = device = next(model.parameters()).device
        plan, forced, pieces = self.memory(options, model, probe, state, warn)
        self.last = plan
        if not plan.fits:
            raise DoesNotFit(plan.message)
        self._method = forced or probe.output_kind or state.resolved_method or Method.DOUBLE_BACKWARD
        account = self.account
        products = affordable_products(
            options.budget, options.top_k, seconds, account.seconds_per_product, account.fixed_seconds
        )
        self.gauge.start(device)
        return Allowance(
            products=products, seconds=seconds, plan=plan, method=forced, pieces=pieces, extra_seconds=extra,
            seconds_per_product=account.seconds_per_product,
        )

    def memory(
        self, options: Any, model: torch.nn.Module, probe: Any, state: Any, warn: Warn
    ) -> tuple[MemoryPlan, str | None, int]:
        """Where the basis goes, checked against the memory allowed (see :mod:`curvwatch.planning.memory`).

        Returns the plan, the method of this measurement where the plan forces
        one (``"forward_difference"`` where double backward would not fit but
        one-sided differences would, else ``None``) and the pieces the probe
        batch is split into so that one gradient's activations fit
        (differences only, :mod:`curvwatch.measurement.chunked`; 1: not split).
        """
        params = [p for p in model.parameters() if p.requires_grad]
        device, sharded = params[0].device, is_sharded(model)
        self.peak.observe(device)
        if self.gauge.needs_forward(device) and not sharded:
            with measurement_guard(model, options.train_mode), torch.enable_grad():
                self.gauge.gauge_forward(device, lambda: probe.loss_fn(model, probe.batch))
        method = probe.output_kind or state.resolved_method or Method.DOUBLE_BACKWARD
        budget = options.budget
        host = host_available_bytes()  # once: the allowance and every plan tried read the same number
        if budget.max_memory is not None:  # the user's number replaces the ratio
            allowed = float(budget.max_memory)
            if device.type == "cuda":
                allowed = min(allowed, device_allowance(device, budget.memory_ratio, None))
        else:
            allowed = device_allowance(device, budget.memory_ratio, self.peak.value, host)
        size = sum(local(p).numel() for p in params)  # the local shard under FSDP2
        max_basis = budget.max_basis or default_max_basis(options.top_k)
        examples = known_length(probe.batch)

        def plan_for(m: str) -> tuple[MemoryPlan, int]:
            splittable = m in DIFFERENCES and not sharded and math.isfinite(examples)
            return plan_with_pieces(
                size, params[0].dtype, device, options.top_k, max_basis, m, allowed,
                self.gauge.activations(m), options.basis_device, int(examples) if splittable else 1, host,
            )

        plan, pieces = plan_for(method)
        if not plan.fits and options.method == Method.AUTO and method == Method.DOUBLE_BACKWARD:
            cheaper, pieces = plan_for(Method.FORWARD_DIFFERENCE)
            if cheaper.fits:
                warn(
                    "memory-fd",
                    f"curvwatch: double backward would not fit ({plan.message}); measuring with "
                    "one-sided differences certified by a central one (method='forward_difference')"
                    + (f", the probe batch in {pieces} pieces" if pieces > 1 else ""),
                )
                return cheaper, Method.FORWARD_DIFFERENCE, pieces
        return plan, None, pieces

    def finished(self, allowance: Allowance) -> None:
        """Learn one product's activations from the measurement that just ended within ``allowance``."""
        vectors = allowance.plan.device_bytes - self.gauge.activations(self._method) / allowance.pieces
        self.gauge.finish(self._under_way, self._method, vectors, allowance.pieces)

    def done(self) -> None:
        """A measurement that got past the time check has ended (either way): its memory peak is the monitor's."""
        if self._under_way is not None:
            self.peak.measured(self._under_way)
            self._under_way = None

    def share_after(self, seconds: float) -> float:
        """The share of training time measuring will have taken once ``seconds`` more are charged."""
        return (self.account.measuring_seconds + seconds) / max(self.account.training_seconds, 1e-300)

    def charge(
        self, seconds: float, products: int, other_seconds: float = 0.0, meter: ProductMeter | None = None
    ) -> None:
        """Charge a measurement to the time account.

        ``other_seconds`` of it are neither products nor fixed; ``meter``: its
        solves' seconds and products (:meth:`OverheadAccount.measured`).
        """
        self.account.measured(seconds, products, other_seconds, meter)

