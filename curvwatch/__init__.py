"""curvwatch: watch the curvature of the loss while a network trains."""

from curvwatch._errors import CurvatureError, CurvatureWarning
from curvwatch.operators import (
    CurvatureOperator,
    DenseOperator,
    GGNOperator,
    HessianOperator,
    PreconditionedOperator,
)
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
    # linear operators
    "CurvatureOperator",
    "DenseOperator",
    "GGNOperator",
    "HessianOperator",
    "PreconditionedOperator",
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
]
