r"""Where an adaptive optimizer's frozen-preconditioner linearization holds, coordinate by coordinate.

Adam's edge of stability, ``lambda_max(P^-1/2 H P^-1/2) = (2 + 2 beta1) / ((1 - beta1) lr)``
(38/lr at ``beta1 = 0.9``; Cohen et al. 2022), linearizes the update with the
preconditioner ``P = sqrt(v_hat) + eps`` frozen. That holds on a coordinate
whose second moment ``v_i`` barely moves when a new gradient enters it. On a
language model it fails on the rows of rare tokens (and late MLP weights)
that recent training has barely moved: their ``v_i`` has decayed towards 0,
so the first gradient they see sets ``P_i`` anew, Adam's step there is near
its bound ``lr (1 - beta1) / sqrt(1 - beta2)`` whatever the curvature, and
``P_i^-1`` in the frozen model is orders of magnitude too large. A held-out
probe meets exactly such rows, so ``lambda_max(P^-1 H)`` there reads
40-4,500x above 38/lr on runs that train smoothly.

The *linear set* is the coordinates on which the probe gradient ``g``, had
it been a training gradient, would leave the second moment within a factor 2
(``P_i`` within about ``sqrt 2``):

* Adam / AdamW (``v`` the state ``exp_avg_sq``, ``max_exp_avg_sq`` with
  ``amsgrad``, after ``t`` steps): ``v_hat_i' <= 2 v_hat_i`` with
  ``v_hat = v / (1 - beta2^t)`` and ``v' = beta2 v + (1 - beta2) g^2``, i.e.
  ``(1 - beta2) g_i^2 <= (2 rho - beta2) v_i``, ``rho = (1 - beta2^(t+1)) / (1 - beta2^t)``;
* RMSprop (``v`` = ``square_avg``, no bias correction):
  ``(1 - alpha) g_i^2 <= (2 - alpha) v_i``;
* Adamax (``u`` = ``exp_inf``, ``u' = max(beta2 u, |g| + eps)``):
  ``|g_i| + eps <= sqrt(2) u_i``.

The Adam-type sharpness the monitor compares with the threshold is
``lambda_max`` of ``P^-1/2 H P^-1/2`` restricted to that set (its rows and
columns elsewhere removed, ``P_i^-1/2 = 0``). By Cauchy interlacing it is at
most the unrestricted value, and equal to it where the set is every
coordinate (full-batch training, where 38/lr is known to hold: the digits
demo sits at 0.93-1.04 x 38/lr either way). What the restriction leaves out
is measured on its own: ``CurvatureResult.excluded_fraction``, and the
unrestricted ``full_preconditioned_lambda_max`` as a diagnostic.

Evidence (``benchmarks/results/adam_signal_cpu.md``, a GPT-2 with the full
vocabulary under AdamW, there with the set ``(1 - beta2) g_i^2 <= beta2 v_i``,
the same to 0.2 % of the bound at ``beta2 = 0.999`` after 25 steps): stable runs read 0.058-1.05 restricted against
0.13-3.7 unrestricted; it crosses before learning-rate spikes (a jump x20,
2 steps ahead; a warm-up ramp past stability, 27 steps ahead) and not on a
stable jump x10. It does not see an instability of ``v`` itself (``beta1 >
sqrt(beta2)``, where ``m_hat / sqrt(v_hat)`` is unbounded): those
coordinates are not linear by construction; :func:`unbounded_step_note` says so
from the settings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from curvwatch._flat import local
from curvwatch.optim.thresholds import adam_second_moment, moment_runs, unwrap_optimizer

SQRT2 = math.sqrt(2.0)


def restrict_to_linear_(
    diagonal: torch.Tensor, optimizer: Any, params: Sequence[torch.Tensor], gradient: torch.Tensor
) -> int:
    """Set ``P_i`` to the dtype's largest number (``P_i^-1/2 = 0``) off the linear set, in place.

    Args:
        diagonal: the flat ``P`` of :func:`~curvwatch.optim.preconditioner_diagonal` for ``params``.
        optimizer: the adaptive optimizer (or a framework wrapper around one).
        params: the parameters ``diagonal`` and ``gradient`` are laid out by.
        gradient: the flat probe gradient at the current parameters (same layout).

    Returns:
        How many coordinates were removed (parameters the optimizer does not
        update are off already and not counted). Nothing changes for an
        optimizer without a second-moment rule here (0).
    """
    optimizer = unwrap_optimizer(optimizer)
    removed, big = [], torch.finfo(diagonal.dtype).max
    for run in moment_runs(optimizer, params, lambda group, state, p: _rule(optimizer, group, state, gradient.device)):
        if run.key is None:  # no rule (not updated, or nothing of it on this rank): off already
            continue
        moments = run.moments[0] if len(run.moments) == 1 else torch.cat(run.moments)
        off = ~_linear(run.key, gradient[run.start : run.end].float(), moments).to(diagonal.device)
        removed.append(off.sum())  # on the device: one synchronisation at the end
        diagonal[run.start : run.end].masked_fill_(off, big)
    return int(torch.stack(removed).sum()) if removed else 0


def _rule(
    optimizer, group: dict[str, Any], state: dict[str, Any], device: torch.device
) -> tuple[tuple, torch.Tensor] | None:
    """One parameter's rule (its kind and constants) and local moment, float on ``device`` (``None``: no rule).

    Adamax: ``("adamax", eps)`` and ``u``; Adam and RMSprop: ``("moment", 1 - beta2, growth - beta2)``
    and ``v``, the set being ``(1 - beta2) g^2 <= (growth - beta2) v``.
    """
    if isinstance(optimizer, torch.optim.Adamax):
        if "exp_inf" not in state:
            return None
        return ("adamax", group["eps"]), local(state["exp_inf"]).to(device).float()
    if isinstance(optimizer, torch.optim.RMSprop):
        if "square_avg" not in state:
            return None
        v, beta2, growth = local(state["square_avg"]), float(group["alpha"]), 2.0
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        moment = adam_second_moment(group, state)
        if moment is None or moment[1] < 1:
            return None
        (v, t), beta2 = moment, float(group["betas"][1])
        growth = 2 * (1 - beta2 ** (t + 1)) / (1 - beta2**t)  # 2 rho: v_hat' <= 2 v_hat
    else:
        return None
    return ("moment", 1 - beta2, growth - beta2), v.to(device).float()


def _linear(rule: tuple, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A run's linear set as a mask, from its float gradient ``g`` and its moments ``v`` (flat, float)."""
    if rule[0] == "adamax":
        return g.abs() + rule[1] <= SQRT2 * v
    return rule[1] * g * g <= rule[2] * v


