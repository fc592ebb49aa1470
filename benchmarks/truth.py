"""Ground truth: every value the monitor reports, against an exact reference, at trained states.

Issue 22, item 5. Each case trains a model to a trained state; at every measurement of a
:class:`curvwatch.CurvatureMonitor` set up as a user would (``every=N``, ``top_k=2``,
``trace=False``, ``optimizer=`` given; ``maybe_measure`` after each optimizer step, which is what
``attach`` does) every value the monitor reports -- ``lambda_max``, each of the top-k eigenvalues,
``preconditioned_lambda_max`` for Adam-type optimizers, each block's values with ``--blocks`` --
is compared with an exact reference at the same state:

* a deep copy of the model in eval mode (the monitor's guard measures with dropout off), in
  float64 on a CPU and float32 without TF32 on a GPU, made between optimizer steps; the monitors'
  clocks are paused while it is made and used, so the reference never counts as training time in
  their share (``Budget.overhead``);
* the same probe batch and the same loss as the monitor (``model(**batch).loss`` for GPT-2,
  ``CrossEntropyLoss`` for the MLP), attention on the math SDPA backend;
* ``curvwatch.lanczos(HessianOperator(closure, params, method="double_backward"), k=top_k + 2,
  tol=1e-8, max_matvecs=300, seed=123)`` from a cold random start (GPU: tol 1e-6, 200 products),
  and the same on ``PreconditionedOperator(H, P)`` with ``P = sqrt(v_hat) + eps`` read from the
  optimizer (``curvwatch.preconditioner_diagonal``), restricted to Adam's linear set from the
  reference's own probe gradient (``curvwatch.optim.linearization``, the monitor's headline since
  issue 23; ``preconditioned_full``: on every coordinate) for the preconditioned value; each block on the
  Hessian restricted to its parameters;
* on small models (``--dense-max`` parameters) also the eigenvalues of the dense Hessian from
  ``torch.func`` (reverse over reverse), and at the first measurement of a case a second cold
  reference from another seed.

Two monitors watch the same run (``--monitors``): ``default`` is ``Budget()`` as shipped (a 5%
share of training time, 60 products), ``full`` is ``Budget(overhead=None)`` (every due step, 60
products). Each monitor's clock is paused while the other one measures.

For each quantity the report gives: values measured, how many certified (``converged`` and,
for the threshold's quantity, ``error_bound``), the worst relative error of a certified value,
and every certified value outside its stated bound (``|value - ref| > bound * |ref| + slack``,
``slack = the reference's own bound + --slack * |ref|``; column ``>bound``) or more than
``2 * Budget.tol`` off (column ``>2tol``, the issue's bar);
also every negative ``lambda_max``, every ``lambda_max != max(eigenvalues)``, every uncertified
value, and which of those were logged under ``curvature/`` (``result.scalars()``, what the sinks
write). ``--issue-case`` (on by default on the CPU) also reproduces issue 22's measurement:
untrained tiny GPT-2, ``Budget(max_hvps=20)``, ``measure(0)`` then ``measure(1)``.

CPU (one thread each; the cases are listed by ``--list``)::

    python benchmarks/truth.py --device cpu --threads 1 --case gpt2_tiny mlp_adam mlp_sgd \\
        --out benchmarks/results/truth_cpu_<date>.json
    python benchmarks/truth.py --device cpu --case gpt2_vocab50k --steps 600 --every 200 --monitors full
    python benchmarks/truth.py --quick ...          # a few steps per case (tests, smoke runs)

GPU (bf16-autocast AdamW, lr 6e-4, betas 0.9/0.95, wd 0.1, clipping 1.0)::

    python benchmarks/truth.py --device cuda --case gpt2_124m --out benchmarks/results/truth_<card>_124m.json
    python benchmarks/truth.py --device cuda --case gpt2_355m --out benchmarks/results/truth_<card>_355m.json
    python benchmarks/truth.py --device cuda --case gpt2_1.5b --out benchmarks/results/truth_<card>_1.5b.json

Writes the JSON after every measurement (a run cut short keeps what it measured) and prints a
table at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import curvwatch as cw  # noqa: E402
from curvwatch.blocks import block_parameters  # noqa: E402
from curvwatch.optim.linearization import restrict_to_linear_  # noqa: E402

# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One training run and its schedule of measurements."""

    name: str
    kind: str  # "gpt2" | "mlp"
    device: str  # "cpu" | "cuda"
    steps: int
    every: int
    quick_steps: int
    quick_every: int
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    momentum: float = 0.0
    clip: float | None = None
    warmup: int = 0  # linear warmup steps of the lr (then constant)
    bf16: bool = False  # bf16 autocast for training (GPU)
    # GPT-2
    vocab: int = 512
    n_positions: int = 64
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    language_tokens: int | None = None  # tokens of the bigram language (None: the whole vocabulary)
    batch: int = 8
    seq: int = 64
    # MLP on scikit-learn's digits
    hidden: tuple[int, ...] = (32, 32)
    train_batch: int = 0  # 0: full batch
    # measurements at these steps instead of every `every` (the 1.56B warm measurement)
    measure_at: tuple[int, ...] = ()
    quick_measure_at: tuple[int, ...] = ()
    blocks: str | None = None  # the monitors' blocks= (compared per block); --blocks overrides
    note: str = ""


CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("gpt2_tiny", "gpt2", "cpu", steps=600, every=50, quick_steps=12, quick_every=6,
             optimizer="adamw", lr=1e-3, weight_decay=0.01, blocks="layers",
             note="GPT2Config(vocab_size=512, n_positions=64, n_embd=128, n_layer=2, n_head=4), AdamW lr 1e-3 "
                  "wd 0.01, bigram language over the 512 tokens, batch 8x64, blocks='layers'"),
        Case("gpt2_vocab50k", "gpt2", "cpu", steps=600, every=100, quick_steps=4, quick_every=2,
             optimizer="adamw", lr=3e-3, weight_decay=0.1, vocab=50257, n_embd=64, n_layer=2, n_head=2,
             language_tokens=2000,
             note="2-layer GPT-2 with the full 50,257-token vocabulary, n_embd 64, 2 heads, AdamW wd 0.1 "
                  "lr 3e-3, bigram language over 2,000 of its tokens, batch 8x64"),
        Case("mlp_adam", "mlp", "cpu", steps=1000, every=50, quick_steps=40, quick_every=20,
             optimizer="adam", lr=3e-3, note="tanh MLP 64-32-32-10 on load_digits, full-batch Adam"),
        Case("mlp_sgd", "mlp", "cpu", steps=1000, every=50, quick_steps=40, quick_every=20,
             optimizer="sgd", lr=0.5, note="tanh MLP 64-32-32-10 on load_digits, full-batch GD (SGD, lr 0.5)"),
        Case("gpt2_124m", "gpt2", "cuda", steps=1500, every=250, quick_steps=20, quick_every=10,
             optimizer="adamw", lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, clip=1.0, warmup=100, bf16=True,
             vocab=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, batch=8, seq=512,
             note="GPT-2 124M, bf16-autocast AdamW lr 6e-4 (100 warmup steps), betas 0.9/0.95, wd 0.1, "
                  "clipping 1.0, bigram language over the whole vocabulary, batch 8x512"),
        Case("gpt2_355m", "gpt2", "cuda", steps=1500, every=250, quick_steps=20, quick_every=10,
             optimizer="adamw", lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, clip=1.0, warmup=100, bf16=True,
             vocab=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16, batch=4, seq=512,
             note="GPT-2 355M shape (24 x 1024, 16 heads), as gpt2_124m, batch 4x512 (fp32 double backward "
                  "at 8x512 needs about 80 GiB)"),
        Case("gpt2_1.5b", "gpt2", "cuda", steps=220, every=100, quick_steps=25, quick_every=5,
             optimizer="adamw", lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, clip=1.0, warmup=100, bf16=True,
             vocab=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25, batch=4, seq=512,
             measure_at=(200, 220), quick_measure_at=(5, 25),
             note="GPT-2 1.56B shape (48 x 1600, 25 heads), as gpt2_124m, batch 4x512; a first measurement "
                  "and a warm one 20 steps later"),
    )
}

# The monitors that watch a run: the library's defaults, and the same without the time share.
MONITORS = {  # name: (Budget keywords, CurvatureMonitor keywords)
    "default": ({}, {}),
    "full": ({"overhead": None}, {}),
    "full_fd": ({"overhead": None}, {"method": "finite_difference"}),  # central differences
    "full_forward": ({"overhead": None}, {"method": "forward_difference"}),  # one-sided, certified by central
}


# --------------------------------------------------------------------------------------------
# data and models
# --------------------------------------------------------------------------------------------


