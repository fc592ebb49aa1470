"""The integrations under sharded training (FSDP), 2 CPU processes with gloo.

Lightning ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2) runs on the CPU:
``tests/ddp_scripts/sharded_lightning.py`` trains 10 steps with
``CurvatureCallback(every=5)`` and every rank writes its results as JSON; the
TensorBoard run is read back. The reference is one process measuring the plain
model (the final full weights) on the whole probe batch with exact products.

The other sharded setups cannot run on a CPU machine (skipped, reasons below).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytest.importorskip("lightning")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from tests._launch import SCRIPTS, run_ranks  # noqa: E402
TIMEOUT = 90  # seconds per launch (about 9 s on 2 CPU cores)
RTOL = 1e-3

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def _run(command: list[str], out: Path) -> list[dict]:
    """Run a 2-process launch in its own session (killed whole on a hang); each rank's JSON."""
    return run_ranks(command, out, TIMEOUT)


def _events(run_dir: Path) -> EventAccumulator:
    files = list(run_dir.rglob("events.out.tfevents.*"))
    assert len(files) == 1, f"only rank 0 writes: expected one event file, found {files}"
    events = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0})
    events.Reload()
    return events


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
    for a, b in zip(ranks[0]["history"], ranks[1]["history"]):  # the same Lanczos on every rank
        assert (a["eigenvalues"], a["hvps"], a["trace"]) == (b["eigenvalues"], b["hvps"], b["trace"])
    assert "reference" not in ranks[1]

    reference = ranks[0]["reference"]
    assert reference["method"] == "double_backward"
    final = ranks[0]["history"][-1]  # the last step: the final weights the reference measured
    assert abs(final["lambda_max"] - reference["lambda_max"]) <= RTOL * abs(reference["lambda_max"])
    assert final["threshold"] == reference["threshold"]

    events = _events(out / "tb")
    logged = events.Scalars("curvature/lambda_max")
    assert [e.step for e in logged] == [5, 10]
    for event, result in zip(logged, ranks[0]["history"]):
        assert math.isclose(event.value, result["lambda_max"], rel_tol=1e-6)
    assert "train_loss" in events.Tags()["scalars"]


@pytest.mark.skip(
    reason="Lightning 2.6.6 FSDPStrategy needs a GPU: Trainer(strategy=FSDPStrategy(), accelerator='cpu') raises "
    "ValueError: The strategy `fsdp` requires a GPU accelerator, but received `accelerator='cpu'`"
)
def test_lightning_fsdp_strategy():
    """FSDP1 through Lightning: not possible on a CPU machine."""


@pytest.mark.skip(
    reason="Accelerate 1.15 enables FSDP only on accelerator devices: under ACCELERATE_USE_CPU=1 (MULTI_CPU) the "
    "FullyShardedDataParallelPlugin is ignored and the model is wrapped in DDP; an FSDP1 plugin with "
    "sync_module_states=True raises RuntimeError: There are currently no available devices found"
)
def test_accelerate_fsdp_plugin():
    """watch() under Accelerate's FSDP plugin (versions 1 and 2): not possible on a CPU machine."""


@pytest.mark.skip(
    reason="transformers 5.24 Trainer FSDP goes through Accelerate's plugin: with use_cpu=True fsdp_config "
    "version 2 is ignored (DistributedType.MULTI_CPU, model wrapped in DistributedDataParallel); version 1 raises "
    "RuntimeError: There are currently no available devices found, must be one of 'XPU', 'CUDA', 'MLU', 'NPU', "
    "'MUSA', or 'HPU'."
)
def test_transformers_trainer_fsdp():
    """The transformers Trainer with TrainingArguments(fsdp=...): not possible on a CPU machine."""
