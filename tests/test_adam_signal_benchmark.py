"""benchmarks/adam_signal.py: the spike detector and the per-signal evaluation on hand-made records."""

import math

import pytest

adam_signal = pytest.importorskip("benchmarks.adam_signal")


def test_a_spike_is_a_sustained_rise_above_the_50_step_low():
    losses = [3.0 - 0.01 * i for i in range(100)]  # falls to 2.01
    losses += [2.9, 3.5, 3.4, 3.3, 2.2, 2.1, 2.0, 2.0, 2.0, 2.0]  # steps 101-110
    spikes = adam_signal.find_spikes(losses, first=0, abs_margin=0.5, rel_margin=0.0)
    assert len(spikes) == 1
    spike = spikes[0]
    assert spike["step"] == 101  # 2.9 > 2.01 + 0.5, and so are the next two
    assert spike["reference"] == pytest.approx(2.01)
    assert spike["peak"] == 3.5
    assert spike["end"] == 104  # the mean of steps 104-108 (3.3, 2.2, 2.1, 2.0, 2.0) = 2.32 is back under 2.51


def test_a_one_step_blip_is_no_spike_and_a_nan_is_one():
    losses = [2.0] * 60 + [2.8] + [2.0] * 10  # one step above the margin (bump_x10's 2.8 at step 302)
    assert adam_signal.find_spikes(losses, 0, 0.5, 0.0) == []
    assert adam_signal.find_spikes([2.0] * 60 + [math.nan], 0, 0.5, 0.0)[0]["step"] == 61


def test_relative_margin_for_the_full_batch_problem():
    losses = [0.01] * 60 + [0.025, 0.03, 0.03]  # more than twice the low: a spike with rel_margin=1
    assert adam_signal.find_spikes(losses, 0, 0.0, 1.0)[0]["step"] == 61
    assert adam_signal.find_spikes(losses, 0, 0.5, 0.0) == []


def _record(ratios_by_step, losses, first=0):
    measurements = [
        {"step": step, "ratios": {name: ratio for name in adam_signal.RATIOS}} for step, ratio in ratios_by_step
    ]
    record = {"losses": losses, "first_step": first, "measurements": measurements}
    record["spikes"] = adam_signal.find_spikes(losses, first, 0.5, 0.0)
    return record


def test_lead_time_false_alarms_and_stable_range():
    losses = [2.0] * 200 + [4.0] * 5 + [2.0] * 95  # a spike at step 201, over at 206
    record = _record([(50, 1.2), (100, 0.4), (160, 1.1), (180, 0.9), (190, 1.3), (203, 5.0), (250, 0.5)], losses)
    assert [s["step"] for s in record["spikes"]] == [201]
    e = adam_signal.evaluate(record)["a_precond"]
    # 160 and 190 are within 50 steps before the spike: the first of them gives the lead, 201 - 160
    assert e["leads"] == [41]
    # 50 crossed with no spike in the next 50 steps: one false alarm in 300 steps; 203 is inside the spike
    assert e["false_alarms"] == 1
    assert e["false_alarms_per_1000_steps"] == pytest.approx(1000 / 300)
    assert (e["stable_min"], e["stable_max"], e["stable_measurements"]) == (0.4, 1.2, 3)


def test_a_spike_without_a_crossing_in_its_50_steps_is_missed():
    losses = [2.0] * 200 + [4.0] * 5 + [2.0] * 95
    record = _record([(100, 1.5), (150, 0.9), (200, 0.99)], losses)
    e = adam_signal.evaluate(record)["b_restricted"]
    assert e["leads"] == [None]
    assert e["false_alarms"] == 1  # step 100: the spike at 201 is 101 steps later


def test_branch_settings_follow_the_run_spec():
    preset = adam_signal.MODELS["tiny"]
    runs = {r.name: r for r in adam_signal.runs_for(preset)}
    assert set(runs) == {"stable_lr0.001", "stable_lr0.003", "bump_x10", "bump_x20", "ramp_x100", "beta2_0.1"}
    bump, ramp, beta2 = runs["bump_x20"], runs["ramp_x100"], runs["beta2_0.1"]
    assert adam_signal.settings(bump, preset, 300) == (1e-3, (0.9, 0.999))
    assert adam_signal.settings(bump, preset, 301) == (pytest.approx(2e-2), (0.9, 0.999))
    assert adam_signal.settings(ramp, preset, 375)[0] == pytest.approx(1e-2)  # halfway up a x100 ramp
    assert adam_signal.settings(ramp, preset, 450)[0] == pytest.approx(1e-1)
    assert adam_signal.settings(beta2, preset, 301) == (1e-3, (0.9, 0.1))
    assert adam_signal.due(ramp, preset, 440) and not adam_signal.due(ramp, preset, 445)
    assert adam_signal.due(runs["stable_lr0.001"], preset, 425) and not adam_signal.due(
        runs["stable_lr0.001"], preset, 430
    )
