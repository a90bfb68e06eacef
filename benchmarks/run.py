"""Benchmark runner: pretrain (cached), prune to a FLOPs target, refresh BatchNorm, fine-tune, record.

    python benchmarks/run.py --dataset fashion-mnist --model resnet20-narrow --preset cpu \\
        --method eigendamage kron-obs l1 --flops-x 2 4 8 --seed 0

One JSON record per (method, FLOPs target, seed) is written to ``--out``/records/ as soon as that
run ends; a run whose record exists is skipped (``--force`` redoes it). Tables and plots come from
the records: ``python benchmarks/tables.py --records <out>/records --out <dir>``.

Protocol, identical for every method (docs/method.md §8 and §10):

1. Pretraining (SGD, momentum 0.9, step decay ×0.1 at 50 % and ×0.01 at 75 % of the steps), cached
   under ``--cache`` and shared by every method; Network Slimming gets its own pretraining with the
   L1 penalty ``λ Σ|γ|`` on BatchNorm scales (also cached).
2. Pruning to ``1/k`` of the dense FLOPs (``--flops-x k``; per example, 2 per multiply-add,
   ``torch.utils.flop_counter`` in eval mode). Curvature / gradients from the same
   ``--fisher-batches`` training batches (true Fisher, targets sampled with the run's seed).
   EigenDamage one-shot: ``prune(target="flops", ratio=1-1/k)``; iterative: the
   ``EigenDamagePruning`` callback with three FLOPs-target rounds (at the start, after 1/6 and 1/3
   of the fine-tuning steps, before the first LR drop) that compound to ``1/k``; the baselines and peers:
   ``benchmarks.baselines_tp.prune_baseline(target="flops")``.
3. BatchNorm statistics recomputed on ``--bn-batches`` training batches (after the one-shot prune,
   after each iterative round, and after fine-tuning).
4. The same fine-tuning budget (``--finetune-epochs``, LR schedule) for every method.
5. Final test accuracy on the full test set (the best epoch's accuracy is recorded beside it,
   labelled: picking it would be selection on the test set), parameters, FLOPs, and the measured
   eval speed-up at batch 64 (median of interleaved repeats, dense vs pruned, this process's threads).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.data import DATASETS, Data, DataMissingError, augment_batch, load_data  # noqa: E402
from benchmarks.models import VGG, MobileNetV2Cifar, ResNetCifar  # noqa: E402
from lightning_eigendamage import EigenDamagePruning, PruningSchedule, prune  # noqa: E402
from lightning_eigendamage.costs import count_flops, count_params  # noqa: E402

BASELINES = ("c-obd", "c-obs", "kron-obd", "kron-obs", "slimming", "l1", "l2", "taylor")
METHODS = ("eigendamage", "eigendamage-iter") + BASELINES
# VGG for small (28×28) inputs: three pools instead of five, ten convs; with width 0.25.
VGG_NARROW_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512]
MODELS = {
    "vgg19": "VGG19-BN, widths 64…512 (the paper's)",
    "resnet32-wide": "ResNet-32, widths 64/128/256 (the paper's 'wide' one)",
    "resnet32-narrow": "ResNet-32, widths 16/32/64",
    "resnet20-narrow": "ResNet-20, widths 16/32/64",
    "vgg-narrow": "VGG-BN, 10 convs (16,16,M,32,32,M,64×3,M,128×3), width 0.25 of VGG",
    "vgg19-narrow": "VGG19-BN, width 0.25",
    "mobilenetv2-narrow": "MobileNet-V2 for 28×28 (inverted residuals, depthwise convs, ReLU6), half width",
}

# Presets: the paper's hyperparameters (docs/method.md §10) and the reduced CPU protocol. Explicit flags
# override a preset's values.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        train_subset=None,
        batch_size=128,
        pretrain_epochs=200,
        pretrain_lr=0.1,
        pretrain_wd=2e-4,
        finetune_epochs=150,
        finetune_lr=1e-3,
        finetune_wd=1e-4,
        fisher_batches=None,  # one pass over the training set
        bn_batches=None,
        slimming_lambda=1e-4,
        latency_repeats=50,
    ),
    "cpu": dict(
        train_subset=10000,
        batch_size=128,
        pretrain_epochs=5,
        pretrain_lr=0.1,
        pretrain_wd=2e-4,
        finetune_epochs=2,
        finetune_lr=0.01,
        finetune_wd=1e-4,
        fisher_batches=8,
        bn_batches=20,
        slimming_lambda=1e-4,
        latency_repeats=25,
    ),
    "tiny": dict(  # the end-to-end test: seconds
        train_subset=None,
        batch_size=64,
        pretrain_epochs=1,
        pretrain_lr=0.05,
        pretrain_wd=1e-4,
        finetune_epochs=1,
        finetune_lr=0.01,
        finetune_wd=1e-4,
        fisher_batches=2,
        bn_batches=4,
        slimming_lambda=1e-4,
        latency_repeats=3,
    ),
}
PROTOCOL_KEYS = tuple(PRESETS["paper"])


def build_model(name: str, n_classes: int, in_channels: int) -> nn.Module:
    if name == "vgg19":
        return VGG(n_classes, 1.0, in_channels)
    if name == "vgg19-narrow":
        return VGG(n_classes, 0.25, in_channels)
    if name == "vgg-narrow":
        return VGG(n_classes, 0.25, in_channels, cfg=VGG_NARROW_CFG)
    if name == "resnet32-wide":
        return ResNetCifar(32, (64, 128, 256), n_classes, in_channels)
    if name == "resnet32-narrow":
        return ResNetCifar(32, (16, 32, 64), n_classes, in_channels)
    if name == "resnet20-narrow":
        return ResNetCifar(20, (16, 32, 64), n_classes, in_channels)
    if name == "mobilenetv2-narrow":
        return MobileNetV2Cifar(n_classes, in_channels)
    raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")


# ---------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------


class Classifier(pl.LightningModule):
    """SGD (momentum 0.9) with the paper's step decay (×0.1 at 50 %, ×0.01 at 75 % of the steps),
    optional batch augmentation and an optional L1 penalty on BatchNorm scales (Network Slimming)."""

    def __init__(
        self,
        net: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        total_steps: int,
        augment: bool = False,
        bn_l1: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.net = net
        self.lr, self.weight_decay, self.total_steps = lr, weight_decay, max(1, total_steps)
        self.augment, self.bn_l1 = augment, bn_l1
        self._gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.augment:
            x = augment_batch(x.cpu(), self._gen).to(y.device)
        loss = F.cross_entropy(self(x), y)
        if self.bn_l1:
            bns = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            loss = loss + self.bn_l1 * sum(m.weight.abs().sum() for m in bns if m.weight is not None)
        return loss

    def configure_optimizers(self):
        # Called again by EigenDamagePruning after every round: built from self.parameters().
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        t = self.total_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 1.0 if s < 0.5 * t else (0.1 if s < 0.75 * t else 0.01)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EvalEachEpoch(pl.Callback):
    """Test accuracy after every epoch (BatchNorm statistics recomputed first, on a copy), to record
    the best epoch beside the final accuracy."""

    def __init__(self, data: Data, bn_batches: list) -> None:
        self.data, self.bn_batches, self.history = data, bn_batches, []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            return  # the last epoch's figure is the final accuracy, computed after fit
        net = copy.deepcopy(pl_module.net)
        refresh_bn(net, self.bn_batches)
        self.history.append(accuracy(net, self.data))


class RefreshBNAfterRounds(pl.Callback):
    """Recompute BatchNorm statistics after every round of an :class:`EigenDamagePruning` callback
    (placed after it in ``callbacks``), as the one-shot methods get after their prune."""

    def __init__(self, pruning: EigenDamagePruning, bn_batches: list) -> None:
        self.pruning, self.bn_batches, self.seen = pruning, bn_batches, 0

    def _check(self, pl_module: pl.LightningModule) -> None:
        if len(self.pruning.reports) > self.seen:
            self.seen = len(self.pruning.reports)
            refresh_bn(pl_module.net, self.bn_batches)

    def on_train_start(self, trainer, pl_module) -> None:
        self._check(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check(pl_module)


def work_device() -> torch.device:
    """Where curvature, pruning, BatchNorm refresh and evaluation run: the GPU when there is one
    (latency is always measured on the CPU)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit(model: Classifier, data: Data, epochs: int, batch_size: int, seed: int, callbacks=()) -> None:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size, shuffle=True, generator=gen)
    trainer.fit(model, loader)


