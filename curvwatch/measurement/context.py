"""What one measurement reads, and what it has spent and noted: the context its steps share.

A measurement is a list of steps (:mod:`curvwatch.measurement.procedure`), each a
function of a :class:`Context`. The context is explicit and short-lived: built
from the monitor's settings, the state the last measurement handed over, the
model, the probe and the :class:`~curvwatch.planning.Allowance`; it holds the
operator source, the clock, the products spent and the notes; the outcome is a
result and a new :class:`MeasurementState`. Nothing else is kept between
measurements.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from curvwatch.measurement.source import OperatorSource
from curvwatch.operators._base import CurvatureOperator
from curvwatch.operators.sharded import is_sharded
from curvwatch.optim import Threshold
from curvwatch.planning import Allowance
from curvwatch.probe import LossFn
from curvwatch.solvers.lanczos import LanczosResult, lanczos

Note = tuple[str, str]  # (key, message): the monitor warns once per key

# A ratio sharpness/threshold is logged only when the sharpness is certified
# (Budget.tol) and known to this relative accuracy (its Lanczos error bound);
# otherwise it is a lower bound.
RATIO_MAX_ERROR = 1e-2

# The raw top-k of an Adam-type measurement (beside the threshold's preconditioned
# solve) is begun only where the products left cover this many times its
# gap_steps(top_k): a warm top-2 solve on the digits MLP certified in 6-11 products
# (gap_steps(2) = 6), and one cut off by the deadline is spent for a value off the
# curves that marks the whole measurement unconverged (3 of 6 under load, 2026-12-08).
RAW_SOLVE_PRODUCTS = 2


@dataclass(frozen=True)
class MeasurementState:
    """What one measurement hands to the next (all of it; checkpointed whole).

    Attributes:
        measurements: measurements made so far.
        warm: the last top-``k`` Ritz vectors ``(n, k)`` (warm start), or ``None``.
        warm_preconditioned: the last preconditioned top Ritz vector, or ``None``.
        resolved_method: what ``method="auto"`` resolved to (``None``: not yet).
        ggn_checked: the LM head's logits were compared with the model's once.
        checked: ``method="auto"``'s double backward, or explicit central
            differences, were cross-checked once (:mod:`curvwatch.measurement.checks`).
        differences_disagree: that check found central differences off the exact
            product (kinks of ReLU-type activations): every later result says so.
        block_warm: per block name (``blocks=``), its last top Ritz vectors
            ``(raw, preconditioned)`` (each ``None`` until measured), or ``None``.
    """

    measurements: int = 0
    warm: torch.Tensor | None = None
    warm_preconditioned: torch.Tensor | None = None
    resolved_method: str | None = None
    ggn_checked: bool = False
    checked: bool = False
    differences_disagree: bool = False
    block_warm: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's entries (CPU tensors; the keys a monitor's ``state_dict`` has always had)."""
        return {
            "measurements": self.measurements,
            "warm": _cpu(self.warm),
            "warm_preconditioned": _cpu(self.warm_preconditioned),
            "method": self.resolved_method,
            "ggn_checked": self.ggn_checked,
            "checked": self.checked,
            "differences_disagree": self.differences_disagree,
            "block_warm": {name: tuple(_cpu(w) for w in pair) for name, pair in (self.block_warm or {}).items()},
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any], resolved_method: str | None) -> MeasurementState:
        """The state of :meth:`to_dict` output; ``resolved_method`` where the settings fix the method."""
        return cls(
            measurements=int(state["measurements"]),
            warm=state["warm"],
            warm_preconditioned=state.get("warm_preconditioned"),
            resolved_method=resolved_method,
            ggn_checked=bool(state.get("ggn_checked", False)),
            checked=bool(state.get("checked", False)),
            differences_disagree=bool(state.get("differences_disagree", False)),
            block_warm={name: tuple(pair) for name, pair in state.get("block_warm", {}).items()} or None,
        )


