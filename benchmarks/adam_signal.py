"""Which curvature signal predicts Adam's instabilities on a language model (issue 23).

A 2-layer GPT-2 with the full 50,257-token vocabulary (n_embd 64, 2 heads, 64 positions, dropout
off) is trained by AdamW (weight decay 0.1) on 8 x 64 batches of a fixed random bigram language over
2,000 of its tokens (a fresh batch every step from a seeded generator; a held-out 4 x 64 probe batch
of the same language). Runs (:func:`runs_for`):

* ``stable_lr0.001``, ``stable_lr0.003``: constant lr, 600 steps;
* branches of ``stable_lr0.001`` at step 300 (same weights, optimizer state and the same next
  batches, so the parent is their control): ``bump_x10`` (lr x10, which does not spike: a negative
  control), and three driven to a loss spike in different ways: ``bump_x20`` (lr x20),
  ``ramp_x100`` (lr ramped x100 over 150 steps, a warm-up that does not stop), ``beta2_0.1``
  (beta2 0.999 -> 0.1).

At every measurement (every 25 steps; every 10 for 150 steps after a branch) a copy of the model
and the optimizer is measured (the training never sees it) and these signals are computed, each as
a ratio to its threshold (``38/lr`` at beta1 = 0.9, ``(2 + 2 b1) / ((1 - b1) lr)`` in general;
``2/lr`` for the critical sharpness):

* ``a_precond``: today's headline, ``lambda_max(P^-1/2 H P^-1/2)`` on the probe batch,
  ``P = sqrt(v_hat) + eps`` (Lanczos, warm-started);
* ``b_restricted``: the same on the coordinates where Adam's frozen-preconditioner linearization
  holds: ``(1 - b2) g_i^2 <= b2 v_i`` with ``g`` the probe's gradient, i.e. the gradient this
  coordinate would see at most doubles its second moment. Outside that set the step is near its
  bound ``lr (1 - b1) / sqrt(1 - b2)`` and ``v`` follows the gradient, so the frozen-``P``
  analysis (and with it 38/lr) does not describe the coordinate;
* ``h_headline``: what the monitor logs as ``preconditioned_lambda_max`` since issue 23: (b) on
  the linear set of :mod:`curvwatch.optim.linearization`, ``v_hat_i' <= 2 v_hat_i`` with the
  bias correction (the same set as (b) to 0.2 % of its bound at ``beta2 = 0.999`` after 25 steps;
  wider where beta2 is small);
* ``c_batch``: Adam's batch sharpness on the next ``K`` training batches,
  ``E_B[w_B^T H_B w_B / w_B^T P'_B w_B]``, ``w_B = g_B / P'_B`` and ``P'_B`` the preconditioner
  Adam would use on that batch (``v`` updated with ``g_B^2``): one product per batch;
* ``c0_batch_stale``: the same with the stored ``P`` (``E_B[g^T P^-1 H P^-1 g / g^T P^-1 g]``);
* ``d_update``: the curvature along the last update ``u``, ``u^T H u / u^T P u``, on the probe
  (Bai et al.; curvwatch's ``update_sharpness``); ``d_update_train``: the same on the next
  training batch;
* ``e_critical``: the critical sharpness ``2 / eta_c`` along the next update from the probe's
  gradient, line search on the probe (curvwatch's, Kalra et al.), against ``2/lr``;
  ``e_critical_train``: along the next update from the next training batch's gradient, line
  search on that batch: above 1, the step about to be taken raises its own batch's loss.

A *spike* starts at step ``s`` when the training loss exceeds the lowest loss of the 50 steps
before by ``--spike-margin`` nats (0.5) and stays above for 3 steps; it ends when the 5-step mean
is back under that level. For each run and signal: the ratio's range in stable stretches
(measurements neither within 50 steps before a spike nor inside one), false alarms per 1,000
steps (a measurement with ratio >= 1 and no spike starting in the next 50 steps, not inside a
spike), and for each spike the lead time: the spike's step minus the first measurement in the 50
steps before it with ratio >= 1 (``None``: missed). Measurement ``m`` is at the parameters after
``m`` steps; the loss of step ``s`` is computed at the parameters after ``s - 1`` steps.

The full-batch check (``digits``): the demo's problem (tanh MLP 64-64-64-10, MSE, scikit-learn
digits, full-batch Adam lr 3e-3, 600 steps), where the preconditioned sharpness is known to settle
at 38/lr; every signal is computed with the full batch as probe and as training batch.

CPU (what issue 23 asks for)::

    python benchmarks/adam_signal.py --threads 1 --out benchmarks/results/adam_signal_cpu.json

GPU, GPT-2 124M / 355M under bf16 autocast (measured in fp32)::

    python benchmarks/adam_signal.py --device cuda --model gpt2-124m --out benchmarks/results/adam_signal_124m.json
    python benchmarks/adam_signal.py --device cuda --model gpt2-355m --out benchmarks/results/adam_signal_355m.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.truth import BigramLanguage, optimizer_step  # noqa: E402
from curvwatch._flat import flatten  # noqa: E402
from curvwatch.directional import critical_sharpness, directional_sharpness, perturbed_loss  # noqa: E402
from curvwatch.operators.hessian import HessianOperator  # noqa: E402
from curvwatch.operators.preconditioned import PreconditionedOperator  # noqa: E402
from curvwatch.optim import next_update_direction, preconditioner_diagonal, update_direction  # noqa: E402
from curvwatch.optim.linearization import restrict_to_linear_  # noqa: E402
from curvwatch.solvers.lanczos import lanczos  # noqa: E402

SIGNALS = (
    "a_precond",
    "b_restricted",
    "h_headline",
    "c_batch",
    "c0_batch_stale",
    "d_update",
    "d_update_train",
    "e_critical",
    "e_critical_train",
)
# the signals read against 2/lr (the step of lr along the update raises the loss); the others
# against Adam's (2 + 2 b1) / ((1 - b1) lr)
GD_THRESHOLD = ("e_critical", "e_critical_train")
# directional quotients also read against 2/lr, as Bai et al. read their gradient-directional curvature
ALSO_GD = ("c_batch", "c0_batch_stale", "d_update", "d_update_train")
RATIOS = SIGNALS + tuple(f"{k}@2/lr" for k in ALSO_GD)


# ------------------------------------------------------------------------------------------------
# problems
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """A model preset: shape, data, optimizer and the run lengths."""

    name: str
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 2
    n_positions: int = 64
    vocab: int = 50257
    language_tokens: int | None = 2000
    batch: int = 8
    seq: int = 64
    probe_batch: int = 4
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: float | None = None
    warmup: int = 0
    bf16: bool = False
    steps: int = 600
    branch: int = 300
    after: int = 150  # steps of the ramp after its branch point (2/3 of it for the other branches)
    every: int = 25
    every_near: int = 10
    near: int = 150  # measure every every_near steps this long after a branch (the whole CPU ramp)
    stable_lrs: tuple[float, ...] = (1e-3, 3e-3)
    matvecs: int = 10
    batches: int = 2


GPT2_124M = Model(
    "gpt2-124m",
    n_layer=12,
    n_embd=768,
    n_head=12,
    n_positions=1024,
    language_tokens=None,
    batch=8,
    seq=512,
    probe_batch=8,
    lr=6e-4,
    betas=(0.9, 0.95),
    clip=1.0,
    warmup=100,
    bf16=True,
    steps=1500,
    branch=750,
    after=300,
    every=50,
    every_near=10,
    near=100,
    stable_lrs=(6e-4, 3e-4),
    matvecs=20,
    batches=4,
)
MODELS = {
    "tiny": Model("tiny"),
    "gpt2-124m": GPT2_124M,
    # the 355M shape with half the learning rates, everything else as 124M
    "gpt2-355m": replace(
        GPT2_124M, name="gpt2-355m", n_layer=24, n_embd=1024, n_head=16, lr=3e-4, stable_lrs=(3e-4, 1.5e-4)
    ),
}


@dataclass
class Problem:
    """What a run trains: model factory, loss, batches (from a generator), probe, optimizer hyper."""

    name: str
    build: Callable[[], torch.nn.Module]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor]
    next_batch: Callable[[torch.Generator], Any]
    probe: Any
    preset: Model
    spike_abs: float  # a spike: loss > lowest of the last 50 + max(spike_abs, spike_rel * lowest)
    spike_rel: float
    full_batch: bool = False


def lm_problem(preset: Model, device: torch.device, seed: int = 0) -> Problem:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(
        vocab_size=preset.vocab,
        n_positions=preset.n_positions,
        n_embd=preset.n_embd,
        n_layer=preset.n_layer,
        n_head=preset.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    language = BigramLanguage(preset.vocab, preset.language_tokens)
    probe_ids = language.sample(preset.probe_batch, preset.seq, torch.Generator().manual_seed(seed + 2)).to(device)

    def build() -> torch.nn.Module:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        model.set_attn_implementation("eager")  # double backward through attention
        return model.to(device)

    def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch, labels=batch, use_cache=False).loss

    def next_batch(generator: torch.Generator) -> torch.Tensor:
        return language.sample(preset.batch, preset.seq, generator).to(device)

    return Problem(preset.name, build, loss, next_batch, probe_ids, preset, spike_abs=0.5, spike_rel=0.0)


def digits_problem_(device: torch.device, seed: int = 0) -> Problem:
    """The ``curvwatch demo --optimizer adam`` problem: full-batch Adam lr 3e-3 on digits."""
    from curvwatch.demo import digits_problem

    _, x, targets = digits_problem(seed)
    x, targets = x.to(device), targets.to(device)

    def build() -> torch.nn.Module:
        return digits_problem(seed)[0].to(device)

    def loss(model: torch.nn.Module, batch) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])

    preset = Model(
        "digits",
        lr=3e-3,
        betas=(0.9, 0.999),
        weight_decay=0.0,
        steps=600,
        every=25,
        stable_lrs=(3e-3,),
        matvecs=20,
        batches=1,
    )
    return Problem(
        "digits",
        build,
        loss,
        lambda g: (x, targets),
        (x, targets),
        preset,
        spike_abs=0.0,
        spike_rel=1.0,
        full_batch=True,
    )


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One training run; a branch starts from ``parent``'s state after ``branch`` steps."""

    name: str
    kind: str  # "stable" | "spike" | "edge"
    lr: float
    steps: int
    parent: str | None = None
    branch: int = 0
    lr_factor: float = 1.0  # from the branch on: lr x lr_factor
    ramp_to: float = 1.0  # from the branch on: lr x ramp_to^(k / ramp_steps), k steps after the branch
    ramp_steps: int = 0
    beta2: float | None = None  # from the branch on
    note: str = ""

    def factor_at(self, step: int) -> float:
        """The lr multiplier of step ``step`` (1-based: the step about to be taken)."""
        if self.parent is None or step <= self.branch:
            return 1.0
        k = step - self.branch
        if self.ramp_steps:
            return self.ramp_to ** min(1.0, k / self.ramp_steps)
        return self.lr_factor


