"""Solvers: iterate on any operator through ``matvec`` and ``dot`` only."""

from curvwatch.solvers._krylov import LanczosProcess
from curvwatch.solvers.density import SpectralDensity, slq
from curvwatch.solvers.lanczos import LanczosResult, lanczos, start_vector
from curvwatch.solvers.trace import TraceResult, hutchinson

__all__ = [
    # solvers
    "hutchinson",
    "lanczos",
    "slq",
    # their results
    "LanczosResult",
    "SpectralDensity",
    "TraceResult",
    # the bare recurrence and its start (benchmarks that record every step)
    "LanczosProcess",
    "start_vector",
]
