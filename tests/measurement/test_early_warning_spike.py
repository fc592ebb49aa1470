"""The early warning comes before the loss spike (examples/early_warning.py), and the quantities
along the update track lambda_max and 2/lr at the edge of stability (the digits demo, GD, lr 2)."""

import importlib.util
import math
import statistics
import sys
import warnings
from pathlib import Path

import pytest
import torch

import curvwatch as cw

pytest.importorskip("sklearn")
pytestmark = pytest.mark.slow  # two training runs, about 18 s on one thread

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "early_warning.py"
_spec = importlib.util.spec_from_file_location("early_warning_example", EXAMPLE)
example = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = example  # dataclasses look their module up there
_spec.loader.exec_module(example)


@pytest.fixture(scope="module")
def spike_run():
    return example.run()


def test_first_spike_definition():
    assert example.first_spike([1.0, 0.5, 0.9, 1.01, 3.0]) == 3  # 1.01 > 2 x 0.5
    assert example.first_spike([1.0, 0.9, 1.7]) is None
    assert example.first_spike([1.0, math.nan]) == 1


def test_the_early_warning_comes_before_the_loss_spike(spike_run):
    w, spike = spike_run.warning, spike_run.spike
    assert w is not None and spike is not None
    assert isinstance(w, cw.ThresholdEvent)
    assert w.quantity in ("update_sharpness_ratio", "critical_sharpness_ratio")
    assert w.step < spike  # strictly before
    # the numbers of the committed run (docs/early_warning.png, README "Early warning"): warning at
    # step 223 (critical sharpness 1.17 x 2/lr at lr 2.97, stable lr 2.53), spike at step 227
    assert 215 <= w.step <= 230 and 220 <= spike <= 235
    assert spike - w.step >= 2
    assert w.ratio >= 1 and w.stable_lr == pytest.approx(w.lr / w.ratio)
    assert w.stable_lr < w.lr == pytest.approx(example.lr_at(w.step))
    # before the warning the loss was still falling to within 2% of its lowest value
    assert spike_run.losses[w.step] <= 1.02 * min(spike_run.losses[: w.step])
    assert spike_run.losses[spike] > 2 * min(spike_run.losses[:spike])
    # the sharpness itself reached 2/lr earlier (a Lanczos per measurement against one product)
    edge = spike_run.sharpness_crossing
    assert edge is not None and edge.step < w.step
    # one measurement per step, each with the update sharpness
    assert len(spike_run.history) == len(spike_run.lrs) == example.STEPS
    assert all(math.isfinite(r.update_sharpness) for r in spike_run.history[1:])


def test_describe_prints_the_lead(spike_run):
    text = example.describe(spike_run)
    w = spike_run.warning
    assert text.startswith(f"warning at step {w.step} (lr={w.lr:.3f}, stable lr={w.stable_lr:.3f}), ")
    assert f"loss spike at step {spike_run.spike}: {spike_run.spike - w.step} steps ahead" in text


def test_readme_quotes_what_the_script_prints(spike_run):
    """Issue 25, item 13: the README said warning 224, spike 228, ratio 1.30, stable lr 2.30 where the
    script printed 223, 227, 1.17, 2.53. Its lines (all but the timing) stand in the README as printed."""
    readme = (EXAMPLE.parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Early warning", 1)[1].split("\n## ", 1)[0]
    printed = example.describe(spike_run).splitlines()[:-1]  # the last line: measurements and seconds
    assert len(printed) == 3
    for line in printed:
        assert line in section.splitlines(), line
    w, spike, edge = spike_run.warning, spike_run.spike, spike_run.sharpness_crossing
    prose = " ".join(section.split())
    said = f"comes at step {w.step} (ratio {w.ratio:.2f} at lr {w.lr:.2f}; stable lr, lr / ratio, {w.stable_lr:.2f})"
    assert said in prose
    assert f"at step {spike}: **{spike - w.step} steps ahead**" in prose
    assert f"reached 2/lr at step {edge.step}, {spike - edge.step} steps ahead" in prose
    update = next(e for e in spike_run.events if e.quantity == "update_sharpness_ratio")
    assert f"crosses at step {update.step} ({update.ratio:.2f})" in prose


def test_plot_writes_a_png(spike_run, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "early_warning.png"
    example.plot(spike_run, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def eos_run():
    """The gd demo's problem and lr (2, fixed), 400 steps, measured every 10: the results at the edge."""
    from curvwatch.demo import digits_problem

    torch.set_num_threads(1)
    model, x, targets = digits_problem(0)
    criterion = torch.nn.MSELoss()
    lr = 2.0
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor = cw.CurvatureMonitor(model, (x, targets), criterion=criterion, every=10, optimizer=opt, top_k=1,
                                  trace=False, budget=cw.Budget(overhead=None))
    monitor.attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cw.CurvatureWarning)
        for _ in range(400):
            opt.zero_grad()
            criterion(model(x), targets).backward()
            opt.step()
    edge = next(r.step for r in monitor.history if r.sharpness_ratio >= 1)
    return lr, edge, [r for r in monitor.history if r.step >= edge]


def _median(values):
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def test_lambda_max_and_update_sharpness_within_30_percent_of_2_over_lr_at_the_edge(eos_run):
    lr, edge, eos = eos_run
    assert 150 <= edge <= 190  # the demo reaches the edge at step 170
    assert len(eos) >= 20
    assert _median([r.lambda_max for r in eos]) == pytest.approx(2 / lr, rel=0.3)
    assert _median([r.update_sharpness for r in eos]) == pytest.approx(2 / lr, rel=0.3)


def test_critical_sharpness_tracks_2_over_lr_and_lambda_max_at_the_edge(eos_run):
    """Along the next update (the probe gradient's step) the line search brackets at every measurement.

    (Along the last update it did not: that step overshot, and from where it
    landed its direction goes uphill; 5 values in 64 measurements.)
    """
    lr, _, eos = eos_run
    assert all(math.isfinite(r.critical_sharpness) for r in eos)
    assert _median([r.critical_sharpness for r in eos]) == pytest.approx(2 / lr, rel=0.1)
    assert _median([r.critical_sharpness / r.lambda_max for r in eos]) == pytest.approx(0.95, abs=0.05)
