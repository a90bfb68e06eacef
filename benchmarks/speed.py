"""Speed and memory of curvature capture, the prune step and pruned models, as ratios in one run.

    python benchmarks/speed.py --quick            # a few minutes on 2 CPU cores
    python benchmarks/speed.py --device cuda      # on a GPU (a few minutes)
    python benchmarks/speed.py --quick --profile  # plus a per-op profile of the capture steps
    python benchmarks/speed.py --smoke            # tiny sizes, ~1 min on 2 cores: a check, not figures

Every figure is a ratio of two timings taken in the same process, interleaved and repeated
(medians), because the machines here are noisy. On CUDA every timing is bracketed by
``torch.cuda.synchronize()``, one timing is a loop of calls lasting at least ``--min-ms`` (default
10 ms on CUDA: a single small forward is shorter than the timer's resolution allows) and cuDNN's
autotuner is on (``cudnn.benchmark``; the warm-up call tunes). Peak memory per phase is measured
in a fresh subprocess per phase: the phase's own peak RSS (``VmHWM`` reset through
``/proc/self/clear_refs`` right before it) over the RSS the process had before the model existed
(CPU), or ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (CUDA: tensor
memory only, without the CUDA context and the caching allocator's unused reserve).
``--profile`` also prints where the time of the plain, empirical-capture and true-Fisher steps
goes (self time per op). Each engine's capture is timed with its own form of ``A`` and the
examples of each batch it takes by default (``PruningSchedule(fisher_examples="auto")``: every
example for the eigenbasis, 32 for channels: ``benchmarks/fisher_examples.py`` measures what that
costs in accuracy).

A channel round (``prune(structure="channels")``, the default structure of the callback) is timed
by phase on one CPU thread on DenseNet-121 (64²) and ViT-B/16 (224²) with the zoo's protocol
(random weights, ÷1.67 FLOPs, two batches of four): analysis (capture, ``A`` inverses, single
scores), the decision with the default greedy scores and with single scores on the same
analysis, and the surgery. ``--sections`` picks what to measure (default: everything).

Latency of the pruned models is measured at ÷2 and ÷4 FLOPs (``ratio`` 0.5 and 0.75) against
Torch-Pruning's L1 channel pruning at the same FLOPs, at batch 1, 64 and 256 on CUDA (1 and 64 on
the CPU; ``--latency-batches`` to change).

``--smoke`` (what ``benchmarks/gpu_check.sh --quick`` runs) shrinks everything (batch 8, two
repeats, ResNet-32 only for memory and latency, no ResNet-50 prune step) to check that the
script runs end to end; its numbers are not measurements and must not be quoted.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
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
from lightning_eigendamage.eigenbasis.pruner import find_layers  # noqa: E402
from lightning_eigendamage.engine import get_engine  # noqa: E402

TARGETS = {  # the capture targets hold for either structure's A (channel form, patch form)
    "empirical_capture": 1.15,
    "true_fisher_step": 1.8,
    "epoch_overhead": 1.03,
    "empirical_capture_patch": 1.15,
    "true_fisher_step_patch": 1.8,
    "epoch_overhead_patch": 1.03,
    "prune_vgg19_s": 2.0,
    "prune_resnet50_s": 10.0,
    "round_densenet121_s": 20.0,  # one CPU thread
    "round_vit_b_16_s": 20.0,
    "round_densenet121_greedy_over_single": 2.0,
    "round_vit_b_16_greedy_over_single": 2.0,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# Shortest timing (a loop of calls) per sample, by device type: on CUDA a single small forward is
# launch-bound and too short for one synchronised timing; on the CPU one call per sample (as the
# committed CPU results were measured).
MIN_S = {"cuda": 0.010}


def _timed(fn: Callable[[], None], n: int, device: torch.device) -> float:
    """Seconds per call of ``n`` back-to-back calls of ``fn`` (synchronised on CUDA)."""
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / n


def interleaved(
    fns: dict[str, Callable[[], None]], repeats: int, device: torch.device, min_s: float | None = None
) -> dict[str, float]:
    """Median seconds per call of each function, timings interleaved round-robin after a warm-up.

    Each timing is a loop of as many calls as make it last ``min_s`` (default
    :data:`MIN_S` for the device type, 0: one call), the count fixed per function from a second
    warm-up call.
    """
    if min_s is None:
        min_s = MIN_S.get(device.type, 0.0)
    for fn in fns.values():
        fn()  # warm-up (cuDNN autotuning, allocator)
    loops = dict.fromkeys(fns, 1)
    if min_s > 0:
        for k, fn in fns.items():
            loops[k] = max(1, math.ceil(min_s / max(_timed(fn, 1, device), 1e-9)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed(fn, loops[k], device))
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
    a_form: str = "channel",
    max_examples: int | None = None,
    a_columns: int = 1,
) -> dict[str, float]:
    """Capture batch against a plain training step, interleaved: the user's step with the hooks on
    (empirical Fisher) and the step plus the sampled pass (true Fisher), with ``A`` in
    ``a_form`` (``"channel"``: the eigenbasis engine's; ``"patch"``: the channel engine's) on
    ``max_examples`` of the batch and every ``a_columns``-th column (``KFACapture``'s)."""
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

    cap = KFACapture(modules, a_form=a_form, max_examples=max_examples, a_columns=a_columns)
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
        label = f"{name}/patch" if a_form == "patch" else name
        _profile({"plain": plain, "empirical": empirical, "true": true_fisher}, label, device)
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
    # Load the device's linear-algebra kernels first (cuSOLVER's are loaded lazily on the first
    # call, about a second): the figure is the prune step's own cost.
    torch.linalg.eigh(torch.eye(8, dtype=torch.float64, device=device))
    _sync(device)
    t = time.perf_counter()
    report = prune(model, batches[:1], ratio=0.5, captured=captured)
    torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # the optimizer rebuild
    _sync(device)
    return {"prune_s": time.perf_counter() - t, "flops_x": report.flops_compression}


# ---------------------------------------------------------------------------------------------
# 2b. a channel round on torchvision models, one CPU thread
# ---------------------------------------------------------------------------------------------

ROUND_MODELS = {"densenet121": 64, "vit_b_16": 224}  # the zoo's image sides


def channel_round(name: str, size: int, device: torch.device, threads: int = 1) -> dict[str, float]:
    """One ``prune(structure="channels")`` round at ÷1.67 FLOPs (the zoo's protocol: random
    weights, two batches of four random images) on ``threads`` threads, by phase: the analysis
    (capture, ``A`` inverses, single scores), the decision with the default greedy scores and
    with single scores (``greedy_steps=None``) on the same analysis, and the surgery. The check
    (the dependency graph and its trial cut) is timed apart: the callback runs it once, before
    training; ``round_s`` (a ``prune()`` call) includes it."""
    from lightning_eigendamage import PruneOptions

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)().to(device).eval()
        gen = torch.Generator().manual_seed(1)
        batches = [
            (torch.randn(4, 3, size, size, generator=gen).to(device), torch.randint(0, 1000, (4,)).to(device))
            for _ in range(2)
        ]
        engine, ratio = get_engine("channels"), 1.0 - 1.0 / 1.67
        options = PruneOptions(structure="channels", target="flops")
        single = PruneOptions(structure="channels", target="flops", greedy_steps=None)
        t0 = time.perf_counter()
        prepared = engine.check(model, batches[0][0], options)
        _sync(device)
        tc = time.perf_counter()
        analysis = engine.analyse(model, batches, options, prepared=prepared)
        _sync(device)
        t1 = time.perf_counter()
        engine.decide(analysis, ratio, single)
        t2 = time.perf_counter()
        plan = engine.decide(analysis, ratio, options)
        t3 = time.perf_counter()
        engine.apply(model, analysis, plan, options)
        _sync(device)
        t4 = time.perf_counter()
    finally:
        torch.set_num_threads(before)
    return {
        "check_s": tc - t0,
        "analysis_s": t1 - tc,
        "decide_single_s": t2 - t1,
        "decide_greedy_s": t3 - t2,
        "surgery_s": t4 - t3,
        "round_s": (t1 - t0) + (t3 - t2) + (t4 - t3),
        "greedy_over_single": (t1 - t0 + t3 - t2) / (t1 - t0 + t2 - t1),
        "threads": threads,
        "size": size,
    }


