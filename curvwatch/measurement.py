"""One measurement, as a pure procedure: ``(config, state, model, probe, step) -> (result, state)``.

:func:`measure` does, inside the guard the monitor has entered:

1. read the threshold (and Adam's preconditioner) from the optimizer;
2. build the operator (:mod:`curvwatch.operators.factory`), resolving
   ``method="auto"`` on first use and falling back to finite differences on a
   :class:`~curvwatch.NoSecondDerivativeError`; the update sharpness (one
   product along the optimizer's last update ``u``) comes first;
3. measure the threshold's quantity first: the preconditioned sharpness for
   Adam-type optimizers, else the top-``k`` eigenvalues (warm-started Lanczos,
   certified by a central difference under one-sided differences);
4. then, as the allowance permits: the raw top-``k`` (adaptive optimizers), the
   deflated Hutchinson trace, the SLQ spectrum, the batch sharpness; then, with
   ``blocks=``, each block's lambda_max (and preconditioned sharpness) with
   the products left (:meth:`_Measurement._blocks`);
5. return the frozen :class:`~curvwatch.CurvatureResult`, the new
   :class:`MeasurementState` (warm starts, resolved method) and the notes to
   warn about once. Nothing else is kept between measurements.

The monitor (:class:`~curvwatch.CurvatureMonitor`) owns the schedule, the time
share, the memory plan, the guard, the failure policy and the sinks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from curvwatch._errors import CurvatureError, NoSecondDerivativeError
from curvwatch._flat import flatten
from curvwatch.batch_sharpness import batch_sharpness
from curvwatch.blocks import block_parameters, lost_block_message
from curvwatch.chunked import split_probe
from curvwatch.directional import (
    critical_sharpness,
    directional_sharpness,
    missing_update_reason,
    next_update_direction,
    perturbed_loss,
    update_direction,
)
from curvwatch.memory import MemoryPlan
from curvwatch.operators._closure import zeros_for_none
from curvwatch.operators.distributed import Reduce
from curvwatch.operators.factory import (
    FISHER_CURVATURES,
    GGN_LM_HEAD,
    auto_method,
    build_fisher_operator,
    build_ggn_operator,
    build_operator,
)
from curvwatch.operators.preconditioned import PreconditionedOperator
from curvwatch.operators.sharded import is_sharded
from curvwatch.precision import matmul_precision, resolve_precision
from curvwatch.probe import LossFn
from curvwatch.results import BlockResult, Budget, CurvatureResult
from curvwatch.solvers.certificate import FD_AGREEMENT_RTOL, certify_top, descending, disagree, richardson
from curvwatch.solvers.density import slq
from curvwatch.solvers.lanczos import LanczosResult, gap_steps, lanczos
from curvwatch.solvers.trace import hutchinson
from curvwatch.stability import Threshold, preconditioner_diagonal, threshold

# Double backward is trusted when u^T H v and v^T H u agree to this (relative to
# |u| |Hv|): a Hessian is symmetric, while a second derivative with missing terms
# (a custom autograd.Function with a @once_differentiable backward) is not.
SYMMETRY_RTOL = 1e-2

# Central differences are trusted when their Rayleigh quotient at the top Ritz
# vector agrees with the exact one to this (kinks of ReLU-type activations break it).
DIFFERENCE_RTOL = 1e-2

# Where one-sided and central differences disagree (a sharp state), the central
# step is halved up to this many times (one central product each) for a
# Richardson extrapolation; the rounding error grows as 1/h, so not further.
RICHARDSON_HALVINGS = 3

# method="auto" measures with one-sided differences only where the memory plan
# says double backward does not fit; where those then disagree with central
# differences (Adam's P^-1/2 moves low-v coordinates by up to 1e4 times more:
# one-sided 6.9e8 vs central -3.4e6 at 355M), no reliable product fits.
UNRELIABLE_DIFFERENCES = (
    "one-sided and central differences disagree at this state, and double backward does not fit "
    "in the memory allowed, so no reliable product fits: the measurement is skipped rather than "
    "logged. Fix: more memory for the measurement (Budget(memory_ratio=...) or max_memory=...), "
    "a smaller probe batch, or fewer trainable parameters"
)

# A ratio sharpness/threshold is logged only when the sharpness is certified
# (Budget.tol) and known to this relative accuracy (its Lanczos error bound);
# otherwise it is a lower bound.
RATIO_MAX_ERROR = 1e-2

# The critical sharpness's line search: forward passes at eta > 0 (one more at
# eta = 0), and the relative width of the final bracket of eta_c.
CRITICAL_MAX_EVALS = 10
CRITICAL_RTOL = 1e-2

Note = tuple[str, str]  # (key, message): the monitor warns once per key


@dataclass(frozen=True)
class MeasurementConfig:
    """What to measure: the monitor's settings that a measurement reads."""

    top_k: int
    trace: bool
    budget: Budget
    method: str
    precision: str
    param_group: int
    seed: int
    reduce: Reduce | None
    batch_size: int | None
    batch_sharpness_batches: int
    spectrum_every: int
    ggn_kind: str | None
    criterion: Any
    curvature: str = "hessian"
    mc_samples: int = 1  # curvature="fisher": labels drawn per example
    update_sharpness: bool = False
    critical_sharpness: bool = False
    blocks: Any = None  # the blocks= spec (curvwatch.blocks); None: no per-block curvature
    blocks_every: int = 1  # blocks are measured at every blocks_every-th measurement


