"""CurvatureMonitor: demo claims, non-interference, TensorBoard, failure policy."""

import logging
import math
import warnings

import pytest
import torch

import curvwatch as cw
from curvwatch.demo import run_demo
from curvwatch.report import read_run
from tests.cases import BatchNormDropoutNet, assert_same_training, train_bn_dropout


def _event_accumulator(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


# -- the demo's claims --------------------------------------------------------
@pytest.mark.slow
def test_gd_demo_progressive_sharpening_then_edge_of_stability(tmp_path):
    run = run_demo(str(tmp_path), optimizer="gd", steps=500, every=20, progress=False)
    ratios = [r.sharpness_ratio for r in run.history]
    assert run.history[0].threshold == pytest.approx(2 / 2.0)
    assert ratios[0] < 0.7
    assert all(0.85 <= r <= 1.3 for r in ratios[-8:]), ratios
    rises = sum(b > a for a, b in zip(run.losses[250:], run.losses[251:]))
    assert rises > 10  # the loss is non-monotone at the edge of stability
    assert run.losses[-1] < 0.2 * run.losses[0]


@pytest.mark.slow
def test_adam_demo_preconditioned_sharpness_at_38_over_lr(tmp_path):
    run = run_demo(str(tmp_path), optimizer="adam", steps=500, every=20, progress=False)
    first, last = run.history[0], run.history[-1]
    assert first.threshold == pytest.approx(38 / 3e-3)
    assert first.sharpness_ratio == pytest.approx(first.preconditioned_lambda_max / first.threshold)
    assert first.sharpness_ratio < 0.7
    assert all(0.85 <= r.sharpness_ratio <= 1.3 for r in run.history[-8:])
    assert last.lambda_max < 0.1 * last.preconditioned_lambda_max  # raw sharpness is far smaller


# -- measuring never changes training -----------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"train_mode": True}, {"method": "finite_difference", "batch_size": 8}])
def test_training_with_monitor_is_bit_identical(kwargs):
    reference, run = train_bn_dropout(None), train_bn_dropout(kwargs)
    model, monitor = run[0], run[-1]
    assert len(monitor.history) == 4
    assert_same_training(run, reference)
    assert model.training and all(m.training for m in model.modules())


def test_monitor_leaves_eval_mode_and_no_grad_context_alone():
    model = BatchNormDropoutNet().eval()
    monitor = cw.CurvatureMonitor(model, (torch.randn(8, 6), torch.randint(0, 3, (8,))),
                                  criterion=torch.nn.CrossEntropyLoss(), strict=True)
    with torch.no_grad():
        result = monitor.measure(1)
    assert result is not None and not model.training and all(not m.training for m in model.modules())


# -- the result ----------------------------------------------------------------
def _regression_monitor(**kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randn(40, 1, dtype=torch.float64)
    return model, x, y, cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), **kwargs)


def test_result_matches_dense_hessian_and_reports_honestly():
    from tests.cases import dense_hessian

    model, x, y, monitor = _regression_monitor(
        top_k=3, strict=True, budget=cw.Budget(max_hvps=60, trace_hvps=20, tol=1e-6)
    )
    r = monitor.measure(7)
    H = dense_hessian(model, lambda ps: torch.nn.functional.mse_loss(torch.func.functional_call(model, ps, (x,)), y))
    exact = torch.linalg.eigvalsh(H).flip(0)
    assert r.step == 7 and r.converged and r.method == "double_backward"
    assert r.eigenvalues == pytest.approx(exact[:3].tolist(), rel=1e-6)
    assert r.lambda_max == r.eigenvalues[0]
    assert abs(r.trace - torch.trace(H).item()) <= 4 * r.trace_stderr + 1e-9
    assert r.hvps <= 60 and r.seconds > 0
    assert math.isnan(r.threshold) and math.isnan(r.sharpness_ratio)  # no optimizer
    assert r.loss == pytest.approx(torch.nn.functional.mse_loss(model(x), y).item())


def test_warm_start_overlap_and_cheap_repeat():
    _, _, _, monitor = _regression_monitor(top_k=1, trace=False, strict=True)
    first = monitor.measure(1)
    second = monitor.measure(2)
    assert math.isnan(first.top_overlap)
    assert second.top_overlap == pytest.approx(1.0, abs=1e-4)
    assert second.hvps <= 5 < first.hvps
    assert second.lambda_max == pytest.approx(first.lambda_max, rel=1e-3)


