"""DDP and FSDP2 on 2 GPUs (NCCL) equal one GPU on the same global probe batch.

Skipped without 2 CUDA devices (the CPU CI); run on a 2-GPU machine with
``python -m pytest tests/gpu/test_two_gpus.py``. The same script runs on the CPU
with gloo in tests/operators/test_distributed.py's spirit; here it is the GPT-2 small shape.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)


def test_ddp_and_fsdp2_match_one_gpu(tmp_path):
    out = Path(os.environ.get("CURVWATCH_RESULTS_DIR", tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(ROOT / "benchmarks" / "multi_gpu.py"), "--out", str(out)],
        check=True, env=env, timeout=900,
    )
    (path,) = out.glob("multi_gpu_2x_*.json")
    results = json.loads(path.read_text())
    for kind in ("mlp", "gpt2"):
        ranks = results["models"][kind]
        reference = ranks[0]["single"]["lambda_max"]
        exact = ranks[0]["single_exact"]["lambda_max"]
        assert abs(reference - exact) <= 1e-3 * abs(exact)
        for rank in ranks:
            for mode in ("ddp", "fsdp2"):
                assert rank[mode]["rel_diff_vs_single"] <= 1e-3, (kind, mode, rank[mode])
        assert ranks[0]["ddp"]["lambda_max"] == ranks[1]["ddp"]["lambda_max"]
