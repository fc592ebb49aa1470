"""`curvwatch demo`: progressive sharpening and the edge of stability on real data.

Full-batch training of a tanh MLP (64-64-64-10) with mean squared error on
scikit-learn's bundled handwritten digits (1797 images, 8x8), as in Cohen et
al. (2021). With gradient descent at lr = 2 the sharpness rises from about
0.4 x 2/lr to 2/lr and then hovers there while the loss keeps falling
non-monotonically; with Adam at lr = 3e-3 the preconditioned sharpness settles
at 38/lr (Cohen et al. 2022).

Each optimizer is one TensorBoard run, ``OUT_DIR/gd`` or ``OUT_DIR/adam``, so
``tensorboard --logdir OUT_DIR`` lists them by name side by side.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass

import torch

from curvwatch.monitor import CurvatureMonitor
from curvwatch.results import Budget, CurvatureResult
from curvwatch.sinks import JsonlSink, TensorBoardSink

SETTINGS = {"gd": {"lr": 2.0, "steps": 800}, "adam": {"lr": 3e-3, "steps": 600}}


@dataclass(frozen=True)
class DemoRun:
    """What :func:`run_demo` produced."""

    out_dir: str
    losses: list[float]
    history: list[CurvatureResult]
    optimizer: str
    lr: float

    @property
    def run_dir(self) -> str:
        """The TensorBoard run of this demo: ``out_dir/<optimizer>``."""
        return os.path.join(self.out_dir, self.optimizer)


def digits_problem(seed: int = 0):
    """Standardized digits inputs, one-hot targets and a fresh tanh MLP."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    targets = torch.nn.functional.one_hot(torch.tensor(y), 10).float()
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 64), torch.nn.Tanh(),
        torch.nn.Linear(64, 10),
    )
    return model, x, targets


def demo_budget() -> Budget:
    """40 products per measurement, 5 for the trace, and every due step measured.

    The demo draws a curve, so it spends what that needs rather than a share of
    training time (``overhead=None`` where :class:`Budget` has that cap).
    """
    share = {"overhead": None} if "overhead" in {f.name for f in dataclasses.fields(Budget)} else {}
    return Budget(max_hvps=40, trace_hvps=5, **share)


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the demo extra
        return None
    return tqdm(total=total, desc="curvwatch demo", unit="step", disable=not enabled)


def run_demo(
    out_dir: str = "curvwatch_demo",
    optimizer: str = "gd",
    steps: int | None = None,
    every: int = 10,
    progress: bool = True,
    seed: int = 0,
) -> DemoRun:
    """Train on digits with curvature monitoring; write TensorBoard + JSONL to ``out_dir/<optimizer>``.

    A rerun replaces the events and ``curvature.jsonl`` of the same optimizer's
    earlier run there (and nothing else), so a run never holds two histories.

    Args:
        out_dir: where the run directory ``gd`` or ``adam`` goes (TensorBoard
            events and ``curvature.jsonl``).
        optimizer: ``"gd"`` (full-batch gradient descent, lr 2) or ``"adam"`` (lr 3e-3).
        steps: optimizer steps (default 800 for gd, 600 for adam).
        every: measure every this many steps.
        progress: show a progress bar.
        seed: model initialization seed.
    """
    if optimizer not in SETTINGS:
        raise ValueError(f"optimizer must be one of {sorted(SETTINGS)}, got {optimizer!r}")
    lr = SETTINGS[optimizer]["lr"]
    steps = steps or SETTINGS[optimizer]["steps"]
    model, x, targets = digits_problem(seed)
    opt = (torch.optim.SGD if optimizer == "gd" else torch.optim.Adam)(model.parameters(), lr=lr)
    run_dir = os.path.join(out_dir, optimizer)
    os.makedirs(run_dir, exist_ok=True)
    jsonl = os.path.join(run_dir, "curvature.jsonl")
    for old in [jsonl, *glob.glob(os.path.join(glob.escape(run_dir), "events.out.tfevents.*"))]:
        if os.path.isfile(old):
            os.remove(old)
    board = TensorBoardSink(run_dir)
    criterion = torch.nn.MSELoss()
    monitor = CurvatureMonitor(
        model, (x, targets), criterion=criterion, every=every, top_k=2, optimizer=opt,
        budget=demo_budget(), sinks=(board, JsonlSink(jsonl)),
    )
    monitor.attach(opt)
    bar = _progress(steps, progress)
    losses = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = criterion(model(x), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        board.log_scalar("train/loss", losses[-1], step)
        if bar is not None:
            last = monitor.history[-1] if monitor.history else None
            if last is not None and step % every == 0:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", ratio=f"{last.sharpness_ratio:.2f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    board.close()
    return DemoRun(out_dir, losses, monitor.history, optimizer, lr)


def summary(run: DemoRun) -> str:
    """A few lines on what happened: start/end ratio, threshold, crossings."""
    h = run.history
    adaptive = run.optimizer == "adam"
    name = "preconditioned sharpness" if adaptive else "sharpness"
    first, last = h[0], h[-1]
    crossing = next((r.step for r in h if r.sharpness_ratio >= 1.0), None)
    tail = [r.sharpness_ratio for r in h[len(h) // 2 :]]
    rises = sum(1 for a, b in zip(run.losses, run.losses[1:]) if b > a)
    return "\n".join([
        f"optimizer {run.optimizer}, lr {run.lr:g}: threshold {first.threshold:.4g}"
        + (" (38/lr)" if adaptive else " (2/lr)"),
        f"{name}/threshold: {first.sharpness_ratio:.2f} at step {first.step} -> "
        f"{last.sharpness_ratio:.2f} at step {last.step}",
        "reached the edge of stability at step " + (str(crossing) if crossing else "- (not reached)"),
        f"second half: ratio between {min(tail):.2f} and {max(tail):.2f}; "
        f"loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}, rose on {rises} of {len(run.losses) - 1} steps",
        f"mean cost per measurement: {sum(r.hvps for r in h) / len(h):.1f} HVPs, "
        f"{sum(r.seconds for r in h) / len(h) * 1000:.0f} ms",
    ])
