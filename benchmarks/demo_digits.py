"""Demo: train a small CNN on scikit-learn's digits, prune it with EigenDamage, fine-tune.

    python benchmarks/demo_digits.py [--out out/]        (``make demo``)

Data: scikit-learn's bundled ``load_digits`` (1,797 8×8 grey images, no download), split once
into 1,437 training and 360 test images (stratified, ``random_state=0``).

1. Dense training: ``--epochs`` epochs of SGD (momentum 0.9, cosine LR).
2. Pruning and fine-tuning in one ``Trainer.fit`` with the ``EigenDamagePruning`` callback
   (true Fisher, FLOPs targets): one-shot pruning at the start of the fit removing 40 % of the
   FLOPs (factors from the first 16 training batches, ``fisher_batches``' default), then 40 % of
   what is left at the end of fine-tuning epoch 2 and 30 % at the end of epoch 5 (factors from
   those epochs), fine-tuning to ``--finetune-epochs`` (SGD, cosine LR from ``--finetune-lr``).

Prints accuracy, parameters, FLOPs (per example, ``torch.utils.flop_counter``, 2 per
multiply-add) and measured CPU latency of the dense and of the pruned model, the per-layer table of
each round, and saves ``layers.png`` (kept eigen-directions per layer) and ``results.json`` under
``--out``.

Latency: a copy of the dense model is kept before pruning, and both models are timed in this
process on test images at each ``--latency-batches`` size (default 1 and 64), in eval mode under
``torch.inference_mode`` with the script's thread count (at most 2), after a warm-up. Each timing
is a loop of forwards long enough to take at least ``--latency-min-ms`` for the dense model (the
same number of calls for both), dense and pruned timings alternate (their order swapped every
repeat), and the median of ``--latency-repeats`` timings per model is reported as milliseconds per
forward call.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
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


def latency_ms(
    models: dict[str, nn.Module], x: torch.Tensor, repeats: int, min_ms: float = 50.0
) -> dict[str, float]:
    """Median milliseconds per forward of each model on ``x``: eval mode, ``torch.inference_mode``,
    a warm-up, then ``repeats`` rounds in which every model is timed once (the order reversed every
    other round). A timing loops ``calls`` forwards, ``calls`` chosen so that the first model's loop
    takes at least ``min_ms``. Training flags are restored afterwards."""
    modes = {m: m.training for model in models.values() for m in model.modules()}
    times: dict[str, list[float]] = {k: [] for k in models}
    try:
        with torch.inference_mode():
            for model in models.values():
                model.eval()
                for _ in range(3):
                    model(x)
            first = next(iter(models.values()))
            t = time.perf_counter()
            first(x)
            calls = max(1, math.ceil(min_ms / 1e3 / max(time.perf_counter() - t, 1e-7)))
            order = list(models.items())
            for i in range(repeats):
                for name, model in order if i % 2 == 0 else order[::-1]:
                    t = time.perf_counter()
                    for _ in range(calls):
                        model(x)
                    times[name].append((time.perf_counter() - t) / calls)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


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


def plot_layers(report_rows: list[dict], path: Path, structure: str = "eigenbasis") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in report_rows]
    unit = "directions" if structure == "eigenbasis" else "channels"
    pos = range(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    for ax, (orig, kept, title) in zip(
        axes,
        [("in_features", "kept_in", f"input {unit}"), ("out_features", "kept_out", f"output {unit}")],
    ):
        ax.bar(pos, [r[orig] for r in report_rows], color="#d0d7e1", label="dense width")
        ax.bar(pos, [r[kept] for r in report_rows], color="#3b6ea8", label="kept after pruning")
        for i, r in enumerate(report_rows):
            ax.text(i, r[kept], f"{r[kept]}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(pos), [f"{n}\n{r['form']}" for n, r in zip(names, report_rows)], fontsize=8)
        ax.set_title(f"kept {title} per layer")
        ax.set_ylabel(unit)
    axes[0].legend(fontsize=8)
    what = "eigen-directions" if structure == "eigenbasis" else "channels"
    fig.suptitle(f"EigenDamage on digits ({structure}): kept {what} per layer (layer name, final form)")
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
    parser.add_argument(
        "--structure",
        default=None,
        choices=["auto", "channels", "eigenbasis"],
        help="what the callback removes (default: the callback's default)",
    )
    parser.add_argument(
        "--latency-batches", type=int, nargs="+", default=[1, 64], help="batch sizes of the latency timings"
    )
    parser.add_argument("--latency-repeats", type=int, default=21, help="timings per model and batch size")
    parser.add_argument(
        "--latency-min-ms", type=float, default=50.0, help="minimum duration of one timing (dense model)"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    threads = torch.get_num_threads()
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
    dense_model = copy.deepcopy(model)  # kept for the latency comparison

    # Prune gradually: 40 % of the FLOPs at the start of the fit, 40 % of the rest after
    # fine-tuning epoch 2 and 30 % of the rest after epoch 5 (0.6·0.6·0.7 ≈ 1/4 kept), fine-tune.
    model.lr, model.epochs = args.finetune_lr, args.finetune_epochs
    schedule = PruningSchedule(at_start=0.4, epochs={2: 0.4, 5: 0.3}, target="flops")
    structure = {} if args.structure is None else {"structure": args.structure}
    pruning = EigenDamagePruning(schedule=schedule, seed=args.seed, **structure)
    fit(model, train, args.finetune_epochs, [pruning])
    pruned = {
        "accuracy": accuracy(model, test),
        "params": count_params(model),
        "flops": count_flops(model, example),
    }
    # CPU latency of both models, measured here, interleaved (see the module docstring).
    batches = args.latency_batches
    for bs in batches:
        x = test.tensors[0][:bs]
        if len(x) < bs:  # more than the 360 test images: repeat them
            x = x.repeat(math.ceil(bs / len(x)), 1, 1, 1)[:bs]
        t = latency_ms({"dense": dense_model, "pruned": model}, x, args.latency_repeats, args.latency_min_ms)
        dense.setdefault("latency_ms", {})[bs] = t["dense"]
        pruned.setdefault("latency_ms", {})[bs] = t["pruned"]

    lat_head = "".join(f"{f'ms @{bs}':>10}" for bs in batches)
    print(f"\n{'model':<28} {'test acc':>9} {'params':>10} {'FLOPs/example':>14}{lat_head}")
    rows = [("dense", dense), ("pruned + fine-tuned", pruned)]
    for name, r in rows:
        lat = "".join(f"{r['latency_ms'][bs]:>10.3f}" for bs in batches)
        print(f"{name:<28} {r['accuracy']:>8.2f}% {r['params']:>10,} {r['flops']:>14,}{lat}")
    speedups = {bs: dense["latency_ms"][bs] / pruned["latency_ms"][bs] for bs in batches}
    print(
        "latency: "
        + ", ".join(f"batch {bs} {speedups[bs]:.2f}× faster" for bs in batches)
        + f" (CPU, {threads} thread(s), eval, torch.inference_mode; median of {args.latency_repeats} "
        "interleaved timings per model, milliseconds per forward call)"
    )
    print(
        f"FLOPs {dense['flops'] / pruned['flops']:.2f}× fewer, parameters "
        f"{dense['params'] / pruned['params']:.2f}× fewer, accuracy change "
        f"{pruned['accuracy'] - dense['accuracy']:+.2f} points "
        f"({args.epochs} dense epochs, {args.finetune_epochs} pruning/fine-tuning epochs, "
        f"{time.perf_counter() - start:.0f} s)"
    )

    # Per layer: its widths before the first round, what it kept after the last.
    first, final = {}, {}
    for report in pruning.reports:
        for layer in report.layers:
            first.setdefault(layer.name, layer)
            final[layer.name] = layer
    layer_rows = [
        {
            "name": r.name,
            "in_features": first[r.name].in_features,
            "out_features": first[r.name].out_features,
            "kept_in": r.kept_in,
            "kept_out": r.kept_out,
            "form": "not pruned" if r.skipped else r.form,
        }
        for r in final.values()
    ]
    plot_layers(layer_rows, out / "layers.png", pruning.structure)
    results = {
        "dense": dense,
        "pruned": pruned,
        "flops_reduction": dense["flops"] / pruned["flops"],
        "param_reduction": dense["params"] / pruned["params"],
        "accuracy_change": pruned["accuracy"] - dense["accuracy"],
        "latency": {"threads": threads, "repeats": args.latency_repeats, "speedup": speedups},
        "structure": pruning.structure,
        "rounds": [r.to_dict() for r in pruning.reports],
        "args": vars(args),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"saved {out / 'layers.png'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