def runs_for(preset: Model, quick: bool = False) -> list[RunSpec]:
    """The stable runs, then the branches of the first stable run at ``preset.branch``.

    On the CPU model (branch at step 300, lr 1e-3, loss 1.9): an lr x10 (no spike: the loss keeps
    falling, a negative control) and x20 (spike within 3 steps), an lr ramp x100 over 150 steps
    (a warm-up that does not stop; the loss creeps up from lr ~3e-2 and spikes at ~6e-2), and beta2
    0.999 -> 0.1 (spike ~45 steps later, then divergence). Tried and not spiking within 150 steps:
    lr x10, beta2 -> 0.5, beta1 -> 0 (lr x30 and x20 spike alike; a ramp x30 only creeps up).
    """
    lr = preset.stable_lrs[0]
    branch, ramp = preset.branch, preset.after
    short = max(1, 2 * ramp // 3)
    base = f"stable_lr{lr:g}"
    runs = [RunSpec(f"stable_lr{x:g}", "stable", x, preset.steps) for x in preset.stable_lrs]
    runs += [
        RunSpec(
            "bump_x10",
            "control",
            lr,
            branch + short,
            base,
            branch,
            lr_factor=10.0,
            note=f"lr {lr:g} -> {10 * lr:g} after step {branch} (no spike: a negative control)",
        ),
        RunSpec(
            "bump_x20",
            "spike",
            lr,
            branch + short,
            base,
            branch,
            lr_factor=20.0,
            note=f"lr {lr:g} -> {20 * lr:g} after step {branch}",
        ),
        RunSpec(
            "ramp_x100",
            "spike",
            lr,
            branch + ramp,
            base,
            branch,
            ramp_to=100.0,
            ramp_steps=ramp,
            note=f"lr ramped geometrically {lr:g} -> {100 * lr:g} over steps {branch}-{branch + ramp} (a "
            "warm-up past the stable lr)",
        ),
        RunSpec(
            "beta2_0.1",
            "spike",
            lr,
            branch + short,
            base,
            branch,
            beta2=0.1,
            note=f"beta2 {preset.betas[1]:g} -> 0.1 after step {branch}",
        ),
    ]
    return runs


def settings(spec: RunSpec, preset: Model, step: int) -> tuple[float, tuple[float, float]]:
    """``(lr, betas)`` of step ``step``."""
    lr = spec.lr * spec.factor_at(step)
    if preset.warmup:
        lr *= min(1.0, step / preset.warmup)
    beta2 = spec.beta2 if spec.beta2 is not None and step > spec.branch else preset.betas[1]
    return lr, (preset.betas[0], beta2)


def apply(optimizer: torch.optim.Optimizer, lr: float, betas: tuple[float, float]) -> None:
    for group in optimizer.param_groups:
        group["lr"], group["betas"] = lr, betas


# ------------------------------------------------------------------------------------------------
# the signals
# ------------------------------------------------------------------------------------------------
def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


def measure(
    problem: Problem, model, optimizer, generator: torch.Generator, step: int, warm: dict, args
) -> dict[str, Any]:
    """Every signal at the parameters after ``step`` steps, on copies of the model and the optimizer."""
    started = time.perf_counter()
    m = copy.deepcopy(model)
    m.eval()
    o = type(optimizer)(m.parameters(), lr=optimizer.param_groups[0]["lr"])
    o.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    params = [p for p in m.parameters() if p.requires_grad]
    group = o.param_groups[0]
    lr, (b1, b2), eps = float(group["lr"]), group["betas"], float(group["eps"])
    adam_threshold = (2 + 2 * b1) / ((1 - b1) * lr)
    gd_threshold = 2 / lr
    P = preconditioner_diagonal(o, params)
    v = flatten([o.state[p]["exp_avg_sq"] for p in params])
    t = float(o.state[params[0]]["step"])
    out: dict[str, Any] = {
        "step": step,
        "lr": lr,
        "betas": [b1, b2],
        "adam_threshold": adam_threshold,
        "gd_threshold": gd_threshold,
    }
    values: dict[str, float] = {}
    loss = problem.loss
    probe = problem.probe
    matvecs = args.matvecs or problem.preset.matvecs

    # -- on the probe: (a), (b), (d), (e) --------------------------------------------------------
    op = HessianOperator(lambda: loss(m, probe), params, "double_backward", module=m)
    g = op.gradient_at_theta()
    a = lanczos(PreconditionedOperator(op, P), k=1, tol=args.tol, max_matvecs=matvecs, v0=warm.get("a"), seed=step)
    values["a_precond"] = a.lambda_max
    y = a.eigenvectors[:, 0]
    out["a_error_bound"] = a.relative_error_bound
    out["a_mass_P_below_1e-6"] = float((y[P < 1e-6] ** 2).sum() / (y**2).sum())
    keep = (1 - b2) * g.double() ** 2 <= b2 * v.double()
    out["b_excluded_fraction"] = float(1 - keep.double().mean())
    out["a_mass_excluded"] = float((y[~keep] ** 2).sum() / (y**2).sum())
    P_b = torch.where(keep, P, torch.full_like(P, torch.finfo(P.dtype).max))
    b = lanczos(
        PreconditionedOperator(op, P_b), k=1, tol=args.tol, max_matvecs=matvecs, v0=warm.get("b"), seed=step + 1
    )
    values["b_restricted"] = b.lambda_max
    out["b_error_bound"] = b.relative_error_bound
    P_h = P.clone()
    out["h_excluded_fraction"] = restrict_to_linear_(P_h, o, params, g) / P_h.numel()
    h = lanczos(
        PreconditionedOperator(op, P_h), k=1, tol=args.tol, max_matvecs=matvecs, v0=warm.get("h"), seed=step + 2
    )
    values["h_headline"] = h.lambda_max
    out["h_error_bound"] = h.relative_error_bound
    warm["a"], warm["b"] = a.eigenvectors.detach().clone(), b.eigenvectors.detach().clone()
    warm["h"] = h.eigenvectors.detach().clone()
    if args.headline_only:  # (a), (b) and the monitor's headline only
        op.release()
        return _finish(out, values, adam_threshold, gd_threshold, started)
    u = update_direction(o, params)
    values["d_update"] = directional_sharpness(op, u, P)
    out["probe_loss"] = op.loss
    u_next = next_update_direction(o, params, g)
    loss0 = op.loss
    op.release()
    del op
    e = critical_sharpness(perturbed_loss(m, params, u_next, loss, probe), lr, max_evals=10, rtol=1e-2, loss0=loss0)
    values["e_critical"] = e.value if e.bracketed else math.nan
    out["e_bracketed"] = e.bracketed

    # -- on the next training batches: (c), (c0), (d_train), (e_train) -----------------------------
    peek = torch.Generator(device=generator.device)
    peek.set_state(generator.get_state())
    batches = [
        problem.next_batch(peek) for _ in range(1 if problem.full_batch else (args.batches or problem.preset.batches))
    ]
    cs, c0s = [], []
    for index, batch in enumerate(batches):
        op = HessianOperator(lambda batch=batch: loss(m, batch), params, "double_backward", module=m)
        gb = op.gradient_at_theta()
        v_next = (b2 * v + (1 - b2) * gb * gb) / (1 - b2 ** (t + 1))
        P_next = v_next.sqrt() + eps
        w = gb / P_next
        cs.append(_dot(w, op.matvec(w)) / _dot(w, P_next * w))
        w0 = gb / P
        c0s.append(_dot(w0, op.matvec(w0)) / _dot(w0, P * w0))
        if index == 0:
            values["d_update_train"] = directional_sharpness(op, u, P)
            u_batch = next_update_direction(o, params, gb)
            batch_loss = op.loss
            op.release()
            del op
            eb = critical_sharpness(
                perturbed_loss(m, params, u_batch, loss, batch), lr, max_evals=10, rtol=1e-2, loss0=batch_loss
            )
            values["e_critical_train"] = eb.value if eb.bracketed else math.nan
            out["e_train_bracketed"] = eb.bracketed
        else:
            op.release()
            del op
    values["c_batch"] = sum(cs) / len(cs)
    values["c0_batch_stale"] = sum(c0s) / len(c0s)
    out["c_batch_values"], out["c0_batch_values"] = cs, c0s
    return _finish(out, values, adam_threshold, gd_threshold, started)


def _finish(out: dict, values: dict, adam_threshold: float, gd_threshold: float, started: float) -> dict:
    """Every signal (NaN: not computed) and its ratio to its threshold."""
    values = {k: values.get(k, math.nan) for k in SIGNALS}
    out["values"] = values
    out["ratios"] = {k: val / (gd_threshold if k in GD_THRESHOLD else adam_threshold) for k, val in values.items()}
    out["ratios"].update({f"{k}@2/lr": values[k] / gd_threshold for k in ALSO_GD})
    out["seconds"] = time.perf_counter() - started
    return out


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
@dataclass
class State:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int
    losses: list[float]
    lrs: list[float]
    warm: dict


def fresh_state(problem: Problem) -> State:
    model = problem.build()
    p = problem.preset
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=p.betas, eps=p.eps, weight_decay=p.weight_decay)
    return State(model, opt, torch.Generator().manual_seed(1), 0, [], [], {})