@torch.no_grad()
def accuracy(net: nn.Module, data: Data, batch: int = 1000) -> float:
    """Test accuracy in percent (eval mode; the mode is restored)."""
    was = net.training
    net.eval()
    device = next(net.parameters()).device
    correct = 0
    for i in range(0, len(data.y_test), batch):
        x = data.x_test[i : i + batch].to(device)
        correct += int((net(x).argmax(1).cpu() == data.y_test[i : i + batch]).sum())
    net.train(was)
    return 100.0 * correct / len(data.y_test)


@torch.no_grad()
def refresh_bn(net: nn.Module, batches: list) -> None:
    """Recompute every BatchNorm's running mean/var as the exact average over ``batches``."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return
    modes = {m: m.training for m in net.modules()}
    momenta = {m: m.momentum for m in bns}
    device = next(net.parameters()).device
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    try:
        for x, _ in batches:
            net(x.to(device))
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, mode in modes.items():
            m.training = mode


def latency(dense: nn.Module, pruned: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median eval seconds per forward of ``dense`` and ``pruned`` on ``x``, calls interleaved."""
    fns = {"dense": dense.eval(), "pruned": pruned.eval()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f(x)
        for _ in range(repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t)
    return statistics.median(times["dense"]), statistics.median(times["pruned"])


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def _batches(data: Data, n: int | None, batch_size: int, seed: int) -> list:
    """``n`` fixed training batches (all of them if None), order drawn with ``seed``."""
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))
    total = math.ceil(len(perm) / batch_size)
    k = total if n is None else min(n, total)
    return [
        (
            data.x_train[perm[i * batch_size : (i + 1) * batch_size]],
            data.y_train[perm[i * batch_size : (i + 1) * batch_size]],
        )
        for i in range(k)
    ]


