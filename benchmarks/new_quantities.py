"""Cost of the quantities added after the core (issue #16 and its neighbours), as multiples of a
training step: the update sharpness (one product along the optimizer's last update), the critical
sharpness (a forward-only line search along the next update), per-block curvature (``blocks="layers"``) and the
Monte-Carlo Fisher product against the Hessian product.

Each figure is timed right after ``reps`` training steps timed under the same load
(``step_local``), as :func:`benchmarks.hvp.product_times` does; every curvature call runs inside
:func:`curvwatch.guard.measurement_guard`, as the monitor runs it. The training state is restored
after the monitor measurements (they do not change it; the steps timed here do, and are undone).
"""

from __future__ import annotations

import statistics
import warnings
from typing import Any

import torch

from benchmarks.models import lm_criterion, loss_fn, restore, snapshot
from benchmarks.timing import Meter
from curvwatch import Budget, CurvatureMonitor, GGNOperator, HessianOperator, MonteCarloFisherOperator
from curvwatch.blocks import resolve_blocks
from curvwatch.directional import critical_sharpness, directional_sharpness, perturbed_loss
from curvwatch.guard import measurement_guard
from curvwatch.measurement import CRITICAL_MAX_EVALS, CRITICAL_RTOL
from curvwatch.optim import next_update_direction, preconditioner_diagonal, update_direction

BLOCKS = "layers"


def block_budget(model) -> Budget:
    """Room for the global quantities (~45 products) and ~30 per block (two Lanczos solves each)."""
    blocks = len(resolve_blocks(model, BLOCKS))
    return Budget(max_hvps=80 + 40 * blocks, overhead=None)