def test_budget_is_honoured_by_the_monitor():
    _, _, _, monitor = _regression_monitor(top_k=2, budget=cw.Budget(max_hvps=7, trace_hvps=3, tol=1e-12))
    r = monitor.measure(1)
    assert r.hvps == 7 and not r.converged


def test_threshold_events_fire_once_per_crossing(caplog):
    caplog.set_level(logging.INFO, logger="curvwatch")
    _, _, _, monitor = _regression_monitor(trace=False, top_k=1)
    opt = torch.optim.SGD(monitor.model.parameters(), lr=1e-3)
    events = []
    monitor.optimizer = opt
    monitor.on_threshold = events.append
    lam = monitor.measure(0).lambda_max
    for step, lr in enumerate([0.5 / lam, 1.5 / lam, 2.5 / lam, 3.0 / lam, 1.0 / lam, 0.9 / lam], start=1):
        opt.param_groups[0]["lr"] = lr
        monitor.measure(step)
    assert [e.step for e in events] == [3, 5]
    assert events[0].sharpness_ratio >= 1 > events[1].sharpness_ratio
    assert sum("crossed" in m for m in caplog.messages) == 1
    assert sum("fell back" in m for m in caplog.messages) == 1


# -- sinks ---------------------------------------------------------------------
def test_tensorboard_tags_steps_values_and_layout(tmp_path):
    model, x, y, monitor = _regression_monitor(
        top_k=2, every=5, spectrum_every=2,
        sinks=[cw.TensorBoardSink(str(tmp_path)), cw.JsonlSink(tmp_path / "c.jsonl")],
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    monitor.attach(opt)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    monitor.sinks[0].close()
    acc = _event_accumulator(tmp_path)
    scalars = acc.Tags()["scalars"]
    for tag in ["lambda_max", "lambda_1", "lambda_2", "trace", "trace_stderr", "threshold",
                "sharpness_ratio", "top_overlap"]:
        assert "curvature/" + tag in scalars, tag
    for tag in ["hvps", "seconds", "converged", "error_bound", "trace_lower", "trace_upper"]:
        # cost and diagnostics in a group of their own: the curvature group opens on the curves
        assert "curvature_diagnostics/" + tag in scalars and "curvature/" + tag not in scalars, tag
    events = acc.Scalars("curvature/lambda_max")
    assert [e.step for e in events] == [5, 10, 15, 20]
    assert [e.value for e in events] == pytest.approx([r.lambda_max for r in monitor.history], rel=1e-6)
    assert acc.Scalars("curvature/threshold")[0].value == pytest.approx(3.8 / 0.01, rel=1e-6)
    assert "curvature/spectrum" in acc.Tags()["histograms"]
    assert [e.step for e in acc.Histograms("curvature/spectrum")] == [5, 15]
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    ratio, sharpness = layout.category[0].chart[0], layout.category[0].chart[1]
    # first the ratio beside the edge at 1, then sharpness overlaid with its threshold
    assert list(ratio.multiline.tag) == ["curvature/sharpness_ratio", "curvature_diagnostics/edge"]
    assert list(sharpness.multiline.tag)[:2] == ["curvature/lambda_max", "curvature/threshold"]
    edge = acc.Scalars("curvature_diagnostics/edge")
    assert [e.step for e in edge] == [5, 10, 15, 20] and {e.value for e in edge} == {1.0}
    jsonl = read_run(str(tmp_path / "c.jsonl"))
    assert [s for s, _ in jsonl["curvature/lambda_max"]] == [5, 10, 15, 20]


def test_report_png_from_tensorboard_and_cli(tmp_path):
    from curvwatch.cli import main

    run_demo(str(tmp_path / "run"), steps=60, every=10, progress=False)
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.png")]) == 0
    with open(tmp_path / "r.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "missing")]) == 2


# -- failure policy and bad arguments -------------------------------------------
def test_failed_measurement_warns_once_and_training_continues():
    model = torch.nn.Linear(4, 1)
    bad = (torch.full((8, 4), float("nan")), torch.zeros(8, 1))
    monitor = cw.CurvatureMonitor(model, bad, criterion=torch.nn.MSELoss(), every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor.attach(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
    skipped = [w for w in caught if issubclass(w.category, cw.CurvatureWarning) and "skipped" in str(w.message)]
    assert len(skipped) == 1 and "nan" in str(skipped[0].message)
    assert monitor.history == []
    strict = cw.CurvatureMonitor(model, bad, criterion=torch.nn.MSELoss(), strict=True)
    with pytest.raises(cw.CurvatureError, match="nan"):
        strict.measure(1)


def test_probe_batch_of_the_wrong_shape_is_skipped_with_a_warning():
    model = torch.nn.Linear(4, 1)
    monitor = cw.CurvatureMonitor(model, (torch.randn(8, 5), torch.zeros(8, 1)), criterion=torch.nn.MSELoss())
    with pytest.warns(cw.CurvatureWarning, match="skipped.*RuntimeError"):
        assert monitor.measure(1) is None


def test_model_without_double_backward_falls_back_to_finite_differences():
    from tests.cases import OnceDifferentiableCube

    class Cube(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))

        def forward(self, x):
            return (OnceDifferentiableCube.apply(self.w) * x).sum()

    model = Cube()
    monitor = cw.CurvatureMonitor(model, torch.ones(2, dtype=torch.float64), loss_fn=lambda m, b: m(b), trace=False)
    with pytest.warns(cw.CurvatureWarning, match="finite differences"):
        r = monitor.measure(1)
    assert r.method == "finite_difference"
    assert r.lambda_max == pytest.approx(12.0, rel=1e-6)  # H = diag(6 w) = diag(6, 12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"top_k": 0}, "top_k"),
        ({"method": "magic"}, "unknown method"),
        ({"sinks": ["runs/x"]}, "sinks must be callables"),
        ({"budget": 5}, "curvwatch.Budget"),
        ({"optimizer": "adam"}, "torch.optim.Optimizer"),
        ({"criterion": None}, "no loss was given"),
        ({"loss_fn": lambda m, b: 0.0}, "not both"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    model = torch.nn.Linear(3, 1)
    base = {"criterion": torch.nn.MSELoss()}
    base.update(kwargs)
    if base.get("criterion") is None:
        base.pop("criterion")
    with pytest.raises(cw.CurvatureError, match=match):
        cw.CurvatureMonitor(model, (torch.randn(4, 3), torch.randn(4, 1)), **base)


def test_bad_batch_and_model_errors():
    with pytest.raises(cw.CurvatureError, match=r"\(inputs, targets\)"):
        cw.CurvatureMonitor(torch.nn.Linear(3, 1), torch.randn(4, 3), criterion=torch.nn.MSELoss())
    frozen = torch.nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(cw.CurvatureError, match="no trainable parameters"):
        cw.CurvatureMonitor(frozen, (torch.randn(4, 3), torch.randn(4, 1)), criterion=torch.nn.MSELoss())
    with pytest.raises(cw.CurvatureError, match="no probe batch"):
        cw.CurvatureMonitor(torch.nn.Linear(3, 1), None, criterion=torch.nn.MSELoss())
    with pytest.raises(cw.CurvatureError, match="Budget.trace_hvps"):
        cw.Budget(max_hvps=5, trace_hvps=5)


def test_state_dict_round_trip_keeps_schedule_and_warm_start():
    _, _, _, monitor = _regression_monitor(top_k=1, trace=False, strict=True)
    first = monitor.measure(1)
    state = monitor.state_dict()
    _, _, _, fresh = _regression_monitor(top_k=1, trace=False, strict=True)
    fresh.load_state_dict(state)
    assert fresh.measurements == 1
    again = fresh.measure(2)
    assert again.hvps <= 5 and again.top_overlap == pytest.approx(1.0, abs=1e-4)
    assert again.lambda_max == pytest.approx(first.lambda_max, rel=1e-3)


def test_forward_difference_steps_down_where_differences_disagree():
    # L = sum(sin(1000 w)) / 1000: H = diag(-1000 sin(1000 w)); over a float32 step of
    # ~1e-3 the curvature swings completely, so one-sided and central differences disagree.
    # The certificate halves its step three times (783, 941, 983, 994) and extrapolates:
    # 997.2 against 999.8, within its error estimate.
    class Wiggly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([0.3, 0.1, 0.2]))

        def forward(self, x):
            return torch.sin(1000 * self.w * x).sum() / 1000

    model = Wiggly()
    exact = sorted((-1000 * torch.sin(1000 * model.w.detach().double())).tolist(), reverse=True)
    auto = cw.CurvatureMonitor(model, torch.ones(3), loss_fn=lambda m, b: m(b), trace=False, top_k=1).measure(1)
    assert auto.method == "double_backward" and auto.converged
    # 3 x 3 with an eigenvalue 12% below the top that a 2-step Krylov space has not
    # resolved: the error is within r^2/gap = 10 * tol (see lanczos' stopping rule)
    assert auto.lambda_max == pytest.approx(exact[0], rel=1e-2)
    forced = cw.CurvatureMonitor(model, torch.ones(3), loss_fn=lambda m, b: m(b), trace=False, top_k=1,
                                 method="forward_difference")
    with pytest.warns(cw.CurvatureWarning, match="Richardson extrapolation"):
        r = forced.measure(1)
    assert r.method == "forward_difference" and r.converged
    assert abs(r.lambda_max - exact[0]) <= r.error_bound * exact[0] <= 1e-2 * exact[0]


def test_forward_difference_is_certified_to_1e3_in_float32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(64, 5), torch.randn(64, 1)
    r = cw.CurvatureMonitor(model, (x, y), criterion=torch.nn.MSELoss(), trace=False, top_k=1,
                            method="forward_difference").measure(1)
    ref = cw.CurvatureMonitor(model.double(), (x.double(), y.double()), criterion=torch.nn.MSELoss(), trace=False,
                              top_k=1, budget=cw.Budget(tol=1e-8, max_hvps=80, trace_hvps=0)).measure(1)
    assert r.method == "forward_difference" and r.converged and ref.method == "double_backward"
    assert r.lambda_max == pytest.approx(ref.lambda_max, rel=1e-3)


# -- Adam before its first step ----------------------------------------------------
def test_adam_before_its_first_step_logs_no_ratio():
    # before: sharpness_ratio = raw lambda_max / (38/lr), a number in the wrong units
    model, x, y, monitor = _regression_monitor(top_k=1, trace=False, strict=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    monitor.optimizer = opt
    with pytest.warns(cw.CurvatureWarning, match=r"before its first step\?\): preconditioned sharpness and the "
                      r"sharpness ratio skipped"):
        early = monitor.measure(0)
    assert early.lambda_max > 0 and early.threshold == pytest.approx(38 / 0.01)
    assert math.isnan(early.preconditioned_lambda_max) and math.isnan(early.sharpness_ratio)
    assert "curvature/sharpness_ratio" not in early.scalars()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    later = monitor.measure(1)
    assert later.sharpness_ratio == pytest.approx(later.preconditioned_lambda_max / later.threshold)


def _train_logged(logdir, optimizer, measure_first=False, steps=6):
    model, x, y, monitor = _regression_monitor(top_k=1, trace=False, every=3, sinks=[cw.TensorBoardSink(logdir)])
    opt = optimizer(model.parameters())
    monitor.attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if measure_first:
            monitor.measure(0)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    monitor.sinks[0].close()
    return monitor


def test_an_adam_run_measured_before_its_first_step_shows_the_preconditioned_chart(tmp_path):
    # before: the layout came from the first result (no preconditioned value yet) and stayed for the whole run
    from tests._helpers import layouts, sharpness_chart, shown_layout

    monitor = _train_logged(tmp_path / "adam", lambda p: torch.optim.Adam(p, lr=0.01), measure_first=True)
    assert math.isnan(monitor.history[0].preconditioned_lambda_max)
    assert len(layouts(tmp_path / "adam")) == 2  # written again once, when the preconditioned value appeared
    assert sharpness_chart(tmp_path / "adam")[:2] == ["curvature/preconditioned_lambda_max", "curvature/threshold"]
    charts = shown_layout(tmp_path)
    assert "sharpness vs edge-of-stability threshold" not in charts
    assert charts["preconditioned sharpness vs edge-of-stability threshold"][0] == "curvature/preconditioned_lambda_max"


def test_gd_and_adam_runs_in_one_logdir_get_distinct_sharpness_charts(tmp_path):
    # before: both charts were titled "sharpness vs edge-of-stability threshold" and TensorBoard showed both,
    # each plotting the other run's tags too
    from tests._helpers import shown_layout

    _train_logged(tmp_path / "gd", lambda p: torch.optim.SGD(p, lr=0.01))
    _train_logged(tmp_path / "adam", lambda p: torch.optim.Adam(p, lr=0.01))
    charts = shown_layout(tmp_path)  # fails on two charts of one title
    assert list(charts) == [  # runs in name order: adam's layout, then the chart gd adds
        "sharpness / threshold (edge of stability at 1)", "preconditioned sharpness vs edge-of-stability threshold",
        "top eigenvalues", "trace", "sharpness vs edge-of-stability threshold",
    ]
    assert charts["sharpness vs edge-of-stability threshold"][0] == "curvature/lambda_max"
