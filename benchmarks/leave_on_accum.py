"""Leave it on, in the user's units: the monitor's share at the tokens per step people train with.

Issue 24, item 3. A GPT-2 355M shape (``GPT2Config``: 24 layers, 1024 wide, 16 heads,
vocabulary 50,257, dropout 0, the default attention) trains with bf16 autocast and AdamW
(lr 3e-4 after a linear warm-up, betas 0.9/0.95, weight decay 0.1, gradient clipping 1.0)
on truth.py's bigram language (no downloads), ``A`` micro-batches of ``--rows`` x ``--seq``
tokens (4 x 512) per optimizer step. First ``--warmup-steps`` optimizer steps untimed (at
``--warmup-accum`` micro-batches each), so the monitor meets a trained state; then, per
configuration (``--accum``), deep copies of that state:

* ``side`` (side by side): a bare copy and one monitored copy per probe (``--probes`` rows of
  ``--seq`` held-out tokens) train on the same micro-batches, their steps interleaved in one
  process (order alternating), every step timed to a CUDA sync; each monitor's clock skips the
  other copies' steps (``monitor._cost``, as share_cpu.py does). Overhead =
  ``T_monitored / T_bare - 1``, wall clock of every step, measurements and sinks included.
* ``account`` (one run; where side by side does not fit the GPU time, 131k tokens per step):
  one copy trains; after each ``opt.step()`` every monitor's ``maybe_measure`` (what ``attach``
  does), each monitor's clock skipping the others' measurements. Reported: the monitor's
  measured seconds (``maybe_measure`` wall clock, sinks included) against the run's measured
  training seconds, which is not a side-by-side number.

Each monitor is ``CurvatureMonitor(model, probe, optimizer=opt, every=...)`` with the default
``Budget`` (a 5% share plus 0.03 s per run; ``--overhead`` changes the share) and a JSONL sink,
attached in ``side`` mode. Reported per configuration and probe: the overhead, the monitor's own
account (measuring / training seconds; ``result.overhead`` at its last), measurements made / due
and per 1,000 steps, how many were certified (``converged``, the threshold's eigenvalue not in
``uncertified`` and a finite ``sharpness_ratio``), and the last measurement against a float32
reference at the state it measured (a host snapshot of the parameters, optimizer state and
gradients taken right after that step, untimed and kept out of the monitors' accounts; put back
once the run is over): exact double backward, no TF32, math attention, eval mode, Lanczos to
``--ref-tol``, outside every timed region, for ``preconditioned_lambda_max`` = lambda_max(P^-1/2
H P^-1/2) with ``P`` from :func:`reference_diagonal` (one place to change), and ``lambda_max``.
Peak CUDA memory per phase, the card, the versions and the commit go into ``--out`` (JSON,
rewritten after every phase, so a run cut short keeps what it measured); a table is printed at
the end.

Expected wall time is printed at the start (from ``--est-*``: a 355M bf16 micro-step of 4 x 512
on an H100 is 65-75 ms) and again after the warm-up from the measured micro-step; ``--deadline``
(seconds from the start) stops a configuration's steps early so that its reference and the
configurations after it still fit.

Usage (one H100/H200)::

    python benchmarks/leave_on_accum.py --accum 8 --out $OUT/accum_16k.json          # side by side
    python benchmarks/leave_on_accum.py --accum 64,1 --probes 4,1 --out $OUT/accum_131k_1to1.json
    python benchmarks/leave_on_accum.py --quick --device cpu --out /tmp/accum_quick.json  # smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import curvwatch as cw  # noqa: E402
from benchmarks.truth import (  # noqa: E402
    BigramLanguage,
    RefConfig,
    _json_default,
    exact_arithmetic,
    git_commit,
    lanczos_reference,
    reference_model,
    write_json,
)
from curvwatch.optim.linearization import restrict_to_linear_  # noqa: E402

STARTED = time.perf_counter()

# name: GPT2Config fields and the bigram language's size (tokens of the vocabulary it uses)
MODELS = {
    "355M": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257, "n_positions": 1024,
             "language": 2000},
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 512, "n_positions": 64, "language": 256},
}
# micro-batches per step: (mode, steps, every) unless given; quick: (mode, steps, every) of the smoke run
DEFAULTS = {1: ("side", 300, 100), 8: ("side", 300, 100), 64: ("account", 40, 20)}
QUICK = {2: ("side", 20, 10), 4: ("account", 12, 6)}


@dataclass(frozen=True)
class Config:
    """One configuration: ``accum`` micro-batches per optimizer step, timed as ``mode`` for ``steps``."""

    accum: int
    mode: str  # "side" | "account"
    steps: int
    every: int


# --------------------------------------------------------------------------------------------
# data, model, training
# --------------------------------------------------------------------------------------------


class Data:
    """A pool of training sequences of the bigram language, and held-out probes (nested rows)."""

    def __init__(self, language: BigramLanguage, pool: int, rows: int, seq: int, probes: list[int],
                 device: torch.device) -> None:
        self.rows = rows
        self.pool = language.sample(pool, seq, torch.Generator().manual_seed(1)).to(device)
        held_out = language.sample(max(probes), seq, torch.Generator().manual_seed(2)).to(device)
        self.probes = {p: {"input_ids": held_out[:p], "labels": held_out[:p]} for p in probes}

    def step(self, index: int, accum: int) -> list[torch.Tensor]:
        """The ``accum`` micro-batches of global optimizer step ``index`` (the pool cycles)."""
        n = len(self.pool) // self.rows
        return [self.pool[((index * accum + m) % n) * self.rows:][: self.rows] for m in range(accum)]


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    spec = {k: v for k, v in MODELS[name].items() if k != "language"}
    config = GPT2Config(**spec, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if config.vocab_size < 50257:
        config.bos_token_id = config.eos_token_id = 0  # inside the vocabulary
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(device).train()


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over ``--lr-warmup`` optimizer steps, then constant (``step`` counts from 0)."""
    return args.lr * min(1.0, (step + 1) / max(args.lr_warmup, 1))


