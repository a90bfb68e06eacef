"""The callback itself, per structure, on the converged networks: which default to ship?

Each row fine-tunes a converged dense network of ``benchmarks/converged.py`` (full
Fashion-MNIST) in a Lightning ``fit`` (SGD lr 0.01 cosine per step, momentum 0.9, weight decay
5e-4, batch 128, shuffled with the row's seed, random crops with padding 2, one thread) while a
pruning callback takes it to ``÷k`` FLOPs on a schedule:

- ``oneshot``: one round at the start of a 3-epoch fine-tune;
- ``iterative``: rounds at the ends of epochs 0, 1 and 2 of a 6-epoch fine-tune, each removing
  ``1 − k^(−1/3)`` of the FLOPs left.

Methods: ``channels`` and ``eigenbasis`` (``EigenDamagePruning(structure=...)`` with its defaults,
true Fisher from ``fisher_batches=10`` training batches before each round, of which
``--fisher-examples`` examples each: ``auto``, the default, or ``all`` as the rows recorded
without the field), and ``tp-l1``
(Torch-Pruning's L1 magnitude, the best peer of the converged grid, applied by a small callback at
the same points, with the same optimizer rebuild). Recorded: test accuracy (10,000 images) after
the fit, FLOPs reached, the median eval latency at batch 64 of the pruned and the dense network
(timed alternately in this process), the training time. One record per row is appended to
``benchmarks/results/converged/callback_structures.jsonl`` with its command (a row already there is
skipped)::

    python benchmarks/callback_structures.py --model resnet20-narrow --flops-x 4 --method channels

With ``--save-dir DIR`` each row also saves its pruned network; ``--compare`` then times the dense
network and the saved networks of ``--methods`` alternately in one process (batch 64, eval) and
appends the medians to ``callback_structures_latency.jsonl``::

    python benchmarks/callback_structures.py --compare --model resnet20-narrow --flops-x 4 --seed 1 \\
        --save-dir /tmp/cs_nets
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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

from benchmarks.baselines_tp import prune_baseline  # noqa: E402
from benchmarks.converged import (  # noqa: E402
    FINETUNE_LR,
    RECIPE,
    RESULTS,
    accuracy,
    interleaved_latency,
    load_dense,
    random_crop,
)
from benchmarks.data import load_data  # noqa: E402
from lightning_eigendamage import EigenDamagePruning, PruningSchedule  # noqa: E402

RECORDS = RESULTS / "callback_structures.jsonl"
SCHEDULES = {"oneshot": 3, "iterative": 6}  # fine-tune epochs
METHODS = ("channels", "eigenbasis", "tp-l1")


class Finetune(pl.LightningModule):
    """The converged network under the fine-tune recipe (random crops drawn from its own generator)."""

    def __init__(self, net: nn.Module, total_steps: int, seed: int) -> None:
        super().__init__()
        self.net, self.total_steps = net, total_steps
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(random_crop(x, RECIPE["crop_pad"], self.gen)), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(
            self.parameters(),
            lr=FINETUNE_LR,
            momentum=RECIPE["momentum"],
            weight_decay=RECIPE["weight_decay"],
        )
        total = self.total_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TorchPruningL1(pl.Callback):
    """Torch-Pruning's L1 channels at the callback's points, optimizers rebuilt (state reset, LR
    scheduler continued), as a user would wire a peer into the same loop."""

    def __init__(self, schedule: PruningSchedule, calib: list) -> None:
        self.schedule, self.calib = schedule, calib
        self.reports: list[Any] = []

    def _prune(self, trainer: pl.Trainer, pl_module: Finetune, fraction: float) -> None:
        flops_target = fraction  # of the FLOPs left: the report's ratio is of the network now
        report = prune_baseline(pl_module.net, self.calib[:1], "l1", ratio=flops_target, target="flops")
        self.reports.append(report)
        states = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
        trainer.strategy.setup_optimizers(trainer)
        for cfg, state in zip(trainer.lr_scheduler_configs, states):
            cfg.scheduler.load_state_dict(state)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Finetune) -> None:
        if self.schedule.at_start is not None:
            self._prune(trainer, pl_module, self.schedule.at_start)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Finetune) -> None:
        f = self.schedule.epochs.get(trainer.current_epoch)
        if f is not None:
            self._prune(trainer, pl_module, f)


def row_key(model: str, flops_x: float, method: str, schedule: str, seed: int, examples: str = "all") -> str:
    """A row's identity; rows from before ``--fisher-examples`` existed used every example."""
    return f"{model}|{flops_x:g}|{method}|{schedule}|{seed}" + ("" if examples == "all" else f"|{examples}")


def _examples(value: str) -> int | str | None:
    """``--fisher-examples``: "auto", "all" (every example) or a count."""
    return None if value == "all" else value if value == "auto" else int(value)


