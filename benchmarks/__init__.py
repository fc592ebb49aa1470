"""Benchmarks of curvwatch (run ``python benchmarks/run.py --mode cpu|gpu``)."""
