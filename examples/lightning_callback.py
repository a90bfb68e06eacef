"""Prune a network while it trains: the ``EigenDamagePruning`` callback on a LightningModule.

    python examples/lightning_callback.py           # about 10 s on a CPU
    python examples/lightning_callback.py --tiny    # seconds (or EIGENDAMAGE_EXAMPLES_TINY=1)

A small CNN learns a synthetic 10-class image task. At the end of epoch 1 the callback removes
half of the network's FLOPs (``target="flops"``) with the curvature it measured during that
epoch, rebuilds the optimizer, and training goes on with the smaller network. The callback prints
the round's report; the script prints the accuracy and the parameter count, and saves the pruned weights to
``<out>/pruned.pt`` and the report to ``<out>/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eigendamage import EigenDamagePruning, PruningSchedule, enable_pruned_loading

TINY_ENV = "EIGENDAMAGE_EXAMPLES_TINY"


def make_data(n: int, size: int = 16, n_classes: int = 10, seed: int = 0) -> TensorDataset:
    """Noisy copies of one random template per class: learnable in a few epochs."""
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(n_classes, 3, size, size, generator=g)
    g.manual_seed(seed + 1)
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = templates[y] + 1.5 * torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(x, y)


def make_net(n_classes: int = 10, width: int = 32) -> nn.Sequential:
    """A plain CNN: conv-BN-ReLU blocks, global pooling, a classifier."""

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, width, 1),
        *block(width, 2 * width, 2),
        *block(2 * width, 2 * width, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, n_classes),
    )


class Classifier(pl.LightningModule):
    """Any image classifier, trained with SGD."""

    def __init__(self, width: int = 32, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net(width=width)
        # lets load_from_checkpoint / load_state_dict load a pruned checkpoint into a fresh model
        enable_pruned_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # called again after each round: the callback carries the optimizer state over
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, prune at the end of epoch 1 (epoch 0 with ``--tiny``), fine-tune; returns the numbers
    it printed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help=f"a few batches, 2 epochs (or {TINY_ENV}=1)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--flops-x", type=float, default=2.0, help="FLOPs target: dense / pruned")
    p.add_argument("--out", type=Path, default=Path("out/examples/lightning_callback"))
    args = p.parse_args(argv)
    tiny = args.tiny or os.environ.get(TINY_ENV, "") not in ("", "0")
    epochs, prune_epoch = (2, 0) if tiny else (args.epochs, 1)
    n_train, n_val = (96, 32) if tiny else (2048, 512)

    pl.seed_everything(0, verbose=False)
    train = DataLoader(make_data(n_train), batch_size=32, shuffle=True)
    val = DataLoader(make_data(n_val, seed=1), batch_size=64)
    model = Classifier()
    params_dense = sum(p.numel() for p in model.parameters())

    pruning = EigenDamagePruning(
        # remove 1 - 1/flops_x of the FLOPs at the end of `prune_epoch`, with factors from up to
        # 16 of that epoch's batches; structure="auto" (the default): whole channels where
        # Torch-Pruning can trace the model, the eigenbasis otherwise
        schedule=PruningSchedule(epochs={prune_epoch: 1 - 1 / args.flops_x}, target="flops"),
        verbose=True,  # print each round's report on the console (PruneReport.summary())
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[pruning],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not tiny,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    (before,) = trainer.validate(model, val, verbose=False)
    trainer.fit(model, train, val)
    (after,) = trainer.validate(model, val, verbose=False)

    report = pruning.reports[-1]  # one PruneReport per round; its summary() was printed above
    params_pruned = sum(p.numel() for p in model.parameters())
    print(
        f"\nval accuracy {before['val_acc']:.1%} untrained → {after['val_acc']:.1%} after {epochs} epochs; "
        f"params {params_dense:,} → {params_pruned:,}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "pruned.pt")
    (args.out / "report.json").write_text(json.dumps(report.to_dict(), indent=1))
    print(f"pruned weights: {args.out / 'pruned.pt'}; report: {args.out / 'report.json'}")
    return {
        "params_dense": params_dense,
        "params_pruned": params_pruned,
        "val_acc": after["val_acc"],
        "flops_x": report.flops_compression,
    }


if __name__ == "__main__":
    main()
