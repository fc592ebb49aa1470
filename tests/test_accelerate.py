"""Accelerate end to end: real Accelerator loops, TensorBoard event files read back."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("tensorboard")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from curvwatch import CurvatureMonitor, CurvatureWarning  # noqa: E402
from curvwatch.integrations.accelerate import watch  # noqa: E402

SCRIPT = Path(__file__).parent / "ddp_scripts" / "accelerate_watch.py"
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


def _setup(tmp_path, micro_batches=20, batch_size=8, **accelerator_kwargs):
    accelerator = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path), **accelerator_kwargs)
    accelerator.init_trackers("run")
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


def _events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _layout(events: EventAccumulator) -> list[str]:
    """Tags of the custom-scalars chart 'sharpness vs threshold' (written exactly once)."""
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util.tensor_util import make_ndarray

    written = events.Tensors("custom_scalars__config__")
    assert len(written) == 1
    layout = layout_pb2.Layout.FromString(make_ndarray(written[0].tensor_proto).item())
    (category,) = layout.category
    assert category.title == "curvwatch"
    return list(category.chart[0].multiline.tag)


def _direct(model, probe, optimizer, step):
    """A fresh monitor on the final weights and the same probe batch (cold start)."""
    monitor = CurvatureMonitor(model, probe, criterion=torch.nn.CrossEntropyLoss(), optimizer=optimizer)
    return monitor.measure(step)


def test_end_to_end_tensorboard(tmp_path):
    accelerator, model, optimizer, loader = _setup(tmp_path)
    probe = script.make_data(32, seed=2)
    monitor = watch(accelerator, model, optimizer, probe, every=5, criterion=torch.nn.CrossEntropyLoss())
    assert _train(accelerator, model, optimizer, loader) == 20
    accelerator.end_training()

    events = _events(tmp_path / "run")  # the loop's own run, not a second one
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 21))
    for tag in CURVATURE_TAGS:
        assert tag in tags, tag
        points = events.Scalars(tag)
        assert [e.step for e in points] == [5, 10, 15, 20], tag
        assert all(math.isfinite(e.value) for e in points), tag
    assert _layout(events) == ["curvature/lambda_max", "curvature/threshold", "curvature/batch_sharpness"]

    threshold = (2 + 2 * script.MOMENTUM) / script.LR
    assert all(e.value == pytest.approx(threshold, rel=1e-6) for e in events.Scalars("curvature/threshold"))
    logged = events.Scalars("curvature/lambda_max")[-1].value
    direct = _direct(accelerator.unwrap_model(model), probe, optimizer, 20)
    assert logged == pytest.approx(direct.lambda_max, rel=1e-3)
    assert logged == pytest.approx(monitor.history[-1].lambda_max, rel=1e-6)  # float32 in the event file
    ratio = events.Scalars("curvature/sharpness_ratio")[-1].value
    assert ratio == pytest.approx(direct.lambda_max / threshold, rel=1e-3)


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
    assert [e.step for e in _events(tmp_path / "run").Scalars("curvature/lambda_max")] == [5, 10, 15, 20]
    # the last measurement saw the weights after the last update
    direct = _direct(accelerator.unwrap_model(model), probe, optimizer, 20)
    assert monitor.history[-1].lambda_max == pytest.approx(direct.lambda_max, rel=1e-3)


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
    assert all(torch.equal(a, b.detach()) for a, b in zip(weights_at[10], accelerator.unwrap_model(model).parameters()))
    direct = _direct(accelerator.unwrap_model(model), script.make_data(32, seed=2), optimizer, 10)
    assert monitor.history[-1].lambda_max == pytest.approx(direct.lambda_max, rel=1e-3)


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
    direct = _direct(plain, probe, optimizer, 20)
    assert monitor.history[-1].lambda_max == pytest.approx(direct.lambda_max, rel=1e-3)
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
    assert [e.step for e in _events(tmp_path / "b" / "run").Scalars("curvature/lambda_max")] == [15, 20]


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
        return accelerator.unwrap_model(model), monitor, _events(tmp_path / where / "run")

    model, monitor, events = run("watched", True)
    plain, _, _ = run("plain", False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))  # training unchanged

    assert monitor.batch_size == 8  # the training loader's
    for tag in ("curvature/batch_sharpness", "curvature/batch_sharpness_stderr"):
        points = events.Scalars(tag)
        assert [e.step for e in points] == [5, 10, 15, 20], tag
        assert all(math.isfinite(e.value) and e.value > 0 for e in points), tag
    # 4 mini-batches per measurement in the loop's own order: step 20 used batches 12..15
    minibatches = list(shuffled())[12:16]
    reference = CurvatureMonitor(model, minibatches[0], criterion=torch.nn.CrossEntropyLoss(), trace=False,
                                 batch_size=8, minibatches=minibatches, batch_sharpness_batches=4, strict=True)
    expected = reference.measure(20)
    assert events.Scalars("curvature/batch_sharpness")[-1].value == pytest.approx(expected.batch_sharpness, rel=1e-5)
    assert events.Scalars("curvature/batch_sharpness_stderr")[-1].value == pytest.approx(
        expected.batch_sharpness_stderr, rel=1e-4)


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
    for a, b in zip(ranks[0]["history"], ranks[1]["history"]):   # the same Lanczos on both
        assert {**a, "seconds": 0} == {**b, "seconds": 0}

    events = _events(tmp_path / "tb" / "run")
    assert [e.step for e in events.Scalars("curvature/lambda_max")] == [5, 10, 15, 20]
    assert "train/loss" in events.Tags()["scalars"]
    assert _layout(events)[0] == "curvature/lambda_max"
    assert len(list((tmp_path / "tb").rglob("events.out.tfevents.*"))) == 1    # main process only

    final = torch.load(tmp_path / "final.pt")
    model = script.build_model()
    model.load_state_dict(final["state_dict"])
    optimizer = torch.optim.SGD(model.parameters(), lr=script.LR, momentum=script.MOMENTUM)
    direct = _direct(model, final["probe"], optimizer, 20)
    logged = ranks[0]["history"][-1]
    assert logged["lambda_max"] == pytest.approx(direct.lambda_max, rel=1e-3)
    assert logged["loss"] == pytest.approx(direct.loss, rel=1e-5)
    assert events.Scalars("curvature/lambda_max")[-1].value == pytest.approx(direct.lambda_max, rel=1e-3)


def test_probe_batch_split_by_process_index():
    from curvwatch.batch_sharpness import process_share

    x, y = script.make_data(12, seed=2)
    share = process_share((x, y), rank=1, world_size=3)
    assert torch.equal(share[0], x[4:8]) and torch.equal(share[1], y[4:8])
    assert process_share((x, y), 0, 1)[0] is x
    with pytest.raises(ValueError, match="12 examples.*5 processes"):
        process_share((x, y), rank=0, world_size=5)