def done() -> set[str]:
    if not RECORDS.exists():
        return set()
    return {
        row_key(
            r["model"], r["flops_x"], r["method"], r["schedule"], r["seed"], r.get("fisher_examples", "all")
        )
        for r in map(json.loads, RECORDS.open())
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    data = load_data("fashion-mnist", root=args.data_root)
    dense = load_dense(args.model)
    net = copy.deepcopy(dense).train()
    epochs = SCHEDULES[args.schedule]
    steps = epochs * math.ceil(len(data.y_train) / RECIPE["batch"])
    fraction = 1.0 - 1.0 / args.flops_x
    examples = _examples(args.fisher_examples)
    if args.schedule == "oneshot":
        schedule = PruningSchedule(
            at_start=fraction, target="flops", fisher_batches=10, fisher_examples=examples
        )
    else:
        per = 1.0 - args.flops_x ** (-1.0 / 3)
        schedule = PruningSchedule(
            epochs={0: per, 1: per, 2: per}, target="flops", fisher_batches=10, fisher_examples=examples
        )
    if args.method == "tp-l1":
        g = torch.Generator().manual_seed(10_000 + args.seed)
        idx = torch.randperm(len(data.y_train), generator=g)[:128]
        cb: Any = TorchPruningL1(schedule, [(data.x_train[idx], data.y_train[idx])])
    else:
        cb = EigenDamagePruning(schedule, structure=args.method, seed=args.seed, verbose=False)
    loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=RECIPE["batch"],
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    torch.manual_seed(args.seed)
    module = Finetune(net, steps, args.seed)
    t0 = time.time()
    trainer.fit(module, loader)
    seconds = time.time() - t0
    pruned = module.net.eval()
    if args.save_dir:  # the pruned network, for interleaved comparisons between methods (--compare)
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        key = row_key(args.model, args.flops_x, args.method, args.schedule, args.seed).replace("|", "_")
        torch.save(pruned.state_dict(), Path(args.save_dir) / f"{key}.pt")
    x = data.x_test[:64]
    t_dense, t_pruned = interleaved_latency(dense, pruned, x, repeats=args.repeats, memory_format="nchw")
    from lightning_eigendamage.costs import count_flops

    flops_dense, flops_pruned = count_flops(dense, x[:1]), count_flops(pruned, x[:1])
    return {
        "model": args.model,
        "flops_x": args.flops_x,
        "method": args.method,
        "schedule": args.schedule,
        "seed": args.seed,
        "fisher_examples": args.fisher_examples,
        "epochs": epochs,
        "acc": accuracy(pruned, data.x_test, data.y_test),
        "flops_reached_x": flops_dense / max(flops_pruned, 1),
        "latency_b64_dense_ms": round(1000 * t_dense, 3),
        "latency_b64_pruned_ms": round(1000 * t_pruned, 3),
        "speedup_b64": t_dense / t_pruned,
        "fit_seconds": round(seconds, 1),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/callback_structures.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """The dense network and the saved pruned networks of ``--methods`` for one (network, ÷k,
    schedule, seed), timed alternately in this process: median eval latency at batch 64."""
    from lightning_eigendamage import restore_pruned

    torch.set_num_threads(args.threads)
    data = load_data("fashion-mnist", root=args.data_root)
    nets = {"dense": load_dense(args.model)}
    for method in args.methods:
        key = row_key(args.model, args.flops_x, method, args.schedule, args.seed).replace("|", "_")
        net = restore_pruned(load_dense(args.model), Path(args.save_dir) / f"{key}.pt")
        nets[method] = net.eval()
    x = data.x_test[:64]
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.inference_mode():
        for r in range(args.repeats + 3):
            order = list(nets) if r % 2 == 0 else list(reversed(list(nets)))
            for name in order:
                t = time.perf_counter()
                nets[name](x)
                if r >= 3:
                    times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    # a training step (forward, backward, SGD step) at the fine-tune's batch, timed alike
    xb, yb = data.x_train[: RECIPE["batch"]], data.y_train[: RECIPE["batch"]]
    opts = {k: torch.optim.SGD(n.parameters(), lr=1e-9, momentum=0.9) for k, n in nets.items()}
    steps: dict[str, list[float]] = {k: [] for k in nets}
    for n in nets.values():
        n.train()
    for r in range(max(5, args.repeats // 3) + 2):
        order = list(nets) if r % 2 == 0 else list(reversed(list(nets)))
        for name in order:
            t = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            F.cross_entropy(nets[name](xb), yb).backward()
            opts[name].step()
            if r >= 2:
                steps[name].append(time.perf_counter() - t)
    step_med = {k: sorted(v)[len(v) // 2] for k, v in steps.items()}
    return {
        "train_step_ms": {k: round(1000 * v, 2) for k, v in step_med.items()},
        "train_step_vs_dense": {k: v / step_med["dense"] for k, v in step_med.items() if k != "dense"},
        "model": args.model,
        "flops_x": args.flops_x,
        "schedule": args.schedule,
        "seed": args.seed,
        "latency_b64_ms": {k: round(1000 * v, 3) for k, v in med.items()},
        "speedup_b64": {k: med["dense"] / v for k, v in med.items() if k != "dense"},
        "repeats": args.repeats,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python benchmarks/callback_structures.py " + shlex.join(sys.argv[1:]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, choices=["resnet20-narrow", "vgg-narrow"])
    p.add_argument("--flops-x", type=float, default=4.0)
    p.add_argument("--method", choices=METHODS, help="the row's method (required without --compare)")
    p.add_argument(
        "--compare",
        action="store_true",
        help="time the networks saved by --save-dir rows of --methods against the dense one, alternately",
    )
    p.add_argument("--methods", nargs="+", default=["channels", "tp-l1"], choices=METHODS)
    p.add_argument("--schedule", default="oneshot", choices=sorted(SCHEDULES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fisher-examples",
        default="auto",
        help='PruningSchedule(fisher_examples=...): "auto" (default), "all" (every example, as the rows '
        "without this field) or a count",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--data-root", default="data")
    p.add_argument("--save-dir", default=None, help="save each pruned network's state_dict here")
    args = p.parse_args(argv)
    if args.compare:
        if not args.save_dir:
            p.error("--compare needs --save-dir (where the rows saved their networks)")
        rec = compare(args)
        with (RESULTS / "callback_structures_latency.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)
        return
    if args.method is None:
        p.error("--method is required (or --compare)")
    if (
        row_key(args.model, args.flops_x, args.method, args.schedule, args.seed, args.fisher_examples)
        in done()
    ):
        print("already recorded")
        return
    rec = run(args)
    with RECORDS.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