# ---------------------------------------------------------------------------------------------
# 3. latency of pruned models
# ---------------------------------------------------------------------------------------------


FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


LATENCY_TAGS: dict[str, dict[str, Any]] = {
    "": {},
    "+lat8": {"form_by": "latency", "latency_batch": 64, "round_to": 8},
}


def latency(
    name: str,
    device: torch.device,
    flops_cuts: list[float],
    batches_eval: list[int],
    repeats: int,
    formats: tuple[str, ...] = tuple(FORMATS),
    tags: tuple[str, ...] = tuple(LATENCY_TAGS),
) -> list[dict]:
    """Eval speed-ups over the dense model, in the memory ``formats`` (each model converted, the
    latency-chosen forms timed in that format), against Torch-Pruning at the same FLOPs.
    ``tags``: which variants of :data:`LATENCY_TAGS` to prune (default forms, latency forms)."""
    rows = []
    torch.manual_seed(0)
    dense0 = make_model(name, device).eval()
    data = [
        (torch.randn(32, 3, 32, 32, device=device), torch.randint(0, 10, (32,), device=device))
        for _ in range(2)
    ]
    tp_cache: dict[float, Any] = {}
    for fmt in formats:
        mf = FORMATS[fmt]
        dense = copy.deepcopy(dense0).to(memory_format=mf)
        variants: dict[str, nn.Module] = {}
        flops: dict[str, float] = {}
        for cut in flops_cuts:
            for tag in tags:
                kw = LATENCY_TAGS[tag]
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
                        "target": f"÷{1 / (1 - float(k.rsplit('@', 1)[1])):g}",
                        "flops_x": flops[k],
                        "speedup": t["dense"] / t[k],
                        "dense_ms": 1e3 * t["dense"],
                    }
                )
    return rows


