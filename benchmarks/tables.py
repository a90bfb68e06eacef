"""Markdown tables and PNG plots from the runner's JSON records (``benchmarks/run.py``).

    python benchmarks/tables.py --records out/fmnist/records --out benchmarks/results/fashion-mnist

One table and one plot per (dataset, model): rows grouped by FLOPs target in the paper's layout
(test accuracy, reduction in weights, reduction in FLOPs) plus the measured CPU speed-up and the
command that produced the row; seeds are averaged (mean ± sample standard deviation, n given).
The final accuracy is the reported one; the best epoch's accuracy stands beside it, labelled.
Below each table, the headline at the highest FLOPs target is computed from the records: does
EigenDamage beat every baseline and peer, at equal or lower FLOPs?
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

NAMES = {
    "eigendamage": "EigenDamage (one-shot)",
    "eigendamage-iter": "EigenDamage (iterative, 3 rounds)",
    "c-obd": "C-OBD",
    "c-obs": "C-OBS",
    "kron-obd": "Kron-OBD",
    "kron-obs": "Kron-OBS",
    "slimming": "NN Slimming",
    "l1": "L1 magnitude (Torch-Pruning)",
    "l2": "L2 magnitude (Torch-Pruning)",
    "taylor": "Group Taylor (Torch-Pruning)",
}
ORDER = list(NAMES)
OURS = ("eigendamage", "eigendamage-iter")
TOLERANCE = 1.03  # FLOPs within 3 % of another method's count as equal (the matching tolerance)


def load_records(folder: str | Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(values: list[float], digits: int = 2) -> str:
    m, sd = _mean_sd(values)
    if sd is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f} (n={len(values)})"


def aggregate(records: list[dict]) -> dict[tuple[str, str], dict[float, dict[str, list[dict]]]]:
    """(dataset, model) → FLOPs target → method → records (one per seed)."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in records:
        out[(r["dataset"], r["model"])][r["flops_x_target"]][r["method"]].append(r)
    return out


def row_command(runs: list[dict]) -> str:
    seeds = " ".join(str(s) for s in sorted(r["seed"] for r in runs))
    return re.sub(r"--seed \d+", f"--seed {seeds}", runs[0]["command"])


def headline(by_target: dict[float, dict[str, list[dict]]]) -> list[str]:
    """Sentences on the highest target: each EigenDamage variant against every other method."""
    k = max(by_target)
    methods = by_target[k]
    others = [m for m in ORDER if m in methods and m not in OURS]
    lines = []
    for ours in (m for m in OURS if m in methods):
        acc = statistics.fmean(r["accuracy_final"] for r in methods[ours])
        flops = statistics.fmean(r["flops"] for r in methods[ours])
        beaten, lost = [], []
        for m in others:
            o_acc = statistics.fmean(r["accuracy_final"] for r in methods[m])
            o_flops = statistics.fmean(r["flops"] for r in methods[m])
            d = acc - o_acc
            entry = f"{NAMES[m]} ({d:+.2f} pts, FLOPs {flops / o_flops:.3f}× theirs)"
            # "Equal" FLOPs: within the ±3 % every comparison is matched to (FLOPs ratio shown).
            (beaten if d > 0 and flops <= TOLERANCE * o_flops else lost).append(entry)
        n = len(methods[ours])
        verdict = "beats every baseline and peer" if not lost else "does NOT beat every baseline and peer"
        lines.append(
            f"- **÷{k:g} FLOPs, {NAMES[ours]}** ({acc:.2f}% final, mean of {n} seed(s)) {verdict} at equal "
            f"(within 3 %) or lower FLOPs. Ahead of: {', '.join(beaten) or 'none'}. "
            f"Not ahead at equal or lower FLOPs: {', '.join(lost) or 'none'}."
        )
    return lines


