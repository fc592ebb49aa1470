"""Lightning ``ModelParallelStrategy`` (FSDP2) on CPU, 2 processes, with ``CurvatureCallback``.

Run by tests/integrations/test_sharded_integrations.py (Lightning re-launches this script for rank 1):

    python tests/ddp_scripts/sharded_lightning.py --out DIR

The module shards its network with ``fully_shard`` over the strategy's
``data_parallel`` mesh in ``configure_model`` (DTensor parameters). The callback
gets the whole probe batch (each rank measures its half). TensorBoard events go
under ``DIR/tb/version_0`` (rank 0 only). Every rank writes ``DIR/rank{r}.json``
(its results, whether the parameters were DTensors and whether the monitor
reduces); rank 0 adds the final full weights measured as one process on the
whole probe batch (plain model, double backward): the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning_ddp import LR, MOMENTUM, VAL_BATCH, Classifier, make_data, whole_probe_batch
from torch.utils.data import DataLoader

from curvwatch import Budget, CurvatureMonitor
from curvwatch.integrations.lightning import CurvatureCallback

BUDGET = dict(max_hvps=60, trace_hvps=4, tol=1e-4, overhead=None)


class ShardedClassifier(Classifier):
    """The DDP test's classifier, its layers and the root sharded with FSDP2."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, val = make_data()
    probe = whole_probe_batch("batch")
    callback = CurvatureCallback(every=args.every, batch=probe, strict=True, budget=Budget(**BUDGET))
    module = ShardedClassifier()
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        devices=2, accelerator="cpu", max_steps=args.steps, callbacks=[callback],
        logger=TensorBoardLogger(args.out, name="tb", version=0), log_every_n_steps=1,
        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0,
    )
    trainer.fit(module, DataLoader(train, batch_size=16), DataLoader(val, batch_size=VAL_BATCH))
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}
    data = {
        "world_size": trainer.world_size,
        "dtensor": all(type(p).__name__ == "DTensor" for p in module.parameters()),
        "reduces": callback.monitor.reduce is not None,
        "history": [r.to_dict() for r in callback.monitor.history],
    }
    if trainer.global_rank == 0:
        plain = Classifier()
        plain.load_state_dict(full)
        reference = CurvatureMonitor(
            plain, probe, criterion=torch.nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(plain.parameters(), lr=LR, momentum=MOMENTUM),
            method="double_backward", budget=Budget(**BUDGET), strict=True,
        ).measure(args.steps)
        data["reference"] = reference.to_dict()
    with open(os.path.join(args.out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(data, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's threads sometimes abort the interpreter's teardown in torch 2.13
    # ("terminate called without an active exception"); the results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
