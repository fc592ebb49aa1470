"""Which operator a measurement uses, built in one place for every caller.

``method="auto"`` is exact where possible (double backward, one first-order
graph per measurement) and central finite differences where it is not (FSDP;
models without a second derivative switch at their first measurement, on a
:class:`~curvwatch.NoSecondDerivativeError`).

``"forward_difference"`` is the cheap opt-in for large models: one-sided
differences against the cached probe gradient (about 1.3 training steps and
1.3x the step's memory per product on GPT-2 small, H100), with lambda_max
certified by one central-difference Rayleigh quotient
(:func:`curvwatch.solvers.certificate.certify_top`) and flagged when the two
disagree. It is not the default because differences see what double backward
does not: the kinks of ReLU-type activations (lambda_max 2.33 vs 0.64 on a ReLU
transformer) and strong third-order terms in sharp regions (+66% on GPT-2 small
at lambda_max 888).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from curvwatch._errors import CurvatureError
from curvwatch.names import (
    CHOSEN_METHODS,
    DIFFERENCES,
    FISHERS,
    GGN_CRITERION,
    GGN_LM_HEAD,
    OUTPUT_SPACE,
    Curvature,
    Method,
)
from curvwatch.operators._base import CurvatureOperator
from curvwatch.operators._closure import non_finite_batch_message, non_finite_loss_message
from curvwatch.operators.distributed import Reduce, ReducedOperator
from curvwatch.operators.hessian import HessianOperator
from curvwatch.operators.sharded import (
    ShardedHessianOperator,
    check_supported,
    is_sharded,
)
from curvwatch.probe import tensors_of

# The choices as tuples (declared in :mod:`curvwatch.names`): the monitor's methods besides
# ``"auto"``; ``"fisher"``, the Monte-Carlo (true) Fisher, and ``"empirical_fisher"``, the
# data-label one (:func:`build_fisher_operator`); every curvature; the output-space ones
# (a known loss of the model outputs, no loss_fn: :func:`ggn_kind`).
MONITOR_METHODS = CHOSEN_METHODS
FISHER_CURVATURES = FISHERS
CURVATURES = tuple(Curvature)
OUTPUT_CURVATURES = OUTPUT_SPACE


def _fix(curvature: str) -> str:
    return (
        f"curvature={curvature!r} supports criterion=torch.nn.CrossEntropyLoss() or torch.nn.MSELoss() "
        "(reduction='mean') with (inputs, targets) batches, and Hugging Face causal LMs with "
        "dict batches holding 'input_ids' and 'labels' (no loss_fn); pass curvature='hessian' "
        "for anything else"
    )


def auto_method(model: torch.nn.Module, sharded: bool | None = None) -> str:
    """``method="auto"``: central finite differences under FSDP, else double backward.

    ``sharded``: whether ``model`` is sharded, where the caller knows (else it is read here).
    """
    return Method.FINITE_DIFFERENCE if (is_sharded(model) if sharded is None else sharded) else Method.DOUBLE_BACKWARD


def build_operator(
    model: torch.nn.Module,
    closure: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    method: str,
    scheme: str | None = None,
    reduce: Reduce | None = None,
    pieces: Sequence[tuple[Callable[[], torch.Tensor], float]] | None = None,
    *,
    sharded: bool | None = None,
) -> CurvatureOperator:
    """The Hessian operator of ``closure`` for ``method`` (a :data:`MONITOR_METHODS` name).

    ``scheme`` overrides the finite-difference scheme (``"central"`` for the
    certificate). Under FSDP the sharded operator reduces itself; otherwise
    ``reduce`` (data parallelism) wraps the operator. ``pieces`` (differences
    only, not under FSDP): the probe batch split by :func:`curvwatch.measurement.chunked.split_probe`.
    ``sharded``: whether ``model`` is sharded, where the caller knows (else it is read here).

    Raises:
        CurvatureError: an exact method under FSDP, or an unsupported setup.
    """
    check_supported(model)
    forward = method == Method.FORWARD_DIFFERENCE
    scheme = scheme or ("forward" if forward else "central")
    if is_sharded(model) if sharded is None else sharded:
        if method not in DIFFERENCES:
            raise CurvatureError(
                f"method={method!r} cannot run under FSDP (autograd cannot differentiate "
                "through its sharded parameters): use method='auto', 'finite_difference' "
                "or 'forward_difference'"
            )
        return ShardedHessianOperator(closure, params, module=model, scheme=scheme)
    base = Method.FINITE_DIFFERENCE if forward else method
    operator = HessianOperator(closure, params, base, module=model, scheme=scheme, pieces=pieces)
    return operator if reduce is None else ReducedOperator(operator, reduce)


def ggn_kind(model: torch.nn.Module, batch: Any, loss_fn: Any, criterion: Any, curvature: str = Curvature.GGN) -> str:
    """Which output-space path fits this loss: :data:`GGN_CRITERION` or :data:`GGN_LM_HEAD`.

    The GGN needs the loss's Hessian with respect to the model outputs and the
    Fisher needs the loss as a likelihood of them, so the loss has to be one
    curvwatch knows: a mean ``CrossEntropyLoss`` (no class weights; label
    smoothing and soft targets have the same logit Hessian) or a mean
    ``MSELoss`` given as ``criterion``, or a Hugging Face causal LM's own loss
    (``model(**batch).loss`` with ``labels``). ``curvature`` (one of
    :data:`OUTPUT_CURVATURES`) names the request in the messages; the same
    kinds serve :func:`build_ggn_operator` and :func:`build_fisher_operator`.

    Raises:
        CurvatureError: FSDP, or a loss whose output Hessian is unknown (the
            message names the fix).
    """
    name = f"curvature={curvature!r}"
    fix = _fix(curvature)
    if is_sharded(model):
        raise CurvatureError(
            f"{name} is not supported under FSDP (sharded parameters); pass "
            "curvature='hessian' (method='auto' measures sharded models by finite differences)"
        )
    if loss_fn is not None:
        need = (
            "the Gauss-Newton matrix needs the loss's Hessian with respect to the model outputs"
            if curvature == Curvature.GGN
            else "the Fisher needs the loss as a likelihood of the model outputs"
        )
        raise CurvatureError(f"{name} cannot take loss_fn=...: {need}. {fix}")
    if criterion is not None:
        if isinstance(criterion, torch.nn.CrossEntropyLoss):
            if criterion.reduction != "mean" or criterion.weight is not None:
                raise CurvatureError(
                    f"{name} needs CrossEntropyLoss(reduction='mean') without class "
                    f"weights, got reduction={criterion.reduction!r}"
                    f"{'' if criterion.weight is None else ' with weight=...'}. {fix}"
                )
            return GGN_CRITERION
        if isinstance(criterion, torch.nn.MSELoss):
            if criterion.reduction != "mean":
                raise CurvatureError(
                    f"{name} needs MSELoss(reduction='mean'), got "
                    f"reduction={criterion.reduction!r}. {fix}"
                )
            return GGN_CRITERION
        raise CurvatureError(
            f"{name} does not know the output Hessian of criterion {type(criterion).__name__}. {fix}"
        )
    if not (isinstance(batch, Mapping) and "input_ids" in batch and "labels" in batch):
        raise CurvatureError(
            f"{name} without a criterion needs a Hugging Face causal LM and a dict "
            f"batch with 'input_ids' and 'labels'. {fix}"
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or not is_causal_lm(model):
        raise CurvatureError(
            f"{name} with a dict batch needs a Hugging Face causal LM with a linear "
            f"output head; {type(model).__name__} is not one "
            f"(get_output_embeddings() -> {type(head).__name__}). {fix}"
        )
    return GGN_LM_HEAD


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True for Hugging Face causal LMs (whose loss shifts the labels by one).

    Read from the model alone, without importing ``transformers`` (the core
    imports no framework): the class name of the standard heads, or a model
    that generates and is not an encoder-decoder.
    """
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    config = getattr(model, "config", None)
    return (
        callable(getattr(model, "generate", None))
        and config is not None
        and not getattr(config, "is_encoder_decoder", False)
        and getattr(config, "is_decoder", True) is not False
        and "CausalLM" in " ".join(getattr(config, "architectures", None) or [])
    )