@dataclass(frozen=True)
class MeasurementState:
    """What one measurement hands to the next (all of it; checkpointed whole).

    Attributes:
        measurements: measurements made so far.
        warm: the last top-``k`` Ritz vectors ``(n, k)`` (warm start), or ``None``.
        warm_preconditioned: the last preconditioned top Ritz vector, or ``None``.
        resolved_method: what ``method="auto"`` resolved to (``None``: not yet).
        ggn_checked: the LM head's logits were compared with the model's once.
        checked: ``method="auto"``'s double backward, or explicit central
            differences, were cross-checked once (:func:`measure`).
        differences_disagree: that check found central differences off the exact
            product (kinks of ReLU-type activations): every later result says so.
        block_warm: per block name (``blocks=``), its last top Ritz vectors
            ``(raw, preconditioned)`` (each ``None`` until measured), or ``None``.
    """

    measurements: int = 0
    warm: torch.Tensor | None = None
    warm_preconditioned: torch.Tensor | None = None
    resolved_method: str | None = None
    ggn_checked: bool = False
    checked: bool = False
    differences_disagree: bool = False
    block_warm: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None


@dataclass(frozen=True)
class Probe:
    """The held-out batch, its loss, and (batch sharpness) where training mini-batches come from."""

    batch: Any
    loss_fn: LossFn
    minibatch: Callable[[], Any] | None = None


@dataclass(frozen=True)
class Allowance:
    """What this measurement may spend: products, seconds, memory (the monitor's plan)."""

    products: int
    seconds: float | None
    plan: MemoryPlan
    method: str | None = None  # a method forced by the memory plan for this measurement only
    pieces: int = 1  # differences: the probe batch split so one gradient's activations fit


def measure(
    config: MeasurementConfig,
    state: MeasurementState,
    model: torch.nn.Module,
    probe: Probe,
    step: int,
    optimizer: Any,
    allowance: Allowance,
) -> tuple[CurvatureResult, MeasurementState, list[Note]]:
    """Measure once; return the result, the new state and the notes to warn about.

    Raises:
        CurvatureError: bad input found while measuring (the message names the fix).
    """
    return _Measurement(config, state, model, probe, step, optimizer, allowance).run()


