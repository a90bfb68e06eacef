"""Speed and memory of curvature capture, the prune step and pruned models, as ratios in one run.

    python benchmarks/speed.py --quick            # a few minutes on 2 CPU cores
    python benchmarks/speed.py --device cuda      # on a GPU
    python benchmarks/speed.py --quick --profile  # plus a per-op profile of the capture steps

Every figure is a ratio of two timings taken in the same process, interleaved and repeated
(medians), because the machines here are noisy. Peak memory per phase is measured in a fresh
subprocess per phase: the phase's own peak RSS (``VmHWM`` reset through ``/proc/self/clear_refs``
right before it) over the RSS the process had before the model existed (CPU), or
``torch.cuda.max_memory_allocated`` after a reset (CUDA). ``--profile`` also prints where the time
of the plain, empirical-capture and true-Fisher steps goes (self time per op).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.models import resnet32, vgg19  # noqa: E402
from lightning_eigendamage import prune  # noqa: E402
from lightning_eigendamage.curvature import KFACapture, capture_batch, capture_factors  # noqa: E402
from lightning_eigendamage.pruner import find_layers  # noqa: E402

TARGETS = {
    "empirical_capture": 1.15,
    "true_fisher_step": 2.0,
    "epoch_overhead": 1.05,
    "prune_vgg19_s": 2.0,
    "prune_resnet50_s": 10.0,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def make_model(name: str, device: torch.device) -> nn.Module:
    if name == "resnet32":
        model = resnet32(widths=(16, 32, 64))
    elif name == "vgg19":
        model = vgg19()
    elif name == "resnet50":
        model = torchvision.models.resnet50()
    else:
        raise ValueError(name)
    return model.to(device)


# ---------------------------------------------------------------------------------------------
# 1. capture cost
# ---------------------------------------------------------------------------------------------


def _profile(steps: dict[str, Callable[[], None]], name: str, device: torch.device, n: int = 3) -> None:
    """Where a step's time goes: self time per op (torch.profiler), plain vs capture steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for f in steps.values():
        f()
    table: dict[str, dict[str, float]] = {}
    totals = {}
    for label, f in steps.items():
        with profile(activities=acts) as prof:
            for _ in range(n):
                f()
            _sync(device)
        ev = prof.key_averages()
        table[label] = {e.key: getattr(e, key) / n / 1e3 for e in ev}
        totals[label] = sum(table[label].values())
    ops = sorted(table["empirical"], key=lambda k: -table["empirical"][k])[:12]
    ops += [k for k in sorted(table["true"], key=lambda k: -table["true"][k])[:12] if k not in ops]
    print(f"\n### profile {name}: self time per step (ms), {n} steps each")
    print(f"{'op':<44}" + "".join(f"{k:>11}" for k in steps))
    for op in ops:
        print(f"{op[:44]:<44}" + "".join(f"{table[k].get(op, 0.0):>11.1f}" for k in steps))
    print(f"{'total':<44}" + "".join(f"{totals[k]:>11.1f}" for k in steps))


