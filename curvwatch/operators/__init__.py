"""Operators: how a curvature matrix is applied to a flat vector."""

from curvwatch.operators._base import CurvatureOperator, DenseOperator
from curvwatch.operators.distributed import all_reduce_mean
from curvwatch.operators.fisher import EmpiricalFisherOperator, MonteCarloFisherOperator
from curvwatch.operators.ggn import GGNOperator
from curvwatch.operators.hessian import HessianOperator, finite_difference_step
from curvwatch.operators.preconditioned import PreconditionedOperator
from curvwatch.operators.sharded import is_sharded

__all__ = [
    "CurvatureOperator",
    "DenseOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "MonteCarloFisherOperator",
    "PreconditionedOperator",
    "all_reduce_mean",
    "finite_difference_step",
    "is_sharded",
]
