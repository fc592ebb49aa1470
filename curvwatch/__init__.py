"""curvwatch: watch the curvature of the loss while a network trains."""

from curvwatch._errors import CurvatureError, CurvatureWarning, NoSecondDerivativeError
from curvwatch.monitor import CurvatureMonitor
from curvwatch.operators import (
    CurvatureOperator,
    DenseOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    MonteCarloFisherOperator,
    PreconditionedOperator,
    all_reduce_mean,
)
from curvwatch.optim import Threshold, preconditioner_diagonal, threshold
from curvwatch.options import MonitorOptions
from curvwatch.results import Budget, CurvatureResult, ThresholdEvent
from curvwatch.sinks import JsonlSink, MemorySink, TensorBoardSink
from curvwatch.solvers import (
    LanczosResult,
    SpectralDensity,
    TraceResult,
    hutchinson,
    lanczos,
    slq,
)

__version__ = "0.1.0"

__all__ = [
    # the monitor
    "Budget",
    "CurvatureMonitor",
    "CurvatureResult",
    "MonitorOptions",
    "ThresholdEvent",
    # sinks
    "JsonlSink",
    "MemorySink",
    "TensorBoardSink",
    # edge-of-stability thresholds
    "Threshold",
    "preconditioner_diagonal",
    "threshold",
    # linear operators
    "CurvatureOperator",
    "DenseOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "MonteCarloFisherOperator",
    "PreconditionedOperator",
    # data parallelism: the mean over processes of a product (the monitor's default reduce)
    "all_reduce_mean",
    # solvers
    "LanczosResult",
    "SpectralDensity",
    "TraceResult",
    "hutchinson",
    "lanczos",
    "slq",
    # errors
    "CurvatureError",
    "CurvatureWarning",
    "NoSecondDerivativeError",
]