def snapshot(s: State) -> dict:
    return {
        "model": {k: v.detach().cpu().clone() for k, v in s.model.state_dict().items()},
        "optimizer": copy.deepcopy(s.optimizer.state_dict()),
        "generator": s.generator.get_state(),
        "step": s.step,
        "losses": list(s.losses),
        "lrs": list(s.lrs),
        "warm": {k: v.clone() for k, v in s.warm.items()},
    }


def restore(problem: Problem, snap: dict) -> State:
    s = fresh_state(problem)
    s.model.load_state_dict(snap["model"])
    s.optimizer.load_state_dict(copy.deepcopy(snap["optimizer"]))
    s.generator.set_state(snap["generator"])
    s.step, s.losses, s.lrs = snap["step"], list(snap["losses"]), list(snap["lrs"])
    s.warm = {k: v.clone() for k, v in snap["warm"].items()}
    return s


def due(spec: RunSpec, preset: Model, step: int) -> bool:
    """Measure after ``step`` steps: every ``every``; every ``every_near`` for ``near`` steps after a branch."""
    if spec.parent is not None:
        k = step - spec.branch
        if k < 0:
            return False
        if k <= preset.near:
            return k % preset.every_near == 0
    return step % preset.every == 0


def train_step(problem: Problem, s: State) -> float:
    p = problem.preset
    return optimizer_step(s.model, s.optimizer, problem.loss, problem.next_batch(s.generator), p.bf16, p.clip)


