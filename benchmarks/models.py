"""The benchmark's model, data and training step: a GPT-2 built from its config.

Nothing is downloaded: the model comes from ``transformers.GPT2Config`` with
random weights, and the tokens from a random bigram language (each token has
four likely successors), so a few training steps give the loss some structure.
Dropout is off, so the training step and the (eval-mode) curvature measurement
see the same function.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Setup:
    """Model and batch shape of one benchmark mode."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    batch: int
    seq: int
    warmup_steps: int  # AdamW steps before anything is measured
    lr: float = 3e-4

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CPU = Setup("tiny GPT-2", n_layer=2, n_embd=128, n_head=4, vocab=1024, batch=8, seq=64, warmup_steps=30)
GPU = Setup("GPT-2 small", n_layer=12, n_embd=768, n_head=12, vocab=50257, batch=8, seq=256, warmup_steps=50, lr=1e-4)


class CausalLM(torch.nn.Module):
    """``model(input_ids) -> logits``: the HF model behind the plain API the peers expect."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


def lm_criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``criterion(outputs, targets)``: next-token cross-entropy (HF's shift, mean)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``loss_fn(model, batch)`` for curvwatch and hessian-eigenthings."""
    return lm_criterion(model(batch[0]), batch[1])


def build_model(setup: Setup, device: torch.device, seed: int = 0) -> CausalLM:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=setup.n_layer, n_embd=setup.n_embd, n_head=setup.n_head,
        vocab_size=setup.vocab, n_positions=setup.seq,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    return CausalLM(GPT2LMHeadModel(config)).to(device)


def bigram_batches(
    setup: Setup, count: int, device: torch.device, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches ``(ids, ids)`` of a fixed random bigram language."""
    table = torch.Generator().manual_seed(1234)  # the language: same for every seed
    successors = torch.randint(0, setup.vocab, (setup.vocab, 4), generator=table)
    weights = torch.tensor([0.55, 0.25, 0.15, 0.05])
    gen = torch.Generator().manual_seed(seed)
    rows = count * setup.batch
    ids = torch.empty(rows, setup.seq, dtype=torch.long)
    ids[:, 0] = torch.randint(0, setup.vocab, (rows,), generator=gen)
    for t in range(1, setup.seq):
        pick = torch.multinomial(weights, rows, replacement=True, generator=gen)
        ids[:, t] = successors[ids[:, t - 1], pick]
    ids = ids.to(device)
    return [(b, b) for b in ids.split(setup.batch)]


def make_optimizer(model: torch.nn.Module, setup: Setup) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.01)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch) -> torch.Tensor:
    """One forward + backward + AdamW step (gradients set to None first)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    return loss.detach()


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Copies of the model's and the optimizer's state, for :func:`restore`."""
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, copy.deepcopy(optimizer.state_dict())


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: tuple[dict, dict]) -> None:
    model.load_state_dict(state[0])
    optimizer.load_state_dict(copy.deepcopy(state[1]))
    optimizer.zero_grad(set_to_none=True)


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy (the CPU reference for lambda_max)."""
    return copy.deepcopy(model).double()
