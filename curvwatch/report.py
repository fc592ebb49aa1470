"""Read runs' curvature curves (TensorBoard or JSONL) and draw them to a PNG.

A *run* is one directory holding TensorBoard event files, or one ``.jsonl``
file written by :class:`~curvwatch.JsonlSink`. :func:`find_runs` lists the runs
under a path, :func:`read_runs` reads each of them separately, and
:func:`draw_runs` draws them in one figure, one labelled colour per run.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from curvwatch.results import TAG_PREFIX

LOSS_TAGS = ("train/loss", "train_loss", "loss", "train/loss_step")
Series = dict[str, list[tuple[int, float]]]

_LAMBDA = TAG_PREFIX + "lambda_max"
_PRECONDITIONED = TAG_PREFIX + "preconditioned_lambda_max"
_THRESHOLD = TAG_PREFIX + "threshold"
_RATIO = TAG_PREFIX + "sharpness_ratio"
_BATCH = TAG_PREFIX + "batch_sharpness"
_TRACE = TAG_PREFIX + "trace"
_TRACE_STDERR = TAG_PREFIX + "trace_stderr"
#: the early warnings, drawn in the ratio panel: (tag, colour of a lone run's line, line style,
#: legend label); with several runs the line takes its run's colour and keeps its style
_ALONG_UPDATE = (
    (TAG_PREFIX + "critical_sharpness_ratio", "tab:green", "-.", "early warning: critical sharpness / (2/lr)"),
    (TAG_PREFIX + "update_sharpness_ratio", "tab:orange", (0, (4, 1.5, 1, 1.5, 1, 1.5)),
     "early warning: update sharpness / threshold"),
)
#: a lone run's crossings of the sharpness ratio through 1: direction -> (colour, line style)
_CROSSING_STYLE = {"up": ("tab:red", ":"), "down": ("tab:gray", ":")}
#: a ratio panel with values above this switches to a log axis
_LINEAR_RATIO_MAX = 3.0


def find_runs(path: str) -> dict[str, str]:
    """``{name: source}`` of the runs under ``path``, sorted by name.

    A source is a directory holding ``events.out.tfevents.*`` files or a
    ``.jsonl`` file. A ``.jsonl`` file in a directory that holds event files is
    taken as the same run logged twice and left out (as
    :class:`~curvwatch.TensorBoardSink` and :class:`~curvwatch.JsonlSink` side
    by side write it). Names are paths relative to ``path``; a run at ``path``
    itself is named after its last path component.

    Raises:
        FileNotFoundError: no event or JSONL file found.
    """
    root = os.path.abspath(path)
    if os.path.isfile(root):
        if root.endswith(".jsonl"):
            return {os.path.basename(root): path}
        if os.path.basename(root).startswith("events.out.tfevents."):
            return {os.path.basename(os.path.dirname(root)): os.path.dirname(path) or "."}
        raise FileNotFoundError(f"{path!r} is neither a .jsonl file nor a directory")
    events = glob.glob(os.path.join(glob.escape(path), "**", "events.out.tfevents.*"), recursive=True)
    event_dirs = sorted({os.path.dirname(e) for e in events})
    sources = list(event_dirs)
    for jsonl in sorted(glob.glob(os.path.join(glob.escape(path), "**", "*.jsonl"), recursive=True)):
        if os.path.dirname(jsonl) not in event_dirs:
            sources.append(jsonl)
    if not sources:
        raise FileNotFoundError(f"no TensorBoard event files or .jsonl files under {path!r}")
    runs = {}
    for source in sources:
        name = os.path.relpath(os.path.abspath(source), root)
        runs[os.path.basename(root) if name == "." else name] = source
    return dict(sorted(runs.items()))


def read_source(source: str) -> Series:
    """``{tag: [(step, value), ...]}`` of one run (an event directory or a ``.jsonl``).

    Points are sorted by step; a step logged twice (a resumed or rerun run
    writing into the same directory) keeps the value written last.

    Raises:
        ValueError: a line of a ``.jsonl`` file is not a record of
            :class:`~curvwatch.JsonlSink` (the message names the file and line).
    """
    series: Series = defaultdict(list)
    if source.endswith(".jsonl") and os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    step, scalars = _jsonl_record(line, source, number)
                    for tag, value in scalars.items():
                        series[tag].append((step, value))
    else:
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        acc = EventAccumulator(source, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series[tag].extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(dict(points).items()) for tag, points in series.items()}


def _jsonl_record(line: str, source: str, number: int) -> tuple[int, dict[str, float]]:
    """``(step, scalars)`` of line ``number`` of ``source``, a :class:`~curvwatch.JsonlSink` record.

    Raises:
        ValueError: the line is not JSON, or not an object with a ``"step"``
            (the file and line are named, so a truncated last line is found).
    """
    where = f"{source}, line {number}"
    try:
        record = json.loads(line.strip())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{where}: not valid JSON ({error.msg}, column {error.colno}): {line.strip()[:80]!r}; "
            "a .jsonl run holds one JsonlSink record per line: fix or delete that line "
            "(a run killed while writing can leave its last line cut off)"
        ) from error
    if not isinstance(record, dict) or "step" not in record or not isinstance(record.get("scalars", {}), dict):
        raise ValueError(
            f"{where}: not a curvwatch record (an object with \"step\" and \"scalars\"): "
            f"{line.strip()[:80]!r}; is this a JsonlSink file?"
        )
    return record["step"], record.get("scalars", {})


def read_runs(path: str) -> dict[str, Series]:
    """``{name: series}`` of every run under ``path`` (see :func:`find_runs`), each read alone.

    Raises:
        FileNotFoundError: no event or JSONL file found.
    """
    return {name: read_source(source) for name, source in find_runs(path).items()}


def read_run(run_dir: str) -> Series:
    """``{tag: [(step, value), ...]}`` of the one run at ``run_dir``.

    Raises:
        FileNotFoundError: no event or JSONL file found.
        ValueError: ``run_dir`` holds several runs; use :func:`read_runs`.
    """
    runs = find_runs(run_dir)
    if len(runs) > 1:
        raise ValueError(f"{run_dir!r} holds {len(runs)} runs ({', '.join(runs)}); read them with read_runs")
    return read_source(next(iter(runs.values())))


def crossings(series: Series) -> list[tuple[int, str]]:
    """Steps where ``sharpness_ratio`` crosses 1: ``[(step, "up" | "down"), ...]``."""
    out, above = [], None
    for step, ratio in series.get(_RATIO, []):
        now = ratio >= 1.0
        if above is not None and now != above:
            out.append((step, "up" if now else "down"))
        above = now
    return out


def _crossing_label(series: Series, direction: str, shown: int = 2) -> str:
    """Legend label of the vertical lines where ``sharpness_ratio`` crosses 1 in ``direction``."""
    steps = [step for step, d in crossings(series) if d == direction]
    listed = ", ".join(str(step) for step in steps[:shown]) + (", ..." if len(steps) > shown else "")
    what = "sharpness reaches the threshold" if direction == "up" else "sharpness falls below it"
    return f"{what} (step{'s' if len(steps) > 1 else ''} {listed})"


def is_curvature_run(series: Series) -> bool:
    """Whether a run has ``curvature/lambda_max`` (or its preconditioned version)."""
    return bool(series.get(_LAMBDA) or series.get(_PRECONDITIONED))


def sharpness_series(series: Series) -> tuple[str, list[tuple[int, float]]]:
    """``(tag, points)`` of the sharpness compared with the threshold (preconditioned for Adam)."""
    tag = _PRECONDITIONED if series.get(_PRECONDITIONED) else _LAMBDA
    return tag, series.get(tag, [])


def ratio_series(series: Series, tag: str | None = None) -> list[tuple[int, float]]:
    """Sharpness / threshold per step: the logged ratio, or ``tag / threshold`` where both are logged."""
    if tag is None and series.get(_RATIO):
        return series[_RATIO]
    tag = tag or sharpness_series(series)[0]
    threshold = dict(series.get(_THRESHOLD, []))
    return [(s, v / threshold[s]) for s, v in series.get(tag, []) if threshold.get(s, 0) > 0]


def draw_report(run_dir: str, out_path: str | None = None) -> str:
    """Draw every run under ``run_dir`` into one PNG (see :func:`draw_runs`); return its path.

    Raises:
        FileNotFoundError: no run found.
        ValueError: no run has ``curvature/*`` tags.
    """
    out_path = out_path or os.path.join(run_dir if os.path.isdir(run_dir) else ".", "curvwatch_report.png")
    return draw_runs(read_runs(run_dir), out_path, title=os.path.basename(os.path.abspath(run_dir)))


def draw_runs(runs: dict[str, Series], out_path: str, title: str = "") -> str:
    """Save :func:`build_figure` of ``runs`` as a PNG at ``out_path``; return ``out_path``.

    Raises:
        ValueError: no run has ``curvature/*`` tags.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = build_figure(runs, title)
    fig.savefig(out_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_path


def build_figure(runs: dict[str, Series], title: str = ""):
    """Loss, sharpness / threshold, sharpness and threshold, and trace of ``runs``: a matplotlib Figure.

    One colour per run, named in the legend beside the plot; runs without
    ``curvature/*`` tags are left out. The second panel divides the sharpness
    (the preconditioned sharpness for Adam) by the edge-of-stability threshold,
    so the edge is the line at 1 even when the learning rate, and with it the
    threshold, changes during a run, and draws the early warnings beside it
    (the critical and the update sharpness over their thresholds, where
    logged: for one run in their own colours and line styles, for several in
    the run's colour, each in its line style), and for one run a dotted
    vertical line, named in the legend, where the sharpness reaches the
    threshold (red) or falls below it (grey); the third shows sharpness and
    threshold on a log axis.

    Raises:
        ValueError: no run has ``curvature/*`` tags.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {name: s for name, s in runs.items() if is_curvature_run(s)}
    if not drawn:
        raise ValueError(f"no run in {title!r} has {_LAMBDA}: is it a curvwatch run? "
                         f"runs found: {', '.join(runs) or 'none'}")
    several = len(drawn) > 1
    cycle = plt.get_cmap("tab10" if len(drawn) <= 10 else "tab20")
    look = _Look(
        drawn, several, {name: cycle(i % cycle.N) if several else "tab:blue" for i, name in enumerate(drawn)},
        ink="0.3" if several else "tab:blue",  # legend key colour of the per-run lines
        legend={"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 8, "frameon": False,
                "borderaxespad": 0.0},
    )
    has_trace = any(s.get(_TRACE) for s in drawn.values())
    panels = 4 if has_trace else 3
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.4 * panels + 0.6), sharex=True)
    _loss_panel(axes[0], look, title)
    _ratio_panel(axes[1], look)
    _sharpness_panel(axes[2], look)
    if has_trace:
        _trace_panel(axes[3], look)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class _Look:
    """What every panel of :func:`build_figure` shares: the runs drawn and how."""

    drawn: dict[str, Series]
    several: bool
    colors: dict[str, Any]
    ink: str
    legend: dict[str, Any]

    def key(self, color: str) -> str:
        """A legend key's colour: grey where several runs share the line style, else ``color``."""
        return "0.3" if self.several else color


def _loss_panel(ax: Any, look: _Look, title: str) -> None:
    """The loss of each run (log axis), the title, and the run names for every panel below."""
    from matplotlib.lines import Line2D

    loss_tags = set()
    for name, series in look.drawn.items():
        loss_tag = next((t for t in LOSS_TAGS if series.get(t)), None)
        if loss_tag:
            loss_tags.add(loss_tag)
            ax.plot(*zip(*series[loss_tag]), color=look.colors[name] if look.several else "0.25", lw=1, label=name)
    if loss_tags:
        ax.set_yscale("log")
    ax.set_ylabel("loss" + (f" ({', '.join(sorted(loss_tags))})" if loss_tags else " (not logged)"), fontsize=9)
    heading = f"curvwatch report: {title}" if title else "curvwatch report"
    ax.set_title(heading + (f" ({len(look.drawn)} runs)" if look.several else ""))
    if look.several:  # the run names, once, for every panel below
        ax.legend(handles=[Line2D([], [], color=look.colors[n], lw=2) for n in look.drawn], labels=list(look.drawn),
                  title="runs", **look.legend)


def _ratio_panel(ax: Any, look: _Look) -> None:
    """Sharpness / threshold with the edge at 1, the early warnings, and (one run) where it crosses 1."""
    ratios_seen = []
    for name, series in look.drawn.items():
        ratio = ratio_series(series)
        if ratio:
            ratios_seen.extend(v for _, v in ratio)
            ax.plot(*zip(*ratio), color=look.colors[name], lw=1.4)
        batch = ratio_series(series, _BATCH) if series.get(_BATCH) else []
        if batch:
            ax.plot(*zip(*batch), color=look.colors[name], lw=0.9, ls=":")
        for tag, color, style, label in _ALONG_UPDATE:  # the early warnings: ratios along the update
            points = [(s, v) for s, v in series.get(tag, []) if math.isfinite(v)]
            if points:
                ratios_seen.extend(v for _, v in points)
                ax.plot(*zip(*points), color=look.colors[name] if look.several else color, lw=1.0, ls=style,
                        alpha=0.9, label=label)
        if not look.several:
            for step, direction in crossings(series):
                color, style = _CROSSING_STYLE[direction]
                ax.axvline(step, color=color, ls=style, lw=1.1, alpha=0.8,
                           label=_crossing_label(series, direction))
    ax.axhline(1.0, color="tab:red", ls="--", lw=1.2)
    finite = [v for v in ratios_seen if math.isfinite(v) and v > 0]
    if finite and max(finite) > _LINEAR_RATIO_MAX:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0.0)
    ax.set_ylabel("sharpness / threshold", fontsize=9)
    handles, labels = _ratio_legend(look)
    if not ratios_seen:
        labels[0] += " (no threshold logged)"
    ax.legend(handles=handles, labels=labels, **look.legend)


def _ratio_legend(look: _Look) -> tuple[list[Any], list[str]]:
    """The second panel's legend keys and labels: the ratio, the edge, and what else is drawn."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=look.ink, lw=1.4), Line2D([], [], color="tab:red", ls="--", lw=1.2)]
    labels = ["sharpness / threshold", "edge of stability (1)"]
    if any(s.get(_BATCH) for s in look.drawn.values()):
        handles.append(Line2D([], [], color=look.ink, lw=0.9, ls=":"))
        labels.append("batch sharpness / threshold")
    for tag, color, style, label in _ALONG_UPDATE:
        if any(s.get(tag) for s in look.drawn.values()):
            handles.append(Line2D([], [], color=look.key(color), lw=1.0, ls=style))
            labels.append(label)
    if not look.several:  # the vertical lines where the sharpness ratio crosses 1
        series = next(iter(look.drawn.values()))
        for direction in ("up", "down"):
            if any(d == direction for _, d in crossings(series)):
                color, style = _CROSSING_STYLE[direction]
                handles.append(Line2D([], [], color=color, ls=style, lw=1.1, alpha=0.8))
                labels.append(_crossing_label(series, direction))
    return handles, labels


def _sharpness_panel(ax: Any, look: _Look) -> None:
    """Sharpness and threshold of each run on a log axis."""
    from matplotlib.lines import Line2D

    adaptive = False
    for name, series in look.drawn.items():
        tag, points = sharpness_series(series)
        adaptive |= tag == _PRECONDITIONED
        positive = [(s, v) for s, v in points if v > 0]
        if positive:
            ax.plot(*zip(*positive), color=look.colors[name], lw=1.4)
        if series.get(_THRESHOLD):
            ax.plot(*zip(*series[_THRESHOLD]), color=look.colors[name] if look.several else "tab:red", ls="--",
                    lw=1.1)
    ax.set_yscale("log")
    ax.set_ylabel("curvature (log)", fontsize=9)
    sharp = "preconditioned sharpness $\\lambda_{max}(P^{-1}H)$" if adaptive else "sharpness $\\lambda_{max}(H)$"
    if adaptive and any(sharpness_series(s)[0] == _LAMBDA for s in look.drawn.values()):
        sharp = "sharpness ($P^{-1}H$ for adaptive optimizers)"
    ax.legend(handles=[Line2D([], [], color=look.ink, lw=1.4),
                       Line2D([], [], color=look.key("tab:red"), ls="--", lw=1.1)],
              labels=[sharp, "threshold (edge of stability)"], **look.legend)


def _trace_panel(ax: Any, look: _Look) -> None:
    """The trace of each run with its band of +-2 standard errors."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    for name, series in look.drawn.items():
        if not series.get(_TRACE):
            continue
        steps, values = zip(*series[_TRACE])
        color = look.colors[name] if look.several else "tab:purple"
        ax.plot(steps, values, color=color, lw=1.2)
        if series.get(_TRACE_STDERR):
            err = dict(series[_TRACE_STDERR])
            lo = [v - 2 * err.get(s, 0.0) for s, v in zip(steps, values)]
            hi = [v + 2 * err.get(s, 0.0) for s, v in zip(steps, values)]
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
    ax.set_ylabel("trace", fontsize=9)
    ax.legend(handles=[Line2D([], [], color=look.key("tab:purple"), lw=1.2),
                       Patch(color=look.key("tab:purple"), alpha=0.2)],
              labels=["trace (Hutchinson)", "$\\pm$2 standard errors"], **look.legend)
