"""When a ratio crosses 1: the edge-of-stability events of a run, from one result to the next.

Two kinds, both handed to ``on_threshold`` as a :class:`~curvwatch.ThresholdEvent`:

* the sharpness ratio (sharpness / threshold) crossing 1 either way: the first
  upward crossing is logged as a warning, later ones (a sharpness hovering at
  the edge of stability crosses often) at INFO;
* the early warnings, the ratios along the update (the update sharpness against
  the sharpness's threshold, the critical sharpness against ``2 / lr``)
  crossing 1 upwards: the step is too long along its own direction. Each is
  warned once (a Python warning naming the lr at which the ratio would be 1,
  ``lr / ratio``) and logged at every crossing.

:class:`Crossings` holds only whether each ratio was at or above 1 last time;
it decides and words the events, the monitor logs, warns and calls back.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from curvwatch.results import CurvatureResult, ThresholdEvent

# The early-warning ratios (CurvatureResult fields) and what they are called in the warning.
EARLY_WARNINGS = (
    ("update_sharpness_ratio", "update sharpness (the curvature along the last update)"),
    ("critical_sharpness_ratio", "critical sharpness (2 / the shortest step along the next update raising the loss)"),
)


@dataclass(frozen=True)
class Crossing:
    """One ratio crossing 1: the event, its log line, and the warning to give once (if any)."""

    event: ThresholdEvent
    level: int  # logging level of ``log``
    log: str
    warning_key: str | None = None
    warning: str | None = None


class Crossings:
    """Which ratios were at or above 1 at the last result; :meth:`observe` returns what crossed."""

    def __init__(self) -> None:
        self.above: bool | None = None  # the sharpness ratio at the last finite value
        self.crossed_before = False  # the sharpness ratio has crossed upwards once
        self.early_above: dict[str, bool] = {}  # early-warning ratio -> at or above 1 last time

    def observe(self, result: CurvatureResult) -> list[Crossing]:
        """The crossings ``result`` makes (sharpness first, then the early warnings); updates the state."""
        crossings = []
        sharpness = self._sharpness(result)
        if sharpness is not None:
            crossings.append(sharpness)
        for quantity, what in EARLY_WARNINGS:
            early = self._early(result, quantity, what)
            if early is not None:
                crossings.append(early)
        return crossings

    def _sharpness(self, result: CurvatureResult) -> Crossing | None:
        ratio = result.sharpness_ratio
        if not math.isfinite(ratio):
            return None
        above = ratio >= 1.0
        crossed = above != self.above if self.above is not None else above
        self.above = above
        if not crossed:
            return None
        first = not self.crossed_before
        self.crossed_before = True
        return Crossing(
            ThresholdEvent.of(result, "sharpness_ratio"),
            logging.WARNING if first and above else logging.INFO,
            f"curvwatch: step {result.step}: sharpness {'crossed' if above else 'fell back below'} the "
            f"edge-of-stability threshold (ratio {ratio:.3f}, threshold {result.threshold:.4g})",
        )

    def _early(self, result: CurvatureResult, quantity: str, what: str) -> Crossing | None:
        ratio = getattr(result, quantity)
        if not math.isfinite(ratio):
            return None
        above = ratio >= 1.0
        before = self.early_above.get(quantity)
        self.early_above[quantity] = above
        if above == before or not above:
            if before and not above:  # logged, not an event
                logging.getLogger("curvwatch").info(
                    "curvwatch: step %d: %s fell back below 1 (%.3f)", result.step, quantity, ratio
                )
            return None
        event = ThresholdEvent.of(result, quantity)
        return Crossing(
            event,
            logging.INFO,
            f"curvwatch: step {result.step}: early warning: {quantity} crossed 1 ({ratio:.3f}) at lr "
            f"{result.lr:.4g}; stable lr about {event.stable_lr:.4g}",
            f"early-warning {quantity}",
            f"curvwatch: step {result.step}: early warning: the {what} crossed its threshold "
            f"({quantity} {ratio:.3f}) at lr {result.lr:.4g}: the step is too long along its own "
            f"direction; the lr at which it would be stable is about {event.stable_lr:.4g} "
            "(lr / ratio). Warned once; later crossings are logged and passed to on_threshold",
        )

    def state_dict(self) -> dict[str, Any]:
        """The state, under the keys the monitor's checkpoints have always used."""
        return {"above": self.above, "crossed_before": self.crossed_before, "early_above": dict(self.early_above)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (missing keys: nothing crossed yet)."""
        self.above = state.get("above")
        self.crossed_before = bool(state.get("crossed_before", False))
        self.early_above = dict(state.get("early_above", {}))