def protocol_id(args: argparse.Namespace, kind: str) -> str:
    keys = ["train_subset", "batch_size", "pretrain_epochs", "pretrain_lr", "pretrain_wd"]
    if kind == "slimming":
        keys.append("slimming_lambda")
    blob = json.dumps({k: getattr(args, k) for k in keys} | {"data_seed": 0}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def pretrained(args: argparse.Namespace, data: Data, kind: str) -> tuple[nn.Module, dict]:
    """The pretrained network (``kind`` "dense" or "slimming"), from the cache or trained now."""
    path = Path(args.cache) / f"{args.dataset}-{args.model}-{kind}-{protocol_id(args, kind)}.pt"
    net = build_model(args.model, data.n_classes, data.in_channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_suffix(".lock")
    while not path.exists() and not _claim(lock):
        time.sleep(5)  # another worker is pretraining this network
    if path.exists():
        blob = torch.load(path, weights_only=True)
        net.load_state_dict(blob["state_dict"])
        return net, blob["info"]
    print(f"[pretrain] {kind} {args.model} on {args.dataset}: {args.pretrain_epochs} epochs", flush=True)
    pl.seed_everything(0, verbose=False)
    t0 = time.perf_counter()
    steps = args.pretrain_epochs * math.ceil(len(data.y_train) / args.batch_size)
    model = Classifier(
        net,
        lr=args.pretrain_lr,
        weight_decay=args.pretrain_wd,
        total_steps=steps,
        augment=data.augment,
        bn_l1=args.slimming_lambda if kind == "slimming" else 0.0,
    )
    fit(model, data, args.pretrain_epochs, args.batch_size, seed=0)
    net.to(work_device())  # Lightning hands the model back on the CPU after fit
    info = {
        "accuracy": accuracy(net, data),
        "train_s": time.perf_counter() - t0,
        "epochs": args.pretrain_epochs,
        "protocol_id": protocol_id(args, kind),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": net.state_dict(), "info": info}, tmp)
    os.replace(tmp, path)
    lock.unlink(missing_ok=True)
    print(f"[pretrain] {kind}: {info['accuracy']:.2f}% in {info['train_s']:.0f} s -> {path}", flush=True)
    return net, info


def run_one(args: argparse.Namespace, data: Data, method: str, flops_x: float, seed: int) -> dict:
    kind = "slimming" if method == "slimming" else "dense"
    net, pre = pretrained(args, data, kind)
    dense_ref, dense_info = pretrained(args, data, "dense")  # the latency reference, the dense row
    example = data.x_test[:1]
    flops0, params0 = count_flops(net, example), count_params(net)
    # Curvature, pruning and BN refresh on the accelerator when there is one (Lightning moves the
    # model back to the CPU after fit); latency is always measured on the CPU.
    net.to(work_device())
    ratio = 1.0 - 1.0 / flops_x
    pl.seed_everything(seed, verbose=False)
    fisher_batches = _batches(data, args.fisher_batches, args.batch_size, seed)
    bn_batches = _batches(data, args.bn_batches, args.batch_size, 1000 + seed)
    steps_per_epoch = math.ceil(len(data.y_train) / args.batch_size)
    total = args.finetune_epochs * steps_per_epoch
    model = Classifier(
        net,
        lr=args.finetune_lr,
        weight_decay=args.finetune_wd,
        total_steps=total,
        augment=data.augment,
        seed=seed,
    )
    evals = EvalEachEpoch(data, bn_batches)
    callbacks: list[pl.Callback] = []
    t0 = time.perf_counter()
    detail: dict[str, Any] = {}
    acc_pruned = None
    if method == "eigendamage-iter":
        # Three rounds whose FLOPs fractions compound to 1/k: at the start and after 1/6 and 1/3
        # of the fine-tuning steps, each with factors from the last `fisher_batches` batches. All
        # rounds land before the first LR drop (at 1/2), so the final network still gets half of
        # the budget at the full fine-tuning LR.
        f = 1.0 - (1.0 / flops_x) ** (1.0 / 3.0)
        sched = PruningSchedule(
            at_start=f,
            steps={max(1, total // 6): f, max(2, total // 3): f},
            fisher_batches=args.fisher_batches,
            target="flops",
        )
        pruning = EigenDamagePruning(schedule=sched, seed=seed, verbose=False, structure="eigenbasis")
        callbacks = [pruning, RefreshBNAfterRounds(pruning, bn_batches)]
        t_prune = None
    else:
        if method == "eigendamage":
            rep = prune(net, fisher_batches, ratio=ratio, target="flops", seed=seed)
            detail = {"forms": dict(_count_forms(rep))}
        else:
            from benchmarks.baselines_tp import prune_baseline

            rep = prune_baseline(net, fisher_batches, method, ratio=ratio, target="flops", seed=seed)
            detail = {"channels_removed": rep.channels_removed, "channels_total": rep.channels_total}
            if rep.skipped:
                detail["skipped"] = rep.skipped
        t_prune = time.perf_counter() - t0
        refresh_bn(net, bn_batches)
        acc_pruned = accuracy(net, data)
    t1 = time.perf_counter()
    if args.finetune_epochs > 0:
        fit(model, data, args.finetune_epochs, args.batch_size, seed=seed, callbacks=[*callbacks, evals])
    t_ft = time.perf_counter() - t1
    net.to(work_device())  # Lightning hands the model back on the CPU after fit
    if method == "eigendamage-iter":
        detail = {"rounds": [{"flops_after": r.flops_after, "fraction": r.ratio} for r in pruning.reports]}
    refresh_bn(net, bn_batches)
    acc_final = accuracy(net, data)
    flops1, params1 = count_flops(net, example), count_params(net)
    x64 = data.x_test[:64]
    t_dense, t_pruned = latency(dense_ref.cpu(), net.cpu(), x64, args.latency_repeats)
    hist = evals.history + ([acc_final] if args.finetune_epochs > 0 else [])
    best = max(range(len(hist)), key=lambda i: hist[i]) if hist else None
    flops_reduction = flops0 / flops1
    return {
        "dataset": args.dataset,
        "model": args.model,
        "method": method,
        "flops_x_target": flops_x,
        "seed": seed,
        "preset": args.preset,
        "protocol": {k: getattr(args, k) for k in PROTOCOL_KEYS} | {"train_images": len(data.y_train)},
        "dense": {"accuracy": dense_info["accuracy"], "params": params0, "flops": flops0},
        "start_accuracy": pre["accuracy"],  # the network this method pruned (Slimming: its own)
        "accuracy_pruned": acc_pruned,  # after the one-shot prune + BN refresh, before fine-tuning
        "accuracy_final": acc_final,
        "accuracy_best_epoch": hist[best] if hist else acc_final,
        "best_epoch": best,
        "accuracy_per_epoch": hist,
        "params": params1,
        "flops": flops1,
        "weight_reduction": params0 / params1,
        "flops_reduction": flops_reduction,
        "flops_match": abs(flops1 / (flops0 / flops_x) - 1.0) <= 0.03,
        "latency_ms": {"dense": 1e3 * t_dense, "pruned": 1e3 * t_pruned, "batch": 64},
        "speedup": t_dense / t_pruned,
        "time_s": {"prune": t_prune, "finetune": t_ft},
        "detail": detail,
        "command": single_command(args, method, flops_x, seed),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _count_forms(rep) -> dict[str, int]:
    out: dict[str, int] = {}
    for layer in rep.layers:
        key = "skipped" if layer.skipped else layer.form
        out[key] = out.get(key, 0) + 1
    return out


def single_command(args: argparse.Namespace, method: str, flops_x: float, seed: int) -> str:
    """The command that reproduces one record (the cache makes the pretraining shared)."""
    parts = ["python", "benchmarks/run.py", "--dataset", args.dataset, "--model", args.model]
    parts += ["--preset", args.preset, "--method", method, "--flops-x", f"{flops_x:g}", "--seed", str(seed)]
    for k in PROTOCOL_KEYS:
        if getattr(args, k) != PRESETS[args.preset][k]:
            parts += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if getattr(args, "test_subset", None) is not None:
        parts += ["--test-subset", str(args.test_subset)]
    return shlex.join(parts)


def _claim(lock: Path) -> bool:
    """Create ``lock`` atomically; False if another worker holds it (several workers can share a
    grid: each run and each pretraining is claimed by one of them)."""
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def record_path(args: argparse.Namespace, method: str, flops_x: float, seed: int) -> Path:
    return Path(args.out) / "records" / f"{args.dataset}_{args.model}_{method}_x{flops_x:g}_s{seed}.json"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=DATASETS, required=True)
    ap.add_argument("--model", choices=tuple(MODELS), required=True)
    ap.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    ap.add_argument("--method", nargs="+", default=["all"], help=f"any of {METHODS}, or all")
    ap.add_argument("--flops-x", nargs="+", type=float, default=[2.0, 4.0, 8.0], help="k: keep 1/k of FLOPs")
    ap.add_argument("--seed", nargs="+", type=int, default=[0])
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--download", action="store_true", help="allow downloading missing datasets")
    ap.add_argument(
        "--test-subset",
        type=int,
        default=None,
        help="evaluate on the first N test images only (quick timing runs, e.g. on synthetic-cifar10)",
    )
    ap.add_argument("--cache", default="out/cache", help="pretrained checkpoints")
    ap.add_argument("--out", default="out/bench", help="records go to OUT/records/")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--force", action="store_true", help="redo runs whose record exists")
    ap.add_argument("--reverse", action="store_true", help="walk the grid backwards (a second worker)")
    for k, v in PRESETS["paper"].items():
        typ = float if isinstance(v, float) else int
        ap.add_argument(f"--{k.replace('_', '-')}", type=typ, default=None, help="(preset value if unset)")
    args = ap.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    methods = list(METHODS) if args.method == ["all"] else args.method
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {METHODS} or all")
    args.methods = methods
    bad_x = [k for k in args.flops_x if k <= 1.0]
    if bad_x:
        ap.error(f"--flops-x values must be > 1 (the FLOPs reduction factor), got {bad_x}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_data(args.dataset, args.data_root, download=args.download, train_subset=args.train_subset)
    except DataMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.test_subset is not None:
        data.x_test, data.y_test = data.x_test[: args.test_subset], data.y_test[: args.test_subset]
    print(
        f"{args.dataset}: {len(data.y_train)} training / {len(data.y_test)} test images; "
        f"{args.model}; preset {args.preset}",
        flush=True,
    )
    grid = [(s, k, m) for s in args.seed for k in args.flops_x for m in args.methods]
    for seed, flops_x, method in reversed(grid) if args.reverse else grid:
        path = record_path(args, method, flops_x, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_suffix(".lock")
        if args.force:
            lock.unlink(missing_ok=True)
        elif path.exists() or not _claim(lock):
            print(f"[skip] {path} exists or is claimed by another worker", flush=True)
            continue
        try:
            t = time.perf_counter()
            rec = run_one(args, data, method, flops_x, seed)
            path.write_text(json.dumps(rec, indent=1))
        finally:
            lock.unlink(missing_ok=True)
        pruned = rec["accuracy_pruned"]
        print(
            f"[run] {method:<16} ÷{flops_x:g} seed {seed}: final {rec['accuracy_final']:.2f}% "
            f"(after prune {'-' if pruned is None else f'{pruned:.2f}%'}) "
            f"FLOPs ÷{rec['flops_reduction']:.2f} params ÷{rec['weight_reduction']:.2f} "
            f"speed-up {rec['speedup']:.2f}× in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
