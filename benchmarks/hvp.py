"""curvwatch's side: per-product cost of each HVP method, Lanczos accuracy,
cold and warm measurements, Hutchinson samples.

Every curvature call runs inside :func:`curvwatch.guard.measurement_guard`, as
the monitor runs it (eval mode, math attention, RNG restored).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.models import loss_fn
from benchmarks.timing import Meter
from curvwatch import HessianOperator, hutchinson, lanczos
from curvwatch.guard import measurement_guard
from curvwatch.operators import CurvatureOperator
from curvwatch.solvers import LanczosProcess, start_vector

ACCURACY = 1e-2  # the "1%" target
FAST_ATTENTION_ROW = "finite_difference forward, fused attention"


class FreshGraph(CurvatureOperator):
    """Double backward building a new first-order graph for every product."""

    def __init__(self, closure: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> None:
        first = params[0]
        super().__init__(sum(p.numel() for p in params), first.dtype, first.device)
        self.closure, self.params = closure, params

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        op = HessianOperator(self.closure, self.params, "double_backward")
        out = op.matvec(v)
        op.release()
        return out


def operators(model: torch.nn.Module, batch) -> dict[str, Callable[[], CurvatureOperator]]:
    """Factories of each method's operator on ``batch`` (call inside the guard)."""
    params = [p for p in model.parameters() if p.requires_grad]
    closure = lambda: loss_fn(model, batch)  # noqa: E731
    return {
        "double_backward, fresh graph": lambda: FreshGraph(closure, params),
        "double_backward, graph reused": lambda: HessianOperator(closure, params, "double_backward"),
        "forward_over_reverse": lambda: HessianOperator(closure, params, "forward_over_reverse", module=model),
        "finite_difference central": lambda: HessianOperator(closure, params, "finite_difference", scheme="central"),
        "finite_difference forward": lambda: HessianOperator(closure, params, "finite_difference", scheme="forward"),
    }


def probe_vector(model: torch.nn.Module, seed: int = 7) -> torch.Tensor:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    p = next(model.parameters())
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(p.device, p.dtype)


