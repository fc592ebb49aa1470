"""Frozen result types of a measurement, and the tags they are logged under."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from curvwatch._errors import CurvatureError

TAG_PREFIX = "curvature/"


@dataclass(frozen=True)
class Budget:
    """How much one measurement may spend.

    Attributes:
        max_hvps: Hessian-vector products of one measurement, all solves together
            (eigenvalues, preconditioned eigenvalues, trace). Default 60.
        trace_hvps: of those, Rademacher probes for the trace. Default 10.
        max_seconds: wall-clock limit of one measurement, checked after every
            product; ``None``: no limit.
        tol: relative Ritz residual at which Lanczos stops. Default ``1e-3``.
    """

    max_hvps: int = 60
    trace_hvps: int = 10
    max_seconds: float | None = None
    tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.max_hvps < 1:
            raise CurvatureError(f"Budget.max_hvps must be >= 1, got {self.max_hvps}")
        if not 0 <= self.trace_hvps < self.max_hvps:
            raise CurvatureError(
                f"Budget.trace_hvps ({self.trace_hvps}) must be in [0, max_hvps={self.max_hvps})"
            )
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise CurvatureError(f"Budget.max_seconds must be positive, got {self.max_seconds}")
        if not 0 < self.tol < 1:
            raise CurvatureError(f"Budget.tol must be in (0, 1), got {self.tol}")


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
            optimizers (NaN otherwise).
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

    def scalars(self) -> dict[str, float]:
        """``{"curvature/<name>": value}`` of every finite scalar, as logged."""
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
        }
        for i, value in enumerate(self.eigenvalues, start=1):
            values[f"lambda_{i}"] = value
        return {TAG_PREFIX + k: float(v) for k, v in values.items() if math.isfinite(v)}

    def to_dict(self) -> dict:
        """All fields as JSON-ready plain Python values."""
        return asdict(self)
