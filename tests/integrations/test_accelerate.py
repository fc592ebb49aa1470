"""Accelerate end to end: real Accelerator loops, the trackers' files read back (``tests/_helpers.py``)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.tracking import GeneralTracker  # noqa: E402

from curvwatch import CurvatureMonitor, CurvatureWarning  # noqa: E402
from curvwatch.integrations.accelerate import watch  # noqa: E402
from curvwatch.results import tag as tag_of
from tests._helpers import (  # noqa: E402
    curves,
    direct,
    event_files,
    read_csv,
    read_mlflow,
    read_wandb,
    sharpness_chart,
    wandb_curves,
)

SCRIPT = Path(__file__).parents[1] / "ddp_scripts" / "accelerate_watch.py"
_spec = importlib.util.spec_from_file_location("accelerate_watch", SCRIPT)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

CURVATURE_TAGS = ("curvature/lambda_max", "curvature/lambda_1", "curvature/lambda_2",
                  "curvature/trace", "curvature/threshold", "curvature/sharpness_ratio")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; every test starts from scratch."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _setup(tmp_path, micro_batches=20, batch_size=8, log_with="tensorboard", init_kwargs=None, **accelerator_kwargs):
    accelerator = Accelerator(cpu=True, log_with=log_with, project_dir=str(tmp_path), **accelerator_kwargs)
    accelerator.init_trackers("run", init_kwargs=init_kwargs or {})
    model = script.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=script.LR, momentum=script.MOMENTUM)
    x, y = script.make_data(micro_batches * batch_size, seed=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, model, optimizer, loader


def _train(accelerator, model, optimizer, loader, start=0):
    """The user's loop: accumulate, backward, step, log the loss at each real update."""
    criterion = torch.nn.CrossEntropyLoss()
    updates = start
    for xb, yb in loader:
        with accelerator.accumulate(model):
            loss = criterion(model(xb), yb)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            updates += 1
            accelerator.log({"train/loss": loss.item()}, step=updates)
    return updates


def _direct(model, probe, optimizer, step):
    """A fresh monitor on the final weights and the same probe batch (cold start)."""
    return direct(model, probe, optimizer, step)


def test_end_to_end_tensorboard(tmp_path):
    accelerator, model, optimizer, loader = _setup(tmp_path)
    probe = script.make_data(32, seed=2)
    monitor = watch(accelerator, model, optimizer, probe, every=5, criterion=torch.nn.CrossEntropyLoss())
    assert _train(accelerator, model, optimizer, loader) == 20
    accelerator.end_training()

    assert len(event_files(tmp_path / "run")) == 1  # the loop's own run, not a second one
    run = curves(tmp_path / "run")
    assert sorted(run["train/loss"]) == list(range(1, 21))
    for tag in CURVATURE_TAGS:
        assert sorted(run[tag]) == [5, 10, 15, 20], tag
        assert all(math.isfinite(v) for v in run[tag].values()), tag
    assert sharpness_chart(tmp_path / "run") == [
        "curvature/lambda_max", "curvature/threshold", "curvature/batch_sharpness"
    ]

    threshold = (2 + 2 * script.MOMENTUM) / script.LR
    assert all(v == pytest.approx(threshold, rel=1e-6) for v in run["curvature/threshold"].values())
    logged = run["curvature/lambda_max"][20]
    reference = _direct(accelerator.unwrap_model(model), probe, optimizer, 20)
    assert logged == pytest.approx(reference.lambda_max, rel=1e-3)
    assert logged == pytest.approx(monitor.history[-1].lambda_max, rel=1e-6)  # float32 in the event file
    ratio = run["curvature/sharpness_ratio"][20]
    assert ratio == pytest.approx(reference.lambda_max / threshold, rel=1e-3)


def test_gradient_accumulation_measures_only_real_updates(tmp_path):
    accelerator, model, optimizer, loader = _setup(tmp_path, micro_batches=40, gradient_accumulation_steps=2)
    probe = script.make_data(32, seed=2)
    after_update = []
    monitor = watch(accelerator, model, optimizer, probe, every=5, criterion=torch.nn.CrossEntropyLoss(),
                    sinks=[lambda r: after_update.append(r.step)])
    assert _train(accelerator, model, optimizer, loader) == 20
    accelerator.end_training()

    assert after_update == [5, 10, 15, 20]          # 40 micro-batches, 20 updates
    assert monitor.state_dict()["attached_steps"] == 20
    assert sorted(curves(tmp_path / "run")["curvature/lambda_max"]) == [5, 10, 15, 20]
    # the last measurement saw the weights after the last update
    reference = _direct(accelerator.unwrap_model(model), probe, optimizer, 20)
    assert monitor.history[-1].lambda_max == pytest.approx(reference.lambda_max, rel=1e-3)


