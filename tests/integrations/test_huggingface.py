"""CurvatureTrainerCallback end to end with the real transformers Trainer (CPU).

A tiny GPT-2 built from a config (default attention: SDPA), random token
datasets, 20 optimizer steps with ``every=5``; the TensorBoard event files the
Trainer writes (and the other trackers' files) are read back through
``tests/_helpers.py``.
"""

from __future__ import annotations

import json
import math
import random
import warnings

import numpy
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorboard")

from transformers import (  # noqa: E402
    AttentionInterface,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from curvwatch import Budget, CurvatureError, CurvatureMonitor, CurvatureWarning  # noqa: E402
from curvwatch.integrations.huggingface import CurvatureTrainerCallback  # noqa: E402
from tests._helpers import curves, event_files, read_mlflow, read_wandb, sharpness_chart, wandb_curves  # noqa: E402

STEPS, EVERY, LR = 20, 5, 1e-3
MEASURED = [5, 10, 15, 20]


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences as causal-LM examples (``labels = input_ids``)."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 128, (n, 32), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(**config) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=32,
        bos_token_id=0, eos_token_id=0, **config,
    )
    return GPT2LMHeadModel(config)


def train(tmp_path, callbacks, eval_dataset=True, model=None, resume=None, **overrides):
    args = dict(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, learning_rate=LR, lr_scheduler_type="linear",
        report_to="tensorboard", logging_steps=EVERY, use_cpu=True, disable_tqdm=True,
        save_strategy="no", dataloader_num_workers=0, seed=0,
    )
    args.update(overrides)
    trainer = Trainer(
        model=model if model is not None else tiny_gpt2(),
        args=TrainingArguments(**args),
        train_dataset=TokenDataset(160, seed=1),
        eval_dataset=TokenDataset(16, seed=2) if eval_dataset else None,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def trainer_run(output_dir) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the one TensorBoard event file the Trainer wrote."""
    files = event_files(output_dir)
    assert len(files) == 1, f"expected the Trainer's one event file, found {files}"
    return curves(output_dir)


def test_curves_land_in_the_trainers_run_with_adamw_and_a_linear_schedule(tmp_path):
    callback = CurvatureTrainerCallback(every=EVERY)
    trainer = train(tmp_path, [callback])
    model = trainer.model
    assert model.config._attn_implementation == "sdpa"  # the default, fused on CPU
    run = trainer_run(tmp_path)

    # beside the Trainer's own loss, in the same event file, at the optimizer steps
    assert sorted(run["train/loss"]) == MEASURED
    for tag in ("curvature/lambda_max", "curvature/lambda_1", "curvature/lambda_2", "curvature/trace",
                "curvature/preconditioned_lambda_max", "curvature/sharpness_ratio", "curvature_diagnostics/hvps"):
        values = run[tag]
        assert sorted(values) == MEASURED, tag
        assert all(math.isfinite(v) for v in values.values()), tag
    lam = run["curvature/lambda_max"]
    assert all(v > 0 for v in lam.values())

    # AdamW: 38 / lr at the lr of the measured update (linear decay: update k ran at LR (1 - (k-1)/STEPS))
    threshold = run["curvature/threshold"]
    assert sorted(threshold) == MEASURED
    for step, value in threshold.items():
        assert value == pytest.approx(38 / (LR * (1 - (step - 1) / STEPS)), rel=1e-5)
    ratio = run["curvature/sharpness_ratio"]
    pre = run["curvature/preconditioned_lambda_max"]
    for step in MEASURED:
        assert ratio[step] == pytest.approx(pre[step] / threshold[step], rel=1e-5)
    assert "curvature/batch_sharpness" not in run

    # the custom-scalars chart, written once, overlays the preconditioned sharpness
    assert sharpness_chart(tmp_path)[:2] == ["curvature/preconditioned_lambda_max", "curvature/threshold"]

    # the probe batch: the first evaluation batch through the Trainer's collator
    probe = default_data_collator([trainer.eval_dataset[i] for i in range(8)])
    assert set(callback.monitor.batch) == {"input_ids", "labels"}
    assert torch.equal(callback.monitor.batch["input_ids"], probe["input_ids"])

    # the last logged point equals a direct measurement on the final weights
    direct = CurvatureMonitor(model, probe, optimizer=trainer.optimizer, strict=True).measure(STEPS)
    assert direct.converged
    assert lam[20] == pytest.approx(direct.lambda_max, rel=1e-3)
    assert pre[20] == pytest.approx(direct.preconditioned_lambda_max, rel=1e-2)
    assert [r.step for r in callback.monitor.history] == MEASURED



class _StepGradients(TrainerCallback):
    """The gradients of each update, read between ``optimizer.step()`` and the Trainer's ``zero_grad()``."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = [p.grad.detach().clone() for p in model.parameters()]


def test_sgd_update_sharpness_along_the_gradient_the_trainer_cleared(tmp_path):
    """``optim="sgd"``: the update is the step's gradient, gone (``zero_grad()``) before ``on_step_end``."""
    # no time share: the first measurement under one learns a product's cost and skips the update sharpness
    callback, step_gradients = CurvatureTrainerCallback(every=EVERY, budget=Budget(overhead=None)), _StepGradients()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(tmp_path, [callback, step_gradients], optim="sgd", report_to="none")
    assert type(trainer.optimizer.optimizer) is torch.optim.SGD and trainer.optimizer.param_groups[0]["momentum"] == 0
    assert not [w for w in caught if "update sharpness" in str(w.message)]
    history = callback.monitor.history
    assert [r.step for r in history] == MEASURED
    assert all(math.isfinite(r.update_sharpness) for r in history)  # NaN at every one before
    assert all(p.grad is None for p in trainer.model.parameters())  # training's state as the Trainer left it

    # u = g of the 20th update: u^T H u / u^T u on the probe batch at the final weights
    from curvwatch.guard import measurement_guard

    model, params, u = trainer.model, list(trainer.model.parameters()), step_gradients.grads
    with measurement_guard(model):
        loss = model(**callback.monitor.batch).loss
        gradient = torch.autograd.grad(loss, params, create_graph=True)
        hu = torch.autograd.grad(gradient, params, grad_outputs=u)
    expected = sum((a * b).sum() for a, b in zip(u, hu)) / sum((a * a).sum() for a in u)
    assert history[-1].update_sharpness == pytest.approx(expected.item(), rel=1e-4)


def test_gradient_accumulation_measures_at_optimizer_steps(tmp_path):
    callback = CurvatureTrainerCallback(every=EVERY, trace=False)
    trainer = train(tmp_path, [callback], gradient_accumulation_steps=2)
    assert trainer.state.global_step == STEPS
    run = trainer_run(tmp_path)
    assert sorted(run["train/loss"]) == MEASURED
    assert sorted(run["curvature/lambda_max"]) == MEASURED
    assert [r.step for r in callback.monitor.history] == MEASURED
    assert "curvature/trace" not in run


def test_measuring_leaves_training_bit_exact_and_probes_the_first_training_batch(tmp_path):
    plain = train(tmp_path / "plain", None, eval_dataset=False, report_to="none", max_steps=10)
    callback = CurvatureTrainerCallback(every=EVERY, trace=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = train(tmp_path / "watched", [callback], eval_dataset=False, report_to="none", max_steps=10)
    assert any(
        issubclass(w.category, CurvatureWarning) and "reports to no tracker" in str(w.message)
        for w in caught
    )
    assert [r.step for r in callback.monitor.history] == [5, 10]
    # no eval dataset: a training batch of the Trainer's batch size, through its collator
    assert callback.monitor.batch["input_ids"].shape == (8, 32)
    rows = {tuple(row.tolist()) for row in watched.train_dataset.ids}
    assert all(tuple(row.tolist()) in rows for row in callback.monitor.batch["input_ids"])
    # fetching the probe batch and measuring changed neither data order, RNG nor weights
    for (name, a), b in zip(plain.model.named_parameters(), watched.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not event_files(tmp_path)
    # the values are in the Trainer's log history all the same
    logged = [e for e in watched.state.log_history if "curvature/lambda_max" in e]
    assert [e["step"] for e in logged] == [5, 10]


class RandomWindowCollator:
    """Causal-LM batches of random 24-token windows; the offset comes from Python's and NumPy's global RNGs."""

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        start = random.randrange(5) + int(numpy.random.randint(4))
        ids = torch.stack([example["input_ids"] for example in examples])[:, start : start + 24]
        return {"input_ids": ids, "labels": ids.clone()}


def test_batch_sharpness_on_training_minibatches_leaves_training_bit_exact(tmp_path):
    def run(callbacks, where):
        args = TrainingArguments(
            output_dir=str(tmp_path / where), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=LR,
            report_to="tensorboard", logging_steps=EVERY, use_cpu=True, disable_tqdm=True, save_strategy="no",
            dataloader_num_workers=0, seed=0,
        )
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=TokenDataset(160, seed=1),
                          data_collator=RandomWindowCollator(), callbacks=callbacks)
        trainer.train()
        return trainer

    callback = CurvatureTrainerCallback(every=EVERY, trace=False, batch_sharpness=True, batch_sharpness_batches=4)
    watched, plain = run([callback], "watched"), run(None, "plain")
    # drawing the mini-batches (shuffled sampler, collator on Python/NumPy RNGs) left training as it was
    for (name, a), b in zip(plain.model.named_parameters(), watched.model.parameters(), strict=True):
        assert torch.equal(a, b), name

    assert callback.monitor.batch_size == watched.args.per_device_train_batch_size == 8
    run_events = trainer_run(tmp_path / "watched")
    value = run_events["curvature/batch_sharpness"]
    stderr = run_events["curvature/batch_sharpness_stderr"]
    assert sorted(value) == sorted(stderr) == MEASURED
    assert all(math.isfinite(v) for v in value.values())
    assert all(math.isfinite(v) and v > 0 for v in stderr.values())  # different mini-batches, not one batch
    assert [r.batch_sharpness for r in callback.monitor.history] == pytest.approx([value[s] for s in MEASURED])
    # the mini-batches are training batches through the Trainer's collator
    drawn = next(iter(callback.monitor.minibatches))["input_ids"]
    windows = {tuple(row[s : s + 24].tolist()) for row in watched.train_dataset.ids for s in range(9)}
    assert drawn.shape == (8, 24) and all(tuple(row.tolist()) in windows for row in drawn)


class _NoDerivative(torch.autograd.Function):
    """Identity whose own backward is missing, like a fused kernel's backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("derivative for fused_attention_backward is not implemented")


class _FusedKernel(torch.autograd.Function):
    """Identity with a first derivative but no second one (no double backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return _NoDerivative.apply(grad)


def _fused_attention(module, query, key, value, attention_mask, **kwargs):
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _FusedKernel.apply(out), weights


@pytest.mark.filterwarnings("ignore:curvwatch. no optimizer given")
def test_fused_attention_without_double_backward_is_switched_to_eager(tmp_path):
    AttentionInterface.register("curvwatch_fused_test", _fused_attention)
    model = tiny_gpt2()
    model.set_attn_implementation("curvwatch_fused_test")
    probe = default_data_collator([TokenDataset(16, seed=2)[i] for i in range(8)])
    with pytest.raises(CurvatureError, match="second derivative"):
        CurvatureMonitor(model, probe, method="double_backward", strict=True).measure(0)

    callback = CurvatureTrainerCallback(every=EVERY, trace=False, method="double_backward", strict=True)
    trainer = train(tmp_path, [callback], model=model, max_steps=10)
    assert [r.method for r in callback.monitor.history] == ["double_backward"] * 2
    assert trainer.model.config._attn_implementation == "curvwatch_fused_test"  # switched back
    lam = trainer_run(tmp_path)["curvature/lambda_max"]
    assert sorted(lam) == [5, 10]
    trainer.model.set_attn_implementation("eager")
    direct = CurvatureMonitor(trainer.model, probe, strict=True, trace=False).measure(10)
    assert lam[10] == pytest.approx(direct.lambda_max, rel=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"every": 2.5}, "every must be a positive integer"),
        ({"loss_fn": lambda m, b: m(**b).loss, "criterion": torch.nn.MSELoss()}, "not both"),
        ({"optimizer": None}, "set by the callback"),
        ({"top_kk": 3}, "unknown CurvatureMonitor options"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs, message):
    with pytest.raises(CurvatureError, match=message):
        CurvatureTrainerCallback(**kwargs)


@pytest.mark.filterwarnings("ignore:curvwatch. the Trainer reports to no tracker")
def test_resume_from_checkpoint_keeps_schedule_and_warm_start(tmp_path):
    full = CurvatureTrainerCallback(every=EVERY, trace=False)
    train(tmp_path / "full", [full], report_to="none")
    first = CurvatureTrainerCallback(every=EVERY, trace=False)
    train(tmp_path / "first", [first], report_to="none", save_strategy="steps", save_steps=10)
    checkpoint = tmp_path / "first" / "checkpoint-10"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["CurvatureTrainerCallback"]["attributes"]["_resume"]["measurements"] == 2
    assert (checkpoint / "curvwatch-rank0.pt").is_file()

    resumed = CurvatureTrainerCallback(every=EVERY, trace=False)
    train(tmp_path / "resumed", [resumed], report_to="none", resume=str(checkpoint))
    assert [r.step for r in resumed.monitor.history] == [15, 20]
    assert resumed.monitor.measurements == 4  # 2 restored + 2 new
    # the warm-start vector came through: step 15 reports its overlap with step 10's eigenvector
    assert math.isfinite(resumed.monitor.history[0].top_overlap)
    # and the resumed run measures what the uninterrupted one did, from the same warm start
    for got, expected in zip(resumed.monitor.history, full.monitor.history[2:], strict=True):
        assert got.lambda_max == pytest.approx(expected.lambda_max, rel=1e-5)
        assert got.hvps == expected.hvps


class _RejectingTracker(TrainerCallback):
    """A reporting integration whose backend rejects curvature values."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if any(key.startswith("curvature/") for key in logs):
            raise RuntimeError("backend rejected the point")
        self.steps.append(state.global_step)


@pytest.mark.slow
def test_curves_reach_every_tracker_and_the_log_history_next_to_the_loss(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "curvwatch")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store: plain files to read back
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.teardown()  # wandb keeps its settings (the run directory) from an earlier test's run
    rejecting = _RejectingTracker()
    callback = CurvatureTrainerCallback(every=EVERY, trace=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = train(tmp_path / "out", [callback, rejecting], report_to=["tensorboard", "mlflow", "wandb"])
    measured = {r.step: r.lambda_max for r in callback.monitor.history}
    assert sorted(measured) == MEASURED

    # the Trainer's own loss entries are all there, and one curvature entry per measurement
    history = trainer.state.log_history
    assert [e["step"] for e in history if "loss" in e] == MEASURED
    entries = {e["step"]: e["curvature/lambda_max"] for e in history if "curvature/lambda_max" in e}
    assert entries == measured

    # TensorBoard, MLflow and wandb: the same values at the same steps as the loss
    tensorboard = trainer_run(tmp_path / "out")
    assert tensorboard["curvature/lambda_max"] == pytest.approx(measured, rel=1e-6)
    assert sorted(tensorboard["train/loss"]) == MEASURED
    mlflow = read_mlflow(tmp_path / "mlruns")
    assert mlflow["curvature/lambda_max"] == pytest.approx(measured, rel=1e-12)
    assert sorted(mlflow["loss"]) == MEASURED
    import wandb as wandb_module

    wandb_module.finish()  # the Trainer leaves the run open; its file is complete once finished
    wandb = wandb_curves(read_wandb(tmp_path), x="train/global_step")
    assert wandb["train/curvature/lambda_max"] == pytest.approx(measured, rel=1e-12)
    assert sorted(wandb["train/loss"]) == MEASURED

    # a tracker that rejects the values: one warning, the others unaffected
    messages = [str(w.message) for w in caught if issubclass(w.category, CurvatureWarning)]
    messages = [m for m in messages if " failed (" in m]  # sink and tracker failures (not the curvature's notes)
    assert len(messages) == 1 and "_RejectingTracker failed" in messages[0], messages
    assert rejecting.steps  # the Trainer's own logs still reach it
