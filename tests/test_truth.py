"""The ground-truth harness (benchmarks/truth.py, issue 22 item 5): short CPU runs of its cases."""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from benchmarks import truth  # noqa: E402

# per-quantity summary fields the report relies on
QUANTITY_KEYS = {"measured", "certified", "worst_certified_rel_error", "worst_uncertified_rel_error",
                 "violations", "outside_bound", "beyond_2tol", "reference_unconverged"}


def _args(*extra):
    return truth.parse_args(["--device", "cpu", "--threads", "1", *extra])


def test_compare_value_flags_a_certified_value_outside_its_bound():
    solve = {"eigenvalues": [13.164, 12.850], "error_bounds": [1e-9, 1e-9], "converged": True}
    # issue 22's measure(1): 12.902 certified with a bound of 9.5e-4
    bad = truth.compare_value("lambda_max", 12.902, True, 9.5e-4, solve, 0, tol=1e-3, slack=1e-5)
    assert bad["status"] == "compared"
    assert bad["outside_bound"] and bad["beyond_2tol"]
    assert bad["rel_error"] == pytest.approx(0.262 / 13.164, rel=1e-3)
    assert bad["nearest_reference"] == 12.850
    # the same value, not certified: reported, not a violation
    low = truth.compare_value("lambda_max", 12.902, False, 9.5e-4, solve, 0, tol=1e-3, slack=1e-5)
    assert not low["outside_bound"] and not low["beyond_2tol"]
    # within its bound
    good = truth.compare_value("lambda_2", 12.8501, True, 1e-3, solve, 1, tol=1e-3, slack=1e-5)
    assert not good["outside_bound"] and not good["beyond_2tol"]
    # a bound stated tighter than the error, but within 2 tol: outside its bound only
    tight = truth.compare_value("lambda_max", 13.164 * (1 - 5e-4), True, 1e-4, solve, 0, tol=1e-3, slack=1e-5)
    assert tight["outside_bound"] and not tight["beyond_2tol"]
    # NaN (not reported) and a reference that did not converge
    assert truth.compare_value("lambda_max", math.nan, True, 1e-3, solve, 0, 1e-3, 1e-5)["status"] == "not reported"
    unconverged = dict(solve, converged=False)
    assert truth.compare_value("lambda_max", 13.0, True, 1e-3, unconverged, 0, 1e-3, 1e-5)["status"] == (
        "reference unconverged"
    )


def test_bigram_language_is_learnable_and_fixed():
    language = truth.BigramLanguage(50257, tokens=2000)
    a = language.sample(4, 32, torch.Generator().manual_seed(0))
    b = language.sample(4, 32, torch.Generator().manual_seed(0))
    assert a.shape == (4, 32) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= set(language.ids.tolist())
    assert len(language.ids) == 2000 and int(language.ids.max()) < 50257
    # every next token is one of the previous token's 8 successors
    index = {int(t): i for i, t in enumerate(language.ids)}
    for row in a:
        for prev, nxt in zip(row[:-1].tolist(), row[1:].tolist()):
            assert index[nxt] in language.table[index[prev]].tolist()


@pytest.mark.slow
def test_mlp_case_structure_and_reference_against_dense():
    """A short Adam run on digits: the Lanczos reference agrees with the dense Hessian; the report is whole."""
    case = replace(truth.CASES["mlp_adam"], hidden=(16,))  # 1,210 parameters: the dense Hessian is quick
    record = truth.run_case(case, _args("--steps", "20", "--every", "10", "--monitors", "full"))
    json.dumps(record, default=truth._json_default)  # the record is JSON
    assert [m["step"] for m in record["measurements"]] == [10, 20]
    for entry in record["measurements"]:
        ref = entry["reference"]
        assert ref["raw"]["converged"] and ref["preconditioned"]["converged"]
        assert ref["dtype"] == "float64" and len(ref["raw"]["eigenvalues"]) == 4  # top_k + 2
        assert ref["dense"]["asymmetry"] < 1e-12
        checks = entry["reference_checks"]
        assert checks["dense_vs_lanczos_raw"] < 1e-7
        assert checks["dense_vs_lanczos_preconditioned"] < 1e-7
        full = entry["monitors"]["full"]
        assert full["status"] == "measured"
        quantities = [c["quantity"] for c in full["comparisons"]]
        assert quantities == ["lambda_max", "lambda_1", "lambda_2", "preconditioned_lambda_max"]
        for c in full["comparisons"]:
            assert {"value", "certified", "stated_bound", "reference", "rel_error", "status"} <= set(c)
    assert "second_seed_vs_first" in record["measurements"][0]["reference_checks"]
    summary = record["summary"]["full"]
    assert summary["measurements"] == 2
    for q in ("lambda_max", "lambda_1", "lambda_2", "preconditioned_lambda_max"):
        assert set(summary["quantities"][q]) == QUANTITY_KEYS
    text = truth.table({"cases": [record]})
    assert "preconditioned_lambda_max" in text


@pytest.mark.slow
def test_gpt2_tiny_case_compares_blocks_and_writes_json(tmp_path):
    """The CLI on the tiny GPT-2: both monitors, blocks, one measurement, the JSON file."""
    out = tmp_path / "truth.json"
    truth.main(["--device", "cpu", "--case", "gpt2_tiny", "--steps", "2", "--every", "2", "--blocks", "layers",
                "--top-k", "1", "--max-hvps", "24", "--issue-case", "no", "--ref-dtype", "float32",
                "--ref-tol", "1e-5", "--ref-max-matvecs", "40", "--second-seed", "no", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["machine"]["torch"] == torch.__version__
    (record,) = data["cases"]
    assert record["case"] == "gpt2_tiny" and record["size"] == 470528
    (entry,) = record["measurements"]
    assert entry["reference"]["dtype"] == "float32" and "raw_second_seed" not in entry["reference"]
    assert set(entry["reference"]["blocks"]) == {"h.0", "h.1"}
    assert set(entry["monitors"]) == {"default", "full"}
    full = entry["monitors"]["full"]
    quantities = {c["quantity"] for c in full["comparisons"]}
    assert {"lambda_max", "preconditioned_lambda_max", "block/h.0/lambda_max",
            "block/h.1/preconditioned_lambda_max"} <= quantities
    assert isinstance(full["flags"], list)


@pytest.mark.slow
def test_issue22_tiny_gpt2_measure1_certified_or_flagged():
    """Issue 22: the warm measure(1) certified 12.902 (2 products) where the top eigenvalue is 13.164."""
    out = truth.issue_case(tol=1e-3)
    assert out["exact_top"] == pytest.approx(13.164, abs=1e-3)
    assert out["reference"]["raw"]["converged"]
    m1 = out["measure1"]
    assert m1 is not None
    assert (not m1["converged"]) or abs(m1["lambda_max"] - out["exact_top"]) <= 2e-3 * out["exact_top"]
    assert out["measure1_ok"]
