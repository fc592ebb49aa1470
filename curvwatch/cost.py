r"""What a measurement may cost: a share of training time.

The monitor is left on only if its cost is a small, known share of training.
:class:`OverheadAccount` keeps the wall-clock seconds of training (everything
between measurements) and of measuring, and allows the next measurement

.. math::

    \text{allowance} = \text{overhead} \cdot T_\text{train} - T_\text{measure}

seconds: a cumulative budget, so a measurement that came in under its share
leaves the rest to the next one, and one that could not fit waits (is
deferred) until enough training has passed. A small fixed allowance per run
(``Budget.negligible_seconds``) comes on top: the first measurements of a model
whose products cost milliseconds are made in full. The share it reports,
``T_measure / T_train``, is what ``curvature_diagnostics/overhead`` logs: the time
monitoring added to training, as a fraction.

The cost of one product is learned from the measurements themselves (seconds
per product of the last one). The first measurement, before that is known, gets
the share saved up so far and at least one product: it may end unconverged (a
lower bound and a warm start for the next), but it never runs the share over by
more than one product.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass


@dataclass
class OverheadAccount:
    """Training and measuring seconds so far, and the cost of one product.

    Attributes:
        training_seconds: wall-clock seconds outside measurements since the start.
        measuring_seconds: wall-clock seconds inside measurements.
        seconds_per_product: the last measurement's seconds per product (NaN: none yet).
        last: ``time.perf_counter()`` at the end of the last event.
    """

    training_seconds: float = 0.0
    measuring_seconds: float = 0.0
    seconds_per_product: float = math.nan
    last: float = math.nan

    def start(self) -> None:
        """Begin counting training time now (if not begun)."""
        if math.isnan(self.last):
            self.last = time.perf_counter()

    def training_until_now(self) -> None:
        """Count the time since the last event as training."""
        now = time.perf_counter()
        if not math.isnan(self.last):
            self.training_seconds += now - self.last
        self.last = now

    def allowance(self, overhead: float, fixed: float = 0.0) -> float:
        """Seconds the next measurement may take: ``overhead * T_train + fixed - T_measure``.

        ``fixed`` is the run's allowance beyond the share (``Budget.negligible_seconds``):
        measuring never takes more than ``overhead * T_train + fixed`` in all (plus
        the product that crosses a measurement's deadline).
        """
        return overhead * self.training_seconds + fixed - self.measuring_seconds

    def measured(self, seconds: float, products: int, other_seconds: float = 0.0) -> None:
        """Charge a measurement of ``seconds`` and ``products`` products.

        ``other_seconds`` of it went to work that is no product (the critical
        sharpness's forward passes): charged to the share, kept out of the cost
        of a product.
        """
        self.measuring_seconds += seconds
        if products > 0:
            self.seconds_per_product = max(seconds - other_seconds, 0.0) / products
        self.last = time.perf_counter()

    @property
    def share(self) -> float:
        """``T_measure / T_train``: the time measuring added to training (NaN at first)."""
        return self.measuring_seconds / self.training_seconds if self.training_seconds > 0 else math.nan

    def state_dict(self) -> dict[str, float]:
        """The totals and the learned product cost (for checkpoints)."""
        return {
            "training_seconds": self.training_seconds,
            "measuring_seconds": self.measuring_seconds,
            "seconds_per_product": self.seconds_per_product,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict` output (the clock restarts now)."""
        self.training_seconds = float(state.get("training_seconds", 0.0))
        self.measuring_seconds = float(state.get("measuring_seconds", 0.0))
        self.seconds_per_product = float(state.get("seconds_per_product", math.nan))
        self.last = time.perf_counter()
