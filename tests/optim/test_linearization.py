"""Adam's linear set (issue 23): the coordinates where 38/lr's frozen-preconditioner model holds."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import curvwatch as cw
from curvwatch.optim.linearization import restrict_to_linear_, unbounded_step_note
from tests._helpers import adam_linear_diagonal


def _one_parameter(optimizer_cls, v: list[float], step: int = 10, **kwargs):
    p = nn.Parameter(torch.zeros(len(v), dtype=torch.float64))
    opt = optimizer_cls([p], lr=1e-3, **kwargs)
    key = {torch.optim.RMSprop: "square_avg", torch.optim.Adamax: "exp_inf"}.get(optimizer_cls, "exp_avg_sq")
    opt.state[p] = {"step": torch.tensor(float(step)), key: torch.tensor(v, dtype=torch.float64)}
    if kwargs.get("amsgrad"):
        opt.state[p]["max_exp_avg_sq"] = torch.tensor(v, dtype=torch.float64) * 4
    return p, opt


def _removed(opt, p, gradient) -> tuple[int, torch.Tensor]:
    diagonal = torch.ones(p.numel(), dtype=torch.float64)
    removed = restrict_to_linear_(diagonal, opt, [p], torch.tensor(gradient, dtype=torch.float64))
    return removed, diagonal == torch.finfo(torch.float64).max


def test_adam_set_is_the_second_moment_at_most_doubling_with_bias_correction():
    beta2, t = 0.95, 3
    p, opt = _one_parameter(torch.optim.AdamW, [1.0, 1.0, 1.0, 0.0], step=t, betas=(0.9, beta2))
    rho = (1 - beta2 ** (t + 1)) / (1 - beta2**t)
    edge = math.sqrt((2 * rho - beta2) / (1 - beta2))  # |g| at which v_hat' = 2 v_hat for v = 1
    removed, off = _removed(opt, p, [0.5 * edge, 0.999 * edge, 1.001 * edge, 1e-3])
    assert off.tolist() == [False, False, True, True]  # v = 0: any gradient sets P anew
    assert removed == 2


def test_the_edge_is_where_the_bias_corrected_second_moment_doubles():
    beta2, t = 0.999, 1
    p, opt = _one_parameter(torch.optim.Adam, [0.001 * 4.0], step=t, betas=(0.9, beta2))  # one gradient of 2
    v_hat = 4.0
    for g, doubles in ((2.0, False), (3.45, False), (3.48, True)):  # doubles at g = 3.4636
        v_hat_next = (beta2 * 0.004 + (1 - beta2) * g * g) / (1 - beta2 ** (t + 1))
        assert (v_hat_next > 2 * v_hat) == doubles
        assert _removed(opt, p, [g])[1].item() == doubles


def test_amsgrad_reads_the_maximum_rmsprop_its_alpha_adamax_its_infinity_norm():
    p, opt = _one_parameter(torch.optim.Adam, [1.0], amsgrad=True, betas=(0.9, 0.999))
    # the maximum is 4, t = 10: rho = (1 - 0.999^11) / (1 - 0.999^10), |g| <= sqrt((2 rho - 0.999) 4 / 0.001) = 69.3
    assert not _removed(opt, p, [69.0])[1].item()
    assert _removed(opt, p, [69.6])[1].item()
    p, opt = _one_parameter(torch.optim.RMSprop, [1.0], alpha=0.99)  # (1 - a) g^2 <= (2 - a) v: |g| <= 10.05
    assert [_removed(opt, p, [g])[1].item() for g in (10.0, 10.1)] == [False, True]
    p, opt = _one_parameter(torch.optim.Adamax, [1.0], eps=0.0)  # |g| <= sqrt(2) u
    assert [_removed(opt, p, [g])[1].item() for g in (1.41, 1.42)] == [False, True]
    q = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    assert restrict_to_linear_(torch.ones(1), torch.optim.SGD([q], lr=0.1), [q], torch.ones(1)) == 0


class _Tokens(nn.Module):
    """An untied embedding and a linear head: rows of tokens training never sees keep v = 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(16, 4), nn.Linear(4, 16)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def _trained_on_half_the_vocabulary():
    model = _Tokens().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randint(0, 8, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), (x * 3) % 16).backward()
        opt.step()
    probe = torch.arange(16)  # held out: meets the 8 rows training never moved
    return model, opt, (probe, (probe * 3) % 16)


