"""Per-block curvature (``blocks=``): each block's top eigenvalue, after the global quantities.

A block's operators are the measurement's own (same method, same probe batch)
built for the block's parameters alone (:meth:`OperatorSource.operator
<curvwatch.measurement.source.OperatorSource.operator>` with ``params``):
double backward differentiates the block's gradient with respect to the block,
differences perturb only the block (the sharded operator too). Each block is
warm-started from its own last Ritz vectors, within the products left.
"""

from __future__ import annotations

import math

import torch

from curvwatch._errors import CurvatureError
from curvwatch.blocks import block_parameters, lost_block_message
from curvwatch.measurement.checks import certified
from curvwatch.measurement.context import RATIO_MAX_ERROR, Context, adaptive, certified_to, fitting, warm_start
from curvwatch.measurement.early_warnings import probe_gradient
from curvwatch.operators.preconditioned import PreconditionedOperator
from curvwatch.optim import Threshold, preconditioner_diagonal
from curvwatch.optim.linearization import restrict_to_linear_
from curvwatch.results import BlockResult

Warm = tuple[torch.Tensor | None, torch.Tensor | None]  # a block's last Ritz vectors: (raw, preconditioned)


def measure_blocks(ctx: Context, limit: Threshold | None, left: int) -> tuple[dict[str, BlockResult], dict | None, int]:
    """Each block's curvature within ``left`` products (a block they, or the seconds, do not reach is NaN).

    Returns ``({name: BlockResult}, the per-block warm starts, products spent)``;
    nothing at a measurement that is no multiple of ``blocks_every``.
    """
    options, state = ctx.options, ctx.state
    warm_blocks = dict(state.block_warm or {})
    if options.blocks is None or state.measurements % max(options.blocks_every, 1) != 0:
        return {}, (warm_blocks or None), 0
    results: dict[str, BlockResult] = {}
    spent, unmeasured = 0, []
    for index, (name, params) in enumerate(block_parameters(ctx.model, options.blocks).items()):
        if not params:  # all frozen since the monitor was built: the others and the global values go on
            ctx.note(f"block-lost {name}", lost_block_message(ctx.model, options.blocks, name))
            results[name] = BlockResult()
            continue
        if left - spent < 1 or ctx.past():
            results[name] = BlockResult()
            unmeasured.append(name)
            continue
        try:
            results[name], warm_blocks[name], used = _block(
                ctx, params, ctx.seed + 10 + 2 * index, limit, warm_blocks.get(name, (None, None)), left - spent
            )
        except CurvatureError as error:
            ctx.note(f"block-failed {name}", f"curvwatch: block {name!r} not measured: {error}")
            results[name] = BlockResult()
            continue
        spent += used
    if unmeasured:
        ctx.note(
            "blocks-unmeasured",
            f"curvwatch: step {ctx.step}: the products ran out before blocks {unmeasured} (logged as "
            "NaN, i.e. not at all): each block takes about as many products as the global lambda_max; "
            "raise Budget.max_hvps, or measure blocks less often (blocks_every=...)",
        )
    return results, warm_blocks, spent


def _block(
    ctx: Context, params, seed: int, limit: Threshold | None, warm: Warm, left: int
) -> tuple[BlockResult, Warm, int]:
    """One block: ``lambda_max(H_bb)`` (and ``P_b^-1/2 H_bb P_b^-1/2``'s for adaptive optimizers).

    Returns the result, the new warm starts ``(raw, preconditioned)`` and the products spent.
    """
    warm_eig, warm_pre = warm
    operator, certificate = ctx.source.operator(params), ctx.source.certificate(params)

    def spent() -> int:
        return operator.matvecs + (certificate.matvecs if certificate else 0)

    pre = eig = None
    try:
        diagonal = preconditioner_diagonal(ctx.optimizer, params) if adaptive(limit) else None
        if diagonal is not None:  # on the block's linear set, as the global one
            restrict_to_linear_(diagonal, ctx.optimizer, params, probe_gradient(ctx, operator, params, keep=False))
            preconditioned = PreconditionedOperator(operator, diagonal)
            pre = ctx.lanczos(preconditioned, 1, left, fitting(warm_pre, operator), seed + 1)
            pre = certified(ctx, pre, PreconditionedOperator(certificate, diagonal) if certificate else None)
            warm_pre = warm_start(pre)
        if left - spent() >= 1 and not ctx.past():
            eig = ctx.lanczos(operator, 1, left - spent(), fitting(warm_eig, operator), seed)
            eig = certified(ctx, eig, certificate)
            warm_eig = warm_start(eig)
    finally:
        used = spent()
        operator.release()
    sharp = pre if adaptive(limit) else eig
    ratio = math.nan
    if limit is not None and sharp is not None and certified_to(sharp, RATIO_MAX_ERROR):
        ratio = sharp.lambda_max / limit.value
    solves = [s for s in (pre, eig) if s is not None]
    result = BlockResult(
        lambda_max=eig.lambda_max if eig is not None else math.nan,
        preconditioned_lambda_max=pre.lambda_max if pre is not None else math.nan,
        sharpness_ratio=ratio,
        hvps=used,
        converged=bool(solves) and all(s.converged for s in solves) and not ctx.differences_disagree,
    )
    return result, (warm_eig, warm_pre), used
