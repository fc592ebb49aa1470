r"""Every setting of a :class:`~curvwatch.CurvatureMonitor`, in one frozen record that checks itself.

``CurvatureMonitor(model, batch, every=10, top_k=1)`` builds
``MonitorOptions(every=10, top_k=1)``; so do the framework adapters with the
options they pass on. A setting is one field below, declared with its default
and its check (:func:`setting`), in one of six groups: what is measured when
(schedule), what is measured (quantities), per-block curvature (blocks), how
products are applied (products), what measuring may spend (budget) and what a
failure does (policy). The record refuses a bad value by name at construction,
with the fix; the monitor and the measurement read it and never check again.

Adding a setting is adding one field here; the step of the measurement that
uses it reads ``options.<name>``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from curvwatch._errors import CurvatureError
from curvwatch.blocks import check_spec
from curvwatch.names import CHOSEN_METHODS, Curvature, Method
from curvwatch.precision import PRECISIONS
from curvwatch.results import Budget

Check = Callable[[str, Any], Any]  # check(name, value) -> the value to keep; raises CurvatureError


def setting(default: Any = None, check: Check | None = None, *, factory: Callable[[], Any] | None = None) -> Any:
    """A field of :class:`MonitorOptions`: its default and the check its value must pass."""
    default_kind = {"default_factory": factory} if factory is not None else {"default": default}
    return field(**default_kind, metadata={"check": check})


# -- the checks --------------------------------------------------------------------------------
def is_int(value: Any, least: int | None = None) -> bool:
    """An ``int`` (at least ``least``), not a ``bool``: ``True`` is an int to Python and would mean 1."""
    return isinstance(value, int) and not isinstance(value, bool) and (least is None or value >= least)


def positive(why: str = "") -> Check:
    """A positive integer; ``why`` (in parentheses) says what it counts."""

    def check(name: str, value: Any) -> Any:
        if not is_int(value, least=1):
            raise CurvatureError(f"{name} must be a positive integer{why}, got {value!r}")
        return value

    return check


def optional(check: Check) -> Check:
    """``None``, or what ``check`` accepts."""
    return lambda name, value: value if value is None else check(name, value)


def flag(name: str, value: Any) -> bool:
    """``True`` or ``False``: a truthy string (``trace="no"``) would silently turn it on."""
    if not isinstance(value, bool):
        raise CurvatureError(f"{name} must be True or False, got {value!r}")
    return value


def one_of(choices: tuple[str, ...], also: str | None = None) -> Check:
    """One of ``choices``, or ``also`` (a choice the message names apart: ``"auto"``)."""
    offered = "" if also is None else f"{also!r} or "

    def check(name: str, value: Any) -> Any:
        if value != also and value not in choices:
            raise CurvatureError(f"unknown {name} {value!r}; choose {offered}one of {choices}")
        return value

    return check


def python_int(name: str, value: Any) -> int:
    """A Python ``int``: a float or a numpy integer reached ``torch.manual_seed`` at every measurement."""
    if not is_int(value):
        raise CurvatureError(f"{name} must be a Python int, got {value!r} ({type(value).__name__})")
    return value


def never_or_positive(name: str, value: Any) -> int:
    """0 (never) or a positive integer."""
    if not is_int(value, least=0):
        raise CurvatureError(
            f"{name} must be 0 (never) or a positive integer (every M-th measurement), got {value!r}"
        )
    return value


def budget_or_default(name: str, value: Any) -> Budget:
    """A :class:`~curvwatch.Budget`; ``None`` is the default one."""
    value = Budget() if value is None else value
    if not isinstance(value, Budget):
        raise CurvatureError(f"{name} must be a curvwatch.Budget(max_hvps=..., max_seconds=...)")
    return value


def mode_or_auto(name: str, value: Any) -> bool | None:
    """``None`` (auto), ``True`` or ``False``."""
    if value is not None and not isinstance(value, bool):
        raise CurvatureError(f"{name} must be None (auto), True or False, got {value!r}")
    return value


def device_or_none(name: str, value: Any) -> Any:
    """``None`` or a device this process has."""
    if value is None:
        return None
    try:
        where = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise CurvatureError(f"{name}={value!r} is not a device: {error}") from error
    if where.type == "cuda" and not torch.cuda.is_available():
        raise CurvatureError(f"{name}={value!r} but CUDA is not available: pass {name}='cpu' or None")
    return value


def blocks_spec(name: str, value: Any) -> Any:
    """A ``blocks=`` spec of the right form (:func:`curvwatch.blocks.check_spec`; the model is checked later)."""
    check_spec(value)
    return value


@dataclass(frozen=True)
class MonitorOptions:
    r"""The settings of a curvature monitor.

    Schedule:
        every: measure after every ``every``-th optimizer step. Default 100.
        spectrum_every: every ``M``-th measurement also estimates the spectral
            density by SLQ (``curvature/spectrum``); 0: never.

    Quantities:
        top_k: eigenvalues per measurement (``curvature/lambda_1..k``). Default 2.
        trace: also estimate the Hessian trace. Default True.
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
        update_sharpness: also measure the curvature along the optimizer's last
            update ``u`` (:func:`~curvwatch.optim.update_direction`):
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
            stability and cannot be searched along) (Kalra et al. 2026; a
            forward-only line search after the products, within the
            measurement's seconds, at most 11 forward passes:
            ``curvature/critical_sharpness``, its evaluations in
            ``curvature_diagnostics/critical_sharpness_evals``), and its ratio
            to ``2 / lr`` (``curvature/critical_sharpness_ratio``; above 1 the
            step of ``lr`` raises the loss, whatever the optimizer). It needs
            no second derivative (it runs where finite differences measure the
            rest), moves the parameters in place and restores them bit-exactly;
            logged only when the search brackets ``eta_c``. Not under FSDP.
            Default True.
        batch_size: also measure the batch sharpness on mini-batches of this size
            drawn from the probe batch (mini-batch SGD's stability quantity), or
            from the monitor's ``minibatches``.
        batch_sharpness_batches: at most this many mini-batches per measurement.

    Blocks:
        blocks: per-block curvature (default ``None``: off): ``"layers"`` (one
            block per layer of the model's stack of repeated layers, e.g.
            GPT-2's ``h.0 .. h.N``), ``"modules"`` (one per top-level child
            module), or a dict ``{name: fnmatch pattern or [patterns]}`` over
            ``model.named_parameters()`` names, e.g. ``{"attn": "*.attn.*",
            "mlp": "*.mlp.*"}`` (trainable parameters only; a parameter may be
            in several blocks; a pattern matching none is an error when the
            monitor is built, which spells a shorthand out into its patterns;
            see :mod:`curvwatch.blocks`). Each block gets the top eigenvalue
            of the Hessian restricted to its parameters (``H_bb``), for
            Adam-type optimizers also its preconditioned sharpness, and the
            ratio of its sharpness to the global threshold (``result.blocks``;
            tags ``curvature/block/<name>/lambda_max``,
            ``.../preconditioned_lambda_max``, ``.../sharpness_ratio``).
            Measured after the global quantities with the products left in the
            budget (a block they do not reach is NaN), warm-started per block.
            The global values stay: a block's value is no share of them
            (``lambda_max(H) >= lambda_max(H_bb)``, and the coupling between
            blocks can make the whole far sharper). Cost: each block takes
            about as many products as the global lambda_max, and each product
            is a full backward through the model whatever the block's size.
        blocks_every: measure the blocks at every ``blocks_every``-th
            measurement only (others log the global values alone). Default 1.

    Products:
        method: ``"auto"`` (double backward; finite differences for FSDP or a
            model without a second derivative), or one of
            ``double_backward | forward_over_reverse | finite_difference |
            forward_difference`` (:class:`~curvwatch.names.Method`).
        precision: float32 matmul precision of exact products: ``"auto"`` (TF32
            on CUDA, 2x faster, within 1e-4 of float32), ``"tf32"`` or ``"fp32"``.
            Finite differences always run in float32.
        basis_device: where Lanczos keeps its basis (``"cpu"`` for big models).
        seed: seeds start vectors and probes (``seed + step``).
        reduce: mean over data-parallel ranks of a tensor (each rank holds its
            share of the probe batch), e.g. :func:`~curvwatch.all_reduce_mean`;
            ``None``: single process.

    Budget:
        budget: :class:`~curvwatch.Budget`: the share of training time measuring
            may take (default 5%, cumulative; a due measurement that does not fit
            is deferred), the memory it may add, and hard caps per measurement.
            The threshold's quantity is measured first (preconditioned sharpness
            for Adam-type optimizers, else lambda_max), then raw lambda_max, the
            trace and the spectrum as the budget allows.

    Policy:
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
        param_group: the parameter group whose lr sets the threshold (checked
            against the optimizer when the monitor gets one).

    Raises:
        CurvatureError: a setting of the wrong type or out of its range, named
            with what to pass; ``curvature`` other than ``"hessian"`` with
            ``batch_size``; a budget that leaves Lanczos fewer than ``top_k``
            products, or ``Budget.max_basis <= top_k``.
    """

    # schedule
    every: int = setting(100, positive(" (measure every N steps)"))
    spectrum_every: int = setting(0, never_or_positive)
    # quantities
    top_k: int = setting(2, positive())
    trace: bool = setting(True, flag)
    curvature: str = setting(Curvature.HESSIAN, one_of(Curvature.values()))
    mc_samples: int = setting(1, positive(" (labels per example)"))
    update_sharpness: bool = setting(True, flag)
    critical_sharpness: bool = setting(True, flag)
    batch_size: int | None = setting(None, optional(positive()))
    batch_sharpness_batches: int = setting(32, positive())
    # blocks
    blocks: Any = setting(None, blocks_spec)
    blocks_every: int = setting(1, positive(" (every k-th measurement)"))
    # products
    method: str = setting(Method.AUTO, one_of(CHOSEN_METHODS, also=Method.AUTO))
    precision: str = setting("auto", one_of(PRECISIONS))
    basis_device: str | torch.device | None = setting(None, device_or_none)
    seed: int = setting(0, python_int)
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = setting(None)
    # budget
    budget: Budget = setting(check=budget_or_default, factory=Budget)
    # policy
    strict: bool = setting(False, flag)
    train_mode: bool | None = setting(None, mode_or_auto)
    param_group: int = setting(0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            if check is not None:
                object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))
        self._check_together()

    def _check_together(self) -> None:
        """The settings that constrain each other."""
        if self.curvature != Curvature.HESSIAN and self.batch_size is not None:
            raise CurvatureError(
                "batch sharpness (batch_size=...) measures the Hessian and is not available "
                f"with curvature={self.curvature!r}: drop batch_size, or pass curvature='hessian'"
            )
        b = self.budget
        if b.max_hvps - (b.trace_hvps if self.trace else 0) < self.top_k:
            raise CurvatureError(
                f"budget.max_hvps={b.max_hvps} leaves fewer than top_k={self.top_k} products for Lanczos"
            )
        if b.max_basis is not None and b.max_basis <= self.top_k:
            raise CurvatureError(
                f"Budget.max_basis={b.max_basis} must exceed top_k={self.top_k} (Lanczos keeps at least "
                f"top_k + 1 basis vectors): pass Budget(max_basis={self.top_k + 2}) or more, None for the "
                "default, or a smaller top_k"
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every setting's name, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @property
    def output_space(self) -> bool:
        """True for the curvatures of the model outputs (GGN, Fisher), False for the Hessian."""
        return self.curvature != Curvature.HESSIAN


def checked_step(step: Any) -> int:
    """``step`` as an ``int``: a non-negative integer (numpy's too), never a bool, float or string.

    ``int(2.7)`` logged at step 2 and ``int("3")`` was accepted; the step is
    the optimizer step a result is logged at, so a wrong one misplaces curves.

    Raises:
        CurvatureError: anything else.
    """
    if isinstance(step, numbers.Integral) and not isinstance(step, bool) and step >= 0:
        return int(step)
    raise CurvatureError(
        f"step must be a non-negative integer (the optimizer step to log at), got {step!r} "
        f"({type(step).__name__}); pass e.g. measure(step=global_step), or measure() to count measurements"
    )
