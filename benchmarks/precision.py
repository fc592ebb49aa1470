"""One product in each precision and method, at a bf16-autocast AdamW training state.

For a GPT-2-shaped model (``benchmarks/leave_on.py``'s models and batches),
after ``--warmup`` bf16 AdamW steps:

* the reference: the top eigenvector ``y`` of ``P^{-1/2} H P^{-1/2}`` (AdamW's
  preconditioned Hessian) by float32 double backward, Lanczos to 1e-4;
* for each product mode (double backward in fp32 / TF32 / under the training's
  bf16 autocast; one-sided and central differences in fp32, TF32 and bf16
  autocast, whole and with the probe in pieces): its time as a multiple of the
  training step (median of ``--repeats``), its peak memory as a multiple of
  the step's peak, and the error of the Rayleigh quotient ``y^T A y`` (that is
  the preconditioned sharpness to second order in the vector's error) and of
  the whole product ``A y``, both relative to the reference.

Usage (one H200)::

    python benchmarks/precision.py --size 355M --out $OUT
    python benchmarks/precision.py --size tiny --device cpu --warmup 2   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time

import torch

MODES = (
    # name, method, scheme, matmul precision, autocast, pieces
    ("double_backward fp32", "double_backward", None, "fp32", False, 1),
    ("double_backward tf32", "double_backward", None, "tf32", False, 1),
    ("double_backward bf16 autocast", "double_backward", None, "fp32", True, 1),
    ("one-sided fp32", "finite_difference", "forward", "fp32", False, 1),
    ("one-sided fp32 in 4 pieces", "finite_difference", "forward", "fp32", False, 4),
    ("central fp32", "finite_difference", "central", "fp32", False, 1),
    ("one-sided tf32", "finite_difference", "forward", "tf32", False, 1),
    ("central tf32", "finite_difference", "central", "tf32", False, 1),
    ("one-sided bf16 autocast", "finite_difference", "forward", "fp32", True, 1),
    ("central bf16 autocast", "finite_difference", "central", "fp32", True, 1),
)


def math_attention():
    """Attention with a second derivative (double backward cannot go through the fused kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from benchmarks.leave_on import add_training_arguments

    parser.add_argument("--size", default="355M")
    add_training_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(m[0] for m in MODES))
    return parser.parse_args(argv)


def main(args: argparse.Namespace | None = None) -> None:
    import curvwatch as cw
    from benchmarks.leave_on import Training
    from curvwatch.measurement.chunked import split_probe
    from curvwatch.optim import preconditioner_diagonal
    from curvwatch.precision import matmul_precision

    args = parse_args() if args is None else args
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    training = Training(args.size, device, args.batch, args.seq)
    model, probe, opt, sync = training.model, training.probe, training.opt, training.sync
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(args.warmup):
        training.step()
    step_s, step_peak = training.timed(5)
    model.eval()  # dropout is off in these configs; eval() only makes it explicit

    def loss_fn(autocast: bool):
        def closure(batch=probe) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return model(**batch).loss.float()
        return closure

    diagonal = preconditioner_diagonal(opt, params)
    row = {"size": args.size, "params": sum(p.numel() for p in params), "card":
           torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
           "step_s": step_s, "step_peak_gib": step_peak / 2**30, "modes": {}}

    with matmul_precision("fp32"), math_attention():
        exact = cw.HessianOperator(loss_fn(False), params)
        pre = cw.PreconditionedOperator(exact, diagonal)
        t = time.perf_counter()
        ref = cw.lanczos(pre, k=1, tol=1e-4, max_matvecs=80, seed=0)
        y = ref.eigenvectors[:, 0].contiguous()
        ay_ref = pre.matvec(y)
        ref_value = float(torch.dot(y, ay_ref) / torch.dot(y, y))
        exact.release()
        del exact, pre
    row["reference"] = {"preconditioned": ref_value, "lanczos": ref.lambda_max, "matvecs": ref.matvecs,
                        "converged": ref.converged, "bound": ref.relative_error_bound,
                        "seconds": time.perf_counter() - t}
    print(json.dumps(row["reference"]), flush=True)

    wanted = set(args.modes.split(","))
    for name, method, scheme, precision, autocast, pieces in MODES:
        if name not in wanted:
            continue
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            split = None
            if pieces > 1:
                closure = loss_fn(autocast)
                split = split_probe(model, probe, lambda m, b, closure=closure: closure(b), pieces)
            op = cw.HessianOperator(loss_fn(autocast), params, method=method, scheme=scheme or "central",
                                    pieces=split)
            A = cw.PreconditionedOperator(op, diagonal)
            seconds = []
            attention = math_attention() if method == "double_backward" else contextlib.nullcontext()
            with matmul_precision(precision), attention:
                A.matvec(y)  # the cached gradient (one-sided) or the graph (double backward) and warm-up
                for _ in range(args.repeats):
                    sync()
                    t = time.perf_counter()
                    ay = A.matvec(y)
                    sync()
                    seconds.append(time.perf_counter() - t)
            value = float(torch.dot(y, ay) / torch.dot(y, y))
            out = {
                "product_x_step": statistics.median(seconds) / step_s,
                "peak_x_step": (torch.cuda.max_memory_allocated() / step_peak) if cuda else math.nan,
                "rayleigh_rel_error": abs(value - ref_value) / abs(ref_value),
                "product_rel_error": float((ay - ay_ref).norm() / ay_ref.norm()),
            }
            if hasattr(op, "release"):
                op.release()
            del op, A, ay
        except Exception as error:  # noqa: BLE001 - record and go on
            out = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        row["modes"][name] = out
        print(name, json.dumps(out), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"precision_{args.size}.json"), "w") as f:
        json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