def run(
    problem: Problem,
    spec: RunSpec,
    args,
    snapshots: dict,
    branch_points: set[int],
    stop: int | None = None,
    measuring: bool = True,
) -> dict[str, Any]:
    """Train ``spec`` (to ``stop``), measuring where due; keep snapshots at ``branch_points``."""
    preset = problem.preset
    s = restore(problem, snapshots[(spec.parent, spec.branch)]) if spec.parent else fresh_state(problem)
    measurements = []
    started = time.perf_counter()
    train_seconds = 0.0
    if spec.parent is not None:  # the branch's settings from its first step on: measure before it
        apply(s.optimizer, *settings(spec, preset, s.step + 1))
        measurements.append(measure(problem, s.model, s.optimizer, s.generator, s.step, s.warm, args))
        _print_measurement(spec.name, measurements[-1])
    while s.step < (stop or spec.steps):
        lr, betas = settings(spec, preset, s.step + 1)
        apply(s.optimizer, lr, betas)
        t0 = time.perf_counter()
        loss = train_step(problem, s)
        train_seconds += time.perf_counter() - t0
        s.step += 1
        s.losses.append(loss)
        s.lrs.append(lr)
        if not math.isfinite(loss):
            print(f"  {spec.name}: step {s.step}: loss {loss}: stopped", flush=True)
            break
        if s.step in branch_points and spec.parent is None:
            snapshots[(spec.name, s.step)] = snapshot(s)
        if measuring and due(spec, preset, s.step):
            apply(s.optimizer, *settings(spec, preset, s.step + 1))  # the lr in effect for the next step
            measurements.append(measure(problem, s.model, s.optimizer, s.generator, s.step, s.warm, args))
            _print_measurement(spec.name, measurements[-1], s.losses)
    first = spec.branch if spec.parent else 0
    return {
        "spec": asdict(spec),
        "losses": s.losses,
        "lrs": s.lrs,
        "first_step": first,
        "measurements": measurements,
        "seconds": time.perf_counter() - started,
        "train_seconds_per_step": train_seconds / max(1, s.step - first),
    }


