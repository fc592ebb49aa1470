"""Where a measurement's time goes: cProfile of one warm measurement (cumulative, top functions).

Usage (one H200)::

    python benchmarks/profile_measurement.py --size 355M --ratio 2.0 --out $OUT
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
import warnings

import torch


def main() -> None:
    import curvwatch as cw
    from benchmarks.leave_on import Training

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="355M")
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device("cuda")
    training = Training(args.size, device, 4, 512)
    model, probe, opt = training.model, training.probe, training.opt
    for _ in range(20):
        training.step()
    torch.cuda.synchronize()
    monitor = cw.CurvatureMonitor(model, probe, optimizer=opt, top_k=1, trace=False,
                                  budget=cw.Budget(overhead=None, memory_ratio=args.ratio))
    warnings.simplefilter("ignore")
    monitor.measure(1)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    t = time.perf_counter()
    profiler.enable()
    result = monitor.measure(2)
    torch.cuda.synchronize()
    profiler.disable()
    seconds = time.perf_counter() - t
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(45)
    report = f"{args.size} ratio {args.ratio}: {seconds:.2f} s, {result.hvps} products, {result.method}\n"
    report += text.getvalue()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"profile_{args.size}_{args.ratio}.txt"), "w") as f:
        f.write(report)
    print(report[:6000])


if __name__ == "__main__":
    main()
