"""CurvatureMonitor: every ``every`` optimizer steps, measure and log curvature.

One measurement (:meth:`CurvatureMonitor.measure`):

1. enter :func:`~curvwatch.guard.measurement_guard` (modes of the training loss:
   normalization layers as training runs them, dropout off; RNG, buffers,
   autocast off, math attention);
2. build the Hessian operator on the probe batch (one first-order graph);
   first the update sharpness (one product along the optimizer's last
   update), last the critical sharpness (a forward-only line search along the
   update it would take now);
3. top-``k`` Lanczos, warm-started from the previous eigenvectors;
4. for Adam-type optimizers, Lanczos on ``P^-1/2 H P^-1/2`` (preconditioned
   sharpness);
5. Hutchinson trace deflated by the Ritz vectors of step 3;
6. optional: batch sharpness, SLQ spectrum;
7. threshold and ratio from the optimizer; hand the result to the sinks.

Failures inside a measurement are one warning and a skipped point, unless
``strict=True``.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Literal

import torch

from curvwatch._errors import CurvatureError, CurvatureWarning
from curvwatch._flat import local
from curvwatch.blocks import BlockSpec, block_patterns, resolve_blocks
from curvwatch.cost import OverheadAccount
from curvwatch.crossings import Crossings
from curvwatch.guard import measurement_guard, normalization_mismatch
from curvwatch.loaders import TrainingBatches
from curvwatch.measurement import (
    Allowance,
    MeasurementConfig,
    MeasurementState,
    Probe,
    affordable_products,
)
from curvwatch.measurement import measure as measure_once
from curvwatch.memory import ActivationGauge, MemoryPlan, device_allowance, plan_with_pieces
from curvwatch.operators.distributed import Reduce
from curvwatch.operators.factory import (
    CURVATURES,
    MONITOR_METHODS,
    ggn_kind,
)
from curvwatch.operators.sharded import check_supported, is_sharded
from curvwatch.precision import PRECISIONS, Precision
from curvwatch.probe import LossFn, batch_length, loss_closure_factory, move_to
from curvwatch.results import Budget, CurvatureResult, ThresholdEvent
from curvwatch.solvers.lanczos import default_max_basis, gap_steps
from curvwatch.stability import unwrap_optimizer

logger = logging.getLogger("curvwatch")

Sink = Callable[[CurvatureResult], Any]
MethodChoice = Literal[
    "auto", "double_backward", "forward_over_reverse", "finite_difference", "forward_difference"
]
CurvatureChoice = Literal["hessian", "ggn", "fisher", "empirical_fisher"]


class CurvatureMonitor:
    r"""Measure sharpness, trace and the edge-of-stability ratio on a probe batch.

    Args:
        model: the live model (unwrapped from DDP; the monitor never changes it).
        batch: the held-out probe batch (moved to the model's device once).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        criterion: shortcut for ``(inputs, targets)`` batches:
            ``criterion(model(inputs), targets)``.
        every: measure after every ``every``-th optimizer step. Default 100.
        top_k: eigenvalues per measurement (``curvature/lambda_1..k``). Default 2.
        trace: also estimate the Hessian trace. Default True.
        budget: :class:`~curvwatch.Budget`: the share of training time measuring
            may take (default 5%, cumulative; a due measurement that does not fit
            is deferred), the memory it may add, and hard caps per measurement.
            The threshold's quantity is measured first (preconditioned sharpness
            for Adam-type optimizers, else lambda_max), then raw lambda_max, the
            trace and the spectrum as the budget allows.
        precision: float32 matmul precision of exact products: ``"auto"`` (TF32
            on CUDA, 2x faster, within 1e-4 of float32), ``"tf32"`` or ``"fp32"``.
            Finite differences always run in float32.
        method: ``"auto"`` (double backward; finite differences for FSDP or a
            model without a second derivative), or one of
            ``double_backward | forward_over_reverse | finite_difference``.
        optimizer: where thresholds and the preconditioner come from; ``None``:
            sharpness is logged without a threshold.
        sinks: callables receiving each :class:`~curvwatch.CurvatureResult`.
        strict: raise on a failed measurement instead of warning and skipping.
        train_mode: which modes the model is measured in (buffers and flags
            restored afterwards; the reasons are in :mod:`curvwatch.guard`).
            ``None`` (default, auto): the curvature of the loss training
            descends, without its noise: normalization layers with running
            statistics (BatchNorm, SyncBatchNorm, InstanceNorm) keep their
            current mode (batch statistics during training; frozen ones stay
            frozen), every other module is in eval mode (dropout off).
            ``False``: eval mode throughout (running statistics: the inference
            loss). ``True``: the modes as they are (dropout on), with one
            dropout mask for every product of a measurement.
        param_group: the parameter group whose lr sets the threshold.
        seed: seeds start vectors and probes (``seed + step``).
        reduce: mean over data-parallel ranks of a tensor (each rank holds its
            share of the probe batch); ``None``: single process.
        basis_device: where Lanczos keeps its basis (``"cpu"`` for big models).
        batch_size: also measure the batch sharpness on mini-batches of this size
            drawn from the probe batch (mini-batch SGD's stability quantity).
        batch_sharpness_batches: at most this many mini-batches per measurement.
        minibatches: an iterable of training mini-batches (e.g. the training
            ``DataLoader``); batch sharpness then draws from it (cycling) instead
            of subsampling the probe batch. Needs ``batch_size`` (documentation of
            the size; the batches are used as they come).
        spectrum_every: every ``M``-th measurement also estimates the spectral
            density by SLQ (``curvature/spectrum``); 0: never.
        on_threshold: ``on_threshold(event)`` called when ``sharpness_ratio``
            crosses 1 upwards or falls back below it, and when an early-warning
            ratio (``update_sharpness_ratio``, ``critical_sharpness_ratio``)
            crosses 1 upwards. ``event`` is a
            :class:`~curvwatch.results.ThresholdEvent`: the
            :class:`~curvwatch.CurvatureResult` with ``quantity`` (which ratio
            crossed), ``ratio`` and ``stable_lr`` (``lr / ratio``). A callback
            that raises is one warning (``strict=True`` raises).
        update_sharpness: also measure the curvature along the optimizer's last
            update ``u`` (:func:`~curvwatch.directional.update_direction`):
            ``u^T H u / u^T u``, for Adam-type optimizers ``u^T H u / u^T P u``
            (``curvature/update_sharpness``), and its ratio to the threshold
            (``curvature/update_sharpness_ratio``; the sharpness's threshold,
            of which it is a lower bound). One product of the budget, measured
            first: an early warning that the step is too long along its own
            direction. Skipped without an optimizer, for one whose update is
            not known (SGD, Adam, AdamW, Adamax, RMSprop are), and before its
            first step. Default True.
        critical_sharpness: also measure the critical sharpness ``2 / eta_c``,
            ``eta_c`` the smallest step along ``-u`` that raises the probe
            loss, ``u`` the update the optimizer would take now from the
            probe's gradient (the last update overshoots at the edge of
            stability and cannot be searched along) (Kalra et al. 2026; a forward-only line
            search after the products, within the measurement's seconds, at
            most 11 forward passes:
            ``curvature/critical_sharpness``, its evaluations in
            ``curvature_diagnostics/critical_sharpness_evals``), and its ratio
            to ``2 / lr`` (``curvature/critical_sharpness_ratio``; above 1 the
            step of ``lr`` raises the loss, whatever the optimizer). It needs
            no second derivative (it runs where finite differences measure the
            rest), moves the parameters in place and restores them bit-exactly;
            logged only when the search brackets ``eta_c``. Not under FSDP.
            Default True.
        curvature: ``"hessian"`` (default) or ``"ggn"``: the generalized
            Gauss-Newton matrix ``J^T H_out J`` (positive semi-definite; the
            Hessian without the network's second-order term) in place of the
            Hessian, for every logged quantity (eigenvalues, trace,
            preconditioned sharpness, spectrum). Supported losses:
            ``criterion=nn.CrossEntropyLoss()`` (mean, no class weights; its
            ``ignore_index`` is honoured) or ``nn.MSELoss()`` (mean) with
            ``(inputs, targets)`` batches (:class:`~curvwatch.GGNOperator`,
            ``result.method == "ggn"``), and a Hugging Face causal LM with a dict
            batch holding ``input_ids`` and ``labels`` (the chunked LM-head
            path :func:`~curvwatch.operators.lm_head.causal_lm_ggn_operator`,
            ``result.method == "ggn_lm_head"``). ``method`` is ignored (the GGN
            products are exact; no finite-difference certificate); not
            supported under FSDP or with batch sharpness (``batch_size``).
            ``"fisher"``: the Monte-Carlo ("true") Fisher, ``mc_samples`` labels
            per example drawn from the model's predictive distribution with the
            seed ``seed + step`` (:class:`~curvwatch.MonteCarloFisherOperator`;
            its expectation is the GGN); ``"empirical_fisher"``: ``(1/N) sum_i
            g_i g_i^T`` of the per-example gradients with the batch's labels
            (:class:`~curvwatch.EmpiricalFisherOperator`; not a Hessian
            approximation in general). Same losses and limits as ``"ggn"``;
            ``result.method`` is the curvature's name (``+ "_lm_head"`` for a
            causal LM, whose full logits are held).
        mc_samples: labels drawn per example by ``curvature="fisher"``
            (default 1). The estimate's relative error falls as
            ``1/sqrt(N * mc_samples)`` (``N`` examples, or counted tokens);
            a product costs about the same whatever it is.
        blocks: per-block curvature (default ``None``: off): ``"layers"`` (one
            block per layer of the model's stack of repeated layers, e.g.
            GPT-2's ``h.0 .. h.N``), ``"modules"`` (one per top-level child
            module), or a dict ``{name: fnmatch pattern or [patterns]}`` over
            ``model.named_parameters()`` names, e.g. ``{"attn": "*.attn.*",
            "mlp": "*.mlp.*"}`` (trainable parameters only; a parameter may be
            in several blocks; a pattern matching none is an error here; see
            :mod:`curvwatch.blocks`). Each block gets the top eigenvalue of the
            Hessian restricted to its parameters (``H_bb``), for Adam-type
            optimizers also its preconditioned sharpness, and the ratio of its
            sharpness to the global threshold (``result.blocks``; tags
            ``curvature/block/<name>/lambda_max``, ``.../preconditioned_lambda_max``,
            ``.../sharpness_ratio``). Measured after the global quantities with
            the products left in the budget (a block they do not reach is
            NaN), warm-started per block. The global values stay: a block's
            value is no share of them (``lambda_max(H) >= lambda_max(H_bb)``,
            and the coupling between blocks can make the whole far sharper).
            Cost: each block takes about as many products as the global
            lambda_max, and each product is a full backward through the
            model whatever the block's size.
        blocks_every: measure the blocks at every ``blocks_every``-th
            measurement only (others log the global values alone). Default 1.

    Raises:
        CurvatureError: bad arguments (named in the message), including a
            ``curvature="ggn"`` setup with no known output Hessian, an
            ``optimizer`` that holds none of the model's parameters, a
            non-callable ``on_threshold`` and ``Budget.max_basis <= top_k``.

    Example::

        monitor = CurvatureMonitor(model, (x_val, y_val), criterion=nn.CrossEntropyLoss(),
                                   every=100, optimizer=opt, sinks=[TensorBoardSink("runs/a")])
        monitor.attach(opt)          # measures after every 100th opt.step()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: Any,
        loss_fn: LossFn | None = None,
        criterion: Callable | None = None,
        every: int = 100,
        top_k: int = 2,
        trace: bool = True,
        budget: Budget | None = None,
        method: MethodChoice = "auto",
        optimizer: Any = None,
        sinks: Iterable[Sink] = (),
        strict: bool = False,
        train_mode: bool | None = None,
        param_group: int = 0,
        seed: int = 0,
        reduce: Reduce | None = None,
        basis_device: str | torch.device | None = None,
        batch_size: int | None = None,
        batch_sharpness_batches: int = 32,
        minibatches: Iterable[Any] | None = None,
        spectrum_every: int = 0,
        on_threshold: Callable[[CurvatureResult], Any] | None = None,
        curvature: CurvatureChoice = "hessian",
        mc_samples: int = 1,
        precision: Precision = "auto",
        update_sharpness: bool = True,
        critical_sharpness: bool = True,
        blocks: BlockSpec | None = None,
        blocks_every: int = 1,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise CurvatureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise CurvatureError("the model has no trainable parameters (requires_grad=True)")
        check_supported(model)
        if not _is_int(every, least=1):
            raise CurvatureError(f"every must be a positive integer (measure every N steps), got {every!r}")
        if not _is_int(top_k, least=1):
            raise CurvatureError(f"top_k must be a positive integer, got {top_k!r}")
        _check_flags(trace=trace, strict=strict)  # trace="no" is truthy: it turned the trace on
        if not _is_int(seed):
            # a float (or a numpy integer) reached torch's manual_seed at every measurement
            raise CurvatureError(f"seed must be a Python int, got {seed!r} ({type(seed).__name__})")
        if method != "auto" and method not in MONITOR_METHODS:
            raise CurvatureError(f"unknown method {method!r}; choose 'auto' or one of {MONITOR_METHODS}")
        if curvature not in CURVATURES:
            raise CurvatureError(f"unknown curvature {curvature!r}; choose one of {CURVATURES}")
        if curvature != "hessian" and batch_size is not None:
            raise CurvatureError(
                "batch sharpness (batch_size=...) measures the Hessian and is not available "
                f"with curvature={curvature!r}: drop batch_size, or pass curvature='hessian'"
            )
        budget = budget if budget is not None else Budget()
        if not isinstance(budget, Budget):
            raise CurvatureError("budget must be a curvwatch.Budget(max_hvps=..., max_seconds=...)")
        if budget.max_hvps - (budget.trace_hvps if trace else 0) < top_k:
            raise CurvatureError(
                f"budget.max_hvps={budget.max_hvps} leaves fewer than top_k={top_k} products for Lanczos"
            )
        if batch_size is not None and not _is_int(batch_size, least=1):
            raise CurvatureError(f"batch_size must be a positive integer, got {batch_size!r}")
        if minibatches is not None and batch_size is None:
            raise CurvatureError("minibatches=... is for batch sharpness: also pass batch_size=<training batch size>")
        if budget.max_basis is not None and budget.max_basis <= top_k:
            raise CurvatureError(
                f"Budget.max_basis={budget.max_basis} must exceed top_k={top_k} (Lanczos keeps at least "
                f"top_k + 1 basis vectors): pass Budget(max_basis={top_k + 2}) or more, None for the "
                "default, or a smaller top_k"
            )
        if optimizer is not None:
            _check_param_group(unwrap_optimizer(optimizer), param_group)
            _check_holds_parameters(unwrap_optimizer(optimizer), model)
        if on_threshold is not None and not callable(on_threshold):
            raise CurvatureError(
                f"on_threshold must be a callable on_threshold(event), got {on_threshold!r} "
                f"({type(on_threshold).__name__}); pass a function, or None"
            )
        if not _is_int(spectrum_every, least=0):
            raise CurvatureError(
                f"spectrum_every must be 0 (never) or a positive integer (every M-th measurement), "
                f"got {spectrum_every!r}"
            )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if top_k > trainable:
            raise CurvatureError(
                f"top_k={top_k} exceeds the number of trainable parameters ({trainable}): "
                f"the Hessian has {trainable} eigenvalues; pass top_k <= {trainable}"
            )
        if train_mode is not None and not isinstance(train_mode, bool):
            raise CurvatureError(f"train_mode must be None (auto), True or False, got {train_mode!r}")
        resolve_blocks(model, blocks)  # a malformed spec or a pattern matching nothing raises here
        if not _is_int(blocks_every, least=1):
            raise CurvatureError(
                f"blocks_every must be a positive integer (every k-th measurement), got {blocks_every!r}"
            )
        if not _is_int(mc_samples, least=1):
            raise CurvatureError(f"mc_samples must be a positive integer (labels per example), got {mc_samples!r}")
        _check_flags(update_sharpness=update_sharpness, critical_sharpness=critical_sharpness)
        if precision not in PRECISIONS:
            raise CurvatureError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        if basis_device is not None:
            try:
                basis = torch.device(basis_device)
            except (RuntimeError, TypeError) as error:
                raise CurvatureError(f"basis_device={basis_device!r} is not a device: {error}") from error
            if basis.type == "cuda" and not torch.cuda.is_available():
                raise CurvatureError(
                    f"basis_device={basis_device!r} but CUDA is not available: pass basis_device='cpu' or None"
                )
        if callable(sinks) and not isinstance(sinks, Iterable):
            raise CurvatureError(
                f"sinks must be a list of callables: pass sinks=[<the {type(sinks).__name__}>], not the sink itself"
            )
        sinks = tuple(sinks)
        for sink in sinks:
            if not callable(sink):
                raise CurvatureError(f"sinks must be callables sink(result), got {type(sink).__name__}")
        for name, fn in (("criterion", criterion), ("loss_fn", loss_fn)):
            if isinstance(fn, type):  # nn.CrossEntropyLoss, not nn.CrossEntropyLoss(): fails deep in a measurement
                cls = fn.__name__
                fix = f"criterion={cls}()" if issubclass(fn, torch.nn.Module) else f"an instance of {cls}"
                raise CurvatureError(f"{name}={cls} is a class: pass {fix}")
        self.model = model
        self.loss_fn = loss_closure_factory(batch, loss_fn, criterion)
        self.curvature = curvature
        self.mc_samples = mc_samples
        self.criterion = criterion
        # "ggn" or "ggn_lm_head": which Gauss-Newton path (None: the Hessian)
        # (the Fisher curvatures use the same kinds of loss)
        self._ggn_kind = (
            ggn_kind(model, batch, loss_fn, criterion, curvature=curvature) if curvature != "hessian" else None
        )
        device = next(p for p in model.parameters() if p.requires_grad).device
        self.batch = move_to(batch, device) if device.type != "meta" else batch
        if batch_size is not None and minibatches is None and _known_length(self.batch) < batch_size:
            raise CurvatureError(
                f"batch_size={batch_size} is larger than the probe batch ({_known_length(self.batch)} "
                "examples), which batch sharpness subsamples: pass a larger probe batch, or "
                "minibatches=<the training loader>"
            )
        self.every = every
        self.top_k = top_k
        self.trace = trace
        self.budget = budget
        self.method = method
        self.optimizer = optimizer
        self.sinks = sinks
        self.strict = strict
        self.train_mode = train_mode
        self.param_group = param_group
        self.seed = seed
        self.reduce = reduce
        self.basis_device = basis_device
        self.batch_size = batch_size
        self.batch_sharpness_batches = batch_sharpness_batches
        # A raw DataLoader is read through a private copy, so drawing from it never
        # advances training's sampler, generator or workers.
        self.minibatches = (
            TrainingBatches(minibatches)
            if isinstance(minibatches, torch.utils.data.DataLoader)
            else minibatches
        )
        self._minibatch_iter: Any = None
        self.spectrum_every = spectrum_every
        self.on_threshold = on_threshold
        self.update_sharpness = update_sharpness
        self.critical_sharpness = critical_sharpness
        self.history: list[CurvatureResult] = []
        self._state = MeasurementState(resolved_method=None if method == "auto" else method)
        self._crossings = Crossings()
        self._warned: set[str] = set()
        self._attached_steps = 0
        self.precision = precision
        self.blocks = blocks
        # the shorthands spelled out now: parameters frozen later must not move the blocks
        self._block_patterns = block_patterns(model, blocks)
        self.blocks_every = blocks_every
        self._cost = OverheadAccount()
        self._cost.start()
        self._training_peak: float | None = None
        self._peak_after_measuring: float | None = None
        self._gauge = ActivationGauge()  # one product's activations, from our own measurements
        self.last_plan: MemoryPlan | None = None  # where the last measurement put its basis, and why
        self._attached: tuple[Any, Any] | None = None
        self._observe_training_peak(device)

    # -- scheduling ------------------------------------------------------------
    def due(self, step: int) -> bool:
        """True when ``step`` (optimizer steps taken) is a positive multiple of ``every``."""
        return step > 0 and step % self.every == 0

    def maybe_measure(self, step: int) -> CurvatureResult | None:
        """A scheduled :meth:`measure`, within the time share, if :meth:`due`; else ``None``."""
        return self.measure(step, scheduled=True) if self.due(step) else None

    def attach(self, optimizer: Any) -> torch.utils.hooks.RemovableHandle:
        """Measure right after every ``every``-th ``optimizer.step()``.

        Also makes ``optimizer`` the source of thresholds if none was given.
        Returns the hook handle (``handle.remove()`` detaches).

        Raises:
            CurvatureError: ``optimizer`` holds none of the model's parameters
                (its steps are not this model's), or the monitor is attached
                to another optimizer.
        """
        inner = unwrap_optimizer(optimizer)
        _check_holds_parameters(inner, self.model)
        if self._attached is not None:
            attached_to, handle = self._attached
            if attached_to is inner and handle.id in inner._optimizer_step_post_hooks:
                return handle  # attaching twice would count every step twice
            if handle.id in attached_to._optimizer_step_post_hooks:
                raise CurvatureError(
                    "this monitor is already attached to another optimizer: call "
                    "handle.remove() on the handle attach() returned first"
                )
        if self.optimizer is None:
            self.optimizer = inner
            _check_param_group(inner, self.param_group)

        def hook(opt, args, kwargs) -> None:
            self._attached_steps += 1
            self.maybe_measure(self._attached_steps)

        handle = inner.register_step_post_hook(hook)
        self._attached = (inner, handle)
        return handle

    # -- measuring --------------------------------------------------------------
    def measure(self, step: int | None = None, *, scheduled: bool = False) -> CurvatureResult | None:
        """Measure now, within the budget; return the result.

        Returns ``None`` when the measurement failed (not strict), was deferred
        because the share of training time is spent (:attr:`Budget.overhead`,
        scheduled measurements only), or would not fit in memory (one warning
        with the numbers and the fix).

        Args:
            step: the optimizer step to log at; default: number of measurements.
            scheduled: part of the schedule (:meth:`maybe_measure`, :meth:`attach`
                and the framework callbacks): held to the share of training
                time. Default False: a measurement asked for directly runs within
                the hard caps only, and its time still counts in the share.

        Raises:
            CurvatureError: ``step`` is not a non-negative integer.
        """
        step = self.measurements if step is None else _checked_step(step)
        self._cost.training_until_now()
        seconds = self._seconds_allowed(step) if scheduled else self.budget.max_seconds
        if seconds is not None and seconds <= 0:
            return None
        started = time.perf_counter()
        try:
            plan, forced_method, pieces = self._plan_memory()
            self.last_plan = plan
            if not plan.fits:
                raise _DoesNotFit(plan.message)
            allowance = Allowance(
                products=affordable_products(self.budget, self.top_k, seconds, self._cost.seconds_per_product),
                seconds=seconds, plan=plan, method=forced_method, pieces=pieces,
            )
            mismatch = normalization_mismatch(self.model, self.train_mode)  # before the guard sets modes
            if mismatch is not None and self.optimizer is not None:  # a ratio to compare: say why not
                self._warn_once("normalization-mode", mismatch)
            device = next(self.model.parameters()).device
            method = forced_method or self._ggn_kind or self._state.resolved_method or "double_backward"
            self._gauge.start(device)
            with measurement_guard(self.model, self.train_mode):
                result, self._state, notes = measure_once(
                    self._config(), self._state, self.model, self._probe(), step, self.optimizer, allowance
                )
            self._gauge.finish(device, method, plan.device_bytes - self._gauge.activations(method) / pieces, pieces)
            for key, message in notes:
                self._warn_once(key, message)
        except Exception as error:  # noqa: BLE001 - the failure policy
            self._cost.measured(time.perf_counter() - started, 0)
            if self.strict and isinstance(error, _DoesNotFit):
                raise CurvatureError(str(error)) from error
            if self.strict:
                raise
            key = "memory" if isinstance(error, _DoesNotFit) else f"{type(error).__name__}: {error}"
            self._warn_once(
                key,
                f"curvwatch: measurement at step {step} skipped ({_skip_reason(error)}); "
                "training continues (strict=True raises instead)",
            )
            return None
        finally:
            self._note_peak()
        elapsed = time.perf_counter() - started
        share = (self._cost.measuring_seconds + elapsed) / max(self._cost.training_seconds, 1e-300)
        result = replace(result, overhead=share, seconds=elapsed)
        self.history.append(result)
        self._crossings_of(result)
        self._log(result)
        # every second is charged, the sinks' too; the product's cost is learned without
        # them and without the line search
        total = time.perf_counter() - started
        self._cost.measured(total, result.hvps, result.critical_sharpness_seconds + total - elapsed)
        return result

    def _log(self, result: CurvatureResult) -> None:
        """Hand ``result`` to every sink; a failing sink is dropped with one warning."""
        for sink in self.sinks:
            try:
                sink(result)
            except Exception as error:  # noqa: BLE001 - a broken sink must not stop training
                if self.strict:
                    raise
                self._warn_once(
                    f"sink {id(sink)}",
                    f"curvwatch: sink {sink!r} failed ({type(error).__name__}: {error}); its "
                    "results are dropped, training continues",
                )

    def _seconds_allowed(self, step: int) -> float | None:
        """Seconds this measurement may take (``None``: no limit; <= 0: defer it).

        The smaller of :attr:`Budget.max_seconds` and what is saved up: the
        share of training time plus the run's fixed allowance
        (:attr:`Budget.negligible_seconds`), less what measuring took so far. A
        measurement is deferred when that does not cover the products it needs
        to certify (:func:`~curvwatch.solvers.lanczos.gap_steps` plus one with a
        warm start, 10 without). The first measurement, before a product's cost
        is known, gets what is saved up and stops after its first product if
        that is already spent.
        """
        cap = self.budget.max_seconds
        if self.budget.overhead is None:
            return cap
        allowance = self._cost.allowance(self.budget.overhead, self.budget.negligible_seconds)
        per_product = self._cost.seconds_per_product
        if math.isnan(per_product):
            # The first measurement learns what a product costs, within what is saved
            # up (at least one product): it may end unconverged, as a lower bound and
            # a warm start for the next. The fixed allowance (negligible_seconds) is
            # part of what is saved up: a model whose products cost milliseconds is
            # measured in full from the first due step.
            seconds = max(allowance, 1e-9)
            return seconds if cap is None else min(cap, seconds)
        warm = self._state.warm is not None or self._state.warm_preconditioned is not None
        # the threshold's quantity: one preconditioned eigenvalue for Adam-type optimizers
        k = 1 if self._state.warm_preconditioned is not None else self.top_k
        needed = (gap_steps(k) + 1 if warm else max(10, gap_steps(k))) * per_product
        if allowance < needed:
            logger.info(
                "curvwatch: step %d: measurement deferred: %.3g s of the %.0f%% share saved up, "
                "about %.3g s needed", step, max(allowance, 0.0), 100 * self.budget.overhead, needed,
            )
            self._warn_once(
                "deferred",
                f"curvwatch: step {step}: measurement deferred to keep monitoring within "
                f"Budget(overhead={self.budget.overhead}) of training time (needs about "
                f"{needed:.3g} s, {max(allowance, 0.0):.3g} s saved up); later due steps measure "
                "as the share allows. Raise Budget.overhead, or pass Budget(overhead=None) to "
                "measure at every due step",
            )
            return 0.0
        return allowance if cap is None else min(cap, allowance)

    def _plan_memory(self) -> tuple[MemoryPlan, str | None, int]:
        """Where the basis goes, checked against the memory allowed (see :mod:`curvwatch.memory`).

        Returns the plan, the method of this measurement where the plan forces
        one (``"forward_difference"`` where double backward would not fit but
        one-sided differences would, else ``None``) and the pieces the probe
        batch is split into so that one gradient's activations fit
        (differences only, :mod:`curvwatch.chunked`; 1: not split).
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        device = params[0].device
        self._observe_training_peak(device)
        if self._gauge.needs_forward(device) and not is_sharded(self.model):
            with measurement_guard(self.model, self.train_mode), torch.enable_grad():
                self._gauge.gauge_forward(device, lambda: self.loss_fn(self.model, self.batch))
        method = self._ggn_kind or self._state.resolved_method or "double_backward"
        if self.budget.max_memory is not None:  # the user's number replaces the ratio
            allowed = float(self.budget.max_memory)
            if device.type == "cuda":
                allowed = min(allowed, device_allowance(device, self.budget.memory_ratio, None))
        else:
            allowed = device_allowance(device, self.budget.memory_ratio, self._training_peak)
        size = sum(local(p).numel() for p in params)  # the local shard under FSDP2
        max_basis = self.budget.max_basis or default_max_basis(self.top_k)
        examples = _known_length(self.batch)

        def plan_for(m: str) -> tuple[MemoryPlan, int]:
            splittable = m in ("finite_difference", "forward_difference") and not is_sharded(self.model)
            return plan_with_pieces(
                size, params[0].dtype, device, self.top_k, max_basis, m, allowed,
                self._gauge.activations(m), self.basis_device,
                int(examples) if splittable and math.isfinite(examples) else 1,
            )

        plan, pieces = plan_for(method)
        if not plan.fits and self.method == "auto" and self._ggn_kind is None and method == "double_backward":
            cheaper, pieces = plan_for("forward_difference")
            if cheaper.fits:
                self._warn_once(
                    "memory-fd",
                    f"curvwatch: double backward would not fit ({plan.message}); measuring with "
                    "one-sided differences certified by a central one (method='forward_difference')"
                    + (f", the probe batch in {pieces} pieces" if pieces > 1 else ""),
                )
                return cheaper, "forward_difference", pieces
        return plan, None, pieces

    def _observe_training_peak(self, device: torch.device) -> None:
        """The training step's peak CUDA memory: the largest allocator peak seen that is not ours.

        Read at construction and before each measurement; a peak that our own
        measurement set is skipped, and a reset of the allocator's statistics
        never lowers what was seen.
        """
        if device.type != "cuda":
            return
        peak = float(torch.cuda.max_memory_allocated(device))
        if self._peak_after_measuring is None or peak > self._peak_after_measuring:
            self._training_peak = max(self._training_peak or 0.0, peak)

    def _note_peak(self) -> None:
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            self._peak_after_measuring = float(torch.cuda.max_memory_allocated(device))

    @property
    def measurements(self) -> int:
        """Measurements made so far (the schedule's default step)."""
        return self._state.measurements

    def _config(self) -> MeasurementConfig:
        return MeasurementConfig(
            top_k=self.top_k, trace=self.trace, budget=self.budget, method=self.method,
            precision=self.precision, param_group=self.param_group, seed=self.seed, reduce=self.reduce,
            batch_size=self.batch_size, batch_sharpness_batches=self.batch_sharpness_batches,
            spectrum_every=self.spectrum_every, ggn_kind=self._ggn_kind, criterion=self.criterion,
            curvature=self.curvature, mc_samples=self.mc_samples,
            update_sharpness=self.update_sharpness, critical_sharpness=self.critical_sharpness,
            blocks=self._block_patterns, blocks_every=self.blocks_every,
        )

    def _probe(self) -> Probe:
        return Probe(self.batch, self.loss_fn, None if self.minibatches is None else self._next_minibatch)

    def _next_minibatch(self) -> Any:
        """The next training mini-batch (cycling through ``minibatches``), on the model's device."""
        if self._minibatch_iter is None:
            self._minibatch_iter = iter(self.minibatches)
        try:
            batch = next(self._minibatch_iter)
        except StopIteration:
            self._minibatch_iter = iter(self.minibatches)
            batch = next(self._minibatch_iter)
        return move_to(batch, next(self.model.parameters()).device)

    def _crossings_of(self, result: CurvatureResult) -> None:
        """Log, warn and call ``on_threshold`` for each ratio ``result`` takes across 1 (:mod:`curvwatch.crossings`)."""
        for crossing in self._crossings.observe(result):
            logger.log(crossing.level, crossing.log)
            if crossing.warning is not None:
                self._warn_once(crossing.warning_key, crossing.warning)
            self._notify(crossing.event)

    def _notify(self, event: ThresholdEvent) -> None:
        """``on_threshold(event)``, under the sinks' failure policy."""
        if self.on_threshold is None:
            return
        try:
            self.on_threshold(event)
        except Exception as error:  # noqa: BLE001 - the same policy as sinks
            if self.strict:
                raise
            self._warn_once(
                "on_threshold",
                f"curvwatch: on_threshold failed ({type(error).__name__}: {error}); "
                "training continues (strict=True raises instead)",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, CurvatureWarning, stacklevel=3)

    # -- checkpointing ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole state (CPU tensors), for checkpoints.

        The measurement's state (:class:`~curvwatch.measurement.MeasurementState`:
        count, warm starts, resolved method), the schedule of :meth:`attach`, the
        threshold-crossing state and the time account.
        """
        state = self._state
        return {
            "measurements": state.measurements,
            "attached_steps": self._attached_steps,
            "warm": None if state.warm is None else state.warm.cpu(),
            "warm_preconditioned": None if state.warm_preconditioned is None else state.warm_preconditioned.cpu(),
            "method": state.resolved_method,
            "ggn_checked": state.ggn_checked,
            "checked": state.checked,
            "differences_disagree": state.differences_disagree,
            "block_warm": {
                name: tuple(None if w is None else w.cpu() for w in pair)
                for name, pair in (state.block_warm or {}).items()
            },
            **self._crossings.state_dict(),
            "cost": self._cost.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Warm starts stay where they were saved (on the host, in bfloat16, when
        they came from a GPU): a measurement moves them to the device when it
        starts from them, and drops one that does not fit the model.

        Raises:
            CurvatureError: ``state`` is not a :meth:`state_dict` of a monitor.
        """
        missing = [key for key in ("measurements", "warm") if key not in state] if isinstance(state, dict) else []
        if not isinstance(state, dict) or missing:
            raise CurvatureError(
                f"not a CurvatureMonitor.state_dict(): missing {missing or 'everything'}; pass what "
                "state_dict() returned (saved with the training checkpoint)"
            )
        warm, warm_pre = state["warm"], state.get("warm_preconditioned")
        resolved = self._state.resolved_method
        if self.method == "auto" and self._ggn_kind is None:
            resolved = state.get("method")
        self._state = MeasurementState(
            measurements=int(state["measurements"]),
            warm=warm,
            warm_preconditioned=warm_pre,
            resolved_method=resolved,
            ggn_checked=bool(state.get("ggn_checked", False)),
            checked=bool(state.get("checked", False)),
            differences_disagree=bool(state.get("differences_disagree", False)),
            block_warm={name: tuple(pair) for name, pair in state.get("block_warm", {}).items()} or None,
        )
        self._attached_steps = int(state.get("attached_steps", 0))
        self._crossings.load_state_dict(state)
        if "cost" in state:
            self._cost.load_state_dict(state["cost"])


