"""Solvers: iterate on any operator through ``matvec`` and ``dot`` only."""

from curvwatch.solvers.density import SpectralDensity, slq
from curvwatch.solvers.lanczos import LanczosResult, lanczos
from curvwatch.solvers.trace import TraceResult, hutchinson

__all__ = ["LanczosResult", "SpectralDensity", "TraceResult", "hutchinson", "lanczos", "slq"]