def capture_cost(
    name: str,
    batch: int,
    repeats: int,
    device: torch.device,
    fisher_batches: int,
    steps_per_epoch: int,
    profile: bool = False,
) -> dict[str, float]:
    torch.manual_seed(0)
    model = make_model(name, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cands = [c for c in find_layers(model) if c.skipped is None]
    modules = {c.name: c.hook_module for c in cands}
    gen = torch.Generator(device=device).manual_seed(0)

    def plain() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    cap = KFACapture(modules)
    cap.__enter__()
    cap.remove()

    def empirical() -> None:
        # The user's own step with capture hooks on (what the callback's empirical Fisher does).
        model.train()
        opt.zero_grad(set_to_none=True)
        cap.__enter__()
        try:
            cap.begin_batch()
            cap.grad_scale = float(batch)
            F.cross_entropy(model(x), y).backward()
            cap.end_batch(batch)
        finally:
            cap.remove()
        opt.step()

    def true_fisher() -> None:
        # The user's step plus the sampled pass the callback adds on a capture batch.
        plain()
        modes = {m: m.training for m in model.modules()}
        model.eval()
        cap.__enter__()
        try:
            capture_batch(model, cap, x, None, fisher="true", generator=gen)
        finally:
            cap.remove()
            for m, mode in modes.items():
                m.training = mode

    if profile:
        _profile({"plain": plain, "empirical": empirical, "true": true_fisher}, name, device)
    t = interleaved({"plain": plain, "empirical": empirical, "true": true_fisher}, repeats, device)
    r_emp = t["empirical"] / t["plain"]
    r_true = t["true"] / t["plain"]
    extra = min(fisher_batches, steps_per_epoch)
    epoch = (steps_per_epoch * t["plain"] + extra * (t["true"] - t["plain"])) / (steps_per_epoch * t["plain"])
    return {"plain_s": t["plain"], "empirical_ratio": r_emp, "true_step_ratio": r_true, "epoch_ratio": epoch}


# ---------------------------------------------------------------------------------------------
# 2. prune step
# ---------------------------------------------------------------------------------------------


def prune_step(name: str, device: torch.device, size: int, n_batches: int = 2) -> dict[str, float]:
    torch.manual_seed(0)
    model = make_model(name, device)
    batches = [
        (torch.randn(16, 3, size, size, device=device), torch.randint(0, 10, (16,), device=device))
        for _ in range(n_batches)
    ]
    cands = find_layers(model)
    captured = capture_factors(
        model,
        {c.name: c.hook_module for c in cands},
        batches,
        factors_for=[c.name for c in cands if c.skipped is None],
    )
    _sync(device)
    t = time.perf_counter()
    report = prune(model, batches[:1], ratio=0.5, captured=captured)
    torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # the optimizer rebuild
    _sync(device)
    return {"prune_s": time.perf_counter() - t, "flops_x": report.flops_compression}


# ---------------------------------------------------------------------------------------------
# 3. latency of pruned models
# ---------------------------------------------------------------------------------------------


FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def latency(
    name: str, device: torch.device, flops_cuts: list[float], batches_eval: list[int], repeats: int
) -> list[dict]:
    """Eval speed-ups over the dense model, in both memory formats (each model converted, the
    latency-chosen forms timed in that format), against Torch-Pruning at the same FLOPs."""
    rows = []
    torch.manual_seed(0)
    dense0 = make_model(name, device).eval()
    data = [
        (torch.randn(32, 3, 32, 32, device=device), torch.randint(0, 10, (32,), device=device))
        for _ in range(2)
    ]
    tp_cache: dict[float, Any] = {}
    for fmt, mf in FORMATS.items():
        dense = copy.deepcopy(dense0).to(memory_format=mf)
        variants: dict[str, nn.Module] = {}
        flops: dict[str, float] = {}
        for cut in flops_cuts:
            for tag, kw in (("", {}), ("+lat8", {"form_by": "latency", "latency_batch": 64, "round_to": 8})):
                m = copy.deepcopy(dense)
                rep = prune(m, data, ratio=cut, target="flops", **kw)
                key = f"eigendamage{tag}@{cut:g}"
                variants[key] = m.eval()
                flops[key] = rep.flops_compression
                fx = round(rep.flops_compression, 3)
                if fx not in tp_cache:
                    tp_cache[fx] = torch_pruning_variant(name, dense0, rep.flops_compression, device)
                tp = tp_cache[fx]
                if tp is not None:
                    variants[f"torch-pruning{tag}@{cut:g}"] = copy.deepcopy(tp[0]).to(memory_format=mf).eval()
                    flops[f"torch-pruning{tag}@{cut:g}"] = tp[1]
        for bs in batches_eval:
            x = torch.randn(bs, 3, 32, 32, device=device).contiguous(memory_format=mf)
            fns = {"dense": lambda x=x, d=dense: d(x)}
            for k, m in variants.items():
                fns[k] = lambda m=m, x=x: m(x)
            with torch.no_grad():
                t = interleaved(fns, repeats, device)
            for k in variants:
                rows.append(
                    {
                        "model": name,
                        "format": fmt,
                        "batch": bs,
                        "variant": k,
                        "flops_x": flops[k],
                        "speedup": t["dense"] / t[k],
                        "dense_ms": 1e3 * t["dense"],
                    }
                )
    return rows


def torch_pruning_variant(name: str, dense: nn.Module, flops_x: float, device: torch.device):
    """Torch-Pruning L1 channel removal at the same FLOPs reduction, or None if not installed."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    example = torch.randn(1, 3, 32, 32, device=device)
    base, _ = tp.utils.count_ops_and_params(dense, example)
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        m = make_model(name, device)
        m.load_state_dict(dense.state_dict())
        last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
        pruner = tp.pruner.MagnitudePruner(
            m,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=mid,
            ignored_layers=[last],
            global_pruning=False,
        )
        pruner.step()
        ops, _ = tp.utils.count_ops_and_params(m, example)
        x = base / ops
        best = (m, x)
        if x < flops_x:
            lo = mid
        else:
            hi = mid
        if abs(x / flops_x - 1) < 0.03:
            break
    return best


# ---------------------------------------------------------------------------------------------
# 4. memory per phase (subprocess)
# ---------------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_phase(phase: str, name: str, batch: int, device: torch.device) -> tuple[int, int]:
    """Run one phase in this (fresh) process; return ``(peak, empty)`` memory in bytes.

    ``empty`` is the process's memory after imports, before the model exists (torch's own
    libraries); ``peak − empty`` is what the workload needs during the phase.

    Both phases start from the same state: model, one training step done (optimizer state
    exists), factors captured. CPU: the peak RSS (``VmHWM``) is reset just before the phase by
    writing 5 to ``/proc/self/clear_refs``, so ``peak`` is the phase's own peak RSS (memory the
    allocator already holds is reused, so the *increase* over ``start`` can be near zero).
    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``.
    """
    torch.manual_seed(0)
    empty = torch.cuda.memory_allocated() if device.type == "cuda" else _proc_status_kb("VmRSS") * 1024
    model = make_model(name, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    cands = find_layers(model)
    modules = {c.name: c.hook_module for c in cands}
    factors_for = [c.name for c in cands if c.skipped is None]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    captured = capture_factors(model, modules, [(x, y)], factors_for=factors_for)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    if phase == "train":
        F.cross_entropy(model(x), y).backward()
        opt.step()
    else:
        prune(model, [(x[:1], y[:1])], ratio=0.5, captured=captured)
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), empty
    return _proc_status_kb("VmHWM") * 1024, empty


def memory(name: str, batch: int, device: str) -> dict[str, float]:
    out = {}
    for phase in ("train", "prune"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-phase",
            phase,
            "--model",
            name,
            "--batch",
            str(batch),
            "--device",
            device,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[phase] = [int(v) for v in res.stdout.strip().splitlines()[-1].split()]
    mb = 2**20
    return {
        "train_peak_mb": out["train"][0] / mb,
        "prune_peak_mb": out["prune"][0] / mb,
        "start_mb": out["train"][1] / mb,
        "ratio": out["prune"][0] / max(out["train"][0], 1),
    }


def factor_memory_mb(name: str, device: torch.device) -> float:
    model = make_model(name, device)
    total = 0
    for c in find_layers(model):
        if c.skipped is None:
            m = c.hook_module
            ci = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            co = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            total += (ci * ci + co * co) * 8  # float64 accumulators
    return total / 2**20


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a few minutes on 2 cores)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument(
        "--fisher-batches",
        type=int,
        default=None,
        help="capture batches per epoch (default: the callback's default)",
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--profile", action="store_true", help="also print where each step's time goes")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--memory-phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="resnet32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_phase:
        print(*memory_phase(args.memory_phase, args.model, args.batch, device))
        return
    fisher_batches = args.fisher_batches
    if fisher_batches is None:
        fisher_batches = _callback_default_fisher_batches()
    repeats = 5 if args.quick else 15
    results: dict = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "fisher_batches": fisher_batches,
    }
    print(f"# {results['machine']}  ({results['date']})")
    print(f"\n## Capture cost (training step ratios, batch {args.batch}, 32×32, 391 steps/epoch)")
    print(f"{'model':<10} {'plain ms':>9} {'empirical':>10} {'true step':>10} {'epoch':>7}")
    results["capture"] = {}
    for name in ("resnet32", "vgg19"):
        r = capture_cost(name, args.batch, repeats, device, fisher_batches, 391, profile=args.profile)
        results["capture"][name] = r
        print(
            f"{name:<10} {1000 * r['plain_s']:>9.1f} {r['empirical_ratio']:>9.3f}× "
            f"{r['true_step_ratio']:>9.3f}× {r['epoch_ratio']:>6.3f}×"
        )

    print("\n## Prune step (eigendecompositions, scores, surgery, optimizer rebuild)")
    results["prune"] = {}
    for name, size in (("vgg19", 32), ("resnet50", 64)):
        r = prune_step(name, device, size)
        results["prune"][name] = r
        print(f"{name:<10} {r['prune_s']:6.2f} s   (FLOPs ÷{r['flops_x']:.2f} at ratio 0.5)")

    print("\n## Factor and peak memory (peak RSS during the phase over the RSS before the model existed)")
    results["memory"] = {}
    for name in ("resnet32", "vgg19"):
        r = memory(name, args.batch, args.device)
        r["factors_mb"] = factor_memory_mb(name, device)
        results["memory"][name] = r
        print(
            f"{name:<10} factors {r['factors_mb']:7.1f} MB  train step {r['train_peak_mb']:7.1f} MB  "
            f"prune step {r['prune_peak_mb']:7.1f} MB  ratio {r['ratio']:.2f}"
        )

    print("\n## Pruned-model latency (eval), speed-up over dense at matched FLOPs")
    results["latency"] = []
    for name in ("resnet32", "vgg19"):
        rows = latency(name, device, [0.5, 0.75], [1, 64], repeats)
        results["latency"] += rows
        for r in rows:
            print(
                f"{r['model']:<9} {r['format']:<13} batch {r['batch']:>3}  {r['variant']:<24} "
                f"FLOPs ÷{r['flops_x']:5.2f}  speed-up {r['speedup']:.2f}×  (dense {r['dense_ms']:.1f} ms)"
            )

    cap = results["capture"]
    summary = {
        "empirical_capture": max(v["empirical_ratio"] for v in cap.values()),
        "true_fisher_step": max(v["true_step_ratio"] for v in cap.values()),
        "epoch_overhead": max(v["epoch_ratio"] for v in cap.values()),
        "prune_vgg19_s": results["prune"]["vgg19"]["prune_s"],
        "prune_resnet50_s": results["prune"]["resnet50"]["prune_s"],
    }
    mem = max(v["ratio"] for v in results["memory"].values())
    parts = [
        f"{k} {v:.3g} ({'ok' if v <= TARGETS[k] else 'MISSED'} ≤{TARGETS[k]:g})" for k, v in summary.items()
    ]
    parts.append(f"prune/train peak memory {mem:.2f} ({'ok' if mem <= 1.5 else 'MISSED'} ≤1.5)")
    b64 = [r for r in results["latency"] if r["batch"] == 64]
    for r in b64:
        if r["variant"].startswith("eigendamage"):
            tp = next(
                (
                    t
                    for t in b64
                    if t["model"] == r["model"]
                    and t["format"] == r["format"]
                    and t["variant"] == r["variant"].replace("eigendamage", "torch-pruning")
                ),
                None,
            )
            rel = f", {r['speedup'] / tp['speedup']:.2f}× TP's" if tp else ""
            parts.append(
                f"{r['model']} {r['format']} {r['variant']} speed-up {r['speedup']:.2f}× at FLOPs "
                f"÷{r['flops_x']:.2f} ({r['speedup'] / r['flops_x']:.2f} of FLOPs cut{rel})"
            )
    results["summary"] = summary
    print("\nSUMMARY: " + "; ".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _callback_default_fisher_batches() -> int:
    """``PruningSchedule``'s default capture cap (what the callback uses unless told otherwise)."""
    import dataclasses

    from lightning_eigendamage import PruningSchedule

    default = {f.name: f.default for f in dataclasses.fields(PruningSchedule)}["fisher_batches"]
    return 391 if default is None else int(default)


if __name__ == "__main__":
    main()
