"""Helpers the integration tests share: read a run back, measure a reference.

Scalars come from :func:`curvwatch.report.read_run` (the reader users have);
the custom-scalars chart and histograms from the same event files; the other
trackers from their own files (wandb offline, an MLflow file store, a CSV).
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import struct
import time
from pathlib import Path
from typing import Any

import torch

from curvwatch import CurvatureMonitor, CurvatureResult
from curvwatch.report import read_run
from curvwatch.sinks import PRECONDITIONED_SHARPNESS_CHART, SHARPNESS_CHART

Curves = dict[str, dict[int, float]]


def event_files(run_dir: str | os.PathLike) -> list[str]:
    """Every TensorBoard event file below ``run_dir``."""
    return sorted(glob.glob(os.path.join(str(run_dir), "**", "events.out.tfevents.*"), recursive=True))


def curves(run_dir: str | os.PathLike) -> Curves:
    """``{tag: {step: value}}`` of every scalar below ``run_dir`` (through ``read_run``)."""
    return {tag: dict(points) for tag, points in read_run(str(run_dir)).items()}


def steps(run_dir: str | os.PathLike, tag: str = "curvature/lambda_max") -> list[int]:
    """The steps ``tag`` was logged at (``[]`` if never)."""
    return sorted(curves(run_dir).get(tag, {}))


def _accumulators(run_dir: str | os.PathLike) -> list[Any]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulators = []
    for directory in sorted({os.path.dirname(f) for f in event_files(run_dir)}):
        accumulator = EventAccumulator(directory, size_guidance={"tensors": 0, "histograms": 0})
        accumulator.Reload()
        accumulators.append(accumulator)
    return accumulators


def layouts(run_dir: str | os.PathLike) -> list[dict[str, list[str]]]:
    """Every custom-scalars layout written: ``[{chart title: [tags], ...}, ...]`` (category ``curvwatch``)."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util.tensor_util import make_ndarray

    found = []
    for accumulator in _accumulators(run_dir):
        if "custom_scalars__config__" not in accumulator.Tags()["tensors"]:
            continue
        for event in accumulator.Tensors("custom_scalars__config__"):
            layout = layout_pb2.Layout.FromString(make_ndarray(event.tensor_proto).item())
            for category in layout.category:
                if category.title == "curvwatch":
                    found.append({chart.title: _chart_tags(chart) for chart in category.chart})
    return found


def _chart_tags(chart: Any) -> list[str]:
    if chart.WhichOneof("content") == "multiline":
        return list(chart.multiline.tag)
    return [series.value for series in chart.margin.series]


def sharpness_chart(run_dir: str | os.PathLike) -> list[str]:
    """Tags of the 'sharpness vs threshold' chart (raw or preconditioned) of the layout TensorBoard shows.

    That is the last layout written; fails unless there is one, and when a layout was
    written again unchanged (once per result, say).
    """
    written = layouts(run_dir)
    assert written, "no custom-scalars layout written"
    assert all(a != b for a, b in zip(written, written[1:])), f"a layout written again unchanged: {written}"
    charts = [written[-1][t] for t in (SHARPNESS_CHART, PRECONDITIONED_SHARPNESS_CHART) if t in written[-1]]
    assert len(charts) == 1, f"expected one sharpness chart, found {list(written[-1])}"
    return charts[0]


def shown_layout(logdir: str | os.PathLike) -> dict[str, list[str]]:
    """The custom-scalars charts TensorBoard's own plugin shows for ``logdir``: every run's layout, merged."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    plugin = CustomScalarsPlugin(base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer,
                                                       data_provider=provider))
    layout = plugin.layout_impl(context.RequestContext(), "")  # the JSON the page fetches
    charts: dict[str, list[str]] = {}
    for category in json.loads(layout).get("category", []) if layout else ():
        if category["title"] == "curvwatch":
            for chart in category["chart"]:
                assert chart["title"] not in charts, f"two charts titled {chart['title']!r}"
                margin = [series["value"] for series in chart.get("margin", {}).get("series", [])]
                charts[chart["title"]] = chart["multiline"]["tag"] if "multiline" in chart else margin
    return charts


def histogram_steps(run_dir: str | os.PathLike, tag: str = "curvature/spectrum") -> list[int]:
    """Steps of histogram ``tag``."""
    out = []
    for accumulator in _accumulators(run_dir):
        if tag in accumulator.Tags()["histograms"]:
            out.extend(event.step for event in accumulator.Histograms(tag))
    return sorted(out)


def direct(model: torch.nn.Module, batch: Any, optimizer: Any = None, step: int = 0, **options: Any) -> CurvatureResult:
    """A fresh, cold-started, strict measurement on the model's current weights (the reference)."""
    options.setdefault("criterion", None if "loss_fn" in options else torch.nn.CrossEntropyLoss())
    return CurvatureMonitor(model, batch, optimizer=optimizer, strict=True, **options).measure(step)


