"""Per-block curvature under FSDP2, 2 gloo processes (``fully_shard`` per layer and on the root).

Train 3 Adam steps, then measure with ``blocks=`` (central differences on the
local shards of each block's parameters, each rank holding half of the probe
batch) twice (the second warm-started per block). Every rank gathers the full
parameters and Adam state into a plain model and measures it on the whole probe
batch with double backward: the single-process reference. Parameters and
``.grad`` must be bit-exact afterwards.

Writes ``--out/rank{i}.json``.
"""

from __future__ import annotations

import torch
from dist_common import PROBE, TOL, dump, init, make_data, monitor, same, share
from dist_fsdp import local_values, single_process_copy, trained

from curvwatch import Budget
from curvwatch.operators.sharded import ShardedHessianOperator

BLOCKS = {"first": "0.*", "hidden": "2.*", "last": ["4.weight", "4.bias"]}
OPTIONS = {"blocks": BLOCKS, "trace": False, "budget": Budget(max_hvps=400, trace_hvps=0, tol=TOL, overhead=None)}


def blocks(result) -> dict:
    """The block fields the test compares."""
    return {
        name: [b.lambda_max, b.preconditioned_lambda_max, b.sharpness_ratio, b.hvps, b.converged]
        for name, b in result.blocks.items()
    }


def main() -> None:
    """Measure blocks sharded and single-process; write the results."""
    rank, world, _args = init()
    model, opt = trained("fsdp2", rank, world)
    params = list(model.parameters())
    before, grads = local_values(params), [p.grad for p in params]
    grad_values = local_values(grads)

    probe = make_data(PROBE, seed=7)
    mon = monitor(model, share(probe, rank, world), optimizer=opt, **OPTIONS)
    first = mon.measure(3)
    second = mon.measure(4)
    op = ShardedHessianOperator(lambda: torch.zeros(()), params, module=model)
    plain, ref_opt = single_process_copy(model, opt, op._layouts)
    reference = monitor(plain, probe, optimizer=ref_opt, method="double_backward", **OPTIONS).measure(0)
    results = {
        "method": first.method,
        "sharded": blocks(first),
        "second": blocks(second),
        "reference": blocks(reference),
        "lambda_max": [first.lambda_max, reference.lambda_max],
        "params_exact": same(before, local_values(params)),
        "grads_exact": all(g is p.grad for g, p in zip(grads, params))
        and same(grad_values, local_values(p.grad for p in params)),
    }
    dump(_args.out, rank, results)


if __name__ == "__main__":
    main()
