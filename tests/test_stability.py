"""Edge-of-stability thresholds and the Adam preconditioner, from real optimizers."""

import pytest
import torch

import curvwatch as cw


def _params():
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]


@pytest.mark.parametrize(
    ("make", "expected", "rule"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 2 / 0.1, "gd"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), (2 + 1.8) / 0.1, "heavy_ball"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / (2.8 * 0.1), "nesterov"),
        (lambda p: torch.optim.Adam(p, lr=1e-3), 38 / 1e-3, "adam"),
        (lambda p: torch.optim.AdamW(p, lr=2e-3, betas=(0.8, 0.99)), 3.6 / (0.2 * 2e-3), "adam"),
        (lambda p: torch.optim.RMSprop(p, lr=1e-2), 2 / 1e-2, "rmsprop"),
    ],
)
def test_threshold_rules(make, expected, rule):
    t = cw.threshold(make(_params()))
    assert t.value == pytest.approx(expected, rel=1e-12)
    assert t.rule == rule
    assert t.adaptive == (rule in ("adam", "rmsprop"))


def test_threshold_follows_the_scheduler():
    opt = torch.optim.SGD(_params(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert cw.threshold(opt).value == pytest.approx(2 / 0.05)


def test_adam_preconditioner_matches_the_update_rule():
    params = _params()
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    assert cw.preconditioner_diagonal(opt, params) is None  # no state before step 1
    for _ in range(3):
        opt.zero_grad()
        sum((p**2).sum() for p in params).backward()
        opt.step()
    diag = cw.preconditioner_diagonal(opt, params)
    v = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in params])
    torch.testing.assert_close(diag, (v / (1 - 0.99**3)).sqrt() + 1e-8)


def test_param_group_choice_and_errors():
    a, b = _params()
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.5}])
    assert cw.threshold(opt, param_group=1).value == pytest.approx(4.0)
    with pytest.raises(cw.CurvatureError, match="has 2 groups"):
        cw.threshold(opt, param_group=2)
    with pytest.raises(cw.CurvatureError, match="torch.optim.Optimizer"):
        cw.threshold(object())