# -- other trackers ------------------------------------------------------------------


def read_csv(path: str | os.PathLike) -> Curves:
    """``{column: {step: value}}`` of a Lightning ``CSVLogger`` ``metrics.csv`` (empty cells skipped)."""
    out: Curves = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    out.setdefault(key, {})[step] = float(value)
    return out


def read_mlflow(tracking_dir: str | os.PathLike) -> Curves:
    """``{metric: {step: value}}`` of the one run in an MLflow file store (``file:`` tracking URI)."""
    files = [p for p in Path(tracking_dir).glob("*/*/metrics/**/*") if p.is_file()]
    runs = {p.parts[len(Path(tracking_dir).parts) + 1] for p in files}
    assert len(runs) == 1, f"expected one MLflow run under {tracking_dir}, found {sorted(runs)}"
    out: Curves = {}
    for path in files:
        metrics_dir = next(parent for parent in path.parents if parent.name == "metrics")
        key = path.relative_to(metrics_dir).as_posix()
        for line in path.read_text().splitlines():
            _, value, step = line.split()
            out.setdefault(key, {})[int(step)] = float(value)
    return out


def _wandb_records(path: str) -> Any:
    """Records of a ``.wandb`` file: a log of 32 KiB blocks of checksummed chunks (LevelDB's format)."""
    block, header = 32768, 7
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    position, chunks = header, []
    while position + header <= len(data):
        left = block - position % block
        if left < header:  # zero padding at the end of a block
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + header])
        if kind == 0 and length == 0:
            position += left
            continue
        chunks.append(data[position + header : position + header + length])
        position += header + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            yield b"".join(chunks)
            chunks = []


def read_wandb(root: str | os.PathLike, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The history rows (``_step`` included) of the one offline wandb run below ``root``.

    wandb's service may still be writing the file when ``finish()`` has returned:
    the file is read again until it ends with the run's ``exit`` record.
    """
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    paths = glob.glob(os.path.join(str(root), "**", "offline-run-*", "run-*.wandb"), recursive=True)
    assert len(paths) == 1, f"expected one offline wandb run under {root}, found {paths}"
    deadline = time.monotonic() + timeout
    while True:
        rows, finished = [], False
        try:
            for raw in _wandb_records(paths[0]):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(raw)
                kind = record.WhichOneof("record_type")
                finished = finished or kind == "exit"
                if kind == "history":
                    rows.append({
                        (item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                        for item in record.history.item
                    })
        except (DecodeError, struct.error):
            finished = False
        if finished:
            return rows
        assert time.monotonic() < deadline, f"{paths[0]} has no exit record after {timeout} s"
        time.sleep(0.1)


def wandb_curves(rows: list[dict[str, Any]], x: str) -> Curves:
    """``{key: {x: value}}`` of the rows that hold ``x`` (a wandb step metric)."""
    out: Curves = {}
    for row in rows:
        if x in row:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not key.startswith("_") and key != x:
                    out.setdefault(key, {})[int(row[x])] = float(value)
    return out


def finite(values: dict[int, float]) -> bool:
    """Every value finite."""
    return all(math.isfinite(v) for v in values.values())


def adam_linear_diagonal(
    optimizer: torch.optim.Optimizer, params: list[torch.Tensor], gradient: torch.Tensor
) -> torch.Tensor:
    """Adam's ``P = sqrt(v_hat) + eps`` with ``P_i^-1/2 = 0`` off its linear set, written out for tests.

    The set (curvwatch.optim.linearization): ``v_hat_i' <= 2 v_hat_i`` after the gradient enters,
    i.e. ``beta2 v + (1 - beta2) g^2 <= 2 v (1 - beta2^(t+1)) / (1 - beta2^t)``.
    """
    pieces, offset = [], 0
    for p in params:
        state, group = optimizer.state[p], next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        beta2, t = group["betas"][1], float(state["step"])
        v = state["exp_avg_sq"].reshape(-1).double()
        g = gradient[offset : offset + p.numel()].double()
        offset += p.numel()
        linear = beta2 * v + (1 - beta2) * g**2 <= 2 * v * (1 - beta2 ** (t + 1)) / (1 - beta2**t)
        P = (v / (1 - beta2**t)).sqrt() + group["eps"]
        pieces.append(torch.where(linear, P, torch.full_like(P, math.inf)))
    return torch.cat(pieces)
