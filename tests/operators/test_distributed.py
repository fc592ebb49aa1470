"""Distributed curvature: DDP (averaged products) and FSDP (sharded finite differences).

The multi-process tests launch ``tests/ddp_scripts/dist_*.py`` under
``torch.distributed.run --nproc_per_node 2`` (CPU, gloo) and read back each
rank's JSON. Every comparison is against a single process measuring the whole
probe batch with exact (double-backward) products, in float32, at 1e-3 relative.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from curvwatch import CurvatureError, CurvatureMonitor
from curvwatch.operators.hessian import HessianOperator
from curvwatch.operators.sharded import ShardedHessianOperator
from tests._launch import SCRIPTS, run_ranks

TIMEOUT = 150  # seconds per launch (about 15 s each on 2 CPU cores)
RTOL = 1e-3

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _common():
    spec = importlib.util.spec_from_file_location("dist_common", SCRIPTS / "dist_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(out: Path, script: str, *args: str) -> list[dict]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(SCRIPTS / script), "--out", str(out), *args,
    ]
    return run_ranks(command, out, TIMEOUT)


def _assert_close(got: list[float], expected: list[float], rtol: float = RTOL) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert abs(g - e) <= rtol * abs(e), f"{got} vs single process {expected}"


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("ddp"), "dist_ddp.py")


@pytest.fixture(scope="module", params=["fsdp2", "hsdp", "fsdp1"])
def fsdp(request, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp(request.param)
    return out, _launch(out, "dist_fsdp.py", "--wrap", request.param)


# -- DDP ---------------------------------------------------------------------------------
@needs_gloo
@pytest.mark.slow
def test_ddp_matches_single_process(ddp):
    for rank in ddp:
        result, ref = rank["distributed"], rank["reference"]
        assert result["method"] == "double_backward" and result["converged"]  # auto, unsharded
        _assert_close(result["eigenvalues"], ref["eigenvalues"])
        assert result["threshold"] == ref["threshold"]
        assert math.isclose(result["loss"], ref["loss"], rel_tol=1e-6)  # mean over ranks
    assert ddp[0]["distributed"] == ddp[1]["distributed"]  # same Lanczos on every rank
    assert ddp[0]["second"] == ddp[1]["second"]
    assert ddp[0]["timed"]["hvps"] == ddp[1]["timed"]["hvps"] < 10  # one shared time-out decision


@needs_gloo
@pytest.mark.slow
def test_ddp_measurement_leaves_parameters_and_grads(ddp):
    for rank in ddp:
        assert rank["params_exact"] and rank["grads_same_objects"] and rank["grads_exact"]


# -- FSDP --------------------------------------------------------------------------------
@needs_gloo
@pytest.mark.slow
def test_fsdp_matches_single_process(fsdp):
    _, ranks = fsdp
    for rank in ranks:
        result, ref = rank["sharded"], rank["reference"]
        assert result["method"] == "finite_difference" and result["converged"]
        _assert_close(result["eigenvalues"], ref["eigenvalues"])
        _assert_close([result["preconditioned"]], [ref["preconditioned"]])  # Adam's local state
        assert result["threshold"] == ref["threshold"]
        assert math.isclose(result["loss"], ref["loss"], rel_tol=1e-5)  # mean over ranks, not NaN
        second = rank["second"]  # warm start: the all-reduced overlap, fewer products
        _assert_close(second["eigenvalues"], ref["eigenvalues"])
        assert abs(second["top_overlap"] - 1.0) < 1e-3
        assert second["hvps"] < result["hvps"]
        forward = rank["forward"]  # one-sided products, central Rayleigh certificate
        assert forward["method"] == "forward_difference"
        _assert_close(forward["eigenvalues"][:1], ref["eigenvalues"][:1])
        value, stderr, method = rank["batch_sharpness"]  # skipped the whole measurement before
        assert method == "finite_difference" and 0 < value and math.isfinite(stderr)
    assert ranks[0]["batch_sharpness"] == ranks[1]["batch_sharpness"]  # all-reduced inner products
    assert ranks[0]["sharded"] == ranks[1]["sharded"]  # same Lanczos on every rank
    assert ranks[0]["second"] == ranks[1]["second"]
    if ranks[0]["replicas"] == 1:  # sharded over both ranks
        assert ranks[0]["local_size"] + ranks[1]["local_size"] == ranks[0]["global_size"] == 1507
        assert 0 < ranks[0]["local_size"] < 1507
    else:  # HSDP, 2 x 1 mesh: every rank holds a full replica
        assert ranks[0]["local_size"] == ranks[1]["local_size"] == 1507


@needs_gloo
@pytest.mark.slow
def test_fsdp_measurement_leaves_parameters_and_grads(fsdp):
    for rank in fsdp[1]:
        assert rank["params_exact"], "local shards changed by a measurement"
        assert rank["grads_same_objects"] and rank["grads_exact"], ".grad changed by a measurement"
        assert rank["none_grad_kept"], "a None .grad came back as a tensor"


@needs_gloo
@pytest.mark.slow
def test_fsdp_training_with_monitor_is_bit_identical(fsdp):
    for rank in fsdp[1]:
        train = rank["training"]
        assert train["measurements"] == 3  # after steps 2, 4, 6
        assert all(math.isfinite(v) and v > 0 for v in train["lambda_max"])
        assert train["losses_watched"] == train["losses_plain"]  # float.hex: bit for bit
        assert train["final_exact"]


@needs_gloo
@pytest.mark.slow
def test_fsdp_random_vector_is_independent_of_world_size(fsdp):
    out, _ = fsdp
    gathered = torch.load(out / "random_vector.pt")
    model = _common().make_mlp()
    op = ShardedHessianOperator(lambda: torch.zeros(()), model.parameters(), module=model)
    single = op.random_vector(torch.Generator().manual_seed(5))  # one process, whole vector
    assert torch.equal(gathered, single)


# -- one process -------------------------------------------------------------------------
def _regression(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)
    x, y = torch.randn(16, 4, dtype=dtype), torch.randn(16, 2, dtype=dtype)
    return model, lambda: nn.functional.mse_loss(model(x), y)


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_sharded_operator_on_one_process_matches_exact_hessian(scheme):
    model, closure = _regression()
    params = list(model.parameters())
    exact = HessianOperator(closure, params)
    op = ShardedHessianOperator(closure, params, module=model, scheme=scheme)
    assert op.size == op.global_size == exact.size == 44
    vectors = [op.random_vector(torch.Generator().manual_seed(seed)) for seed in range(3)]
    expected = [exact.matvec(v) for v in vectors]
    exact.release()  # its graph saved the parameters, which finite differences perturb
    rtol = 1e-6 if scheme == "central" else 1e-4
    for v, hv in zip(vectors, expected):
        torch.testing.assert_close(op.matvec(v), hv, rtol=rtol, atol=rtol)


def test_sharded_operator_restores_parameters_and_grads_bit_exactly():
    model, closure = _regression(torch.float32)
    params = list(model.parameters())
    closure().backward()
    params[0].grad = None
    before = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    grad_values = [None if g is None else g.clone() for g in grads]
    op = ShardedHessianOperator(closure, params, module=model)
    op.matvec(op.random_vector(torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(g is p.grad for g, p in zip(grads, params))
    assert params[0].grad is None
    assert all(torch.equal(a, p.grad) for a, p in zip(grad_values[1:], params[1:]))


def test_deepspeed_zero3_parameters_are_rejected():
    model, _ = _regression(torch.float32)
    model[0].weight.ds_id = 0  # what deepspeed.zero.Init leaves on every parameter
    model[0].weight.ds_status = "NOT_AVAILABLE"
    with pytest.raises(CurvatureError, match="ZeRO stage 3"):
        CurvatureMonitor(model, (torch.randn(4, 4), torch.randn(4, 2)), criterion=nn.MSELoss())
    with pytest.raises(CurvatureError, match="ZeRO stage 3"):
        ShardedHessianOperator(lambda: torch.zeros(()), model.parameters(), module=model)