def _params(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def update_sharpness_cost(model, optimizer, batch, meter: Meter, reps: int) -> dict[str, Any]:
    """One product along ``u`` (``u^T H u / u^T P u`` for AdamW): first of a measurement and later."""
    params = _params(model)
    u = update_direction(optimizer, params)
    diagonal = preconditioner_diagonal(optimizer, params)
    with measurement_guard(model):
        op = HessianOperator(lambda: loss_fn(model, batch), params, "double_backward")
        first, value = meter.once(lambda: directional_sharpness(op, u, diagonal))
        steady = meter.time(lambda: directional_sharpness(op, u, diagonal), reps, warmup=0)
        op.release()
    return {"first_s": first, "steady": steady.as_dict(), "value": value, "products": 1}


def critical_sharpness_cost(model, optimizer, batch, meter: Meter, reps: int) -> dict[str, Any]:
    """The monitor's line search (at most ``CRITICAL_MAX_EVALS`` forward passes) along ``-u``, and one forward.

    ``u`` is the update the optimizer would take from the probe's gradient, as
    the monitor searches (the gradient's backward is not part of the figure:
    the monitor reuses its operator's).
    """
    params = _params(model)
    with measurement_guard(model):
        gradient = torch.autograd.grad(loss_fn(model, batch), params)
    u = next_update_direction(optimizer, params, torch.cat([g.reshape(-1) for g in gradient]))
    lr = optimizer.param_groups[0]["lr"]
    with measurement_guard(model):
        loss_at = perturbed_loss(model, params, u, loss_fn, batch)
        found = critical_sharpness(loss_at, lr, max_evals=CRITICAL_MAX_EVALS, rtol=CRITICAL_RTOL)
        search = meter.time(
            lambda: critical_sharpness(loss_at, lr, max_evals=CRITICAL_MAX_EVALS, rtol=CRITICAL_RTOL), reps, warmup=0
        )
        with torch.no_grad():
            forward = meter.time(lambda: loss_fn(model, batch), reps, warmup=1)
    return {
        "search": search.as_dict(),
        "forward": forward.as_dict(),
        "evals": found.evals,
        "bracketed": found.bracketed,
        "value": found.value,
        "ratio": found.value * lr / 2,
        "lr": lr,
        "max_evals": CRITICAL_MAX_EVALS,
        "rtol": CRITICAL_RTOL,
    }


def _monitor_row(result) -> dict[str, Any]:
    return {
        "seconds": result.seconds,
        "hvps": result.hvps,
        "converged": result.converged,
        "lambda_max": result.lambda_max,
        "preconditioned_lambda_max": result.preconditioned_lambda_max,
        "update_sharpness": result.update_sharpness,
        "update_sharpness_ratio": result.update_sharpness_ratio,
        "critical_sharpness": result.critical_sharpness,
        "critical_sharpness_ratio": result.critical_sharpness_ratio,
        "critical_sharpness_evals": result.critical_sharpness_evals,
        "critical_sharpness_seconds": result.critical_sharpness_seconds,
        "blocks": {
            name: {"lambda_max": b.lambda_max, "preconditioned_lambda_max": b.preconditioned_lambda_max,
                   "hvps": b.hvps, "converged": b.converged}
            for name, b in result.blocks.items()
        },
    }


def monitor_costs(model, optimizer, batch, meter: Meter, repeats: int) -> dict[str, Any]:
    """Cold monitor measurements (defaults, :func:`block_budget`) without and with the new quantities.

    Alternates, ``repeats`` times: defaults (update and critical sharpness on); both off; defaults
    plus ``blocks="layers"``. Fresh monitors each time (cold starts), strict.
    """
    configs = {
        "defaults": {},
        "without update/critical sharpness": {"update_sharpness": False, "critical_sharpness": False},
        f"defaults + blocks={BLOCKS!r}": {"blocks": BLOCKS},
    }
    budget = block_budget(model)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(repeats):
            for name, kwargs in configs.items():
                monitor = CurvatureMonitor(model, batch, criterion=lm_criterion, optimizer=optimizer,
                                           budget=budget, strict=True, **kwargs)
                meter.sync()
                result = monitor.measure(1)
                meter.sync()
                rows[name].append(_monitor_row(result))
    summary = {name: {"median_s": statistics.median(r["seconds"] for r in runs),
                      "median_hvps": statistics.median(r["hvps"] for r in runs)}
               for name, runs in rows.items()}
    return {"budget": {"max_hvps": budget.max_hvps, "trace_hvps": budget.trace_hvps},
            "blocks": BLOCKS, "runs": rows, "summary": summary}


def fisher_product_cost(model, batch, meter: Meter, reps: int) -> dict[str, dict[str, Any]]:
    """One product of the Hessian, the GGN and the Monte-Carlo Fisher of the same next-token loss."""
    params = _params(model)
    ids, labels = batch

    def logits():
        out = model(ids)
        return out[:, :-1].reshape(-1, out.shape[-1])

    targets = labels[:, 1:].reshape(-1)
    makers = {
        "hessian (double_backward, graph reused)": lambda: HessianOperator(
            lambda: loss_fn(model, batch), params, "double_backward"
        ),
        "ggn": lambda: GGNOperator(logits, params, "cross_entropy", targets=targets),
        "fisher (Monte-Carlo, 1 label per token)": lambda: MonteCarloFisherOperator(
            logits, params, "cross_entropy", targets=targets, seed=0
        ),
    }
    n = sum(p.numel() for p in params)
    p0 = params[0]
    v = torch.randn(n, generator=torch.Generator().manual_seed(7)).to(p0.device, p0.dtype)
    rows: dict[str, dict[str, Any]] = {}
    for name, make in makers.items():
        try:
            with measurement_guard(model):
                op = make()
                first, _ = meter.once(lambda op=op: op.matvec(v))
                steady = meter.time(lambda op=op: op.matvec(v), reps, warmup=0)
                getattr(op, "release", lambda: None)()
            rows[name] = {"first_s": first, "steady": steady.as_dict()}
        except Exception as error:  # noqa: BLE001 - a failing operator is a result
            rows[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
    return rows


def new_quantity_costs(model, optimizer, batch, meter: Meter, reps: int, step, repeats: int = 2) -> dict[str, Any]:
    """All of the above, each after its own ``reps`` timed training steps (``step_local``).

    Args:
        model, optimizer: the trained benchmark model and its AdamW (with state: ``u`` needs it).
        batch: the probe batch.
        meter: times on the model's device.
        reps: timed repetitions of each figure and of the local training steps.
        step: one training step (a closure); its effect on the model is undone at the end.
        repeats: alternating repeats of the monitor measurements.
    """
    start = snapshot(model, optimizer)
    out: dict[str, Any] = {}

    def local() -> dict[str, float]:
        stats = meter.time(step, reps, warmup=1).as_dict()
        restore(model, optimizer, start)  # the same state (u, P) for every figure
        return stats

    for name, fn in (
        ("update_sharpness", lambda: update_sharpness_cost(model, optimizer, batch, meter, reps)),
        ("critical_sharpness", lambda: critical_sharpness_cost(model, optimizer, batch, meter, reps)),
        ("products", lambda: fisher_product_cost(model, batch, meter, reps)),
    ):
        step_local = local()
        try:
            out[name] = fn()
        except Exception as error:  # noqa: BLE001 - a failing figure is a result
            out[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        out[name]["step_local"] = step_local
    step_local = local()
    out["monitor"] = monitor_costs(model, optimizer, batch, meter, repeats)
    out["monitor"]["step_local"] = step_local
    restore(model, optimizer, start)
    return out
