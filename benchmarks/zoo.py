"""Does ``prune()`` work on torchvision's model zoo? One row per architecture, resumable.

    python benchmarks/zoo.py [--models resnet18 vit_b_16 ...] [--flops-x 1.67] [--size 64]
                             [--out benchmarks/results/zoo.jsonl] [--threads 2]
                             [--method prune|prune_channels|auto]

``--method prune_channels`` runs :func:`~lightning_eigendamage.prune_channels` instead (records in
``zoo_channels.jsonl``); its ``reload`` check saves and loads the whole pickled model (a
channel-pruned model has no ``restore_pruned`` records), and ``skipped`` lists the layers not
scored and the groups left whole. ``--method auto`` runs ``prune(structure="auto")``, the
callback's default structure (records in ``zoo_auto.jsonl``, reloaded as the channel rows): each
row also says which structure was chosen (``structure``) and which layers were pruned in their
eigenbasis because no traced part of the channel graph covers them (``eigenbasis_layers``).

Each model is built with random weights (``weights=None``, ``torch.manual_seed(0)``; accuracy is
not the point) and pruned in place by ``prune(target="flops", ratio=1 - 1/flops_x)`` with the
library's defaults on ``--batches`` batches of ``--batch`` random images (``--size``² pixels, or
the fixed size the architecture needs) with random labels. The row records:

- ``flops_reached_x``: dense FLOPs / pruned FLOPs (``torch.utils.flop_counter``), and
  ``target_reached`` / ``limited_by`` from the report;
- ``finite``: the pruned model's eval-mode outputs on a held-out batch are all finite;
- ``reload_max_abs``: the largest difference between those outputs and the ones of a fresh,
  unpruned copy of the architecture restored with ``restore_pruned`` from the pruned state_dict
  (saved through ``torch.save`` / ``weights_only`` ``torch.load``), and ``reload_exact``
  (``≤ 1e-5 · max|output|``);
- ``layers`` / ``pruned_layers`` / ``skipped`` (layer name → reason) and ``prune_s``;
- ``trains``: one training-mode forward and backward of the pruned model gives a finite loss and a
  finite gradient for every trainable parameter;
- ``ok``: finite, reloads exactly, trains and removed FLOPs; a failure is recorded with its error
  (``error``), never dropped.

A model whose row is already in ``--out`` is skipped, so an interrupted sweep resumes.
``--table`` writes ``zoo.md`` beside ``--out`` from the records.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import shlex
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.speed import interleaved  # noqa: E402
from lightning_eigendamage import prune, prune_channels, restore_pruned  # noqa: E402
from lightning_eigendamage.costs import count_flops  # noqa: E402
from lightning_eigendamage.report import reason_lines  # noqa: E402

MODELS = (
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "mnasnet0_5",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "regnet_y_400mf",
    "densenet121",
    "googlenet",
    "alexnet",
    "vgg11_bn",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
    "maxvit_t",
)
FIXED_SIZE = {"vit_b_16": 224, "maxvit_t": 224}  # the architectures that need one input size
RESULTS = Path(__file__).resolve().parent / "results" / "zoo.jsonl"
CHANNEL_RESULTS = RESULTS.with_name("zoo_channels.jsonl")
AUTO_RESULTS = RESULTS.with_name("zoo_auto.jsonl")


def build(name: str) -> torch.nn.Module:
    """``torchvision.models.<name>`` with random weights drawn after ``manual_seed(0)``.

    A Linear initialised to all zeros (ViT's classification head) is re-drawn with its default
    initialisation: behind it no gradient reaches any layer, so every curvature would be zero and
    the scores meaningless (``prune`` says so with a ``ZeroCurvatureWarning``)."""
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"weights": None}
    if name == "googlenet":
        kwargs |= {"aux_logits": False, "init_weights": True}
    model = torchvision.models.get_model(name, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.any():
            m.reset_parameters()
    return model


def done(out: Path, key: tuple) -> bool:
    if not out.exists():
        return False
    for line in out.read_text().splitlines():
        r = json.loads(line)
        if (r["model"], r["flops_x"], r["size"], r.get("method", "prune")) == key:
            return True
    return False


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    size = FIXED_SIZE.get(name, args.size)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(args.batch, 3, size, size, generator=gen),
            torch.randint(0, 1000, (args.batch,), generator=gen),
        )
        for _ in range(args.batches)
    ]
    held_out = torch.randn(args.batch, 3, size, size, generator=gen)
    rec: dict[str, Any] = {
        "model": name,
        "flops_x": args.flops_x,
        "size": size,
        "method": args.method,
        "rank_by": args.rank_by,
    }
    model = build(name).eval()
    dense = copy.deepcopy(model) if args.speed_batch else None
    flops_before = count_flops(model, held_out)
    shapes = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.method == "prune_channels":
            ranking = {}
            if args.rank_by != "relative":  # by measured time: at the batch the speed-up is timed at
                ranking = {"rank_by": args.rank_by, "latency_batch": args.speed_batch or 8}
            report = prune_channels(model, batches, ratio=1.0 - 1.0 / args.flops_x, target="flops", **ranking)
        elif args.method == "auto":
            report = prune(model, batches, ratio=1.0 - 1.0 / args.flops_x, target="flops", structure="auto")
        else:
            report = prune(model, batches, ratio=1.0 - 1.0 / args.flops_x, target="flops")
    rec["prune_s"] = round(time.perf_counter() - t0, 2)
    rec["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught})
    flops_after = count_flops(model, held_out)
    rec |= {
        "flops_reached_x": flops_before / flops_after,
        "params_before": report.params_before,
        "params_after": report.params_after,
    }
    if args.method == "auto":
        rec["structure"] = report.structure
        rec["eigenbasis_layers"] = dict(report.eigenbasis_layers)
    if args.method == "prune_channels" or (args.method == "auto" and report.structure == "channels"):
        now = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        rec |= {
            "target_reached": rec["flops_reached_x"] >= 0.97 * args.flops_x,
            "limited_by": None,
            "layers": len(shapes),
            "pruned_layers": sum(1 for n, shape in shapes.items() if now.get(n) != shape),
            "skipped": dict(report.left_whole),
        }
    else:
        rec |= {
            "target_reached": report.target_reached,
            "limited_by": report.limited_by,
            "layers": len(report.layers),
            "pruned_layers": sum(1 for r in report.layers if r.removed_in or r.removed_out),
            "skipped": {r.name: r.skipped for r in report.layers if r.skipped is not None},
        }
    model.eval()
    with torch.no_grad():
        y = model(held_out)
    rec["finite"] = bool(torch.isfinite(y).all())
    buf = io.BytesIO()
    if args.method in ("prune_channels", "auto"):
        torch.save(model, buf)
        buf.seek(0)
        fresh = torch.load(buf, weights_only=False).eval()
    else:
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        fresh = restore_pruned(build(name), torch.load(buf, weights_only=True)).eval()
    with torch.no_grad():
        y2 = fresh(held_out)
    diff = float((y - y2).abs().max())
    rec["reload_max_abs"] = diff
    rec["reload_exact"] = diff <= 1e-5 * max(float(y.abs().max()), 1e-12)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(batches[0][0]), batches[0][1])
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    rec["trains"] = bool(torch.isfinite(loss)) and all(
        g is not None and torch.isfinite(g).all() for g in grads
    )
    rec["ok"] = rec["finite"] and rec["reload_exact"] and rec["trains"] and rec["flops_reached_x"] > 1.0
    if dense is not None:
        rec |= speedup(dense, model, size, args.speed_batch, args.speed_repeats, gen)
    return rec


def speedup(
    dense: nn.Module, pruned: nn.Module, size: int, batch: int, repeats: int, gen: torch.Generator
) -> dict[str, Any]:
    """Eval forward latency of the dense and the pruned model at ``batch``, timed alternately in
    this process (``benchmarks.speed.interleaved``: median of ``repeats``), and their ratio."""
    x = torch.randn(batch, 3, size, size, generator=gen)
    dense.eval(), pruned.eval()

    def run(m: nn.Module) -> Any:
        def call() -> None:
            with torch.no_grad():
                m(x)

        return call

    t = interleaved({"dense": run(dense), "pruned": run(pruned)}, repeats, torch.device("cpu"))
    return {
        f"latency_b{batch}_dense_ms": round(1e3 * t["dense"], 3),
        f"latency_b{batch}_pruned_ms": round(1e3 * t["pruned"], 3),
        "speed_batch": batch,
        "speedup": t["dense"] / t["pruned"],
    }


def table(records: list[dict[str, Any]], method: str = "prune", source: str = "zoo.jsonl") -> str:
    """A markdown table of the records (the last row per model, FLOPs target and size)."""
    last = {(r["model"], r["flops_x"], r["size"]): r for r in records}
    flag = "" if method == "prune" else f" --method {method}"
    reload = (
        "restored with `restore_pruned`"
        if method == "prune"
        else "loaded from the whole pickled model (`torch.save(model)`)"
    )
    call = 'prune(..., structure="auto")' if method == "auto" else f"{method}()"
    ranks = {r["rank_by"] for r in records if "rank_by" in r} or {"relative"}
    ranked = "" if ranks <= {"relative"} else ", rank_by=" + "/".join(sorted(repr(k) for k in ranks))
    out = (
        ""
        if source in ("zoo.jsonl", "zoo_channels.jsonl", "zoo_auto.jsonl")
        else f" --out benchmarks/results/{source}"
    )
    lines = [
        f"# torchvision architectures pruned by `{call}`{' ranked by measured time' if ranked else ''}",
        "",
        f"Generated by `python benchmarks/zoo.py --table{flag}{out}` from `{source}`",
        "(each row holds its command).",
        f'Random weights; `{call.split("(")[0]}(model, batches, ratio=1 - 1/k, target="flops"{ranked}'
        + (', structure="auto"' if method == "auto" else "")
        + ")` with the",
        "other defaults on random images with random labels (latency tables measured at the speed-up's",
        f"batch, where ranked by time). *Reload*: largest output difference of a fresh copy {reload}.",
        "*Trains*: a training step gives finite gradients.",
        "",
        "*Speed-up*: dense / pruned eval latency at the batch shown, on the row's threads, timed",
        "alternately in the row's process (median of 7; – where the row has no timing).",
        *(
            [
                '*Structure*: what `"auto"` chose; *in eigenbasis*: layers no traced part of the '
                "channel graph covers, pruned in their eigenbasis instead.",
            ]
            if method == "auto"
            else []
        ),
        "",
        "| model | input | ÷FLOPs asked | reached | speed-up | params kept | layers pruned / listed | "
        + ("structure | in eigenbasis | " if method == "auto" else "")
        + "left whole | warnings | reload | trains | prune s | ok |",
        "|" + " --- |" * (15 if method == "auto" else 13),
    ]
    for r in last.values():
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['size']}² | ÷{r['flops_x']:g} | {r['error'][:80]} |"
                + " |" * (9 if method == "auto" else 7)
                + " no |"
            )
            continue
        # one line per reason, worded as in PruneReport.summary() (without the names and advice)
        whole = "<br>".join(reason_lines(r["skipped"], names=0, advice=False)) or "–"
        warned = ", ".join(sorted({w.split(":")[0] for w in r["warnings"]})) or "–"
        lines.append(
            f"| {r['model']} | {r['size']}² | ÷{r['flops_x']:g} | ÷{r['flops_reached_x']:.2f} | "
            + (f"{r['speedup']:.2f}× (b{r['speed_batch']})" if "speedup" in r else "–")
            + " | "
            f"{r['params_after'] / r['params_before']:.0%} | {r['pruned_layers']} / {r['layers']} | "
            + (
                f"{r['structure']} | {', '.join(r['eigenbasis_layers']) or '–'} | "
                if method == "auto"
                else ""
            )
            + f"{whole} | {warned} | "
            f"{r['reload_max_abs']:.1e} | {'yes' if r['trains'] else 'no'} | {r['prune_s']:.1f} | "
            f"{'yes' if r['ok'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--flops-x", type=float, default=1.67, help="FLOPs target: dense / pruned")
    p.add_argument("--size", type=int, default=64, help="image side (except FIXED_SIZE models)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed-batch", type=int, default=8, help="time dense vs pruned at this batch (0: no)")
    p.add_argument("--speed-repeats", type=int, default=7)
    p.add_argument(
        "--redo", action="store_true", help="run models already recorded again (the last row wins)"
    )
    p.add_argument("--method", choices=("prune", "prune_channels", "auto"), default="prune")
    p.add_argument(
        "--rank-by",
        default="relative",
        choices=("relative", "relative_per_latency"),
        help="prune_channels' ranking (relative_per_latency: timed at --speed-batch; use its own --out)",
    )
    p.add_argument("--out", type=Path, default=None, help="default: results/zoo.jsonl (zoo_channels.jsonl)")
    p.add_argument("--table", action="store_true", help="write zoo.md beside --out from its records; no runs")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = {"prune_channels": CHANNEL_RESULTS, "auto": AUTO_RESULTS}.get(args.method, RESULTS)
    if args.table:
        records = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
        args.out.with_suffix(".md").write_text(table(records, args.method, args.out.name))
        print(args.out.with_suffix(".md"))
        return 0
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failures = 0
    for name in args.models:
        key = (name, args.flops_x, FIXED_SIZE.get(name, args.size), args.method)
        if not args.redo and done(args.out, key):
            print(f"{name}: done already")
            continue
        t0 = time.perf_counter()
        try:
            rec = run_model(name, args)
        except Exception as e:  # recorded, not dropped: the sweep is a record of what works
            rec = {
                "model": name,
                "flops_x": args.flops_x,
                "size": key[2],
                "ok": False,
                "rank_by": args.rank_by,
            }
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            rec["traceback"] = traceback.format_exc()[-2000:]
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        rec["torch"], rec["torchvision"] = torch.__version__, torchvision.__version__
        rec["threads"] = args.threads
        rec["date"] = time.strftime("%Y-%m-%d %H:%M")
        cmd = f"python benchmarks/zoo.py --models {name} --flops-x {args.flops_x:g} --size {args.size}"
        cmd += "" if args.method == "prune" else f" --method {args.method}"
        cmd += "" if args.rank_by == "relative" else f" --rank-by {args.rank_by} --out {args.out}"
        cmd += f" --batch {args.batch} --batches {args.batches} --threads {args.threads}"
        rec["command"] = cmd + f" --speed-batch {args.speed_batch} --speed-repeats {args.speed_repeats}"
        failures += not rec["ok"]
        with args.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        status = "ok" if rec["ok"] else f"FAILED ({rec.get('error', 'see record')})"
        reached = rec.get("flops_reached_x")
        print(f"{name}: {status}" + (f", ÷{reached:.2f} FLOPs" if reached else "") + f", {rec['seconds']} s")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    print(" ".join(shlex.quote(a) for a in ["python", *sys.argv]))
    sys.exit(main())