def _refuse_sharded(model: torch.nn.Module, curvature: str) -> None:
    """The output-space operators do not run under FSDP (the model may have been sharded after construction).

    Raises:
        CurvatureError: FSDP, or another unsupported setup (:func:`check_supported`).
    """
    check_supported(model)
    if is_sharded(model):
        raise CurvatureError(
            f"curvature={curvature!r} is not supported under FSDP (sharded parameters); pass curvature='hessian'"
        )


def _finite(
    outputs_fn: Callable[[], torch.Tensor], model: torch.nn.Module, batch: Any, criterion: Any
) -> Callable[[], torch.Tensor]:
    """``outputs_fn`` refusing NaN/inf on the probe batch, in the Hessian path's words.

    The output-space operators never form the loss, so NaN/inf in the probe
    batch or the model would surface later as a linear-algebra error
    (``linalg.eigh`` failing to converge, ``multinomial`` refusing NaN
    probabilities). Checked once per operator, on its one forward: the
    outputs (logits, or an LM's hidden states) and the batch's floating-point
    tensors are finite. Else the probe loss (one forward more, on the way to
    the error) goes into the message of
    :func:`~curvwatch.operators._closure.checked_loss`; an inf input that a
    saturating layer hides from the loss still leaves NaN in the Jacobian
    (``0 * inf``), and is named as such.

    Raises:
        CurvatureError: NaN or inf in the outputs or the probe batch.
    """

    def checked() -> torch.Tensor:
        outputs = outputs_fn()
        bad = [t for t in tensors_of(batch) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if not bad and (not isinstance(outputs, torch.Tensor) or bool(torch.isfinite(outputs.detach()).all())):
            return outputs
        with torch.no_grad():
            loss = float(model(**batch).loss if criterion is None else criterion(model(batch[0]), batch[1]))
        if not math.isfinite(loss) or not bad:
            raise CurvatureError(non_finite_loss_message(loss))
        raise CurvatureError(non_finite_batch_message(loss))

    return checked


def _classes_last(model: torch.nn.Module, inputs: Any) -> Callable[[], torch.Tensor]:
    """``model(inputs)`` as cross-entropy logits ``(..., C)``: ``(N, C, d1, ...)`` outputs get the class dim last."""

    def logits() -> torch.Tensor:
        out = model(inputs)
        return out.movedim(1, -1) if isinstance(out, torch.Tensor) and out.ndim > 2 else out

    return logits


def build_ggn_operator(
    model: torch.nn.Module,
    batch: Any,
    criterion: Any,
    params: Sequence[torch.Tensor],
    kind: str,
    reduce: Reduce | None = None,
    check: bool = True,
) -> CurvatureOperator:
    """The Gauss-Newton operator of the probe loss for ``kind`` (from :func:`ggn_kind`).

    :data:`GGN_LM_HEAD`: :func:`~curvwatch.operators.lm_head.causal_lm_ggn_operator`
    (``check``: compare the head's logits with the model's once).
    :data:`GGN_CRITERION`: :class:`~curvwatch.GGNOperator` on ``model(inputs)``;
    for cross-entropy the class dimension (1 for ``(N, C, d1, ...)`` outputs)
    is moved last and ``ignore_index`` targets are masked; for the mean squared
    error the output Hessian ``2/numel I`` does not depend on the targets.
    ``reduce`` (data parallelism) wraps the operator.

    Raises:
        CurvatureError: FSDP (the model may have been sharded after construction).
    """
    from curvwatch.operators.ggn import GGNOperator
    from curvwatch.operators.lm_head import DEFAULT_CHUNK_SIZE, causal_lm_ggn_operator

    _refuse_sharded(model, Curvature.GGN)
    if kind == GGN_LM_HEAD:
        operator: CurvatureOperator = causal_lm_ggn_operator(
            model, batch, chunk_size=DEFAULT_CHUNK_SIZE, params=params, check=check
        )
        operator.hidden_fn = _finite(operator.hidden_fn, model, batch, criterion)
    elif isinstance(criterion, torch.nn.CrossEntropyLoss):
        targets = batch[1]
        hard = isinstance(targets, torch.Tensor) and not targets.is_floating_point()
        operator = GGNOperator(
            _finite(_classes_last(model, batch[0]), model, batch, criterion), params, loss="cross_entropy",
            targets=targets if hard else None, ignore_index=criterion.ignore_index,
        )
    else:  # MSELoss, mean: H_out = 2/numel I whatever the targets
        inputs = batch[0]
        operator = GGNOperator(_finite(lambda: model(inputs), model, batch, criterion), params, loss="mse")
    return operator if reduce is None else ReducedOperator(operator, reduce)


def build_fisher_operator(
    model: torch.nn.Module,
    batch: Any,
    criterion: Any,
    params: Sequence[torch.Tensor],
    kind: str,
    reduce: Reduce | None = None,
    *,
    empirical: bool,
    mc_samples: int = 1,
    seed: int = 0,
) -> CurvatureOperator:
    """The Fisher operator of the probe loss for ``kind`` (from :func:`ggn_kind`).

    ``empirical=False`` (``curvature="fisher"``): a
    :class:`~curvwatch.MonteCarloFisherOperator` with ``mc_samples`` labels per
    example drawn with ``seed``; ``empirical=True``
    (``curvature="empirical_fisher"``): an :class:`~curvwatch.EmpiricalFisherOperator`
    on the batch's targets.

    :data:`GGN_CRITERION`: the operator on ``model(inputs)``; for
    cross-entropy the class dimension (1 for ``(N, C, d1, ...)`` outputs) is
    moved last, each remaining position is an example and ``ignore_index``
    targets are masked; ``label_smoothing`` enters the empirical Fisher. For
    the mean squared error each ``outputs[i]`` is an example.
    :data:`GGN_LM_HEAD`: ``model(**batch without 'labels').logits`` (math
    attention backend, which has the double backward the products need) with
    the Hugging Face causal-LM shift (``logits[:, :-1]`` predict
    ``labels[:, 1:]``, ``-100`` ignored), each counted token an example; unlike
    the GGN's chunked head, the full ``(batch, seq, vocab)`` logits and their
    graph are held.
    ``reduce`` (data parallelism) wraps the operator.

    Raises:
        CurvatureError: FSDP, a ``kind`` or criterion the Fisher does not know
            (the message names the fix), or bad ``mc_samples``.
    """
    from curvwatch.operators.fisher import EmpiricalFisherOperator, MonteCarloFisherOperator

    curvature = Curvature.EMPIRICAL_FISHER if empirical else Curvature.FISHER
    _refuse_sharded(model, curvature)
    outputs_fn, targets, loss, ignore_index, label_smoothing = _fisher_outputs(model, batch, criterion, kind, curvature)
    outputs_fn = _finite(outputs_fn, model, batch, criterion)
    operator: CurvatureOperator
    if empirical:
        operator = EmpiricalFisherOperator(
            outputs_fn, params, loss=loss, targets=targets, ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
    else:
        hard = isinstance(targets, torch.Tensor) and not targets.is_floating_point()
        operator = MonteCarloFisherOperator(
            outputs_fn, params, loss=loss, targets=targets if hard else None, ignore_index=ignore_index,
            mc_samples=mc_samples, seed=seed,
        )
    return operator if reduce is None else ReducedOperator(operator, reduce)


def _fisher_outputs(
    model: torch.nn.Module, batch: Any, criterion: Any, kind: str, curvature: str
) -> tuple[Callable[[], torch.Tensor], Any, str, int, float]:
    """``(outputs_fn, targets, loss, ignore_index, label_smoothing)`` of a Fisher for ``kind``.

    Raises:
        CurvatureError: a ``kind`` or criterion the Fisher does not know.
    """
    if kind == GGN_LM_HEAD:
        ignore_index = -100
        # logits[:, t] predicts labels[:, t + 1]; the last position predicts nothing
        targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=ignore_index)[..., 1:]
        logits = _lm_logits(model, {k: v for k, v in batch.items() if k != "labels"}, curvature)
        return logits, targets, "cross_entropy", ignore_index, 0.0
    if kind == GGN_CRITERION and isinstance(criterion, torch.nn.CrossEntropyLoss):
        targets = batch[1]
        if isinstance(targets, torch.Tensor) and targets.is_floating_point() and targets.ndim > 2:
            targets = targets.movedim(1, -1)  # soft targets (N, C, d1, ...) follow the logits
        smoothing = criterion.label_smoothing
        return _classes_last(model, batch[0]), targets, "cross_entropy", criterion.ignore_index, smoothing
    if kind == GGN_CRITERION and isinstance(criterion, torch.nn.MSELoss):
        inputs = batch[0]
        return (lambda: model(inputs)), batch[1], "mse", -100, 0.0
    raise CurvatureError(
        f"build_fisher_operator got kind={kind!r} with criterion {type(criterion).__name__}: "
        f"the kind comes from ggn_kind(model, batch, loss_fn, criterion, curvature={curvature!r}). "
        f"{_fix(curvature)}"
    )


def _lm_logits(model: torch.nn.Module, inputs: Mapping[str, Any], curvature: str) -> Callable[[], torch.Tensor]:
    """``model(**inputs).logits`` on the math attention backend (the fused kernels have no double backward)."""

    def logits_fn() -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            logits = getattr(model(**inputs), "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
            raise CurvatureError(
                f"curvature={curvature!r} needs model(**batch).logits of shape (batch, seq, vocab), "
                f"got {type(logits).__name__}; pass curvature='hessian' for this model"
            )
        return logits

    return logits_fn