def _err(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


def product_times(model, batch, meter: Meter, reps: int, step=None) -> dict[str, dict[str, Any]]:
    """Seconds of one product of each method: the first of a measurement and later ones.

    With ``step`` (a training step), ``reps`` steps are timed right before each
    method's products (``step_local``), so that a ratio compares times taken
    under the same load on a shared machine.
    """
    v = probe_vector(model)
    rows: dict[str, dict[str, Any]] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    makers = dict(operators(model, batch))
    # The one-sided product outside the guard: the fused attention kernel the
    # training step uses (math attention is needed only by double backward).
    makers[FAST_ATTENTION_ROW] = lambda: HessianOperator(
        lambda: loss_fn(model, batch), params, "finite_difference", scheme="forward"
    )
    for name, make in makers.items():
        local = meter.time(step, reps, warmup=1).as_dict() if step is not None else None
        guard = contextlib.nullcontext() if name == FAST_ATTENTION_ROW else measurement_guard(model)
        try:
            with guard:
                op = make()
                first, _ = meter.once(lambda op=op: op.matvec(v))
                steady = meter.time(lambda op=op: op.matvec(v), reps, warmup=0)
                getattr(op, "release", lambda: None)()
            rows[name] = {"first_s": first, "steady": steady.as_dict(), "step_local": local}
        except Exception as error:  # noqa: BLE001 - a failing method is a result
            rows[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return rows


def reference(model, batch, tol: float, max_matvecs: int) -> dict[str, Any]:
    """Converged double-backward Lanczos (``model`` float64 on CPU, fp32 on GPU)."""
    start = time.perf_counter()
    with measurement_guard(model):
        op = HessianOperator(lambda: loss_fn(model, batch), [p for p in model.parameters() if p.requires_grad])
        result = lanczos(op, k=1, tol=tol, max_matvecs=max_matvecs, seed=12345)
        op.release()
    return {
        "lambda_max": result.lambda_max,
        "loss": op.loss,
        "relative_residual": float(result.residuals[0]) / abs(result.lambda_max),
        "matvecs": result.matvecs,
        "converged": result.converged,
        "dtype": str(next(model.parameters()).dtype),
        "seconds": time.perf_counter() - start,
    }


def lanczos_accuracy(model, batch, meter: Meter, ref: float, matvecs: int, skip=()) -> dict[str, dict[str, Any]]:
    """lambda_max error of a fixed-length Lanczos for each method."""
    rows = {}
    for name, make in operators(model, batch).items():
        if name in skip:
            continue
        try:
            with measurement_guard(model):
                op = make()
                seconds, result = meter.once(
                    lambda op=op: lanczos(op, k=1, tol=1e-12, max_matvecs=matvecs, seed=0)
                )
                getattr(op, "release", lambda: None)()
            rows[name] = {
                "lambda_max": result.lambda_max,
                "rel_error": _err(result.lambda_max, ref),
                "matvecs": result.matvecs,
                "seconds": seconds,
            }
        except Exception as error:  # noqa: BLE001
            rows[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return rows


def first_within(op: CurvatureOperator, ref: float, v0, seed: int, max_matvecs: int) -> int | None:
    """Products after which the top Ritz value of curvwatch's Lanczos is within 1% of ``ref``.

    Replays :func:`curvwatch.lanczos` step by step (same start vector and seed).
    """
    generator = torch.Generator().manual_seed(seed)
    process = LanczosProcess(op, start_vector(op, v0, generator), generator)
    while process.steps < max_matvecs:
        process.step()
        theta, _, _ = process.ritz()
        if _err(float(theta[-1]), ref) <= ACCURACY:
            return process.steps
    return None


def measurement(
    model, batch, meter: Meter, ref: float, v0, seed: int, max_matvecs: int, basis_device=None, oracle=True
):
    """One lambda_max measurement to 1% by the residual rule (tol=1e-2)."""
    with measurement_guard(model):
        op = HessianOperator(lambda: loss_fn(model, batch), [p for p in model.parameters() if p.requires_grad])
        seconds, result = meter.once(
            lambda: lanczos(op, k=1, tol=ACCURACY, max_matvecs=max_matvecs, v0=v0, seed=seed, basis_device=basis_device)
        )
        oracle = first_within(op, ref, v0, seed, max_matvecs) if oracle else None
        op.release()
    row = {
        "matvecs": result.matvecs,
        "converged": result.converged,
        "lambda_max": result.lambda_max,
        "rel_error": _err(result.lambda_max, ref),
        "seconds": seconds,
        "matvecs_to_1pct_oracle": oracle,
    }
    return row, result.eigenvectors.detach()


def hutchinson_cost(model, batch, meter: Meter, samples: int) -> dict[str, Any]:
    """Products and seconds of ``samples`` Hutchinson samples (graph already built)."""
    v = probe_vector(model)
    with measurement_guard(model):
        op = HessianOperator(lambda: loss_fn(model, batch), [p for p in model.parameters() if p.requires_grad])
        op.matvec(v)  # builds the first-order graph, as the monitor's Lanczos has
        product = meter.time(lambda: op.matvec(v), 3, warmup=0)
        before = op.matvecs
        seconds, trace = meter.once(lambda: hutchinson(op, num_matvecs=samples, seed=0))
        op.release()
    return {
        "samples": samples,
        "matvecs": op.matvecs - before,
        "seconds_per_sample": seconds / samples,
        "sample_over_hvp": seconds / samples / product.median,
        "trace_estimate": trace.estimate,
    }


def memory(model, optimizer, batch, meter: Meter, state_bytes: int, max_matvecs: int) -> dict[str, float]:
    """Peak bytes of two products of each method (solver vectors not counted),
    and of a whole cold measurement (its Lanczos basis counted)."""
    v = probe_vector(model)
    out: dict[str, float] = {}
    for name, make in operators(model, batch).items():
        def products(make=make):
            with measurement_guard(model):
                op = make()
                op.matvec(v)
                op.matvec(v)
                getattr(op, "release", lambda: None)()
        try:
            out[name] = meter.peak(products, state_bytes)
        except Exception:  # noqa: BLE001
            out[name] = math.nan
    params = [p for p in model.parameters() if p.requires_grad]

    def fast():
        op = HessianOperator(lambda: loss_fn(model, batch), params, "finite_difference", scheme="forward")
        op.matvec(v)
        op.matvec(v)
    out[FAST_ATTENTION_ROW] = meter.peak(fast, state_bytes)
    v = None  # frees the probe vector (the closures above that hold it have run) before the cold measurements
    for label, basis in (("cold measurement", None), ("cold measurement, basis on CPU", "cpu")):
        if basis is not None and not meter.cuda:
            continue
        out[label] = meter.peak(
            lambda basis=basis: measurement(
                model, batch, meter, 1.0, None, 0, max_matvecs, basis_device=basis, oracle=False
            ),
            state_bytes,
        )
    return out
