"""curvwatch.report: runs found one by one, drawn as labelled lines, the edge at ratio 1."""

import json

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("tensorboard")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from curvwatch.report import (  # noqa: E402
    build_figure,
    draw_report,
    find_runs,
    read_run,
    read_runs,
)


def _write_events(logdir, points):
    """One TensorBoard run: ``points`` is ``[(step, {tag: value})]``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    for step, scalars in points:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def _curvature(step, sharpness, threshold, loss):
    return {"train/loss": loss, "curvature/lambda_max": sharpness, "curvature/threshold": threshold,
            "curvature/sharpness_ratio": sharpness / threshold, "curvature/trace": 3 * sharpness,
            "curvature/trace_stderr": 0.1}


def _write_jsonl(path, points):
    with open(path, "w", encoding="utf-8") as f:
        for step, scalars in points:
            f.write(json.dumps({"step": step, "scalars": scalars}) + "\n")


@pytest.fixture
def two_runs(tmp_path):
    """``tmp_path/sweep`` with two TensorBoard runs on the same steps, and a folder without runs."""
    root = tmp_path / "sweep"
    _write_events(root / "lr_0.1", [(s, _curvature(s, 0.5 + s / 100, 20.0, 1.0 / s)) for s in range(10, 110, 10)])
    _write_events(root / "lr_1", [(s, _curvature(s, 1.5 + s / 200, 2.0, 2.0 / s)) for s in range(10, 110, 10)])
    (root / "notes").mkdir()
    return root


def _panel(fig, ylabel):
    return next(ax for ax in fig.axes if ax.get_ylabel().startswith(ylabel))


def test_a_folder_of_two_runs_is_read_as_two_runs_not_one_merged_line(two_runs):
    assert list(find_runs(str(two_runs))) == ["lr_0.1", "lr_1"]
    runs = read_runs(str(two_runs))
    for name, threshold in [("lr_0.1", 20.0), ("lr_1", 2.0)]:
        steps = [s for s, _ in runs[name]["curvature/lambda_max"]]
        assert steps == list(range(10, 110, 10)), name  # each step once: the runs are not merged
        assert {v for _, v in runs[name]["curvature/threshold"]} == {threshold}
    with pytest.raises(ValueError, match="2 runs"):
        read_run(str(two_runs))
    assert list(read_run(str(two_runs / "lr_1"))) != []


def test_report_of_two_runs_draws_one_labelled_line_per_run(two_runs, tmp_path):
    runs = read_runs(str(two_runs))
    fig = build_figure(runs, title="sweep")
    assert "2 runs" in fig.axes[0].get_title()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["lr_0.1", "lr_1"]
    ratio = _panel(fig, "sharpness / threshold")
    curves = [line for line in ratio.get_lines() if len(line.get_xdata()) > 2]
    assert len(curves) == 2  # one line per run, not one zig-zag through both
    assert curves[0].get_color() != curves[1].get_color()
    for line, name in zip(curves, ["lr_0.1", "lr_1"]):
        assert list(line.get_xdata()) == list(range(10, 110, 10))
        expected = [v for _, v in runs[name]["curvature/sharpness_ratio"]]
        assert list(line.get_ydata()) == pytest.approx(expected)
    png = draw_report(str(two_runs), str(tmp_path / "sweep.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_ratio_panel_keeps_the_edge_at_one_when_the_threshold_changes(tmp_path):
    # an lr schedule: the threshold 2/lr rises 10x and the sharpness follows it at 0.9 x threshold
    points = []
    for step in range(10, 210, 10):
        threshold = 2.0 / (0.1 if step <= 100 else 0.01)
        points.append((step, _curvature(step, 0.9 * threshold, threshold, 1.0 / step)))
    _write_jsonl(tmp_path / "schedule.jsonl", points)
    runs = read_runs(str(tmp_path / "schedule.jsonl"))
    assert list(runs) == ["schedule.jsonl"]
    fig = build_figure(runs)
    ratio = _panel(fig, "sharpness / threshold")
    (curve,) = [line for line in ratio.get_lines() if len(line.get_xdata()) > 2]
    assert list(curve.get_ydata()) == pytest.approx([0.9] * 20)
    edges = [line for line in ratio.get_lines() if list(line.get_ydata()) == [1.0, 1.0]]
    assert len(edges) == 1  # the edge of stability is the horizontal line at 1
    assert ratio.get_ylim()[0] == 0.0 and ratio.get_ylim()[1] > 1.0
    assert _panel(fig, "curvature").get_yscale() == "log"  # absolute values: not squashed


def test_legends_sit_beside_the_axes_not_on_the_curves(two_runs):
    fig = build_figure(read_runs(str(two_runs)))
    fig.canvas.draw()
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == len(fig.axes)  # every panel explains its lines
    for ax, legend in legends:
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1


def test_events_and_jsonl_of_the_same_run_are_one_run(tmp_path):
    run = tmp_path / "runs" / "a"
    points = [(s, _curvature(s, 1.0, 2.0, 1.0)) for s in (5, 10)]
    _write_events(run, points)
    _write_jsonl(run / "curvature.jsonl", points)
    _write_jsonl(tmp_path / "runs" / "b.jsonl", points)
    assert list(find_runs(str(tmp_path / "runs"))) == ["a", "b.jsonl"]
    assert list(find_runs(str(run))) == ["a"]


def test_a_step_logged_twice_keeps_the_last_value(tmp_path):
    _write_jsonl(tmp_path / "r.jsonl", [(s, {"curvature/lambda_max": 1.0}) for s in (1, 2, 3)]
                 + [(s, {"curvature/lambda_max": 2.0}) for s in (2, 3)])
    assert read_run(str(tmp_path / "r.jsonl"))["curvature/lambda_max"] == [(1, 1.0), (2, 2.0), (3, 2.0)]


def test_runs_without_curvature_are_left_out_and_none_at_all_is_an_error(tmp_path):
    _write_events(tmp_path / "plain", [(1, {"train/loss": 1.0})])
    _write_events(tmp_path / "watched", [(1, _curvature(1, 1.0, 2.0, 1.0))])
    fig = build_figure(read_runs(str(tmp_path)))
    ratio = _panel(fig, "sharpness / threshold")
    assert "(2 runs)" not in fig.axes[0].get_title()
    assert len([line for line in ratio.get_lines() if list(line.get_ydata()) != [1.0, 1.0]]) == 1
    with pytest.raises(ValueError, match="is it a curvwatch run"):
        build_figure(read_runs(str(tmp_path / "plain")))
    with pytest.raises(FileNotFoundError):
        find_runs(str(tmp_path / "missing"))


def test_the_ratio_panel_draws_the_early_warnings_where_they_are_logged(tmp_path):
    points = []
    for step in range(10, 110, 10):
        scalars = _curvature(step, 1.0, 2.0, 1.0 / step)
        scalars["curvature/critical_sharpness_ratio"] = step / 100
        if step >= 50:  # the update sharpness only from step 50 on
            scalars["curvature/update_sharpness_ratio"] = 0.25
        points.append((step, scalars))
    _write_jsonl(tmp_path / "warn.jsonl", points)
    fig = build_figure(read_runs(str(tmp_path / "warn.jsonl")))
    ratio = _panel(fig, "sharpness / threshold")
    curves = {tuple(line.get_ydata()) for line in ratio.get_lines() if len(line.get_xdata()) > 2}
    assert tuple(s / 100 for s in range(10, 110, 10)) in curves  # critical sharpness / (2/lr)
    assert (0.25,) * 6 in curves  # update sharpness, where logged
    labels = [t.get_text() for t in ratio.get_legend().get_texts()]
    assert "early warning: critical sharpness / (2/lr)" in labels
    assert "early warning: update sharpness / threshold" in labels
    series = read_run(str(tmp_path / "warn.jsonl"))
    plain = build_figure({"plain": {k: v for k, v in series.items() if "update" not in k and "critical" not in k}})
    assert len(_panel(plain, "sharpness / threshold").get_legend().get_texts()) == 2  # nothing to explain


def _legend_entries(ax):
    """``{label: legend handle}`` of ``ax``'s legend."""
    legend = ax.get_legend()
    return {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles, strict=True)}