def _print_measurement(name: str, m: dict, losses: list[float] | None = None) -> None:
    r = m["ratios"]
    loss = f" loss {sum(losses[-5:]) / len(losses[-5:]):.3f}" if losses else ""
    print(
        f"  {name} step {m['step']}{loss} lr {m['lr']:.3g}: "
        + " ".join(
            f"{k.split('_')[0]}{'t' if k.endswith('train') else ''}{'s' if 'stale' in k else ''}={r[k]:.3g}"
            for k in SIGNALS
        )
        + f" ({m['seconds']:.1f} s)",
        flush=True,
    )


# ------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------
def find_spikes(
    losses: list[float], first: int, abs_margin: float, rel_margin: float, window: int = 50, sustain: int = 3
) -> list[dict[str, Any]]:
    """Loss spikes starting after step ``first``: ``{"step", "end", "reference", "peak"}`` (1-based steps).

    A spike starts at step ``s`` when ``loss_s`` (and each of the next ``sustain - 1`` losses)
    exceeds ``ref + max(abs_margin, rel_margin * ref)``, ``ref`` the lowest loss of the
    ``window`` steps before; it ends at the first step whose 5-step mean is back under that level
    (or at the end of the run). A non-finite loss is a spike.
    """
    spikes, i, n = [], max(first, 1), len(losses)
    while i < n:
        ref = min(losses[max(0, i - window) : i])
        level = ref + max(abs_margin, rel_margin * ref)
        ahead = losses[i : i + sustain]
        if all(not x <= level for x in ahead) and len(ahead) == sustain or not math.isfinite(losses[i]):
            end = i + 1
            while end < n and not (sum(losses[end : end + 5]) / len(losses[end : end + 5]) <= level):
                end += 1
            finite = [x for x in losses[i : end + 1] if math.isfinite(x)]
            spikes.append(
                {"step": i + 1, "end": end + 1, "reference": ref, "peak": max(finite) if finite else math.inf}
            )
            i = end + 1
            continue
        i += 1
    return spikes


