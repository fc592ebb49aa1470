"""Edge of stability in PyTorch Lightning, watched by ``CurvatureCallback``.

Full-batch gradient descent (lr = 2) on a tanh MLP with mean squared error on a
synthetic 10-class problem. The sharpness (``curvature/lambda_max``) rises
from about 0.4 until it reaches the stability threshold 2 / lr = 1 around step
300, then hovers there while the loss keeps falling (Cohen et al. 2021). Runs
on a CPU in well under a minute:

    python examples/lightning_example.py --out runs/lightning
    tensorboard --logdir runs/lightning

In TensorBoard: SCALARS shows ``train_loss`` and the ``curvature/*`` curves on
the same step axis; CUSTOM SCALARS shows the sharpness overlaid with its
threshold. Every other logger of the Trainer (``logger=[TensorBoardLogger(...),
CSVLogger(...)]``, wandb, MLflow) gets the same values, and they are in
``trainer.callback_metrics``, so ``EarlyStopping(monitor="curvature/sharpness_ratio")``
or ``ModelCheckpoint(monitor=...)`` can use them.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset

from curvwatch import Budget
from curvwatch.integrations.lightning import CurvatureCallback


def make_data(n: int = 1000, dim: int = 32, classes: int = 10, seed: int = 0):
    """Noisy Gaussian clusters (standardized inputs) with one-hot targets."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centers[labels] + 1.5 * torch.randn(n, dim, generator=g)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.nn.functional.one_hot(labels, classes).float()


class FullBatch(Dataset):
    """The whole training set as every item: one epoch of ``steps`` full-batch steps."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):
        return self.x, self.y


class Regressor(pl.LightningModule):
    """A 3-layer tanh MLP trained with MSE and plain gradient descent."""

    def __init__(self, dim: int = 32, classes: int = 10, lr: float = 2.0) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, 64), torch.nn.Tanh(),
            torch.nn.Linear(64, 64), torch.nn.Tanh(),
            torch.nn.Linear(64, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lightning", help="TensorBoard directory")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=2.0)
    args = parser.parse_args()

    torch.set_num_threads(1)  # a small model: one thread is the fastest
    pl.seed_everything(0, verbose=False)
    x, y = make_data()
    # The probe batch is the training set itself: under full-batch GD that is
    # the loss whose sharpness meets 2 / lr. (Without batch=..., the callback
    # takes the first validation batch, else the first training batch.)
    # Every due step is measured (overhead=None): a product of this tiny model costs about a
    # training step, so the default 5% share would defer most of them and cut the rest short
    # (the table read ratio nan: an uncertified sharpness gets no ratio). Leave the default on
    # models whose steps take longer than a measurement's fixed costs.
    curvature = CurvatureCallback(
        every=args.every, batch=(x, y), top_k=2, budget=Budget(overhead=None, max_hvps=30, trace_hvps=5)
    )
    trainer = pl.Trainer(
        max_steps=args.steps,
        max_epochs=1,
        accelerator="cpu",
        logger=TensorBoardLogger(args.out, name="eos"),
        callbacks=[curvature],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    loader = DataLoader(FullBatch(x, y, args.steps), batch_size=None)
    trainer.fit(Regressor(x.shape[1], y.shape[1], args.lr), loader)

    history = curvature.monitor.history
    print(f"{'step':>6} {'lambda_max':>11} {'2/lr':>7} {'ratio':>6}")
    rows = history[:: max(1, len(history) // 10)]
    for r in rows + ([history[-1]] if rows[-1] is not history[-1] else []):
        print(f"{r.step:6d} {r.lambda_max:11.4f} {r.threshold:7.3f} {r.sharpness_ratio:6.2f}")
    print(f"TensorBoard run: {trainer.logger.log_dir}  (tensorboard --logdir {args.out})")


if __name__ == "__main__":
    main()
