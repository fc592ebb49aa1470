"""Where results go: TensorBoard (with a custom-scalars chart), JSONL, memory.

A sink is any callable ``sink(result)``; the classes here only format
:class:`~curvwatch.results.CurvatureResult` objects.
"""

from __future__ import annotations

import json
import os
from typing import Any

from curvwatch.results import TAG_PREFIX, CurvatureResult, tag

CHART_CATEGORY = "curvwatch"
# The second chart's titles: distinct, because TensorBoard merges the layouts of
# all runs in a logdir and keeps two charts of one title side by side (an SGD and
# an Adam run would otherwise show two "sharpness vs ..." charts, each plotting
# the other run's threshold too).
SHARPNESS_CHART = "sharpness vs edge-of-stability threshold"
PRECONDITIONED_SHARPNESS_CHART = "preconditioned sharpness vs edge-of-stability threshold"


def custom_scalars_layout(adaptive: bool = False, blocks: bool = False) -> dict:
    """The TensorBoard custom-scalars layout: the ratio to the edge first, then the curves.

    The first chart is sharpness / threshold beside a constant series at 1 (the
    edge of stability): it reads at a glance even when the threshold changes
    with an lr schedule. ``adaptive``: the second chart overlays the
    preconditioned sharpness (Adam-type optimizers) instead of the raw one with
    the threshold, under its own title (:data:`PRECONDITIONED_SHARPNESS_CHART`).
    Top eigenvalues and the trace get their own charts;
    ``blocks``: so do the per-block sharpness and ratio (``curvature/block/<name>/...``).
    """
    sharp = "preconditioned_lambda_max" if adaptive else "lambda_max"
    layout = {
        CHART_CATEGORY: {
            "sharpness / threshold (edge of stability at 1)": ["Multiline", [tag("sharpness_ratio"), tag("edge")]],
            PRECONDITIONED_SHARPNESS_CHART if adaptive else SHARPNESS_CHART: [
                "Multiline",
                [TAG_PREFIX + sharp, TAG_PREFIX + "threshold", TAG_PREFIX + "batch_sharpness"],
            ],
            "top eigenvalues": ["Multiline", [TAG_PREFIX + r"lambda_\d+"]],
            "trace": ["Margin", [tag("trace"), tag("trace_lower"), tag("trace_upper")]],
        }
    }
    if blocks:
        charts = layout[CHART_CATEGORY]
        # its own title under Adam: charts of one title from two runs are merged
        title = "blocks: preconditioned sharpness" if adaptive else "blocks: sharpness"
        charts[title] = ["Multiline", [TAG_PREFIX + f"block/[^/]+/{sharp}$"]]
        charts["blocks: sharpness / threshold"] = ["Multiline", [TAG_PREFIX + "block/[^/]+/sharpness_ratio$"]]
    return layout


def write_layout(writer: Any, adaptive: bool = False, blocks: bool = False) -> None:
    """Write :func:`custom_scalars_layout` with a ``SummaryWriter``-like ``writer``."""
    writer.add_custom_scalars(custom_scalars_layout(adaptive, blocks))


class ChartLayout:
    """When a TensorBoard writer gets the custom-scalars layout: one rule for every writer.

    The layout is written at the first result, and again when a result needs
    another one: the preconditioned sharpness chart once a result has it (an
    Adam-type optimizer measured before its first step has no preconditioner
    yet), the block charts once a result has blocks. Once there, they stay.
    TensorBoard shows the last layout a run wrote; an unchanged layout is never
    written twice. Used by :class:`TensorBoardSink` and by the framework
    adapters' logging sink alike.
    """

    def __init__(self) -> None:
        self.written: tuple[bool, bool] | None = None  # (adaptive, blocks) of the layout written

    def update(self, writer: Any, result: CurvatureResult) -> None:
        """Write the layout ``result`` needs with ``writer``, unless it is the one written."""
        adaptive, blocks = self.written or (False, False)
        needed = (adaptive or result.preconditioned_lambda_max == result.preconditioned_lambda_max,
                  blocks or bool(result.blocks))
        if needed != self.written:
            write_layout(writer, adaptive=needed[0], blocks=needed[1])
            self.written = needed


