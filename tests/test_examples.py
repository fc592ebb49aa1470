"""The examples print what their docstrings promise, run as a user runs them (in a subprocess,
where the suite's ``Budget(overhead=None)`` default of conftest.py does not reach)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _table(stdout: str) -> list[dict[str, float]]:
    """The rows under the ``step lr lambda_max ...`` header, as ``{column: value}``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "lr"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(dict(zip(header, map(float, line.split()), strict=True)))
    return rows


@pytest.mark.slow  # a short Trainer run: about 15-25 s on a shared 2-core CPU, most of it importing transformers
def test_huggingface_example_table_has_a_finite_trace_at_every_row(tmp_path):
    """Issue 25, item 14: under the default 5% share the table read nan for the trace (and lambda_max)."""
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "huggingface_example.py"), "--out", str(tmp_path / "hf"),
         "--steps", "20", "--every", "10"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _table(done.stdout)
    assert [row["step"] for row in rows] == [10, 20]
    for row in rows:
        for column in ("lambda_max", "precond", "ratio", "trace"):
            assert math.isfinite(row[column]), (column, row)
    assert "CurvatureWarning" not in done.stderr  # nothing deferred or cut short
