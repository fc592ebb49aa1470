"""Leave it on: a monitor's cost at real size, measured side by side in one run.

For each GPT-2-shaped model (built from a config, random bigram tokens, AdamW,
optionally bf16 autocast), this script records:

* the training step: median time and peak CUDA memory;
* an fp32 reference at the same state as each measurement: preconditioned
  sharpness (AdamW) and lambda_max by exact double backward (or central
  differences, ``--ref-method``) in full float32, tolerance 1e-4;
* each monitor configuration's first (cold) and second (warm) measurement: time
  as training steps, peak as a multiple of the step's, host RSS growth, method,
  precision, products, and the errors against the reference;
* training overhead: the same number of steps timed without and then with the
  monitor attached at ``every=100`` (defaults), the monitor's own
  ``curvature_diagnostics/overhead`` and the measurements it made or deferred.

Usage (one H200)::

    python benchmarks/leave_on.py --sizes 124M,355M --out $OUT
    python benchmarks/leave_on.py --sizes 1.5B --out $OUT
    python benchmarks/leave_on.py --sizes tiny --device cpu   # a smoke run

At the tokens per step people train with (gradient accumulation, 16k and 131k tokens per
step, a trained state, bare and monitored copies interleaved): benchmarks/leave_on_accum.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
import warnings

import torch

SIZES = {  # name: (n_layer, n_embd, n_head, autocast bf16)
    "tiny": (2, 64, 2, False),
    "124M": (12, 768, 12, False),
    "355M": (24, 1024, 16, True),
    "1.5B": (48, 1600, 25, True),
}


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 2**20
    return math.nan


def build(name: str, device: torch.device, batch: int, seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_embd, n_head, bf16 = SIZES[name]
    vocab = 50257 if name != "tiny" else 512
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=seq,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    g = torch.Generator().manual_seed(1)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)

    def tokens(b: int) -> torch.Tensor:
        t = torch.empty(b, seq, dtype=torch.long)
        t[:, 0] = torch.randint(0, vocab, (b,), generator=g)
        for i in range(1, seq):
            t[:, i] = succ[t[:, i - 1], torch.randint(0, 4, (b,), generator=g)]
        return t.to(device)

    train = [tokens(batch) for _ in range(8)]
    probe = {"input_ids": tokens(batch)}
    probe["labels"] = probe["input_ids"]
    return model, train, probe, bf16


class Training:
    """The benchmarks' training: :func:`build`'s model, AdamW (lr 1e-4, weight decay 0.1),
    bf16 autocast where the size asks for it; ``step()`` is one optimizer step."""

    def __init__(self, name: str, device: torch.device, batch: int, seq: int) -> None:
        self.device = device
        self.model, self.batches, self.probe, self.bf16 = build(name, device, batch, seq)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        self.steps = 0

    def step(self) -> None:
        x = self.batches[self.steps % len(self.batches)]
        self.steps += 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, repeats: int) -> tuple[float, float]:
        """Median seconds of ``repeats`` steps and their peak CUDA bytes (NaN on the CPU)."""
        cuda = self.device.type == "cuda"
        self.sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times), (torch.cuda.max_memory_allocated() if cuda else math.nan)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`Training` and of where results go, shared by the GPU benchmarks."""
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``; default ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="124M,355M")
    add_training_arguments(parser)
    parser.add_argument("--overhead-steps", type=int, default=600)
    parser.add_argument("--ref-hvps", type=int, default=120)
    parser.add_argument("--ref-basis", type=int, default=20)
    parser.add_argument("--ref-method", default="double_backward",
                        help="double_backward | finite_difference (central) | none")
    parser.add_argument("--configs", default="defaults,forward_difference,fp32,ratio_1.5,threshold_only")
    return parser.parse_args(argv)


def main(args: argparse.Namespace | None = None) -> None:
    """Every size of ``args.sizes``, one JSON per size under ``args.out``."""
    args = parse_args() if args is None else args
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"card": card, "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "runs": []}
    for name in args.sizes.split(","):
        row = run_size(name, device, args)
        results["runs"].append(row)
        path = os.path.join(args.out, f"leave_on_{name}.json")
        with open(path, "w") as f:
            json.dump({**results, "runs": [row]}, f, indent=1, default=str)
        print(json.dumps(row, default=str), flush=True)


