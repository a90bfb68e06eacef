"""Demo: train a small CNN on scikit-learn's digits, prune it with EigenDamage, fine-tune.

    python benchmarks/demo_digits.py [--out out/]        (``make demo``)

Data: scikit-learn's bundled ``load_digits`` (1,797 8×8 grey images, no download), split once
into 1,437 training and 360 test images (stratified, ``random_state=0``).

1. Dense training: ``--epochs`` epochs of SGD (momentum 0.9, cosine LR).
2. Pruning and fine-tuning in one ``Trainer.fit`` with the ``EigenDamagePruning`` callback
   (true Fisher, FLOPs targets): one-shot pruning at the start of the fit removing 40 % of the
   FLOPs (factors from one pass over the training set), then 40 % of what is left at the end of
   fine-tuning epoch 2 and 30 % at the end of epoch 5 (factors from those epochs), fine-tuning
   to ``--finetune-epochs`` (SGD, cosine LR from ``--finetune-lr``).

Prints accuracy, parameters and FLOPs (per example, ``torch.utils.flop_counter``, 2 per
multiply-add) of the dense and of the pruned model, the per-layer table of each round, and saves
``layers.png`` (kept eigen-directions per layer) and ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eigendamage import EigenDamagePruning, PruningSchedule
from lightning_eigendamage.costs import count_flops, count_params


def digits_split(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The fixed train/test split: images ``(N, 1, 8, 8)`` scaled to [0, 1], integer labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=360, random_state=seed, stratify=y.numpy()
    )
    return TensorDataset(x[idx_train], y[idx_train]), TensorDataset(x[idx_test], y[idx_test])


def cnn(n_classes: int = 10) -> nn.Sequential:
    """Four 3×3 conv + BN + ReLU blocks (32, 64 | pool | 128, 128), global pooling, a classifier."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        *block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, n_classes),
    )


class DigitsClassifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05, epochs: int = 20) -> None:
        super().__init__()
        self.net = cnn()
        self.lr, self.epochs = lr, epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # Called again after every pruning round: build from self.parameters() here.
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs),
        }


@torch.no_grad()
def accuracy(model: nn.Module, ds: TensorDataset) -> float:
    """Test accuracy in percent, in eval mode (the model's mode is restored: Lightning 2.6 trains
    a model in whatever mode it is handed over)."""
    was_training = model.training
    model.eval()
    x, y = ds.tensors
    acc = float((model(x).argmax(1) == y).float().mean()) * 100
    model.train(was_training)
    return acc


def fit(model: pl.LightningModule, train: TensorDataset, epochs: int, callbacks: list) -> None:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))


def plot_layers(report_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in report_rows]
    pos = range(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    for ax, (orig, kept, title) in zip(
        axes,
        [("in_features", "kept_in", "input directions"), ("out_features", "kept_out", "output directions")],
    ):
        ax.bar(pos, [r[orig] for r in report_rows], color="#d0d7e1", label="dense width")
        ax.bar(pos, [r[kept] for r in report_rows], color="#3b6ea8", label="kept after pruning")
        for i, r in enumerate(report_rows):
            ax.text(i, r[kept], f"{r[kept]}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(pos), [f"{n}\n{r['form']}" for n, r in zip(names, report_rows)], fontsize=8)
        ax.set_title(f"kept {title} per layer")
        ax.set_ylabel("directions")
    axes[0].legend(fontsize=8)
    fig.suptitle("EigenDamage on digits: kept eigen-directions per layer (layer name, final form)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out", help="folder for layers.png and results.json")
    parser.add_argument("--epochs", type=int, default=20, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=20, help="epochs of the pruning fit")
    parser.add_argument("--finetune-lr", type=float, default=0.03, help="initial LR of the pruning fit")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pl.seed_everything(args.seed, verbose=False)
    start = time.perf_counter()

    train, test = digits_split()
    example = test.tensors[0][:1]
    model = DigitsClassifier(lr=0.05, epochs=args.epochs)
    fit(model, train, args.epochs, [])
    dense = {
        "accuracy": accuracy(model, test),
        "params": count_params(model),
        "flops": count_flops(model, example),
    }

    # Prune gradually: 40 % of the FLOPs at the start of the fit, 40 % of the rest after
    # fine-tuning epoch 2 and 30 % of the rest after epoch 5 (0.6·0.6·0.7 ≈ 1/4 kept), fine-tune.
    model.lr, model.epochs = args.finetune_lr, args.finetune_epochs
    schedule = PruningSchedule(at_start=0.4, epochs={2: 0.4, 5: 0.3}, target="flops")
    pruning = EigenDamagePruning(schedule=schedule, seed=args.seed)
    fit(model, train, args.finetune_epochs, [pruning])
    pruned = {
        "accuracy": accuracy(model, test),
        "params": count_params(model),
        "flops": count_flops(model, example),
    }

    print(f"\n{'model':<28} {'test acc':>9} {'params':>10} {'FLOPs/example':>14}")
    rows = [("dense", dense), ("pruned + fine-tuned", pruned)]
    for name, r in rows:
        print(f"{name:<28} {r['accuracy']:>8.2f}% {r['params']:>10,} {r['flops']:>14,}")
    print(
        f"FLOPs {dense['flops'] / pruned['flops']:.2f}× fewer, parameters "
        f"{dense['params'] / pruned['params']:.2f}× fewer, accuracy change "
        f"{pruned['accuracy'] - dense['accuracy']:+.2f} points "
        f"({args.epochs} dense epochs, {args.finetune_epochs} pruning/fine-tuning epochs, "
        f"{time.perf_counter() - start:.0f} s)"
    )

    # Per-layer kept directions after the last round (each layer's latest entry).
    final = {}
    for report in pruning.reports:
        for layer in report.layers:
            final[layer.name] = layer
    layer_rows = [
        {
            "name": r.name,
            "in_features": r.in_features,
            "out_features": r.out_features,
            "kept_in": r.kept_in,
            "kept_out": r.kept_out,
            "form": "not pruned" if r.skipped else r.form,
        }
        for r in final.values()
    ]
    plot_layers(layer_rows, out / "layers.png")
    results = {
        "dense": dense,
        "pruned": pruned,
        "flops_reduction": dense["flops"] / pruned["flops"],
        "param_reduction": dense["params"] / pruned["params"],
        "accuracy_change": pruned["accuracy"] - dense["accuracy"],
        "rounds": [r.to_dict() for r in pruning.reports],
        "args": vars(args),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"saved {out / 'layers.png'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
