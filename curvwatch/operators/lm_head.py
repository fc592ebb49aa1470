r"""Chunked, fused Gauss-Newton products through a language model's output head.

A causal LM computes hidden states ``h = f(theta)`` of shape ``(N, d)`` (``N``
tokens) and logits ``z = h W^T + b`` of shape ``(N, V)``. With the mean
cross-entropy's logit Hessian ``H`` (block diagonal, one ``V x V`` block
``w_i (diag(p_i) - p_i p_i^T)`` per token), the GGN product is

.. math::

    G v = J^\top H J v, \qquad
    J v = \underbrace{\dot h W^\top + h \dot W^\top + \dot b}_{\dot z},
    \qquad \dot h = J_h v_\theta,

    J^\top g = \bigl(J_h^\top (g W),\; g^\top h,\; \textstyle\sum_i g_i\bigr),
    \qquad g = H \dot z.

:func:`lm_head_ggn_product` forms ``z``, ``z-dot`` and ``g`` one chunk of
``chunk_size`` tokens at a time and folds each chunk into ``g W`` ``(N, d)``,
``g^T h`` ``(V, d)`` and ``sum g`` ``(V,)`` at once, so neither the ``(N, V)``
logits nor their tangents are ever held in full: peak memory
``O(chunk_size x V)`` on top of ``O(N d + V d)``. The logit-space product runs
on the dispatcher's backend (the Triton kernel on CUDA).

:class:`LMHeadGGNOperator` wraps it as a curvature operator, with ``h-dot`` and
``J_h^T`` from autograd on the hidden states only (``N x d``, not ``N x V``).
A tied head (``W`` also the input embedding) is handled: ``W``'s slot gets
both its embedding and its head contributions. :func:`causal_lm_ggn_operator`
builds one for a Hugging Face causal LM and its batch, with the labels shifted
as the model's own loss shifts them.

References:
    Schraudolph 2002, "Fast curvature matrix-vector products for second-order
    gradient descent" (the GGN product).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from curvwatch._errors import CurvatureError
from curvwatch._flat import flatten, unflatten
from curvwatch.kernels import logit_hvp_rows, mean_row_weights
from curvwatch.operators._base import CurvatureOperator
from curvwatch.operators._closure import check_params, zeros_for_none

DEFAULT_CHUNK_SIZE = 2048


class HeadCotangents(NamedTuple):
    """``J_head^T H J v`` split by the head's inputs.

    Attributes:
        hidden: ``(N, d)``: ``g W``, to be pulled back through the body.
        weight: ``(V, d)``: ``g^T h`` (float32 or wider), or ``None``.
        bias: ``(V,)``: ``sum_i g_i``, or ``None``.
    """

    hidden: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def lm_head_ggn_product(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    hidden_tangent: torch.Tensor | None = None,
    weight_tangent: torch.Tensor | None = None,
    bias_tangent: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    ignore_index: int = -100,
    count: int | torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    weight_grad: bool = True,
) -> HeadCotangents:
    r"""The head's part of ``J^T H_ce J v``, chunked over tokens.

    With ``z = h W^T + b`` and ``z-dot = h-dot W^T + h W-dot^T + b-dot``, returns
    ``g W``, ``g^T h`` and ``sum_i g_i`` for ``g = H_ce z-dot``, the mean
    softmax cross-entropy's logit Hessian (rows whose target is
    ``ignore_index`` are zero; the mean runs over ``count`` rows). Computed
    without autograd, ``chunk_size`` rows of ``(N, V)`` at a time.

    Args:
        hidden: ``(N, d)`` hidden states ``h``.
        weight: ``(V, d)`` head weight ``W``.
        bias: ``(V,)`` head bias ``b`` or ``None``.
        hidden_tangent: ``(N, d)`` ``h-dot`` or ``None`` (zero).
        weight_tangent: ``(V, d)`` ``W-dot`` or ``None`` (zero).
        bias_tangent: ``(V,)`` ``b-dot`` or ``None`` (zero).
        targets: ``(N,)`` class indices or ``None`` (every row counts).
        ignore_index: the masked target value.
        count: the mean's denominator. Default: the valid rows of ``targets``.
        chunk_size: rows per chunk. Default 2048 (about 400 MiB per ``(chunk,
            V)`` float32 buffer at ``V = 50304``).
        backend: the logit-space product's backend (see
            :func:`curvwatch.kernels.select_backend`).
        weight_grad: also accumulate ``g^T h`` (and ``sum g`` when ``bias`` is
            given). Default ``True``.

    Returns:
        :class:`HeadCotangents`; ``hidden`` in ``hidden``'s dtype, ``weight`` and
        ``bias`` accumulated in float32 (float64 for float64 inputs).

    Raises:
        CurvatureError: shapes disagree or ``chunk_size < 1``.
    """
    _check_shapes(hidden, weight, chunk_size)
    rows, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    row_w = mean_row_weights(targets, rows, ignore_index, hidden.device, count, dtype=acc)
    g_hidden = torch.empty_like(hidden)
    g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight_grad else None
    g_bias = None
    if weight_grad and bias is not None:
        g_bias = torch.zeros(vocab, dtype=acc, device=weight.device)
    with torch.no_grad():
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            h = hidden[start:stop]
            logits = F.linear(h, weight, bias)
            dz = torch.zeros_like(logits) if bias_tangent is None else bias_tangent.expand_as(logits).clone()
            if hidden_tangent is not None:
                dz.addmm_(hidden_tangent[start:stop], weight.T)
            if weight_tangent is not None:
                dz.addmm_(h, weight_tangent.T)
            g = logit_hvp_rows(logits, dz, row_w[start:stop], backend)
            del logits, dz
            torch.mm(g, weight, out=g_hidden[start:stop])
            if g_weight is not None:
                g_weight.add_(torch.mm(g.T, h))
            if g_bias is not None:
                g_bias.add_(g.sum(0, dtype=acc))
            del g
    return HeadCotangents(g_hidden, g_weight, g_bias)


def _check_shapes(hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int) -> None:
    """Refuse shapes that disagree and a chunk of no tokens (:func:`lm_head_ggn_product`)."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise CurvatureError(
            f"expected hidden (N, d) and weight (V, d), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if chunk_size < 1:
        raise CurvatureError(f"chunk_size must be a positive number of tokens, got {chunk_size}")