class BigramLanguage:
    """A fixed random bigram language: a sparse transition table over (part of) a vocabulary.

    Each of the language's tokens has ``successors`` successors, drawn once from a Zipf
    distribution over the language's tokens (so some tokens are frequent and many rare, as in
    text), taken with probabilities ``2^-j`` (normalized). Tokens are the vocabulary ids
    ``ids`` (a random subset when the language is smaller than the vocabulary). The entropy is
    about 1.4 nats per token, so the loss falls well below ``ln(vocab)`` as a model learns it.
    """

    def __init__(self, vocab: int, tokens: int | None = None, successors: int = 8, seed: int = 1234) -> None:
        tokens = vocab if tokens is None else min(tokens, vocab)
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randperm(vocab, generator=g)[:tokens] if tokens < vocab else torch.arange(vocab)
        self.zipf = 1.0 / torch.arange(1, tokens + 1, dtype=torch.float64)
        self.table = torch.multinomial(self.zipf, tokens * successors, replacement=True, generator=g)
        self.table = self.table.view(tokens, successors)
        self.probs = 0.5 ** torch.arange(successors, dtype=torch.float64)
        self.probs /= self.probs.sum()

    def sample(self, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
        """``(batch, seq)`` token ids."""
        state = torch.empty(batch, seq, dtype=torch.long)
        state[:, 0] = torch.multinomial(self.zipf, batch, replacement=True, generator=generator)
        picks = torch.multinomial(self.probs, batch * seq, replacement=True, generator=generator).view(batch, seq)
        for t in range(1, seq):
            state[:, t] = self.table[state[:, t - 1], picks[:, t]]
        return self.ids[state]


def gpt2_loss(call: Callable, batch: dict) -> torch.Tensor:
    """``model(**batch).loss``: what the monitor computes for a Hugging Face batch with labels."""
    return call(**batch).loss


def mlp_loss(call: Callable, batch: tuple) -> torch.Tensor:
    """``CrossEntropyLoss()(model(x), y)``: the monitor's ``criterion=`` path."""
    return torch.nn.functional.cross_entropy(call(batch[0]), batch[1])


@dataclass
class Setup:
    """A case built: model, optimizer, scheduler, data and the loss the monitor and reference use."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    next_batch: Callable[[int], Any]
    probe: Any
    loss: Callable[[Callable, Any], torch.Tensor]
    monitor_kwargs: dict[str, Any]
    blocks: Any = None


def build(case: Case, device: torch.device, blocks: Any, seed: int = 0) -> Setup:
    torch.manual_seed(seed)
    if case.kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=case.vocab, n_positions=case.n_positions, n_embd=case.n_embd,
            n_layer=case.n_layer, n_head=case.n_head,
        )
        if case.vocab < 50257:
            config.bos_token_id = config.eos_token_id = 0  # inside the vocabulary (a warning otherwise)
        model = GPT2LMHeadModel(config).to(device)
        model.train()
        language = BigramLanguage(case.vocab, case.language_tokens)
        train_gen = torch.Generator().manual_seed(seed + 1)
        probe_ids = language.sample(case.batch, case.seq, torch.Generator().manual_seed(seed + 2)).to(device)
        probe = {"input_ids": probe_ids, "labels": probe_ids}

        def next_batch(step: int) -> dict:
            ids = language.sample(case.batch, case.seq, train_gen).to(device)
            return {"input_ids": ids, "labels": ids}

        loss, monitor_kwargs = gpt2_loss, {}  # model(**batch).loss, the monitor's default
    elif case.kind == "mlp":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 2))
        probe_idx, train_idx = order[:400], order[400:]
        sizes = (64, *case.hidden, 10)
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(torch.nn.Tanh())
        model = torch.nn.Sequential(*layers).to(device)
        xt, yt = x[train_idx].to(device), y[train_idx].to(device)
        probe = (x[probe_idx].to(device), y[probe_idx].to(device))
        train_gen = torch.Generator().manual_seed(seed + 1)

        def next_batch(step: int) -> tuple:
            if case.train_batch <= 0:
                return xt, yt
            idx = torch.randint(0, len(yt), (case.train_batch,), generator=train_gen).to(device)
            return xt[idx], yt[idx]

        loss, monitor_kwargs = mlp_loss, {"criterion": torch.nn.CrossEntropyLoss()}
    else:
        raise ValueError(case.kind)
    if case.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=case.lr, betas=case.betas, weight_decay=case.weight_decay)
    elif case.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=case.lr, betas=case.betas, weight_decay=case.weight_decay)
    elif case.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=case.lr, momentum=case.momentum)
    else:
        raise ValueError(case.optimizer)
    warmup = case.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return Setup(model, opt, scheduler, next_batch, probe, loss, monitor_kwargs, blocks)


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, batch: Any, bf16: bool,
    clip: float | None,
) -> float:
    """One training step: the loss (under bf16 autocast where asked and on CUDA), backward, clipping, step."""
    optimizer.zero_grad(set_to_none=True)
    cuda = batch_device(batch).type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and cuda else contextlib.nullcontext():
        loss = loss_fn(model, batch)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(loss.detach())


def train_step(case: Case, s: Setup, batch: Any) -> float:
    loss = optimizer_step(s.model, s.optimizer, s.loss, batch, case.bf16, case.clip)
    s.scheduler.step()
    return loss


def batch_device(batch: Any) -> torch.device:
    t = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return t.device


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefConfig:
    dtype: torch.dtype
    tol: float
    max_matvecs: int
    seed: int = 123
    max_basis: int | None = None  # None: chosen from the size and the device
    dense_max: int = 4000  # dense torch.func Hessian for models with at most this many parameters
    live: bool = False  # compute on the live model (eval mode, modes restored) instead of a copy
    method: str = "double_backward"  # or "finite_difference" (central): where double backward does not fit


@contextlib.contextmanager
def exact_arithmetic(device: torch.device) -> Iterator[None]:
    """Math SDPA (double backward), no autocast, no TF32, gradients on."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, dict):
        return {k: cast_batch(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cast_batch(v, dtype) for v in batch)
    if isinstance(batch, torch.Tensor) and batch.is_floating_point():
        return batch.to(dtype)
    return batch


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def solve_summary(eig: cw.LanczosResult, seconds: float) -> dict[str, Any]:
    values = eig.eigenvalues.tolist()
    bounds = eig.error_bounds.tolist() if eig.error_bounds is not None else [math.inf] * len(values)
    return {
        "eigenvalues": values,
        "error_bounds": bounds,  # absolute, same units as the eigenvalues
        "relative_bounds": [b / max(abs(v), 1e-300) for v, b in zip(values, bounds)],
        "residuals": eig.residuals.tolist(),
        "converged": bool(eig.converged),
        "matvecs": int(eig.matvecs),
        "seconds": seconds,
    }


def lanczos_reference(op: cw.CurvatureOperator, k: int, cfg: RefConfig, seed: int | None = None) -> dict[str, Any]:
    n = op.size
    if cfg.max_basis is not None:
        max_basis, basis_device = cfg.max_basis, None
    elif op.device.type == "cpu":
        max_basis, basis_device = 40, None
    else:
        max_basis = 20 if n < 5e8 else 8  # 1.56B: 8 fp32 vectors of 6.2 GB, on the host when short
        free, _ = torch.cuda.mem_get_info(op.device)
        basis_device = "cpu" if n * 4 * (max_basis + k + 2) > 0.3 * free else None
    if op.device.type == "cuda":
        torch.cuda.synchronize(op.device)
    start = time.perf_counter()
    eig = cw.lanczos(
        op, k=min(k, n), tol=cfg.tol, max_matvecs=cfg.max_matvecs, seed=cfg.seed if seed is None else seed,
        max_basis=max(max_basis, k + 2), basis_device=basis_device,
    )
    if op.device.type == "cuda":
        torch.cuda.synchronize(op.device)
    return solve_summary(eig, time.perf_counter() - start)


@contextlib.contextmanager
def reference_model(model: torch.nn.Module, cfg: RefConfig) -> Iterator[torch.nn.Module]:
    """A copy of ``model`` in eval mode and the reference dtype (or the live model, modes restored)."""
    if cfg.live:
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            yield model
        finally:
            for m, mode in modes.items():
                m.training = mode
        return
    ref = copy.deepcopy(model).to(cfg.dtype).eval()
    try:
        yield ref
    finally:
        del ref
        gc.collect()


def reference(
    model: torch.nn.Module, optimizer: Any, loss: Callable, probe: Any, top_k: int, blocks: Any,
    cfg: RefConfig, second_seed: bool = False,
) -> dict[str, Any]:
    """Exact eigenvalues at the model's current state (raw, preconditioned, per block)."""
    device = next(model.parameters()).device
    started = time.perf_counter()
    live_params = trainable(model)
    diagonal = cw.preconditioner_diagonal(optimizer, live_params) if optimizer is not None else None
    out: dict[str, Any] = {
        "dtype": str(cfg.dtype).replace("torch.", ""), "tol": cfg.tol, "max_matvecs": cfg.max_matvecs,
        "seed": cfg.seed, "size": sum(p.numel() for p in live_params),
    }
    batch = cast_batch(probe, cfg.dtype)
    with exact_arithmetic(device), reference_model(model, cfg) as ref:
        params = trainable(ref)

        def closure() -> torch.Tensor:
            return loss(ref, batch)

        op = cw.HessianOperator(closure, params, method=cfg.method)
        out["loss"] = None
        out["raw"] = lanczos_reference(op, top_k + 2, cfg)
        out["loss"] = op.loss
        if second_seed:  # an independent cold start: the reference checked against itself
            out["raw_second_seed"] = lanczos_reference(op, top_k + 2, cfg, seed=cfg.seed + 1000)
        if diagonal is not None:  # the monitor's headline: on Adam's linear set (issue 23); then all of P
            whole = diagonal.to(cfg.dtype)
            diagonal = whole.clone()
            removed = restrict_to_linear_(diagonal, optimizer, live_params, op.gradient_at_theta())
            out["excluded_fraction"] = removed / diagonal.numel()
            out["preconditioned"] = lanczos_reference(cw.PreconditionedOperator(op, diagonal), 3, cfg)
            out["preconditioned_full"] = lanczos_reference(cw.PreconditionedOperator(op, whole), 3, cfg)
            del whole
        op.release()
        del op
        if sum(p.numel() for p in params) <= cfg.dense_max:
            out["dense"] = dense_reference(ref, loss, batch, diagonal, cfg)
        if blocks is not None:
            live_blocks = block_parameters(model, blocks)
            out["blocks"] = {}
            for name, bparams in block_parameters(ref, blocks).items():
                entry: dict[str, Any] = {"size": sum(p.numel() for p in bparams)}
                bop = cw.HessianOperator(closure, bparams, method=cfg.method)
                entry["raw"] = lanczos_reference(bop, 3, cfg)
                bdiag = cw.preconditioner_diagonal(optimizer, live_blocks[name]) if optimizer is not None else None
                if bdiag is not None:
                    bdiag = bdiag.to(cfg.dtype)
                    restrict_to_linear_(bdiag, optimizer, live_blocks[name], bop.gradient_at_theta())
                    entry["preconditioned"] = lanczos_reference(
                        cw.PreconditionedOperator(bop, bdiag.to(cfg.dtype)), 3, cfg
                    )
                bop.release()
                del bop
                out["blocks"][name] = entry
    del diagonal
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - started
    return out


def dense_reference(ref: torch.nn.Module, loss: Callable, batch: Any, diagonal, cfg: RefConfig) -> dict[str, Any]:
    """Eigenvalues of the dense Hessian from torch.func (reverse over reverse, chunked rows)."""
    from torch.func import functional_call, jacrev

    started = time.perf_counter()
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    params = [p.detach() for n, p in ref.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def f(theta: torch.Tensor) -> torch.Tensor:
        pieces = dict(zip(names, (t.view(s) for t, s in zip(theta.split(sizes), shapes))))

        def call(*args, **kwargs):
            return functional_call(ref, pieces, args, kwargs)

        return loss(call, batch)

    hessian = jacrev(jacrev(f), chunk_size=256)(flat)
    asymmetry = float((hessian - hessian.T).norm() / hessian.norm())
    hessian = (hessian + hessian.T) / 2
    out = {"eigenvalues_top": torch.linalg.eigvalsh(hessian).flip(0)[:6].tolist(), "asymmetry": asymmetry}
    if diagonal is not None:
        s = diagonal.to(hessian.dtype).rsqrt()
        out["preconditioned_top"] = torch.linalg.eigvalsh(s[:, None] * hessian * s[None, :]).flip(0)[:3].tolist()
    out["seconds"] = time.perf_counter() - started
    return out


def check_reference(ref: dict[str, Any]) -> dict[str, Any]:
    """How far the Lanczos reference is from the dense one and from its second seed (relative)."""
    checks: dict[str, Any] = {}
    raw = ref["raw"]["eigenvalues"]
    if "dense" in ref:
        dense = ref["dense"]["eigenvalues_top"]
        checks["dense_vs_lanczos_raw"] = max(abs(a - b) / abs(b) for a, b in zip(raw, dense))
        if "preconditioned" in ref and "preconditioned_top" in ref["dense"]:
            pre, dpre = ref["preconditioned"]["eigenvalues"], ref["dense"]["preconditioned_top"]
            checks["dense_vs_lanczos_preconditioned"] = max(abs(a - b) / abs(b) for a, b in zip(pre, dpre))
    if "raw_second_seed" in ref:
        other = ref["raw_second_seed"]["eigenvalues"]
        checks["second_seed_vs_first"] = max(abs(a - b) / abs(b) for a, b in zip(raw, other))
    return checks


# --------------------------------------------------------------------------------------------
# comparing a result with the reference
# --------------------------------------------------------------------------------------------


def compare_value(
    quantity: str, value: float, certified: bool, stated_bound: float, ref_solve: dict[str, Any] | None,
    index: int, tol: float, slack: float,
) -> dict[str, Any]:
    """One reported value against the reference's ``index``-th eigenvalue.

    ``stated_bound`` is relative (what the monitor states: ``error_bound`` for the threshold's
    quantity, ``Budget.tol`` for the values ``converged`` vouches for). A certified value is
    ``outside_bound`` when ``|value - ref| > stated_bound * |ref| + slack_abs`` and
    ``beyond_2tol`` when ``|value - ref| > 2 * tol * |ref| + slack_abs``, with ``slack_abs`` the
    reference's own error bound plus ``slack * |ref|`` (the monitor's float32 products).
    """
    entry: dict[str, Any] = {"quantity": quantity, "value": value, "certified": bool(certified),
                             "stated_bound": stated_bound}
    if ref_solve is None or index >= len(ref_solve["eigenvalues"]):
        entry["status"] = "no reference"
        return entry
    exact = ref_solve["eigenvalues"][index]
    ref_abs = ref_solve["error_bounds"][index]
    entry.update(reference=exact, reference_bound=ref_abs / max(abs(exact), 1e-300),
                 reference_converged=ref_solve["converged"])
    if value is None or not math.isfinite(value):
        entry["status"] = "not reported"
        return entry
    error = abs(value - exact)
    entry["rel_error"] = error / max(abs(exact), 1e-300)
    nearest = min(ref_solve["eigenvalues"], key=lambda e: abs(e - value))
    entry["nearest_reference"] = nearest
    slack_abs = (ref_abs if math.isfinite(ref_abs) else 0.0) + slack * abs(exact)
    entry["outside_bound"] = bool(
        certified and math.isfinite(stated_bound) and error > stated_bound * abs(exact) + slack_abs
    )
    entry["beyond_2tol"] = bool(certified and error > 2 * tol * abs(exact) + slack_abs)
    entry["status"] = "reference unconverged" if not ref_solve["converged"] else "compared"
    return entry


def result_fields(r: cw.CurvatureResult) -> dict[str, Any]:
    d = r.to_dict()
    d.pop("spectrum", None)
    d["blocks"] = {k: asdict(v) if not isinstance(v, dict) else v for k, v in r.blocks.items()}
    return d


def compare_result(r: cw.CurvatureResult, ref: dict[str, Any], tol: float, slack: float) -> dict[str, Any]:
    """Every value of one result against the reference, and the consistency flags."""
    adaptive = math.isfinite(r.preconditioned_lambda_max)
    logged = r.scalars()  # what the sinks write: tags under curvature/ are the curves
    comparisons, flags = [], []
    # per quantity: certified unless the result names it uncertified (CurvatureResult.uncertified)
    off = set(getattr(r, "uncertified", ()) or ())
    raw_ok = bool(r.converged) if not hasattr(r, "uncertified") else "lambda_max" not in off
    pre_ok = bool(r.converged) if not hasattr(r, "uncertified") else "preconditioned_lambda_max" not in off
    converged = pre_ok if adaptive else raw_ok  # the threshold's quantity

    def on_curves(name: str) -> bool:
        return name in logged and name.startswith("curvature/")

    # the top-k and lambda_max; error_bound is the threshold's quantity's (lambda_max without Adam)
    lm_bound = r.error_bound if not adaptive else tol
    comparisons.append(compare_value("lambda_max", r.lambda_max, raw_ok, lm_bound, ref["raw"], 0, tol, slack))
    for i, value in enumerate(r.eigenvalues):
        bound = lm_bound if i == 0 else tol
        comparisons.append(compare_value(f"lambda_{i + 1}", value, raw_ok, bound, ref["raw"], i, tol, slack))
    if adaptive or "preconditioned" in ref:
        comparisons.append(compare_value(
            "preconditioned_lambda_max", r.preconditioned_lambda_max, pre_ok, r.error_bound,
            ref.get("preconditioned"), 0, tol, slack,
        ))
    for name, block in r.blocks.items():
        bref = ref.get("blocks", {}).get(name, {})
        ok = bool(block.converged)
        comparisons.append(compare_value(f"block/{name}/lambda_max", block.lambda_max, ok, tol,
                                         bref.get("raw"), 0, tol, slack))
        if math.isfinite(block.preconditioned_lambda_max) or "preconditioned" in bref:
            comparisons.append(compare_value(f"block/{name}/preconditioned_lambda_max",
                                             block.preconditioned_lambda_max, ok, tol,
                                             bref.get("preconditioned"), 0, tol, slack))
    for c in comparisons:
        c["logged_on_curves"] = on_curves(f"curvature/{c['quantity']}")  # block/<name>/... as block_tag
        if c.get("value") is not None and math.isfinite(c["value"]) and not c["certified"]:
            flags.append({"flag": "uncertified", "quantity": c["quantity"], "value": c["value"],
                          "logged_on_curves": c["logged_on_curves"]})
    # the ratio follows its sharpness: logged while that is uncertified is an uncertified value too
    if on_curves("curvature/sharpness_ratio") and not converged:
        flags.append({"flag": "uncertified", "quantity": "sharpness_ratio", "value": r.sharpness_ratio,
                      "logged_on_curves": True})
    if math.isfinite(r.lambda_max) and r.lambda_max < 0:
        flags.append({"flag": "negative lambda_max", "value": r.lambda_max,
                      "logged_on_curves": on_curves("curvature/lambda_max")})
    finite = [e for e in r.eigenvalues if math.isfinite(e)]
    if finite and math.isfinite(r.lambda_max) and r.lambda_max != max(finite):
        flags.append({"flag": "lambda_max != max(eigenvalues)", "value": r.lambda_max, "eigenvalues": list(finite)})
    if any(a < b for a, b in zip(finite, finite[1:])):
        flags.append({"flag": "eigenvalues not descending", "eigenvalues": list(finite)})
    for name, block in r.blocks.items():
        if math.isfinite(block.lambda_max) and block.lambda_max < 0:
            flags.append({"flag": "negative block lambda_max", "block": name, "value": block.lambda_max})
    return {"comparisons": comparisons, "flags": flags}


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def pause_clock(monitor: cw.CurvatureMonitor, seconds: float) -> None:
    """Keep ``seconds`` of work that is neither training nor this monitor's out of its time share.

    The monitor counts the wall-clock time between its measurements as training
    (``OverheadAccount.training_until_now``); moving the account's last event forward by the
    time spent on the reference (or on another monitor) leaves it out.
    """
    account = getattr(monitor, "_cost", None)
    if account is not None and hasattr(account, "last") and math.isfinite(account.last):
        account.last += seconds


def quiet_peak(device: torch.device) -> None:
    """Forget allocator peaks that were no training step's (a monitor plans memory from them).

    Called after the reference and between two monitors' measurements, so that each monitor's
    memory plan sees what it would in a run of its own: the training steps' peak and its own.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def see_training_peak(monitors: Iterable[cw.CurvatureMonitor], device: torch.device) -> None:
    """Let every monitor read the training steps' peak before any of them measures.

    A monitor reads the allocator's peak when a measurement starts (``_observe_training_peak``;
    a monitor without it plans otherwise and needs nothing); the second of two monitors would
    read it after the peaks are reset between them, and see no training step.
    """
    if device.type != "cuda":
        return
    for monitor in monitors:
        observe = getattr(monitor, "_observe_training_peak", None)
        if callable(observe):
            observe(device)


def peak_gib(device: torch.device) -> float | None:
    """The allocator's peak since the last :func:`quiet_peak` (GPU), in GiB."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_case(case: Case, args: argparse.Namespace, writer: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train ``case``; at each measurement compare every monitor's values with the reference."""
    device = torch.device(args.device)
    steps = args.steps or (case.quick_steps if args.quick else case.steps)
    every = args.every or (case.quick_every if args.quick else case.every)
    if args.measure_at is not None:
        measure_at = tuple(args.measure_at)
    elif args.every:
        measure_at = ()
    else:
        measure_at = case.quick_measure_at if args.quick else case.measure_at
    blocks = case.blocks if args.blocks is None else (None if args.blocks == "none" else args.blocks)
    s = build(case, device, blocks, seed=args.seed)
    on_gpu = device.type == "cuda"
    tol = args.tol
    cfg = RefConfig(
        # float64 on the CPU, float32 on a GPU and for the live model (whose parameters are float32)
        dtype=getattr(torch, args.ref_dtype) if args.ref_dtype else (
            torch.float32 if on_gpu or args.ref_live else torch.float64
        ),
        tol=args.ref_tol or (1e-6 if on_gpu else 1e-8),
        max_matvecs=args.ref_max_matvecs or (200 if on_gpu else 300),
        live=args.ref_live,
        dense_max=args.dense_max,
        method=args.ref_method,
    )
    slack = args.slack if args.slack is not None else (1e-4 if on_gpu else 1e-5)
    monitors: dict[str, cw.CurvatureMonitor] = {}
    for name in args.monitors:
        budget_keywords, monitor_keywords = MONITORS[name]
        budget = cw.Budget(tol=tol, max_hvps=args.max_hvps, **budget_keywords)
        monitors[name] = cw.CurvatureMonitor(
            s.model, s.probe, every=every, top_k=args.top_k, trace=args.trace, budget=budget,
            optimizer=s.optimizer, blocks=blocks, **{**s.monitor_kwargs, **monitor_keywords},
        )
    record: dict[str, Any] = {
        "case": case.name, "note": case.note, "config": {k: v for k, v in asdict(case).items()},
        "steps": steps, "every": every, "measure_at": list(measure_at), "top_k": args.top_k,
        "trace": args.trace, "blocks": blocks, "budget_tol": tol, "slack": slack,
        "monitors": {n: {"budget": asdict(m.budget)} for n, m in monitors.items()},
        "reference": {"dtype": str(cfg.dtype), "tol": cfg.tol, "max_matvecs": cfg.max_matvecs, "seed": cfg.seed,
                      "live": cfg.live, "method": cfg.method},
        "size": sum(p.numel() for p in trainable(s.model)),
        "measurements": [], "warnings": [],
    }
    print(f"[{case.name}] {record['size']:,} parameters, {steps} steps, "
          f"measure {'at ' + str(list(measure_at)) if measure_at else 'every ' + str(every)}, "
          f"monitors {list(monitors)}", flush=True)
    train_seconds, losses = 0.0, []
    first = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, steps + 1):
            batch = s.next_batch(step)
            if on_gpu:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            losses.append(train_step(case, s, batch))
            if on_gpu:
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - t0
            due = (step in measure_at) if measure_at else (step % every == 0)
            if not due:
                continue
            entry: dict[str, Any] = {"step": step, "train_loss": losses[-1], "lr": s.optimizer.param_groups[0]["lr"],
                                     "monitors": {}}
            results: dict[str, cw.CurvatureResult | None] = {}
            entry["train_peak_GiB"] = peak_gib(device)  # the steps since the last measurement
            see_training_peak(monitors.values(), device)
            for index, (name, mon) in enumerate(monitors.items()):
                if index:
                    quiet_peak(device)  # the next monitor must not plan from the last one's peak
                before = len(caught)
                t0 = time.perf_counter()
                # what attach() does after the step; the 1.56B schedule measures at chosen steps
                results[name] = mon.measure(step, scheduled=True) if measure_at else mon.maybe_measure(step)
                spent = time.perf_counter() - t0
                for other in monitors.values():
                    if other is not mon:
                        pause_clock(other, spent)
                entry["monitors"][name] = {"wall_seconds": spent, "peak_GiB": peak_gib(device),
                                           "warnings": [str(w.message)[:400] for w in caught[before:]]}
            quiet_peak(device)
            t0 = time.perf_counter()
            s.optimizer.zero_grad(set_to_none=True)  # the next step does this anyway; frees memory for the copy
            if args.always_reference or any(r is not None for r in results.values()):
                try:
                    ref = reference(s.model, s.optimizer, s.loss, s.probe, args.top_k, blocks, cfg,
                                    second_seed=first and args.second_seed)
                    entry["reference_checks"] = check_reference(ref)
                except Exception as error:  # noqa: BLE001 - e.g. out of GPU memory: recorded, the run goes on
                    ref = {"error": f"{type(error).__name__}: {error}"[:600]}
                    print(f"[{case.name}] step {step}: reference failed: {ref['error']}", flush=True)
                first = False
                entry["reference"] = ref
                gc.collect()
                if on_gpu:
                    torch.cuda.empty_cache()
            ref_seconds = time.perf_counter() - t0
            entry["reference_peak_GiB"] = peak_gib(device)
            for mon in monitors.values():
                pause_clock(mon, ref_seconds)
            quiet_peak(device)
            for name, r in results.items():
                m = entry["monitors"][name]
                if r is None:
                    skipped = any("skipped" in w for w in m["warnings"])
                    m["status"] = "skipped (failed)" if skipped else "deferred (time share) or not measured"
                    continue
                m["status"] = "measured"
                m["result"] = result_fields(r)
                if "raw" in entry.get("reference", {}):
                    m.update(compare_result(r, entry["reference"], tol, slack))
                else:
                    m["status"] = "measured (no reference)"
            entry["train_seconds_so_far"] = train_seconds
            record["measurements"].append(entry)
            print_measurement(case.name, entry)
            record["summary"] = summarize(record)
            if writer is not None:
                writer(record)
        record["warnings"] = sorted({str(w.message)[:400] for w in caught})
    record["train_seconds"] = train_seconds
    record["seconds_per_step"] = train_seconds / max(steps, 1)
    record["final_train_loss"] = losses[-1] if losses else None
    record["summary"] = summarize(record)
    del s, monitors
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    if writer is not None:
        writer(record)
    return record


def print_measurement(case: str, entry: dict[str, Any]) -> None:
    ref = entry.get("reference", {})
    raw = ref.get("raw", {})
    pre = ref.get("preconditioned", {})
    if not raw:
        print(f"[{case}] step {entry['step']}: train loss {entry['train_loss']:.4f}; no reference "
              f"({ref.get('error', 'no monitor measured')})", flush=True)
    head = (f"[{case}] step {entry['step']}: train loss {entry['train_loss']:.4f}; exact top "
            f"{[round(v, 6) for v in raw.get('eigenvalues', [])]} ({raw.get('matvecs')} products, "
            f"{'converged' if raw.get('converged') else 'NOT converged'})")
    if pre:
        head += f"; preconditioned {pre['eigenvalues'][0]:.6g} ({pre['matvecs']} products)"
        full = ref.get("preconditioned_full")
        if full:
            head += (f" on the linear set ({ref['excluded_fraction']:.3g} of the coordinates left out), "
                     f"{full['eigenvalues'][0]:.6g} on all")
    if entry.get("reference_checks"):
        head += f"; checks {({k: f'{v:.1e}' for k, v in entry['reference_checks'].items()})}"
    if raw:
        print(head, flush=True)
    for name, m in entry["monitors"].items():
        if m["status"] != "measured":
            r = m.get("result")
            extra = "" if r is None else (f": lambda_max {r['lambda_max']:.6g}, preconditioned "
                                          f"{r['preconditioned_lambda_max']:.6g}, converged={r['converged']}")
            print(f"    {name}: {m['status']}{extra}", flush=True)
            continue
        r = m["result"]
        parts = [f"{c['quantity']} {c['value']:.6g} ({c.get('rel_error', math.nan):.1e}"
                 f"{', certified' if c['certified'] else ''}{' OUTSIDE BOUND' if c.get('outside_bound') else ''}"
                 f"{' >2tol' if c.get('beyond_2tol') else ''})"
                 for c in m["comparisons"] if c.get("value") is not None and math.isfinite(c["value"])]
        print(f"    {name}: {r['hvps']} products, {r['method']}, converged={r['converged']}, "
              f"error_bound {r['error_bound']:.2g}: " + "; ".join(parts), flush=True)
        for f in m["flags"]:
            if f["flag"] != "uncertified":
                print(f"      FLAG {f}", flush=True)


def summarize(record: dict[str, Any]) -> dict[str, Any]:
    """Per monitor and quantity: measured, certified, worst certified error, violations, flags."""
    summary: dict[str, Any] = {}
    for entry in record["measurements"]:
        for name, m in entry["monitors"].items():
            mon = summary.setdefault(name, {"measurements": 0, "not_measured": 0, "measured_without_reference": 0,
                                            "quantities": {},
                                            "negative_lambda_max": [], "lambda_max_not_max": [],
                                            "uncertified_on_curves": 0, "uncertified": 0})
            if m["status"] != "measured":
                mon["not_measured" if "result" not in m else "measured_without_reference"] += 1
                continue
            mon["measurements"] += 1
            for c in m["comparisons"]:
                if c.get("value") is None or not math.isfinite(c["value"]):
                    continue
                q = mon["quantities"].setdefault(c["quantity"], {
                    "measured": 0, "certified": 0, "worst_certified_rel_error": None,
                    "worst_uncertified_rel_error": None, "violations": [], "outside_bound": 0, "beyond_2tol": 0,
                    "reference_unconverged": 0,
                })
                q["measured"] += 1
                if c.get("status") == "reference unconverged":
                    q["reference_unconverged"] += 1
                err = c.get("rel_error")
                if c["certified"]:
                    q["certified"] += 1
                    if err is not None and (q["worst_certified_rel_error"] is None
                                            or err > q["worst_certified_rel_error"]):
                        q["worst_certified_rel_error"] = err
                    q["outside_bound"] += int(bool(c.get("outside_bound")))
                    q["beyond_2tol"] += int(bool(c.get("beyond_2tol")))
                    if c.get("outside_bound") or c.get("beyond_2tol"):
                        q["violations"].append({
                            "step": entry["step"], "value": c["value"], "reference": c.get("reference"),
                            "rel_error": err, "stated_bound": c["stated_bound"],
                            "outside_bound": c.get("outside_bound"), "beyond_2tol": c.get("beyond_2tol"),
                        })
                elif err is not None and (q["worst_uncertified_rel_error"] is None
                                          or err > q["worst_uncertified_rel_error"]):
                    q["worst_uncertified_rel_error"] = err
            for f in m["flags"]:
                if f["flag"] == "negative lambda_max":
                    mon["negative_lambda_max"].append({"step": entry["step"], "value": f["value"]})
                elif f["flag"] == "lambda_max != max(eigenvalues)":
                    mon["lambda_max_not_max"].append({"step": entry["step"], "value": f["value"],
                                                      "eigenvalues": f["eigenvalues"]})
                elif f["flag"] == "uncertified":
                    mon["uncertified"] += 1
                    mon["uncertified_on_curves"] += int(bool(f.get("logged_on_curves")))
    return summary


# --------------------------------------------------------------------------------------------
# issue 22's own case
# --------------------------------------------------------------------------------------------


def issue_case(cfg: RefConfig | None = None, tol: float = 1e-3) -> dict[str, Any]:
    """Issue 22's measurement: untrained tiny GPT-2 on random ids, ``Budget(max_hvps=20)``, measure(0), measure(1).

    Returns both results, the exact top eigenvalues (float64 reference) and ``measure1_ok``:
    ``measure(1)`` either reports not converged or is within ``2 * tol`` of the exact top eigenvalue.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = cfg or RefConfig(dtype=torch.float64, tol=1e-8, max_matvecs=300)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=128, n_layer=2, n_head=4))
    ids = torch.randint(0, 512, (8, 64))
    batch = {"input_ids": ids, "labels": ids}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor = cw.CurvatureMonitor(model, batch, every=1, top_k=1, trace=False, budget=cw.Budget(max_hvps=20))
        r0 = monitor.measure(0)
        r1 = monitor.measure(1)
    ref = reference(model, None, gpt2_loss, batch, top_k=2, blocks=None, cfg=cfg)
    exact = ref["raw"]["eigenvalues"][0]
    out: dict[str, Any] = {"reference": ref, "exact_top": exact,
                           "warnings": sorted({str(w.message)[:400] for w in caught})}
    for name, r in (("measure0", r0), ("measure1", r1)):
        if r is None:
            out[name] = None
            continue
        out[name] = {"lambda_max": r.lambda_max, "eigenvalues": list(r.eigenvalues), "converged": r.converged,
                     "error_bound": r.error_bound, "hvps": r.hvps, "method": r.method,
                     "rel_error": abs(r.lambda_max - exact) / abs(exact) if math.isfinite(r.lambda_max) else None,
                     "logged": {k: v for k, v in r.scalars().items() if k.startswith("curvature/")}}
    m1 = out["measure1"]
    out["measure1_ok"] = bool(m1 is not None and (not m1["converged"] or
                                                  abs(m1["lambda_max"] - exact) <= 2 * tol * abs(exact)))
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def table(out: dict[str, Any]) -> str:
    lines = []
    head = (f"{'case':<14} {'monitor':<8} {'quantity':<34} {'meas':>4} {'cert':>4} {'worst cert err':>14} "
            f"{'>bound':>6} {'>2tol':>5} {'worst uncert err':>16}")
    lines.append(head)
    lines.append("-" * len(head))
    for rec in out.get("cases", []):
        for mon, summ in rec.get("summary", {}).items():
            for q, v in summ["quantities"].items():
                w = v["worst_certified_rel_error"]
                u = v["worst_uncertified_rel_error"]
                lines.append(
                    f"{rec['case']:<14} {mon:<8} {q:<34} {v['measured']:>4} {v['certified']:>4} "
                    f"{_e(w):>14} {v['outside_bound']:>6} {v['beyond_2tol']:>5} {_e(u):>16}"
                )
            lines.append(
                f"{rec['case']:<14} {mon:<8} measured {summ['measurements']}, not measured {summ['not_measured']}; "
                f"uncertified values {summ['uncertified']} ({summ['uncertified_on_curves']} logged under curvature/); "
                f"negative lambda_max {len(summ['negative_lambda_max'])}; "
                f"lambda_max != max(eigenvalues) {len(summ['lambda_max_not_max'])}"
            )
    ic = out.get("issue_case")
    if ic:
        lines.append("")
        lines.append(f"issue 22 case: exact top {ic['exact_top']:.6f}")
        for name in ("measure0", "measure1"):
            m = ic.get(name)
            if m:
                lines.append(f"  {name}: lambda_max {m['lambda_max']:.6f}, converged={m['converged']}, "
                             f"error_bound {m['error_bound']:.2g}, {m['hvps']} products, "
                             f"rel error {m['rel_error']:.2e}")
        lines.append(f"  measure(1) certified-or-flagged: {'yes' if ic['measure1_ok'] else 'NO'}")
    return "\n".join(lines)


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def git_commit(root: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=root).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def meta(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.timing import machine

    info = machine(torch.device(args.device))
    root = Path(cw.__file__).resolve().parent.parent  # the tree the measured curvwatch comes from
    commit, dirty = None, None
    if (root / ".git").exists():
        commit = git_commit(root)
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "curvwatch"],
                                   capture_output=True, text=True, check=True, cwd=root).stdout.split("\n")
            dirty = [line for line in dirty if line.strip()]
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            # an exported tree (git archive HEAD) has no .git: CURVWATCH_COMMIT names what it was exported from
            "commit": os.environ.get("CURVWATCH_COMMIT") or commit,
            "curvwatch_file": cw.__file__, "curvwatch_uncommitted_changes": dirty,
            "argv": sys.argv, "args": {k: v for k, v in vars(args).items()}, "machine": info}


