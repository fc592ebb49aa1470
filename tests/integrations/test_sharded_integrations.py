"""The integrations under sharded training (FSDP): CPU with gloo, and CUDA.

CPU, 2 processes: Lightning ``ModelParallelStrategy`` with ``fully_shard``
(FSDP2). ``tests/ddp_scripts/sharded_lightning.py`` trains 10 steps with
``CurvatureCallback(every=5)`` and every rank writes its results as JSON; the
TensorBoard run is read back. The reference is one process measuring the plain
model (the final full weights) on the whole probe batch with exact products.

CUDA (marked ``gpu``; up to 2 GPUs, one process each, launched with torchrun):
``tests/ddp_scripts/sharded_gpu.py`` runs the same comparison for the setups a
CPU machine cannot run:

* Lightning ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``). On a CPU,
  Lightning 2.6 refuses it: ``Trainer(strategy=FSDPStrategy(), accelerator="cpu")``
  raises ``ValueError: The strategy `fsdp` requires a GPU accelerator``.
* Accelerate's ``FullyShardedDataParallelPlugin``, versions 1 and 2. On a CPU
  (``ACCELERATE_USE_CPU=1``, ``MULTI_CPU``) Accelerate 1.15 ignores the plugin and
  wraps the model in DDP; an FSDP1 plugin with ``sync_module_states=True``
  raises ``RuntimeError: There are currently no available devices found``.
* The transformers ``Trainer`` with ``TrainingArguments(fsdp="full_shard")``
  (FSDP2, through Accelerate's plugin). With ``use_cpu=True`` transformers 5.24
  ignores ``fsdp_config`` version 2 (``MULTI_CPU``, the model wrapped in DDP) and
  version 1 raises the same ``RuntimeError``.
"""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("lightning")
pytest.importorskip("tensorboard")

from tests._helpers import curves, event_files  # noqa: E402
from tests._launch import SCRIPTS, run_ranks  # noqa: E402

TIMEOUT = 90  # seconds per launch (about 9 s on 2 CPU cores)
GPU_TIMEOUT = 300  # seconds per launch on GPUs (imports and NCCL start included)
RTOL = 1e-3

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# FSDP1 on one process runs NO_SHARD (full flat parameters on the one rank), which the sharded
# operator rejects: "FSDP sharding_strategy=NO_SHARD is not supported" (seen on one H200).
needs_two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="FSDP1 needs 2 CUDA devices (on one process it is NO_SHARD, which the sharded operator rejects)",
)


def _run(command: list[str], out: Path, ranks: int = 2) -> list[dict]:
    """Run a multi-process launch in its own session (killed whole on a hang); each rank's JSON."""
    return run_ranks(command, out, GPU_TIMEOUT if "sharded_gpu.py" in " ".join(command) else TIMEOUT, ranks)


def _one_event_file(run_dir: Path) -> dict[str, dict[int, float]]:
    files = event_files(run_dir)
    assert len(files) == 1, f"only rank 0 writes: expected one event file, found {files}"
    return curves(run_dir)


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("lightning_fsdp2")
    ranks = _run([sys.executable, str(SCRIPTS / "sharded_lightning.py"), "--out", str(out)], out)
    return out, ranks


@needs_gloo
@pytest.mark.slow
def test_lightning_model_parallel_fsdp2_matches_single_process(lightning_run):
    out, ranks = lightning_run
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["dtensor"], "configure_model did not shard: parameters are not DTensors"
        assert not rank["reduces"], "the sharded operator reduces itself: no strategy reduce"
        assert [h["step"] for h in rank["history"]] == [5, 10]
        assert all(h["method"] == "finite_difference" and h["converged"] for h in rank["history"])
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):  # the same Lanczos on every rank
        assert (a["eigenvalues"], a["hvps"], a["trace"]) == (b["eigenvalues"], b["hvps"], b["trace"])
    assert "reference" not in ranks[1]

    reference = ranks[0]["reference"]
    assert reference["method"] == "double_backward"
    final = ranks[0]["history"][-1]  # the last step: the final weights the reference measured
    assert abs(final["lambda_max"] - reference["lambda_max"]) <= RTOL * abs(reference["lambda_max"])
    assert final["threshold"] == reference["threshold"]

    events = _one_event_file(out / "tb")
    logged = events["curvature/lambda_max"]
    assert sorted(logged) == [5, 10]
    for result in ranks[0]["history"]:
        assert math.isclose(logged[result["step"]], result["lambda_max"], rel_tol=1e-6)
    assert "train_loss" in events


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_on_gpus(out: Path, framework: str, version: int) -> None:
    """Launch ``sharded_gpu.py`` on up to 2 GPUs; compare every rank with the single-process reference."""
    processes = min(2, torch.cuda.device_count())
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(_free_port()), str(SCRIPTS / "sharded_gpu.py"),
        "--framework", framework, "--fsdp", str(version), "--out", str(out),
    ]
    ranks = _run(command, out, ranks=processes)
    for rank in ranks:
        assert rank["world_size"] == processes
        assert rank["sharded"], "the model the monitor measures is not FSDP-sharded"
        assert not rank["reduces"], "the sharded operator reduces itself: no data-parallel reduce"
        assert [h["step"] for h in rank["history"]] == [5, 10]
        assert all(h["method"] == "finite_difference" and h["converged"] for h in rank["history"])
    for a, b in zip(ranks[0]["history"], ranks[-1]["history"], strict=True):  # the same Lanczos on every rank
        assert (a["eigenvalues"], a["hvps"]) == (b["eigenvalues"], b["hvps"])
    reference, final = ranks[0]["reference"], ranks[0]["history"][-1]
    assert reference["method"] == "double_backward"
    assert abs(final["lambda_max"] - reference["lambda_max"]) <= RTOL * abs(reference["lambda_max"])
    assert final["threshold"] == pytest.approx(reference["threshold"], rel=1e-12)
    events = _one_event_file(out / "tb")
    assert sorted(events["curvature/lambda_max"]) == [5, 10]
    assert math.isclose(events["curvature/lambda_max"][10], final["lambda_max"], rel_tol=1e-6)


@pytest.mark.gpu
@pytest.mark.slow
@needs_two_gpus
def test_lightning_fsdp_strategy_on_gpus(tmp_path):
    """FSDP1 through Lightning's ``FSDPStrategy`` (CUDA only, see the module docstring)."""
    _sharded_on_gpus(tmp_path, "lightning", 1)


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("version", [pytest.param(1, marks=needs_two_gpus), 2])
def test_accelerate_fsdp_plugin_on_gpus(tmp_path, version):
    """``watch()`` under Accelerate's FSDP plugin, versions 1 and 2 (CUDA only)."""
    pytest.importorskip("accelerate")
    _sharded_on_gpus(tmp_path, "accelerate", version)


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_transformers_trainer_fsdp_on_gpus(tmp_path):
    """The transformers ``Trainer`` with ``fsdp="full_shard"`` (FSDP2; CUDA only)."""
    pytest.importorskip("transformers")
    _sharded_on_gpus(tmp_path, "transformers", 2)