class LMHeadGGNOperator(CurvatureOperator):
    """GGN products of a model whose loss is the mean cross-entropy of a linear head.

    The model splits as ``hidden_fn() -> h`` (any body, autograd) and the head
    ``z = h W^T + b`` (chunked, fused: :func:`lm_head_ggn_product`). The result
    equals ``GGNOperator(lambda: F.linear(hidden_fn(), W, b), params,
    "cross_entropy", targets)``, without ever holding the ``(N, V)`` logits.

    Args:
        hidden_fn: ``hidden_fn() -> (..., d)`` hidden states built from
            ``params``; called once (the graph is kept until :meth:`release`).
        params: the parameters, all with ``requires_grad=True``; ``weight`` and
            ``bias`` are matched by identity (a head left out is frozen).
        weight: ``(V, d)`` head weight (may also be used inside ``hidden_fn``:
            a tied embedding).
        bias: ``(V,)`` head bias or ``None``.
        targets: ``(...)`` targets, one per hidden state; ``ignore_index`` rows
            are dropped before the head (they contribute nothing).
        ignore_index: the masked target value.
        chunk_size: tokens per chunk. Default 2048.
        backend: the logit-space product's backend. Default ``"auto"``.

    Raises:
        CurvatureError: bad parameters, or no token has a target.
    """

    def __init__(
        self,
        hidden_fn: Callable[[], torch.Tensor],
        params: Iterable[torch.Tensor],
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        backend: str = "auto",
    ) -> None:
        self.params = check_params(params)
        p0 = self.params[0]
        super().__init__(sum(p.numel() for p in self.params), p0.dtype, p0.device)
        self.hidden_fn = hidden_fn
        self.weight, self.bias = weight, bias
        self._weight_slot = _slot(self.params, weight)
        self._bias_slot = None if bias is None else _slot(self.params, bias)
        self.targets = targets
        self.ignore_index = ignore_index
        self.chunk_size = int(chunk_size)
        self.backend = backend
        self._hidden: torch.Tensor | None = None
        self._probe: tuple[torch.Tensor, list[torch.Tensor | None]] | None = None

    def _forward(self) -> torch.Tensor:
        if self._hidden is None:
            hidden = self.hidden_fn()
            if not isinstance(hidden, torch.Tensor) or not hidden.requires_grad:
                raise CurvatureError(
                    "hidden_fn must return the hidden states computed from the parameters"
                )
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if self.targets is not None:
                targets = self.targets.reshape(-1).to(hidden.device)
                if targets.numel() != hidden.shape[0]:
                    raise CurvatureError(
                        f"targets have {targets.numel()} entries, expected one per "
                        f"hidden state ({hidden.shape[0]})"
                    )
                keep = (targets != self.ignore_index).nonzero().squeeze(1)
                if keep.numel() == 0:
                    raise CurvatureError(
                        f"every target equals ignore_index ({self.ignore_index}): the "
                        "loss is empty; the probe batch needs labelled tokens"
                    )
                hidden = hidden.index_select(0, keep)
            self._hidden = hidden
        return self._hidden

    def _hidden_jvp(self, hidden: torch.Tensor, vs: list[torch.Tensor]) -> torch.Tensor | None:
        """``h-dot = J_h v`` by the double-vjp trick (first-order graph kept)."""
        if self._probe is None:
            probe = torch.zeros_like(hidden, requires_grad=True)
            vjp = torch.autograd.grad(hidden, self.params, probe, create_graph=True, allow_unused=True)
            self._probe = (probe, list(vjp))
        probe, vjp = self._probe
        live = [(g, t) for g, t in zip(vjp, vs) if g is not None and g.requires_grad]
        if not live:
            return None
        (dh,) = torch.autograd.grad(
            [g for g, _ in live], probe, [t for _, t in live], retain_graph=True
        )
        return dh

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        hidden = self._forward()
        vs = unflatten(v, self.params)
        wi, bi = self._weight_slot, self._bias_slot
        head = lm_head_ggn_product(
            hidden.detach(),
            self.weight.detach(),
            None if self.bias is None else self.bias.detach(),
            hidden_tangent=self._hidden_jvp(hidden, vs),
            weight_tangent=None if wi is None else vs[wi],
            bias_tangent=None if bi is None else vs[bi],
            chunk_size=self.chunk_size,
            backend=self.backend,
            weight_grad=wi is not None,
        )
        grads = torch.autograd.grad(hidden, self.params, head.hidden, retain_graph=True, allow_unused=True)
        grads = zeros_for_none(grads, self.params)
        if wi is not None:
            grads[wi] = grads[wi] + head.weight.to(self.dtype)
        if bi is not None and head.bias is not None:
            grads[bi] = grads[bi] + head.bias.to(self.dtype)
        return flatten(grads).detach()

    def release(self) -> None:
        """Free the cached forward graph."""
        self._hidden = None
        self._probe = None


