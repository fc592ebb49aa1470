"""Run a multi-process launch in its own session and read each rank's JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "ddp_scripts"


def run_ranks(command: list[str], out: Path, timeout: float, ranks: int = 2) -> list[dict]:
    """Run ``command`` (a launcher) from ``SCRIPTS``; kill the whole session on a hang.

    Returns ``out/rank{i}.json`` of every rank. Fails the test with the output's
    tail when the launch hangs or exits non-zero.
    """
    name = " ".join(Path(c).name for c in command if c.endswith(".py"))
    proc = subprocess.Popen(
        command, cwd=SCRIPTS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: it and its workers
        output, _ = proc.communicate()
        pytest.fail(f"{name} hung for {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{name} failed:\n{output[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
