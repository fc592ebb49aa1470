"""CurvatureCallback end to end with the real Lightning Trainer on CPU.

Every test trains for real, reads the TensorBoard event files back and checks
tags, steps and values; reference values come from a direct
``CurvatureMonitor.measure`` on the same weights and probe batch.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("tensorboard")

from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from curvwatch import CurvatureError, CurvatureMonitor, CurvatureWarning  # noqa: E402
from curvwatch.integrations.lightning import CurvatureCallback  # noqa: E402

LR, MOMENTUM = 0.1, 0.9
HEAVY_BALL = (2 + 2 * MOMENTUM) / LR  # 38
STEPS, EVERY = 20, 5
DDP_SCRIPT = Path(__file__).parent / "ddp_scripts" / "lightning_ddp.py"


class Classifier(pl.LightningModule):
    """Tanh MLP, cross-entropy, SGD with heavy-ball momentum; records its real training losses."""

    def __init__(self, dropout: float = 0.0, manual: bool = False) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 3)
        )
        self.automatic_optimization = not manual
        self.train_losses: list[float] = []  # Lightning's own calls (train mode; probes run in eval mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        if self.training:
            self.train_losses.append(loss.item())
        self.log("train_loss", loss)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def datasets() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(224, 8, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(1)
    return TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:])


def loaders(train_batch: int = 16, shuffle: bool = False, val: bool = True):
    train, valid = datasets()
    return DataLoader(train, batch_size=train_batch, shuffle=shuffle), (
        DataLoader(valid, batch_size=32) if val else None
    )


def fit(root, callback, module=None, steps=STEPS, version=0, train=None, val=None, ckpt_path=None, **kwargs):
    """Train with a TensorBoardLogger under ``root``; return (trainer, module, event accumulator)."""
    if module is None:
        torch.manual_seed(0)
        module = Classifier()
    if train is None:
        train, val = loaders()
    logger = TensorBoardLogger(str(root), name="tb", version=version)
    trainer = pl.Trainer(
        max_steps=steps, logger=logger, callbacks=[callback] if callback else [], accelerator="cpu",
        devices=1, log_every_n_steps=1, num_sanity_val_steps=0, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, **kwargs,
    )
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, module, events(logger.log_dir)


def events(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def steps_of(acc: EventAccumulator, tag: str = "curvature/lambda_max") -> list[int]:
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def last(acc: EventAccumulator, tag: str) -> float:
    return acc.Scalars(tag)[-1].value


def direct(module, batch, optimizer=None):
    """A fresh, cold-started measurement on the module's current weights."""
    monitor = CurvatureMonitor(module, batch, criterion=torch.nn.CrossEntropyLoss(), optimizer=optimizer)
    return monitor.measure()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """20 steps, every=5, probe = first validation batch (no validation has run before step 5)."""
    callback = CurvatureCallback(every=EVERY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, module, acc = fit(tmp_path_factory.mktemp("uninterrupted"), callback)
    return callback, trainer, module, acc, caught


def test_end_to_end_tensorboard(uninterrupted):
    callback, trainer, module, acc, caught = uninterrupted
    assert not [w for w in caught if issubclass(w.category, CurvatureWarning)]
    assert trainer.global_step == STEPS
    scalars = acc.Tags()["scalars"]
    # same run (same event file) as the module's own loss curve
    assert "train_loss" in scalars
    curvature = [t for t in scalars if t.startswith("curvature/")]
    for tag in ("lambda_max", "lambda_1", "lambda_2", "trace", "threshold", "sharpness_ratio", "hvps"):
        assert "curvature/" + tag in curvature
    for tag in curvature:
        assert steps_of(acc, tag) == [5, 10, 15, 20] or tag == "curvature/top_overlap"
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag))
    assert steps_of(acc, "curvature/top_overlap") == [10, 15, 20]
    # the custom-scalars chart: sharpness overlaid with the threshold
    from tensorboard.plugins.custom_scalar import layout_pb2

    config = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    charts = layout_pb2.Layout.FromString(config).category[0].chart
    assert "curvature/lambda_max" in charts[0].multiline.tag and "curvature/threshold" in charts[0].multiline.tag


def test_last_lambda_max_equals_direct_measurement(uninterrupted):
    callback, trainer, module, acc, _ = uninterrupted
    _, val = datasets()
    probe = (val.tensors[0][:32], val.tensors[1][:32])  # the first validation batch
    reference = direct(module, probe, trainer.optimizers[0])
    assert last(acc, "curvature/lambda_max") == pytest.approx(reference.lambda_max, rel=1e-3)
    assert callback.monitor.history[-1].lambda_max == pytest.approx(reference.lambda_max, rel=1e-3)
    # heavy-ball threshold (2 + 2 beta) / lr at the current lr
    assert last(acc, "curvature/threshold") == pytest.approx(HEAVY_BALL, rel=1e-6)
    assert last(acc, "curvature/sharpness_ratio") == pytest.approx(reference.lambda_max / HEAVY_BALL, rel=1e-3)


