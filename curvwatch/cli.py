"""The `curvwatch` command: `curvwatch demo`, `curvwatch report RUN_DIR`."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from curvwatch.demo import run_demo, summary
    from curvwatch.report import draw_report

    run = run_demo(args.out, optimizer=args.optimizer, steps=args.steps, every=args.every,
                   progress=not args.no_progress)
    png = draw_report(args.out, os.path.join(args.out, "curvwatch_report.png"))
    print(summary(run))
    print(f"TensorBoard run: {args.out}   (tensorboard --logdir {args.out})")
    print(f"plot: {png}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from curvwatch.report import draw_report

    try:
        png = draw_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"curvwatch report: {error}", file=sys.stderr)
        return 2
    print(png)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `curvwatch` console script."""
    parser = argparse.ArgumentParser(prog="curvwatch", description="Watch loss curvature while training.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="edge of stability on the digits dataset (~1 minute on a CPU)")
    demo.add_argument("--out", default="curvwatch_demo", help="run directory (default: curvwatch_demo)")
    demo.add_argument("--optimizer", choices=("gd", "adam"), default="gd")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default 800 gd / 600 adam)")
    demo.add_argument("--every", type=int, default=10, help="measure every N steps (default 10)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    report = sub.add_parser("report", help="draw a PNG from a run with curvature/* tags")
    report.add_argument("run_dir", help="TensorBoard log directory or .jsonl file")
    report.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curvwatch_report.png)")
    report.set_defaults(func=_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