@pytest.mark.filterwarnings("ignore:curvwatch. the Accelerator has no trackers")
def test_skipped_fp16_step_is_not_an_update(tmp_path):
    # fp16 needs a GPU in Accelerate; the same AcceleratedOptimizer/GradScaler path
    # runs on CPU with a CPU GradScaler handed to the Accelerator before prepare.
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = script.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=script.LR, momentum=script.MOMENTUM)
    model, optimizer = accelerator.prepare(model, optimizer)
    x, y = script.make_data(64, seed=1)
    monitor = watch(accelerator, model, optimizer, script.make_data(32, seed=2), every=5,
                    criterion=torch.nn.CrossEntropyLoss())
    skipped = []
    weights_at = {}
    applied = 0
    for i in range(12):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if i in (2, 7):
            loss = loss * math.inf                   # overflow: the scaler skips this step
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        skipped.append(accelerator.optimizer_step_was_skipped)
        applied += not skipped[-1]
        weights_at[applied] = [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]

    assert skipped == [i in (2, 7) for i in range(12)]
    assert monitor.state_dict()["attached_steps"] == applied == 10
    assert [r.step for r in monitor.history] == [5, 10]
    # the measurement at 10 used the weights after the 10th applied update
    final = accelerator.unwrap_model(model).parameters()
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights_at[10], final, strict=True))
    reference = _direct(accelerator.unwrap_model(model), script.make_data(32, seed=2), optimizer, 10)
    assert monitor.history[-1].lambda_max == pytest.approx(reference.lambda_max, rel=1e-3)


def test_bf16_mixed_precision_measures_in_float32(tmp_path):
    accelerator, model, optimizer, loader = _setup(tmp_path, mixed_precision="bf16")
    unwrapped = accelerator.unwrap_model(model)
    assert "_original_forward" in unwrapped.__dict__          # prepare wrapped forward in autocast
    probe = script.make_data(32, seed=2)
    monitor = watch(accelerator, model, optimizer, probe, every=5, criterion=torch.nn.CrossEntropyLoss())
    wrapped_forward = unwrapped.__dict__["forward"]
    _train(accelerator, model, optimizer, loader)
    accelerator.end_training()
    assert unwrapped.__dict__["forward"] is wrapped_forward   # training still runs in bf16

    plain = script.build_model()
    plain.load_state_dict(unwrapped.state_dict())
    reference = _direct(plain, probe, None, 20)  # the training optimizer holds none of the copy's parameters
    assert monitor.history[-1].lambda_max == pytest.approx(reference.lambda_max, rel=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):        # what the wrapper would have given
        low = torch.nn.functional.cross_entropy(plain(probe[0]), probe[1])
    full = torch.nn.functional.cross_entropy(plain(probe[0]), probe[1])
    assert monitor.history[-1].loss == pytest.approx(full.item(), rel=1e-6)
    assert abs(low.item() - full.item()) > 1e-6 * abs(full.item())


def test_checkpoint_resume_keeps_the_schedule(tmp_path):
    probe = script.make_data(32, seed=2)
    accelerator, model, optimizer, loader = _setup(tmp_path / "a", micro_batches=10)
    first = watch(accelerator, model, optimizer, probe, every=5, criterion=torch.nn.CrossEntropyLoss())
    _train(accelerator, model, optimizer, loader)
    accelerator.save_state(str(tmp_path / "ckpt"))
    accelerator.end_training()
    assert [r.step for r in first.history] == [5, 10]

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator, model, optimizer, loader = _setup(tmp_path / "b", micro_batches=10)
    second = watch(accelerator, model, optimizer, probe, every=5, criterion=torch.nn.CrossEntropyLoss())
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert second.state_dict()["attached_steps"] == 10
    assert torch.equal(second.state_dict()["warm"], first.state_dict()["warm"])
    _train(accelerator, model, optimizer, loader, start=10)
    accelerator.end_training()
    assert [r.step for r in second.history] == [15, 20]
    assert sorted(curves(tmp_path / "b" / "run")["curvature/lambda_max"]) == [15, 20]


