"""Bad or unusual inputs fail with their reason, not with a misleading one (issue #15)."""

import warnings

import numpy as np
import pytest
import torch

import curvwatch as cw


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _batch(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def _monitor(model, batch, **kwargs):
    kwargs.setdefault("criterion", torch.nn.CrossEntropyLoss())
    return cw.CurvatureMonitor(model, batch, trace=False, top_k=1, budget=cw.Budget(), **kwargs)


# -- inference mode -------------------------------------------------------------
def test_measuring_under_inference_mode_works_like_under_no_grad():
    model, batch = _model(), _batch()
    expected = _monitor(model, batch, strict=True).measure(1)
    with torch.inference_mode():
        result = _monitor(model, batch, strict=True).measure(1)
    assert result.lambda_max == expected.lambda_max and result.loss == expected.loss


def test_inference_mode_leaves_batchnorm_buffers_and_training_intact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        assert _monitor(model, _batch(), strict=True).measure(1).lambda_max > 0
    assert all(torch.equal(buffers[k], v) and not v.is_inference() for k, v in model.state_dict().items())
    x, y = _batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()  # training goes on
    assert int(model[1].num_batches_tracked) == 1


def test_a_probe_batch_made_under_inference_mode_is_usable():
    model = _model()
    with torch.inference_mode():
        batch = _batch()
    inference = _monitor(model, batch, strict=True).measure(1).lambda_max
    assert inference == _monitor(model, _batch(), strict=True).measure(1).lambda_max


def test_a_model_made_under_inference_mode_names_inference_mode():
    with torch.inference_mode():
        model = _model()
    monitor = _monitor(model, _batch(), strict=True)
    with pytest.raises(cw.CurvatureError, match=r"created under torch.inference_mode\(\)"):
        monitor.measure(1)
    with pytest.warns(cw.CurvatureWarning, match=r"inference_mode\(\)"):
        assert _monitor(model, _batch()).measure(1) is None  # not strict: skipped, said why


# -- empty batch ------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch",
    [_batch()[0][:0], (_batch()[0][:0], _batch()[1][:0]), [], {"x": torch.zeros(0, 3)}],
    ids=["tensor", "pair", "empty-list", "dict"],
)
def test_an_empty_probe_batch_says_so(batch):
    kwargs = {"criterion": None, "loss_fn": lambda m, b: m(b).sum()} if isinstance(batch, torch.Tensor) else {}
    with pytest.raises(cw.CurvatureError, match="probe batch is empty"):
        _monitor(_model(), batch, strict=True, **kwargs)


# -- loss_fn signature ----------------------------------------------------------------
@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda batch: batch[0].sum(),
        lambda model, batch, extra: model(batch[0]).sum(),
        lambda: 0.0,
    ],
    ids=["one-argument", "three-arguments", "no-argument"],
)
def test_a_loss_fn_with_the_wrong_signature_names_the_expected_one(loss_fn):
    with pytest.raises(cw.CurvatureError, match=r"loss_fn\(model, batch\) -> scalar"):
        cw.CurvatureMonitor(_model(), _batch(), loss_fn=loss_fn, strict=True)


def test_a_loss_fn_with_defaults_or_varargs_is_accepted():
    for loss_fn in (
        lambda model, batch, scale=1.0: scale * torch.nn.functional.cross_entropy(model(batch[0]), batch[1]),
        lambda *args: torch.nn.functional.cross_entropy(args[0](args[1][0]), args[1][1]),
    ):
        r = cw.CurvatureMonitor(_model(), _batch(), loss_fn=loss_fn, strict=True, budget=cw.Budget()).measure(1)
        assert r.lambda_max > 0


def test_a_criterion_passed_as_loss_fn_points_to_criterion():
    with pytest.raises(cw.CurvatureError, match=r"criterion=.*loss_fn\(model, batch\) -> scalar"):
        cw.CurvatureMonitor(_model(), _batch(), loss_fn=torch.nn.CrossEntropyLoss(), strict=True)


def test_a_criterion_with_the_wrong_signature_names_the_expected_one():
    with pytest.raises(cw.CurvatureError, match=r"criterion\(outputs, targets\)"):
        cw.CurvatureMonitor(_model(), _batch(), criterion=lambda outputs: outputs.sum(), strict=True)


# -- meta tensors -----------------------------------------------------------------------
def test_a_meta_batch_says_meta_tensors_cannot_be_measured():
    x, y = _batch()
    with pytest.raises(cw.CurvatureError, match="meta tensors cannot be measured"):
        _monitor(_model(), (x.to("meta"), y.to("meta")), strict=True)


def test_a_meta_model_says_meta_tensors_cannot_be_measured():
    model = _model().to("meta")
    monitor = _monitor(model, _batch(), strict=True)  # construction is fine: it may be materialized later
    with pytest.raises(cw.CurvatureError, match="meta tensors cannot be measured"):
        monitor.measure(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _monitor(model, _batch()).measure(1) is None
    assert any("meta tensors cannot be measured" in str(w.message) for w in caught)
    model.to_empty(device="cpu")  # materialized: measurable
    for p in model.parameters():
        torch.nn.init.normal_(p)
    assert _monitor(model, _batch(), strict=True).measure(1).lambda_max > 0


# -- a class where an instance is meant ------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"criterion": torch.nn.CrossEntropyLoss}, r"criterion=CrossEntropyLoss is a class: pass criterion=Cross"),
        ({"loss_fn": torch.nn.MSELoss}, r"loss_fn=MSELoss is a class: pass criterion=MSELoss\(\)"),
    ],
    ids=["criterion", "loss_fn"],
)
def test_a_loss_class_instead_of_an_instance_says_so(kwargs, expected):
    # before: "Boolean value of Tensor with more than one value is ambiguous" (criterion) or "cannot assign
    # 'Sequential' object to buffer 'weight'" (loss_fn), raised inside the first measurement
    with pytest.raises(cw.CurvatureError, match=expected):
        cw.CurvatureMonitor(_model(), _batch(), strict=True, **kwargs)


