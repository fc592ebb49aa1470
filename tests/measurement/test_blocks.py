"""Per-block curvature (``CurvatureMonitor(blocks=...)``): exact values, patterns, budget, logging, FSDP2."""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, hessian

from curvwatch import Budget, CurvatureError, CurvatureMonitor, CurvatureWarning, JsonlSink, TensorBoardSink
from curvwatch.blocks import block_parameters, resolve_blocks
from tests._helpers import adam_linear_diagonal, curves, layouts
from tests._launch import SCRIPTS, run_ranks

BIG = Budget(max_hvps=400, trace_hvps=0, tol=1e-7, overhead=None)


class TwoQuadratics(nn.Module):
    """``L = 1/2 a^T A a + 1/2 b^T B b + c^T a``: the Hessian is ``diag(A, B)`` exactly."""

    def __init__(self, n_a: int = 6, n_b: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = nn.Parameter(torch.randn(n_a, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(n_b, generator=g, dtype=torch.float64))
        self.A = _symmetric(n_a, g, shift=0.0)
        self.B = _symmetric(n_b, g, shift=3.0)  # B's top eigenvalue is the larger one
        self.c = torch.randn(n_a, generator=g, dtype=torch.float64)

    def loss(self) -> torch.Tensor:
        return 0.5 * self.a @ self.A @ self.a + 0.5 * self.b @ self.B @ self.b + self.c @ self.a


def _symmetric(n: int, g: torch.Generator, shift: float) -> torch.Tensor:
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (m + m.T) / 2 + shift * torch.eye(n, dtype=torch.float64)


def _quadratic_loss(model, batch):
    return model.loss()


def _mlp(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _data(dtype=torch.float64, n: int = 32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _dense_hessian(model: nn.Module, batch) -> tuple[torch.Tensor, list[str]]:
    """The dense Hessian of the mean cross-entropy, rows in ``named_parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        values = dict(zip(names, torch.split(theta, [s.numel() for s in shapes])))
        values = {n: v.reshape(s) for (n, v), s in zip(values.items(), shapes)}
        return nn.functional.cross_entropy(functional_call(model, values, (batch[0],)), batch[1])

    return hessian(loss)(flat), names


def _index(model: nn.Module, names: list[str]) -> torch.Tensor:
    """Flat indices of the parameters ``names`` in ``named_parameters()`` order."""
    out, start = [], 0
    for name, p in model.named_parameters():
        if name in names:
            out.append(torch.arange(start, start + p.numel()))
        start += p.numel()
    return torch.cat(out)


def _monitor(model, batch, **options) -> CurvatureMonitor:
    options.setdefault("budget", BIG)
    options.setdefault("top_k", 1)
    options.setdefault("trace", False)
    if "loss_fn" not in options:
        options.setdefault("criterion", nn.CrossEntropyLoss())
    return CurvatureMonitor(model, batch, strict=True, **options)


# -- exact values ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_block_diagonal_quadratic_gives_each_blocks_top_eigenvalue(method):
    model = TwoQuadratics()
    monitor = _monitor(model, torch.zeros(1), loss_fn=_quadratic_loss, method=method, blocks={"a": "a", "b": "b"})
    result = monitor.measure(0)
    top_a = torch.linalg.eigvalsh(model.A)[-1].item()
    top_b = torch.linalg.eigvalsh(model.B)[-1].item()
    assert set(result.blocks) == {"a", "b"}
    assert result.blocks["a"].lambda_max == pytest.approx(top_a, rel=1e-4)
    assert result.blocks["b"].lambda_max == pytest.approx(top_b, rel=1e-4)
    assert result.lambda_max == pytest.approx(max(top_a, top_b), rel=1e-4)  # the whole: their maximum
    assert all(b.converged and b.hvps > 0 for b in result.blocks.values())
    assert math.isnan(result.blocks["a"].preconditioned_lambda_max)  # no optimizer, no threshold
    assert math.isnan(result.blocks["a"].sharpness_ratio)


def test_mlp_block_equals_top_eigenvalue_of_dense_hessian_sub_block():
    model, batch = _mlp(), _data()
    spec = {"first": "0.*", "middle": ["2.weight", "2.bias"], "weights": "*.weight"}  # overlapping blocks
    result = _monitor(model, batch, blocks=spec).measure(0)
    dense, _ = _dense_hessian(model, batch)
    whole = torch.linalg.eigvalsh(dense)[-1].item()
    assert result.lambda_max == pytest.approx(whole, rel=1e-6)
    for name, names in resolve_blocks(model, spec).items():
        idx = _index(model, names)
        exact = torch.linalg.eigvalsh(dense[idx][:, idx])[-1].item()
        assert result.blocks[name].lambda_max == pytest.approx(exact, rel=1e-6), name
        assert result.blocks[name].lambda_max <= whole * (1 + 1e-9)  # interlacing


def test_adam_block_preconditioned_sharpness_and_ratio():
    model, batch = _mlp(), _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
    spec = {"first": "0.*", "last": "4.*"}
    result = _monitor(model, batch, optimizer=opt, blocks=spec).measure(3)
    dense, _ = _dense_hessian(model, batch)
    loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
    excluded = 0
    for name, params in block_parameters(model, spec).items():
        idx = _index(model, resolve_blocks(model, spec)[name])
        gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        linear = adam_linear_diagonal(opt, params, gradient)  # P, and inf off Adam's linear set
        excluded += int(linear.isinf().sum())
        inv_sqrt = linear.rsqrt()
        exact = torch.linalg.eigvalsh(inv_sqrt[:, None] * dense[idx][:, idx] * inv_sqrt[None, :])[-1].item()
        block = result.blocks[name]
        assert block.preconditioned_lambda_max == pytest.approx(exact, rel=1e-6), name
        assert block.sharpness_ratio == pytest.approx(block.preconditioned_lambda_max / result.threshold, rel=1e-12)
        assert block.lambda_max == pytest.approx(
            torch.linalg.eigvalsh(dense[idx][:, idx])[-1].item(), rel=1e-6
        )
    assert excluded > 0  # 3 steps in, the set leaves coordinates out: the restriction is tested


def test_finite_differences_give_the_block_values_of_double_backward():
    model, batch = _mlp(torch.float32), _data(torch.float32)
    spec = {"first": "0.*", "middle": "2.*", "last": "4.*"}
    budget = Budget(max_hvps=400, trace_hvps=0, tol=1e-5, overhead=None)
    exact = _monitor(model, batch, method="double_backward", blocks=spec, budget=budget).measure(0)
    fd = _monitor(model, batch, method="finite_difference", blocks=spec, budget=budget).measure(0)
    assert fd.method == "finite_difference"
    for name in spec:
        assert fd.blocks[name].lambda_max == pytest.approx(exact.blocks[name].lambda_max, rel=1e-3), name


def test_sgd_ratio_uses_the_raw_block_sharpness():
    model, batch = _mlp(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = _monitor(model, batch, optimizer=opt, blocks="modules").measure(0)
    assert set(result.blocks) == {"0", "2", "4"}
    for block in result.blocks.values():
        assert math.isnan(block.preconditioned_lambda_max)
        assert block.sharpness_ratio == pytest.approx(block.lambda_max / result.threshold, rel=1e-12)


# -- patterns ----------------------------------------------------------------------------------
def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_layers_on_tiny_gpt2_gives_one_block_per_layer():
    model = _gpt2()
    blocks = resolve_blocks(model, "layers")
    assert list(blocks) == ["h.0", "h.1"]
    for i in range(2):
        expected = [n for n, _ in model.named_parameters() if n.startswith(f"transformer.h.{i}.")]
        assert blocks[f"h.{i}"] == expected and len(expected) == 12
    assert list(resolve_blocks(model, "modules")) == ["transformer"]  # lm_head is tied to wte
    attn = resolve_blocks(model, {"attn": "*.attn.*", "mlp": "*.mlp.*"})
    assert attn["attn"] == [n for n, _ in model.named_parameters() if ".attn." in n]


def test_layers_measured_on_tiny_gpt2():
    model = _gpt2()
    ids = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(0))
    result = _monitor(
        model, {"input_ids": ids, "labels": ids}, loss_fn=lambda m, b: m(**b).loss, blocks="layers",
        budget=Budget(max_hvps=200, trace_hvps=0, tol=1e-4, overhead=None),
    ).measure(0)
    assert set(result.blocks) == {"h.0", "h.1"}
    for block in result.blocks.values():
        assert block.converged and 0 < block.lambda_max <= result.lambda_max * (1 + 1e-3)


def test_modules_and_frozen_parameters():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    blocks = resolve_blocks(model, "modules")
    assert blocks == {"0": ["0.weight"], "2": ["2.weight", "2.bias"], "4": ["4.weight", "4.bias"]}
    with pytest.raises(CurvatureError, match=r"'0\.bias'.*only frozen ones"):
        resolve_blocks(model, {"frozen": "0.bias"})


def test_bad_pattern_names_the_pattern_and_shows_parameter_names():
    model, batch = _mlp(), _data()
    with pytest.raises(CurvatureError, match=r"pattern 'attn' of block 'x' matches no trainable parameter.*0\.weight"):
        _monitor(model, batch, blocks={"x": "attn"})
    with pytest.raises(CurvatureError, match="pattern '\\*.nothing' of block 'y'"):
        _monitor(model, batch, blocks={"ok": "0.*", "y": ["2.*", "*.nothing"]})


@pytest.mark.parametrize(
    "spec, match",
    [
        ("everything", "pass 'layers', 'modules'"),
        ({}, "names no block"),
        ({"a/b": "0.*"}, "without '/'"),
        ({"x": []}, "non-empty list"),
        ({"x": 3}, "not a pattern"),
    ],
)
def test_malformed_specs_are_refused(spec, match):
    with pytest.raises(CurvatureError, match=match):
        _monitor(_mlp(), _data(), blocks=spec)


def test_layers_without_a_stack_of_layers_is_refused():
    with pytest.raises(CurvatureError, match="found no stack of repeated layers"):
        _monitor(_mlp(), _data(), blocks="layers")


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_bad_blocks_every(every):
    with pytest.raises(CurvatureError, match="blocks_every"):
        _monitor(_mlp(), _data(), blocks="modules", blocks_every=every)


# -- budget, warm starts, schedule --------------------------------------------------------------
def test_blocks_share_the_products_budget_and_unreached_ones_are_nan():
    model, batch = _mlp(), _data()
    full = _monitor(model, batch, blocks="modules").measure(0)
    global_only = _monitor(model, batch).measure(0)
    limit = global_only.hvps + full.blocks["0"].hvps  # enough for the global values and the first block
    budget = Budget(max_hvps=limit, trace_hvps=0, tol=1e-7, overhead=None)
    with pytest.warns(CurvatureWarning, match=r"products ran out before blocks \['2', '4'\]"):
        result = _monitor(model, batch, blocks="modules", budget=budget).measure(0)
    assert result.hvps <= limit
    assert result.lambda_max == pytest.approx(full.lambda_max, rel=1e-6)  # the global values first
    assert result.blocks["0"].lambda_max == pytest.approx(full.blocks["0"].lambda_max, rel=1e-6)
    assert math.isnan(result.blocks["2"].lambda_max) and math.isnan(result.blocks["4"].lambda_max)
    assert "curvature/block/2/lambda_max" not in result.scalars()
    assert "curvature/block/0/lambda_max" in result.scalars()


def test_warm_starts_per_block_and_blocks_every():
    model, batch = _mlp(), _data()
    monitor = _monitor(model, batch, blocks="modules", blocks_every=2)
    first, second, third = monitor.measure(1), monitor.measure(2), monitor.measure(3)
    assert set(first.blocks) == {"0", "2", "4"} and second.blocks == {} and set(third.blocks) == {"0", "2", "4"}
    assert not any(tag.startswith("curvature/block/") for tag in second.scalars())
    for name in first.blocks:  # same weights: the warm start converges at once
        assert third.blocks[name].hvps < first.blocks[name].hvps
        assert third.blocks[name].lambda_max == pytest.approx(first.blocks[name].lambda_max, rel=1e-6)
    fresh = _monitor(model, batch, blocks="modules", blocks_every=2)
    fresh.load_state_dict(monitor.state_dict())
    assert fresh.measurements == 3
    fourth = fresh.measure(4)
    assert fourth.blocks == {}
    fifth = fresh.measure(5)
    assert all(fifth.blocks[n].hvps < first.blocks[n].hvps for n in first.blocks)  # warm starts restored



class _Stack(nn.Module):
    """Three repeated layers in an ``nn.ModuleList`` (what ``blocks="layers"`` finds) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, 3)
        self.double()

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


@pytest.mark.parametrize(
    ("spec", "frozen", "lost", "kept"),
    [
        ({"first": "layers.0.*", "rest": ["layers.1.*", "layers.2.*"]}, ("layers.0", "layers.1"), "first",
         {"rest": ["layers.2.weight", "layers.2.bias"]}),
        ("layers", ("layers.0",), "layers.0", {"layers.1": ["layers.1.weight", "layers.1.bias"],
                                               "layers.2": ["layers.2.weight", "layers.2.bias"]}),
        ("modules", ("head",), "head", {"layers": [f"layers.{i}.{n}" for i in (1, 2) for n in ("weight", "bias")]}),
    ],
    ids=["dict", "layers", "modules"],
)
def test_parameters_frozen_after_construction_keep_the_global_values_and_the_other_blocks(spec, frozen, lost, kept):
    model, batch = _Stack(), _data()
    monitor = CurvatureMonitor(model, batch, criterion=nn.CrossEntropyLoss(), budget=BIG, top_k=1, trace=False,
                               blocks=spec)
    assert lost in monitor.measure(1).blocks
    if spec == "modules":
        model.layers[0].requires_grad_(False)  # the "layers" block loses a part, the head all of its own
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    with pytest.warns(CurvatureWarning, match=rf"block '{lost}' has no trainable parameter now.*frozen"):
        second = monitor.measure(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        third = monitor.measure(3)

    dense, _ = _dense_hessian(model, batch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    idx = _index(model, trainable)
    whole = torch.linalg.eigvalsh(dense[idx][:, idx])[-1].item()
    for result in (second, third):
        assert result.lambda_max == pytest.approx(whole, rel=1e-6)  # the global values go on
        assert math.isnan(result.blocks[lost].lambda_max)
        assert f"curvature/block/{lost}/lambda_max" not in result.scalars()
        for name, names in kept.items():  # the other blocks re-resolve to their trainable parameters
            sub = _index(model, names)
            exact = torch.linalg.eigvalsh(dense[sub][:, sub])[-1].item()
            assert result.blocks[name].lambda_max == pytest.approx(exact, rel=1e-6), name


# -- logging -------------------------------------------------------------------------------------
def test_tensorboard_and_jsonl_sinks_write_the_block_tags(tmp_path):
    model, batch = _mlp(), _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()
    sink = TensorBoardSink(tmp_path / "run")
    jsonl = tmp_path / "run.jsonl"
    monitor = _monitor(model, batch, optimizer=opt, blocks={"attn": "0.*", "mlp": "4.*"},
                       sinks=[sink, JsonlSink(jsonl)])
    result = monitor.measure(7)
    sink.close()
    logged = curves(tmp_path / "run")
    for name in ("attn", "mlp"):
        for field in ("lambda_max", "preconditioned_lambda_max", "sharpness_ratio"):
            tag = f"curvature/block/{name}/{field}"
            assert logged[tag] == {7: pytest.approx(getattr(result.blocks[name], field), rel=1e-6)}, tag
    assert "curvature/lambda_max" in logged  # the global values stay
    (layout,) = layouts(tmp_path / "run")
    assert layout["blocks: preconditioned sharpness"] == ["curvature/block/[^/]+/preconditioned_lambda_max$"]
    record = json.loads(jsonl.read_text().splitlines()[0])
    assert record["blocks"]["mlp"]["lambda_max"] == pytest.approx(result.blocks["mlp"].lambda_max)
    assert record["scalars"]["curvature/block/mlp/lambda_max"] == pytest.approx(result.blocks["mlp"].lambda_max)


# -- FSDP2 ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)
def test_fsdp2_block_values_match_single_process(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(SCRIPTS / "dist_blocks.py"), "--out", str(tmp_path),
    ]
    ranks = run_ranks(command, tmp_path, 180)
    for rank in ranks:
        assert rank["method"] == "finite_difference"
        assert rank["params_exact"] and rank["grads_exact"]
        assert set(rank["sharded"]) == {"first", "hidden", "last"}
        for name, ref in rank["reference"].items():
            for got in (rank["sharded"][name], rank["second"][name]):
                for value, expected in zip(got[:3], ref[:3]):  # lambda_max, preconditioned, ratio
                    assert value == pytest.approx(expected, rel=1e-3), name
                assert got[4]  # converged
            assert rank["second"][name][3] < rank["sharded"][name][3]  # warm-started per block
    assert ranks[0]["sharded"] == ranks[1]["sharded"]  # same Lanczos on every rank


def test_framework_adapters_pass_blocks_through():
    from curvwatch.integrations._common import check_adapter_arguments

    check_adapter_arguments(100, None, None, False, "train", {"blocks": "layers", "blocks_every": 2}, ())
