"""Read a run's curvature curves (TensorBoard or JSONL) and draw them to a PNG."""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict

from curvwatch.results import TAG_PREFIX

LOSS_TAGS = ("train/loss", "train_loss", "loss", "train/loss_step")
Series = dict[str, list[tuple[int, float]]]


def read_run(run_dir: str) -> Series:
    """``{tag: [(step, value), ...]}`` of every scalar in ``run_dir``.

    Reads TensorBoard event files anywhere below ``run_dir`` (merging
    sub-runs), and ``*.jsonl`` files written by :class:`~curvwatch.JsonlSink`.

    Raises:
        FileNotFoundError: no event or JSONL file found.
    """
    series: Series = defaultdict(list)
    events = glob.glob(os.path.join(run_dir, "**", "events.out.tfevents.*"), recursive=True)
    if os.path.isfile(run_dir) and run_dir.endswith(".jsonl"):
        jsonls = [run_dir]
    else:
        jsonls = glob.glob(os.path.join(run_dir, "**", "*.jsonl"), recursive=True)
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for directory in sorted({os.path.dirname(e) for e in events}):
            acc = EventAccumulator(directory, size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                series[tag].extend((e.step, e.value) for e in acc.Scalars(tag))
    elif jsonls:
        for path in jsonls:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line)
                    for tag, value in record.get("scalars", {}).items():
                        series[tag].append((record["step"], value))
    else:
        raise FileNotFoundError(f"no TensorBoard event files or .jsonl files under {run_dir!r}")
    return {tag: sorted(points) for tag, points in series.items()}


def crossings(series: Series) -> list[tuple[int, str]]:
    """Steps where ``sharpness_ratio`` crosses 1: ``[(step, "up" | "down"), ...]``."""
    out, above = [], None
    for step, ratio in series.get(TAG_PREFIX + "sharpness_ratio", []):
        now = ratio >= 1.0
        if above is not None and now != above:
            out.append((step, "up" if now else "down"))
        above = now
    return out


def draw_report(run_dir: str, out_path: str | None = None) -> str:
    """Draw loss, sharpness with its threshold, trace and spectrum; return the PNG path.

    Raises:
        FileNotFoundError: no run found.
        ValueError: the run has no ``curvature/*`` tags.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_run(run_dir)
    if TAG_PREFIX + "lambda_max" not in series:
        raise ValueError(f"{run_dir!r} has no {TAG_PREFIX}lambda_max: is it a curvwatch run?")
    out_path = out_path or os.path.join(run_dir if os.path.isdir(run_dir) else ".", "curvwatch_report.png")
    loss_tag = next((t for t in LOSS_TAGS if t in series), None)
    adaptive = TAG_PREFIX + "preconditioned_lambda_max" in series
    panels = 3 if TAG_PREFIX + "trace" in series else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels + 0.6), sharex=True)

    ax = axes[0]
    if loss_tag:
        steps, values = zip(*series[loss_tag])
        ax.plot(steps, values, color="0.25", lw=1)
        ax.set_yscale("log")
    ax.set_ylabel(f"loss ({loss_tag})" if loss_tag else "loss (not logged)")
    ax.set_title(f"curvwatch report: {os.path.basename(os.path.abspath(run_dir))}")

    ax = axes[1]
    key = "preconditioned_lambda_max" if adaptive else "lambda_max"
    label = "preconditioned sharpness $\\lambda_{max}(P^{-1}H)$" if adaptive else "sharpness $\\lambda_{max}(H)$"
    steps, values = zip(*series[TAG_PREFIX + key])
    ax.plot(steps, values, color="tab:blue", lw=1.5, label=label)
    if TAG_PREFIX + "threshold" in series:
        steps, values = zip(*series[TAG_PREFIX + "threshold"])
        ax.plot(steps, values, color="tab:red", ls="--", lw=1.2, label="edge of stability")
    if TAG_PREFIX + "batch_sharpness" in series:
        steps, values = zip(*series[TAG_PREFIX + "batch_sharpness"])
        ax.plot(steps, values, color="tab:green", lw=1, label="batch sharpness")
    for step, direction in crossings(series):
        ax.axvline(step, color="tab:red" if direction == "up" else "tab:gray", alpha=0.35, lw=0.8)
    ax.set_ylabel("curvature")
    ax.legend(loc="lower right", fontsize=8)

    if panels == 3:
        ax = axes[2]
        steps, values = zip(*series[TAG_PREFIX + "trace"])
        ax.plot(steps, values, color="tab:purple", lw=1.2, label="trace (Hutchinson)")
        if TAG_PREFIX + "trace_stderr" in series:
            err = dict(series[TAG_PREFIX + "trace_stderr"])
            lo = [v - 2 * err.get(s, 0.0) for s, v in zip(steps, values)]
            hi = [v + 2 * err.get(s, 0.0) for s, v in zip(steps, values)]
            ax.fill_between(steps, lo, hi, color="tab:purple", alpha=0.2, lw=0)
        ax.set_ylabel("trace")
        ax.legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
