"""Does rounding the kept channel widths to multiples (``round_to``) make the pruned network faster?

    python benchmarks/round_to.py [--data-root data] [--threads 1] [--models ...]
                                  [--flops-x 2 4] [--round-to 1 4 8 16] [--rounds 7]
                                  [--out benchmarks/results/round_to.jsonl]

On each converged network of ``benchmarks/converged.py`` (full Fashion-MNIST, the dense weights
committed in ``benchmarks/results/converged/``), the channel engine (``structure="channels"``,
``target="flops"``, seed 0, the grid's calibration batches of seed 0) prunes a fresh copy to ÷k
FLOPs with each ``round_to``. A row records the FLOPs reached, the test accuracy right after the
cut (10,000 images; BatchNorm re-estimated by the engine, no fine-tune), every Conv2d/Linear's
output width, and the eval speed-up over the dense network on the CPU at batch 1 and 64.

Timing: one eval forward under ``inference_mode`` on ``--threads`` torch threads (1 by default),
the dense and the pruned network called alternately (dense, pruned, dense, …) on the same test
images after a warm-up; ``--rounds`` rounds, each the median of ``--calls`` calls per network (more
at batch 1), give a per-round ratio ``t_dense / t_pruned``; the row keeps their median, min and
max (the spread is the noise floor). All rows are pruned first and timed afterwards in one stretch,
which waits while ``/tmp/timing.lock`` exists (another benchmark is timing: polled every 30 s) and
holds ``/tmp/timing.helper`` while it times.

Rows are appended to ``--out`` with the command that reproduces them; a row whose key (model,
FLOPs ÷, round_to, threads) is there already is skipped, so the command resumes.
``--table`` writes the markdown table (``round_to.md`` beside ``--out``) from the rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.converged import accuracy, calibration, load_dense  # noqa: E402
from benchmarks.data import load_data  # noqa: E402
from lightning_eigendamage import prune  # noqa: E402

MODELS = ("resnet20-narrow", "vgg-narrow", "mobilenetv2-narrow")
LOCK, HELPER = Path("/tmp/timing.lock"), Path("/tmp/timing.helper")
BATCHES = (1, 64)
CALLS = {1: 60, 64: 12}  # calls per network and round, per batch size


def row_key(r: dict[str, Any]) -> str:
    return f"{r['model']}|{r['flops_x']}|{r['round_to']}|{r['threads']}"


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {row_key(json.loads(line)) for line in path.read_text().splitlines() if line.strip()}


def widths(net: nn.Module) -> dict[str, int]:
    """Every Conv2d/Linear's output width."""
    return {n: m.weight.shape[0] for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def prune_row(model: str, flops_x: float, round_to: int, dense: nn.Module, data: Any, calib: list) -> tuple:
    """A pruned copy of ``dense`` and the row's figures (everything but the timings)."""
    net = copy.deepcopy(dense)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prune(
            net,
            calib,
            ratio=1.0 - 1.0 / flops_x,
            structure="channels",
            target="flops",
            seed=0,
            round_to=round_to,
        )
    seconds = time.perf_counter() - t0
    w = widths(net)
    multiples = [
        n
        for n, c in w.items()
        if c != widths(dense)[n] and c % round_to  # a narrowed layer whose width is no multiple
    ]
    row = {
        "model": model,
        "flops_x": flops_x,
        "round_to": round_to,
        "flops_before": report.flops_before,
        "flops_after": report.flops_after,
        "flops_x_reached": round(report.flops_before / max(report.flops_after, 1), 3),
        "target_reached": report.target_reached,
        "channels_removed": report.channels_removed,
        "accuracy": accuracy(net, data.x_test, data.y_test),
        "prune_s": round(seconds, 2),
        "not_multiples": multiples,
        "left_by_rounding": sorted(k for k, v in report.skipped.items() if "round_to=" in v),
        "widths": w,
        "warnings": sorted({str(x.message)[:200] for x in caught}),
    }
    return net, row


def interleaved(dense: nn.Module, pruned: nn.Module, x: torch.Tensor, rounds: int, calls: int) -> dict:
    """Per round the median seconds of ``calls`` eval forwards of each network, called alternately;
    the speed-up ``t_dense / t_pruned`` per round, and its median, min and max over the rounds."""
    nets = [dense.eval(), pruned.eval()]
    ratios, t_d, t_p = [], [], []
    with torch.inference_mode():
        for net in nets:  # warm-up
            for _ in range(3):
                net(x)
        for _ in range(rounds):
            times: list[list[float]] = [[], []]
            for _ in range(calls):
                for i, net in enumerate(nets):
                    t = time.perf_counter()
                    net(x)
                    times[i].append(time.perf_counter() - t)
            d, p = statistics.median(times[0]), statistics.median(times[1])
            t_d.append(d)
            t_p.append(p)
            ratios.append(d / p)
    return {
        "dense_ms": round(1e3 * statistics.median(t_d), 4),
        "pruned_ms": round(1e3 * statistics.median(t_p), 4),
        "speedup": round(statistics.median(ratios), 4),
        "speedup_min": round(min(ratios), 4),
        "speedup_max": round(max(ratios), 4),
    }


def wait_for_lock() -> None:
    """Wait while another benchmark times (``/tmp/timing.lock``), polling every 30 s."""
    waited = 0
    while LOCK.exists():
        if waited % 300 == 0:
            print(f"  {LOCK} exists: waiting ({waited} s so far)", flush=True)
        time.sleep(30)
        waited += 30


def write_table(path: Path) -> Path:
    """The markdown table of the rows in ``path`` (``.md`` beside it)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(
        key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 99, r["flops_x"], r["round_to"])
    )
    lines = [
        "# `round_to` in the channel engine: FLOPs, accuracy and CPU speed-up",
        "",
        "`python benchmarks/round_to.py` (see its docstring): converged networks on Fashion-MNIST, "
        '`structure="channels", target="flops"`, seed 0, accuracy on the 10,000 test images right '
        "after pruning (BatchNorm re-estimated, no fine-tune). Speed-up: dense / pruned eval "
        "latency on the CPU, timed alternately in one process, median over rounds (min–max in "
        "brackets: the noise).",
        "",
        "| model | ÷ FLOPs asked | round_to | ÷ FLOPs reached | accuracy % | speed-up b=1 | speed-up b=64 | "
        "dense ms b=1 / b=64 | threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b1, b64 = r["latency"]["1"], r["latency"]["64"]
        lines.append(
            f"| {r['model']} | {r['flops_x']:g} | {r['round_to']} | {r['flops_x_reached']:.2f}"
            f"{'' if r['target_reached'] else ' (not reached)'} | {r['accuracy']:.2f} | "
            f"{b1['speedup']:.2f}× ({b1['speedup_min']:.2f}–{b1['speedup_max']:.2f}) | "
            f"{b64['speedup']:.2f}× ({b64['speedup_min']:.2f}–{b64['speedup_max']:.2f}) | "
            f"{b1['dense_ms']:.3f} / {b64['dense_ms']:.2f} | {r['threads']} |"
        )
    out = path.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--flops-x", nargs="+", type=float, default=[2.0, 4.0])
    p.add_argument("--round-to", nargs="+", type=int, default=[1, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/round_to.jsonl"))
    p.add_argument("--table", action="store_true", help="only write the markdown table from --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.table:
        print(write_table(out))
        return
    torch.set_num_threads(args.threads)
    given = argv if argv is not None else sys.argv[1:]
    command = ("python benchmarks/round_to.py " + shlex.join(given)).strip()
    done = done_keys(out)
    todo = [
        (m, x, r)
        for m in args.models
        for x in args.flops_x
        for r in args.round_to
        if row_key({"model": m, "flops_x": x, "round_to": r, "threads": args.threads}) not in done
    ]
    if not todo:
        print("every row is there already")
        return
    data = load_data("fashion-mnist", root=args.data_root)
    calib = calibration(data, 0)
    dense_nets = {m: load_dense(m) for m in {m for m, _, _ in todo}}
    pruned = []
    for model, flops_x, round_to in todo:  # pruned first, timed afterwards in one stretch
        net, row = prune_row(model, flops_x, round_to, dense_nets[model], data, calib)
        print(
            f"{model} ÷{flops_x:g} round_to={round_to}: ÷{row['flops_x_reached']} FLOPs, "
            f"{row['accuracy']:.2f} %",
            flush=True,
        )
        pruned.append((net, row))
    wait_for_lock()
    HELPER.write_text(f"{os.getpid()} benchmarks/round_to.py\n")
    try:
        for net, row in pruned:
            dense = copy.deepcopy(dense_nets[row["model"]])
            row["latency"] = {
                str(b): interleaved(dense, net, data.x_test[:b], args.rounds, CALLS[b]) for b in BATCHES
            }
            row |= {"threads": args.threads, "torch": torch.__version__, "command": command}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{row['model']} ÷{row['flops_x']:g} round_to={row['round_to']}: speed-up "
                f"{row['latency']['1']['speedup']}× (b=1), {row['latency']['64']['speedup']}× (b=64)",
                flush=True,
            )
    finally:
        HELPER.unlink(missing_ok=True)
    print(write_table(out))


if __name__ == "__main__":
    main()