def train_step(model, opt, batches: list[torch.Tensor], lr: float, args, marks: list | None = None) -> torch.Tensor:
    """One optimizer step over ``batches`` (gradient accumulation); the mean loss (on the device).

    ``marks``: a list to append the (synced) time between the micro-batches and the optimizer step to.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=batches[0].device)
    for ids in batches:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(input_ids=ids, labels=ids).loss / len(batches)
        loss.backward()
        total += loss.detach()
    if marks is not None:
        sync(batches[0].device)
        marks.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()  # an attached monitor measures here
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(args, data: Data, device: torch.device) -> tuple[torch.nn.Module, Any, dict]:
    """Train ``--warmup-steps`` optimizer steps, untimed: the state every configuration starts from."""
    model = build_model(args.model, device)
    opt = make_optimizer(model, args)
    reset_peak(device)
    losses, started, micro, update = [], time.perf_counter(), [], []
    for s in range(args.warmup_steps):
        marks = [] if s >= args.warmup_steps - 10 else None  # the last steps' times (warm allocator)
        if marks is not None:
            sync(device)
        t = time.perf_counter()
        loss = train_step(model, opt, data.step(s, args.warmup_accum), lr_at(s, args), args, marks)
        if s % 10 == 0 or s == args.warmup_steps - 1:
            losses.append((s + 1, float(loss)))  # a sync, every 10 steps
        if marks is not None:
            sync(device)
            micro.append((marks[0] - t) / args.warmup_accum)
            update.append(time.perf_counter() - marks[0])
    sync(device)
    micro_s, update_s = _median(micro), _median(update)
    out = {"steps": args.warmup_steps, "accum": args.warmup_accum, "seconds": time.perf_counter() - started,
           "micro_step_s": micro_s, "update_s": update_s, "losses": losses, "step_peak_gib": peak_gib(device),
           "resident_gib": allocated_gib(device), "params": sum(p.numel() for p in model.parameters())}
    print(f"[warm-up] {args.warmup_steps} steps of {args.warmup_accum} x {args.rows}x{args.seq} in "
          f"{out['seconds']:.1f} s; loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f}; micro-step (forward and "
          f"backward) {micro_s * 1e3:.1f} ms, clipping + AdamW {update_s * 1e3:.1f} ms; peak "
          f"{_g(out['step_peak_gib'])} GiB", flush=True)
    return model, opt, out


def copies_of(warm: list, n: int, release: bool) -> list[tuple[torch.nn.Module, torch.optim.Optimizer]]:
    """``n`` deep copies of ``warm = [model, optimizer]`` (the state keyed by each copy's parameters).

    ``release``: the last configuration: the warm state itself is the last copy, and ``warm`` is emptied.
    """
    out = [copy.deepcopy(tuple(warm)) for _ in range(n - 1 if release else n)]
    if release:
        out.append(tuple(warm))
        warm.clear()
    return out


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------


def reference_diagonal(opt: torch.optim.Optimizer, params: list[torch.Tensor], grad: torch.Tensor):
    """The diagonal ``P`` of the reference's preconditioned sharpness lambda_max(P^-1/2 H P^-1/2).

    Adam's ``sqrt(v_hat) + eps`` on its linear set, as the monitor's headline reads it
    (:mod:`curvwatch.optim.linearization`): ``P_i^-1/2 = 0`` where ``grad``, the flat float32
    gradient of the probe loss at this state, would more than double ``v_hat_i``.
    """
    diagonal = cw.preconditioner_diagonal(opt, params)
    restrict_to_linear_(diagonal, opt, params, grad)
    return diagonal


def reference(model: torch.nn.Module, opt: torch.optim.Optimizer, probe: dict, args,
              last: bool = True) -> dict[str, Any]:
    """Preconditioned sharpness and lambda_max at ``model``'s state, exact products in float32.

    On the live model (eval mode, modes restored; the run is over), the diagonal read first;
    then, when this is the ``last`` reference of the model, the optimizer state and ``.grad``
    are dropped (memory for the basis). Top ``--ref-k`` eigenvalues to ``--ref-tol`` within
    ``--ref-hvps`` products, a basis of ``--ref-basis``.
    """
    device = next(model.parameters()).device
    free_memory(device)
    reset_peak(device)
    started = time.perf_counter()
    cfg = RefConfig(dtype=torch.float32, tol=args.ref_tol, max_matvecs=args.ref_hvps, max_basis=args.ref_basis,
                    live=True)
    out: dict[str, Any] = {"dtype": "float32", "method": "double_backward", "tol": cfg.tol,
                           "max_matvecs": cfg.max_matvecs, "max_basis": cfg.max_basis, "k": args.ref_k}
    params = [p for p in model.parameters() if p.requires_grad]
    with exact_arithmetic(device), reference_model(model, cfg) as ref:

        def closure() -> torch.Tensor:
            return ref(**probe).loss

        grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(closure(), params)])
        diagonal = reference_diagonal(opt, params, grad)
        del grad
        if last:  # the run is over: its state's memory goes to the basis
            opt.state.clear()
            for p in params:
                p.grad = None
        op = cw.HessianOperator(closure, params, method="double_backward")
        solves = {"raw": op} if diagonal is None else {"preconditioned": cw.PreconditionedOperator(op, diagonal),
                                                       "raw": op}  # the threshold's quantity first
        for name, solved in solves.items():
            try:
                out[name] = lanczos_reference(solved, args.ref_k, cfg)
            except torch.cuda.OutOfMemoryError as error:  # report and go on
                out[name] = {"error": f"OutOfMemoryError: {str(error)[:200]}"}
                free_memory(device)
        out["loss"] = op.loss
        op.release()
        del op, diagonal, solves
    free_memory(device)
    out["seconds"] = time.perf_counter() - started
    out["peak_gib"] = peak_gib(device)
    return out


def rel_error(value: float, ref: dict | None) -> float | None:
    if not ref or "eigenvalues" not in ref or not math.isfinite(value):
        return None
    top = ref["eigenvalues"][0]
    return abs(value - top) / abs(top)


# --------------------------------------------------------------------------------------------
# monitors and their summaries
# --------------------------------------------------------------------------------------------


def make_monitor(model, opt, probe: dict, every: int, args, sink_dir: str, label: str) -> cw.CurvatureMonitor:
    budget = cw.Budget(overhead=args.overhead)  # the default Budget: 5% share, 0.03 s per run
    sinks = (cw.JsonlSink(os.path.join(sink_dir, f"{label}.jsonl")),)
    return cw.CurvatureMonitor(model, probe, optimizer=opt, every=every, budget=budget, sinks=sinks)


def certified(r: cw.CurvatureResult) -> bool:
    """Converged, the threshold's eigenvalue (AdamW: the preconditioned one) certified, a ratio reported."""
    return (bool(r.converged) and math.isfinite(r.preconditioned_lambda_max)
            and "preconditioned_lambda_max" not in r.uncertified and math.isfinite(r.sharpness_ratio))


def measurement(r: cw.CurvatureResult, wall: float | None) -> dict[str, Any]:
    return {"step": r.step, "hvps": r.hvps, "seconds": r.seconds, "wall_seconds": wall, "method": r.method,
            "precision": r.precision, "converged": r.converged, "uncertified": list(r.uncertified),
            "certified": certified(r), "preconditioned_lambda_max": r.preconditioned_lambda_max,
            "lambda_max": r.lambda_max, "eigenvalues": list(r.eigenvalues), "error_bound": r.error_bound,
            "threshold": r.threshold, "sharpness_ratio": r.sharpness_ratio, "trace": r.trace,
            "overhead": r.overhead, "loss": r.loss}


def monitor_summary(mon: cw.CurvatureMonitor, steps: int, every: int, walls: dict[int, float]) -> dict[str, Any]:
    """Measurements made, due and certified, and the monitor's own time account at the end of the run."""
    history = mon.history
    due = steps // every
    account = mon._cost
    account.training_until_now()  # the steps after its last due step are training too
    return {
        "due": due, "made": len(history), "certified": sum(certified(r) for r in history),
        "made_per_1000_steps": 1000 * len(history) / steps if steps else math.nan,
        "due_per_1000_steps": 1000 * due / steps if steps else math.nan,
        "monitor_overhead": history[-1].overhead if history else math.nan,  # result.overhead, at its last
        "own_share_at_end": account.share,  # measuring / training seconds of its account, at the run's end
        "account": {"training_seconds": account.training_seconds, "measuring_seconds": account.measuring_seconds,
                    "share": account.share, "seconds_per_product": account.seconds_per_product},
        "plan": mon.last_plan.message if mon.last_plan else None,
        "measurements": [measurement(r, walls.get(r.step)) for r in history],
    }


def compare_last(summary: dict, ref: dict, ref_step: int) -> None:
    """The last measurement against the reference taken at step ``ref_step`` (the same state when equal)."""
    last = summary["measurements"][-1] if summary["measurements"] else None
    summary["reference"] = {**ref, "step": ref_step}
    summary["last"] = None if last is None else {
        "step": last["step"], "same_state": last["step"] == ref_step, "certified": last["certified"],
        "preconditioned_rel_error": rel_error(last["preconditioned_lambda_max"], ref.get("preconditioned")),
        "lambda_rel_error": rel_error(last["lambda_max"], ref.get("raw")),
        "reference_converged": {k: ref[k].get("converged") for k in ("preconditioned", "raw") if k in ref},
    }


def _host(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host(v) for v in obj)
    return copy.deepcopy(obj)


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """The state a measurement saw, on the host: parameters, optimizer state, gradients (for its reference)."""
    return {"step": step, "model": _host(model.state_dict()), "opt": _host(opt.state_dict()),
            "grads": [None if p.grad is None else _host(p.grad) for p in model.parameters()]}


def restore(model: torch.nn.Module, opt: torch.optim.Optimizer, snap: dict[str, Any]) -> None:
    """Put :func:`snapshot`'s state back (the run is over; the reference is taken there)."""
    model.load_state_dict(snap["model"])
    opt.load_state_dict(snap["opt"])
    for p, g in zip(model.parameters(), snap["grads"]):
        p.grad = None if g is None else g.to(p.device)


def pause(monitors: list[cw.CurvatureMonitor], seconds: float) -> None:
    """Keep ``seconds`` of work that is neither training nor measuring out of every monitor's account."""
    for mon in monitors:
        mon._cost.skip(seconds)  # what monitor.not_training() does around a block


# --------------------------------------------------------------------------------------------
# the two timings
# --------------------------------------------------------------------------------------------


class Clock:
    """Where the configuration must stop stepping so that its reference and the rest still fit."""

    def __init__(self, deadline: float | None, reserve: float) -> None:
        self.end = None if deadline is None else STARTED + deadline - reserve

    def stop(self, one_step: float) -> bool:
        return self.end is not None and time.perf_counter() + one_step > self.end


def side_by_side(cfg: Config, warm: list, data: Data, args, clock: Clock, sink_dir: str, first_step: int,
                 release: bool) -> dict:
    device = next(warm[0].parameters()).device
    labels = ["bare", *(f"probe_{p}" for p in args.probes)]
    copies = [{"label": label, "model": model, "opt": opt, "seconds": 0.0, "times": [], "losses": []}
              for label, (model, opt) in zip(labels, copies_of(warm, len(labels), release))]
    free_memory(device)
    reset_peak(device)
    resident = allocated_gib(device)
    for c, p in zip(copies[1:], args.probes):
        c["monitor"] = make_monitor(c["model"], c["opt"], data.probes[p], cfg.every, args, sink_dir,
                                    f"A{cfg.accum}_{c['label']}")
        c["handle"] = c["monitor"].attach(c["opt"])
        c["walls"] = {}
    monitored = copies[1:]
    step_s = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for c in monitored:
            c["monitor"]._cost.last = time.perf_counter()  # training time starts with the loop
        done = 0
        for s in range(cfg.steps):
            if done and clock.stop(len(copies) * step_s):
                break
            batches = data.step(first_step + s, cfg.accum)
            lr = lr_at(first_step + s, args)
            for c in copies if s % 2 == 0 else copies[::-1]:  # alternate the order
                before = len(c["monitor"].history) if "monitor" in c else 0
                sync(device)
                t = time.perf_counter()
                loss = train_step(c["model"], c["opt"], batches, lr, args)
                sync(device)
                elapsed = time.perf_counter() - t
                c["seconds"] += elapsed
                c["times"].append(elapsed)
                if s % 10 == 0 or s == cfg.steps - 1:
                    c["losses"].append((s + 1, float(loss)))
                pause([o["monitor"] for o in monitored if o is not c], elapsed)  # another copy's step
                if "monitor" in c and len(c["monitor"].history) > before:
                    c["walls"][s + 1] = elapsed
                    c.pop("snapshot", None)
                    if s + 1 < cfg.steps:  # the state it measured, for the reference (untimed)
                        t = time.perf_counter()
                        c["snapshot"] = snapshot(c["model"], c["opt"], s + 1)
                        pause([o["monitor"] for o in monitored], time.perf_counter() - t)
            done = s + 1
            step_s = copies[0]["times"][-1]
    bare = copies[0]
    out: dict[str, Any] = {
        **asdict(cfg), "tokens_per_step": cfg.accum * args.rows * args.seq, "steps_run": done, "note": _note(cfg),
        "timing": "side by side: bare and monitored copies interleaved step by step in one process "
                  "(wall clock of every step incl. measurements and sinks)",
        "bare_seconds": bare["seconds"], "bare_median_step_s": _median(bare["times"]),
        "bare_losses": bare["losses"], "resident_gib": resident, "peak_gib": peak_gib(device),
        "warnings": sorted({str(w.message)[:300] for w in caught}), "probes": {},
    }
    for c, p in zip(monitored, args.probes):
        c["handle"].remove()
        quiet = [t for i, t in enumerate(c["times"]) if i + 1 not in c["walls"]]  # steps without a measurement
        summary = monitor_summary(c["monitor"], done, cfg.every, c["walls"])
        summary.update({
            "probe_tokens": p * args.seq, "monitored_seconds": c["seconds"],
            "overhead": c["seconds"] / bare["seconds"] - 1 if bare["seconds"] else math.nan,
            "median_step_s": _median(c["times"]),
            "steps_without_measurement_overhead": (
                sum(quiet) / sum(t for i, t in enumerate(bare["times"]) if i + 1 not in c["walls"]) - 1
                if quiet else math.nan
            ),
            "losses": c["losses"],
        })
        out["probes"][str(p)] = summary
        del c["monitor"], c["handle"]
    del bare["model"], bare["opt"], copies[0]
    free_memory(device)
    for c, p in sorted(zip(monitored, args.probes), key=lambda cp: cp[1]):  # the small probe's reference first
        snap = c.pop("snapshot", None)
        if args.ref_hvps and out["probes"][str(p)]["made"]:  # no measurement, nothing to compare
            if snap is not None:  # at the last measurement's state, not the end's
                restore(c["model"], c["opt"], snap)
            ref_step = done if snap is None else snap["step"]
            compare_last(out["probes"][str(p)], reference(c["model"], c["opt"], data.probes[p], args), ref_step)
        del c["model"], c["opt"], snap
        free_memory(device)
    return out


def account_run(cfg: Config, warm: list, data: Data, args, clock: Clock, sink_dir: str, first_step: int,
                release: bool) -> dict:
    device = next(warm[0].parameters()).device
    ((model, opt),) = copies_of(warm, 1, release)
    free_memory(device)
    reset_peak(device)
    resident = allocated_gib(device)
    monitors = {p: make_monitor(model, opt, data.probes[p], cfg.every, args, sink_dir, f"A{cfg.accum}_probe_{p}")
                for p in args.probes}
    measuring = {p: 0.0 for p in args.probes}
    walls: dict[int, dict[int, float]] = {p: {} for p in args.probes}
    snaps: dict[int, dict[str, Any]] = {}
    training, times, losses, done = 0.0, [], [], 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mon in monitors.values():
            mon._cost.last = time.perf_counter()
        for s in range(cfg.steps):
            if done and clock.stop(times[-1] + sum(measuring.values()) / done):
                break
            sync(device)
            t = time.perf_counter()
            loss = train_step(model, opt, data.step(first_step + s, cfg.accum), lr_at(first_step + s, args), args)
            sync(device)
            elapsed = time.perf_counter() - t
            training += elapsed
            times.append(elapsed)
            if s % 5 == 0 or s == cfg.steps - 1:
                losses.append((s + 1, float(loss)))
            for p, mon in monitors.items():  # after opt.step(), as attach does
                t = time.perf_counter()
                result = mon.maybe_measure(s + 1)
                sync(device)
                spent = time.perf_counter() - t
                measuring[p] += spent
                pause([o for o in monitors.values() if o is not mon], spent)  # another monitor's measurement
                if result is not None:
                    walls[p][s + 1] = spent
                    t = time.perf_counter()  # the state it measured, for the reference (untimed)
                    snaps[p] = snapshot(model, opt, s + 1)
                    pause(list(monitors.values()), time.perf_counter() - t)
            done = s + 1
    out: dict[str, Any] = {
        **asdict(cfg), "tokens_per_step": cfg.accum * args.rows * args.seq, "steps_run": done, "note": _note(cfg),
        "timing": "account, not side by side: one run; the monitor's measured seconds (maybe_measure after "
                  "each opt.step(), sinks included) against the run's measured training seconds",
        "training_seconds": training, "median_step_s": _median(times), "losses": losses,
        "resident_gib": resident, "peak_gib": peak_gib(device),
        "warnings": sorted({str(w.message)[:300] for w in caught}), "probes": {},
    }
    for p, mon in monitors.items():
        summary = monitor_summary(mon, done, cfg.every, walls[p])
        summary.update({"probe_tokens": p * args.seq, "monitor_seconds": measuring[p],
                        "share_of_training": measuring[p] / training if training else math.nan})
        out["probes"][str(p)] = summary
    del monitors
    free_memory(device)
    probes = sorted(p for p in args.probes if out["probes"][str(p)]["made"])  # no measurement, no reference
    if args.ref_hvps and probes:
        state = done
        for p in probes:  # each at its last measurement's state; the optimizer state is dropped at the last one
            snap = snaps.pop(p, None)
            if snap is not None and snap["step"] != state:
                restore(model, opt, snap)
                state = snap["step"]
            compare_last(out["probes"][str(p)], reference(model, opt, data.probes[p], args, p == probes[-1]), state)
            del snap
    del model, opt, snaps
    free_memory(device)
    return out


# --------------------------------------------------------------------------------------------
# estimates, the table, the command line
# --------------------------------------------------------------------------------------------


def estimate(configs: list[Config], args, micro_s: float, update_s: float | None = None) -> dict[str, Any]:
    """Expected seconds of each configuration from one micro-step's and one update's seconds (--est-* factors)."""
    update_s = args.est_opt_s if update_s is None or not math.isfinite(update_s) else update_s
    hvp = {p: args.est_hvp_x * micro_s * p / args.rows for p in args.probes}
    ref_product = {p: args.est_ref_x * micro_s * p / args.rows for p in args.probes}
    spec = MODELS[args.model]
    params = (12 * spec["n_layer"] * spec["n_embd"] ** 2
              + (spec["vocab_size"] + spec["n_positions"]) * spec["n_embd"])
    host_copy = 16 * params / (args.est_host_gbps * 1e9)  # parameters, AdamW state, gradients
    out: dict[str, Any] = {"micro_step_s": micro_s, "update_s": update_s, "params": params, "configs": {}}
    out["warmup_s"] = args.warmup_steps * (args.warmup_accum * micro_s + update_s)
    for cfg in configs:
        step = cfg.accum * micro_s + update_s
        copies = 1 + len(args.probes) if cfg.mode == "side" else 1
        train = copies * cfg.steps * step
        due = cfg.steps // cfg.every
        # each monitor: its share of its own training time, at most every due step's full budget
        monitor = sum(min(args.overhead * cfg.steps * step + 0.03, due * 70 * hvp[p]) for p in args.probes)
        ref = sum(2 * args.ref_hvps * ref_product[p] for p in args.probes) if args.ref_hvps else 0.0
        ref += len(args.probes) * (due + 1) * host_copy  # host snapshots, and one put back per probe
        out["configs"][f"A{cfg.accum}"] = {"mode": cfg.mode, "steps": cfg.steps, "every": cfg.every,
                                           "step_s": step, "train_s": train, "monitor_s": monitor,
                                           "reference_s_at_most": ref, "total_s": train + monitor + ref}
    out["total_s"] = args.est_startup_s + out["warmup_s"] + sum(c["total_s"] for c in out["configs"].values())
    return out


def print_estimate(est: dict, when: str) -> None:
    print(f"[estimate, {when}] micro-step {est['micro_step_s'] * 1e3:.0f} ms, update {est['update_s'] * 1e3:.0f} ms; "
          f"warm-up {est['warmup_s']:.0f} s", flush=True)
    for name, c in est["configs"].items():
        print(f"  {name:<4} {c['mode']:<7} {c['steps']} steps, every {c['every']}: step {c['step_s']:.3f} s, "
              f"training {c['train_s']:.0f} s + monitor {c['monitor_s']:.0f} s + reference <= "
              f"{c['reference_s_at_most']:.0f} s = {c['total_s']:.0f} s", flush=True)
    print(f"  total about {est['total_s']:.0f} s ({est['total_s'] / 60:.1f} min), startup included", flush=True)


def later_reserve(est: dict, configs: list[Config], i: int) -> float:
    """Seconds to keep for configuration ``i``'s reference and every configuration after it."""
    c = est["configs"]
    return c[f"A{configs[i].accum}"]["reference_s_at_most"] + sum(
        c[f"A{cfg.accum}"]["total_s"] for cfg in configs[i + 1:]
    )


def table(out: dict[str, Any]) -> str:
    head = (f"{'A':>3} {'tok/step':>8} {'probe':>5} {'timing':<7} {'steps':>5} {'overhead':>9} {'own acct':>8} "
            f"{'made/due':>8} {'/1k':>5} {'cert':>4} {'last':>5} {'pre err':>8} {'lam err':>8}")
    lines = [head, "-" * len(head)]
    for run in out.get("runs", []):
        for p, s in run["probes"].items():
            value = s.get("overhead", s.get("share_of_training"))
            last = s.get("last") or {}
            lines.append(
                f"{run['accum']:>3} {run['tokens_per_step']:>8} {int(p) * out['meta']['args']['seq']:>5} "
                f"{run['mode']:<7} {run['steps_run']:>5} {_pct(value):>9} {_pct(s['own_share_at_end']):>8} "
                f"{s['made']:>3}/{s['due']:<4} {s['made_per_1000_steps']:>5.1f} {s['certified']:>4} "
                f"{str(last.get('step', '-')) + ('' if last.get('same_state', True) else '*'):>5} "
                f"{_e(last.get('preconditioned_rel_error')):>8} {_e(last.get('lambda_rel_error')):>8}"
            )
    lines.append("overhead: side = T_monitored / T_bare - 1 (interleaved); account = monitor seconds / training "
                 "seconds of the same run (not side by side). own acct: the monitor's own account (measuring / "
                 "training seconds) at the end. "
                 "last*: the reference is not at the last measurement's state")
    return "\n".join(lines)


def _note(cfg: Config) -> str | None:
    if cfg.every == 100:
        return None
    return (f"every={cfg.every}, not 100: each due step saves up {cfg.every} steps' share (at every=100 a "
            f"measurement may spend {100 / cfg.every:g}x the seconds, up to Budget.max_hvps)")


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else math.nan


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:+.1f}%"


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def source_hash() -> str:
    """sha256 of the curvwatch sources measured (a tree copied without .git has no commit)."""
    root = Path(cw.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def meta(args, device: torch.device) -> dict[str, Any]:
    import transformers

    root = Path(cw.__file__).resolve().parent.parent
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
            "commit": os.environ.get("CURVWATCH_COMMIT") or git_commit(root), "curvwatch_source_sha256": source_hash(),
            "argv": sys.argv, "args": vars(args), "budget": asdict(cw.Budget(overhead=args.overhead))}
    if device.type == "cuda":
        info.update({"card": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                     "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30})
    else:
        info["card"] = "cpu"
    return info


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[Config]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: tiny GPT-2 (2 x 64), 4 x 64 tokens, 30 warm-up steps, A=2 side by side "
                        "and A=4 account, 20/12 steps, probes 4,1")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="default 355M (tiny with --quick)")
    p.add_argument("--accum", default=None, help="micro-batches per optimizer step, comma-separated (default 8)")
    p.add_argument("--mode", default=None, help="side | account, one or one per --accum (default: side for A<=16)")
    p.add_argument("--steps", default=None, help="timed steps, one or one per --accum (default 300; A>16: 40)")
    p.add_argument("--every", default=None, help="measure every N steps, one or one per --accum (default 100; "
                                                 "A>16: 20, so that 40 steps see two due measurements)")
    p.add_argument("--probes", default="4", help="probe rows of --seq held-out tokens, comma-separated (4,1)")
    p.add_argument("--rows", type=int, default=4, help="sequences per micro-batch. Default 4")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence. Default 512 (64 with --quick)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed optimizer steps first (300; quick 30)")
    p.add_argument("--warmup-accum", type=int, default=1, help="micro-batches per warm-up step. Default 1")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-warmup", type=int, default=None, help="linear lr warm-up steps (default 50; quick 10)")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--autocast", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: CUDA)")
    p.add_argument("--overhead", type=float, default=0.05, help="Budget.overhead (the default 5%% share)")
    p.add_argument("--pool", type=int, default=None, help="training sequences generated (4096; quick 512)")
    p.add_argument("--ref-tol", type=float, default=1e-4)
    p.add_argument("--ref-hvps", type=int, default=None, help="products per reference solve (80; 0: none)")
    p.add_argument("--ref-basis", type=int, default=10, help="reference Lanczos basis vectors. Default 10")
    p.add_argument("--ref-k", type=int, default=2, help="eigenvalues per reference solve. Default 2")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from the start: steps stop early to leave time for the references and later "
                        "configurations (default 540 on CUDA, none on the CPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--est-micro-s", type=float, default=0.070, help="355M bf16 4x512 micro-step (H100)")
    p.add_argument("--est-opt-s", type=float, default=0.015, help="clipping + AdamW step, 355M")
    p.add_argument("--est-hvp-x", type=float, default=2.5, help="a monitor product, in micro-steps")
    p.add_argument("--est-ref-x", type=float, default=5.0, help="a float32 reference product, in micro-steps")
    p.add_argument("--est-startup-s", type=float, default=30.0, help="imports, model, tokens")
    p.add_argument("--est-host-gbps", type=float, default=4.0, help="device-to-host copies (snapshots), GB/s")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/leave_on_accum_<device>.json)")
    args = p.parse_args(argv)
    q = args.quick
    args.model = args.model or ("tiny" if q else "355M")
    args.seq = args.seq or (64 if q else 512)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (30 if q else 300)
    args.lr_warmup = args.lr_warmup if args.lr_warmup is not None else (10 if q else 50)
    args.pool = args.pool or (512 if q else 4096)
    args.ref_hvps = args.ref_hvps if args.ref_hvps is not None else (60 if q else 80)
    args.probes = _ints(args.probes if args.probes != "4" or not q else "4,1")
    args.bf16 = args.autocast == "on" or (args.autocast == "auto" and torch.device(args.device).type == "cuda")
    if args.deadline is None and torch.device(args.device).type == "cuda":
        args.deadline = 540.0
    if q and args.est_startup_s == 30.0:
        args.est_startup_s = 5.0
    table_ = QUICK if q and args.accum is None else DEFAULTS
    accum = _ints(args.accum) if args.accum else ([*QUICK] if q else [8])
    lists = {name: (str(getattr(args, name)).split(",") if getattr(args, name) is not None else None)
             for name in ("mode", "steps", "every")}
    configs = []
    for i, a in enumerate(accum):
        mode, steps, every = table_.get(a, ("side", 300, 100) if a <= 16 else ("account", 40, 20))
        given = {k: (v[i] if len(v) == len(accum) else v[0]) if v else None for k, v in lists.items()}
        for k, v in given.items():
            if v is not None and len(lists[k]) not in (1, len(accum)):
                p.error(f"--{k} has {len(lists[k])} values; give one, or one per --accum ({len(accum)})")
        cfg = Config(a, given["mode"] or mode, int(given["steps"] or steps), int(given["every"] or every))
        if cfg.mode not in ("side", "account"):
            p.error(f"--mode must be side or account, got {cfg.mode!r}")
        configs.append(cfg)
    return args, configs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, configs = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (a CPU smoke run: --quick --device cpu)")
    path = Path(args.out or f"benchmarks/results/leave_on_accum_{device.type}.json")
    est = estimate(configs, args, args.est_micro_s)
    print_estimate(est, "from --est-micro-s")
    out: dict[str, Any] = {"meta": meta(args, device), "configs": [asdict(c) for c in configs],
                           "estimate_at_start": est, "runs": []}
    write_json(path, out)
    language = BigramLanguage(MODELS[args.model]["vocab_size"], MODELS[args.model]["language"])
    data = Data(language, args.pool, args.rows, args.seq, args.probes, device)
    warm_model, warm_opt, out["warmup"] = warm_up(args, data, device)
    warm = [warm_model, warm_opt]
    del warm_model, warm_opt
    est = estimate(configs, args, out["warmup"]["micro_step_s"], out["warmup"]["update_s"])
    print_estimate(est, "from the warm-up's micro-step")
    out["estimate_after_warmup"] = est
    write_json(path, out)
    with tempfile.TemporaryDirectory() as sink_dir:
        for i, cfg in enumerate(configs):
            clock = Clock(args.deadline, later_reserve(est, configs, i))
            run = side_by_side if cfg.mode == "side" else account_run
            started = time.perf_counter()
            print(f"[A={cfg.accum}] {cfg.mode}: {cfg.steps} steps of {cfg.accum} x {args.rows}x{args.seq}, "
                  f"every {cfg.every}, probes {args.probes}", flush=True)
            result = run(cfg, warm, data, args, clock, sink_dir, args.warmup_steps, i == len(configs) - 1)
            result["seconds"] = time.perf_counter() - started
            if result["steps_run"] < cfg.steps:
                print(f"[A={cfg.accum}] stopped after {result['steps_run']} of {cfg.steps} steps (--deadline)",
                      flush=True)
            out["runs"].append(result)
            write_json(path, out)
            _print_run(result)
    out["meta"]["seconds"] = time.perf_counter() - STARTED
    write_json(path, out)
    print(f"\nwrote {path} ({out['meta']['seconds']:.0f} s; card {out['meta']['card']})\n" + table(out), flush=True)
    return out