def write_json(path: Path, out: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.dtype):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads. Default 1")
    p.add_argument("--case", nargs="+", default=None, help="cases to run (default: the device's); --list names them")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="recompute the summaries of a results file, rewrite it and print its table; run nothing")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/truth_<device>_<date>.json)")
    p.add_argument("--append", action="store_true",
                   help="keep the other cases (and the issue case) already in --out: several runs, one file")
    p.add_argument("--quick", action="store_true", help="few steps per case (tests, smoke runs)")
    p.add_argument("--steps", type=int, default=None, help="training steps (overrides the case's)")
    p.add_argument("--every", type=int, default=None, help="measure every N steps (overrides the case's)")
    p.add_argument("--measure-at", type=int, nargs="*", default=None, help="measure at these steps instead")
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (GPT-2 cases)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (GPT-2 cases)")
    p.add_argument("--monitors", default="default,full",
                   help="comma-separated monitors on the run: default (Budget() as shipped: 5%% share) and/or "
                        "full (Budget(overhead=None)). Default both")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--trace", action="store_true", help="monitors also estimate the trace (not compared)")
    p.add_argument("--blocks", default=None,
                   help="blocks= for the monitors (e.g. layers; none: off); default the case's (gpt2_tiny: layers)")
    p.add_argument("--max-hvps", type=int, default=60, help="Budget.max_hvps of the monitors. Default 60")
    p.add_argument("--tol", type=float, default=1e-3, help="Budget.tol of the monitors. Default 1e-3")
    p.add_argument("--ref-tol", type=float, default=None, help="reference tol (default 1e-8 CPU, 1e-6 GPU)")
    p.add_argument("--ref-max-matvecs", type=int, default=None, help="reference products (default 300 CPU, 200 GPU)")
    p.add_argument("--ref-dtype", choices=("float32", "float64"), default=None,
                   help="reference dtype (default float64 on the CPU, float32 on a GPU)")
    p.add_argument("--second-seed", choices=("auto", "yes", "no"), default="auto",
                   help="a second cold reference from another seed at a case's first measurement (auto: CPU)")
    p.add_argument("--ref-live", action="store_true",
                   help="reference on the live model in eval mode (no copy: GPU memory) instead of a copy")
    p.add_argument("--ref-method", choices=("double_backward", "finite_difference"), default="double_backward",
                   help="reference products: exact (default) or central differences (memory of a gradient; "
                        "less accurate, and unreliable for the preconditioned value at trained states)")
    p.add_argument("--always-reference", action="store_true",
                   help="compute the reference also where no monitor measured (deferred or failed)")
    p.add_argument("--dense-max", type=int, default=4000, help="dense Hessian check up to this many parameters")
    p.add_argument("--slack", type=float, default=None,
                   help="relative slack of the bound checks (float32 products); default 1e-5 CPU, 1e-4 GPU (TF32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--issue-case", choices=("auto", "yes", "no"), default="auto",
                   help="reproduce issue 22's tiny GPT-2 measurement (auto: on the CPU)")
    args = p.parse_args(argv)
    args.monitors = [m.strip() for m in args.monitors.split(",") if m.strip()]
    args.second_seed = args.second_seed == "yes" or (args.second_seed == "auto" and args.device == "cpu")
    if args.ref_live and args.ref_dtype == "float64":
        p.error("--ref-live measures the live float32 model: drop --ref-dtype float64")
    for m in args.monitors:
        if m not in MONITORS:
            p.error(f"unknown monitor {m!r}; choose from {list(MONITORS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report:
        path = Path(args.report)
        out = json.loads(path.read_text())
        for record in out.get("cases", []):
            record["summary"] = summarize(record)
        write_json(path, out)
        print(table(out), flush=True)
        return out
    if args.list:
        for c in CASES.values():
            print(f"{c.name:<14} {c.device:<5} {c.steps:>5} steps, every {c.every}: {c.note}")
        return {}
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    names = args.case or [c.name for c in CASES.values() if c.device == args.device]
    for n in names:
        if n not in CASES:
            raise SystemExit(f"unknown case {n!r}; --list names them")
    date = datetime.date.today().isoformat()
    path = Path(args.out or f"benchmarks/results/truth_{args.device}_{date}.json")
    out: dict[str, Any] = {"meta": meta(args), "cases": []}
    if args.append and path.exists():
        previous = json.loads(path.read_text())
        out["runs"] = previous.get("runs", [previous.get("meta")]) + [out["meta"]]
        out["cases"] = [r for r in previous.get("cases", []) if r["case"] not in names]
        if "issue_case" in previous:
            out["issue_case"] = previous["issue_case"]
    if args.device == "cuda":
        out["meta"]["card"] = torch.cuda.get_device_name()

    def writer(record: dict[str, Any]) -> None:
        out["cases"] = [r for r in out["cases"] if r is not record and r["case"] != record["case"]] + [record]
        write_json(path, out)

    run_issue = args.issue_case == "yes" or (args.issue_case == "auto" and args.device == "cpu")
    if run_issue:
        print("[issue case] untrained tiny GPT-2, Budget(max_hvps=20), measure(0), measure(1)", flush=True)
        out["issue_case"] = issue_case(tol=args.tol)
        write_json(path, out)
        print(table({"issue_case": out["issue_case"]}), flush=True)
    for n in names:
        case = CASES[n]
        if case.device != args.device:
            print(f"note: {n} is a {case.device} case, run here on {args.device}", flush=True)
        if args.batch or args.seq:
            case = replace(case, batch=args.batch or case.batch, seq=args.seq or case.seq,
                           n_positions=max(case.n_positions, args.seq or 0))
        run_case(case, args, writer)
    out["meta"]["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_json(path, out)
    print(f"\nwrote {path}\n" + table(out), flush=True)
    return out


if __name__ == "__main__":
    main()
