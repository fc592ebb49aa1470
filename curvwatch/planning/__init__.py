"""What a measurement may spend: a share of training time, memory, and the products they buy.

* :mod:`~curvwatch.planning.cost`: the time account and the share's rules;
* :mod:`~curvwatch.planning.memory`: what a measurement needs and what is free;
  where the basis goes;
* :mod:`~curvwatch.planning.plan`: :class:`Planner`, whose :meth:`~Planner.plan`
  turns both into the next measurement's :class:`Allowance`.
"""

from curvwatch.planning.cost import OverheadAccount
from curvwatch.planning.memory import ActivationGauge, MemoryPlan, TrainingPeak, format_bytes
from curvwatch.planning.plan import Allowance, DoesNotFit, Planner

__all__ = [
    "ActivationGauge",
    "Allowance",
    "DoesNotFit",
    "MemoryPlan",
    "OverheadAccount",
    "Planner",
    "TrainingPeak",
    "format_bytes",
]