def test_one_sink_not_in_a_list_says_so(tmp_path):
    # before: TypeError: 'MemorySink' object is not iterable
    with pytest.raises(cw.CurvatureError, match=r"sinks must be a list of callables: pass sinks=\[<the MemorySink>\]"):
        _monitor(_model(), _batch(), sinks=cw.MemorySink())
    sink = cw.MemorySink()
    _monitor(_model(), _batch(), sinks=[sink], strict=True).measure(1)
    assert [r.step for r in sink.results] == [1]


# -- a warm start of another size --------------------------------------------------------
def _optimizer(model, kind):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1)
    return torch.optim.Adam(model.parameters(), lr=0.01)


def _train_step(model, optimizer, batch):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()


def _assert_cold_started(result, fresh, kind):
    assert result.converged and result.lambda_max == pytest.approx(fresh.lambda_max, rel=1e-5)
    if kind == "adam":  # the preconditioned warm start too
        assert result.preconditioned_lambda_max == pytest.approx(fresh.preconditioned_lambda_max, rel=1e-5)
    assert result.sharpness_ratio == pytest.approx(fresh.sharpness_ratio, rel=1e-5)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_unfreezing_parameters_between_measurements_cold_starts(kind):
    # before: every later measurement failed with "v0 has shape (14,), expected (26,) or (26, j)"
    model, batch = _model(), _batch()
    model[0].weight.requires_grad_(False)  # 14 of the 26 parameters measured
    optimizer = _optimizer(model, kind)
    monitor = _monitor(model, batch, optimizer=optimizer, strict=True)
    _train_step(model, optimizer, batch)
    assert monitor.measure(1).converged
    model[0].weight.requires_grad_(True)  # gradual unfreezing: now all 26
    _train_step(model, optimizer, batch)
    fresh = _monitor(model, batch, optimizer=optimizer, strict=True).measure(2)
    _assert_cold_started(monitor.measure(2), fresh, kind)
    _train_step(model, optimizer, batch)
    assert monitor.measure(3).converged  # warm-started again, at the new size


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_state_loaded_from_a_monitor_of_another_model_cold_starts(kind):
    # before: loaded without complaint, then "v0 has shape (26,), expected (50,) or (50, j)" at every measurement
    small, batch = _model(), _batch()
    small_optimizer = _optimizer(small, kind)
    _train_step(small, small_optimizer, batch)
    old = _monitor(small, batch, optimizer=small_optimizer, strict=True)
    old.measure(1)
    torch.manual_seed(1)
    large = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))  # 50 parameters
    optimizer = _optimizer(large, kind)
    _train_step(large, optimizer, batch)
    monitor = _monitor(large, batch, optimizer=optimizer, strict=True)
    monitor.load_state_dict(old.state_dict())
    fresh = _monitor(large, batch, optimizer=optimizer, strict=True).measure(2)
    _assert_cold_started(monitor.measure(2), fresh, kind)


# -- flags and numbers of the wrong type ----------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"every": True}, r"every must be a positive integer \(measure every N steps\), got True"),
        ({"top_k": True}, r"top_k must be a positive integer, got True"),
        ({"batch_size": True}, r"batch_size must be a positive integer, got True"),
        ({"trace": "no"}, r"trace must be True or False, got 'no'"),
        ({"strict": "yes"}, r"strict must be True or False, got 'yes'"),
        ({"seed": 1.5}, r"seed must be a Python int, got 1.5 \(float\)"),
        ({"seed": True}, r"seed must be a Python int, got True \(bool\)"),
        ({"seed": np.int64(3)}, r"seed must be a Python int, got .*3.* \(int64\)"),
    ],
    ids=["every", "top_k", "batch_size", "trace", "strict", "seed", "seed-bool", "seed-numpy"],
)
def test_a_flag_or_count_of_the_wrong_type_is_refused_at_construction(kwargs, expected):
    # before: every=True (and top_k, batch_size) meant 1, trace="no" turned the trace on, strict="yes" was
    # strict, seed=1.5 (or numpy.int64(3)) made every measurement fail ("manual_seed expected a long, but got
    # float", "an integer is required")
    kwargs = {"trace": False, "top_k": 1, **kwargs}
    with pytest.raises(cw.CurvatureError, match=expected):
        cw.CurvatureMonitor(_model(), _batch(), criterion=torch.nn.CrossEntropyLoss(), **kwargs)



@pytest.mark.parametrize("state", [{"foo": 1}, [1, 2]], ids=["dict", "list"])
def test_load_state_dict_refuses_what_is_no_state_dict(state):
    model = torch.nn.Linear(3, 1)
    monitor = cw.CurvatureMonitor(model, (torch.randn(4, 3), torch.randn(4, 1)), criterion=torch.nn.MSELoss())
    with pytest.raises(cw.CurvatureError, match="not a CurvatureMonitor.state_dict"):
        monitor.load_state_dict(state)