@dataclass(frozen=True)
class Probe:
    """What is measured on: the held-out batch and its loss.

    Attributes:
        batch: the probe batch, on the model's device.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        minibatch: ``minibatch()`` -> the next training mini-batch (batch
            sharpness), or ``None``: subsets of the probe batch.
        criterion: the user's criterion (the output-space curvatures read it).
        output_kind: the output-space path of a curvature other than the
            Hessian (:func:`~curvwatch.operators.factory.ggn_kind`), else ``None``.
    """

    batch: Any
    loss_fn: LossFn
    minibatch: Callable[[], Any] | None = None
    criterion: Any = None
    output_kind: str | None = None


class Clock:
    """The measurement's seconds: started now, ending at ``start + seconds`` (never, for ``None``).

    The optional quantities end earlier, at ``start + extra_seconds`` (the
    share proper, :attr:`~curvwatch.planning.Allowance.extra_seconds`).
    """

    def __init__(self, seconds: float | None, extra_seconds: float | None = None) -> None:
        self.start = time.perf_counter()
        self.deadline = None if seconds is None else self.start + seconds
        extra = None if extra_seconds is None else self.start + extra_seconds
        self.extra_deadline = self.deadline if extra is None or self.deadline is None else min(extra, self.deadline)

    def past(self, extra: bool = False) -> bool:
        """True once the deadline (``extra``: the optional quantities') has passed."""
        deadline = self.extra_deadline if extra else self.deadline
        return deadline is not None and time.perf_counter() >= deadline

    def left(self, extra: bool = False) -> float | None:
        """Seconds until the deadline (``extra``: the optional quantities'; ``None``: no deadline)."""
        deadline = self.extra_deadline if extra else self.deadline
        return None if deadline is None else max(0.0, deadline - time.perf_counter())

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start


@dataclass
class Context:
    """One measurement's inputs and running account (private to it: built, used and dropped).

    Attributes:
        options: the monitor's :class:`~curvwatch.options.MonitorOptions`.
        state: the state the last measurement handed over (read only).
        model, probe, step, optimizer, allowance: what is measured, when, against what, within what.
        source: builds the operators (:class:`~curvwatch.measurement.source.OperatorSource`).
        clock: the measurement's seconds.
        sharded: the model is sharded (FSDP): the layout fact, read once.
        seed: ``options.seed + step``.
        notes: what to warn about, once per key.
        checked, differences_disagree: the run's checks, carried into the next state.
        checks: products spent on checks, and on an operator given up.
        operator, certificate: the measurement's operator and its central-difference
            certificate (``None`` but under one-sided differences), once built.
    """

    options: Any
    state: MeasurementState
    model: torch.nn.Module
    probe: Probe
    step: int
    optimizer: Any
    allowance: Allowance
    source: OperatorSource
    clock: Clock
    sharded: bool
    seed: int
    notes: list[Note]
    checked: bool
    differences_disagree: bool
    checks: int = 0
    operator: CurvatureOperator | None = None
    certificate: CurvatureOperator | None = None

    @classmethod
    def start(cls, options, state, model, probe, step: int, optimizer, allowance: Allowance) -> Context:
        """The context of a measurement starting now (its clock starts)."""
        clock, sharded, seed = Clock(allowance.seconds, allowance.extra_seconds), is_sharded(model), options.seed + step
        return cls(
            options=options, state=state, model=model, probe=probe, step=step, optimizer=optimizer,
            allowance=allowance, source=OperatorSource(options, state, model, probe, allowance, seed, sharded),
            clock=clock, sharded=sharded, seed=seed, notes=[], checked=state.checked,
            differences_disagree=state.differences_disagree,
        )

    def note(self, key: str, message: str) -> None:
        """Say ``message`` once per ``key`` (the monitor warns)."""
        self.notes.append((key, message))

    def past(self) -> bool:
        """The measurement's seconds are spent."""
        return self.clock.past()

    def extra_past(self) -> bool:
        """The optional quantities' seconds are spent (:attr:`~curvwatch.planning.Allowance.extra_seconds`)."""
        return self.clock.past(extra=True)

    def spent(self) -> int:
        """Products spent so far: the operator's, the certificate's and the checks'."""
        certificate = self.certificate.matvecs if self.certificate is not None else 0
        return (self.operator.matvecs if self.operator is not None else 0) + certificate + self.checks

    def left(self, extra: bool = False) -> int:
        """Products of the allowance not yet spent, fewer where the seconds left are short.

        What the seconds left to the deadline (``extra``: the optional
        quantities', :attr:`~curvwatch.planning.Allowance.extra_seconds`) buy at
        the learned cost of a product; the products alone while that is not known.
        """
        products = self.allowance.products - self.spent()
        seconds, per_product = self.clock.left(extra), self.allowance.seconds_per_product
        if seconds is None or not per_product > 0:
            return products
        return min(products, int(seconds / per_product))

    def extra_left(self) -> int:
        """Products the optional quantities may still apply (:meth:`left` within their seconds)."""
        return self.left(extra=True)

    def lanczos(self, operator: CurvatureOperator, k: int, max_matvecs: int, warm, seed: int) -> LanczosResult:
        """Top-``k`` Lanczos within the clock, the plan's basis and ``max_matvecs`` (at least ``k``)."""
        plan, meter = self.allowance.plan, self.allowance.meter
        started = meter.now()
        solve = lanczos(
            operator, k=k, tol=self.options.budget.tol, max_matvecs=max(k, max_matvecs),
            max_seconds=self.clock.left(), v0=warm, seed=seed, basis_device=plan.basis_device,
            max_basis=max(plan.max_basis, k + 1),
        )
        meter.add(started, solve.matvecs)  # what a product costs, learned from the solves
        return solve


