"""A learning-rate warm-up that overshoots: the early warning, then the loss spike.

Full-batch gradient descent on the ``curvwatch demo`` problem (scikit-learn's
digits, tanh MLP 64-64-64-10, MSE; :func:`curvwatch.demo.digits_problem`) with
a linear warm-up that does not stop at the stable learning rate: lr goes from
0.05 to 4 over 300 steps, and the run stops at step 240 (lr 3.2). Gradient
descent is stable while ``lambda_max < 2 / lr``; past that, the component of
the parameters along the top eigenvector grows by ``|1 - lr lambda|`` per step
until the loss spikes.

``CurvatureMonitor(every=1)`` with the update sharpness and the critical
sharpness on (their defaults) watches the run; ``on_threshold`` collects the
:class:`~curvwatch.ThresholdEvent` s. The *first early warning* is the first
event whose ``quantity`` is ``update_sharpness_ratio`` or
``critical_sharpness_ratio`` (a ratio crossing 1 upwards). The *loss spike* is
the first step ``s`` whose training loss is more than twice the lowest loss
before it, ``L(theta_s) > 2 min_{s' < s} L(theta_s')``. Both are counted on
the monitor's axis: step ``s`` means the parameters after ``s`` optimizer
steps (the loss of ``theta_s`` is the one the forward pass of step ``s + 1``
computes). The run is deterministic (seeded, one thread; every due step
measured, ``Budget(overhead=None)``); on one CPU thread it took 18-26 s on a
shared 2-core x86 VM with both cores busy::

    python examples/early_warning.py --out docs/early_warning.png

It prints ``warning at step X (lr=..., stable lr=...), loss spike at step Y:
Z steps ahead`` and draws the loss, the three ratios against 1, the warning and
the spike.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

import curvwatch as cw
from curvwatch.demo import digits_problem

LR_START, LR_END, WARMUP = 0.05, 4.0, 300  # the linear warm-up (it would end at lr 4 at step 300)
STEPS = 240  # the run stops at lr 3.2
SPIKE_FACTOR = 2.0  # a spike: the loss above SPIKE_FACTOR x its lowest value so far
EARLY = ("update_sharpness_ratio", "critical_sharpness_ratio")


def lr_at(step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based): linear from ``LR_START`` to ``LR_END``."""
    return LR_START + (LR_END - LR_START) * min(1.0, (step - 1) / WARMUP)


@dataclass
class SpikeRun:
    """What :func:`run` recorded.

    Attributes:
        losses: ``losses[s]`` = training loss of the parameters after ``s`` steps, ``s = 0..steps``.
        lrs: ``lrs[s - 1]`` = the lr of step ``s``.
        history: the monitor's results (one per step).
        events: every :class:`~curvwatch.ThresholdEvent` ``on_threshold`` received.
        seconds: wall-clock seconds of training and measuring.
    """

    losses: list[float]
    lrs: list[float]
    history: list[cw.CurvatureResult]
    events: list[cw.ThresholdEvent] = field(default_factory=list)
    seconds: float = math.nan

    @property
    def warning(self) -> cw.ThresholdEvent | None:
        """The first early warning: an update- or critical-sharpness ratio crossing 1 upwards."""
        return next((e for e in self.events if e.quantity in EARLY), None)

    @property
    def sharpness_crossing(self) -> cw.ThresholdEvent | None:
        """The first upward crossing of the sharpness ratio (``lambda_max / (2 / lr)``)."""
        return next((e for e in self.events if e.quantity == "sharpness_ratio" and e.ratio >= 1), None)

    @property
    def spike(self) -> int | None:
        """The first step whose loss exceeds ``SPIKE_FACTOR`` x the lowest loss before it."""
        return first_spike(self.losses, SPIKE_FACTOR)


def first_spike(losses: list[float], factor: float = SPIKE_FACTOR) -> int | None:
    """The first index ``s >= 1`` with ``losses[s] > factor * min(losses[:s])`` (``None``: no spike)."""
    lowest = math.inf
    for s, loss in enumerate(losses):
        if s > 0 and not loss <= factor * lowest:  # a NaN loss is a spike too
            return s
        lowest = min(lowest, loss)
    return None


def run(steps: int = STEPS, every: int = 1, seed: int = 0) -> SpikeRun:
    """Train with the overshooting warm-up under a monitor; return the losses, results and events."""
    torch.set_num_threads(1)
    model, x, targets = digits_problem(seed)
    criterion = torch.nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr_at(1))
    events: list[cw.ThresholdEvent] = []
    monitor = cw.CurvatureMonitor(
        model, (x, targets), criterion=criterion, every=every, optimizer=opt, top_k=1, trace=False,
        budget=cw.Budget(overhead=None), on_threshold=events.append, seed=seed,
    )  # update_sharpness=True and critical_sharpness=True are the defaults
    monitor.attach(opt)
    losses, lrs = [], []
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cw.CurvatureWarning)  # the events carry the same news
        for step in range(1, steps + 1):
            lr = lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad()
            loss = criterion(model(x), targets)
            loss.backward()
            losses.append(loss.item())  # the loss of theta_{step - 1}
            lrs.append(lr)
            opt.step()  # the monitor measures theta_step right after this
        with torch.no_grad():
            losses.append(criterion(model(x), targets).item())  # theta_steps
    return SpikeRun(losses, lrs, monitor.history, events, time.perf_counter() - started)


