"""The monitor's overhead on a training run: the same N steps from the same
state, with and without ``CurvatureMonitor(every=...)`` attached (default settings)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from benchmarks.models import lm_criterion, restore, snapshot, train_step
from benchmarks.timing import Meter
from curvwatch import CurvatureMonitor


def _run(model, optimizer, batches, probe, steps: int, every: int | None, meter: Meter) -> dict[str, Any]:
    handle = monitor = None
    if every is not None:
        monitor = CurvatureMonitor(model, probe, criterion=lm_criterion, every=every)
        handle = monitor.attach(optimizer)
    if meter.cuda:
        torch.cuda.reset_peak_memory_stats(meter.device)

    def loop():
        for i in range(steps):
            train_step(model, optimizer, batches[i % len(batches)])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds, _ = meter.once(loop)
    row: dict[str, Any] = {"seconds": seconds}
    if meter.cuda:
        row["peak_bytes"] = torch.cuda.max_memory_allocated(meter.device)
    if monitor is not None:
        handle.remove()
        row["measurements"] = [
            {"step": r.step, "hvps": r.hvps, "seconds": r.seconds, "converged": r.converged,
             "lambda_max": r.lambda_max, "preconditioned_lambda_max": r.preconditioned_lambda_max,
             "trace": r.trace, "method": r.method}
            for r in monitor.history
        ]
    return row


def monitor_overhead(
    model, optimizer, batches, probe, steps: int, every: int, repeats: int, meter: Meter
) -> dict[str, Any]:
    """Alternate plain and monitored runs ``repeats`` times; overhead from the summed times."""
    start = snapshot(model, optimizer)
    plain, monitored = [], []
    for _ in range(repeats):
        restore(model, optimizer, start)
        plain.append(_run(model, optimizer, batches, probe, steps, None, meter))
        restore(model, optimizer, start)
        monitored.append(_run(model, optimizer, batches, probe, steps, every, meter))
    restore(model, optimizer, start)
    p = sum(r["seconds"] for r in plain)
    m = sum(r["seconds"] for r in monitored)
    measurements = monitored[-1]["measurements"]
    return {
        "steps": steps,
        "every": every,
        "repeats": repeats,
        "plain_runs": plain,
        "monitored_runs": monitored,
        "overhead": (m - p) / p,
        "overhead_per_run": [(b["seconds"] - a["seconds"]) / a["seconds"] for a, b in zip(plain, monitored)],
        "mean_measurement_s": sum(x["seconds"] for x in measurements) / max(len(measurements), 1),
        "mean_measurement_hvps": sum(x["hvps"] for x in measurements) / max(len(measurements), 1),
    }
