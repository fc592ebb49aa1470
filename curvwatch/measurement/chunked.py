r"""A probe batch split into pieces, so that one gradient's activations are a piece's.

A finite-difference product needs gradients of the probe loss, and a
gradient's activations grow with the batch. Split into ``c`` pieces of the
batch with weights ``w_i``,

.. math::

    L(\theta) = \sum_i w_i L_i(\theta), \qquad
    \nabla L = \sum_i w_i \nabla L_i ,

holds exactly when the loss is a weighted mean over what the pieces split:
examples (``w_i = n_i / n``), or tokens that are not ignored (labels ``!= -100``,
shifted by one for causal language models: a Hugging Face model's own loss), or
a sum (``w_i = 1``). The weighting is read from the loss, then checked on the
batch itself, ``|sum_i w_i L_i - L| <= 1e-5 |L|`` in the
probe's own precision, and a batch no weighting fits is not split. The peak
activations of a gradient are then those of the largest piece (about ``1/c``
of the batch's) for ``c`` forward and backward passes of ``1/c`` of the batch:
the same arithmetic, a little more launch overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from curvwatch._errors import CurvatureError
from curvwatch.operators.factory import is_causal_lm
from curvwatch.probe import LossFn, batch_length, hf_loss, take

Closure = Callable[[], torch.Tensor]

# |sum_i w_i L_i - L| <= SPLIT_RTOL |L|: the weights reproduce the batch's loss.
SPLIT_RTOL = 1e-5

IGNORE_INDEX = -100  # PyTorch's and Hugging Face's label for "not counted"


def pieces_of(batch: Any, pieces: int) -> list[Any]:
    """``batch`` cut into ``pieces`` runs of consecutive examples (sizes differ by at most one)."""
    n = batch_length(batch)
    pieces = min(pieces, n)
    bounds = [i * n // pieces for i in range(pieces + 1)]
    return [take(batch, torch.arange(a, b)) for a, b in zip(bounds, bounds[1:]) if b > a]


def _weightings(model: torch.nn.Module, parts: Sequence[Any], loss_fn: LossFn) -> list[list[float]]:
    """Candidate weights of the pieces, the most specific first.

    A Hugging Face model's own loss (:func:`~curvwatch.probe.hf_loss`) is a mean
    over labels ``!= -100``, shifted by one for causal LMs: weights by those
    counts. Any other loss: by examples (a mean), or all ones (a sum).
    """
    labels = [p.get("labels") if isinstance(p, Mapping) else None for p in parts]
    if loss_fn is hf_loss and all(isinstance(t, torch.Tensor) for t in labels):
        shift = is_causal_lm(model) and all(t.ndim >= 2 for t in labels)
        counts = [float(((t[:, 1:] if shift else t) != IGNORE_INDEX).sum()) for t in labels]
    else:
        counts = [float(batch_length(p)) for p in parts]
    total = sum(counts)
    candidates = [[c / total for c in counts]] if total > 0 else []
    return [*candidates, [1.0] * len(parts)]


def split_probe(model: torch.nn.Module, batch: Any, loss_fn: LossFn, pieces: int) -> list[tuple[Closure, float]]:
    """Closures of ``pieces`` parts of the probe batch and the weights that sum them to its loss.

    Runs ``pieces + 1`` forwards without gradients to check the weights (see
    the module docstring); call it once per run and reuse the result.

    Raises:
        CurvatureError: no weighting reproduces the batch's loss (a loss that
            is not a mean over examples or counted tokens): the batch cannot be
            split; measure with a smaller probe batch or more memory.
    """
    parts = pieces_of(batch, pieces)
    with torch.no_grad():
        whole = float(loss_fn(model, batch))
        losses = [float(loss_fn(model, part)) for part in parts]
    for weights in _weightings(model, parts, loss_fn):
        if abs(sum(w * x for w, x in zip(weights, losses)) - whole) <= SPLIT_RTOL * max(abs(whole), 1e-30):
            return [(_closure(model, part, loss_fn), w) for part, w in zip(parts, weights)]
    raise CurvatureError(
        f"the probe batch cannot be split into {len(parts)} pieces: no weighting (by examples, by "
        f"counted labels, or a sum) of the pieces' losses {[round(x, 6) for x in losses]} gives the "
        f"batch's loss {whole:.6g}, so the loss is not a mean over them. Pass a smaller probe "
        "batch, or allow more memory (Budget(memory_ratio=...) / Budget(max_memory=...))"
    )


def _closure(model: torch.nn.Module, part: Any, loss_fn: LossFn) -> Closure:
    return lambda: loss_fn(model, part)