def margin_scalars(result: CurvatureResult) -> dict[str, float]:
    """The charts' helper series: ``trace_lower``/``trace_upper`` (+-2 stderr) and the edge at 1."""
    helpers = {}
    if result.trace == result.trace and result.trace_stderr == result.trace_stderr:
        helpers[tag("trace_lower")] = result.trace - 2 * result.trace_stderr
        helpers[tag("trace_upper")] = result.trace + 2 * result.trace_stderr
    if result.sharpness_ratio == result.sharpness_ratio:
        helpers[tag("edge")] = 1.0
    return helpers


class TensorBoardSink:
    """Log every ``curvature/*`` tag at the optimizer step to a TensorBoard run.

    Per-block values (``CurvatureMonitor(blocks=...)``) are scalars like the
    others, ``curvature/block/<name>/lambda_max`` etc.; :class:`JsonlSink`
    writes them both as scalars and as the nested ``blocks`` field.

    Args:
        logdir_or_writer: a directory (a ``SummaryWriter`` is created there) or an
            existing ``torch.utils.tensorboard.SummaryWriter``.
        spectrum_bins: bins of the ``curvature/spectrum`` histogram (SLQ).

    The custom-scalars layout (sharpness overlaid with the threshold) is written
    as :class:`ChartLayout` says: at the first result, and again when a result
    needs another one (the preconditioned sharpness, blocks).

    The legacy Scalars tab lists groups in the order of their first tag, and
    sorts tags treating ``_`` and ``/`` alike: ``curvature`` comes first when
    a run logs a tag sorting before ``curvature_diagnostics/converged``
    (``critical_sharpness``, ``batch_sharpness``, ``block/...``), else the
    ``curvature_diagnostics`` group is listed above it. The Time Series tab
    (the default) always lists ``curvature`` first.
    """

    def __init__(self, logdir_or_writer: Any, spectrum_bins: int = 60) -> None:
        if isinstance(logdir_or_writer, (str, os.PathLike)):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir_or_writer))
        else:
            self.writer = logdir_or_writer
        self.spectrum_bins = spectrum_bins
        self._layout = ChartLayout()

    def __call__(self, result: CurvatureResult) -> None:
        """Log the scalars of ``result`` (and its spectrum, if any) at its step, then flush."""
        self._layout.update(self.writer, result)
        for name, value in {**result.scalars(), **margin_scalars(result)}.items():
            self.writer.add_scalar(name, value, result.step)
        if result.spectrum is not None:
            write_spectrum(self.writer, result, self.spectrum_bins)
        self.writer.flush()

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        """Log a non-curvature scalar (e.g. the training loss) to the same run."""
        self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close the writer."""
        self.writer.close()


def write_spectrum(writer: Any, result: CurvatureResult, bins: int) -> None:
    """Log the SLQ density of ``result`` as the histogram ``curvature/spectrum``."""
    import numpy as np

    nodes, weights = (np.asarray(x, dtype=np.float64) for x in result.spectrum)
    lo, hi = float(nodes.min()), float(nodes.max())
    hi = hi if hi > lo else lo + 1.0
    mass, edges = np.histogram(nodes, bins=bins, range=(lo, hi), weights=weights)
    # TensorBoard histograms count items: scale the unit mass to a count of 1000
    counts = mass / mass.sum() * 1000.0
    centers = 0.5 * (edges[1:] + edges[:-1])
    writer.add_histogram_raw(
        TAG_PREFIX + "spectrum",
        min=lo,
        max=hi,
        num=float(counts.sum()),
        sum=float((counts * centers).sum()),
        sum_squares=float((counts * centers**2).sum()),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=result.step,
    )


class JsonlSink:
    """Append one JSON object per result to ``path`` (every field of the result)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def __call__(self, result: CurvatureResult) -> None:
        """Append ``result`` (its fields and its scalars) as one line."""
        record = result.to_dict()
        record["scalars"] = result.scalars()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


class MemorySink:
    """Keep results in a list (``.results``)."""

    def __init__(self) -> None:
        self.results: list[CurvatureResult] = []

    def __call__(self, result: CurvatureResult) -> None:
        """Keep ``result``."""
        self.results.append(result)