def _slot(params: list[torch.Tensor], tensor: torch.Tensor) -> int | None:
    for i, p in enumerate(params):
        if p is tensor:
            return i
    return None


def causal_lm_ggn_operator(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    params: Iterable[torch.Tensor] | None = None,
    ignore_index: int = -100,
    check: bool = True,
) -> LMHeadGGNOperator:
    """GGN operator of a Hugging Face causal LM's loss, through the chunked head.

    Equals ``GGNOperator`` on ``model(**batch).logits[:, :-1]`` with targets
    ``labels[:, 1:]`` (the shift of the model's own loss; ``-100`` ignored;
    mean over labelled tokens) but runs the body once to its last hidden state
    (``model.base_model``) and the head (``model.get_output_embeddings()``, tied
    or not) chunk by chunk. The body runs under the math attention backend,
    which has the double backward the Gauss-Newton product needs. Call it with
    the model in the mode you want measured (``model.eval()`` turns dropout
    off).

    Args:
        model: a ``transformers`` causal LM (``...ForCausalLM``/``LMHeadModel``).
        batch: ``input_ids`` and optionally ``attention_mask`` and ``labels``
            (default: ``input_ids``, with padding masked out); other keys are
            passed to the body.
        chunk_size: tokens per chunk. Default 2048.
        backend: the logit-space product's backend. Default ``"auto"``.
        params: the parameters to differentiate. Default: every trainable one.
        ignore_index: the masked label. Default ``-100``.
        check: compare the model's own last-token logits with ``h W^T + b``
            once, to catch heads with extra logit transforms (soft-capping,
            scaling) that this path does not model. Default ``True``.

    Returns:
        :class:`LMHeadGGNOperator`.

    Raises:
        CurvatureError: no linear output head, or its logits differ from the
            model's.

    Example::

        op = causal_lm_ggn_operator(model.eval(), {"input_ids": ids}, chunk_size=1024)
        eig = curvwatch.lanczos(op, k=1)
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise CurvatureError(
            f"{type(model).__name__} has no linear output head "
            "(get_output_embeddings() returned "
            f"{type(head).__name__}); use GGNOperator on the logits instead"
        )
    inputs = dict(batch)
    labels = inputs.pop("labels", None)
    if labels is None:
        labels = inputs["input_ids"].clone()
        if inputs.get("attention_mask") is not None:
            labels = labels.masked_fill(inputs["attention_mask"] == 0, ignore_index)
    targets = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    body = model.base_model

    def hidden_fn() -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return body(**inputs)[0]

    if check:
        _check_head(model, inputs, body, head)
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    return LMHeadGGNOperator(
        hidden_fn, params, head.weight, head.bias, targets, ignore_index, chunk_size, backend
    )


def _check_head(model, inputs, body, head) -> None:
    with torch.no_grad():
        try:
            logits = model(**inputs, logits_to_keep=1).logits[..., -1, :]
        except TypeError:  # a model without logits_to_keep: not checked
            return
        mine = head(body(**inputs)[0][..., -1, :])
    scale = logits.abs().max().clamp_min(1e-30)
    if not torch.allclose(mine, logits, rtol=1e-3, atol=1e-4 * float(scale)):
        raise CurvatureError(
            f"{type(model).__name__}'s logits are not output_embeddings(base_model(...)) "
            f"(max difference {float((mine - logits).abs().max()):.3g}): the head "
            "transforms them further; use GGNOperator on model(**batch).logits"
        )