def _looks(line):
    """What tells a line apart: colour (RGBA) and dash pattern."""
    from matplotlib.colors import to_rgba

    return to_rgba(line.get_color(), line.get_alpha()), line.get_linestyle()


def test_the_vertical_line_where_the_sharpness_reaches_the_threshold_is_named_in_the_legend(tmp_path):
    """Issue 25, item 14: the demo's picture drew a line at step 170 that no legend explained."""
    points = [(s, _curvature(s, 0.5 + s / 100, 2.0, 1.0 / s)) for s in range(10, 310, 10)]  # 1 at step 150
    points += [(s, _curvature(s, 1.0, 2.0, 1.0 / s)) for s in range(310, 350, 10)]  # back below at 310
    _write_jsonl(tmp_path / "edge.jsonl", points)
    ratio = _panel(build_figure(read_runs(str(tmp_path / "edge.jsonl"))), "sharpness / threshold")
    vertical = {line.get_xdata()[0]: line for line in ratio.get_lines()
                if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2}
    assert sorted(vertical) == [150, 310]
    entries = _legend_entries(ratio)
    up, down = entries["sharpness reaches the threshold (step 150)"], entries["sharpness falls below it (step 310)"]
    assert _looks(up) == _looks(vertical[150]) and _looks(down) == _looks(vertical[310])
    assert vertical[150].get_label() == "sharpness reaches the threshold (step 150)"
    assert _looks(vertical[150]) != _looks(vertical[310])
    sharpness = next(line for line in ratio.get_lines() if len(line.get_xdata()) > 2)
    edge = next(line for line in ratio.get_lines() if list(line.get_ydata()) == [1.0, 1.0])
    assert _looks(vertical[150]) not in (_looks(sharpness), _looks(edge))


