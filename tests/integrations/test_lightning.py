"""CurvatureCallback end to end with the real Lightning Trainer on CPU.

Every test trains for real, reads the TensorBoard event files back (through
``curvwatch.report.read_run``, see ``tests/_helpers.py``) and checks tags,
steps and values; reference values come from a direct
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

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger, TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from curvwatch import CurvatureError, CurvatureMonitor, CurvatureWarning  # noqa: E402
from curvwatch.integrations.lightning import CurvatureCallback  # noqa: E402
from tests._helpers import curves, direct, histogram_steps, sharpness_chart, steps  # noqa: E402

LR, MOMENTUM = 0.1, 0.9
HEAVY_BALL = (2 + 2 * MOMENTUM) / LR  # 38
STEPS, EVERY = 20, 5
DDP_SCRIPT = Path(__file__).parents[1] / "ddp_scripts" / "lightning_ddp.py"


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
    """Train with a TensorBoardLogger under ``root``; return (trainer, module, the logger's run directory)."""
    if module is None:
        torch.manual_seed(0)
        module = Classifier()
    if train is None:
        train, val = loaders()
    logger = kwargs.pop("logger", None) or TensorBoardLogger(str(root), name="tb", version=version)
    callbacks = callback if isinstance(callback, list) else [callback] if callback else []
    options = dict(
        max_steps=steps, logger=logger, callbacks=callbacks, accelerator="cpu", devices=1, log_every_n_steps=1,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer = pl.Trainer(**{**options, **kwargs})
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, module, getattr(trainer.loggers[0], "log_dir", None)


def last(run, tag: str) -> float:
    points = curves(run)[tag]
    return points[max(points)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """20 steps, every=5, probe = first validation batch (no validation has run before step 5)."""
    callback = CurvatureCallback(every=EVERY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, module, run = fit(tmp_path_factory.mktemp("uninterrupted"), callback)
    return callback, trainer, module, run, caught


def test_end_to_end_tensorboard(uninterrupted):
    callback, trainer, module, run, caught = uninterrupted
    assert not [w for w in caught if issubclass(w.category, CurvatureWarning)]
    assert trainer.global_step == STEPS
    scalars = curves(run)
    # same run (same event file) as the module's own loss curve
    assert "train_loss" in scalars
    curvature = [t for t in scalars if t.startswith("curvature/")]
    for tag in ("lambda_max", "lambda_1", "lambda_2", "trace", "threshold", "sharpness_ratio"):
        assert "curvature/" + tag in curvature
    assert sorted(scalars["curvature_diagnostics/hvps"]) == [5, 10, 15, 20]
    for tag in curvature:
        assert sorted(scalars[tag]) == [5, 10, 15, 20] or tag == "curvature/top_overlap"
        assert all(math.isfinite(v) for v in scalars[tag].values())
    assert sorted(scalars["curvature/top_overlap"]) == [10, 15, 20]
    # the custom-scalars chart: sharpness overlaid with the threshold
    chart = sharpness_chart(run)
    assert "curvature/lambda_max" in chart and "curvature/threshold" in chart


def test_last_lambda_max_equals_direct_measurement(uninterrupted):
    callback, trainer, module, run, _ = uninterrupted
    _, val = datasets()
    probe = (val.tensors[0][:32], val.tensors[1][:32])  # the first validation batch
    reference = direct(module, probe, trainer.optimizers[0])
    assert last(run, "curvature/lambda_max") == pytest.approx(reference.lambda_max, rel=1e-3)
    assert callback.monitor.history[-1].lambda_max == pytest.approx(reference.lambda_max, rel=1e-3)
    # heavy-ball threshold (2 + 2 beta) / lr at the current lr
    assert last(run, "curvature/threshold") == pytest.approx(HEAVY_BALL, rel=1e-6)
    assert last(run, "curvature/sharpness_ratio") == pytest.approx(reference.lambda_max / HEAVY_BALL, rel=1e-3)


def test_training_step_logging_is_muted(uninterrupted):
    # the probe's self.log calls must not overwrite the logged training loss
    callback, trainer, module, run, _ = uninterrupted
    logged = [value for _, value in sorted(curves(run)["train_loss"].items())]
    assert logged == pytest.approx(module.train_losses, rel=1e-6)
    assert "log" not in module.__dict__ and "log_dict" not in module.__dict__


def test_gradient_accumulation_measures_at_optimizer_steps(tmp_path):
    # 5 batches per epoch with accumulate_grad_batches=2: windows of 2, 2 and a short 1
    train, val = loaders(train_batch=32)
    callback = CurvatureCallback(every=EVERY)
    trainer, module, run = fit(tmp_path, callback, train=train, val=val, accumulate_grad_batches=2)
    assert trainer.global_step == STEPS
    assert len(module.train_losses) > STEPS  # micro-batches outnumber optimizer steps
    assert steps(run) == [5, 10, 15, 20]
    assert [r.step for r in callback.monitor.history] == [5, 10, 15, 20]


def test_manual_optimization_with_given_batch(tmp_path):
    _, val = datasets()
    probe = (val.tensors[0][:48], val.tensors[1][:48])
    callback = CurvatureCallback(every=EVERY, batch=probe, criterion=torch.nn.CrossEntropyLoss())
    torch.manual_seed(0)
    trainer, module, run = fit(tmp_path, callback, module=Classifier(manual=True))
    assert trainer.global_step == STEPS
    assert steps(run) == [5, 10, 15, 20]
    reference = direct(module, probe, trainer.optimizers[0])
    assert last(run, "curvature/lambda_max") == pytest.approx(reference.lambda_max, rel=1e-3)
    assert last(run, "curvature/threshold") == pytest.approx(HEAVY_BALL, rel=1e-6)


def test_manual_optimization_needs_a_loss(tmp_path):
    with pytest.raises(CurvatureError, match="manual optimization needs loss_fn"):
        fit(tmp_path, CurvatureCallback(every=EVERY), module=Classifier(manual=True))


def test_no_validation_data_uses_first_training_batch(tmp_path):
    train, _ = loaders(val=False)
    callback = CurvatureCallback(every=EVERY)
    trainer, module, run = fit(tmp_path, callback, train=train, val=None)
    x, y = datasets()[0].tensors
    reference = direct(module, (x[:16], y[:16]), trainer.optimizers[0])
    assert last(run, "curvature/lambda_max") == pytest.approx(reference.lambda_max, rel=1e-3)


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
    for a, b in zip(watched.parameters(), plain.parameters(), strict=True):
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
        return module, logger.log_dir

    start = _LoaderGeneratorAtStart()
    callback = CurvatureCallback(every=EVERY, trace=False, batch_sharpness=True, batch_sharpness_batches=4)
    (watched, log_dir), (plain, _) = run([start, callback], "watched"), run([], "plain")
    assert watched.train_losses == plain.train_losses
    assert all(torch.equal(a, b) for a, b in zip(watched.parameters(), plain.parameters(), strict=True))

    assert callback.monitor.batch_size == 16  # the training dataloader's
    for tag in ("curvature/batch_sharpness", "curvature/batch_sharpness_stderr"):
        values = curves(log_dir)[tag]
        assert sorted(values) == [5, 10, 15, 20]
        assert all(math.isfinite(v) and v > 0 for v in values.values())
    # 4 mini-batches per measurement, from passes over a private copy of the loader
    # (its generator as at train start): step 20 used batches 2..5 of the second pass
    copy = DataLoader(datasets()[0], batch_size=16, shuffle=True, generator=torch.Generator().set_state(start.state))
    second_pass = [batch for _ in range(2) for batch in copy][10:]
    reference = CurvatureMonitor(
        watched, second_pass[0], criterion=torch.nn.CrossEntropyLoss(), trace=False, batch_size=16,
        minibatches=second_pass[2:6], batch_sharpness_batches=4, strict=True,
    ).measure(20)
    assert last(log_dir, "curvature/batch_sharpness") == pytest.approx(reference.batch_sharpness, rel=1e-5)
    stderr = reference.batch_sharpness_stderr
    assert last(log_dir, "curvature/batch_sharpness_stderr") == pytest.approx(stderr, rel=1e-4)


def test_checkpoint_resume_keeps_schedule_and_warm_start(tmp_path, uninterrupted):
    first = CurvatureCallback(every=EVERY)
    trainer, _, run0 = fit(tmp_path, first, steps=10, version=0)
    assert steps(run0) == [5, 10]
    trainer.save_checkpoint(tmp_path / "ten.ckpt")

    resumed = CurvatureCallback(every=EVERY)
    trainer, module, run1 = fit(tmp_path, resumed, steps=STEPS, version=1, ckpt_path=str(tmp_path / "ten.ckpt"))
    assert trainer.global_step == STEPS
    assert steps(run1) == [15, 20]
    assert resumed.monitor.measurements == 4  # 2 restored + 2 new
    # the warm-start vector came through: step 15 reports its overlap with step 10's eigenvector
    assert steps(run1, "curvature/top_overlap") == [15, 20]
    # and the resumed run measures what the uninterrupted one did
    full, resumed_run = curves(uninterrupted[3])["curvature/lambda_max"], curves(run1)["curvature/lambda_max"]
    for step in (15, 20):
        assert resumed_run[step] == pytest.approx(full[step], rel=1e-4)


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
        trainer, module, run = fit(tmp_path, CurvatureCallback(every=EVERY, loss_fn=broken))
    assert trainer.global_step == STEPS
    assert len(module.train_losses) == STEPS
    assert steps(run) == []


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
    assert steps(log_dir) == [5, 10]
    assert "train_loss" in curves(log_dir)

    spec = importlib.util.spec_from_file_location("lightning_ddp_script", DDP_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    # a user's sink runs on process zero only, like the loggers
    assert ranks[0]["sink_steps"] == [5, 10] and ranks[1]["sink_steps"] == []
    # both ranks ran the same solver on the same averaged products
    assert [h["lambda_max"] for h in ranks[0]["history"]] == [h["lambda_max"] for h in ranks[1]["history"]]
    module = script.Classifier()
    module.load_state_dict(ranks[0]["state_dict"])
    optimizer = torch.optim.SGD(module.parameters(), lr=script.LR, momentum=script.MOMENTUM)
    reference = direct(module, script.whole_probe_batch(probe), optimizer)
    assert last(log_dir, "curvature/lambda_max") == pytest.approx(reference.lambda_max, rel=1e-3)
    assert last(log_dir, "curvature/threshold") == pytest.approx(HEAVY_BALL, rel=1e-6)


def test_spectrum_histogram_is_logged(tmp_path):
    _, _, run = fit(tmp_path, CurvatureCallback(every=EVERY, trace=False, spectrum_every=1), steps=10)
    assert histogram_steps(run) == [5, 10]


class _RejectingLogger(Logger):
    """A logger whose backend rejects the curvature values (and takes everything else)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    @property
    def name(self) -> str:
        return "rejecting"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        if any(key.startswith("curvature/") for key in metrics):
            raise RuntimeError("backend rejected the point")
        self.steps.append(step)


def test_a_failing_logger_is_one_warning_and_the_other_loggers_still_get_the_points(tmp_path):
    rejecting, tensorboard = _RejectingLogger(), TensorBoardLogger(str(tmp_path), name="tb", version=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, module, _ = fit(tmp_path, CurvatureCallback(every=EVERY), logger=[rejecting, tensorboard])
    assert trainer.global_step == STEPS and len(module.train_losses) == STEPS
    messages = [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)]
    assert len(messages) == 1, messages
    assert "_RejectingLogger failed" in messages[0] and "backend rejected the point" in messages[0]
    assert steps(tensorboard.log_dir) == [5, 10, 15, 20]
    assert rejecting.steps  # the Trainer's own values still reach it

    with pytest.raises(RuntimeError, match="backend rejected the point"):
        fit(tmp_path / "strict", CurvatureCallback(every=EVERY, strict=True), logger=_RejectingLogger())


def test_values_reach_callback_metrics_for_early_stopping_and_checkpointing(tmp_path):
    callback = CurvatureCallback(every=EVERY)
    stop = EarlyStopping(monitor="curvature/sharpness_ratio", mode="min", patience=100)
    best = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="curvature/sharpness_ratio", mode="min")
    trainer, _, run = fit(tmp_path, [callback, stop, best], enable_checkpointing=True)
    assert trainer.global_step == STEPS  # validation at steps 10 and 20 found the metric
    logged = curves(run)
    assert float(trainer.callback_metrics["curvature/lambda_max"]) == pytest.approx(logged["curvature/lambda_max"][20])
    ratios = logged["curvature/sharpness_ratio"]
    assert float(best.best_model_score) == pytest.approx(min(ratios[10], ratios[20]), rel=1e-6)
    assert float(stop.best_score) == pytest.approx(min(ratios[10], ratios[20]), rel=1e-6)


def test_two_callbacks_in_one_trainer_keep_their_own_state(tmp_path):
    often, rarely = CurvatureCallback(every=EVERY), CurvatureCallback(every=2 * EVERY, top_k=1)
    assert often.state_key != rarely.state_key
    trainer, _, _ = fit(tmp_path, [often, rarely], steps=10)
    assert [r.step for r in often.monitor.history] == [5, 10]
    assert [r.step for r in rarely.monitor.history] == [10]
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=False)["callbacks"]
    assert saved[often.state_key]["monitor"]["measurements"] == 2
    assert saved[rarely.state_key]["monitor"]["measurements"] == 1


class _Scheduled(Classifier):
    """SGD with a per-step linear decay: update k (1-based) runs at lr * (1 - (k - 1) / STEPS)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / STEPS)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def test_threshold_uses_the_lr_of_the_measured_update(tmp_path):
    torch.manual_seed(0)
    trainer, module, run = fit(tmp_path, CurvatureCallback(every=EVERY, trace=False), module=_Scheduled())
    threshold = curves(run)["curvature/threshold"]
    assert sorted(threshold) == [5, 10, 15, 20]  # lr 0 after the last update: still a finite threshold
    for step, value in threshold.items():
        assert value == pytest.approx(HEAVY_BALL / (1 - (step - 1) / STEPS), rel=1e-6)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # the scheduler's value is back


def test_pytorch_lightning_package_gets_the_chart(tmp_path):
    legacy = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.loggers import TensorBoardLogger as LegacyTensorBoardLogger

    class Legacy(legacy.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    torch.manual_seed(0)
    logger = LegacyTensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = legacy.Trainer(
        max_steps=10, logger=logger, callbacks=[CurvatureCallback(every=EVERY)], accelerator="cpu", devices=1,
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(Legacy(), loaders(val=False)[0])
    assert steps(logger.log_dir) == [5, 10]
    assert sharpness_chart(logger.log_dir)[:2] == ["curvature/lambda_max", "curvature/threshold"]
