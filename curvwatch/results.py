"""Frozen result types of a measurement, and the tags they are logged under."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields

from curvwatch._errors import CurvatureError

TAG_PREFIX = "curvature/"

# Cost and diagnostic tags get their own TensorBoard group (the text before the
# first "/"), so the curvature group opens on the curves themselves.
DIAGNOSTICS_PREFIX = "curvature_diagnostics/"
DIAGNOSTICS = (
    "hvps", "seconds", "converged", "error_bound", "overhead", "trace_lower", "trace_upper", "edge",
    "critical_sharpness_evals", "full_preconditioned_lambda_max", "excluded_fraction",
)


# The default share of training time a monitor may spend (Budget.overhead).
DEFAULT_OVERHEAD = 0.05


@dataclass(frozen=True)
class Budget:
    """How much measuring may spend: a share of training time, and hard caps.

    Attributes:
        max_hvps: hard cap on the products of one measurement, all solves
            together (threshold quantity, eigenvalues, trace, spectrum). Default 60.
        trace_hvps: Rademacher probes for the trace, when the share allows.
            Default 10.
        max_seconds: hard wall-clock cap of one measurement, checked after every
            product; ``None``: no cap.
        tol: relative error bound on each eigenvalue at which Lanczos stops
            (:func:`~curvwatch.lanczos`). Default ``1e-3``.
        overhead: share of training wall-clock time that measuring may add,
            counted cumulatively (:class:`~curvwatch.planning.cost.OverheadAccount`): a
            due measurement that does not fit waits for a later due step, and
            one that runs gets at most the time saved up. Default 0.05 (5%);
            ``None``: no share, measure at every due step within the caps.
        memory_ratio: a measurement may raise the CUDA memory in use to at most
            this multiple of the training step's peak (1.5 is the design
            target; benchmarks/results/leave_on_h200.md has what each method
            takes). Default ``None``: what is free on the device, so a
            measurement never runs out of memory, but may take several times
            the step's peak.
        max_memory: bytes a measurement may add above what is allocated when it
            starts (overrides ``memory_ratio``; on the CPU the default is half
            the available memory). ``None``: the default; ``float("inf")``: no
            limit of the user's (on CUDA, what is free on the device).
        negligible_seconds: a fixed allowance per run beyond the share: measuring
            takes at most ``overhead`` of the training time plus this many seconds
            in all (every second counted: products, checks, certificates, line
            searches, host copies, sinks). It lets the first measurements of a model
            whose products cost milliseconds be made in full. Default 0.03 s; 0
            holds measuring to the share alone.
        max_basis: Lanczos basis vectors kept (memory: this many parameter-sized
            vectors); ``None``: ``max(10, 2 top_k + 2)``, fewer where memory is short.
            A monitor needs more than ``top_k`` (its constructor says so).

    Raises:
        CurvatureError: a field of the wrong type (a string, a bool, a
            fraction of a count), NaN, or out of its range; the message names
            the field and what to pass.
    """

    max_hvps: int = 60
    trace_hvps: int = 10
    max_seconds: float | None = None
    tol: float = 1e-3
    overhead: float | None = DEFAULT_OVERHEAD
    memory_ratio: float | None = None
    max_memory: float | None = None
    max_basis: int | None = None
    negligible_seconds: float = 0.03

    def __post_init__(self) -> None:
        self._check_types()
        if self.max_hvps < 1:
            raise CurvatureError(f"Budget.max_hvps must be >= 1, got {self.max_hvps}")
        if not 0 <= self.trace_hvps < self.max_hvps:
            raise CurvatureError(
                f"Budget.trace_hvps ({self.trace_hvps}) must be in [0, max_hvps={self.max_hvps})"
            )
        if self.max_seconds is not None and not 0 < self.max_seconds < math.inf:
            raise CurvatureError(
                f"Budget.max_seconds must be a positive, finite number of seconds, got {self.max_seconds}; "
                "pass None for no cap"
            )
        if not 0 < self.tol < 1:
            raise CurvatureError(f"Budget.tol must be in (0, 1), got {self.tol}")
        if self.overhead is not None and not 0 < self.overhead < math.inf:
            raise CurvatureError(
                f"Budget.overhead is a share of training time (0.05 = 5%), got {self.overhead}; "
                "None measures at every due step"
            )
        if self.memory_ratio is not None and not self.memory_ratio >= 1:
            raise CurvatureError(f"Budget.memory_ratio must be >= 1, got {self.memory_ratio}")
        if self.max_memory is not None and not self.max_memory > 0:
            raise CurvatureError(
                f"Budget.max_memory is in bytes and must be positive, got {self.max_memory}; "
                "pass float('inf') for no limit, or None for the default"
            )
        if self.max_basis is not None and self.max_basis < 2:
            raise CurvatureError(f"Budget.max_basis must be >= 2, got {self.max_basis}")
        if not 0 <= self.negligible_seconds < math.inf:
            raise CurvatureError(
                f"Budget.negligible_seconds must be a finite number of seconds >= 0, got "
                f"{self.negligible_seconds}; pass 0 to hold every measurement to the share"
            )

    def _check_types(self) -> None:
        """Refuse a field of the wrong type (a string, a bool, a fraction of a count) by name."""
        counts = ("max_hvps", "trace_hvps", "max_basis")
        for f in fields(self):
            value = getattr(self, f.name)
            nullable = "None" in str(f.type)  # "float | None" (the annotations are strings here)
            if value is None and nullable:
                continue
            integer = f.name in counts
            kind = numbers.Integral if integer else numbers.Real
            if isinstance(value, kind) and not isinstance(value, bool):
                continue
            what = "an integer" if integer else "a number"
            or_none = " or None" if nullable else ""
            raise CurvatureError(
                f"Budget.{f.name} must be {what}{or_none}, got {value!r} ({type(value).__name__}); "
                f"pass a {'whole ' if integer else ''}number, or leave it out for the default ({f.default!r})"
            )


@dataclass(frozen=True)
class BlockResult:
    """The curvature of one block of parameters (``CurvatureMonitor(blocks=...)``, :mod:`curvwatch.blocks`).

    Attributes:
        lambda_max: top eigenvalue of the Hessian restricted to the block
            (``H_bb``; NaN: not measured, e.g. the products ran out).
        preconditioned_lambda_max: top eigenvalue of ``P_b^-1/2 H_bb P_b^-1/2``
            for Adam-type optimizers (NaN otherwise).
        sharpness_ratio: the block's sharpness (preconditioned for adaptive
            optimizers) over the global threshold; NaN when it is not known to
            1% (a lower bound) or there is no threshold.
        hvps: products spent on the block.
        converged: its solves met their tolerance.
    """

    lambda_max: float = math.nan
    preconditioned_lambda_max: float = math.nan
    sharpness_ratio: float = math.nan
    hvps: int = 0
    converged: bool = False

    def scalars(self) -> dict[str, float]:
        """``{field: value}`` of its finite curvature values (the block's tags end in these)."""
        values = {
            "lambda_max": self.lambda_max,
            "preconditioned_lambda_max": self.preconditioned_lambda_max,
            "sharpness_ratio": self.sharpness_ratio,
        }
        return {k: float(v) for k, v in values.items() if math.isfinite(v)}

    def tags(self, name: str) -> dict[str, float]:
        """``{tag: value}`` of :meth:`scalars` for block ``name``.

        Under ``curvature/block/`` when its solves converged, else under
        ``curvature_diagnostics/block/`` (a lower bound).
        """
        return {block_tag(name, k, not self.converged): v for k, v in self.scalars().items()}


@dataclass(frozen=True)
class CurvatureResult:
    """One measurement, in plain floats (units: loss per squared parameter unit).

    Attributes:
        step: optimizer step the measurement belongs to.
        lambda_max: largest algebraic Hessian eigenvalue (sharpness).
        eigenvalues: top-k eigenvalues, descending.
        residuals: Ritz residual norms ``||H y - theta y||`` of those.
        trace: trace estimate (NaN when not measured).
        trace_stderr: its standard error.
        threshold: edge-of-stability threshold from the optimizer (NaN: none).
        sharpness_ratio: sharpness / threshold, using the preconditioned
            sharpness for adaptive optimizers and the batch sharpness for
            mini-batch SGD when measured.
        preconditioned_lambda_max: ``lambda_max(P^-1 H)`` for Adam-type
            optimizers on the coordinates where their frozen-preconditioner
            linearization holds (:mod:`curvwatch.optim.linearization`; NaN
            for other optimizers): what :attr:`sharpness_ratio` compares with
            the threshold.
        full_preconditioned_lambda_max: the same on every coordinate (a
            diagnostic; NaN unless measured with the products left and
            certified to ``Budget.tol``). At least ``preconditioned_lambda_max``
            (Cauchy interlacing), equal to it where nothing was left out.
        excluded_fraction: the fraction of coordinates left out of the
            linear set (NaN for other optimizers).
        hvps: products spent.
        seconds: wall-clock seconds spent.
        converged: every Lanczos solve met its tolerance.
        lr: the learning rate the threshold used.
        loss: the loss on the probe batch.
        method: how products were applied.
        top_overlap: ``|<u_t, u_{t-1}>|`` of consecutive top eigenvectors (NaN first).
        batch_sharpness: ``E_B[g_B^T H_B g_B / |g_B|^2]`` (NaN when not measured).
        batch_sharpness_stderr: its standard error.
        spectrum: SLQ ``(nodes, weights)`` flattened, when measured.
        error_bound: relative error bound of the threshold quantity's eigenvalue
            (preconditioned sharpness for adaptive optimizers, else lambda_max).
        overhead: measuring time so far over training time so far (the share
            :attr:`Budget.overhead` bounds).
        precision: what the products ran in: ``"fp32"``/``"tf32"`` (the float32
            matmul precision), or the model's dtype where it is not float32
            (``"fp64"``, ``"bf16"``, ``"fp16"``).
        update_sharpness: the curvature along the optimizer's last update ``u``
            (:func:`~curvwatch.optim.update_direction`), one product:
            ``u^T H u / u^T u``, or ``u^T H u / u^T P u`` for Adam-type
            optimizers (NaN: not measured).
        update_sharpness_ratio: ``update_sharpness / threshold`` (the same
            threshold as the sharpness it is a lower bound of).
        critical_sharpness: ``2 / eta_c``, ``eta_c`` the smallest step along
            ``-u`` that raises the probe loss, ``u`` the update the optimizer
            would take now from the probe's gradient (forward passes only,
            :func:`~curvwatch.directional.critical_sharpness`); NaN when not
            bracketed or not measured.
        critical_sharpness_ratio: ``critical_sharpness / (2 / lr)``: above 1,
            the step of ``lr`` along ``u`` raises the probe loss.
        critical_sharpness_evals: forward passes its line search took (0: none).
        critical_sharpness_seconds: seconds of the line search (part of
            ``seconds``; not logged, kept out of the learned cost of a product).
        blocks: ``{name: BlockResult}`` of the blocks measured this time
            (``CurvatureMonitor(blocks=...)``; empty when none were), logged as
            ``curvature/block/<name>/lambda_max`` etc. (:func:`block_tag`).
        uncertified: the eigenvalue fields not certified to ``Budget.tol``
            (``"lambda_max"`` with ``"eigenvalues"``, ``"preconditioned_lambda_max"``):
            lower bounds (products or seconds ran out) or differences found
            unreliable. :meth:`scalars` logs them under ``curvature_diagnostics/``.
    """

    step: int
    lambda_max: float
    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]
    trace: float = math.nan
    trace_stderr: float = math.nan
    threshold: float = math.nan
    sharpness_ratio: float = math.nan
    preconditioned_lambda_max: float = math.nan
    hvps: int = 0
    seconds: float = 0.0
    converged: bool = False
    lr: float = math.nan
    loss: float = math.nan
    method: str = ""
    top_overlap: float = math.nan
    batch_sharpness: float = math.nan
    batch_sharpness_stderr: float = math.nan
    spectrum: tuple[tuple[float, ...], tuple[float, ...]] | None = field(default=None, repr=False)
    error_bound: float = math.nan
    overhead: float = math.nan
    precision: str = "fp32"
    update_sharpness: float = math.nan
    update_sharpness_ratio: float = math.nan
    critical_sharpness: float = math.nan
    critical_sharpness_ratio: float = math.nan
    critical_sharpness_evals: int = 0
    critical_sharpness_seconds: float = 0.0
    blocks: dict[str, BlockResult] = field(default_factory=dict)
    uncertified: tuple[str, ...] = ()
    full_preconditioned_lambda_max: float = math.nan
    excluded_fraction: float = math.nan

    def scalars(self) -> dict[str, float]:
        """``{tag: value}`` of every finite scalar, as logged.

        Tags come from :func:`tag`: cost and diagnostics under
        ``curvature_diagnostics/``, the rest under ``curvature/``; an
        :attr:`uncertified` eigenvalue goes under ``curvature_diagnostics/``
        too (its bound is ``curvature_diagnostics/error_bound``), so the main
        curves hold certified values only.
        """
        values = {
            "lambda_max": self.lambda_max,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "threshold": self.threshold,
            "sharpness_ratio": self.sharpness_ratio,
            "preconditioned_lambda_max": self.preconditioned_lambda_max,
            "hvps": float(self.hvps),
            "seconds": self.seconds,
            "converged": float(self.converged),
            "top_overlap": self.top_overlap,
            "batch_sharpness": self.batch_sharpness,
            "batch_sharpness_stderr": self.batch_sharpness_stderr,
            "error_bound": self.error_bound,
            "overhead": self.overhead,
            "update_sharpness": self.update_sharpness,
            "update_sharpness_ratio": self.update_sharpness_ratio,
            "critical_sharpness": self.critical_sharpness,
            "critical_sharpness_ratio": self.critical_sharpness_ratio,
            "critical_sharpness_evals": float(self.critical_sharpness_evals or math.nan),
            "full_preconditioned_lambda_max": self.full_preconditioned_lambda_max,
            "excluded_fraction": self.excluded_fraction,
        }
        for i, value in enumerate(self.eigenvalues, start=1):
            values[f"lambda_{i}"] = value
        off_curves = set(self.uncertified)
        if "eigenvalues" in off_curves:
            off_curves.update(f"lambda_{i}" for i in range(1, len(self.eigenvalues) + 1))
        scalars = {tag(k, k in off_curves): float(v) for k, v in values.items() if math.isfinite(v)}
        for name, block in self.blocks.items():
            scalars.update(block.tags(name))
        return scalars

    def to_dict(self) -> dict:
        """All fields as JSON-ready plain Python values."""
        return asdict(self)