def reference(cw, model, probe, opt, args) -> dict:
    """Preconditioned sharpness and lambda_max in full float32, tight tolerance."""
    t = time.perf_counter()
    device = next(model.parameters()).device
    try:
        mon = cw.CurvatureMonitor(
            model, probe, optimizer=opt, top_k=1, trace=False, precision="fp32", method=args.ref_method,
            strict=True,
            budget=cw.Budget(max_hvps=args.ref_hvps, trace_hvps=0, tol=1e-4, overhead=None, max_basis=args.ref_basis),
        )
        r = mon.measure(1)
        out = {"preconditioned": r.preconditioned_lambda_max, "lambda_max": r.lambda_max, "method": r.method,
               "hvps": r.hvps, "converged": r.converged, "error_bound": r.error_bound,
               "seconds": time.perf_counter() - t}
    except Exception as error:  # noqa: BLE001 - report and go on
        out = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run_size(name: str, device: torch.device, args) -> dict:
    import curvwatch as cw

    cuda = device.type == "cuda"
    training = Training(name, device, args.batch, args.seq)
    model, probe, opt, bf16 = training.model, training.probe, training.opt, training.bf16
    step, sync = training.step, training.sync
    n = sum(p.numel() for p in model.parameters())
    for _ in range(args.warmup):
        step()
    step_s, step_peak = training.timed(10)
    row = {"size": name, "params": n, "bf16": bf16, "step_s": step_s, "step_peak_gib": step_peak / 2**30,
           "resident_gib": torch.cuda.memory_allocated() / 2**30 if cuda else math.nan}
    print(f"[{name}] {n/1e6:.0f}M params, step {step_s*1e3:.1f} ms, peak {row['step_peak_gib']:.2f} GiB", flush=True)

    # one measurement's cost: the defaults except the time share (which would defer
    # the second measurement here; the overhead run below keeps the share)
    share_off = cw.Budget(overhead=None)
    configs = {
        "defaults": {"budget": share_off},
        "forward_difference": {"method": "forward_difference", "budget": share_off},
        "fp32": {"precision": "fp32", "budget": share_off},
        "ratio_1.5": {"budget": cw.Budget(overhead=None, memory_ratio=1.5)},
        "threshold_only": {"budget": share_off, "top_k": 1, "trace": False},
        "ratio_1.5_threshold": {"budget": cw.Budget(overhead=None, memory_ratio=1.5), "top_k": 1, "trace": False},
        "ratio_2_threshold": {"budget": cw.Budget(overhead=None, memory_ratio=2.0), "top_k": 1, "trace": False},
        "ratio_2.5_threshold": {"budget": cw.Budget(overhead=None, memory_ratio=2.5), "top_k": 1, "trace": False},
    }
    labels = [label for label in args.configs.split(",") if label]
    if cuda:  # the allocator's peak is the training step's when the monitors read it
        torch.cuda.reset_peak_memory_stats()
    step()
    sync()
    monitors = {label: cw.CurvatureMonitor(model, probe, optimizer=opt, **configs[label]) for label in labels}
    row["configs"] = {label: {} for label in labels}
    for which in ("cold", "warm"):
        if which == "warm":
            for _ in range(5):
                step()
        sync()
        if cuda:  # the reference's memory plan reads the step's peak, not the last measurement's
            torch.cuda.reset_peak_memory_stats()
            step()
            sync()
        ref = reference(cw, model, probe, opt, args) if args.ref_method != "none" else {}
        row[f"reference_{which}"] = ref
        print(f"[{name}] reference ({which}) {ref}", flush=True)
        pre_ref = ref.get("preconditioned", math.nan)
        lam_ref = ref.get("lambda_max", math.nan)
        for label, mon in monitors.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                rss0 = rss_gib()
                t = time.perf_counter()
                res = mon.measure(training.steps)
                sync()
                seconds = time.perf_counter() - t
                peak = torch.cuda.max_memory_allocated() if cuda else math.nan
            out = {
                "skipped": res is None, "steps": seconds / step_s,
                "peak_x_step": peak / step_peak if cuda else math.nan,
                "host_rss_growth_gib": rss_gib() - rss0,
                "plan": mon.last_plan.message if mon.last_plan else None,
                "warnings": sorted({str(w.message)[:300] for w in caught}),
            }
            if res is not None:
                out.update({
                    "method": res.method, "precision": res.precision, "hvps": res.hvps, "converged": res.converged,
                    "error_bound": res.error_bound,
                    "preconditioned": res.preconditioned_lambda_max, "lambda_max": res.lambda_max,
                    "pre_rel_error": abs(res.preconditioned_lambda_max - pre_ref) / abs(pre_ref),
                    "lambda_rel_error": (
                        abs(res.lambda_max - lam_ref) / abs(lam_ref) if math.isfinite(res.lambda_max) else math.nan
                    ),
                    "trace": res.trace,
                })
            row["configs"][label][which] = out
            print(f"[{name}] {label} {which}: {json.dumps(out, default=str)}", flush=True)
    del monitors
    if cuda:
        torch.cuda.empty_cache()

    # training overhead, side by side: N steps without, then N steps with the monitor (defaults, every=100)
    if args.overhead_steps:
        sync()
        t = time.perf_counter()
        for _ in range(args.overhead_steps):
            step()
        sync()
        plain = time.perf_counter() - t
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        mon = cw.CurvatureMonitor(model, probe, optimizer=opt, every=100)
        handle = mon.attach(opt)
        sync()
        t = time.perf_counter()
        for _ in range(args.overhead_steps):
            step()
        sync()
        watched = time.perf_counter() - t
        handle.remove()
        row["overhead"] = {
            "steps": args.overhead_steps, "plain_s": plain, "watched_s": watched,
            "overhead": watched / plain - 1, "monitor_overhead": mon.history[-1].overhead if mon.history else math.nan,
            "measurements": [(r.step, r.hvps, round(r.seconds, 3), r.method, r.converged,
                              r.preconditioned_lambda_max) for r in mon.history],
        }
        print(f"[{name}] overhead {row['overhead']}", flush=True)
    row["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return row


if __name__ == "__main__":
    main()