def protocol_text(r: dict) -> str:
    p = r["protocol"]
    fisher = "all" if p["fisher_batches"] is None else p["fisher_batches"]
    return (
        f"Protocol (preset `{r['preset']}`): {p['train_images']} training images"
        f"{' (a class-stratified subset)' if p['train_subset'] else ''}, full test set; pretraining "
        f"{p['pretrain_epochs']} epochs (SGD lr {p['pretrain_lr']:g}, wd {p['pretrain_wd']:g}, batch "
        f"{p['batch_size']}; NN Slimming: its own pretraining with λ={p['slimming_lambda']:g} on |γ|), "
        f"curvature/gradients from {fisher} batches (true Fisher), BatchNorm statistics recomputed on "
        f"{p['bn_batches'] or 'all'} batches after pruning and after fine-tuning, fine-tuning "
        f"{p['finetune_epochs']} epoch(s) for every method (SGD lr {p['finetune_lr']:g}, ×0.1 at 50 % and "
        f"×0.01 at 75 % of the steps, wd {p['finetune_wd']:g}). Iterative EigenDamage prunes at the "
        f"start and after 1/6 and 1/3 of the same fine-tuning steps (before the first LR drop). "
        f"FLOPs per example, 2 per multiply-add (torch.utils.flop_counter, eval mode). "
        f"CPU speed-up: eval latency at batch 64, "
        f"dense over pruned, medians of {p['latency_repeats']} interleaved repeats, 1 thread, on a "
        f"shared 2-core machine ({r['machine']})."
    )


