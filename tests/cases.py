"""Shared test problems with known curvature (data, not tests)."""

from __future__ import annotations

import torch


def linear_regression(n: int = 40, d: int = 6, seed: int = 0, dtype=torch.float64):
    """Mean squared error of a linear model: H = 2/n X^T X, independent of w."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype) * torch.linspace(0.5, 3.0, d, dtype=dtype)
    y = torch.randn(n, generator=g, dtype=dtype)
    model = torch.nn.Linear(d, 1, bias=False).to(dtype)
    closure = lambda: (model(X).squeeze(-1) - y).pow(2).mean()  # noqa: E731
    H = 2.0 / n * X.T @ X
    model.probe = (X, y)
    return model, closure, H


def tanh_mlp_ce(n: int = 24, d: int = 4, hidden: int = 5, classes: int = 3, seed: int = 0, dtype=torch.float64):
    """A small tanh MLP with mean cross-entropy, and its data."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes)
    ).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, x, y


def dense_hessian(model: torch.nn.Module, loss_of_params) -> torch.Tensor:
    """Dense Hessian of ``loss_of_params(dict)`` w.r.t. the model's parameters (flat order)."""
    from torch.func import hessian

    names = [n for n, _ in model.named_parameters()]
    values = tuple(p.detach() for _, p in model.named_parameters())
    sizes = [v.numel() for v in values]
    flat0 = torch.cat([v.flatten() for v in values])

    def f(flat):
        parts, offset = {}, 0
        for name, v, s in zip(names, values, sizes):
            parts[name] = flat[offset : offset + s].view_as(v)
            offset += s
        return loss_of_params(parts)

    return hessian(f)(flat0)


def dense_ggn_ce(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense ``J^T H_out J`` of the mean softmax cross-entropy, ``H_out = (diag(p) - p p^T) / N``."""
    from torch.func import functional_call, jacrev

    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in params])

    def logits_of(flat):
        parts, o = {}, 0
        for n, p in zip(names, params):
            parts[n] = flat[o : o + p.numel()].view_as(p)
            o += p.numel()
        return functional_call(model, parts, (x,))

    J = jacrev(logits_of)(flat0).reshape(-1, flat0.numel())  # (N*C, P)
    p = torch.softmax(model(x).detach(), -1)
    H_out = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p]) / x.shape[0]
    return J.T @ H_out @ J


class BatchNormDropoutNet(torch.nn.Module):
    """Linear -> BatchNorm1d -> Tanh -> Dropout(0.3) -> Linear, 6 -> 3: every mode-dependent layer."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Dropout(0.3),
            torch.nn.Linear(16, 3),
        )

    def forward(self, x):
        return self.body(x)


class OnceDifferentiableCube(torch.autograd.Function):
    """``x -> x^3`` whose backward is ``@once_differentiable``: it has no second derivative."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.pow(3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x.pow(2) * grad


def train_bn_dropout(monitor_kwargs: dict | None, make_opt=None, steps: int = 12, seed: int = 0):
    """Train :class:`BatchNormDropoutNet` on random mini-batches, with a monitor (``every=3``) or without.

    ``monitor_kwargs=None``: no monitor. Returns ``(model, optimizer, losses,
    torch.rand(3), monitor)``: the last is the RNG state's next draw, for the
    bit-identity checks. ``make_opt(params)`` defaults to Adam at lr 1e-2.
    """
    import random

    import curvwatch as cw

    torch.manual_seed(seed)
    random.seed(seed)
    model = BatchNormDropoutNet()
    opt = (make_opt or (lambda p: torch.optim.Adam(p, lr=1e-2)))(model.parameters())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    probe = (torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    monitor = None
    if monitor_kwargs is not None:
        monitor = cw.CurvatureMonitor(model, probe, criterion=torch.nn.CrossEntropyLoss(), every=3, **monitor_kwargs)
        monitor.attach(opt)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 64, (16,))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses, torch.rand(3), monitor


def assert_same_training(run, reference) -> None:
    """Two :func:`train_bn_dropout` runs are bit-identical.

    Losses, the random stream's next draw, parameters and BatchNorm buffers,
    ``.grad`` and the optimizer state, each with ``==`` / ``torch.equal``.
    """
    model, opt, losses, rng, _ = run
    ref_model, ref_opt, ref_losses, ref_rng, _ = reference
    assert losses == ref_losses
    assert torch.equal(rng, ref_rng)  # the random stream continues unchanged
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)  # parameters and BatchNorm buffers (running stats, counters)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p.grad, q.grad)
        for k, v in opt.state[p].items():
            assert torch.equal(v, ref_opt.state[q][k])


class Kink(torch.nn.Module):
    """``|w_0| + sum(h_i w_i^2) / 2`` at ``w_0 = 1e-6``, ``h = (1, 2, 3)``: every difference step crosses the kink."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1e-6, 0.5, 0.7]))

    def forward(self, _batch):
        return self.w.abs().sum() + 0.5 * (torch.tensor([1.0, 2.0, 3.0]) * self.w.pow(2)).sum()
