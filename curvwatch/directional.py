r"""Curvature along the update the optimizer takes: directional and critical sharpness.

The top eigenvalue of the Hessian measures the sharpest direction, which the
optimizer's step may barely touch. Two cheaper quantities look along the step
``theta_t = theta_{t-1} - lr u`` itself, ``u`` read back from the optimizer
(:mod:`curvwatch.optim.updates`: the last update, or the one it would take now):

* the directional sharpness (:func:`directional_sharpness`), one
  Hessian-vector product:

  .. math::

      \lambda_u = \frac{u^\top H u}{u^\top u} ,
      \qquad
      \lambda_u^P = \frac{u^\top H u}{u^\top P u}
      \quad\text{(Adam's preconditioner } P\text{)} ;

* the critical sharpness (:func:`critical_sharpness`; Kalra et al. 2026,
  arXiv:2601.16979), forward passes only: ``lambda_c = 2 / eta_c`` with
  ``eta_c`` the smallest step ``eta > 0`` along ``-u`` that raises the loss.
  On a quadratic ``L = 1/2 theta^T A theta - b^T theta`` with gradient ``g``,

  .. math::

      L(\theta - \eta u) - L(\theta) = -\eta\, g^\top u + \tfrac{\eta^2}{2}\, u^\top A u ,
      \qquad
      \eta_c = \frac{2\, g^\top u}{u^\top A u} ,
      \qquad
      \lambda_c = \frac{u^\top A u}{g^\top u} ,

  which is ``lambda_u`` for ``u = g`` (gradient descent) and ``lambda_u^P`` for
  ``u = P^-1 g`` (``g^T u = u^T P u``). Beyond quadratics it also sees the
  higher-order terms the step meets.

Thresholds: ``lambda_u`` and ``lambda_u^P`` are Rayleigh quotients, at most the
sharpness and the preconditioned sharpness, and are read against the same
thresholds (:func:`curvwatch.optim.threshold`). ``lambda_c`` is measured in
units of the step actually taken: the step of ``lr`` raised the loss iff
``lr > eta_c``, i.e. iff ``lambda_c > 2 / lr``, whatever the optimizer
(momentum and the preconditioner are already inside ``u``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from curvwatch._errors import CurvatureError
from curvwatch._flat import local, unflatten
from curvwatch.operators._base import CurvatureOperator


# -- directional sharpness --------------------------------------------------------------------------
def directional_sharpness(
    operator: CurvatureOperator, u: torch.Tensor, diagonal: torch.Tensor | None = None
) -> float:
    r"""The curvature along ``u``: one product with ``operator``.

    .. math::

        \lambda_u = \frac{u^\top H u}{u^\top u} ,
        \qquad
        \lambda_u^P = \frac{u^\top H u}{u^\top P u}
        = \frac{w^\top P^{-1/2} H P^{-1/2}\, w}{w^\top w}\Big|_{w = P^{1/2} u} .

    Without ``diagonal`` it is the Rayleigh quotient of ``H`` at ``u``, at most
    ``lambda_max(H)``, read against the optimizer's threshold. With
    ``diagonal`` = Adam's preconditioner ``P`` (the flat diagonal of
    :func:`~curvwatch.optim.preconditioner_diagonal`) it is the Rayleigh
    quotient of ``P^-1/2 H P^-1/2`` at ``P^1/2 u``, the update ``u`` in the
    coordinates ``P^1/2 theta`` in which Adam is heavy ball; so it is at most the
    preconditioned sharpness ``lambda_max(P^-1 H)`` and has the same threshold
    (``38 / lr`` for Adam at ``beta1 = 0.9``). Parameters the optimizer does not
    update (``P`` = the dtype's max) have ``u = 0`` and drop out.

    Inner products go through ``operator.dot``, so a sharded operator's local
    ``u`` (and ``diagonal``) give the global quotient.

    Args:
        operator: the curvature operator ``H``.
        u: the flat direction (operator's size, dtype and device).
        diagonal: optional flat diagonal ``P > 0`` of the same shape.

    Returns:
        The quotient as a float; NaN for ``u = 0`` (no direction).

    Raises:
        CurvatureError: ``u`` or ``diagonal`` do not fit the operator.
    """
    hu = operator.matvec(u)
    if diagonal is None:
        denominator = operator.dot(u, u)
    else:
        if diagonal.shape != u.shape:
            raise CurvatureError(
                f"diagonal has shape {tuple(diagonal.shape)}, expected {tuple(u.shape)} (the shape of u)"
            )
        denominator = operator.dot(u, diagonal.to(u.dtype) * u)
    denominator = float(denominator)
    if denominator == 0.0:
        return math.nan
    return float(operator.dot(u, hu)) / denominator


# -- critical sharpness -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CriticalSharpness:
    """The result of :func:`critical_sharpness`.

    Attributes:
        value: ``lambda_c = 2 / eta_c``, against the threshold ``2 / lr``.
        eta_c: the critical step: the midpoint of the final bracket when
            ``bracketed``; otherwise the bound the search reached (see
            :func:`critical_sharpness`).
        evals: calls of ``loss_at``, the one at ``eta = 0`` included.
        bracketed: a step that raised the loss and a smaller one that did not
            were found.
        precision: bound on the relative error of ``eta_c`` and ``value``
            (``(hi - lo) / (2 lo)`` of the bracket); ``inf`` when not bracketed.
    """

    value: float
    eta_c: float
    evals: int
    bracketed: bool
    precision: float = math.inf


def critical_sharpness(
    loss_at: Callable[[float], float],
    lr: float,
    *,
    max_evals: int = 10,
    rtol: float = 1e-2,
    loss0: float | None = None,
) -> CriticalSharpness:
    r"""Critical sharpness ``lambda_c = 2 / eta_c`` along ``-u`` by a forward-only line search.

    ``eta_c`` is the smallest ``eta > 0`` with ``L(theta - eta u) > L(theta)``
    (Kalra et al. 2026, arXiv:2601.16979). On a quadratic
    ``L = 1/2 theta^T A theta - b^T theta`` with gradient ``g``,
    ``eta_c = 2 (g^T u) / (u^T A u)``, so ``lambda_c = u^T A u / (g^T u)``: for
    ``u = g`` it is the curvature along ``u``, ``u^T A u / |u|^2`` (see the
    module doc). The step of ``lr`` raises the loss iff ``lr > eta_c``: compare
    ``value`` with ``2 / lr``.

    Search: ``L(theta)`` (one evaluation, none when ``loss0`` is given), then
    ``eta = lr``, the step actually taken; doubled until the loss rises, or
    halved until it does not; then bisection of the bracket ``[lo, hi]`` (``lo``
    does not raise the loss, ``hi`` does) until ``(hi - lo) / (2 lo) <= rtol``;
    ``eta_c`` is the bracket's midpoint. At most ``max_evals`` evaluations
    besides ``L(theta)``. A non-finite loss counts as a rise. Where the loss
    along the line is not convex the bracket holds a crossing, not necessarily
    the first.

    Without a bracket (``bracketed=False``): if no step raised the loss (a
    direction of negative or tiny curvature, ``u = 0``), ``eta_c`` is the
    largest step tried, a lower bound, and ``value`` an upper bound on
    ``lambda_c``; if every step raised it (``u`` not a descent direction at any
    scale tried), ``eta_c`` is the smallest step tried, an upper bound, and
    ``value`` a lower bound.

    Args:
        loss_at: ``loss_at(eta) -> float``, the loss at ``theta - eta u``, with
            the parameters unchanged afterwards (:func:`perturbed_loss`).
        lr: the learning rate of the step taken (``theta_t = theta_{t-1} - lr u``).
        max_evals: evaluations of ``loss_at`` at ``eta > 0``.
        rtol: relative precision of ``eta_c`` at which the bisection stops.
        loss0: ``L(theta)`` when the caller already has it from the same batch
            and modes (saves one forward pass).

    Returns:
        The :class:`CriticalSharpness`.

    Raises:
        CurvatureError: ``lr`` not finite and positive, ``max_evals < 1``,
            ``rtol <= 0``, or a non-finite ``L(theta)``.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise CurvatureError(f"lr must be finite and > 0 (the step taken), got {lr}")
    if max_evals < 1:
        raise CurvatureError(f"max_evals must be at least 1, got {max_evals}")
    if not rtol > 0:
        raise CurvatureError(f"rtol must be > 0, got {rtol}")
    evals = 0
    if loss0 is None:
        loss0 = float(loss_at(0.0))
        evals += 1
    if not math.isfinite(loss0):
        raise CurvatureError(f"the loss at theta is {loss0}; the line search needs a finite loss")
    lo, hi, searched = _bracket(loss_at, loss0, float(lr), max_evals, rtol)
    evals += searched
    if lo > 0.0 and hi < math.inf:
        eta_c = (lo + hi) / 2
        return CriticalSharpness(2 / eta_c, eta_c, evals, True, (hi - lo) / (2 * lo))
    bound = lo if hi == math.inf else hi
    return CriticalSharpness(2 / bound, bound, evals, False)


def _bracket(
    loss_at: Callable[[float], float], loss0: float, eta: float, max_evals: int, rtol: float
) -> tuple[float, float, int]:
    """``(lo, hi, evaluations)``: the search of :func:`critical_sharpness` from ``eta``.

    ``lo`` does not raise the loss (``0``: none found), ``hi`` does (``inf``:
    none found); doubled, halved, then bisected, at most ``max_evals`` times.
    """
    lo, hi, evals = 0.0, math.inf, 0  # lo: no rise (eta = 0 trivially); hi: a rise
    for _ in range(max_evals):
        evals += 1
        if float(loss_at(eta)) <= loss0:  # NaN and inf count as a rise
            lo = eta
        else:
            hi = eta
        if hi == math.inf:
            eta = 2 * lo
        elif lo == 0.0:
            eta = hi / 2
        elif (hi - lo) <= 2 * rtol * lo:
            break
        else:
            eta = (lo + hi) / 2
    return lo, hi, evals


def perturbed_loss(
    model: torch.nn.Module,
    params: Sequence[torch.Tensor],
    u: torch.Tensor,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batch: Any,
    reduce: Callable[[float], float] | None = None,
) -> Callable[[float], float]:
    """``loss_at(eta)``: the loss at ``theta - eta u``, parameters restored bit-exactly.

    Each call saves a copy of the (local) parameter tensors, sets them to
    ``theta - eta u`` in place, computes ``loss_fn(model, batch)`` under
    ``torch.no_grad()`` and copies the saved values back (also when the loss
    raises), so the parameters are bit-identical afterwards. Modes, buffers
    (BatchNorm statistics) and random states are the caller's:
    run it inside :func:`curvwatch.guard.measurement_guard`.

    Args:
        model: the model owning ``params``.
        params: the parameters ``u`` is flat over (local shards under FSDP).
        u: the flat direction.
        loss_fn: ``loss_fn(model, batch) -> scalar loss``.
        batch: the probe batch.
        reduce: averages a per-process loss over processes (e.g. an operator's
            ``mean_over_ranks``) so that every rank takes the same branch of
            the line search.

    Returns:
        ``loss_at(eta) -> float``.
    """

    def loss_at(eta: float) -> float:
        with torch.no_grad():
            tensors = [local(p) for p in params]
            saved = [t.detach().clone() for t in tensors]
            try:
                for t, t0, d in zip(tensors, saved, unflatten(u, saved)):
                    t.copy_(t0 - eta * d)
                loss = loss_fn(model, batch)
            finally:
                for t, t0 in zip(tensors, saved):
                    t.copy_(t0)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise CurvatureError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            )
        value = loss.detach().item()
        return value if reduce is None else float(reduce(value))

    return loss_at