@pytest.mark.filterwarnings("ignore:curvwatch. no optimizer given")  # the reference monitor
def test_batch_sharpness_from_the_training_loader(tmp_path):
    x, y = script.make_data(160, seed=1)

    def shuffled():  # shuffled by its own generator, which drawing must not advance
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True,
                                           generator=torch.Generator().manual_seed(7))

    def run(where, watched):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path / where))
        accelerator.init_trackers("run")
        model = script.build_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=script.LR, momentum=script.MOMENTUM)
        model, optimizer, loader = accelerator.prepare(model, optimizer, shuffled())
        monitor = watch(accelerator, model, optimizer, script.make_data(32, seed=2), every=5, trace=False,
                        criterion=torch.nn.CrossEntropyLoss(), batch_sharpness=True, train_dataloader=loader,
                        batch_sharpness_batches=4) if watched else None
        assert _train(accelerator, model, optimizer, loader) == 20
        accelerator.end_training()
        return accelerator.unwrap_model(model), monitor, curves(tmp_path / where / "run")

    model, monitor, events = run("watched", True)
    plain, _, _ = run("plain", False)
    # training unchanged
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True))

    assert monitor.batch_size == 8  # the training loader's
    for tag in ("curvature/batch_sharpness", "curvature/batch_sharpness_stderr"):
        points = events[tag]
        assert sorted(points) == [5, 10, 15, 20], tag
        assert all(math.isfinite(v) and v > 0 for v in points.values()), tag
    # 4 mini-batches per measurement in the loop's own order: step 20 used batches 12..15
    minibatches = list(shuffled())[12:16]
    reference = CurvatureMonitor(model, minibatches[0], criterion=torch.nn.CrossEntropyLoss(), trace=False,
                                 batch_size=8, minibatches=minibatches, batch_sharpness_batches=4, strict=True)
    expected = reference.measure(20)
    assert events["curvature/batch_sharpness"][20] == pytest.approx(expected.batch_sharpness, rel=1e-5)
    assert events["curvature/batch_sharpness_stderr"][20] == pytest.approx(expected.batch_sharpness_stderr, rel=1e-4)


