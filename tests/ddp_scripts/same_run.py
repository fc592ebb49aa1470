"""One scripted run under Lightning, transformers or Accelerate (one process, CPU).

Run by ``tests/integrations/test_accelerate.py`` once per framework:

    python tests/ddp_scripts/same_run.py --framework lightning|transformers|accelerate --out DIR

Every framework trains the same model (a seeded tanh MLP whose forward returns
``{"loss", "logits"}``) on the same data in the same order (no shuffling, 16
examples per batch) with the same optimizer (SGD, heavy-ball momentum 0.9) and
schedule (per-update linear decay, ``LambdaLR``) for ``STEPS`` updates, and
watches it with ``every=EVERY`` on the same probe batch and loss. Each logs to
TensorBoard under ``DIR/tb`` and to one other tracker: Lightning to a
``CSVLogger`` (``DIR/csv``), transformers to an MLflow file store
(``DIR/mlruns``), Accelerate to wandb offline (``DIR/wandb``). ``DIR/result.json``
holds the measured results and the final weights' checksum.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

STEPS, EVERY, LR, MOMENTUM, BATCH = 20, 5, 0.1, 0.9, 16


class Net(torch.nn.Module):
    """Tanh MLP; ``forward(x, labels)`` returns the loss like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class Examples(torch.utils.data.Dataset):
    """``{"x", "labels"}`` examples from two linear boundaries."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.labels = (self.x[:, 0] > 0).long() + (self.x[:, 1] + 0.5 * self.x[:, 2] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.labels[i]}


def train_data() -> Examples:
    return Examples(STEPS * BATCH, seed=1)  # one epoch of STEPS batches


def probe() -> dict[str, torch.Tensor]:
    held_out = Examples(32, seed=2)
    return {"x": held_out.x, "labels": held_out.labels}


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch)["loss"]


def optimizer_and_schedule(model: torch.nn.Module):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / STEPS)


def lightning(out: str):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from curvwatch import Budget
    from curvwatch.integrations.lightning import CurvatureCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def forward(self, **batch):
            return self.net(**batch)

        def training_step(self, batch, batch_idx):
            loss = self.net(**batch)["loss"]
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            optimizer, schedule = optimizer_and_schedule(self)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    callback = CurvatureCallback(every=EVERY, batch=probe(), loss_fn=loss_fn, budget=Budget(overhead=None))
    module = Module()
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, callbacks=[callback], log_every_n_steps=EVERY,
        logger=[TensorBoardLogger(out, name="tb", version=""), CSVLogger(out, name="csv", version="")],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(train_data(), batch_size=BATCH))
    return callback.monitor, module.net


def transformers(out: str):
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    from curvwatch import Budget
    from curvwatch.integrations.huggingface import CurvatureTrainerCallback

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    os.environ.update(
        MLFLOW_TRACKING_URI="file://" + os.path.join(os.path.abspath(out), "mlruns"),
        MLFLOW_EXPERIMENT_NAME="same_run", MLFLOW_ALLOW_FILE_STORE="true",
    )
    callback = CurvatureTrainerCallback(every=EVERY, batch=probe(), loss_fn=loss_fn, budget=Budget(overhead=None))
    model = Net()
    args = TrainingArguments(
        output_dir=os.path.join(out, "tb"), max_steps=STEPS,
        per_device_train_batch_size=BATCH, logging_steps=EVERY, report_to=["tensorboard", "mlflow"],
        max_grad_norm=0.0, use_cpu=True, disable_tqdm=True, save_strategy="no", dataloader_num_workers=0, seed=0,
    )
    trainer = InOrder(model=model, args=args, train_dataset=train_data(), callbacks=[callback],
                      optimizers=optimizer_and_schedule(model))
    trainer.train()
    return callback.monitor, model


def accelerate(out: str):
    from accelerate import Accelerator

    from curvwatch import Budget
    from curvwatch.integrations.accelerate import watch

    accelerator = Accelerator(cpu=True, log_with=["tensorboard", "wandb"], project_dir=out)
    accelerator.init_trackers("tb", init_kwargs={"wandb": {"dir": out, "mode": "offline"}})
    model = Net()
    optimizer, schedule = optimizer_and_schedule(model)
    loader = torch.utils.data.DataLoader(train_data(), batch_size=BATCH)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    monitor = watch(accelerator, model, optimizer, probe(), every=EVERY, loss_fn=loss_fn, budget=Budget(overhead=None))
    for updates, batch in enumerate(loader, start=1):
        loss = model(**batch)["loss"]
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if updates % EVERY == 0:
            accelerator.log({"train_loss": loss.item()}, step=updates)
    accelerator.end_training()
    return monitor, accelerator.unwrap_model(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", choices=["lightning", "transformers", "accelerate"], required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    torch.set_num_threads(1)
    monitor, model = {"lightning": lightning, "transformers": transformers, "accelerate": accelerate}[
        args.framework
    ](args.out)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({
            "history": [{**r.to_dict(), "spectrum": None} for r in monitor.history],
            "weights": [p.detach().double().sum().item() for p in model.parameters()],
        }, f)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
