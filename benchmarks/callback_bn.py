"""Does the callback's BatchNorm re-estimation (``EigenDamagePruning(recalibrate_bn=...)``) help?

The converged networks of ``benchmarks/converged.py`` are fine-tuned in a Lightning ``fit`` (SGD
lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, shuffled, no augmentation, one thread) with
the callback pruning them to ``÷k`` FLOPs at optimizer step ``--at`` (factors from the
``--fisher-batches`` batches before it). Test accuracy (first 3,000 test images, eval mode, so
with the running BatchNorm statistics) is measured right after the round and after
``--after`` more optimizer steps, with the re-estimation on and off; every other setting and the
data order are the same. One record per (model, ÷k, setting) is appended to
``benchmarks/results/converged/callback_bn.jsonl`` with its command::

    python benchmarks/callback_bn.py --model resnet20-narrow --flops-x 4
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402

from benchmarks.converged import FINETUNE_LR, QUICK_TEST, RESULTS, accuracy, load_dense  # noqa: E402
from benchmarks.data import load_data  # noqa: E402
from lightning_eigendamage import EigenDamagePruning, PruningSchedule  # noqa: E402


class _Finetune(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=FINETUNE_LR, momentum=0.9, weight_decay=5e-4)


class _Probe(pl.Callback):
    """Test accuracy at the optimizer steps in ``at`` (after that step's batch, and after the
    pruning callback's round when it is listed after it)."""

    def __init__(self, at: set[int], x: torch.Tensor, y: torch.Tensor) -> None:
        self.at, self.x, self.y = at, x, y
        self.acc: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if step in self.at and step not in self.acc:
            self.acc[step] = accuracy(pl_module.net, self.x, self.y)
            pl_module.train()


def run(args: argparse.Namespace, recalibrate_bn: bool) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    data = load_data("fashion-mnist", root=args.data_root)
    net = load_dense(args.model).train()  # load_dense gives it in eval mode
    x, y = data.x_test[:QUICK_TEST], data.y_test[:QUICK_TEST]
    steps = [args.at + a for a in (0, *args.after)]
    probe = _Probe(set(steps), x, y)
    schedule = PruningSchedule(
        steps={args.at: 1.0 - 1.0 / args.flops_x}, target="flops", fisher_batches=args.fisher_batches
    )
    cb = EigenDamagePruning(
        schedule, recalibrate_bn=recalibrate_bn, seed=args.seed, verbose=False, structure="eigenbasis"
    )
    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=128,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    trainer = pl.Trainer(
        max_steps=max(steps),
        callbacks=[cb, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    torch.manual_seed(args.seed)
    t0 = time.time()
    trainer.fit(_Finetune(net), loader)
    report = cb.reports[0]
    return {
        "model": args.model,
        "flops_x": args.flops_x,
        "at_step": args.at,
        "fisher_batches": args.fisher_batches,
        "recalibrate_bn": recalibrate_bn,
        "seed": args.seed,
        "flops_reached_x": report.flops_before / max(report.flops_after, 1),
        "recalibrated_bn": len(report.recalibrated_bn),
        "acc_after_steps": {str(s - args.at): probe.acc[s] for s in steps},
        "seconds": round(time.time() - t0, 1),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/callback_bn.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=["resnet20-narrow", "vgg-narrow"])
    p.add_argument("--flops-x", type=float, default=4.0)
    p.add_argument("--at", type=int, default=10, help="the optimizer step the round follows")
    p.add_argument("--fisher-batches", type=int, default=10)
    p.add_argument("--after", type=int, nargs="+", default=[1, 3, 10, 30, 100])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default="data")
    args = p.parse_args(argv)
    for recalibrate_bn in (False, True):
        rec = run(args, recalibrate_bn)
        with open(RESULTS / "callback_bn.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
