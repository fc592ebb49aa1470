"""FSDP on CUDA through the three integrations; run by tests/integrations/test_sharded_integrations.py (gpu).

    torchrun --nproc_per_node N tests/ddp_scripts/sharded_gpu.py --framework F --fsdp V --out DIR

``F`` is ``lightning`` (``FSDPStrategy``: FSDP1, ``use_orig_params=True``),
``accelerate`` (``FullyShardedDataParallelPlugin(fsdp_version=V)``) or
``transformers`` (``TrainingArguments(fsdp="full_shard", fsdp_config={"version": V})``).
Each trains the same small MLP (``forward(x, labels)`` returns the loss) for
``STEPS`` SGD updates with ``every=EVERY`` on the same probe batch, logging to
TensorBoard under ``DIR/tb`` (process zero). Every rank writes
``DIR/rank{r}.json``: whether the model was sharded, whether the monitor reduces
(it must not: the sharded operator reduces itself), and its results; rank 0 adds
the reference, the final full weights measured as one plain model on the whole
probe batch with exact double-backward products.

``--device cpu`` runs the same code without FSDP (DDP over gloo) to check the
script itself on a machine without a GPU; the tests never use it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

STEPS, EVERY, LR, MOMENTUM, BATCH = 10, 5, 0.1, 0.9, 16
BUDGET = dict(max_hvps=60, trace_hvps=4, tol=1e-4, overhead=None)


class Net(torch.nn.Module):
    """Tanh MLP; ``forward(x, labels)`` returns ``{"loss", "logits"}`` like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.body(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class Examples(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.labels = (self.x[:, 0] > 0).long() + (self.x[:, 1] + 0.5 * self.x[:, 2] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.labels[i]}


def probe() -> dict[str, torch.Tensor]:
    """The whole probe batch (32 examples), the same on every rank."""
    held_out = Examples(32, seed=2)
    return {"x": held_out.x, "labels": held_out.labels}


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch)["loss"]


def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full parameters of a (possibly FSDP1- or FSDP2-sharded) module, by their plain names."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    def plain(name: str) -> str:
        return name.replace("_fsdp_wrapped_module.", "")

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        with FullyShardedDataParallel.summon_full_params(module, writeback=False):
            return {plain(n): p.detach().clone().cpu() for n, p in module.named_parameters()}
    return {
        plain(n): (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().cpu()
        for n, p in module.named_parameters()
    }


def lightning(args):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.strategies import FSDPStrategy

    from curvwatch import Budget
    from curvwatch.integrations.lightning import CurvatureCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def forward(self, **batch):
            return self.net(**batch)

        def training_step(self, batch, batch_idx):
            loss = self.net(**batch)["loss"]
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)

    gpu = args.device == "cuda"
    callback = CurvatureCallback(every=EVERY, batch=probe(), loss_fn=loss_fn, strict=True, budget=Budget(**BUDGET))
    module = Module()
    trainer = pl.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=int(os.environ.get("WORLD_SIZE", 1)),
        strategy=FSDPStrategy(auto_wrap_policy={torch.nn.Linear}, use_orig_params=True) if gpu else "ddp",
        max_steps=STEPS, callbacks=[callback], logger=TensorBoardLogger(args.out, name="tb", version=""),
        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(Examples(STEPS * BATCH * trainer.world_size, 1), batch_size=BATCH))
    weights = {k.removeprefix("net."): v for k, v in full_weights(module).items()}
    return callback.monitor, weights, trainer.global_rank


def accelerate(args):
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from curvwatch import Budget
    from curvwatch.integrations.accelerate import watch

    plugin = None
    if args.device == "cuda":
        extra = {"use_orig_params": True, "sync_module_states": False} if args.fsdp == 1 else {}
        plugin = FullyShardedDataParallelPlugin(fsdp_version=args.fsdp, auto_wrap_policy="no_wrap", **extra)
    accelerator = Accelerator(cpu=args.device == "cpu", fsdp_plugin=plugin, log_with="tensorboard",
                              project_dir=args.out)
    accelerator.init_trackers("tb")
    model = Net()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM))
    loader = accelerator.prepare(
        torch.utils.data.DataLoader(Examples(STEPS * BATCH * accelerator.num_processes, 1), batch_size=BATCH)
    )
    monitor = watch(accelerator, model, optimizer, probe(), every=EVERY, loss_fn=loss_fn, strict=True,
                    budget=Budget(**BUDGET))
    for updates, batch in enumerate(loader, start=1):
        loss = model(**batch)["loss"]
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.log({"train_loss": loss.item()}, step=updates)
    weights = full_weights(model)
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    accelerator.end_training()
    return monitor, weights, accelerator.process_index


def transformers(args):
    from transformers import Trainer, TrainingArguments

    from curvwatch import Budget
    from curvwatch.integrations.huggingface import CurvatureTrainerCallback

    world = int(os.environ.get("WORLD_SIZE", 1))
    callback = CurvatureTrainerCallback(every=EVERY, batch=probe(), loss_fn=loss_fn, strict=True,
                                        budget=Budget(**BUDGET))
    fsdp = {}
    if args.device == "cuda":
        fsdp = {"fsdp": "full_shard", "fsdp_config": {"version": args.fsdp, "auto_wrap_policy": "NO_WRAP"}}
    trainer = Trainer(
        model=Net(),
        args=TrainingArguments(
            output_dir=os.path.join(args.out, "tb"), max_steps=STEPS, per_device_train_batch_size=BATCH,
            learning_rate=LR, lr_scheduler_type="constant", optim="sgd", optim_args=f"momentum={MOMENTUM}",
            max_grad_norm=0.0, logging_steps=1, report_to="tensorboard", save_strategy="no",
            use_cpu=args.device == "cpu", disable_tqdm=True, dataloader_num_workers=0, seed=0, **fsdp,
        ),
        train_dataset=Examples(STEPS * BATCH * world, 1),
        callbacks=[callback],
    )
    trainer.train()
    weights = {k.removeprefix("module."): v for k, v in full_weights(trainer.model_wrapped).items()}
    return callback.monitor, weights, trainer.args.process_index


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", choices=["lightning", "accelerate", "transformers"], required=True)
    parser.add_argument("--fsdp", type=int, choices=[1, 2], default=2)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from curvwatch import Budget, CurvatureMonitor
    from curvwatch.integrations._common import is_sharded

    monitor, weights, rank = {"lightning": lightning, "accelerate": accelerate, "transformers": transformers}[
        args.framework
    ](args)
    data = {
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "sharded": is_sharded(monitor.model),
        "reduces": monitor.reduce is not None,
        "history": [{**r.to_dict(), "spectrum": None} for r in monitor.history],
    }
    if rank == 0:
        plain = Net().to(args.device)
        plain.load_state_dict(weights)
        reference = CurvatureMonitor(
            plain, probe(), loss_fn=loss_fn, optimizer=torch.optim.SGD(plain.parameters(), lr=LR, momentum=MOMENTUM),
            method="double_backward", budget=Budget(**BUDGET), strict=True,
        ).measure(STEPS)
        data["reference"] = {**reference.to_dict(), "spectrum": None}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(data, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