def _print_run(run: dict) -> None:
    print(f"[A={run['accum']}] {run['steps_run']} steps in {run['seconds']:.0f} s; GPU resident "
          f"{_g(run['resident_gib'])} GiB, peak {_g(run['peak_gib'])} GiB", flush=True)
    for p, s in run["probes"].items():
        shown = [f"{m['step']}:{m['hvps']}p/{m['seconds']:.2f}s/{'cert' if m['certified'] else 'uncert'}"
                 for m in s["measurements"]]
        print(f"[A={run['accum']} probe {p}] measurements (step:products/seconds): {' '.join(shown) or '-'}",
              flush=True)
        ref = s.get("reference") or {}
        print(f"[A={run['accum']} probe {p}] made {s['made']}/{s['due']}, certified {s['certified']}; "
              + (f"overhead {_pct(s['overhead'])}" if "overhead" in s else
                 f"monitor {s['monitor_seconds']:.1f} s / training {run['training_seconds']:.1f} s")
              + f"; own account {_pct(s['own_share_at_end'])} (last result.overhead "
              f"{_pct(s['monitor_overhead'])}); last {json.dumps(s.get('last'), default=_json_default)}"
              + f"; reference {ref.get('seconds', math.nan):.1f} s", flush=True)


if __name__ == "__main__":
    main()
