"""Watch the curvature of a tiny GPT-2 trained with the Hugging Face ``Trainer``.

A 2-layer GPT-2 built from a config (nothing is downloaded) learns token
sequences drawn from a random bigram chain (each token has four likely
successors), with AdamW and a linear learning-rate decay, on a CPU in well
under a minute. One line is added to an ordinary Trainer script:
``callbacks=[CurvatureTrainerCallback(every=...)]``. The model keeps its default
attention implementation (SDPA); curvwatch measures it on the math backend,
which has the second derivative the fused kernels lack.

For AdamW the quantity that meets the edge of stability is the preconditioned
sharpness ``lambda_max(P^-1 H)``, against ``38 / lr`` (Cohen et al. 2022); as the
learning rate decays, the threshold rises. The raw sharpness ``lambda_max(H)``
and the trace are logged too.

The example measures at every due step, ``Budget(overhead=None)``. With the
default share (5% of training time) the table had one row, step 25, with
``nan`` for lambda_max, the ratio and the trace: one measurement of this tiny
model (26-35 products) costs about as much as 40 of its training steps (8
measurements took 11.0 s beside 6.7 s of training on a shared 2-core x86 VM),
so the share deferred every due step but the first and cut that one to 3-4
products, too few to certify an eigenvalue or reach the trace.

Run::

    python examples/huggingface_example.py --out runs/huggingface
    tensorboard --logdir runs/huggingface

The curves land in the Trainer's own TensorBoard run: SCALARS has
``train/loss``, ``train/learning_rate`` and every ``curvature/*`` curve on the
optimizer-step axis; CUSTOM SCALARS overlays the preconditioned sharpness with
its threshold. Every other ``report_to`` integration (``report_to=["tensorboard",
"wandb"]``, ``"mlflow"``, ...) gets the same values at the same steps, and
``trainer.state.log_history`` holds them next to the loss entries.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from curvwatch import Budget
from curvwatch.integrations.huggingface import CurvatureTrainerCallback

VOCAB, LENGTH = 128, 32


class BigramTokens(torch.utils.data.Dataset):
    """Sequences of a random bigram chain: learnable structure, no download."""

    def __init__(self, n: int, seed: int, chain_seed: int = 0) -> None:
        chain = torch.Generator().manual_seed(chain_seed)
        successors = torch.randint(0, VOCAB, (VOCAB, 4), generator=chain)
        g = torch.Generator().manual_seed(seed)
        ids = torch.empty(n, LENGTH, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
        for t in range(1, LENGTH):
            pick = torch.randint(0, 4, (n,), generator=g)
            ids[:, t] = successors[ids[:, t - 1], pick]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    """Train with the Trainer; curvature goes into its TensorBoard run under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/huggingface", help="Trainer output_dir (TensorBoard under runs/)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--every", type=int, default=25, help="measure every N optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak AdamW learning rate (linear decay)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (a model this small runs best on one)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
        bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)  # default attention: SDPA
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,  # the probe batch: the first evaluation batch
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=args.steps // 10,
        report_to="tensorboard",
        logging_steps=args.every,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    # every due step measured in full (see the module's docstring): the share would defer them
    callback = CurvatureTrainerCallback(every=args.every, budget=Budget(overhead=None, max_hvps=40, trace_hvps=8))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=BigramTokens(4096, seed=1),
        eval_dataset=BigramTokens(256, seed=2),
        callbacks=[callback],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start

    print(f"\n{'step':>5} {'lr':>9} {'lambda_max':>11} {'precond':>9} {'38/lr':>9} {'ratio':>6} {'trace':>9}")
    for r in callback.monitor.history:
        print(
            f"{r.step:5d} {r.lr:9.2e} {r.lambda_max:11.3f} {r.preconditioned_lambda_max:9.1f} "
            f"{r.threshold:9.1f} {r.sharpness_ratio:6.3f} {r.trace:9.2f}"
        )
    spent = sum(r.seconds for r in callback.monitor.history)
    print(f"\ntrained {args.steps} steps in {seconds:.1f} s, of which curvature {spent:.1f} s")
    print(f"tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
