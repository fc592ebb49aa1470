"""Run under ``accelerate launch`` (2 CPU processes) by tests/integrations/test_accelerate.py.

Trains a small MLP for ``--steps`` updates with ``watch(..., every=--every)`` on
the whole probe batch (each process keeps its half), logging to TensorBoard
under ``--out/tb``. Writes ``--out/rank{i}.json`` (every process's results) and,
on the main process, ``--out/final.pt`` (final weights, probe batch, optimizer
settings) for the single-process comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

LR, MOMENTUM = 0.05, 0.9


def build_model() -> torch.nn.Module:
    """The model, identical on every process (seeded)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three-class data from two linear boundaries, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] + 0.5 * x[:, 2] > 0).long()
    return x, y


def main() -> None:
    """Train, watch, write the results."""
    from accelerate import Accelerator

    from curvwatch import Budget
    from curvwatch.integrations.accelerate import watch
    from curvwatch.probe import batch_length

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()

    accelerator = Accelerator(log_with="tensorboard", project_dir=os.path.join(args.out, "tb"))
    accelerator.init_trackers("run")
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    per_process = 8
    x, y = make_data(args.steps * per_process * accelerator.num_processes, seed=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=per_process)
    probe = make_data(32, seed=2)  # the whole probe batch, the same on every process
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    criterion = torch.nn.CrossEntropyLoss()
    sink_steps: list[int] = []  # a user's sink: main process only
    monitor = watch(accelerator, model, optimizer, probe, every=args.every, criterion=criterion,
                    sinks=[lambda result: sink_steps.append(result.step)], budget=Budget(overhead=None))

    step = 0
    for xb, yb in loader:
        loss = criterion(model(xb), yb)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        accelerator.log({"train/loss": accelerator.reduce(loss.detach(), "mean").item()}, step=step)

    with open(os.path.join(args.out, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump(
            {
                "num_processes": accelerator.num_processes,
                "distributed_type": str(accelerator.distributed_type),
                "updates": step,
                "probe_examples": batch_length(monitor.batch),
                "history": [r.to_dict() for r in monitor.history],
                "sink_steps": sink_steps,
            },
            f,
        )
    if accelerator.is_main_process:
        torch.save(
            {"state_dict": accelerator.unwrap_model(model).state_dict(), "probe": probe},
            os.path.join(args.out, "final.pt"),
        )
    accelerator.end_training()  # also destroys the process group


if __name__ == "__main__":
    main()
    # gloo's threads sometimes abort the interpreter's teardown in torch 2.13
    # ("terminate called without an active exception"); the results are written.
    sys.stdout.flush()
    os._exit(0)