def markdown(key: tuple[str, str], by_target: dict, plot_name: str | None) -> str:
    dataset, model = key
    any_rec = next(iter(next(iter(by_target.values())).values()))[0]
    dense = any_rec["dense"]
    lines = [
        f"# {dataset}, {model}",
        "",
        f"Dense network: {dense['accuracy']:.2f}% test accuracy, {dense['params']:,} parameters, "
        f"{dense['flops']:,} FLOPs per example.",
        "",
        protocol_text(any_rec),
        "",
        "Final accuracy is the reported figure; “best epoch” is the best test accuracy over the "
        "fine-tuning epochs, shown only for comparison with papers that report it (it is selection "
        "on the test set). “Matched” says whether the FLOPs are within ±3 % of dense/k.",
        "",
        "| FLOPs target | Method | Test acc. final (%) | best epoch (%) | after pruning, before "
        "fine-tuning (%) | Reduction in weights (%) | Reduction in FLOPs (%) | FLOPs ÷ | matched | "
        "CPU speed-up (batch 64) | Command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(by_target):
        for m in [m for m in ORDER if m in by_target[k]]:
            runs = by_target[k][m]
            pruned = [r["accuracy_pruned"] for r in runs if r["accuracy_pruned"] is not None]
            note = " (own pretraining: {:.2f}%)".format(runs[0]["start_accuracy"]) if m == "slimming" else ""
            lines.append(
                "| ÷{:g} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | `{}` |".format(
                    k,
                    NAMES.get(m, m),
                    note,
                    _fmt([r["accuracy_final"] for r in runs]),
                    _fmt([r["accuracy_best_epoch"] for r in runs]),
                    _fmt(pruned) if pruned else "–",
                    _fmt([100 * (1 - 1 / r["weight_reduction"]) for r in runs], 1),
                    _fmt([100 * (1 - 1 / r["flops_reduction"]) for r in runs], 1),
                    _fmt([r["flops_reduction"] for r in runs]),
                    "yes" if all(r["flops_match"] for r in runs) else "NO",
                    _fmt([r["speedup"] for r in runs]) + "×",
                    row_command(runs),
                )
            )
    lines += ["", "## Headline at the highest FLOPs target (computed from the records)", ""]
    lines += headline(by_target)
    if plot_name:
        lines += ["", f"![accuracy against FLOPs reduction]({plot_name})"]
    return "\n".join(lines) + "\n"


def summary(aggregated: dict) -> str:
    """The highest FLOPs target of every (dataset, model): a compact table and the headline."""
    lines = []
    for key, by_target in sorted(aggregated.items()):
        k = max(by_target)
        lines += [
            f"**{key[0]}, {key[1]}, ÷{k:g} FLOPs target** "
            f"(dense {next(iter(by_target[k].values()))[0]['dense']['accuracy']:.2f}%):",
            "",
            "| Method | Final acc. (%) | best epoch (%) | FLOPs ÷ | weights ÷ | CPU speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for m in [m for m in ORDER if m in by_target[k]]:
            runs = by_target[k][m]
            lines.append(
                f"| {NAMES.get(m, m)} | {_fmt([r['accuracy_final'] for r in runs])} | "
                f"{_fmt([r['accuracy_best_epoch'] for r in runs])} | "
                f"{_fmt([r['flops_reduction'] for r in runs])} | "
                f"{_fmt([r['weight_reduction'] for r in runs], 1)} | {_fmt([r['speedup'] for r in runs])}× |"
            )
        lines += [""] + headline(by_target) + [""]
    return "\n".join(lines)


def plot(key: tuple[str, str], by_target: dict, path: Path) -> None:
    """Final accuracy against FLOPs reduction, one line per method (mean over seeds, error bars =
    standard deviation): the full range on the left, the top 8 points below dense on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    any_rec = next(iter(next(iter(by_target.values())).values()))[0]
    dense = any_rec["dense"]["accuracy"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    markers = "os^vD<>pPX*h"
    methods = [m for m in ORDER if any(m in v for v in by_target.values())]
    for ax in axes:
        for i, m in enumerate(methods):
            xs, ys, es = [], [], []
            for k in sorted(by_target):
                runs = by_target[k].get(m)
                if not runs:
                    continue
                xs.append(statistics.fmean(r["flops_reduction"] for r in runs))
                mean, sd = _mean_sd([r["accuracy_final"] for r in runs])
                ys.append(mean)
                es.append(sd or 0.0)
            ours = m in OURS
            ax.errorbar(
                xs,
                ys,
                yerr=es,
                marker=markers[i % len(markers)],
                lw=2.4 if ours else 1.2,
                ls="-" if ours else "--",
                capsize=3,
                label=NAMES.get(m, m),
                zorder=3 if ours else 2,
            )
        ax.axhline(dense, color="k", lw=1, ls=":", label="dense")
        ax.set_xscale("log", base=2)
        ticks = sorted(by_target)
        ax.set_xticks(ticks, [f"÷{k:g}" for k in ticks])
        ax.minorticks_off()
        ax.set_xlabel("FLOPs reduction (dense / pruned, log scale)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (%)")
    axes[0].set_title("all methods", fontsize=10)
    axes[1].set_ylim(dense - 8, dense + 1)
    axes[1].set_title("zoom: within 8 points of dense", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    p = any_rec["protocol"]
    fig.suptitle(
        f"{key[0]}, {key[1]}: {p['train_images']} training images, {p['finetune_epochs']} fine-tuning "
        f"epoch(s) per method, FLOPs matched within 3 % (mean ± sd over seeds)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", required=True, help="folder of JSON records (run.py's OUT/records)")
    ap.add_argument("--out", required=True, help="where the .md/.png (and a copy of the records) go")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--copy-records", action="store_true", help="also copy the JSON records to OUT/records")
    args = ap.parse_args(argv)
    records = load_records(args.records)
    if not records:
        raise SystemExit(f"no records in {args.records}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key, by_target in sorted(aggregate(records).items()):
        stem = f"{key[0]}_{key[1]}"
        png = None if args.no_plot else f"{stem}.png"
        if png:
            plot(key, by_target, out / png)
        (out / f"{stem}.md").write_text(markdown(key, by_target, png))
        print(f"wrote {out / (stem + '.md')}" + (f" and {png}" if png else ""))
    (out / "summary.md").write_text(summary(aggregate(records)))
    if args.copy_records:
        rec_dir = out / "records"
        rec_dir.mkdir(exist_ok=True)
        for p in sorted(Path(args.records).glob("*.json")):
            (rec_dir / p.name).write_text(p.read_text())


if __name__ == "__main__":
    main()