def evaluate(record: dict[str, Any], horizon: int = 50) -> dict[str, Any]:
    """Per signal: stable range, false alarms per 1,000 steps, lead time before each spike."""
    spikes = record["spikes"]
    steps = len(record["losses"]) - record["first_step"]
    out = {}
    for name in RATIOS:
        stable, false_alarms, leads, inside = [], 0, [], 0
        for m in record["measurements"]:
            r = m["ratios"].get(name, math.nan)
            step = m["step"]
            in_spike = any(sp["step"] <= step + 1 <= sp["end"] for sp in spikes)
            ahead = any(step < sp["step"] <= step + horizon for sp in spikes)
            if in_spike:
                inside += 1
                continue
            if not ahead:
                if math.isfinite(r):
                    stable.append(r)
                    false_alarms += r >= 1.0
        for sp in spikes:
            before = [
                m
                for m in record["measurements"]
                if sp["step"] - horizon <= m["step"] < sp["step"]
                and not any(o["step"] <= m["step"] + 1 <= o["end"] for o in spikes)
            ]
            crossed = [m["step"] for m in before if m["ratios"].get(name, math.nan) >= 1.0]
            leads.append(sp["step"] - min(crossed) if crossed else None)
        finite = [r for r in stable]
        out[name] = {
            "stable_min": min(finite) if finite else math.nan,
            "stable_max": max(finite) if finite else math.nan,
            "stable_measurements": len(finite),
            "false_alarms": false_alarms,
            "false_alarms_per_1000_steps": 1000 * false_alarms / max(steps, 1),
            "leads": leads,
            "nan_measurements": sum(
                1 for m in record["measurements"] if not math.isfinite(m["ratios"].get(name, math.nan))
            ),
        }
    return out


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per signal, one column per run; a cell is ``stable range; false alarms per 1,000
    steps; lead time of each spike`` (``miss``: no crossing in the 50 steps before it)."""
    runs = results["runs"]
    head = "| signal | " + " | ".join(runs) + " |"
    spikes = (
        "| spikes (step: 50-step low -> peak) | "
        + " | ".join(
            ", ".join(f"{sp['step']}: {sp['reference']:.2f}->{sp['peak']:.2f}" for sp in rec["spikes"]) or "none"
            for rec in runs.values()
        )
        + " |"
    )
    lines = [head, "| --- | " + " | ".join("---" for _ in runs) + " |", spikes]
    for sig in RATIOS:
        cells = []
        for rec in runs.values():
            e = rec["evaluation"][sig]
            rng = f"{e['stable_min']:.2g} to {e['stable_max']:.2g}" if e["stable_measurements"] else "-"
            lead = ("; lead " + ",".join("miss" if x is None else str(x) for x in e["leads"])) if e["leads"] else ""
            cells.append(f"{rng}; FA {e['false_alarms_per_1000_steps']:.0f}{lead}")
        lines.append(f"| {sig} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    results: dict[str, Any], path: str, signals=("a_precond", "b_restricted", "h_headline", "c_batch", "e_critical")
) -> None:
    """One column per run: the training loss (spikes shaded) over the ratios of ``signals`` (log scale, 1 marked).

    Signals that no measurement of the file has (``--headline-only`` runs) are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    signals = [
        sig
        for sig in signals
        if any(math.isfinite(m["ratios"].get(sig, math.nan)) for rec in runs.values() for m in rec["measurements"])
    ]
    fig, axes = plt.subplots(2, len(runs), figsize=(3.2 * len(runs), 5.2), sharex="col", squeeze=False)
    for col, (name, rec) in enumerate(runs.items()):
        first = rec["first_step"]
        start = max(0, first - 50)
        steps = list(range(start + 1, len(rec["losses"]) + 1))
        top, bottom = axes[0][col], axes[1][col]
        top.plot(steps, rec["losses"][start:], lw=0.8, color="k")
        top.set_title(name, fontsize=9)
        top.set_yscale("log")
        for ax in (top, bottom):
            for sp in rec["spikes"]:
                ax.axvspan(sp["step"], sp["end"], color="r", alpha=0.15)
            if first:
                ax.axvline(first, color="gray", ls=":", lw=0.8)
        for sig in signals:
            xs = [m["step"] for m in rec["measurements"]]
            ys = [abs(m["ratios"].get(sig, math.nan)) for m in rec["measurements"]]
            bottom.plot(xs, ys, marker=".", lw=0.8, label=sig)
        bottom.axhline(1.0, color="r", lw=0.8)
        bottom.set_yscale("log")
        bottom.set_xlabel("step")
    axes[0][0].set_ylabel("training loss")
    axes[1][0].set_ylabel("|ratio| to threshold")
    axes[1][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------
def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except OSError:
        return ""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="steps of the stable runs (default: the preset's)")
    parser.add_argument("--branch", type=int, default=None, help="step at which the spike runs branch off")
    parser.add_argument("--after", type=int, default=None, help="steps of a spike run after its branch")
    parser.add_argument("--every", type=int, default=None, help="measure every this many steps (default: the preset's)")
    parser.add_argument(
        "--near", type=int, default=None, help="measure every --every-near steps this long after a branch"
    )
    parser.add_argument("--every-near", type=int, default=None, help="cadence near a branch (default: the preset's)")
    parser.add_argument(
        "--runs",
        nargs="*",
        default=None,
        help="only these runs (a parent is trained unmeasured to its branches' step when not named)",
    )
    parser.add_argument("--no-digits", action="store_true", help="skip the full-batch digits check")
    parser.add_argument("--matvecs", type=int, default=None, help="Lanczos products for (a) and (b)")
    parser.add_argument("--batches", type=int, default=None, help="training batches for (c)")
    parser.add_argument("--tol", type=float, default=1e-2)
    parser.add_argument("--spike-margin", type=float, default=0.5, help="nats above the 50-step low")
    parser.add_argument("--out", default="benchmarks/results/adam_signal_cpu.json")
    parser.add_argument("--quick", action="store_true", help="a smoke test: a few steps of everything")
    parser.add_argument(
        "--headline-only",
        action="store_true",
        help="only (a), (b) and the monitor's headline (h): no training batches, no line search",
    )
    parser.add_argument("--merge", action="store_true", help="keep the other runs already in --out")
    parser.add_argument("--plot", default=None, help="only draw --out's runs into this PNG (no training)")
    return parser.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.plot:
        with open(args.out) as f:
            results = json.load(f)
        plot(results, args.plot)
        return results
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = MODELS[args.model]
    if args.quick:
        preset = replace(
            preset, steps=40, branch=20, after=20, every=10, every_near=10, near=20, matvecs=3, batches=1, probe_batch=2
        )
    preset = replace(
        preset,
        steps=args.steps or preset.steps,
        branch=args.branch or preset.branch,
        after=args.after or preset.after,
        every=args.every or preset.every,
        near=preset.near if args.near is None else args.near,
        every_near=args.every_near or preset.every_near,
    )
    problems = [lm_problem(preset, device)]
    if not args.no_digits and args.device == "cpu":
        digits = digits_problem_(device)
        if args.quick:
            digits.preset = replace(digits.preset, steps=40, every=10, matvecs=3)
        problems.append(digits)
    results: dict[str, Any] = {
        "meta": {
            "commit": _git_commit(),
            "torch": torch.__version__,
            "threads": args.threads,
            "device": str(device),
            "cuda_device": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "processor": platform.processor() or platform.machine(),
            "args": vars(args),
            "preset": asdict(preset),
            "signals": SIGNALS,
            "gd_threshold_signals": GD_THRESHOLD,
        },
        "runs": {},
    }
    results["meta"]["invocations"] = [" ".join(sys.argv[1:] if argv is None else argv)]
    if args.merge and os.path.exists(args.out):  # keep the runs of an earlier invocation not rerun now
        with open(args.out) as f:
            earlier = json.load(f)
        results["runs"] = earlier["runs"]
        results["meta"]["invocations"] = earlier["meta"].get("invocations", []) + results["meta"]["invocations"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for problem in problems:
        specs = (
            runs_for(problem.preset, args.quick)
            if problem.name != "digits"
            else [
                RunSpec(
                    "digits_full_batch_adam",
                    "edge",
                    problem.preset.lr,
                    problem.preset.steps,
                    note="full-batch Adam lr 3e-3 on the demo's digits MLP (38/lr known to hold)",
                )
            ]
        )
        wanted = {s.name for s in specs}
        if args.runs is not None:
            wanted &= set(args.runs)
        parents = {s.parent for s in specs if s.name in wanted and s.parent}
        specs = [s for s in specs if s.name in wanted | parents]
        if not specs:
            continue
        branch_points = {s.branch for s in specs if s.parent}
        snapshots: dict = {}
        for spec in specs:
            if spec.name not in wanted:  # a parent run only for its branches' starting state
                print(f"{problem.name}: {spec.name} to step {max(branch_points)}, unmeasured", flush=True)
                run(problem, spec, args, snapshots, branch_points, stop=max(branch_points), measuring=False)
                continue
            print(f"{problem.name}: {spec.name} ({spec.note or spec.kind})", flush=True)
            record = run(problem, spec, args, snapshots, branch_points)
            record["problem"] = problem.name
            record["spikes"] = find_spikes(
                record["losses"],
                record["first_step"],
                problem.spike_abs if problem.name == "digits" else args.spike_margin,
                problem.spike_rel,
            )
            record["evaluation"] = evaluate(record)
            results["runs"][spec.name] = record
            print(f"  spikes: {record['spikes']}; {record['seconds']:.0f} s", flush=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1, default=float)
    results["table"] = table(results)
    print(results["table"])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main()