def unbounded_step_note(optimizer: Any, param_group: int = 0) -> str:
    """Why Adam's step is unbounded in this group's settings (``beta1 > sqrt(beta2)``), else ``""``.

    With ``m_t = (1 - b1) sum b1^k g_{t-k}`` and ``v_t = (1 - b2) sum b2^k g_{t-k}^2``,
    Cauchy-Schwarz bounds ``|m_t| / sqrt(v_t)`` by
    ``(1 - b1) / sqrt((1 - b2)(1 - b1^2 / b2))`` only when ``b1^2 < b2``;
    otherwise it grows like ``(b1 / sqrt(b2))^k`` on a coordinate whose
    gradients shrink, whatever the curvature, and no sharpness sees it.
    """
    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return ""
    beta1, beta2 = (float(b) for b in optimizer.param_groups[param_group]["betas"])
    if beta1 * beta1 < beta2:
        return ""
    return (
        f"{type(optimizer).__name__} has beta1={beta1:g} >= sqrt(beta2)={math.sqrt(beta2):.3g}: its step "
        "m_hat/sqrt(v_hat) is unbounded (it grows like (beta1/sqrt(beta2))^k where gradients shrink), an "
        "instability of the second moment that no sharpness ratio sees; keep beta2 > beta1^2 (e.g. 0.95 or 0.999 "
        "with beta1=0.9)"
    )