def describe(result: SpikeRun) -> str:
    """``warning at step X (lr=..., stable lr=...), loss spike at step Y: Z steps ahead`` and context."""
    w, spike, edge = result.warning, result.spike, result.sharpness_crossing
    if w is None or spike is None:
        return f"no {'early warning' if w is None else 'loss spike'} in {len(result.lrs)} steps"
    lines = [
        f"warning at step {w.step} (lr={w.lr:.3f}, stable lr={w.stable_lr:.3f}), loss spike at step {spike}: "
        f"{spike - w.step} steps ahead",
        f"  {w.quantity} = {w.ratio:.3f}; loss {result.losses[w.step]:.4f} at the warning, "
        f"{result.losses[spike]:.4f} at the spike (lowest before: {min(result.losses[:spike]):.4f})",
    ]
    if edge is not None:
        lines.append(
            f"  the sharpness crossed 2/lr at step {edge.step} (lambda_max {edge.lambda_max:.3f}, lr {edge.lr:.3f}): "
            f"{spike - edge.step} steps before the spike"
        )
    lines.append(f"  {len(result.history)} measurements, {result.seconds:.1f} s")
    return "\n".join(lines)


def plot(result: SpikeRun, path: str, zoom: int = 30) -> None:
    """Loss (top) and the three ratios against 1 (bottom): the whole run, and its last ``zoom`` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result.history
    fig, axes = plt.subplots(
        2, 2, figsize=(11, 6), sharex="col", sharey="row",
        gridspec_kw={"width_ratios": [2, 1], "height_ratios": [1, 1.2]},
    )
    w, spike, edge = result.warning, result.spike, result.sharpness_crossing
    marks = []
    if edge is not None:
        marks.append((edge.step, f"sharpness reaches 2/lr (step {edge.step})", "tab:blue", ":"))
    if w is not None:
        marks.append((w.step, f"early warning: {w.quantity} crosses 1 (step {w.step})", "tab:red", "--"))
    if spike is not None:
        marks.append((spike, f"loss spike: > {SPIKE_FACTOR:g}x lowest loss (step {spike})", "tab:purple", "-"))
    for col, first in enumerate((0, max(0, len(result.lrs) - zoom))):
        top, bottom = axes[0, col], axes[1, col]
        top.semilogy(range(first, len(result.losses)), result.losses[first:], color="black", lw=1.2,
                     label="training loss")
        for name, label, color in (
            ("sharpness_ratio", "sharpness / (2/lr)", "tab:blue"),
            ("update_sharpness_ratio", "update sharpness / (2/lr)", "tab:orange"),
            ("critical_sharpness_ratio", "critical sharpness / (2/lr) (gaps: not bracketed)", "tab:green"),
        ):
            pts = [(r.step, getattr(r, name)) for r in h if r.step >= first]
            bottom.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=1.2, marker="." if col else None,
                        ms=4, label=label)
        bottom.axhline(1.0, color="black", lw=0.8)
        bottom.set_ylim(0, 2)
        bottom.set_xlabel("optimizer step" + (f" (last {zoom})" if col else ""))
        for ax in (top, bottom):
            for x, label, color, ls in marks:
                if x >= first:
                    ax.axvline(x, color=color, ls=ls, lw=1, label=label if ax is top and col == 0 else None)
        if col == 0:
            lr_axis = top.twinx()
            lr_axis.plot(range(1, len(result.lrs) + 1), result.lrs, color="tab:gray", ls=":", lw=1, label="lr")
            lr_axis.set_ylabel("lr (linear warm-up)", color="tab:gray")
            lines, labels = top.get_legend_handles_labels()
            more, more_labels = lr_axis.get_legend_handles_labels()
            top.legend(lines + more, labels + more_labels, loc="lower left", fontsize=7)
            top.set_ylabel("loss (MSE)")
            bottom.set_ylabel("ratio")
            bottom.legend(loc="upper left", fontsize=7)
    title = "Gradient descent with an lr warm-up past the stable lr (digits MLP)"
    if w is not None and spike is not None:
        title += f": early warning {spike - w.step} steps before the loss spike"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="PNG to draw (e.g. docs/early_warning.png); default: none")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--every", type=int, default=1, help="measure every this many steps. Default 1")
    args = parser.parse_args()
    result = run(args.steps, args.every)
    print(describe(result))
    if args.out:
        plot(result, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