def test_errors_name_the_fix(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = script.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=script.LR)
    with pytest.raises(ValueError, match="accelerate.Accelerator"):
        watch(object(), model, optimizer, script.make_data(8, seed=2), criterion=torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="prepared optimizer"):
        watch(accelerator, model, object(), script.make_data(8, seed=2), criterion=torch.nn.CrossEntropyLoss())
    with pytest.warns(CurvatureWarning, match="no trackers"):
        watch(accelerator, model, optimizer, script.make_data(8, seed=2), criterion=torch.nn.CrossEntropyLoss(),
              checkpoint=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_whole_probe_batch(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(SCRIPT), "--out", str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["num_processes"] == 2 and rank["distributed_type"].endswith("MULTI_CPU")
        assert rank["updates"] == 20 and rank["probe_examples"] == 16   # half of the 32 each
        assert [h["step"] for h in rank["history"]] == [5, 10, 15, 20]
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):   # the same Lanczos on both
        timing = ("seconds", "overhead", "critical_sharpness_seconds")  # wall-clock: differs per process
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    # a user's sink runs on the main process only, like the trackers
    assert ranks[0]["sink_steps"] == [5, 10, 15, 20] and ranks[1]["sink_steps"] == []

    events = curves(tmp_path / "tb" / "run")
    assert sorted(events["curvature/lambda_max"]) == [5, 10, 15, 20]
    assert "train/loss" in events
    assert sharpness_chart(tmp_path / "tb" / "run")[0] == "curvature/lambda_max"
    assert len(event_files(tmp_path / "tb")) == 1    # main process only

    final = torch.load(tmp_path / "final.pt")
    model = script.build_model()
    model.load_state_dict(final["state_dict"])
    optimizer = torch.optim.SGD(model.parameters(), lr=script.LR, momentum=script.MOMENTUM)
    reference = _direct(model, final["probe"], optimizer, 20)
    logged = ranks[0]["history"][-1]
    assert logged["lambda_max"] == pytest.approx(reference.lambda_max, rel=1e-3)
    assert logged["loss"] == pytest.approx(reference.loss, rel=1e-5)
    assert events["curvature/lambda_max"][20] == pytest.approx(reference.lambda_max, rel=1e-3)


def test_probe_batch_split_by_process_index():
    from curvwatch.probe import process_share

    x, y = script.make_data(12, seed=2)
    share = process_share((x, y), rank=1, world_size=3)
    assert torch.equal(share[0], x[4:8]) and torch.equal(share[1], y[4:8])
    assert process_share((x, y), 0, 1)[0] is x
    with pytest.raises(ValueError, match="12 examples.*5 processes"):
        process_share((x, y), rank=0, world_size=5)


class _RejectingTracker(GeneralTracker):
    """A tracker whose backend rejects the curvature values (and takes everything else)."""

    name = "rejecting"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    @property
    def tracker(self):
        return None

    def store_init_configuration(self, values) -> None:
        pass

    def log(self, values, step=None, **kwargs) -> None:
        if any(key.startswith("curvature/") for key in values):
            raise RuntimeError("backend rejected the point")
        self.steps.append(step)


@pytest.mark.parametrize("strict", [False, True])
def test_a_failing_tracker_warns_once_or_raises_when_strict(tmp_path, strict):
    rejecting = _RejectingTracker()
    accelerator = Accelerator(cpu=True, log_with=[rejecting, "tensorboard"], project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    model = script.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=script.LR, momentum=script.MOMENTUM)
    x, y = script.make_data(160, seed=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    watch(accelerator, model, optimizer, script.make_data(32, seed=2), every=5, trace=False,
          criterion=torch.nn.CrossEntropyLoss(), strict=strict)
    if strict:
        with pytest.raises(RuntimeError, match="backend rejected the point"):
            _train(accelerator, model, optimizer, loader)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _train(accelerator, model, optimizer, loader) == 20
    accelerator.end_training()
    messages = [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)]
    assert len(messages) == 1 and "rejecting failed" in messages[0], messages
    assert rejecting.steps == list(range(1, 21))  # the loop's own values
    assert sorted(curves(tmp_path / "run")["curvature/lambda_max"]) == [5, 10, 15, 20]  # the other tracker


@pytest.mark.parametrize("axis", ["zero_based", "micro_batches", "every_tenth_update"])
def test_wandb_keeps_every_point_whatever_step_counter_the_loop_logs_with(tmp_path, monkeypatch, axis):
    # wandb drops points below its current step: a loop counting from 0, or counting
    # micro-batches, must lose neither its own points nor the curvature ones
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    accumulate = 2 if axis == "micro_batches" else 1
    accelerator, model, optimizer, loader = _setup(
        tmp_path, micro_batches=20 * accumulate, gradient_accumulation_steps=accumulate, log_with="wandb",
        init_kwargs={"wandb": {"dir": str(tmp_path)}},
    )
    monitor = watch(accelerator, model, optimizer, script.make_data(32, seed=2), every=5, trace=False,
                    criterion=torch.nn.CrossEntropyLoss())
    criterion, updates = torch.nn.CrossEntropyLoss(), 0
    for i, (xb, yb) in enumerate(loader):
        with accelerator.accumulate(model):
            loss = criterion(model(xb), yb)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        updates += accelerator.sync_gradients
        if axis == "micro_batches":
            accelerator.log({"loss": loss.item()}, step=i)
        elif axis == "zero_based" and accelerator.sync_gradients:
            accelerator.log({"loss": loss.item()}, step=updates - 1)
        elif accelerator.sync_gradients and updates % 10 == 0:  # two measurements between the loop's points
            accelerator.log({"loss": loss.item()}, step=updates)
    accelerator.end_training()

    rows = read_wandb(tmp_path)
    expected = {"micro_batches": 40, "zero_based": 20, "every_tenth_update": 2}[axis]
    assert len([row for row in rows if "loss" in row]) == expected  # every point of the loop
    measured = {r.step: r.lambda_max for r in monitor.history}
    assert sorted(measured) == [5, 10, 15, 20]
    logged = wandb_curves(rows, x="curvature/step")  # the x axis of curvature/* (define_metric)
    assert logged["curvature/lambda_max"] == pytest.approx(measured, rel=1e-12)


SAME_RUN = Path(__file__).parents[1] / "ddp_scripts" / "same_run.py"
# what every framework must log identically (top_overlap from the second measurement on)
COMPARED = ("lambda_max", "lambda_1", "lambda_2", "trace", "trace_stderr", "threshold", "sharpness_ratio",
            "top_overlap", "hvps")


@pytest.mark.slow
def test_the_same_run_under_lightning_transformers_and_accelerate_logs_the_same_curves(tmp_path):
    """Same model, data, optimizer, schedule and seed: the same curvature at the same steps, everywhere.

    Each framework writes TensorBoard and one other tracker (Lightning: CSV, transformers: an MLflow
    file store, Accelerate: wandb offline); everything is read back from the trackers' own files.
    """
    for package in ("lightning", "transformers", "mlflow", "wandb"):
        pytest.importorskip(package)
    spec = importlib.util.spec_from_file_location("same_run", SAME_RUN)
    same = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(same)
    logged, tracked, results = {}, {}, {}
    for framework in ("lightning", "transformers", "accelerate"):
        out = tmp_path / framework
        out.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
        done = subprocess.run([sys.executable, str(SAME_RUN), "--framework", framework, "--out", str(out)],
                              cwd=SAME_RUN.parent, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results[framework] = json.loads((out / "result.json").read_text())
        logged[framework] = curves(out / "tb")
        if framework == "lightning":
            tracked[framework] = read_csv(out / "csv" / "metrics.csv")
        elif framework == "transformers":
            tracked[framework] = read_mlflow(out / "mlruns")
        else:
            tracked[framework] = wandb_curves(read_wandb(out), x="curvature/step")

    # the three trainings are the same training
    weights = {framework: result["weights"] for framework, result in results.items()}
    assert weights["lightning"] == weights["transformers"] == weights["accelerate"]
    def value(h: dict, name: str) -> float:
        return h["eigenvalues"][int(name[-1]) - 1] if name.startswith("lambda_") and name[-1].isdigit() else h[name]

    measured = {
        framework: {
            name: {h["step"]: value(h, name) for h in result["history"] if math.isfinite(value(h, name))}
            for name in COMPARED
        }
        for framework, result in results.items()
    }
    reference = measured["accelerate"]
    assert sorted(reference["lambda_max"]) == [5, 10, 15, 20]
    assert sorted(reference["top_overlap"]) == [10, 15, 20]
    # the threshold of each measurement is the one of the update it follows: lr (1 - (k - 1) / STEPS)
    heavy_ball = (2 + 2 * same.MOMENTUM) / same.LR
    for step, value in reference["threshold"].items():
        assert value == pytest.approx(heavy_ball / (1 - (step - 1) / same.STEPS), rel=1e-12)
    for framework in ("lightning", "transformers", "accelerate"):
        for name in COMPARED:
            tag = tag_of(name)
            assert measured[framework][name] == pytest.approx(reference[name], rel=1e-9), (framework, name)
            assert logged[framework][tag] == pytest.approx(reference[name], rel=1e-6), (framework, name)  # float32
            assert tracked[framework][tag] == pytest.approx(reference[name], rel=1e-9), (framework, name)
    # next to each framework's own loss curve
    assert logged["lightning"]["train_loss"] and tracked["lightning"]["train_loss"]
    assert sorted(logged["transformers"]["train/loss"]) == sorted(tracked["transformers"]["loss"]) == [5, 10, 15, 20]
    assert sorted(logged["accelerate"]["train_loss"]) == [5, 10, 15, 20]


@pytest.mark.filterwarnings("ignore:curvwatch. no optimizer given")  # the reference monitor
@pytest.mark.parametrize("split_batch", [True, False])
@pytest.mark.parametrize("curvature", ["ggn", "fisher", "empirical_fisher"])
def test_output_space_curvatures_take_the_criterion_in_full_precision(tmp_path, curvature, split_batch):
    """``criterion=MSELoss()`` with a Gauss-Newton or Fisher curvature measures; bf16 training, float32 products.

    One cold measurement at the last update equals a plain float32 model's: under the
    autocast wrapper ``prepare`` puts on ``forward`` it would differ by 1e-3 to 6e-3.
    """
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 2, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:24], y[:24]), batch_size=6)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    probe = (x[24:], y[24:])
    criterion = torch.nn.MSELoss()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "curvwatch: the Accelerator has no trackers")
        monitor = watch(accelerator, model, optimizer, probe, every=4, criterion=criterion, curvature=curvature,
                        split_batch=split_batch, checkpoint=False, strict=True, trace=False, top_k=1)
    for xb, yb in loader:
        accelerator.backward(criterion(model(xb), yb))
        optimizer.step()
        optimizer.zero_grad()
    assert [r.step for r in monitor.history] == [4]
    assert monitor.history[-1].method == curvature

    unwrapped = accelerator.unwrap_model(model)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    plain.load_state_dict(unwrapped.state_dict())
    reference = direct(plain, probe, None, 4, criterion=criterion, curvature=curvature, trace=False, top_k=1)
    assert monitor.history[-1].lambda_max == pytest.approx(reference.lambda_max, rel=1e-6)
    assert monitor.history[-1].loss == pytest.approx(reference.loss, rel=1e-6)