def test_the_early_warnings_are_drawn_unlike_the_sharpness_and_named_in_the_legend(tmp_path):
    """Issue 25, item 14: the two early-warning lines were thin lines of the sharpness's own colour."""
    from matplotlib.colors import to_rgb

    points = []
    for step in range(10, 110, 10):
        scalars = _curvature(step, 1.0, 2.0, 1.0 / step)
        scalars["curvature/critical_sharpness_ratio"] = step / 100
        scalars["curvature/update_sharpness_ratio"] = step / 200
        points.append((step, scalars))
    _write_jsonl(tmp_path / "warn.jsonl", points)
    ratio = _panel(build_figure(read_runs(str(tmp_path / "warn.jsonl"))), "sharpness / threshold")
    curves = [line for line in ratio.get_lines() if len(line.get_xdata()) > 2]
    def drawing(values):
        return next(line for line in curves if list(line.get_ydata()) == pytest.approx(values))

    steps = range(10, 110, 10)
    sharpness = drawing([0.5] * 10)
    critical, update = drawing([s / 100 for s in steps]), drawing([s / 200 for s in steps])
    colours = {to_rgb(line.get_color()) for line in (sharpness, critical, update)}
    styles = {line.get_linestyle() for line in (sharpness, critical, update)}
    assert len(colours) == 3 and len(styles) == 3  # each its own colour and its own dashes
    entries = _legend_entries(ratio)
    for line, label in [(sharpness, "sharpness / threshold"), (critical, "early warning: critical sharpness / (2/lr)"),
                        (update, "early warning: update sharpness / threshold")]:
        handle = entries[label]
        assert to_rgb(handle.get_color()) == to_rgb(line.get_color()), label
        assert handle.get_linestyle() == line.get_linestyle(), label


def test_several_runs_keep_their_colours_and_the_early_warnings_their_line_styles(tmp_path):
    for name, lr in [("a", 1.0), ("b", 2.0)]:
        points = []
        for step in range(10, 60, 10):
            scalars = _curvature(step, 1.0, 2.0 / lr, 1.0 / step)
            scalars["curvature/critical_sharpness_ratio"] = step / 100
            scalars["curvature/update_sharpness_ratio"] = step / 200
            points.append((step, scalars))
        _write_jsonl(tmp_path / f"{name}.jsonl", points)
    ratio = _panel(build_figure(read_runs(str(tmp_path))), "sharpness / threshold")
    curves = [line for line in ratio.get_lines() if len(line.get_xdata()) > 2]
    assert len(curves) == 6
    assert len({line.get_color() for line in curves}) == 2  # one colour per run
    assert len({line.get_linestyle() for line in curves}) == 3  # sharpness, critical, update