def test_training_step_logging_is_muted(uninterrupted):
    # the probe's self.log calls must not overwrite the logged training loss
    callback, trainer, module, acc, _ = uninterrupted
    logged = [e.value for e in acc.Scalars("train_loss")]
    assert logged == pytest.approx(module.train_losses, rel=1e-6)
    assert "log" not in module.__dict__ and "log_dict" not in module.__dict__


def test_gradient_accumulation_measures_at_optimizer_steps(tmp_path):
    # 5 batches per epoch with accumulate_grad_batches=2: windows of 2, 2 and a short 1
    train, val = loaders(train_batch=32)
    callback = CurvatureCallback(every=EVERY)
    trainer, module, acc = fit(tmp_path, callback, train=train, val=val, accumulate_grad_batches=2)
    assert trainer.global_step == STEPS
    assert len(module.train_losses) > STEPS  # micro-batches outnumber optimizer steps
    assert steps_of(acc) == [5, 10, 15, 20]
    assert [r.step for r in callback.monitor.history] == [5, 10, 15, 20]


def test_manual_optimization_with_given_batch(tmp_path):
    _, val = datasets()
    probe = (val.tensors[0][:48], val.tensors[1][:48])
    callback = CurvatureCallback(every=EVERY, batch=probe, criterion=torch.nn.CrossEntropyLoss())
    torch.manual_seed(0)
    trainer, module, acc = fit(tmp_path, callback, module=Classifier(manual=True))
    assert trainer.global_step == STEPS
    assert steps_of(acc) == [5, 10, 15, 20]
    reference = direct(module, probe, trainer.optimizers[0])
    assert last(acc, "curvature/lambda_max") == pytest.approx(reference.lambda_max, rel=1e-3)
    assert last(acc, "curvature/threshold") == pytest.approx(HEAVY_BALL, rel=1e-6)


def test_manual_optimization_needs_a_loss(tmp_path):
    with pytest.raises(CurvatureError, match="manual optimization needs loss_fn"):
        fit(tmp_path, CurvatureCallback(every=EVERY), module=Classifier(manual=True))


def test_no_validation_data_uses_first_training_batch(tmp_path):
    train, _ = loaders(val=False)
    callback = CurvatureCallback(every=EVERY)
    trainer, module, acc = fit(tmp_path, callback, train=train, val=None)
    x, y = datasets()[0].tensors
    reference = direct(module, (x[:16], y[:16]), trainer.optimizers[0])
    assert last(acc, "curvature/lambda_max") == pytest.approx(reference.lambda_max, rel=1e-3)


def test_measuring_does_not_change_training(tmp_path):
    # dropout and a shuffled loader: the probe fetch and the measurements consume no randomness
    def run(callback, where):
        torch.manual_seed(0)
        module = Classifier(dropout=0.3)
        train, _ = loaders(shuffle=True, val=False)
        torch.manual_seed(123)
        fit(tmp_path / where, callback, module=module, train=train, val=None)
        return module

    watched, plain = run(CurvatureCallback(every=EVERY), "watched"), run(None, "plain")
    assert watched.train_losses == plain.train_losses
    for a, b in zip(watched.parameters(), plain.parameters()):
        assert torch.equal(a, b)


class _LoaderGeneratorAtStart(pl.Callback):
    """Records the training loader's own generator state when training starts."""

    def on_train_start(self, trainer, pl_module):
        self.state = trainer.train_dataloader.generator.get_state()


@pytest.mark.filterwarnings("ignore:curvwatch. no optimizer given")  # the reference monitor
def test_batch_sharpness_on_training_minibatches(tmp_path):
    # shuffled by the loader's own generator, dropout in training: drawing the
    # mini-batches consumes neither that generator nor the global random states
    def run(callbacks, where):
        torch.manual_seed(0)
        module = Classifier(dropout=0.3)
        train = DataLoader(datasets()[0], batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7))
        logger = TensorBoardLogger(str(tmp_path / where), name="tb", version=0)
        pl.Trainer(
            max_steps=STEPS, logger=logger, callbacks=callbacks, accelerator="cpu", devices=1, log_every_n_steps=1,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        ).fit(module, train)
        return module, events(logger.log_dir)

    start = _LoaderGeneratorAtStart()
    callback = CurvatureCallback(every=EVERY, trace=False, batch_sharpness=True, batch_sharpness_batches=4)
    (watched, acc), (plain, _) = run([start, callback], "watched"), run([], "plain")
    assert watched.train_losses == plain.train_losses
    assert all(torch.equal(a, b) for a, b in zip(watched.parameters(), plain.parameters()))

    assert callback.monitor.batch_size == 16  # the training dataloader's
    for tag in ("curvature/batch_sharpness", "curvature/batch_sharpness_stderr"):
        assert steps_of(acc, tag) == [5, 10, 15, 20]
        assert all(math.isfinite(e.value) and e.value > 0 for e in acc.Scalars(tag))
    # 4 mini-batches per measurement, from passes over a private copy of the loader
    # (its generator as at train start): step 20 used batches 2..5 of the second pass
    copy = DataLoader(datasets()[0], batch_size=16, shuffle=True, generator=torch.Generator().set_state(start.state))
    second_pass = [batch for _ in range(2) for batch in copy][10:]
    reference = CurvatureMonitor(
        watched, second_pass[0], criterion=torch.nn.CrossEntropyLoss(), trace=False, batch_size=16,
        minibatches=second_pass[2:6], batch_sharpness_batches=4, strict=True,
    ).measure(20)
    assert last(acc, "curvature/batch_sharpness") == pytest.approx(reference.batch_sharpness, rel=1e-5)
    assert last(acc, "curvature/batch_sharpness_stderr") == pytest.approx(reference.batch_sharpness_stderr, rel=1e-4)