def torch_pruning_variant(
    name: str, dense: nn.Module, flops_x: float, device: torch.device
) -> tuple[nn.Module, float] | None:
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


SMOKE_BANNER = (
    "SMOKE RUN (--smoke): tiny sizes and 2 repeats to check that the script runs end to end; "
    "these numbers are NOT measurements, do not quote them"
)


def machine_line(device: torch.device) -> str:
    """Host, threads, torch and the device (with the GPU's name on CUDA)."""
    dev = str(device)
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    return (
        f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {dev}"
    )


def vs_torch_pruning(rows: list[dict]) -> list[dict]:
    """For every EigenDamage latency row, the matching Torch-Pruning row (same model, format,
    batch and target): both speed-ups over dense and their ratio (ours / theirs)."""
    out = []
    for r in rows:
        if not r["variant"].startswith("eigendamage"):
            continue
        tp_name = r["variant"].replace("eigendamage", "torch-pruning")
        tp = next(
            (
                t
                for t in rows
                if (t["model"], t["format"], t["batch"], t["variant"])
                == (r["model"], r["format"], r["batch"], tp_name)
            ),
            None,
        )
        out.append(
            {
                "model": r["model"],
                "format": r["format"],
                "batch": r["batch"],
                "variant": r["variant"],
                "target": r["target"],
                "flops_x": r["flops_x"],
                "speedup": r["speedup"],
                "tp_flops_x": tp["flops_x"] if tp else None,
                "tp_speedup": tp["speedup"] if tp else None,
                "vs_tp": r["speedup"] / tp["speedup"] if tp else None,
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """Run every part and print (and with ``--json`` write) the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a few minutes on 2 cores)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and 2 repeats: a check, not figures")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 128; 8 with --smoke)")
    ap.add_argument(
        "--latency-batches",
        type=int,
        nargs="+",
        default=None,
        help="eval batches of the latency part (default 1 64 256 on CUDA, 1 64 on CPU, 1 4 with --smoke)",
    )
    ap.add_argument(
        "--min-ms",
        type=float,
        default=None,
        help="shortest timing, a loop of calls (default 10 on CUDA, 0 = one call on CPU)",
    )
    ap.add_argument(
        "--fisher-batches",
        type=int,
        default=None,
        help="capture batches per epoch (default: the callback's default)",
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument(
        "--sections",
        nargs="+",
        choices=("capture", "prune", "rounds", "memory", "latency"),
        default=["capture", "prune", "rounds", "memory", "latency"],
        help="what to measure (default: all)",
    )
    ap.add_argument("--profile", action="store_true", help="also print where each step's time goes")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--memory-phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="resnet32", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch.cuda.is_available() is False (torch {torch.__version__})")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (8 if args.smoke else 128)
    if args.memory_phase:
        print(*memory_phase(args.memory_phase, args.model, batch, device))
        return
    if args.min_ms is not None:
        MIN_S[device.type] = args.min_ms / 1e3
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fisher_batches = args.fisher_batches
    if fisher_batches is None:
        fisher_batches = _callback_default_fisher_batches()
    repeats = 2 if args.smoke else 5 if args.quick else 15
    lat_batches = args.latency_batches or (
        [1, 4] if args.smoke else [1, 64, 256] if device.type == "cuda" else [1, 64]
    )
    # What each part runs: --smoke keeps the smallest model and the default forms only.
    small = ("resnet32",) if args.smoke else ("resnet32", "vgg19")
    prune_models = (("resnet32", 32),) if args.smoke else (("vgg19", 32), ("resnet50", 64))
    formats = ("nchw",) if args.smoke else tuple(FORMATS)
    tags = ("",) if args.smoke else tuple(LATENCY_TAGS)
    results: dict = {
        "machine": machine_line(device),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv if argv is None else ["benchmarks/speed.py", *argv]),
        "smoke": args.smoke,
        "fisher_batches": fisher_batches,
        "repeats": repeats,
        "min_ms": 1e3 * MIN_S.get(device.type, 0.0),
    }
    results["section_s"] = {}
    clock = {"name": "", "t": time.perf_counter()}

    def section(name: str) -> None:
        """Close the running section (record and print its wall time) and start ``name``."""
        now = time.perf_counter()
        if clock["name"]:
            results["section_s"][clock["name"]] = now - clock["t"]
            print(f"({clock['name']}: {now - clock['t']:.1f} s)")
        clock.update(name=name, t=now)

    if args.smoke:
        print(f"# {SMOKE_BANNER}")
    print(f"# {results['machine']}  ({results['date']})")
    section("capture")
    results["capture"] = {}
    if "capture" in args.sections:
        print(f"\n## Capture cost (training step ratios, batch {batch}, 32×32, 391 steps/epoch)")
        print(f"{'model':<10} {'plain ms':>9} {'empirical':>10} {'true step':>10} {'epoch':>7}")
        results["capture"] = {}
        for name in small:
            for engine in ("eigenbasis", "channels"):
                # each engine's form of A, with the examples and columns its capture takes by
                # default (PruningSchedule(fisher_examples="auto"))
                eng = get_engine(engine)
                form, examples, columns = eng.a_form, eng.capture_examples, eng.capture_columns
                key = name if form == "channel" else f"{name}/patch"
                prof = args.profile
                r = capture_cost(
                    name,
                    batch,
                    repeats,
                    device,
                    fisher_batches,
                    391,
                    profile=prof,
                    a_form=form,
                    max_examples=examples,
                    a_columns=columns,
                )
                r["max_examples"], r["a_columns"] = examples, columns
                results["capture"][key] = r
                print(
                    f"{key:<10} {1000 * r['plain_s']:>9.1f} {r['empirical_ratio']:>9.3f}× "
                    f"{r['true_step_ratio']:>9.3f}× {r['epoch_ratio']:>6.3f}×"
                )

    section("prune")
    results["prune"] = {}
    if "prune" in args.sections:
        print("\n## Prune step (eigendecompositions, scores, surgery, optimizer rebuild)")
        results["prune"] = {}
        for name, size in prune_models:
            r = prune_step(name, device, size)
            results["prune"][name] = r
            print(f"{name:<10} {r['prune_s']:6.2f} s   (FLOPs ÷{r['flops_x']:.2f} at ratio 0.5)")
        if args.smoke:
            print("(--smoke: ResNet-32 instead of VGG19 and ResNet-50)")

    section("rounds")
    results["rounds"] = {}
    if "rounds" in args.sections:
        print(
            "\n## Channel round, one CPU thread (the zoo's protocol: random weights, ÷1.67 FLOPs, 2×4 images)"
        )
        print(
            f"{'model':<12} {'check':>7} {'analysis':>9} {'decide':>8} {'single':>8} {'surgery':>8} "
            f"{'round':>7} {'(greedy+analysis)/(single+analysis)':>36}"
        )
        for name, size in {"mobilenet_v3_small": 32}.items() if args.smoke else ROUND_MODELS.items():
            r = channel_round(name, size, device)
            results["rounds"][name] = r
            print(
                f"{name:<12} {r['check_s']:6.1f}s {r['analysis_s']:8.1f}s {r['decide_greedy_s']:7.1f}s "
                f"{r['decide_single_s']:7.1f}s {r['surgery_s']:7.1f}s {r['round_s']:6.1f}s "
                f"{r['greedy_over_single']:36.2f}"
            )
    section("memory")
    results["memory"] = {}
    if "memory" in args.sections:
        if device.type == "cuda":
            print("\n## Factor and peak memory (torch.cuda.max_memory_allocated during the phase)")
        else:
            print(
                "\n## Factor and peak memory (peak RSS during the phase over the RSS before the model "
                "existed)"
            )
        results["memory"] = {}
        for name in small:
            r = memory(name, batch, args.device)
            r["factors_mb"] = factor_memory_mb(name, device)
            results["memory"][name] = r
            print(
                f"{name:<10} factors {r['factors_mb']:7.1f} MB  train step {r['train_peak_mb']:7.1f} MB  "
                f"prune step {r['prune_peak_mb']:7.1f} MB  ratio {r['ratio']:.2f}"
            )

    section("latency")
    results["latency"], results["vs_torch_pruning"] = [], []
    if "latency" in args.sections:
        print(
            f"\n## Pruned-model latency (eval), speed-up over dense at ÷2 and ÷4 FLOPs, batch "
            f"{', '.join(map(str, lat_batches))}"
        )
        results["latency"] = []
        for name in small:
            rows = latency(name, device, [0.5, 0.75], lat_batches, repeats, formats, tags)
            results["latency"] += rows
            for r in rows:
                print(
                    f"{r['model']:<9} {r['format']:<13} batch {r['batch']:>3}  {r['variant']:<24} "
                    f"FLOPs ÷{r['flops_x']:5.2f}  speed-up {r['speedup']:.2f}×  "
                    f"(dense {r['dense_ms']:.2f} ms)"
                )
        results["vs_torch_pruning"] = vs_torch_pruning(results["latency"])
        print("\n## Against Torch-Pruning (L1 channels) at the same FLOPs: speed-ups over dense")
        print(
            f"{'model':<9} {'format':<13} {'batch':>5}  {'variant':<24} {'ours':>7} {'TP':>7} {'ours/TP':>8}"
        )
        for r in results["vs_torch_pruning"]:
            tp = "-" if r["tp_speedup"] is None else f"{r['tp_speedup']:.2f}×"
            rel = "-" if r["vs_tp"] is None else f"{r['vs_tp']:.2f}"
            print(
                f"{r['model']:<9} {r['format']:<13} {r['batch']:>5}  {r['variant']:<24} "
                f"{r['speedup']:>6.2f}× {tp:>7} {rel:>8}"
            )

    section("")
    cap = results["capture"]
    summary = {}
    for suffix, keep in (("", lambda k: "/" not in k), ("_patch", lambda k: k.endswith("/patch"))):
        vals = [v for k, v in cap.items() if keep(k)]
        if vals:
            summary[f"empirical_capture{suffix}"] = max(v["empirical_ratio"] for v in vals)
            summary[f"true_fisher_step{suffix}"] = max(v["true_step_ratio"] for v in vals)
            summary[f"epoch_overhead{suffix}"] = max(v["epoch_ratio"] for v in vals)
    for name, r in results["prune"].items():
        summary[f"prune_{name}_s"] = r["prune_s"]
    for name, r in results["rounds"].items():
        summary[f"round_{name}_s"] = r["round_s"]
        summary[f"round_{name}_greedy_over_single"] = r["greedy_over_single"]
    mem = max((v["ratio"] for v in results["memory"].values()), default=None)
    parts = [
        f"{k} {v:.3g} ({'ok' if v <= TARGETS[k] else 'MISSED'} ≤{TARGETS[k]:g})"
        if k in TARGETS
        else f"{k} {v:.3g}"
        for k, v in summary.items()
    ]
    if mem is not None:
        parts.append(f"prune/train peak memory {mem:.2f} ({'ok' if mem <= 1.5 else 'MISSED'} ≤1.5)")
    ref_batch = 64 if 64 in lat_batches else max(lat_batches)
    for r in results["vs_torch_pruning"]:
        if r["batch"] == ref_batch:
            rel = f", {r['vs_tp']:.2f}× TP's" if r["vs_tp"] is not None else ""
            parts.append(
                f"{r['model']} {r['format']} {r['variant']} batch {ref_batch} speed-up "
                f"{r['speedup']:.2f}× at FLOPs ÷{r['flops_x']:.2f} "
                f"({r['speedup'] / r['flops_x']:.2f} of FLOPs cut{rel})"
            )
    summary["prune_train_memory"] = mem
    results["summary"] = summary
    print("\nSUMMARY: " + "; ".join(parts))
    if args.smoke:
        print(f"# {SMOKE_BANNER}")
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