def tag(name: str, uncertified: bool = False) -> str:
    """The logged tag of a result field: ``curvature/<name>``, or ``curvature_diagnostics/<name>``.

    Diagnostics, and values not certified to their tolerance, go under ``curvature_diagnostics/``.
    """
    return (DIAGNOSTICS_PREFIX if uncertified or name in DIAGNOSTICS else TAG_PREFIX) + name


# The ratios that cross 1: the sharpness's and the two early warnings along the update.
CROSSING_QUANTITIES = ("sharpness_ratio", "update_sharpness_ratio", "critical_sharpness_ratio")


@dataclass(frozen=True)
class ThresholdEvent(CurvatureResult):
    """What ``CurvatureMonitor(on_threshold=...)`` receives: the result, and which ratio crossed 1.

    A :class:`CurvatureResult` (every field of the measurement, so a callback
    written for results keeps working) with three more fields.

    Attributes:
        quantity: the ratio that crossed, one of :data:`CROSSING_QUANTITIES`:
            ``"sharpness_ratio"`` (either way), ``"update_sharpness_ratio"`` or
            ``"critical_sharpness_ratio"`` (upwards: the early warnings).
        ratio: its value.
        stable_lr: ``lr / ratio``, the lr at which the ratio would be 1 (NaN
            without an lr).
    """

    quantity: str = "sharpness_ratio"
    ratio: float = math.nan
    stable_lr: float = math.nan

    @classmethod
    def of(cls, result: CurvatureResult, quantity: str) -> ThresholdEvent:
        """The event of ``result``'s ``quantity`` (a :data:`CROSSING_QUANTITIES` name)."""
        ratio = float(getattr(result, quantity))
        stable = result.lr / ratio if ratio > 0 and math.isfinite(result.lr) else math.nan
        values = {f.name: getattr(result, f.name) for f in fields(CurvatureResult)}
        return cls(**values, quantity=quantity, ratio=ratio, stable_lr=stable)


def block_tag(block: str, name: str, uncertified: bool = False) -> str:
    """The logged tag of a block's value: ``curvature/block/<block>/<name>``.

    ``curvature_diagnostics/block/<block>/<name>`` when not certified.
    """
    return f"{DIAGNOSTICS_PREFIX if uncertified else TAG_PREFIX}block/{block}/{name}"
