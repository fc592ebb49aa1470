"""What curvwatch reads from an optimizer: its edge-of-stability threshold, preconditioner and update.

* :mod:`~curvwatch.optim.thresholds`: the threshold of the update rule at the
  lr in effect (gradient descent, heavy ball, Nesterov, Adam/AdamW, Adamax,
  RMSprop) and the diagonal preconditioner ``P`` of the adaptive ones;
* :mod:`~curvwatch.optim.updates`: the last update ``u`` and the one the
  optimizer would take now, from its state.

Nothing here changes the optimizer.
"""

from curvwatch.optim.thresholds import (
    Threshold,
    check_optimizer,
    group_lr,
    preconditioner_diagonal,
    threshold,
    unwrap_optimizer,
)
from curvwatch.optim.updates import missing_update_reason, next_update_direction, update_direction

__all__ = [
    # thresholds
    "Threshold",
    "check_optimizer",
    "group_lr",
    "preconditioner_diagonal",
    "threshold",
    "unwrap_optimizer",
    # update directions
    "missing_update_reason",
    "next_update_direction",
    "update_direction",
]