class _Measurement:
    """The locals of one :func:`measure` call (private: built and run once)."""

    def __init__(self, config, state, model, probe, step, optimizer, allowance) -> None:
        self.config, self.model, self.probe, self.step = config, model, probe, step
        self.optimizer, self.allowance = optimizer, allowance
        self.state = state
        self.notes: list[Note] = []
        self.start = time.perf_counter()
        seconds = allowance.seconds
        self.deadline = None if seconds is None else self.start + seconds
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.seed = config.seed + step
        self.resolved = state.resolved_method if config.method == "auto" else config.method
        self.ggn_checked = state.ggn_checked
        self.checked = state.checked
        self.differences_disagree = state.differences_disagree
        self.check_products = 0
        self._pieces = None  # the split probe batch (built once, when the plan asks for it)

    # -- the procedure ------------------------------------------------------------
    def run(self) -> tuple[CurvatureResult, MeasurementState, list[Note]]:
        config, state = self.config, self.state
        limit = self._threshold()
        diagonal = self._preconditioner(limit)
        products = self.allowance.products
        operator = self._operator()
        precision = resolve_precision(config.precision, self._method(), operator.device, operator.dtype)
        with matmul_precision(precision):
            try:
                check = self._should_check("double_backward") and products >= config.top_k + 4
                if check and not self._symmetric(operator):
                    raise NoSecondDerivativeError(
                        "double backward gives a non-symmetric Hessian here (u^T H v != v^T H u: "
                        "a custom autograd.Function with a @once_differentiable backward drops "
                        "second-order terms)"
                    )
                reserve = 1 if self._should_check("finite_difference") else 0  # for the check below
                left = products - operator.matvecs - reserve
                update = self._update_sharpness(operator, self._update_direction(limit), limit, diagonal, left)
                first = self._first_solve(operator, diagonal, products - operator.matvecs - reserve)
            except CurvatureError as error:
                if config.ggn_kind is not None or config.method != "auto" or not isinstance(
                    error, NoSecondDerivativeError
                ):
                    raise
                self.resolved = "finite_difference"
                self.notes.append(("auto-fd", f"curvwatch: {error}. Using finite differences from now on."))
                self.check_products += operator.matvecs  # spent on the operator given up
                operator = self._operator()
                precision = resolve_precision(config.precision, "finite_difference", operator.device, operator.dtype)
                update = self._update_sharpness(
                    operator, self._update_direction(limit), limit, diagonal, products - self.check_products
                )
                first = self._first_solve(operator, diagonal, products - self.check_products - operator.matvecs)
            certificate = self._certificate()

            def spent() -> int:
                return operator.matvecs + (certificate.matvecs if certificate else 0) + self.check_products

            # the last measurement's Ritz vectors, where they still fit the operator
            warm, warm_pre = _fitting(state.warm, operator), _fitting(state.warm_preconditioned, operator)
            pre = eig = None
            if diagonal is not None:
                pre_certificate = PreconditionedOperator(certificate, diagonal) if certificate else None
                pre = self._certified(first, pre_certificate)
                warm_pre = _warm_start(pre)
                # the device copy is not read again: rebinding both names (first holds the same
                # vector) frees it, one vector less during the solve below
                pre = first = replace(pre, eigenvectors=warm_pre[:, :1], guard=None)
                # the raw top-k only where its products can certify it (else it is noise off the curves)
                if products - spent() >= gap_steps(config.top_k) and not self._past():
                    eig = self._lanczos(operator, config.top_k, products - spent(), warm, self.seed)
                    eig = self._certified(eig, certificate)
            else:
                eig = self._certified(first, certificate)
            overlap = math.nan
            if eig is not None:
                overlap = _overlap(warm, eig.eigenvectors, operator.dot)
                warm = _warm_start(eig)
                if warm.device == eig.eigenvectors.device:  # on the CPU: one copy, not two
                    eig = replace(eig, eigenvectors=warm[:, : eig.eigenvectors.shape[1]], guard=None)
            threshold_solve = pre if pre is not None else eig
            if eig is not None and self._should_check("finite_difference") and products - spent() >= 1:
                self._check_differences(operator, eig)
            converged = threshold_solve.converged and (eig is None or eig.converged) and not self.differences_disagree

            trace_value = trace_stderr = math.nan
            left = products - spent()
            probes = config.budget.trace_hvps
            if config.trace and probes > 0 and left >= min(2, probes) and not self._past():
                tr = hutchinson(operator, min(probes, left), seed=self.seed + 2, deflation=eig)
                trace_value, trace_stderr = tr.estimate, tr.stderr

            spectrum = None
            if config.spectrum_every and state.measurements % config.spectrum_every == 0:
                steps = min(30, operator.size, (products - spent()) // 2)  # two probes
                if steps >= min(5, operator.size) and not self._past():
                    density = slq(operator, num_probes=2, num_steps=steps, seed=self.seed + 3)
                    weights = density.weights / density.weights.shape[0]
                    spectrum = (tuple(density.nodes.flatten().tolist()), tuple(weights.flatten().tolist()))

            bs = bs_err = math.nan
            bs_products = 0
            if config.batch_size is not None:
                bs, bs_err, bs_products = batch_sharpness(
                    self.model, self.probe.loss_fn, self.probe.batch, self.params, config.batch_size,
                    method=self._method(), max_batches=config.batch_sharpness_batches, seed=self.seed + 4,
                    reduce=config.reduce, source=self.probe.minibatch,
                )
            hvps = spent() + bs_products
            loss = self._probe_loss(operator)
            operator.release()
            # forward passes only, once the products' graph is gone (the line search
            # moves the parameters in place and restores them bit-exactly)
            started = time.perf_counter()
            critical, critical_ratio, critical_evals = self._critical_sharpness(limit, operator)
            critical_seconds = time.perf_counter() - started
            blocks, block_warm, block_products = self._blocks(limit, max(products - hvps, 0))
            hvps += block_products

        pre_lambda = pre.lambda_max if pre is not None else math.nan
        lambda_max = eig.lambda_max if eig is not None else math.nan
        uses_batch_sharpness = diagonal is None and config.batch_size is not None and not _adaptive(limit)
        sharp = pre_lambda if diagonal is not None else (bs if uses_batch_sharpness else lambda_max)
        if _adaptive(limit) and diagonal is None:
            # an adaptive threshold (38/lr for Adam) is in preconditioned units: the raw
            # lambda_max over it is no ratio at all (the "no-state" note says why)
            sharp = math.nan
        if not uses_batch_sharpness and not _certified_to(threshold_solve, RATIO_MAX_ERROR):
            # a Ritz value that has not converged is only a lower bound of the
            # sharpness: no ratio (and no crossing) from it; error_bound says why
            self.notes.append((
                "unconverged",
                f"curvwatch: step {self.step}: the threshold's eigenvalue is not certified to "
                f"Budget.tol (error bound {threshold_solve.relative_error_bound:.2g}) after "
                f"{hvps} products: it is a lower bound, logged without a sharpness ratio. Raise "
                "Budget.max_hvps / max_seconds / overhead",
            ))
            sharp = math.nan
        uncertified = self._uncertified(eig, pre)
        result = CurvatureResult(
            step=self.step,
            lambda_max=lambda_max,
            eigenvalues=tuple(eig.eigenvalues.tolist()) if eig is not None else (),
            residuals=tuple(eig.residuals.tolist()) if eig is not None else (),
            trace=trace_value,
            trace_stderr=trace_stderr,
            threshold=limit.value if limit else math.nan,
            sharpness_ratio=sharp / limit.value if limit else math.nan,
            preconditioned_lambda_max=pre_lambda,
            hvps=hvps,
            seconds=time.perf_counter() - self.start,
            converged=converged,
            lr=limit.lr if limit else math.nan,
            loss=math.nan if loss is None else float(loss),
            method=self._method_name(),
            top_overlap=overlap,
            batch_sharpness=bs,
            batch_sharpness_stderr=bs_err,
            spectrum=spectrum,
            error_bound=threshold_solve.relative_error_bound,
            precision=precision,
            update_sharpness=update,
            update_sharpness_ratio=update / limit.value if limit else math.nan,
            critical_sharpness=critical,
            critical_sharpness_ratio=critical_ratio,
            critical_sharpness_evals=critical_evals,
            critical_sharpness_seconds=critical_seconds,
            blocks=blocks,
            uncertified=uncertified,
        )
        new_state = MeasurementState(
            measurements=state.measurements + 1,
            warm=warm,
            warm_preconditioned=warm_pre,
            resolved_method=self.resolved,
            ggn_checked=self.ggn_checked,
            checked=self.checked,
            differences_disagree=self.differences_disagree,
            block_warm=block_warm,
        )
        return result, new_state, self.notes

    # -- its parts ------------------------------------------------------------------
    def _uncertified(self, eig: LanczosResult | None, pre: LanczosResult | None) -> tuple[str, ...]:
        """The eigenvalue fields not certified to ``Budget.tol``; one note says where they go."""
        unreliable = self.differences_disagree
        fields = []
        if eig is not None and (unreliable or not eig.converged):
            fields += ["lambda_max", "eigenvalues"]
        if pre is not None and (unreliable or not pre.converged):
            fields.append("preconditioned_lambda_max")
        if fields:
            self.notes.append((
                "uncertified",
                f"curvwatch: step {self.step}: {', '.join(fields)} not certified to Budget.tol "
                f"({self.config.budget.tol:g}): logged under curvature_diagnostics/ (with "
                "curvature_diagnostics/error_bound), not on the curvature/ curves; this happens when the "
                "products or seconds run out (raise Budget.max_hvps / overhead) or differences are unreliable",
            ))
        return tuple(fields)

    def _method(self) -> str | None:
        """The method of this measurement: one forced by the memory plan, else the resolved one."""
        return self.allowance.method or self.resolved

    # -- the early warnings along the update -------------------------------------------
    def _update_direction(self, limit: Threshold | None) -> torch.Tensor | None:
        """The optimizer's last update ``u`` (``theta_t = theta_{t-1} - lr u``), or ``None``.

        ``None`` without an optimizer, for one whose update is not known
        (:func:`~curvwatch.directional.update_direction`), before its first
        step, and when the update sharpness is not asked for (the critical
        sharpness searches along the next update instead).
        """
        config = self.config
        if limit is None or not config.update_sharpness:
            return None
        u = update_direction(self.optimizer, self.params, config.param_group)
        why = missing_update_reason(self.optimizer, self.params) if u is None else None
        if why is not None:  # the step's gradient was cleared: say once why the update sharpness is NaN
            self.notes.append(("update-missing", why))
        return u

    def _update_sharpness(self, operator, u, limit: Threshold | None, diagonal, left: int) -> float:
        """The curvature along ``u``: ``u^T H u / u^T u`` (``/ u^T P u`` for Adam-type), one product.

        NaN when not asked for, without ``u``, for an adaptive threshold without
        the preconditioner, when it would leave the threshold's solve fewer
        products than it needs, and in the first measurement under a time
        limit (which learns what a product costs with the threshold's quantity:
        its seconds may cover one product only).
        """
        config = self.config
        if not config.update_sharpness or u is None or (_adaptive(limit) and diagonal is None) or self._past():
            return math.nan
        if self.deadline is not None and self.state.measurements == 0:
            return math.nan
        if left < 1 + (1 if diagonal is not None else config.top_k):
            return math.nan
        return directional_sharpness(operator, u, diagonal)

    def _probe_gradient(self, operator) -> torch.Tensor:
        """The probe loss's flat gradient at theta (the mean over ranks under data parallelism).

        The Hessian operator's own (cached by its products; under differences
        summed over the probe's pieces, so it fits where they fit); one
        backward of the probe loss for the output-space operators (GGN,
        Fisher), which form no gradient.
        """
        at_theta = getattr(operator, "gradient_at_theta", None)  # this rank's: a ReducedOperator reduces products
        with torch.enable_grad():
            if callable(at_theta):
                gradient = at_theta()
            else:
                loss = self.probe.loss_fn(self.model, self.probe.batch)
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                gradient = flatten(zeros_for_none(grads, self.params))
        return gradient if self.config.reduce is None else self.config.reduce(gradient)

    def _critical_sharpness(self, limit: Threshold | None, operator) -> tuple[float, float, int]:
        """``(2 / eta_c, its ratio to 2 / lr, forward passes)`` along ``-u``: a line search, no products.

        ``u`` is the step the optimizer would take now from the probe's gradient
        (:func:`~curvwatch.directional.next_update_direction`), not the last
        step: at the edge of stability the last step overshot along the top
        eigenvector, so from where it landed its direction goes uphill at once
        and no ``eta_c`` can be bracketed (seen on the digits demo: 5 values in
        64 measurements; with the next step, 64 in 64, 0.95 lambda_max).

        Run after the products, with the measurement's seconds left (stopped at
        its deadline): it moves the parameters in place, which a graph built for
        products would not survive, and the threshold's quantity comes first.

        The loss at ``theta - eta u`` on the probe batch (parameters set in
        place and restored bit-exactly, :func:`~curvwatch.directional.perturbed_loss`),
        averaged over ranks so every rank takes the same branch. The threshold is
        ``2 / lr`` of the step taken, whatever the optimizer (momentum and the
        preconditioner are inside ``u``). NaN (with a note) when the search
        does not bracket ``eta_c``.
        """
        nan = (math.nan, math.nan, 0)
        if not self.config.critical_sharpness or self.optimizer is None or limit is None or self._past():
            return nan
        lr = limit.lr
        if lr is None or not (math.isfinite(lr) and lr > 0):
            return nan
        if is_sharded(self.model):  # FSDP1 must not run a forward without backward
            self.notes.append((
                "critical-sharded",
                "curvwatch: critical sharpness is not measured under FSDP (its line search runs forward "
                "passes without a backward); the update sharpness is",
            ))
            return nan
        u = next_update_direction(self.optimizer, self.params, self._probe_gradient(operator), self.config.param_group)
        if u is None:
            return nan
        loss_at = perturbed_loss(
            self.model, self.params, u, self.probe.loss_fn, self.probe.batch, reduce=operator.mean_over_ranks
        )
        evals = 0

        def timed(eta: float) -> float:  # within the measurement's seconds, like the products
            nonlocal evals
            if evals > 0 and self._past():
                raise _OutOfTime
            evals += 1
            return loss_at(eta)

        try:
            found = critical_sharpness(timed, lr, max_evals=CRITICAL_MAX_EVALS, rtol=CRITICAL_RTOL)
        except _OutOfTime:
            self.notes.append((
                "critical-time",
                f"curvwatch: step {self.step}: the critical sharpness's line search ran out of the "
                f"measurement's seconds after {evals} forward passes (it runs after the products, with "
                "the time left): not logged at such steps",
            ))
            return math.nan, math.nan, evals
        except CurvatureError as error:
            self.notes.append(
                ("critical-failed", f"curvwatch: step {self.step}: critical sharpness not measured: {error}")
            )
            return nan
        if not found.bracketed:
            case = (
                f"no step up to eta={found.eta_c:.3g} raised the probe loss"
                if found.eta_c >= lr
                else f"every step down to eta={found.eta_c:.3g} raised the probe loss"
            )
            self.notes.append((
                "critical-unbracketed",
                f"curvwatch: step {self.step}: the critical sharpness's line search along the update "
                f"(lr={lr:.4g}) found no bracket in {found.evals} forward passes ({case}); it is logged "
                "only when bracketed",
            ))
            return math.nan, math.nan, found.evals
        return found.value, found.value * lr / 2, found.evals

    def _method_name(self) -> str:
        """``CurvatureResult.method``: the product method, or the output-space curvature (with its kind)."""
        config = self.config
        if config.ggn_kind is None:
            return self._method() or ""
        if config.curvature in FISHER_CURVATURES:
            return config.curvature + ("_lm_head" if config.ggn_kind == GGN_LM_HEAD else "")
        return config.ggn_kind

    def _past(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    def _threshold(self) -> Threshold | None:
        if self.optimizer is None:
            self.notes.append(
                ("no-optimizer", "curvwatch: no optimizer given: sharpness is logged without a threshold")
            )
            return None
        limit = threshold(self.optimizer, self.config.param_group)
        if limit.note:  # no rule for this optimizer, or no lr: NaN threshold, said once
            self.notes.append((f"threshold-note {limit.rule}", f"curvwatch: {limit.note}"))
        return limit

    def _preconditioner(self, limit: Threshold | None) -> torch.Tensor | None:
        if limit is None or not limit.adaptive:
            return None
        diagonal = preconditioner_diagonal(self.optimizer, self.params)
        if diagonal is None:
            self.notes.append((
                "no-state",
                "curvwatch: the optimizer has no second-moment state for the measured "
                "parameters yet (before its first step?): preconditioned sharpness and the sharpness "
                "ratio skipped (the raw lambda_max is logged; the threshold is in preconditioned units)",
            ))
        return diagonal

    def _operator(self, scheme: str | None = None):
        """The Hessian operator, resolving ``method="auto"`` on first use (or the GGN's)."""
        config = self.config
        if config.ggn_kind is not None and config.curvature in FISHER_CURVATURES:
            # one fixed matrix per measurement: the Monte-Carlo labels drawn with seed + step
            return build_fisher_operator(
                self.model, self.probe.batch, config.criterion, self.params, config.ggn_kind, config.reduce,
                empirical=config.curvature == "empirical_fisher", mc_samples=config.mc_samples, seed=self.seed,
            )
        if config.ggn_kind is not None:
            operator = build_ggn_operator(
                self.model, self.probe.batch, config.criterion, self.params, config.ggn_kind, config.reduce,
                check=not self.ggn_checked,
            )
            self.ggn_checked = True  # the LM head's logits are compared with the model's once
            return operator
        if self.resolved is None:
            self.resolved = auto_method(self.model)

        def closure() -> torch.Tensor:
            return self.probe.loss_fn(self.model, self.probe.batch)

        method = self._method()
        pieces = None
        if self.allowance.pieces > 1 and method in ("finite_difference", "forward_difference"):
            if self._pieces is None:
                self._pieces = split_probe(self.model, self.probe.batch, self.probe.loss_fn, self.allowance.pieces)
            pieces = self._pieces
        return build_operator(self.model, closure, self.params, method, scheme, config.reduce, pieces)

    def _should_check(self, method: str) -> bool:
        """Cross-check ``method`` once per run (not under FSDP, not for the GGN)."""
        return (
            not self.checked
            and self.config.ggn_kind is None
            and self._method() == method
            and (method != "double_backward" or self.config.method == "auto")
            and not is_sharded(self.model)
        )

    def _symmetric(self, operator) -> bool:
        """``u^T H v == v^T H u`` to :data:`SYMMETRY_RTOL` (two products, once per run)."""
        self.checked = True
        generator = torch.Generator().manual_seed(self.seed + 5)
        u, v = operator.random_vector(generator), operator.random_vector(generator)
        hu, hv = operator.matvec(u), operator.matvec(v)
        scale = (operator.norm(u) * operator.norm(hv)).item() + (operator.norm(v) * operator.norm(hu)).item()
        gap = abs(operator.dot(u, hv).item() - operator.dot(v, hu).item())
        return gap <= SYMMETRY_RTOL * max(scale / 2, 1e-300)

    def _check_differences(self, operator, eig: LanczosResult) -> None:
        """Compare the central-difference top eigenvalue with the exact Rayleigh quotient once.

        Central differences on a ReLU network see the kinks (+69% on one) that
        double backward does not; where they disagree, every result of this run
        is reported as not converged, with one note.
        """
        self.checked = True

        def closure() -> torch.Tensor:
            return self.probe.loss_fn(self.model, self.probe.batch)

        try:
            exact = build_operator(self.model, closure, self.params, "double_backward", None, self.config.reduce)
            y = eig.eigenvectors[:, 0].contiguous()
            theta = (exact.dot(y, exact.matvec(y)) / exact.dot(y, y)).item()
        except NoSecondDerivativeError:
            return  # differences are the only way here
        finally:
            self.check_products += 1
        if abs(theta - eig.lambda_max) > DIFFERENCE_RTOL * max(abs(theta), 1e-30):
            self.differences_disagree = True
            self.notes.append((
                "differences-disagree",
                f"curvwatch: step {self.step}: central differences give lambda_max "
                f"{eig.lambda_max:.6g} where double backward gives {theta:.6g} on the same vector "
                "(kinks of ReLU-type activations, or a step outside its accurate range): results "
                "of this run are reported as not converged; method='auto' measures exactly",
            ))

    def _certificate(self):
        """A central-difference operator to certify the top eigenvalue, or ``None``."""
        if self.config.ggn_kind is not None or self._method() != "forward_difference":
            return None
        return self._operator(scheme="central")

    def _lanczos(self, operator, k: int, max_matvecs: int, warm, seed: int) -> LanczosResult:
        seconds = None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())
        plan = self.allowance.plan
        return lanczos(
            operator, k=k, tol=self.config.budget.tol, max_matvecs=max(k, max_matvecs),
            max_seconds=seconds, v0=warm, seed=seed, basis_device=plan.basis_device,
            max_basis=max(plan.max_basis, k + 1),
        )

    def _first_solve(self, operator, diagonal, products: int) -> LanczosResult:
        """The threshold's quantity: preconditioned sharpness (adaptive) or the top-k eigenvalues."""
        if diagonal is not None:
            return self._lanczos(
                PreconditionedOperator(operator, diagonal), 1, products,
                _fitting(self.state.warm_preconditioned, operator), self.seed + 1,
            )
        return self._lanczos(operator, self.config.top_k, products, _fitting(self.state.warm, operator), self.seed)

    def _certified(self, eig: LanczosResult, certificate) -> LanczosResult:
        """With one-sided differences: the top value re-measured by a central Rayleigh quotient."""
        if certificate is None:
            return eig
        certified = certify_top(certificate, eig)
        if disagree(certified.lambda_max, eig.lambda_max):
            extrapolated = self._extrapolated(certificate, eig, certified)
            if extrapolated is not None:
                return extrapolated
            # The finite-difference steps are outside their accurate range here
            # (kinks, strong third-order terms): say so rather than hide it.
            if self.allowance.method is not None:
                raise CurvatureError(UNRELIABLE_DIFFERENCES)
            self.notes.append((
                "fd-disagree",
                f"curvwatch: step {self.step}: one-sided and central differences disagree "
                f"({eig.lambda_max:.6g} vs {certified.lambda_max:.6g}); such measurements "
                "are reported as not converged (method='auto' measures exactly)",
            ))
            certified = replace(certified, converged=False)
        return certified

    def _extrapolated(self, certificate, eig: LanczosResult, coarse: LanczosResult) -> LanczosResult | None:
        """At a sharp state: the central Rayleigh quotient again at smaller steps, extrapolated.

        The step is halved up to :data:`RICHARDSON_HALVINGS` times, one central
        product each, and each pair of neighbouring steps is extrapolated
        (:func:`~curvwatch.solvers.certificate.richardson`) until the smaller
        step's estimated error is within
        :data:`~curvwatch.solvers.certificate.FD_AGREEMENT_RTOL`. Returns that
        extrapolated result, or ``None`` (the caller reports the disagreement
        as not converged).
        """
        differences = certificate
        while not hasattr(differences, "step_scale") and hasattr(differences, "operator"):
            differences = differences.operator
        if not hasattr(differences, "step_scale"):
            return None
        steps = [coarse.lambda_max]
        try:
            for halving in range(1, RICHARDSON_HALVINGS + 1):
                differences.step_scale = 0.5**halving
                fine = certify_top(certificate, eig)
                steps.append(fine.lambda_max)
                value, error = richardson(steps[-2], steps[-1])
                if error <= FD_AGREEMENT_RTOL * abs(value):
                    break
            else:
                return None
        finally:
            differences.step_scale = 1.0
        self.notes.append((
            "fd-extrapolated",
            f"curvwatch: step {self.step}: a sharp state: central differences at 1, 1/2, ... of the usual "
            f"step give {', '.join(f'{v:.6g}' for v in steps)}; lambda_max is the Richardson extrapolation "
            f"of the last two, {value:.6g} (estimated error {error / abs(value):.1e})",
        ))
        values = fine.eigenvalues.clone()
        values[0] = value
        bounds = None if fine.error_bounds is None else fine.error_bounds.clone()
        if bounds is not None:
            bounds[0] = max(float(bounds[0]), error)
        return descending(replace(fine, eigenvalues=values, error_bounds=bounds))

    def _probe_loss(self, operator) -> float:
        """The probe loss at theta, averaged over ranks (a forward of its own where no product formed it)."""
        loss = operator.loss if self.config.ggn_kind is None else None  # a GGN never forms the loss
        if loss is None:  # nor do central differences at theta itself
            if is_sharded(self.model):  # FSDP1 must not run a forward without backward
                operator.gradient_at_theta()
                loss = operator.loss
            else:
                with torch.no_grad():
                    loss = float(self.probe.loss_fn(self.model, self.probe.batch))
        return operator.mean_over_ranks(loss)

    # -- per-block curvature (blocks=...) -----------------------------------------------
    def _blocks(self, limit: Threshold | None, left: int):
        """Each block's curvature, after the global quantities, within ``left`` products.

        Returns ``({name: BlockResult}, the per-block warm starts, products spent)``.
        A block the products (or seconds) do not reach is NaN.
        """
        config, state = self.config, self.state
        warm_blocks = dict(state.block_warm or {})
        if config.blocks is None or state.measurements % max(config.blocks_every, 1) != 0:
            return {}, (warm_blocks or None), 0
        results: dict[str, BlockResult] = {}
        spent, unmeasured = 0, []
        for index, (name, params) in enumerate(block_parameters(self.model, config.blocks).items()):
            if not params:  # all frozen since the monitor was built: the others and the global values go on
                self.notes.append((f"block-lost {name}", lost_block_message(self.model, config.blocks, name)))
                results[name] = BlockResult()
                continue
            if left - spent < 1 or self._past():
                results[name] = BlockResult()
                unmeasured.append(name)
                continue
            try:
                results[name], warm_blocks[name], used = self._block(
                    params, self.seed + 10 + 2 * index, limit, warm_blocks.get(name, (None, None)), left - spent
                )
            except CurvatureError as error:
                self.notes.append((f"block-failed {name}", f"curvwatch: block {name!r} not measured: {error}"))
                results[name] = BlockResult()
                continue
            spent += used
        if unmeasured:
            self.notes.append((
                "blocks-unmeasured",
                f"curvwatch: step {self.step}: the products ran out before blocks {unmeasured} (logged as "
                "NaN, i.e. not at all): each block takes about as many products as the global lambda_max; "
                "raise Budget.max_hvps, or measure blocks less often (blocks_every=...)",
            ))
        return results, warm_blocks, spent

    def _block(self, params, seed: int, limit: Threshold | None, warm, left: int):
        """One block: ``lambda_max(H_bb)`` (and ``P_b^-1/2 H_bb P_b^-1/2``'s for adaptive optimizers).

        The operators are the global ones' (same method, same probe batch) built
        for the block's parameters alone: double backward differentiates the
        block's gradient with respect to the block, differences perturb only the
        block (the sharded operator too). Returns the result, the new warm
        starts ``(raw, preconditioned)`` and the products spent.
        """
        warm_eig, warm_pre = warm
        whole = self.params
        self.params = params  # the builders below read self.params
        try:
            operator = self._operator()
            certificate = self._certificate()
        finally:
            self.params = whole

        def spent() -> int:
            return operator.matvecs + (certificate.matvecs if certificate else 0)

        adaptive = _adaptive(limit)
        pre = eig = None
        try:
            diagonal = preconditioner_diagonal(self.optimizer, params) if adaptive else None
            if diagonal is not None:
                pre = self._lanczos(
                    PreconditionedOperator(operator, diagonal), 1, left, _fitting(warm_pre, operator), seed + 1
                )
                pre = self._certified(pre, PreconditionedOperator(certificate, diagonal) if certificate else None)
                warm_pre = _warm_start(pre)
            if left - spent() >= 1 and not self._past():
                eig = self._lanczos(operator, 1, left - spent(), _fitting(warm_eig, operator), seed)
                eig = self._certified(eig, certificate)
                warm_eig = _warm_start(eig)
        finally:
            used = spent()
            operator.release()
        sharp = pre if adaptive else eig
        ratio = math.nan
        if limit is not None and sharp is not None and _certified_to(sharp, RATIO_MAX_ERROR):
            ratio = sharp.lambda_max / limit.value
        solves = [s for s in (pre, eig) if s is not None]
        result = BlockResult(
            lambda_max=eig.lambda_max if eig is not None else math.nan,
            preconditioned_lambda_max=pre.lambda_max if pre is not None else math.nan,
            sharpness_ratio=ratio,
            hvps=used,
            converged=bool(solves) and all(s.converged for s in solves) and not self.differences_disagree,
        )
        return result, (warm_eig, warm_pre), used


def affordable_products(budget: Budget, top_k: int, seconds: float | None, seconds_per_product: float) -> int:
    """Products a measurement may apply: ``max_hvps``, fewer when its seconds are short."""
    if seconds is None or math.isnan(seconds_per_product) or seconds_per_product <= 0:
        return budget.max_hvps
    return max(top_k, min(budget.max_hvps, int(seconds / seconds_per_product)))


class _OutOfTime(Exception):
    """The critical sharpness's line search reached the measurement's deadline."""


def _certified_to(solve: LanczosResult, error: float) -> bool:
    """``solve`` converged (to ``Budget.tol``) with a relative error bound of at most ``error``."""
    return solve.converged and solve.relative_error_bound <= error


def _adaptive(limit: Threshold | None) -> bool:
    """True when ``limit`` compares against a preconditioned sharpness."""
    return limit is not None and limit.adaptive


def _kept(vectors: torch.Tensor) -> torch.Tensor:
    """Ritz vectors kept as the next warm start: on the host in bfloat16 when they live on a GPU.

    A warm start only has to point near the top eigenvector (it gets 1% noise
    anyway), so bfloat16's 0.4% rounding costs nothing, and between
    measurements the training keeps its device memory: ``k + 1`` vectors of
    ``2 n`` bytes on the host instead of ``4 n`` on the device.
    """
    vectors = vectors.detach()
    if vectors.device.type == "cpu":
        return vectors
    # rounded on the device, then copied: half the bytes over the link and no
    # conversion on the host (on an H200 at 355M, .to("cpu", bfloat16) took 1.1 s)
    return vectors.to(torch.bfloat16).to("cpu")


def _warm_start(eig: LanczosResult) -> torch.Tensor:
    """The next warm start: the Ritz vectors :func:`_kept`, and the solve's guard column beside them."""
    vectors = _kept(eig.eigenvectors)
    if eig.guard is None:
        return vectors
    return torch.cat([vectors, eig.guard[:, None].to(vectors.dtype)], dim=1)


def _fitting(warm: torch.Tensor | None, operator) -> torch.Tensor | None:
    """A warm start, where it still fits ``operator`` (else ``None``: a cold start).

    It no longer fits when the measured parameters changed size: a block's, or the
    whole model's after parameters were unfrozen (``requires_grad_(True)``) or a
    state of another model was loaded (``load_state_dict``).
    """
    return warm if warm is not None and warm.shape[0] == operator.size else None


def _overlap(previous: torch.Tensor | None, current: torch.Tensor, dot=torch.dot) -> float:
    """``|<u_t, u_t-1>|`` of the top Ritz vectors; ``dot`` is the operator's (all-reduced under FSDP)."""
    if previous is None or previous.shape[0] != current.shape[0]:
        return math.nan
    a, b = previous[:, 0].to(current.device, current.dtype), current[:, 0]
    return abs(dot(a, b).item()) / max((dot(a, a) * dot(b, b)).sqrt().item(), 1e-300)
