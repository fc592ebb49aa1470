"""Lightning ``strategy="ddp"`` on CPU (2 processes, gloo) with ``CurvatureCallback``.

Run by ``tests/integrations/test_lightning.py`` (Lightning re-launches this script for rank 1):

    python tests/ddp_scripts/lightning_ddp.py --out DIR --probe val|batch

Writes TensorBoard events under ``DIR/tb/version_0`` (rank 0 only) and
``DIR/rank{r}.pt`` with each rank's final weights and measured results. The
test recomputes the whole probe batch from :func:`make_data` and compares.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from curvwatch import Budget
from curvwatch.integrations.lightning import CurvatureCallback

LR, MOMENTUM = 0.1, 0.9
VAL_BATCH = 16  # per process: the whole probe batch is the first 2 * VAL_BATCH validation examples


class Classifier(pl.LightningModule):
    """A tanh MLP with cross-entropy, SGD with heavy-ball momentum."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def make_data() -> tuple[TensorDataset, TensorDataset]:
    """160 training and 64 validation examples, 8 features, 3 classes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(224, 8, generator=g)
    y = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(1)
    return TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:])


def whole_probe_batch(probe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe batch of both processes together.

    ``val``: rank r's first validation batch holds examples r, r+2, ... (Lightning's
    DistributedSampler, no shuffling), so both together are the first 2 * VAL_BATCH.
    ``batch``: the batch given to the callback, of which rank r measures the r-th half.
    """
    del probe  # the same examples either way
    _, val = make_data()
    return val.tensors[0][: 2 * VAL_BATCH], val.tensors[1][: 2 * VAL_BATCH]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--probe", choices=["val", "batch"], default="val")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, val = make_data()
    sink_steps: list[int] = []  # a user's sink: process zero only
    callback = CurvatureCallback(
        every=args.every, batch=whole_probe_batch(args.probe) if args.probe == "batch" else None, strict=True,
        sinks=[lambda result: sink_steps.append(result.step)], budget=Budget(overhead=None),
    )
    module = Classifier()
    trainer = pl.Trainer(
        strategy="ddp", devices=2, accelerator="cpu", max_steps=args.steps, callbacks=[callback],
        logger=TensorBoardLogger(args.out, name="tb", version=0), log_every_n_steps=1,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(train, batch_size=16), DataLoader(val, batch_size=VAL_BATCH))
    torch.save(
        {
            "state_dict": module.state_dict(),
            "history": [r.to_dict() for r in callback.monitor.history],
            "world_size": trainer.world_size,
            "sink_steps": sink_steps,
        },
        os.path.join(args.out, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
    # gloo's threads sometimes abort the interpreter's teardown in torch 2.13
    # ("terminate called without an active exception"); the results are written.
    sys.stdout.flush()
    os._exit(0)
