"""The `curvwatch` command: `curvwatch demo`, `curvwatch report RUN_DIR`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

#: `time curvwatch demo` (its default, one thread): 11.8 s on a quiet 2-core CPU (issue 25); 34.8, 40.5,
#: 43.3 and 49.8 s on a shared 2-core x86 VM with both cores busy (DEMO_TIME_BUSY). README says the same.
DEMO_TIME = "about 12 s on one CPU thread of an idle machine"
DEMO_TIME_BUSY = "35-50 s on a shared 2-core x86 VM while other jobs keep both cores busy"
#: exit status when a package of the demo extra is missing
EXIT_MISSING_EXTRA = 3
#: module -> the distribution that provides it, for what `curvwatch demo` / `report` import
DEMO_MODULES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "tensorboard": "tensorboard",
                "numpy": "numpy"}
REPORT_MODULES = {"matplotlib": "matplotlib"}


class MissingExtra(Exception):
    """A package of the ``demo`` extra is not installed."""

    def __init__(self, command: str, module: str) -> None:
        module = module.split(".")[0]
        self.command, self.module = command, module
        package = {**DEMO_MODULES, **REPORT_MODULES}.get(module, module)
        super().__init__(
            f"curvwatch {command} needs the 'demo' extra ({package} is missing). Install it with\n"
            f'    pip install "curvwatch[demo]"\n'
            f'or, in a clone of the repository, pip install -e ".[demo]"'
        )


def _require(command: str, modules: dict[str, str]) -> None:
    """Import ``modules``; raise :class:`MissingExtra` naming the first that is missing."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise MissingExtra(command, module) from error


def _demo(args: argparse.Namespace) -> int:
    import torch

    _require("demo", DEMO_MODULES)
    from curvwatch.demo import run_demo, summary
    from curvwatch.report import draw_report

    torch.set_num_threads(args.threads)
    run = run_demo(args.out, optimizer=args.optimizer, steps=args.steps, every=args.every,
                   progress=not args.no_progress)
    png = draw_report(run.run_dir, os.path.join(run.run_dir, "curvwatch_report.png"))
    print(summary(run))
    print(f"TensorBoard run '{args.optimizer}' in {run.run_dir}   (tensorboard --logdir {args.out})")
    print(f"plot: {png}")
    return 0


def _report(args: argparse.Namespace) -> int:
    _require("report", REPORT_MODULES)
    from curvwatch.report import draw_runs, is_curvature_run, read_runs

    try:
        try:
            runs = read_runs(args.run_dir)
        except ModuleNotFoundError as error:  # TensorBoard event files without tensorboard
            raise MissingExtra("report", error.name or "tensorboard") from error
        names = [name for name, series in runs.items() if is_curvature_run(series)]
        others = [name for name in runs if name not in names]
        print(f"found {len(names)} run{'s' if len(names) != 1 else ''} with curvature/* tags under "
              f"{args.run_dir}: {', '.join(names) or '-'}")
        if others:
            print(f"left out (no curvature/* tags): {', '.join(others)}")
        out = args.out or os.path.join(args.run_dir if os.path.isdir(args.run_dir) else ".", "curvwatch_report.png")
        png = draw_runs(runs, out, title=os.path.basename(os.path.abspath(args.run_dir)))
    except (FileNotFoundError, ValueError) as error:
        print(f"curvwatch report: {error}", file=sys.stderr)
        return 2
    print(png)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `curvwatch` console script."""
    parser = argparse.ArgumentParser(prog="curvwatch", description="Watch loss curvature while training.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help=f"edge of stability on the digits dataset ({DEMO_TIME})",
        description=f"Train a small MLP on scikit-learn's digits with curvwatch watching: progressive "
        f"sharpening, then the edge of stability. Takes {DEMO_TIME} ({DEMO_TIME_BUSY}; "
        "gd, adam about 3/4 of that). Needs the demo extra: pip install \"curvwatch[demo]\".",
    )
    demo.add_argument("--out", default="curvwatch_demo",
                      help="directory of the runs; this run goes to OUT/gd or OUT/adam (default: curvwatch_demo)")
    demo.add_argument("--optimizer", choices=("gd", "adam"), default="gd")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps (default 800 gd / 600 adam)")
    demo.add_argument("--every", type=int, default=10, help="measure every N steps (default 10)")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (default 1: the model is tiny, more threads only add overhead)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    report = sub.add_parser(
        "report", help="draw a PNG from the runs with curvature/* tags under RUN_DIR",
        description="Draw loss, sharpness / threshold, sharpness and threshold (log) and trace of every run "
        "under RUN_DIR (a TensorBoard event directory or a .jsonl file is one run) into one PNG, one colour "
        "per run. Needs the demo extra: pip install \"curvwatch[demo]\".",
    )
    report.add_argument("run_dir", help="TensorBoard log directory (one or several runs) or .jsonl file")
    report.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curvwatch_report.png)")
    report.set_defaults(func=_report)
    args = parser.parse_args(argv)
    if getattr(args, "threads", 1) < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    try:
        return args.func(args)
    except MissingExtra as error:
        print(error, file=sys.stderr)
        return EXIT_MISSING_EXTRA


if __name__ == "__main__":
    raise SystemExit(main())
