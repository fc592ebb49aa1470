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

What a measurement costs is learned from the measurements themselves, in two
parts: the seconds of one product (the solves' own seconds over their products,
:class:`ProductMeter`: a product and its Lanczos step) and the seconds of the
rest of a measurement (the guard, the operator, the threshold, the certificate,
host copies, the sinks), which do not grow with the products. At this size they
matter: on the digits MLP a product is 0.4 ms and the rest of a warm
measurement about 1 ms. The first measurement, before that is known, gets the
share saved up so far and at least one product: it may end unconverged (a lower
bound and a warm start for the next), but it never runs the share over by more
than one product.

The fixed allowance buys the threshold's certified solve only (the
preconditioned sharpness for Adam-type optimizers, else the top-``k``): the other
quantities (Adam's raw top-``k``, update and critical sharpness, trace, spectrum,
blocks) run within the share proper, ``overhead * T_train - T_measure`` without it (:func:`share_seconds`),
so that a short run does not spend its fixed allowance on them.

:func:`seconds_allowed` holds the rules that turn the account into the seconds
of the next measurement (or a deferral), :func:`affordable_products` the
products those seconds buy.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from curvwatch.results import Budget
from curvwatch.solvers.lanczos import gap_steps

logger = logging.getLogger("curvwatch")

Note = tuple[str, str]  # (key, message): the monitor warns once per key


@dataclass
class ProductMeter:
    """The seconds and products of one measurement's solves, counted as they run.

    Attributes:
        seconds: wall-clock seconds inside the solves (products and their Lanczos steps).
        products: products those solves applied.
    """

    seconds: float = 0.0
    products: int = 0

    @staticmethod
    def now() -> float:
        """The clock the account keeps (``time.perf_counter``)."""
        return time.perf_counter()

    def add(self, started: float, products: int) -> None:
        """Count a solve begun at ``started`` (:meth:`now`) that applied ``products``."""
        self.seconds += time.perf_counter() - started
        self.products += products


