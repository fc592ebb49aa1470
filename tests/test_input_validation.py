"""Values a new user gets wrong are refused with their name and the fix (issue #25, items 5-9 and 11)."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

import curvwatch as cw


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)


def _batch(n=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g).to(dtype), torch.randint(0, 2, (n,), generator=g)


def _monitor(model=None, batch=None, **kwargs):
    kwargs.setdefault("criterion", torch.nn.CrossEntropyLoss())
    kwargs.setdefault("budget", cw.Budget(overhead=None))
    kwargs = {"trace": False, "top_k": 1, **kwargs}
    return cw.CurvatureMonitor(model if model is not None else _model(), batch or _batch(), **kwargs)


# -- item 5: Budget -----------------------------------------------------------------
def test_budget_max_memory_inf_means_no_limit_and_measures():
    # before: accepted, then every measurement was skipped with "cannot convert float NaN to integer"
    monitor = _monitor(budget=cw.Budget(overhead=None, max_memory=math.inf), strict=True)
    result = monitor.measure(1)
    assert result is not None and math.isfinite(result.lambda_max)
    assert monitor.last_plan.fits and "no limit" in monitor.last_plan.message


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"max_seconds": math.nan}, r"Budget\.max_seconds must be a positive, finite .* got nan; pass None"),
        ({"max_seconds": math.inf}, r"Budget\.max_seconds .* got inf; pass None for no cap"),
        ({"max_basis": 2.5}, r"Budget\.max_basis must be an integer or None, got 2\.5 \(float\)"),
        ({"max_hvps": 60.5}, r"Budget\.max_hvps must be an integer, got 60\.5"),
        ({"negligible_seconds": -1.0}, r"Budget\.negligible_seconds must be a finite .* >= 0, got -1\.0; pass 0"),
        ({"negligible_seconds": math.nan}, r"Budget\.negligible_seconds .* got nan"),
        ({"overhead": math.inf}, r"Budget\.overhead .* got inf; None measures at every due step"),
        ({"max_memory": "1GB"}, r"Budget\.max_memory must be a number or None, got '1GB' \(str\)"),
        ({"max_hvps": "60"}, r"Budget\.max_hvps must be an integer, got '60' \(str\)"),
        ({"tol": "1e-3"}, r"Budget\.tol must be a number, got '1e-3' \(str\)"),
        ({"max_seconds": True}, r"Budget\.max_seconds must be a number or None, got True \(bool\)"),
    ],
    ids=["max_seconds-nan", "max_seconds-inf", "max_basis-fraction", "max_hvps-fraction",
         "negligible-negative", "negligible-nan", "overhead-inf", "max_memory-str", "max_hvps-str", "tol-str",
         "max_seconds-bool"],
)
def test_a_bad_budget_field_is_refused_by_name(kwargs, expected):
    # before: nan, 2.5 and -1 were accepted; a string raised a bare TypeError ("'<' not supported ...")
    with pytest.raises(cw.CurvatureError, match=expected):
        cw.Budget(**kwargs)


def test_a_budget_of_plain_and_numpy_numbers_is_accepted():
    budget = cw.Budget(max_hvps=np.int64(40), trace_hvps=0, max_seconds=5, max_basis=8, negligible_seconds=0,
                       overhead=None, max_memory=2**30)
    assert budget.max_hvps == 40 and budget.overhead is None


def test_max_basis_not_above_top_k_is_refused_naming_both():
    # before: the solver silently raised max_basis to top_k + 1
    with pytest.raises(cw.CurvatureError, match=r"Budget\.max_basis=3 must exceed top_k=3.*max_basis=5"):
        _monitor(top_k=3, budget=cw.Budget(overhead=None, max_basis=3))
    assert _monitor(top_k=3, budget=cw.Budget(overhead=None, max_basis=4)).budget.max_basis == 4


# -- item 6: the step -----------------------------------------------------------------
@pytest.mark.parametrize("step", [-5, 2.7, "3", math.nan, math.inf, True],
                         ids=["negative", "fraction", "string", "nan", "inf", "bool"])
def test_a_step_that_is_no_non_negative_integer_is_refused(step):
    # before: -5 logged at step -5, 2.7 at step 2, "3" at step 3; nan and inf raised int()'s own errors
    monitor = _monitor()
    with pytest.raises(cw.CurvatureError, match=r"step must be a non-negative integer .*, got "):
        monitor.measure(step)
    assert monitor.history == []


def test_an_integer_step_of_numpy_is_logged_as_an_int():
    result = _monitor(strict=True).measure(np.int64(4))
    assert result.step == 4 and type(result.step) is int


# -- item 7: the optimizer --------------------------------------------------------------
def test_an_optimizer_of_another_model_is_refused_at_construction_and_attach():
    # before: accepted; with SGD the threshold and ratio came from the other model's lr without a word
    model, other = _model(), _model()
    stranger = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(cw.CurvatureError, match=r"optimizer \(SGD, 4 parameter tensor\(s\)\) holds none of"):
        _monitor(model, optimizer=stranger)
    monitor = _monitor(model)
    with pytest.raises(cw.CurvatureError, match="holds none of the model's parameters"):
        monitor.attach(stranger)
    assert monitor.optimizer is None


def test_an_optimizer_of_part_of_the_model_is_accepted():
    model = _model()
    head = torch.optim.SGD(model[2].parameters(), lr=0.1)
    monitor = _monitor(model, optimizer=head)
    assert monitor.optimizer is head
    monitor.attach(head).remove()


# -- item 8: on_threshold ---------------------------------------------------------------
@pytest.mark.parametrize("callback", ["print", 3], ids=["string", "int"])
def test_a_non_callable_on_threshold_is_refused_at_construction(callback):
    # before: accepted, then "'str' object is not callable" at the first crossing
    with pytest.raises(cw.CurvatureError, match=r"on_threshold must be a callable on_threshold\(event\), got"):
        _monitor(on_threshold=callback)


# -- item 9: the memory warning ---------------------------------------------------------
def test_the_memory_warning_of_a_small_model_gives_bytes_and_no_private_name():
    # before: "(_DoesNotFit: it needs about 0.00 GiB (...) and 0.00 GiB is allowed on cpu"
    from curvwatch.planning.memory import format_bytes

    monitor = _monitor(budget=cw.Budget(overhead=None, max_memory=100))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert monitor.measure(1) is None
    messages = [str(w.message) for w in caught if isinstance(w.message, cw.CurvatureWarning)]
    assert len(messages) == 1
    message = messages[0]
    assert "_DoesNotFit" not in message and "0.00 GiB" not in message
    assert "does not fit in the memory allowed" in message
    assert "and 100 B is allowed on cpu" in message
    need = monitor.last_plan.device_bytes
    assert f"needs about {format_bytes(need)} (" in message and format_bytes(need).endswith(" KiB")


@pytest.mark.parametrize(
    "count, text",
    [(0, "0 B"), (200, "200 B"), (1536, "1.5 KiB"), (12 * 2**20, "12 MiB"), (3.25 * 2**30, "3.25 GiB"),
     (150 * 2**30, "150 GiB"), (math.inf, "no limit")],
)
def test_sizes_are_given_in_the_unit_they_reach(count, text):
    from curvwatch.planning.memory import format_bytes

    assert format_bytes(count) == text


# -- item 11: precision and malformed JSONL ---------------------------------------------------
@pytest.mark.parametrize("dtype, expected", [(torch.float64, "fp64"), (torch.float32, "fp32")])
def test_the_precision_reported_is_the_models_dtype(dtype, expected):
    # before: a float64 model read "fp32"
    result = _monitor(_model(dtype), _batch(dtype=dtype), strict=True).measure(1)
    assert result.precision == expected


def _jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


_GOOD = json.dumps({"step": 1, "scalars": {"curvature/lambda_max": 1.0}})


@pytest.mark.parametrize(
    "bad, expected",
    [('{"step": 2, "scalars": {"curvature/lam', r"line 2: not valid JSON \(Unterminated string"),
     ('[1, 2]', r"line 2: not a curvwatch record"),
     ('{"scalars": {}}', r"line 2: not a curvwatch record")],
    ids=["truncated", "not-an-object", "no-step"],
)
def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path, bad, expected):
    from curvwatch.report import read_runs

    source = _jsonl(tmp_path / "run.jsonl", [_GOOD, bad])
    with pytest.raises(ValueError, match=expected) as error:
        read_runs(source)
    assert source in str(error.value)


def test_curvwatch_report_on_a_malformed_jsonl_exits_2_naming_the_file_and_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from curvwatch import cli

    source = _jsonl(tmp_path / "run.jsonl", [_GOOD, "", "not json"])
    assert cli.main(["report", source]) == 2
    err = capsys.readouterr().err
    assert f"curvwatch report: {source}, line 3: not valid JSON" in err