def _dense(model: nn.Module, batch) -> torch.Tensor:
    names, shapes = zip(*[(n, p.shape) for n, p in model.named_parameters()])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        values = {n: t.reshape(s) for n, s, t in zip(names, shapes, theta.split([s.numel() for s in shapes]))}
        return nn.functional.cross_entropy(functional_call(model, values, (batch[0],)), batch[1])

    return hessian(loss)(flat)


def test_the_held_out_rows_false_alarm_is_gone_and_the_headline_is_the_dense_restricted_value():
    """The issue's false alarm in miniature: P ~ eps on unseen rows puts the unrestricted ratio ~900 x 38/lr."""
    model, opt, probe = _trained_on_half_the_vocabulary()
    monitor = cw.CurvatureMonitor(
        model, probe, criterion=nn.CrossEntropyLoss(), optimizer=opt, top_k=1, trace=False,
        budget=cw.Budget(max_hvps=300, tol=1e-8, overhead=None),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no crossing: the headline is below the edge
        result = monitor.measure(40)
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(probe[0]), probe[1])
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    linear = adam_linear_diagonal(opt, params, gradient)
    dense = _dense(model, probe)
    s = linear.rsqrt()
    exact = torch.linalg.eigvalsh(s[:, None] * dense * s[None, :])[-1].item()
    whole = cw.preconditioner_diagonal(opt, params).double().rsqrt()
    exact_full = torch.linalg.eigvalsh(whole[:, None] * dense * whole[None, :])[-1].item()
    assert result.preconditioned_lambda_max == pytest.approx(exact, rel=1e-6)
    assert result.sharpness_ratio == pytest.approx(exact / result.threshold, rel=1e-6)
    assert result.sharpness_ratio < 1
    assert result.full_preconditioned_lambda_max == pytest.approx(exact_full, rel=1e-6)
    assert result.full_preconditioned_lambda_max / result.threshold > 100  # what the headline read before
    assert result.excluded_fraction == pytest.approx(int(linear.isinf().sum()) / linear.numel())
    assert result.excluded_fraction >= 32 / linear.numel()  # at least the 8 unseen rows of 4
    tags = result.scalars()
    assert tags["curvature/preconditioned_lambda_max"] == result.preconditioned_lambda_max
    assert tags["curvature_diagnostics/full_preconditioned_lambda_max"] == result.full_preconditioned_lambda_max
    assert "curvature_diagnostics/excluded_fraction" in tags


def test_full_batch_adam_leaves_nothing_out_and_logs_one_value():
    """Where the probe is the training batch, the set is everything and 38/lr's own setting is unchanged."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = torch.tensor(digits.data[:256], dtype=torch.float32) / 16, torch.tensor(digits.target[:256])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    result = cw.CurvatureMonitor(
        model, (x, y), criterion=nn.CrossEntropyLoss(), optimizer=opt, top_k=1, trace=False,
        budget=cw.Budget(max_hvps=80, overhead=None),
    ).measure(30)
    assert result.excluded_fraction == 0
    assert result.full_preconditioned_lambda_max == result.preconditioned_lambda_max


@pytest.mark.parametrize(("betas", "warned"), [((0.9, 0.5), True), ((0.9, 0.81), True), ((0.9, 0.95), False)])
def test_beta1_above_sqrt_beta2_is_said_once_from_the_settings(betas, warned):
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p], lr=1e-3, betas=betas)
    note = unbounded_step_note(opt)
    assert bool(note) == warned
    if warned:
        assert "unbounded" in note and "beta2 > beta1^2" in note
    model, _, probe = _trained_on_half_the_vocabulary()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=betas)
    nn.functional.cross_entropy(model(probe[0]), probe[1]).backward()
    opt.step()
    monitor = cw.CurvatureMonitor(model, probe, criterion=nn.CrossEntropyLoss(), optimizer=opt, top_k=1,
                                  trace=False, budget=cw.Budget(overhead=None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.measure(1)
        monitor.measure(2)
    unbounded = [w for w in caught if "unbounded" in str(w.message)]
    assert len(unbounded) == (1 if warned else 0)