def _is_int(value: Any, least: int | None = None) -> bool:
    """An ``int`` (at least ``least``), not a ``bool``: ``True`` is an int to Python and would mean 1."""
    return isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)


def _checked_step(step: Any) -> int:
    """``step`` as an ``int``: a non-negative integer (numpy's too), never a bool, float or string.

    ``int(2.7)`` logged at step 2 and ``int("3")`` was accepted; the step is
    the optimizer step a result is logged at, so a wrong one misplaces curves.
    """
    if isinstance(step, numbers.Integral) and not isinstance(step, bool) and step >= 0:
        return int(step)
    raise CurvatureError(
        f"step must be a non-negative integer (the optimizer step to log at), got {step!r} "
        f"({type(step).__name__}); pass e.g. measure(step=global_step), or measure() to count measurements"
    )


def _check_flags(**flags: Any) -> None:
    """Refuse a flag that is not ``True``/``False`` (a truthy string would silently turn it on)."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise CurvatureError(f"{name} must be True or False, got {flag!r}")


def _check_param_group(optimizer: Any, param_group: int) -> None:
    """Refuse a ``param_group`` the optimizer does not have (at construction, not at every measurement)."""
    groups = len(getattr(optimizer, "param_groups", []))
    if not _is_int(param_group, least=0) or param_group >= max(groups, 1):
        raise CurvatureError(
            f"param_group={param_group!r} but the optimizer has {groups} parameter group(s): "
            f"pass an index in 0..{groups - 1}"
        )


def _check_holds_parameters(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> None:
    """Refuse an optimizer that holds none of ``model``'s parameters (the lr of another model's).

    Thresholds, the preconditioner and the update are read from the
    optimizer's entries for the model's parameters: from an optimizer of
    another model, SGD's ratio came silently from the wrong lr.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if any(id(p) in held for p in model.parameters()):
        return
    raise CurvatureError(
        f"the optimizer ({type(optimizer).__name__}, {len(held)} parameter tensor(s)) holds none of the "
        "model's parameters, so its lr and state say nothing about this model: pass the optimizer that "
        "trains this model (built from model.parameters()), or optimizer=None for no threshold"
    )


class _DoesNotFit(Exception):
    """A measurement that would not fit in the memory allowed (the message says why)."""


def _skip_reason(error: Exception) -> str:
    """Why a measurement was skipped, for its warning: the error's type and message.

    The private :class:`_DoesNotFit` is named by what it means, not by its class.
    """
    if isinstance(error, _DoesNotFit):
        return f"it does not fit in the memory allowed: {error}"
    return f"{type(error).__name__}: {error}"


def _known_length(batch: Any) -> float:
    """Examples in ``batch``; infinity where its batch dimension cannot be told."""
    try:
        return batch_length(batch)
    except CurvatureError:
        return math.inf
