"""Watch sharpness reach the edge of stability in an Accelerate training loop.

Full-batch gradient descent on a small tanh network (synthetic data, CPU, about
ten seconds). Sharpness (``curvature/lambda_max``) rises during training until it
reaches the stability threshold ``2 / lr`` and then hovers just above it (Cohen
et al. 2021), while the loss keeps falling, non-monotonically. One line added to an
ordinary Accelerate loop: ``watch(accelerator, model, optimizer, probe, ...)``.

Run::

    python examples/accelerate_example.py --out runs/accelerate
    # several processes (CPU; each holds half of every batch and of the probe batch):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        examples/accelerate_example.py --out runs/accelerate
    tensorboard --logdir runs/accelerate

In TensorBoard, the CUSTOM SCALARS tab overlays sharpness with its threshold;
SCALARS has ``train/loss`` and every ``curvature/*`` curve on the same step axis.
Every other tracker of the Accelerator (``log_with=["tensorboard", "wandb"]``,
``"mlflow"``, ...) gets the values too; in wandb the ``curvature/*`` charts use
``curvature/step`` (the update count) as their x axis, whatever step the loop
logs its own values with.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator

from curvwatch import Budget
from curvwatch.integrations.accelerate import watch


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the outputs of a random teacher network (a smooth regression)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    teacher = torch.randn(16, 4, generator=g) / 4
    return x, torch.sin(2 * x @ teacher) + 0.1 * torch.randn(n, 4, generator=g)


def main() -> None:
    """Train with Accelerate and log curvature to TensorBoard under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accelerate", help="TensorBoard directory")
    parser.add_argument("--steps", type=int, default=500, help="optimizer updates")
    parser.add_argument("--every", type=int, default=10, help="measure every N updates")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: one thread per process is fastest

    accelerator = Accelerator(
        log_with="tensorboard", project_dir=args.out, gradient_accumulation_steps=args.grad_accum
    )
    accelerator.init_trackers(f"gd_lr{args.lr:g}")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 4),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    x, y = make_data(args.examples, seed=1)
    # full batch: every update sees all examples (split across processes and micro-batches)
    per_micro_batch = args.examples // (accelerator.num_processes * args.grad_accum)
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_micro_batch)
    # The probe batch: edge of stability concerns the loss that gradient descent
    # follows, so here it is the training set itself (the same on every process;
    # watch() keeps each process's share). For a mini-batch run pass a held-out batch.
    probe = (x, y)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    criterion = torch.nn.MSELoss()

    # the one added line
    # (overhead=None: every due step measured; with the default 5% share this tiny model's
    # measurements, each about as long as 40 of its steps, would be deferred or cut short)
    monitor = watch(accelerator, model, optimizer, probe, every=args.every, criterion=criterion,
                    budget=Budget(overhead=None, max_hvps=40, trace_hvps=10))

    start, updates = time.perf_counter(), 0
    while updates < args.steps:
        for xb, yb in loader:
            with accelerator.accumulate(model):
                loss = criterion(model(xb), yb)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                updates += 1
                mean_loss = accelerator.reduce(loss.detach(), "mean").item()
                accelerator.log({"train/loss": mean_loss}, step=updates)
            if updates >= args.steps:
                break

    if accelerator.is_main_process:
        print(f"{updates} updates in {time.perf_counter() - start:.1f} s; 2/lr = {2 / args.lr:.2f}")
        print(" step  lambda_max  ratio   trace    hvps")
        for r in monitor.history:
            print(f"{r.step:5d}  {r.lambda_max:10.3f}  {r.sharpness_ratio:5.2f}"
                  f"  {r.trace:7.2f}  {r.hvps:4d}")
        print(f"TensorBoard: tensorboard --logdir {args.out}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