def test_checkpoint_resume_keeps_schedule_and_warm_start(tmp_path, uninterrupted):
    first = CurvatureCallback(every=EVERY)
    trainer, _, acc0 = fit(tmp_path, first, steps=10, version=0)
    assert steps_of(acc0) == [5, 10]
    trainer.save_checkpoint(tmp_path / "ten.ckpt")

    resumed = CurvatureCallback(every=EVERY)
    trainer, module, acc1 = fit(tmp_path, resumed, steps=STEPS, version=1, ckpt_path=str(tmp_path / "ten.ckpt"))
    assert trainer.global_step == STEPS
    assert steps_of(acc1) == [15, 20]
    assert resumed.monitor.measurements == 4  # 2 restored + 2 new
    # the warm-start vector came through: step 15 reports its overlap with step 10's eigenvector
    assert steps_of(acc1, "curvature/top_overlap") == [15, 20]
    # and the resumed run measures what the uninterrupted one did
    full = uninterrupted[3]
    for step in (15, 20):
        expected = next(e.value for e in full.Scalars("curvature/lambda_max") if e.step == step)
        got = next(e.value for e in acc1.Scalars("curvature/lambda_max") if e.step == step)
        assert got == pytest.approx(expected, rel=1e-4)


def test_no_logger_is_an_error_at_train_start(tmp_path):
    torch.manual_seed(0)
    train, val = loaders()
    trainer = pl.Trainer(
        max_steps=2, logger=False, callbacks=[CurvatureCallback(every=1)], accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    with pytest.raises(MisconfigurationException, match="no logger"):
        trainer.fit(Classifier(), train, val)


def test_failed_measurement_warns_and_training_continues(tmp_path):
    def broken(module, batch):
        raise RuntimeError("probe exploded")

    with pytest.warns(CurvatureWarning, match="probe exploded"):
        trainer, module, acc = fit(tmp_path, CurvatureCallback(every=EVERY, loss_fn=broken))
    assert trainer.global_step == STEPS
    assert len(module.train_losses) == STEPS
    assert steps_of(acc) == []


@pytest.mark.parametrize("bad", [{"every": 0}, {"every": 2.5}, {"colour": "red"}, {"optimizer": None},
                                 {"loss_fn": lambda m, b: 0, "criterion": torch.nn.MSELoss()}])
def test_bad_arguments_are_rejected_at_construction(bad):
    with pytest.raises(CurvatureError):
        CurvatureCallback(**bad)


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["val", "batch"])
def test_ddp_two_processes_equal_one_process_on_the_whole_probe_batch(tmp_path, probe):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(DDP_SCRIPT), "--out", str(tmp_path), "--probe", probe, "--steps", "10"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    log_dir = tmp_path / "tb" / "version_0"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # rank 0 writes, rank 1 does not
    acc = events(log_dir)
    assert steps_of(acc) == [5, 10]
    assert "train_loss" in acc.Tags()["scalars"]

    spec = importlib.util.spec_from_file_location("lightning_ddp_script", DDP_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    # both ranks ran the same solver on the same averaged products
    assert [h["lambda_max"] for h in ranks[0]["history"]] == [h["lambda_max"] for h in ranks[1]["history"]]
    module = script.Classifier()
    module.load_state_dict(ranks[0]["state_dict"])
    optimizer = torch.optim.SGD(module.parameters(), lr=script.LR, momentum=script.MOMENTUM)
    reference = direct(module, script.whole_probe_batch(probe), optimizer)
    assert last(acc, "curvature/lambda_max") == pytest.approx(reference.lambda_max, rel=1e-3)
    assert last(acc, "curvature/threshold") == pytest.approx(HEAVY_BALL, rel=1e-6)
