"""Which modes a measurement runs in (issue #15): the curvature of the loss training descends.

See the module docstring of ``curvwatch.guard`` for the reasoning: normalization
layers keep training's mode (batch statistics), dropout is off; ``train_mode=True``
keeps dropout on with one mask per measurement; ``False`` is plain eval mode.
"""

import logging
import math
import warnings

import pytest
import torch

import curvwatch as cw
from curvwatch.guard import measurement_guard
from tests.cases import BatchNormDropoutNet, assert_same_training, train_bn_dropout


# -- BatchNorm after a bias, trained with AdamW -------------------------------------------
def _bn_adamw(steps=50):
    """Linear (bias) -> BatchNorm1d -> ReLU -> Linear after ``steps`` AdamW steps at lr 1e-3."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 10, generator=g), torch.randint(0, 3, (256,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    probe = (torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g))
    return model, opt, probe


def _measure_bn_adamw(caplog, **kwargs):
    model, opt, probe = _bn_adamw()
    monitor = cw.CurvatureMonitor(model, probe, criterion=torch.nn.CrossEntropyLoss(), optimizer=opt,
                                  strict=True, budget=cw.Budget(), **kwargs)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="curvwatch"):
        result = monitor.measure(50)
    return result, [r.getMessage() for r in caplog.records if "edge-of-stability" in r.getMessage()]


def test_batchnorm_model_is_stable_under_auto(caplog):
    r, events = _measure_bn_adamw(caplog, train_mode=None)
    assert r.threshold == pytest.approx(38 / 1e-3)
    assert r.sharpness_ratio < 1 and r.preconditioned_lambda_max < 1e3
    assert not events  # no "crossed the edge-of-stability threshold"


def test_batchnorm_model_is_stable_under_the_default(caplog):
    r, events = _measure_bn_adamw(caplog)
    assert r.sharpness_ratio < 1 and not events


def test_eval_mode_spurious_curvature_stays_off_the_headline(caplog):
    """Running statistics make the bias before BatchNorm matter, where Adam's v ~ 0: P^-1 ~ 1/eps.

    Those coordinates are not on Adam's linear set (a gradient where v ~ 0 sets P anew), so the
    ratio and the events leave them out; the unrestricted diagnostic shows the spurious value.
    """
    r, events = _measure_bn_adamw(caplog, train_mode=False)
    assert r.full_preconditioned_lambda_max / r.threshold > 10
    assert r.sharpness_ratio < 1 and not events
    assert 0 < r.excluded_fraction < 0.2


def test_batchnorm_auto_equals_train_mode_without_dropout(caplog):
    auto, _ = _measure_bn_adamw(caplog, train_mode=None)
    train, _ = _measure_bn_adamw(caplog, train_mode=True)
    assert auto.eigenvalues == train.eigenvalues
    assert auto.preconditioned_lambda_max == train.preconditioned_lambda_max


def test_frozen_batchnorm_stays_in_eval_mode_under_auto():
    """Training that keeps BatchNorm frozen (bn.eval()) descends the running-statistics loss."""
    model, opt, probe = _bn_adamw(steps=5)
    model[1].eval()  # frozen BatchNorm, as in fine-tuning
    results = {}
    for mode in (None, False):
        monitor = cw.CurvatureMonitor(model, probe, criterion=torch.nn.CrossEntropyLoss(), optimizer=opt,
                                      strict=True, budget=cw.Budget(), train_mode=mode)
        results[mode] = monitor.measure(5)
    assert results[None].eigenvalues == results[False].eigenvalues
    assert model.training and not model[1].training  # flags restored



# -- eval normalization against statistics gathered in train mode (issue 25, item 3) ------------
def _bn_monitor(model, opt, probe, **kwargs):
    return cw.CurvatureMonitor(model, probe, criterion=torch.nn.CrossEntropyLoss(), optimizer=opt,
                               budget=cw.Budget(), top_k=1, trace=False, **kwargs)


@pytest.mark.parametrize(
    ("how", "fix"),
    [("train_mode=False", r"pass train_mode=None \(the default\) or True"),
     ("model.eval()", r"call measure\(\) while the model is in train\(\) mode")],
)
def test_eval_normalization_against_train_mode_statistics_warns_once(how, fix):
    """The ratio ~800 with converged=True is of a loss AdamW never descended: said once, with the fix."""
    model, opt, probe = _bn_adamw()
    if how == "model.eval()":
        model.eval()  # e.g. a validation pass just before a direct measure()
        monitor = _bn_monitor(model, opt, probe)
    else:
        monitor = _bn_monitor(model, opt, probe, train_mode=False)
    with pytest.warns(cw.CurvatureWarning, match=r"BatchNorm1d '1'.*eval mode.*train mode.*not comparable.*" + fix):
        result = monitor.measure(50)
    # the value eval mode gives, off Adam's linear set: the unrestricted diagnostic, not the ratio
    assert result.full_preconditioned_lambda_max / result.threshold > 10 and result.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        monitor.measure(51)


def test_no_normalization_warning_where_the_modes_agree():
    model, opt, probe = _bn_adamw(steps=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", cw.CurvatureWarning)
        warnings.filterwarnings("ignore", "curvwatch: no optimizer given")
        _bn_monitor(model, opt, probe).measure(5)  # the default during training: batch statistics
        _bn_monitor(model, opt, probe, train_mode=True).measure(5)
        _bn_monitor(model, None, probe, train_mode=False).measure(5)  # no optimizer: no ratio to compare
        model[1].eval()  # frozen BatchNorm: training itself uses the running statistics
        _bn_monitor(model, opt, probe, train_mode=False).measure(5)
        _bn_monitor(model, opt, probe).measure(5)


# -- Dropout ------------------------------------------------------------------------------------
def _dropout_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)
    ).double()


def _dropout_probe():
    g = torch.Generator().manual_seed(2)
    return torch.randn(48, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (48,), generator=g)


def _measure_dropout(model, **kwargs):
    kwargs.setdefault("budget", cw.Budget(max_hvps=80, tol=1e-8))
    monitor = cw.CurvatureMonitor(model, _dropout_probe(), criterion=torch.nn.CrossEntropyLoss(),
                                  top_k=1, trace=False, strict=True, **kwargs)
    return monitor.measure(1)


def test_dropout_is_off_under_auto_and_the_measurement_is_deterministic():
    model = _dropout_model()
    first, second = _measure_dropout(model, train_mode=None), _measure_dropout(model, train_mode=None)
    eval_mode = _measure_dropout(model, train_mode=False)
    assert first.eigenvalues == second.eigenvalues and first.loss == second.loss
    assert first.eigenvalues == eval_mode.eigenvalues and first.loss == eval_mode.loss
    assert model.training and all(m.training for m in model.modules())


def test_train_mode_keeps_dropout_on_with_one_mask_per_measurement():
    """A fresh mask per forward would make finite differences subtract two different networks."""
    model = _dropout_model()
    exact = _measure_dropout(model, train_mode=True)
    again = _measure_dropout(model, train_mode=True)
    fd = _measure_dropout(model, train_mode=True, method="finite_difference")
    off = _measure_dropout(model, train_mode=None)
    assert exact.eigenvalues == again.eigenvalues  # the same mask: the RNG state at entry
    assert fd.lambda_max == pytest.approx(exact.lambda_max, rel=1e-4)
    assert exact.loss != off.loss  # dropout is on


# -- the guard itself ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("train_mode", "bn", "dropout"), [(None, True, False), (False, False, False), (True, True, True)]
)
def test_guard_modes_and_restoration(train_mode, bn, dropout):
    model = BatchNormDropoutNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with measurement_guard(model, train_mode):
        assert model.body[1].training is bn and model.body[3].training is dropout
        assert not model.body[0].training or train_mode is True
        model(torch.randn(8, 6))  # moves the running statistics and the RNG
        torch.rand(3)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_guard_rejects_an_unknown_train_mode():
    with pytest.raises(cw.CurvatureError, match="train_mode"):
        with measurement_guard(BatchNormDropoutNet(), "auto"):
            pass


@pytest.mark.parametrize(
    "kwargs", [{"train_mode": None}, {"train_mode": True}, {"train_mode": None, "method": "finite_difference"}]
)
def test_training_with_monitor_is_bit_identical(kwargs):
    reference, run = train_bn_dropout(None), train_bn_dropout({"budget": cw.Budget(), **kwargs})
    model, monitor = run[0], run[-1]
    assert len(monitor.history) == 4 and all(math.isfinite(r.lambda_max) for r in monitor.history)
    assert_same_training(run, reference)
    assert all(m.training for m in model.modules())