def certified_to(solve: LanczosResult, error: float) -> bool:
    """``solve`` converged (to ``Budget.tol``) with a relative error bound of at most ``error``."""
    return solve.converged and solve.relative_error_bound <= error


def adaptive(limit: Threshold | None) -> bool:
    """True when ``limit`` compares against a preconditioned sharpness."""
    return limit is not None and limit.adaptive


def kept(vectors: torch.Tensor) -> torch.Tensor:
    """Ritz vectors kept as the next warm start: on the host in bfloat16 when they live on a GPU.

    A warm start only has to point near the top eigenvector (it gets 1% noise
    anyway), so bfloat16's 0.4% rounding costs nothing, and between
    measurements the training keeps its device memory: ``k + 1`` vectors of
    ``2 n`` bytes on the host instead of ``4 n`` on the device.
    """
    vectors = vectors.detach()
    if vectors.device.type == "cpu":
        return vectors
    # rounded on the device, then copied: half the bytes over the link and no
    # conversion on the host (on an H200 at 355M, .to("cpu", bfloat16) took 1.1 s)
    return vectors.to(torch.bfloat16).to("cpu")


def warm_start(eig: LanczosResult) -> torch.Tensor:
    """The next warm start: the Ritz vectors :func:`kept`, and the solve's guard column beside them."""
    vectors = kept(eig.eigenvectors)
    if eig.guard is None:
        return vectors
    return torch.cat([vectors, eig.guard[:, None].to(vectors.dtype)], dim=1)


def fitting(warm: torch.Tensor | None, operator: CurvatureOperator) -> torch.Tensor | None:
    """A warm start, where it still fits ``operator`` (else ``None``: a cold start).

    It no longer fits when the measured parameters changed size: a block's, or the
    whole model's after parameters were unfrozen (``requires_grad_(True)``) or a
    state of another model was loaded (``load_state_dict``).
    """
    return warm if warm is not None and warm.shape[0] == operator.size else None


def overlap(previous: torch.Tensor | None, current: torch.Tensor, dot=torch.dot) -> float:
    """``|<u_t, u_t-1>|`` of the top Ritz vectors; ``dot`` is the operator's (all-reduced under FSDP)."""
    if previous is None or previous.shape[0] != current.shape[0]:
        return math.nan
    a, b = previous[:, 0].to(current.device, current.dtype), current[:, 0]
    return abs(dot(a, b).item()) / max((dot(a, a) * dot(b, b)).sqrt().item(), 1e-300)


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.cpu()
