"""Markdown tables and PNG plots from the benchmark records.

    python benchmarks/tables.py --records out/fmnist/records --out benchmarks/results/fashion-mnist
    python benchmarks/tables.py --converged benchmarks/results/converged

The second form reads ``benchmarks/converged.py``'s JSON-lines records (see
:func:`converged_report`) and also writes the documentation's results page, ``docs/results.md``
with its figures in ``docs/results/`` (see :func:`results_page`; ``--site DIR`` puts them
elsewhere, ``--site ''`` skips them); what follows describes the first (``benchmarks/run.py``'s
records).

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
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.*` when run as a script

NAMES = {
    "eigendamage": "EigenDamage (one-shot)",
    "eigendamage-iter": "EigenDamage (iterative, 3 rounds)",
    "c-obd": "C-OBD",
    "c-obs": "C-OBS",
    "kron-obd": "Kron-OBD",
    "kron-obs": "Kron-OBS",
    "kron-obs-in": "Input-side Kron-OBS (raw damage)",
    "kron-obs-in-flop": "Input-side Kron-OBS (damage per FLOP)",
    "kron-obs-in-mean": "Input-side Kron-OBS, ranked by damage over its group's mean",
    "kron-obs-in-mean-nocomp": "The same channels, removed without the compensation",
    "kron-obs-in-sqrt": "Input-side Kron-OBS, single-channel √damage over its group's mean",
    "kron-obs-in-sqrt-nocomp": "The same channels, removed without the compensation",
    "kron-obs-in-seq": "prune_channels (input-side Kron-OBS, greedy sequential √damage over the group mean)",
    "kron-obs-in-seq-flop": "The same, ranked over the FLOPs one channel saves",
    "kron-obs-in-seq-median": "The same, ranked against the group's median instead of its mean",
    "kron-obs-in-seq-latency": "The same, ranked over the measured time one channel saves (batch 64)",
    "kron-obs-in-seq-latency-train": "The same, over the training-step time one channel saves (batch 128)",
    "kron-obs-in-seq-r8": "prune_channels with every kept width a multiple of 8 (round_to=8)",
    "l1-comp": "L1 magnitude's channels, removed with the input-side compensation",
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
    ap.add_argument("--records", help="folder of JSON records (run.py's OUT/records)")
    ap.add_argument("--out", help="where the .md/.png (and a copy of the records) go")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--copy-records", action="store_true", help="also copy the JSON records to OUT/records")
    ap.add_argument(
        "--converged",
        metavar="DIR",
        help="instead: tables.md and plots of benchmarks/converged.py's records in DIR",
    )
    ap.add_argument(
        "--site",
        metavar="DIR",
        default=str(Path(__file__).resolve().parents[1] / "docs"),
        help="with --converged: where the documentation's results page goes (DIR/results.md and "
        "DIR/results/*.png; default: the repository's docs/); '' to skip it",
    )
    args = ap.parse_args(argv)
    if args.converged:
        converged_report(args.converged, plots=not args.no_plot)
        print(f"wrote {Path(args.converged) / 'tables.md'}")
        if args.site:
            every = converged_records(Path(args.converged))
            records = [r for r in every if not is_capped_channel_row(r)]
            page = results_page(records, Path(args.converged), Path(args.site), plots=not args.no_plot)
            print(f"wrote {page}")
        return
    if not args.records or not args.out:
        ap.error("--records and --out are required (or --converged DIR)")
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


# ---------------------------------------------------------------------------------------------
# Converged networks (benchmarks/converged.py): records.jsonl, width.jsonl, train_step.jsonl
# ---------------------------------------------------------------------------------------------

CONVERGED_MODELS = ("resnet20-narrow", "vgg-narrow", "mobilenetv2-narrow")
ISSUE_PEERS = ("l1", "l2", "taylor", "slimming")  # the channel-pruning peers of the goal
SHORT = {
    "eigendamage": "EigenDamage",
    "eigendamage-iter": "EigenDamage iterative",
    "eigendamage-gradual": "EigenDamage gradual",
    "c-obd": "C-OBD",
    "c-obs": "C-OBS",
    "kron-obd": "Kron-OBD",
    "kron-obs": "Kron-OBS",
    "kron-obs-in": "input Kron-OBS raw",
    "kron-obs-in-flop": "input Kron-OBS per FLOP",
    "kron-obs-in-mean": "input Kron-OBS, damage relative",
    "kron-obs-in-mean-nocomp": "input Kron-OBS, damage relative, no compensation",
    "kron-obs-in-sqrt": "input Kron-OBS, √damage relative (single)",
    "kron-obs-in-sqrt-nocomp": "input Kron-OBS, √damage relative (single), no compensation",
    "kron-obs-in-seq": "prune_channels",
    "kron-obs-in-seq-flop": "prune_channels, relative per FLOP",
    "kron-obs-in-seq-median": "prune_channels, relative to the median",
    "kron-obs-in-seq-latency": "prune_channels, relative per measured time",
    "kron-obs-in-seq-latency-train": "prune_channels, relative per training-step time",
    "kron-obs-in-seq-r8": "prune_channels, round_to=8",
    "l1-comp": "TP L1 channels + compensation",
    "slimming": "NN Slimming",
    "l1": "TP L1",
    "l2": "TP L2",
    "taylor": "TP Taylor",
}


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def converged_records(folder: Path) -> list[dict[str, Any]]:
    """The rows of ``records.jsonl``, one per key (a row run twice by two workers counts once)."""
    from benchmarks.converged import row_key

    return list({row_key(r): r for r in load_jsonl(folder / "records.jsonl")}.values())


def label(r: dict[str, Any]) -> str:
    """``EigenDamage <variant>`` for our rows (``defaults``: the library's defaults), else the peer."""
    if r["method"] in (*OURS, "eigendamage-gradual"):
        return f"{SHORT[r['method']]} {r['variant']}"
    return SHORT[r["method"]]


def _mean_range(values: list[float]) -> str:
    if not values:
        return "–"
    m = statistics.fmean(values)
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ({min(values):.2f}–{max(values):.2f})"


def _avg(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _flops_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("latency_x") is None and r["protocol_bn"]]


def after_pruning_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, variant, seed) with an accuracy right after pruning: the quick row
    where there is one, else a fine-tuned row (it measured the same pruning before training)."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["finetune"] != 0):
        if r.get("acc_after_quick") is not None:
            out.setdefault((r["method"], r["variant"], r["seed"]), r)
    return list(out.values())