@dataclass
class OverheadAccount:
    """Training and measuring seconds so far, and what a measurement costs.

    Attributes:
        training_seconds: wall-clock seconds outside measurements since the start.
        measuring_seconds: wall-clock seconds inside measurements.
        seconds_per_product: seconds of one product with its share of the solve,
            from the last measurement (NaN: none yet).
        fixed_seconds: seconds of the last measurement beyond its products and
            its line search (guard, operator, threshold, certificate, sinks).
        last: ``time.perf_counter()`` at the end of the last event.
    """

    training_seconds: float = 0.0
    measuring_seconds: float = 0.0
    seconds_per_product: float = math.nan
    fixed_seconds: float = 0.0
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

    def skip(self, seconds: float) -> None:
        """Count ``seconds`` that just passed as neither training nor measuring."""
        if not math.isnan(self.last):
            self.last += seconds

    def allowance(self, overhead: float, fixed: float = 0.0) -> float:
        """Seconds the next measurement may take: ``overhead * T_train + fixed - T_measure``.

        ``fixed`` is the run's allowance beyond the share (``Budget.negligible_seconds``):
        measuring never takes more than ``overhead * T_train + fixed`` in all (plus
        the product that crosses a measurement's deadline).
        """
        return overhead * self.training_seconds + fixed - self.measuring_seconds

    def measured(
        self, seconds: float, products: int, other_seconds: float = 0.0, meter: ProductMeter | None = None
    ) -> None:
        """Charge a measurement of ``seconds`` and ``products`` products.

        ``other_seconds`` of it went to work that is neither a product nor
        fixed (the critical sharpness's forward passes): charged to the share,
        kept out of both costs. With a ``meter`` that counted products, one
        product costs its seconds per product and the rest of the measurement
        is :attr:`fixed_seconds`; without one, every second but
        ``other_seconds`` is spread over the products.
        """
        self.measuring_seconds += seconds
        if meter is not None and meter.products > 0:
            self.seconds_per_product = meter.seconds / meter.products
            self.fixed_seconds = max(seconds - other_seconds - products * self.seconds_per_product, 0.0)
        elif products > 0:
            self.seconds_per_product = max(seconds - other_seconds, 0.0) / products
            self.fixed_seconds = 0.0
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
            "fixed_seconds": self.fixed_seconds,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict` output (the clock restarts now)."""
        self.training_seconds = float(state.get("training_seconds", 0.0))
        self.measuring_seconds = float(state.get("measuring_seconds", 0.0))
        self.seconds_per_product = float(state.get("seconds_per_product", math.nan))
        self.fixed_seconds = float(state.get("fixed_seconds", 0.0))
        self.last = time.perf_counter()


def seconds_allowed(
    budget: Budget, account: OverheadAccount, k: int, warm: bool, step: int
) -> tuple[float | None, Note | None]:
    """Seconds the next scheduled measurement may take (``None``: no limit; <= 0: defer it), and a note.

    The smaller of :attr:`Budget.max_seconds` and what is saved up: the
    share of training time plus the run's fixed allowance
    (:attr:`Budget.negligible_seconds`), less what measuring took so far. A
    measurement is deferred when that does not cover the products it needs
    to certify its ``k`` eigenvalues (the threshold's quantity: 1 preconditioned
    eigenvalue for Adam-type optimizers, else ``top_k``;
    :func:`~curvwatch.solvers.lanczos.gap_steps` plus one with a ``warm``
    start, 10 without) and the rest of a measurement
    (:attr:`OverheadAccount.fixed_seconds`). The first measurement, before a product's cost is
    known, gets what is saved up and stops after its first product if that is
    already spent. A deferral comes with its note (key ``"deferred"``).
    """
    cap = budget.max_seconds
    if budget.overhead is None:
        return cap, None
    allowance = account.allowance(budget.overhead, budget.negligible_seconds)
    per_product = account.seconds_per_product
    if math.isnan(per_product):
        # The first measurement learns what a product costs, within what is saved
        # up (at least one product): it may end unconverged, as a lower bound and
        # a warm start for the next. The fixed allowance (negligible_seconds) is
        # part of what is saved up: a model whose products cost milliseconds is
        # measured in full from the first due step.
        seconds = max(allowance, 1e-9)
        return (seconds if cap is None else min(cap, seconds)), None
    needed = account.fixed_seconds + (gap_steps(k) + 1 if warm else max(10, gap_steps(k))) * per_product
    if allowance < needed:
        logger.info(
            "curvwatch: step %d: measurement deferred: %.3g s of the %.0f%% share saved up, "
            "about %.3g s needed", step, max(allowance, 0.0), 100 * budget.overhead, needed,
        )
        return 0.0, (
            "deferred",
            f"curvwatch: step {step}: measurement deferred to keep monitoring within "
            f"Budget(overhead={budget.overhead}) of training time (needs about "
            f"{needed:.3g} s, {max(allowance, 0.0):.3g} s saved up); later due steps measure "
            "as the share allows. Raise Budget.overhead, or pass Budget(overhead=None) to "
            "measure at every due step",
        )
    return (allowance if cap is None else min(cap, allowance)), None


def share_seconds(budget: Budget, account: OverheadAccount, seconds: float | None) -> float | None:
    """Seconds of a measurement's ``seconds`` that the optional quantities may take (``None``: no limit).

    The share proper saved up, ``overhead * T_train - T_measure`` without the
    fixed allowance (at least 0, at most ``seconds``): the allowance buys the
    certified solves, and update and critical sharpness, trace, spectrum and
    blocks come out of the share. ``seconds`` itself without a share.
    """
    if budget.overhead is None or seconds is None:
        return seconds
    return min(seconds, max(account.allowance(budget.overhead), 0.0))


def affordable_products(
    budget: Budget, top_k: int, seconds: float | None, seconds_per_product: float, fixed_seconds: float = 0.0
) -> int:
    """Products a measurement may apply: ``max_hvps``, fewer when its seconds, less the fixed part, are short."""
    if seconds is None or math.isnan(seconds_per_product) or seconds_per_product <= 0:
        return budget.max_hvps
    return max(top_k, min(budget.max_hvps, int((seconds - fixed_seconds) / seconds_per_product)))
