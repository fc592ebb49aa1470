"""curvwatch's benchmark: measurement cost as multiples of a training step, side
by side with hessian-eigenthings and PyHessian, in one process.

    python benchmarks/run.py --mode cpu --out benchmarks/results   # tiny GPT-2, < 5 min on 2 cores
    python benchmarks/run.py --mode gpu --out benchmarks/results   # GPT-2 small, 8 x 256, fp32
    python benchmarks/run.py --mode gpu-large --out benchmarks/results  # 355M and 1.56B, bf16 AdamW (leave_on.py)

Writes ``<out>/cpu_<N>core.json/.md`` or ``<out>/gpu_<card>.json/.md``. Every
number in the table is a ratio to the training step measured in the same run
(bare times are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import hvp, models, new_quantities, overhead, peers, report  # noqa: E402
from benchmarks.timing import Meter, card_slug, machine, tensor_bytes  # noqa: E402

MODES = {
    #       setup        reps ref dtype       ref tol ref max  overhead (steps, every, repeats)
    "cpu": dict(setup=models.CPU, reps=15, ref_dtype="float64", ref_tol=1e-9, ref_max=200, overhead=(60, 20, 2),
                new_repeats=2),
    "gpu": dict(setup=models.GPU, reps=5, ref_dtype="float32", ref_tol=1e-5, ref_max=120, overhead=(300, 100, 1),
                new_repeats=1),
}
LANCZOS_PRODUCTS = 30  # fixed-length Lanczos per method
MAX_MATVECS = 60  # cap of the 1% measurements
HUTCHINSON_SAMPLES = 5
PEER_ITERATIONS = 30  # hessian-eigenthings Lanczos trajectory
POWER_ITERATIONS = 50  # PyHessian power iteration cap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted([*MODES, "gpu-large"]), required=True)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (cpu mode). Default 1")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. a second run)")
    args = parser.parse_args()
    if args.mode == "gpu-large":  # the leave-it-on cases: one JSON per size (benchmarks/leave_on.py)
        from benchmarks import leave_on

        leave_on.main(leave_on.parse_args(["--sizes", "355M", "--out", args.out]))
        leave_on.main(leave_on.parse_args(["--sizes", "1.5B", "--out", args.out, "--overhead-steps", "0",
                                           "--configs", "defaults,ratio_1.5_threshold,ratio_2.5_threshold",
                                           "--ref-method", "finite_difference", "--ref-hvps", "40",
                                           "--ref-basis", "6"]))
        return
    cfg = MODES[args.mode]
    if args.mode == "gpu":
        if not torch.cuda.is_available():
            sys.exit("--mode gpu needs CUDA")
        device = torch.device("cuda")
        stem = "gpu_" + card_slug(torch.cuda.get_device_name(device))
    else:
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")
        stem = f"cpu_{os.cpu_count()}core"
    stem += f"_{args.tag}" if args.tag else ""
    began = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    PARTIAL["path"] = out / f"{stem}.partial.json"
    results = measure(cfg, device, args.mode)
    PARTIAL["path"].unlink(missing_ok=True)
    PARTIAL["path"] = None
    results["wall_s"] = time.perf_counter() - began
    (out / f"{stem}.json").write_text(_dump(results))
    (out / f"{stem}.md").write_text(report.markdown(results))
    print(report.markdown(results))
    print(f"wrote {out / stem}.json/.md in {results['wall_s']:.0f} s")


def _dump(results: dict) -> str:
    """JSON with non-finite floats as null (strict JSON)."""
    def clean(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(results), indent=1, default=str)


PARTIAL: dict = {}


def _commit() -> str | None:
    """The checkout's commit (``+`` when the working tree differs), if git is there."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "curvwatch"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def log(msg: str) -> None:
    """Print a progress line and save what is measured so far (a crash keeps it)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    if PARTIAL.get("path") is not None:
        PARTIAL["path"].write_text(_dump(PARTIAL["results"]))


def measure(cfg: dict, device: torch.device, mode: str) -> dict:
    setup: models.Setup = cfg["setup"]
    meter = Meter(device)
    model = models.build_model(setup, device)
    opt = models.make_optimizer(model, setup)
    batches = models.bigram_batches(setup, 64, device, seed=1)
    probe = models.bigram_batches(setup, 1, device, seed=2)[0]
    step_iter = iter(range(10**9))

    def step():
        return models.train_step(model, opt, batches[next(step_iter) % len(batches)])

    res: dict = {"mode": mode, "setup": setup.as_dict(), "machine": machine(device), "commit": _commit(),
                 "parameters": sum(p.numel() for p in model.parameters())}
    PARTIAL["results"] = res
    log(f"{setup.name}: {res['parameters']:,} parameters on {res['machine'].get('card', 'cpu')}")
    for _ in range(setup.warmup_steps):
        step()
    with torch.no_grad():
        res["loss_after_warmup"] = float(models.loss_fn(model, probe))

    log("training step")
    res["step"] = meter.time(step, cfg["reps"], warmup=2).as_dict()
    log("products of each method")
    res["products"] = hvp.product_times(model, probe, meter, cfg["reps"], step)

    def ref_now():
        ref_model = models.float64_copy(model) if cfg["ref_dtype"] == "float64" else model
        return hvp.reference(ref_model, probe, cfg["ref_tol"], cfg["ref_max"])

    log("reference")
    res["reference"] = ref0 = ref_now()
    log(f"lambda_max = {ref0['lambda_max']:.6g} ({ref0['matvecs']} products)")
    res["lanczos_30"] = hvp.lanczos_accuracy(model, probe, meter, ref0["lambda_max"], LANCZOS_PRODUCTS)
    log("cold measurement, hutchinson")
    cold, vectors = hvp.measurement(model, probe, meter, ref0["lambda_max"], None, 0, MAX_MATVECS)
    res["hutchinson"] = hvp.hutchinson_cost(model, probe, meter, HUTCHINSON_SAMPLES)
    log("hessian-eigenthings")
    res["eigenthings"] = peers.eigenthings(
        model, probe, meter, ref0["lambda_max"], PEER_ITERATIONS, HUTCHINSON_SAMPLES, cfg["reps"]
    )
    log("PyHessian")
    res["pyhessian"] = peers.pyhessian(model, probe, meter, ref0["lambda_max"], POWER_ITERATIONS, HUTCHINSON_SAMPLES)

    log("one more training step, warm start")
    step()
    res["reference_next_step"] = ref1 = ref_now()
    warm, _ = hvp.measurement(model, probe, meter, ref1["lambda_max"], vectors, 1, MAX_MATVECS)
    cold_next, _ = hvp.measurement(model, probe, meter, ref1["lambda_max"], None, 1, MAX_MATVECS)
    res["measurements"] = {"cold": cold, "warm (next step)": warm, "cold (next step)": cold_next}

    steps, every, repeats = cfg["overhead"]
    log(f"monitor overhead: {steps} steps, every={every}, {repeats} repeat(s)")
    res["monitor"] = overhead.monitor_overhead(model, opt, batches, probe, steps, every, repeats, meter)

    log("memory")
    opt.zero_grad(set_to_none=True)
    state = tensor_bytes(model, opt)
    res["memory"] = {"method": "torch.cuda.max_memory_allocated" if meter.cuda else
                     "approx: params+AdamW state bytes + peak RSS above rest (VmHWM, mmap threshold 64 KiB)",
                     "resident_state_bytes": state,
                     "step": meter.peak(step, state)}
    opt.zero_grad(set_to_none=True)
    res["memory"]["curvwatch"] = hvp.memory(model, opt, probe, meter, state, MAX_MATVECS)
    res["memory"]["peers"] = peers.memory(model, probe, meter, state)
    # last, so that it changes nothing above (it restores the training state it starts from)
    log("new quantities: update and critical sharpness, blocks, Fisher product")
    res["new_quantities"] = new_quantities.new_quantity_costs(
        model, opt, probe, meter, cfg["reps"], step, cfg["new_repeats"]
    )
    log("done")
    return res


if __name__ == "__main__":
    main()