def converged_summary(records: list[dict[str, Any]]) -> list[str]:
    """The defaults against the best channel-pruning peer (TP L1/L2/Taylor, NN Slimming) and
    against the best of every other method, at ÷4 and ÷8: after pruning (mean over seeds) and
    after the 3-epoch fine-tune (mean over the seeds run); the others' means are taken over the
    seeds the defaults ran."""
    out = ["## Summary: the defaults against the peers", ""]
    out += [
        'Defaults: `layer_cap=0.75`, `rank_by="damage_per_cost"`, BatchNorm re-estimated (after-pruning',
        "rows: variant `per-cost-cap0.75` as well, the same options). *Best setting*: `shots=4,",
        "reconstruct=True` on top (variant `all`). *Best peer*: the best of TP L1/L2/Taylor and NN",
        "Slimming in that column; *best other*: the best of every method that is not EigenDamage",
        "one-shot (C-OBD, C-OBS, Kron-OBD, Kron-OBS and iterative EigenDamage included). Seeds in",
        "brackets.",
        "",
        "| network | ÷FLOPs | defaults after pruning | best setting | best peer | gap | best other "
        "| defaults fine-tuned | best peer fine-tuned | gap | best other fine-tuned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = _flops_rows(records)
    for model in CONVERGED_MODELS:
        for fx in (4.0, 8.0):
            rs = [r for r in rows if r["model"] == model and r["flops_x"] == fx]
            quick = after_pruning_rows(rs)
            tuned = [r for r in rs if r["finetune"] == 3]
            ours = [r for r in quick if r["method"] == "eigendamage"]
            d_after = [r for r in ours if r["variant"] in ("per-cost-cap0.75", "defaults")]
            d_after = list({r["seed"]: r for r in d_after}.values())  # one per seed (same options)
            best = _avg([r for r in ours if r["variant"] == "all"], "acc_after_quick")

            def best_of(
                rows_: list[dict], key: str, methods: tuple | None, only: set[int] | None = None
            ) -> tuple[float | None, str]:
                """The best method's mean; over the seeds in ``only`` (those the defaults ran)."""
                by: dict[str, list[dict]] = defaultdict(list)
                for r in rows_:
                    if r["method"] == "eigendamage" or (methods and r["method"] not in methods):
                        continue
                    if only and r["seed"] not in only:
                        continue
                    by[SHORT[r["method"]]].append(r)
                means = {k: _avg(v, key) for k, v in by.items()}
                means = {k: v for k, v in means.items() if v is not None}
                if not means:
                    return None, "–"
                k = max(means, key=means.get)
                seeds = ",".join(str(s) for s in sorted({r["seed"] for r in by[k]}))
                return means[k], f"{k}, seeds {seeds}"

            a_seeds = {r["seed"] for r in d_after}
            pa, pa_who = best_of(quick, "acc_after_quick", ISSUE_PEERS, a_seeds)
            oa, oa_who = best_of(quick, "acc_after_quick", None, a_seeds)
            d_tuned_rows = [r for r in tuned if r["method"] == "eigendamage" and r["variant"] == "defaults"]
            dt = _avg(d_tuned_rows, "acc_finetuned")
            t_seeds = {r["seed"] for r in d_tuned_rows}
            pt, pt_who = best_of(tuned, "acc_finetuned", ISSUE_PEERS, t_seeds)
            ot, ot_who = best_of(tuned, "acc_finetuned", None, t_seeds)
            da = _avg(d_after, "acc_after_quick")
            gap1 = None if da is None or pa is None else da - pa
            gap2 = None if dt is None or pt is None else dt - pt
            ds = ",".join(str(r["seed"]) for r in sorted(d_tuned_rows, key=lambda r: r["seed"]))
            out.append(
                f"| {model} | ÷{fx:g} | {_f(da)} | {_f(best)} | {_f(pa)} ({pa_who}) | {_f(gap1)} "
                f"| {_f(oa)} ({oa_who}) | {_f(dt)} (seeds {ds or '–'}) | {_f(pt)} ({pt_who}) | {_f(gap2)} "
                f"| {_f(ot)} ({ot_who}) |"
            )
    return out + [""]


CHANNELS_METHOD = "kron-obs-in-seq"  # what prune_channels' defaults do


def channels_summary(records: list[dict[str, Any]]) -> list[str]:
    """``prune_channels`` (benchmark method :data:`CHANNELS_METHOD`, default cap) against the best
    channel-pruning peer at ÷4 and ÷8: after pruning and fine-tuned, means over the seeds run by
    ``prune_channels`` (the peers' means over the same seeds)."""
    method = CHANNELS_METHOD
    rows = [r for r in _flops_rows(records) if r["method"] in (method, *ISSUE_PEERS)]
    rows = [r for r in rows if r["variant"] == "-"]
    if not any(r["method"] == method for r in rows):
        return []
    out = [
        "## Summary: `prune_channels` (real channels) against the peers",
        "",
        f"Method `{method}`: input-side Kron-OBS compensation; each group's channels scored by a",
        "greedy sequential removal (`greedy_steps=32`), ranked by √score against the group's mean,",
        "cap 0.95 (the peers' cap), BatchNorm re-estimated. *Best peer*: the best of TP",
        "L1/L2/Taylor and NN Slimming in that column on the seeds they all ran, its mean over those",
        "of `prune_channels`' seeds it ran. Seeds in brackets.",
        "",
        "| network | ÷FLOPs | after pruning | best peer | gap | fine-tuned | best peer fine-tuned | gap "
        "| params kept (peer) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in CONVERGED_MODELS:
        for fx in (4.0, 8.0):
            rs = [r for r in rows if r["model"] == model and r["flops_x"] == fx]
            quick, tuned = after_pruning_rows(rs), [r for r in rs if r["finetune"] == 3]

            def mean_of(
                rows_: list[dict], key: str, name: str, only: set[int] | None = None
            ) -> tuple[float | None, str]:
                mine = [r for r in rows_ if r["method"] == name and r.get(key) is not None]
                mine = [r for r in mine if only is None or r["seed"] in only]
                seeds = ",".join(str(s) for s in sorted({r["seed"] for r in mine}))
                return _avg(mine, key), seeds

            def best(rows_: list[dict], key: str) -> tuple[float | None, str, float | None]:
                """The best peer, chosen on the seeds every peer ran (of those `method` ran), and
                its mean over all of `method`'s seeds it ran."""
                only = {r["seed"] for r in rows_ if r["method"] == method and r.get(key) is not None}
                means = {m: mean_of(rows_, key, m, only) for m in ISSUE_PEERS}
                means = {m: v for m, v in means.items() if v[0] is not None}
                if not means:
                    return None, "–", None
                ran = [
                    {r["seed"] for r in rows_ if r["method"] == m and r.get(key) is not None} & only
                    for m in means
                ]
                common = set.intersection(*ran)
                m = max(means, key=lambda k: mean_of(rows_, key, k, common)[0] if common else means[k][0])
                kept = _avg([r for r in rows_ if r["method"] == m], "param_ratio")
                return means[m][0], f"{SHORT[m]}, seeds {means[m][1]}", kept

            ca, ca_s = mean_of(quick, "acc_after_quick", method)
            ct, ct_s = mean_of(tuned, "acc_finetuned", method)
            pa, pa_who, _ = best(quick, "acc_after_quick")
            pt, pt_who, p_kept = best(tuned, "acc_finetuned")
            c_kept = _avg([r for r in rs if r["method"] == method], "param_ratio")
            gap1 = None if ca is None or pa is None else ca - pa
            gap2 = None if ct is None or pt is None else ct - pt
            kept = "–" if c_kept is None else f"{c_kept:.1%}" + ("" if p_kept is None else f" ({p_kept:.1%})")
            out.append(
                f"| {model} | ÷{fx:g} | {_f(ca)} (seeds {ca_s or '–'}) | {_f(pa)} ({pa_who}) | {_f(gap1)} "
                f"| {_f(ct)} (seeds {ct_s or '–'}) | {_f(pt)} ({pt_who}) | {_f(gap2)} | {kept} |"
            )
    return out + [""]


def converged_flops_tables(records: list[dict[str, Any]], folder: Path) -> list[str]:
    out: list[str] = []
    rows = _flops_rows(records)
    for model in CONVERGED_MODELS:
        dense = folder / f"dense-{model}.json"
        if not dense.exists():
            continue
        d = json.loads(dense.read_text())
        out += [f"## {model} (dense {d['test_accuracy']:.2f} %, {d['params']:,} parameters)", ""]
        for fx in sorted({r["flops_x"] for r in rows if r["model"] == model}):
            mine = [r for r in rows if r["model"] == model and r["flops_x"] == fx]
            out += [
                f"### ÷{fx:g} FLOPs",
                "",
                "| method | after pruning | fine-tuned 3 epochs | fine-tuned 10 epochs | FLOPs reached "
                "| params kept | seeds | prune s |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            labels = sorted({label(r) for r in mine}, key=lambda x: (not x.startswith("Eigen"), x))
            for lab in labels:
                rs = [r for r in mine if label(r) == lab]
                quick = [r["acc_after_quick"] for r in after_pruning_rows(rs)]
                first = [r["acc_after_first_round"] for r in rs if "acc_after_first_round" in r]
                after = (
                    _mean_range(quick) if quick else (f"{_mean_range(first)} (first round)" if first else "–")
                )
                t3 = [r["acc_finetuned"] for r in rs if r["finetune"] == 3]
                t10 = [r["acc_finetuned"] for r in rs if r["finetune"] == 10]
                reached = statistics.fmean(r["flops_reached_x"] for r in rs)
                note = " (target not reached)" if min(r["flops_reached_x"] for r in rs) < 0.97 * fx else ""
                kept = statistics.fmean(r["param_ratio"] for r in rs)
                seeds = ",".join(str(x) for x in sorted({r["seed"] for r in rs}))
                secs = statistics.fmean(r["prune_s"] for r in rs)
                out.append(
                    f"| {lab} | {after} | {_mean_range(t3)} | {_mean_range(t10)} | ÷{reached:.2f}{note} "
                    f"| {kept:.1%} | {seeds} | {secs:.1f} |"
                )
            out.append("")
    plain = [r for r in records if not r["protocol_bn"]]
    if plain:
        out += [
            "## What a plain `prune()` call gives (no BatchNorm re-estimation by the protocol)",
            "",
            "| network | variant | ÷FLOPs | after pruning |",
            "| --- | --- | --- | --- |",
        ]
        out += [
            f"| {r['model']} | {r['variant']} | ÷{r['flops_x']:g} | {r['acc_after_quick']:.2f} |"
            for r in plain
        ]
        out.append("")
    return out


def converged_latency_tables(records: list[dict[str, Any]]) -> list[str]:
    """The latency-matched rows: per network, memory format and target, each method's FLOPs ratio
    found by bisection, the measured latency (pruned / dense) and whether it matched within ±5 %."""
    rows = [r for r in records if r.get("latency_x") is not None]
    if not rows:
        return []
    out = [
        "## Accuracy at a measured-latency budget",
        "",
        "Each method is pruned to `1/k` of the dense network's measured latency (eval forward, batch",
        "64, 2 threads, median of the rounds timed alternately with the dense network), the FLOPs",
        "ratio found by bisection; *matched* says whether the final measurement (twice the rounds) is",
        "within ±5 % of the target. A method that cannot get that fast is listed with what it reached.",
        "The machine was shared with other benchmark and test processes while these ran (2 cores).",
        "",
    ]
    for model in CONVERGED_MODELS:
        for fmt in ("nchw", "channels_last"):
            mine = [r for r in rows if r["model"] == model and r["memory_format"] == fmt]
            if not mine:
                continue
            out += [
                f"### {model}, {fmt}",
                "",
                "| latency target | method | latency reached | matched | FLOPs ÷ | params kept "
                "| after pruning | fine-tuned 3 epochs |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for k in sorted({r["latency_x"] for r in mine}):
                for r in sorted(
                    (r for r in mine if r["latency_x"] == k), key=lambda r: (label(r), r["finetune"])
                ):
                    tuned = f"{r['acc_finetuned']:.2f}" if r.get("acc_finetuned") is not None else "–"
                    out.append(
                        f"| ×{1 / k:.2f} (÷{k:g}) | {label(r)} | ×{r['latency_rel']:.3f} "
                        f"| {'yes' if r['latency_matched'] else '**no**'} | ÷{r['flops_reached_x']:.2f} "
                        f"| {r['param_ratio']:.1%} | {r['acc_after_quick']:.2f} | {tuned} |"
                    )
            out.append("")
    return out


def width_table(folder: Path) -> list[str]:
    rows = load_jsonl(folder / "width.jsonl")
    if not rows:
        return []
    out = [
        "## Width: latency against channel pruning at the paper's widths",
        "",
        "`python benchmarks/converged.py width` (Fashion-MNIST padded to 32×32; short schedule: the",
        "accuracies only say that nothing collapsed). Speed-up = dense latency / pruned latency (eval,",
        "batch 64, 2 threads, interleaved medians); *ratio* = EigenDamage's speed-up / TP L2's.",
        "",
        "| network | ÷FLOPs | format | dense ms | EigenDamage speed-up | TP L2 speed-up | ratio "
        "| acc dense / ED / TP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for fmt in ("nchw", "channels_last"):
            out.append(
                f"| {r['model']} | ÷{r['flops_x']:g} | {fmt} | {r[f'dense_ms_{fmt}']:.1f} "
                f"| {r[f'speedup_eigendamage_{fmt}']:.2f}× | {r[f'speedup_tp-l2_{fmt}']:.2f}× "
                f"| {r[f'ed_over_tp_{fmt}']:.2f} | {r['dense_acc']:.1f} / {r['acc_eigendamage']:.1f} / "
                f"{r['acc_tp-l2']:.1f} |"
            )
    return out + [""]


def train_step_lines(folder: Path) -> list[str]:
    rows = load_jsonl(folder / "train_step.jsonl")
    if not rows:
        return []
    out = ["## Training step (forward, backward, SGD step; batch 128; one thread; interleaved medians)", ""]
    timed = [t for t in rows if "infer_speedup_vs_dense" in t]
    for t in rows:
        if t in timed:
            continue
        reached = t.get("flops_reached_x", {})  # recorded since the time-chosen forms (may fall short)

        ratios = ", ".join(
            f"{k} {v:.2f}×" + (f" (at ÷{reached[k]:.2f})" if k in reached and k != "dense" else "")
            for k, v in t["vs_tp_l2"].items()
        )
        out.append(f"- {t['model']} at ÷{t['flops_x']:g}, time against TP L2's: {ratios} (`{t['command']}`)")
    if timed:
        out += [
            "",
            "### Training step and batch-64 inference of the pruned networks, timed together",
            "",
            "Each row's networks are pruned from the same dense network on the same calibration batches",
            "and timed in one process, alternately (one thread; other jobs ran on the machine's other",
            "core). *step*: training-step time over dense's (lower is faster); *inference*: dense's",
            "eval-forward time at batch 64 over the pruned network's (higher is faster).",
            "",
            "| network | ÷FLOPs | pruned by | FLOPs reached | step (× dense) | inference speed-up |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for t in timed:
            for k in t["seconds_per_step"]:
                if k == "dense":
                    continue
                out.append(
                    f"| {t['model']} | ÷{t['flops_x']:g} | {SHORT.get(k.removeprefix('tp-'), k)} "
                    f"| ÷{t['flops_reached_x'][k]:.2f} | {t['vs_dense'][k]:.3f} "
                    f"| {t['infer_speedup_vs_dense'][k]:.2f}× |"
                )
        out += ["", "Commands: " + "; ".join(f"`{t['command']}`" for t in timed)]
    return out + [""]


def callback_bn_table(folder: Path) -> list[str]:
    """The callback's BatchNorm re-estimation (``benchmarks/callback_bn.py``): test accuracy
    (first 3,000 images) k optimizer steps after the round, with ``recalibrate_bn`` off and on."""
    rows = load_jsonl(folder / "callback_bn.jsonl")
    if not rows:
        return []
    steps = sorted({int(k) for r in rows for k in r["acc_after_steps"]})
    out = [
        "## The callback's BatchNorm re-estimation (a Lightning fit, pruned after step 10)",
        "",
        "Test accuracy (first 3,000 images, eval mode) k optimizer steps after the round; the same",
        "data order with `recalibrate_bn` off and on (`benchmarks/callback_bn.py`).",
        "",
        "| network | ÷FLOPs | seed | recalibrate_bn | " + " | ".join(f"k={k}" for k in steps) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in steps) + " |",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], r["flops_x"], r["seed"], r["recalibrate_bn"])):
        accs = " | ".join(_f(r["acc_after_steps"].get(str(k))) for k in steps)
        out.append(f"| {r['model']} | {r['flops_x']:g} | {r['seed']} | {r['recalibrate_bn']} | {accs} |")
    commands = sorted({r["command"] for r in rows})
    return out + ["", "Commands: " + "; ".join(f"`{c}`" for c in commands), ""]


def callback_structures_table(folder: Path) -> list[str]:
    """The callback itself per structure (``benchmarks/callback_structures.py``): test accuracy
    after the fit, FLOPs reached and the batch-64 CPU speed-up over the dense network, per
    (network, ÷FLOPs, schedule, method), mean over the seeds that ran (listed)."""
    rows = load_jsonl(folder / "callback_structures.jsonl")
    if not rows:
        return []
    out = [
        "## The callback per structure (a Lightning fine-tune, Torch-Pruning L1 on the same schedule)",
        "",
        "`EigenDamagePruning(structure=...)` with its defaults, and Torch-Pruning's L1 applied at the same",
        "points with the same optimizer rebuild. `oneshot`: one round at the start of a 3-epoch fine-tune;",
        "`iterative`: rounds at the ends of epochs 0, 1, 2 of a 6-epoch fine-tune. Accuracy on the full test",
        "set after the fit; speed-up: dense / pruned median eval latency at batch 64 on one CPU thread,",
        "timed alternately in the row's process.",
        "",
        "| network | ÷FLOPs | schedule | method | seeds | accuracy | ÷FLOPs reached | speed-up b64 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["flops_x"], r["schedule"], r["method"]), []).append(r)
    for (model, fx, sched, method), rs in sorted(groups.items()):
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        out.append(
            f"| {model} | {fx:g} | {sched} | {method} | {seeds} | {_mean_range([r['acc'] for r in rs])} | "
            f"{_avg(rs, 'flops_reached_x'):.2f} | {_avg(rs, 'speedup_b64'):.2f}× |"
        )
    commands = sorted({r["command"] for r in rows})
    out += ["", "Commands: " + "; ".join(f"`{c}`" for c in commands), ""]
    timed = load_jsonl(folder / "callback_structures_latency.jsonl")
    if timed:
        out += _per_method_table(
            timed,
            "speedup_b64",
            "{:.2f}×",
            "Speed-up at batch 64 of the networks of one (network, ÷FLOPs, schedule, seed), timed\n"
            "alternately in one process with the dense one (`--compare`; median of the repeats):",
        )
        out += _per_method_table(
            timed,
            "train_step_vs_dense",
            "{:.2f}",
            "A training step (forward, backward, SGD step at batch 128) of each pruned network, as a\n"
            "fraction of the dense network's, timed alike:",
        )
        out += ["Commands: " + "; ".join(f"`{c}`" for c in sorted({r["command"] for r in timed})), ""]
    return out


def _per_method_table(rows: list[dict[str, Any]], key: str, fmt: str, caption: str) -> list[str]:
    """One row per (network, ÷FLOPs, schedule, seed), one column per method of ``r[key]``."""
    methods = sorted(rows[0]["speedup_b64"])
    out = [
        *caption.split("\n"),
        "",
        "| network | ÷FLOPs | schedule | seed | " + " | ".join(methods) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in methods) + " |",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], r["flops_x"], r["schedule"], r["seed"])):
        values = r.get(key, {})
        cells = " | ".join(fmt.format(values[k]) if k in values else "–" for k in methods)
        out.append(f"| {r['model']} | {r['flops_x']:g} | {r['schedule']} | {r['seed']} | {cells} |")
    return out + [""]


def plot_label(r: dict[str, Any]) -> str | None:
    """The plots' line of a record: the peers, and of EigenDamage the defaults (also as variant
    ``per-cost-cap0.75``, the same options), ``all``, ``latency-forms``, iterative and gradual;
    the other ablation variants are in the tables only."""
    if r["method"] == "eigendamage":
        variant = "defaults" if r["variant"] == "per-cost-cap0.75" else r["variant"]
        return f"EigenDamage {variant}" if variant in ("defaults", "all", "latency-forms") else None
    return label(r)


def _curve(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(y) is not None:
            pts[r[x]].append(r[y])
    keys = sorted(pts)
    return keys, [statistics.fmean(pts[k]) for k in keys]


def converged_plots(records: list[dict[str, Any]], folder: Path) -> list[str]:
    """Per network, one line per method: accuracy against FLOPs reduction and against measured
    latency (the latency-matched rows, NCHW and channels_last), right after pruning (top row)
    and after the 3-epoch fine-tune (bottom row: the final accuracy). Returns the PNG names
    written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    flops = _flops_rows(records)
    lat = [r for r in records if r.get("latency_x") is not None]
    for model in CONVERGED_MODELS:
        mine = [r for r in flops if r["model"] == model]
        if not mine:
            continue
        dense = json.loads((folder / f"dense-{model}.json").read_text())["test_accuracy"]
        # top row: right after pruning; bottom row: after the 3-epoch fine-tune (final accuracy)
        fig, grid = plt.subplots(2, 3, figsize=(17, 10))
        panels = [
            (
                grid[0][0],
                [r for r in mine if not r["finetune"]],
                "flops_x",
                "acc_after_quick",
                "after pruning",
            ),
            (
                grid[1][0],
                [r for r in mine if r["finetune"] == 3],
                "flops_x",
                "acc_finetuned",
                "fine-tuned 3 epochs",
            ),
        ]
        for i, fmt in enumerate(("nchw", "channels_last")):
            here = [r for r in lat if r["model"] == model and r["memory_format"] == fmt]
            title = f"latency-matched rows, {fmt}"
            rs = [r for r in here if not r["finetune"]]
            panels.append((grid[0][1 + i], rs, "latency_rel", "acc_after_quick", f"{title}, after pruning"))
            rs = [r for r in here if r["finetune"] == 3 and r.get("latency_rel") is not None]
            panels.append(
                (grid[1][1 + i], rs, "latency_rel", "acc_finetuned", f"{title}, fine-tuned 3 epochs")
            )
        axes = [grid[0][0], grid[1][0]]
        every = sorted({lab for _, rows, *_ in panels for r in rows if (lab := plot_label(r))})
        colour = {lab: plt.get_cmap("tab20")(i % 20) for i, lab in enumerate(every)}  # one per method
        for ax, rows, x, y, title in panels:
            by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for r in rows:
                if (lab := plot_label(r)) is not None:
                    by_label[lab].append(r)
            for lab in sorted(by_label, key=lambda s: (not s.startswith("Eigen"), s)):
                xs, ys = _curve(by_label[lab], x, y)
                ours = lab.startswith("Eigen")
                ax.plot(
                    xs,
                    ys,
                    marker="o" if ours else "s",
                    lw=2.2 if ours else 1.1,
                    ls="-" if ours else "--",
                    color=colour[lab],
                    label=lab,
                )
            ax.axhline(dense, color="k", lw=1, ls=":", label="dense")
            if x == "flops_x":
                ax.set_xscale("log", base=2)
                ax.set_xlabel("FLOPs reduction target (dense / pruned; each row within 3 %)")
            else:
                ax.set_xlabel("measured latency, pruned / dense (batch 64, 2 threads)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes:
            ax.set_ylabel("test accuracy (%)")
        fig.suptitle(f"{model} (converged, full Fashion-MNIST): mean over seeds", fontsize=11)
        fig.tight_layout()
        name = f"{model}.png"
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        written.append(name)
    return written


def runs_section(records: list[dict[str, Any]], folder: Path) -> list[str]:
    """What was run and how long it took: records per kind, and the seconds they recorded."""
    kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("latency_x") is not None:
            kind = "latency-matched, fine-tuned" if r["finetune"] else "latency-matched, after pruning"
        elif r["finetune"]:
            kind = f"FLOPs target, fine-tuned {r['finetune']} epochs"
        else:
            kind = "FLOPs target, after pruning"
        kinds[kind].append(r)
    out = [
        "## What was run",
        "",
        "Seconds as recorded by each row (pruning, including the latency bisection and gradual epochs,",
        "plus fine-tuning); rows ran one thread each, two to four at a time on 2 cores, so they",
        "are wall-clock seconds under that load.",
        "",
        "| rows | records | seconds recorded |",
        "| --- | --- | --- |",
    ]
    for kind in sorted(kinds):
        rs = kinds[kind]
        # the iterative rows' prune_s spans their fine-tune; the gradual rows' spans their epoch
        secs = sum(
            r.get("prune_s", 0) + (r["method"] != "eigendamage-iter") * r.get("finetune_s", 0) for r in rs
        )
        out.append(f"| {kind} | {len(rs)} | {secs:,.0f} |")
    width = load_jsonl(folder / "width.jsonl")
    if width:
        out.append(f"| width rows | {len(width)} | – (training cached; see `train_s`) |")
    dates = sorted(r["date"] for r in records if "date" in r)
    if dates:
        out += ["", f"Dated records run from {dates[0]} to {dates[-1]} (older records carry no date)."]
    return out + [""]


def is_capped_channel_row(r: dict[str, Any]) -> bool:
    """A channel method run with a per-layer cap other than the default (``--group-cap``)."""
    return r["method"] not in (*OURS, "eigendamage-gradual") and r["variant"] != "-"


def baseline_cap_table(capped: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[str]:
    """The channel methods at the default cap (0.95) against the same rows with a tighter one
    (``--group-cap``), seed 0: accuracy after pruning and fine-tuned, and the narrowest layer."""
    if not capped:
        return []
    out = [
        "## The paper's channel baselines with a tighter per-layer cap",
        "",
        "Channel methods remove at most 95 % of a layer's channels by default (Torch-Pruning's default",
        "and the paper's `prune_ratio_limit`); these rows set the cap to the value shown (`--group-cap`),",
        "seed 0, 3 fine-tuning epochs. *Narrowest*: the fewest output channels any pruned layer keeps",
        "(recorded with the capped rows only).",
        "",
        "| network | ÷FLOPs | method | cap | after pruning | fine-tuned | narrowest "
        "| default cap: after pruning | fine-tuned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(capped, key=lambda r: (r["model"], r["flops_x"] or 0, r["method"], r["variant"])):
        ref = [
            x
            for x in records
            if (x["model"], x["method"], x["flops_x"], x["seed"], x["variant"], x.get("latency_x"))
            == (r["model"], r["method"], r["flops_x"], r["seed"], "-", None)
            and x["protocol_bn"]
        ]
        ref_after = _avg(after_pruning_rows(ref), "acc_after_quick")
        ref_tuned = _avg([x for x in ref if x["finetune"] == r["finetune"]], "acc_finetuned")
        widths = r.get("widths") or {}
        narrow = f"{min(widths.values())}" if widths else "–"
        out.append(
            f"| {r['model']} | ÷{r['flops_x']:g} | {SHORT[r['method']]} | {r['variant'][3:]} | "
            f"{_f(r.get('acc_after_quick'))} | {_f(r.get('acc_finetuned'))} | {narrow} | "
            f"{_f(ref_after)} | {_f(ref_tuned)} |"
        )
    return out + [""]


# ---------------------------------------------------------------------------------------------
# The documentation's results page (docs/results.md and docs/results/*.png)
# ---------------------------------------------------------------------------------------------

#: method keys of the results page's plots: the two structures, then the peers
STRUCTURE_LINES = {
    "kron-obs-in-seq": "channels (prune_channels)",
    "eigendamage": "eigenbasis (prune() defaults)",
    "l1": "TP L1",
    "l2": "TP L2",
    "taylor": "TP Taylor",
    "slimming": "NN Slimming",
}
CALLBACK_LINES = {"channels": "callback, channels", "eigenbasis": "callback, eigenbasis", "tp-l1": "TP L1"}


def _style(name: str) -> dict[str, Any]:
    """One colour and marker per method, the same in every plot of the page."""
    palette = {
        "channels": ("tab:blue", "o"),
        "eigenbasis": ("tab:orange", "D"),
        "TP L1": ("tab:green", "s"),
        "TP L2": ("tab:olive", "^"),
        "TP Taylor": ("tab:purple", "v"),
        "NN Slimming": ("tab:gray", "x"),
        "eigenbasis, form_by": ("tab:red", "P"),
    }
    if name.startswith("eigenbasis, form_by"):
        colour, marker = palette["eigenbasis, form_by"]
        return {"color": colour, "marker": marker, "lw": 2.2, "ls": "-"}
    key = next((k for k in palette if name.startswith(k) or f", {k}" in name), "TP L1")
    colour, marker = palette[key]
    ours = not name.startswith(("TP", "NN"))
    return {"color": colour, "marker": marker, "lw": 2.2 if ours else 1.2, "ls": "-" if ours else "--"}


def _page_line(r: dict[str, Any]) -> str | None:
    """The results page's line of a records.jsonl row: the library's two structures at their
    defaults (``per-cost-cap0.75`` is the eigenbasis defaults' earlier name), and the peers."""
    if r["method"] == "eigendamage":
        return STRUCTURE_LINES["eigendamage"] if r["variant"] in ("defaults", "per-cost-cap0.75") else None
    if r["variant"] != "-":
        return None
    return STRUCTURE_LINES.get(r["method"])


def _dense_acc(folder: Path, model: str) -> float | None:
    path = folder / f"dense-{model}.json"
    return json.loads(path.read_text())["test_accuracy"] if path.exists() else None


def _draw(ax: Any, rows: list[dict[str, Any]], line_of: Any, x: str, y: str, points: bool = False) -> None:
    """One line per method (means per x), or with ``points`` one marker per row."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if (lab := line_of(r)) is not None and r.get(y) is not None and r.get(x) is not None:
            by[lab].append(r)
    for lab in sorted(by, key=lambda s: (s.startswith(("TP", "NN")), s)):
        style = _style(lab)
        if points:
            xs, ys = [r[x] for r in by[lab]], [r[y] for r in by[lab]]
            style.update(ls="none", ms=7)
        else:
            xs, ys = _curve(by[lab], x, y)
        ax.plot(xs, ys, label=lab, **style)


def results_plots(records: list[dict[str, Any]], folder: Path, out: Path) -> list[str]:
    """The results page's three figures, written to ``out``; returns their names.

    ``callback.png``: the callback per structure against Torch-Pruning L1 on the same schedule
    (``callback_structures.jsonl``): accuracy after the fit against the FLOPs reduction reached
    and against the measured speed-up. ``flops.png``: each structure and each peer at a FLOPs
    budget (``records.jsonl``), right after pruning and after the 3-epoch fine-tune.
    ``latency.png``: the latency-matched rows (the eigenbasis and Torch-Pruning's importances;
    the channel structure has no such rows), against the measured latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []

    cb = load_jsonl(folder / "callback_structures.jsonl")
    models = [m for m in CONVERGED_MODELS if any(r["model"] == m for r in cb)]
    if models:
        fig, grid = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
        for i, model in enumerate(models):
            for j, (x, xlabel) in enumerate(
                (
                    ("flops_reached_x", "FLOPs reduction reached (dense / pruned)"),
                    ("speedup_b64", "measured speed-up over dense (eval, batch 64, 1 CPU thread)"),
                )
            ):
                ax = grid[i][j]
                for sched, ls in (("oneshot", "-"), ("iterative", ":")):
                    rows = [r for r in cb if r["model"] == model and r["schedule"] == sched]
                    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
                    for r in rows:
                        by[CALLBACK_LINES.get(r["method"], r["method"])].append(r)
                    for lab, rs in sorted(by.items()):
                        pts: dict[float, list[dict[str, Any]]] = defaultdict(list)
                        for r in rs:
                            pts[r["flops_x"]].append(r)
                        keys = sorted(pts)
                        xs = [statistics.fmean(r[x] for r in pts[k]) for k in keys]
                        ys = [statistics.fmean(r["acc"] for r in pts[k]) for k in keys]
                        style = _style(lab.replace("callback, ", ""))
                        style["ls"] = ls
                        ax.plot(xs, ys, label=f"{lab} ({sched})", **style)
                _finish(
                    ax,
                    _dense_acc(folder, model),
                    xlabel,
                    "test accuracy after the fit (%)",
                    f"{model}: targets ÷4 and ÷8 FLOPs",
                )
        fig.suptitle(
            "EigenDamagePruning per structure against Torch-Pruning L1 (mean over seeds)", fontsize=11
        )
        fig.tight_layout()
        fig.savefig(out / "callback.png", dpi=80)
        plt.close(fig)
        written.append("callback.png")

    flops = [r for r in _flops_rows(records) if r["model"] in CONVERGED_MODELS]
    models = [m for m in CONVERGED_MODELS if any(r["model"] == m for r in flops)]
    if models:
        fig, grid = plt.subplots(2, len(models), figsize=(5.5 * len(models), 8.5), squeeze=False)
        for j, model in enumerate(models):
            mine = [r for r in flops if r["model"] == model]
            panels = (
                (grid[0][j], after_pruning_rows_all(mine), "acc_after_quick", "right after pruning"),
                (grid[1][j], [r for r in mine if r["finetune"] == 3], "acc_finetuned", "fine-tuned 3 epochs"),
            )
            for ax, rows, y, title in panels:
                _draw(ax, rows, _page_line, "flops_x", y)
                ax.set_xscale("log", base=2)
                _finish(
                    ax,
                    _dense_acc(folder, model),
                    "FLOPs reduction target (dense / pruned)",
                    "test accuracy (%)",
                    f"{model}, {title}",
                )
        fig.suptitle("Each structure and each peer at a FLOPs budget (mean over seeds)", fontsize=11)
        fig.tight_layout()
        fig.savefig(out / "flops.png", dpi=80)
        plt.close(fig)
        written.append("flops.png")

    lat = [r for r in records if r.get("latency_x") is not None and r.get("latency_rel") is not None]
    cells = [(m, f) for m in CONVERGED_MODELS for f in ("nchw", "channels_last")]
    cells = [(m, f) for m, f in cells if any(r["model"] == m and r["memory_format"] == f for r in lat)]
    if cells:

        def lat_line(r: dict[str, Any]) -> str | None:
            if r["method"] == "eigendamage" and r["variant"] == "latency-forms":
                return "eigenbasis, form_by=latency"
            return _page_line(r)

        fig, grid = plt.subplots(2, len(cells), figsize=(4.6 * len(cells), 8.5), squeeze=False)
        for j, (model, fmt) in enumerate(cells):
            mine = [r for r in lat if r["model"] == model and r["memory_format"] == fmt]
            panels = (
                (
                    grid[0][j],
                    [r for r in mine if not r["finetune"]],
                    "acc_after_quick",
                    "right after pruning",
                ),
                (grid[1][j], [r for r in mine if r["finetune"] == 3], "acc_finetuned", "fine-tuned 3 epochs"),
            )
            for ax, rows, y, title in panels:
                _draw(ax, rows, lat_line, "latency_rel", y, points=True)
                _finish(
                    ax,
                    None,
                    "measured latency, pruned / dense (batch 64)",
                    "test accuracy (%)",
                    f"{model}, {fmt}, {title}",
                    fontsize=9,
                )
        fig.suptitle("At a measured-latency budget (seed 0; one marker per row; left is faster)", fontsize=11)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=80)
        plt.close(fig)
        written.append("latency.png")
    return written


def _demoted(lines: list[str]) -> list[str]:
    """A table section's lines one heading level down (its ``##`` become ``###`` on the page)."""
    return ["#" + line if line.startswith("## ") else line for line in lines]


def _finish(ax: Any, dense: float | None, xlabel: str, ylabel: str, title: str, fontsize: int = 10) -> None:
    """The dense network's accuracy as a dotted line (if known), the labels, grid and legend."""
    if dense is not None:
        ax.axhline(dense, color="k", lw=1, ls=":", label="dense")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=fontsize)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def after_pruning_rows_all(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`after_pruning_rows` per (network, ÷FLOPs): one row per method, variant and seed."""
    by: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by[(r["model"], r["flops_x"])].append(r)
    return [r for rs in by.values() for r in after_pruning_rows(rs)]


def callback_page_table(folder: Path) -> list[str]:
    """One row per (network, ÷FLOPs, schedule): accuracy and speed-up of each structure and of
    Torch-Pruning L1, mean over the seeds run."""
    rows = load_jsonl(folder / "callback_structures.jsonl")
    if not rows:
        return []
    methods = [m for m in CALLBACK_LINES if any(r["method"] == m for r in rows)]
    out = [
        "| network | ÷FLOPs | schedule | " + " | ".join(CALLBACK_LINES[m] for m in methods) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |",
    ]
    keys = sorted(
        {(r["model"], r["flops_x"], r["schedule"]) for r in rows},
        key=lambda k: (k[0], k[1], k[2] != "oneshot"),
    )
    for model, fx, sched in keys:
        cells = []
        for m in methods:
            rs = [
                r
                for r in rows
                if (r["model"], r["flops_x"], r["schedule"], r["method"]) == (model, fx, sched, m)
            ]
            if not rs:
                cells.append("–")
                continue
            seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
            acc = statistics.fmean(r["acc"] for r in rs)
            word = "seeds" if len(rs) > 1 else "seed"
            cells.append(f"{acc:.2f} %, {_avg(rs, 'speedup_b64'):.2f}× ({word} {seeds})")
        out.append(f"| {model} | ÷{fx:g} | {sched} | " + " | ".join(cells) + " |")
    return out + [""]


def results_page(records: list[dict[str, Any]], folder: Path, site: Path, plots: bool = True) -> Path:
    """``site/results.md`` and its figures (``site/results/*.png``) from the committed records in
    ``folder``: the documentation's results page. Returns the page's path."""
    pngs = results_plots(records, folder, site / "results") if plots else []
    rel = folder.resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix()
    dense = {m: _dense_acc(folder, m) for m in CONVERGED_MODELS}
    dense_txt = ", ".join(f"{m} {a:.2f} %" for m, a in dense.items() if a is not None)
    out = [
        "# Results",
        "",
        f"<!-- Generated by `python benchmarks/tables.py --converged {rel}`; do not edit by hand. -->",
        "",
        "Generated by `python benchmarks/tables.py --converged "
        f"{rel}` from the committed records in `{rel}/` (`records.jsonl`,",
        "`callback_structures.jsonl`, `callback_structures_latency.jsonl`, `train_step.jsonl`,",
        "`callback_bn.jsonl`). Every record holds the command that produced it. The complete tables,",
        f"with every method, variant and seed, are in `{rel}/tables.md` in the repository.",
        "",
        "The networks were trained to convergence on the full Fashion-MNIST (60,000 images) and are",
        f"committed beside the records. Dense test accuracy: {dense_txt}. Everything ran on a CPU, one",
        "thread per row, two or three rows at a time on a 2-core machine. How the runs were made and",
        "what they mean: [Benchmarks](benchmarks.md).",
        "",
        "## The callback per structure, against Torch-Pruning",
        "",
        "`EigenDamagePruning(structure=...)` with its defaults, and Torch-Pruning's L1 importance",
        "applied at the same points with the same optimizer rebuild. *oneshot*: one round at the",
        "start of a 3-epoch fine-tune; *iterative*: rounds at the ends of epochs 0, 1 and 2 of a",
        "6-epoch fine-tune. Each cell: test accuracy after the fit (full test set, mean over the",
        "seeds), and the speed-up over the dense network of an eval forward at batch 64 on one CPU",
        "thread, timed alternately with the dense network in the row's own process.",
        "",
    ]
    out += callback_page_table(folder)
    if "callback.png" in pngs:
        out += ["![The callback per structure](results/callback.png)", ""]
    timed = load_jsonl(folder / "callback_structures_latency.jsonl")
    if timed:
        out += _per_method_table(
            timed,
            "speedup_b64",
            "{:.2f}×",
            "The rows above timed in separate processes, two or three at once, so compare their\n"
            "speed-ups loosely. Timed alternately in one process (`--compare`, seed 1), the speed-up\n"
            "at batch 64 over the dense network:",
        )
        out += _per_method_table(
            timed,
            "train_step_vs_dense",
            "{:.2f}",
            "and a training step (forward, backward, SGD step at batch 128) as a fraction of the\n"
            "dense network's:",
        )
    out += [
        "## Each structure and each peer at a FLOPs budget",
        "",
        "Every method prunes a copy of the converged network to the FLOPs target with the same 10",
        "calibration batches of 128 training images; BatchNorm is then re-estimated on those",
        "batches for every method. *After pruning*: first 3,000 test images. *Fine-tuned*: 3 epochs",
        "(lr 0.01, cosine), full test set. The channel structure is `prune_channels` (benchmark",
        f"method `{CHANNELS_METHOD}`); the eigenbasis is `prune(model, calib, ratio=1 - 1/k,",
        'target="flops")` with its defaults. Peers: Torch-Pruning\'s L1, L2 and group-Taylor',
        "importances and NN Slimming, all removing real channels.",
        "",
    ]
    if "flops.png" in pngs:
        out += ["![Accuracy against FLOPs](results/flops.png)", ""]
    out += _demoted(channels_summary(records))
    out += _demoted(converged_summary(records))
    out += [
        "## At a measured-latency budget",
        "",
        "Each method pruned to a fraction of the dense network's measured latency (eval forward,",
        "batch 64, 2 threads), its FLOPs ratio found by bisection; seed 0. Only the eigenbasis and",
        "Torch-Pruning's importances have rows of this kind; the channel structure's measured speed",
        "is in the first section. *form_by=latency*: the eigenbasis with each layer's form chosen",
        "by its measured time.",
        "",
    ]
    if "latency.png" in pngs:
        out += ["![Accuracy against measured latency](results/latency.png)", ""]
    out += _demoted(train_step_lines(folder))
    out += _demoted(callback_bn_table(folder))
    page = site / "results.md"
    page.write_text("\n".join(out).rstrip() + "\n")
    return page


def converged_report(folder: str | Path, plots: bool = True) -> str:
    """``tables.md`` (and one PNG per network) in ``folder`` from its records: the summary, the
    accuracy-at-FLOPs tables, the latency-matched tables, the width rows and the training step."""
    folder = Path(folder)
    every = converged_records(folder)
    capped = [r for r in every if is_capped_channel_row(r)]  # a table of their own
    records = [r for r in every if not is_capped_channel_row(r)]
    out = [
        "# Pruning converged networks (full Fashion-MNIST)",
        "",
        "Generated by `python benchmarks/tables.py --converged benchmarks/results/converged` from",
        "`records.jsonl`, `width.jsonl`, `train_step.jsonl`, `callback_bn.jsonl` and",
        "`callback_structures.jsonl` (every record",
        "holds the command that reproduces it). Accuracy in %. *After pruning*: BatchNorm re-estimated",
        "on the 10 calibration batches, first 3,000 test images. *Fine-tuned*: 3 (or 10) epochs, lr",
        "0.01 cosine, full test set. Mean over seeds, range in brackets; seeds listed. Rows ran on one",
        "thread each, two or three at a time on a 2-core machine.",
        "",
    ]
    pngs = converged_plots(records, folder) if plots else []
    out += [f"![{p}]({p})" for p in pngs] + ([""] if pngs else [])
    out += converged_summary(records)
    out += channels_summary(records)
    out += train_step_lines(folder)
    out += callback_bn_table(folder)
    out += callback_structures_table(folder)
    out += converged_flops_tables(records, folder)
    out += converged_latency_tables(records)
    out += baseline_cap_table(capped, records)
    out += width_table(folder)
    out += runs_section(every, folder)
    text = "\n".join(out)
    (folder / "tables.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
