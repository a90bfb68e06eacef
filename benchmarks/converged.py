"""Pruning *converged* networks: the ablation protocol on full Fashion-MNIST.

Dense networks (cached once, committed in ``benchmarks/results/converged/``):

- ``resnet20-narrow`` (CIFAR ResNet-20, widths 16/32/64), ``vgg-narrow`` (ten BN convs, width
  0.25 of VGG) and ``mobilenetv2-narrow`` (12 inverted residuals with depthwise convs and ReLU6,
  half width; ``benchmarks/models.py``), trained on all 60,000 training images: SGD lr 0.1,
  momentum 0.9, weight decay 5e-4, cosine schedule (per step) over ``--epochs``, batch 128,
  random crop with padding 2, seed 0, one thread (the float reduction order, and so the network,
  depends on the thread count).

Each row then prunes a copy of the dense network to ``÷k`` FLOPs with one method and options:

- calibration: 10 fixed batches of 128 training images (drawn with the row's seed) give the
  curvature (EigenDamage, C-OBD…) or the gradients (Taylor);
- *after pruning*: BatchNorm statistics re-estimated on the calibration batches, accuracy on the
  first 3,000 test images (the quick rows) and on the full test set;
- *after fine-tuning* (``--finetune N``): N epochs, lr 0.01 cosine, same recipe otherwise, BatchNorm
  re-estimated, accuracy on the full test set.

Channel methods remove at most 95 % of a layer's channels (Torch-Pruning's default, and the
paper's ``prune_ratio_limit`` for its baselines); ``--group-cap x`` sets another cap (variant
``cap<x>`` in the record; grid ``baselines-cap``). Their records keep each layer's output width.

Commands (records are appended to ``benchmarks/results/converged/records.jsonl`` with the command
that reproduces each; a row whose key is already there is skipped, so every command resumes)::

    python benchmarks/converged.py pretrain --model resnet20-narrow --epochs 6
    python benchmarks/converged.py row --model resnet20-narrow --method eigendamage --flops-x 4
    python benchmarks/converged.py grid --grid after-pruning   # the ablation grid (names: grid_rows)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data import load_data  # noqa: E402
from benchmarks.run import build_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "converged"
RECIPE = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, batch=128, crop_pad=2)
FINETUNE_LR = 0.01
CALIB_BATCHES, CALIB_SIZE, QUICK_TEST = 10, 128, 3000
LATENCY_BATCH, MAX_RATIO = 64, 0.97  # latency-matched rows: batch timed; most FLOPs removed


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Random crops of ``x`` ``(N, C, H, W)`` from its zero-padded copy (one offset per image)."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    idx_n = torch.arange(n)[:, None, None, None]
    return xp[idx_n, torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def train(
    net: nn.Module,
    data: Any,
    epochs: int,
    lr: float,
    seed: int,
    *,
    penalty: Any = None,
    on_epoch: Any = None,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    on_step: Any = None,
    after_backward: Any = None,
) -> torch.optim.Optimizer:
    """SGD with the recipe's momentum/weight decay, cosine over ``epochs`` (per step), random crops.

    ``penalty(net) → tensor`` is added to the loss (e.g. a pruning regulariser); ``on_epoch(epoch,
    optimizer)`` is called after each epoch (checkpoints). ``on_step(step, total, optimizer)`` is
    called before each step; it may return a replacement optimizer (iterative pruning rebuilds it).
    ``after_backward(step)`` may change the gradients before the optimizer step.
    Resumes from ``start_epoch``.
    """
    opt = sgd(net, lr)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / RECIPE["batch"])
    total = epochs * steps_per_epoch
    net.train()
    for epoch in range(start_epoch, epochs):
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            if on_step is not None:
                opt = on_step(step, total, opt) or opt
            for g in opt.param_groups:
                g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            idx = perm[i * RECIPE["batch"] : (i + 1) * RECIPE["batch"]]
            x = random_crop(data.x_train[idx], RECIPE["crop_pad"], gen)
            loss = F.cross_entropy(net(x), data.y_train[idx])
            if penalty is not None:
                loss = loss + penalty(net)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(step)
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch, opt)
    return opt


def sgd(net: nn.Module, lr: float) -> torch.optim.SGD:
    """The recipe's optimizer over ``net``'s parameters."""
    return torch.optim.SGD(
        net.parameters(), lr=lr, momentum=RECIPE["momentum"], weight_decay=RECIPE["weight_decay"]
    )


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Accuracy in percent, eval mode (restored)."""
    was = net.training
    net.eval()
    correct = sum(
        int((net(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch)
    )
    net.train(was)
    return 100.0 * correct / len(y)


def calibration(data: Any, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``CALIB_BATCHES`` fixed batches of ``CALIB_SIZE`` training images, drawn with ``seed``."""
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(10_000 + seed))
    return [
        (
            data.x_train[perm[i * CALIB_SIZE : (i + 1) * CALIB_SIZE]],
            data.y_train[perm[i * CALIB_SIZE : (i + 1) * CALIB_SIZE]],
        )
        for i in range(CALIB_BATCHES)
    ]


def plan_difference(a: dict[Any, set[int]], b: dict[Any, set[int]]) -> int:
    """Channels removed by one channel plan and not the other (``{group root: removed}`` each),
    summed over the groups: the symmetric difference."""
    return sum(len(a[k] ^ b.get(k, set())) for k in a) + sum(len(b[k]) for k in b if k not in a)


def comparison_main(
    argv: list[str] | None,
    doc: str | None,
    script: str,
    out: Path,
    rows: Callable[[str, Any, list], Iterable[dict[str, Any]]],
    models: Sequence[str],
    threads: int = 1,
) -> None:
    """The command line of a script that compares variants on the converged networks
    (``greedy_precision.py``, ``fisher_examples.py``): ``--data-root``, ``--threads``,
    ``--models``, ``--out``; the calibration batches of seed 0; ``rows(model, data, calib)`` per
    model, each row printed and written with the command (the rows replace ``--out``'s)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data")
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--models", nargs="*", default=list(models), choices=list(models))
    p.add_argument("--out", default=str(out))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data("fashion-mnist", root=args.data_root)
    calib = calibration(data, 0)
    given = argv if argv is not None else sys.argv[1:]
    command = f"python benchmarks/{script} " + shlex.join(given)
    written = []
    for model in args.models:
        for row in rows(model, data, calib):
            row = row | {"command": command.strip()}
            print(json.dumps(row), flush=True)
            written.append(row)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in written))


def dense_path(model: str) -> Path:
    return RESULTS / f"dense-{model}.pt"


def pretrain(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_data("fashion-mnist", root=args.data_root)
    net = build_model(args.model, 10, 1)
    cache = Path(args.cache) / f"pretrain-{args.model}-e{args.epochs}.pt"
    start, opt_state = 0, None
    if cache.exists():
        ck = torch.load(cache, weights_only=True)
        net.load_state_dict(ck["model"])
        start, opt_state = ck["epoch"] + 1, ck["optimizer"]
        print(f"resuming {args.model} at epoch {start}")
    t0 = time.time()

    def on_epoch(epoch: int, opt: torch.optim.Optimizer) -> None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, cache)
        acc = accuracy(net, data.x_test, data.y_test)
        print(f"{args.model} epoch {epoch}: test {acc:.2f} % ({time.time() - t0:.0f} s)", flush=True)

    train(
        net,
        data,
        args.epochs,
        RECIPE["lr"],
        0,
        on_epoch=on_epoch,
        start_epoch=start,
        optimizer_state=opt_state,
    )
    acc = accuracy(net, data.x_test, data.y_test)
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), dense_path(args.model))
    record = {
        "model": args.model,
        "epochs": args.epochs,
        "recipe": RECIPE,
        "threads": args.threads,
        "test_accuracy": acc,
        "params": sum(p.numel() for p in net.parameters()),
        "seconds_this_run": round(time.time() - t0, 1),
        "command": "python benchmarks/converged.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    (RESULTS / f"dense-{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


# ---------------------------------------------------------------------------------------------
# Rows: prune a copy of the dense network, measure, optionally fine-tune
# ---------------------------------------------------------------------------------------------

EIGEN = "eigendamage"
ITER = "eigendamage-iter"  # three rounds during the fine-tune (see iterative_prune_and_finetune)
GRADUAL = "eigendamage-gradual"  # a penalised epoch before the prune (see gradual_prune)
PEERS = ("l1", "l2", "taylor", "slimming")  # channel pruning: the peers of the method issue
SECOND_ORDER = ("c-obd", "c-obs", "kron-obd", "kron-obs")  # the paper's channel baselines
# K-FAC channel removal scored and compensated on the input side of the layers that read a channel
# (benchmarks.baselines_tp, INPUT_SIDE): real channels, so it trains as fast as Torch-Pruning's
INPUT_OBS = (
    "kron-obs-in",
    "kron-obs-in-flop",
    "kron-obs-in-mean",
    "kron-obs-in-mean-nocomp",
    "kron-obs-in-sqrt",
    "kron-obs-in-sqrt-nocomp",
    "kron-obs-in-seq",
    "kron-obs-in-seq-flop",
    "kron-obs-in-seq-median",
    "kron-obs-in-seq-latency",
    "kron-obs-in-seq-latency-train",
    "kron-obs-in-seq-r8",
)
# Torch-Pruning L1's channels with the input-side compensation (benchmarks.baselines_tp)
COMPENSATED = ("l1-comp",)
METHODS = (EIGEN, ITER, GRADUAL, *PEERS, *SECOND_ORDER, *INPUT_OBS, *COMPENSATED)
OURS = (EIGEN, ITER, GRADUAL)
# EigenDamage variants measured in the ablation: name → prune() options (the rest as default).
VARIANTS: dict[str, dict[str, Any]] = {
    "paper-no-bn": dict(layer_cap=0.95, rank_by="damage", shots=1, reconstruct=False, recalibrate_bn=False),
    "paper": dict(layer_cap=0.95, rank_by="damage", shots=1, reconstruct=False),
    "cap0.75": dict(layer_cap=0.75, rank_by="damage", shots=1, reconstruct=False),
    "cap0.5": dict(layer_cap=0.5, rank_by="damage", shots=1, reconstruct=False),
    "per-cost": dict(layer_cap=0.95, rank_by="damage_per_cost", shots=1, reconstruct=False),
    "shots4": dict(layer_cap=0.95, rank_by="damage", shots=4, reconstruct=False),
    "reconstruct": dict(layer_cap=0.95, rank_by="damage", shots=1, reconstruct=True),
    "per-cost-cap0.75": dict(layer_cap=0.75, rank_by="damage_per_cost", shots=1, reconstruct=False),
    "all": dict(layer_cap=0.75, rank_by="damage_per_cost", shots=4, reconstruct=True),
    "defaults": dict(),  # the library's defaults, whatever they are when the row runs
    "latency-forms": dict(form_by="latency"),  # each layer's form picked by its measured time
    "frozen-rotations": dict(train_rotations=False),  # fine-tune the cores only (cheaper backward)
    # forms picked by the measured time of a training step's share (forward and backward) at the
    # training batch size
    "train-forms": dict(form_by="latency", latency_mode="training", latency_batch=128),
}
# Variants the after-pruning ablation leaves out: "defaults" and "paper-no-bn" have their own
# grids (finetune…, plain-user), "train-forms" is trainstep's, "latency-forms" (timed, so run on
# a quiet machine) is grid latency-forms', and "frozen-rotations" only changes the fine-tune.
NOT_IN_ABLATION = ("defaults", "paper-no-bn", "train-forms", "latency-forms", "frozen-rotations")


def refresh_bn(net: nn.Module, batches: list) -> None:
    """Every BatchNorm's running statistics re-estimated as the average over ``batches`` (the
    protocol's treatment of every method)."""
    bns = [m for m in net.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    from lightning_eigendamage.calibration import recalibrate_batchnorm

    recalibrate_batchnorm(net, bns, batches, lambda m, b: m(b[0]))


def slimming_net(model: str, data: Any, dense: nn.Module, threads: int) -> nn.Module:
    """NN Slimming's sparsity stage on the converged network: one epoch of fine-tuning with the
    L1 penalty ``1e-4·Σ|γ|`` on BatchNorm scales (lr 0.01 cosine), cached beside the dense one."""
    path = RESULTS / f"slimming-{model}.pt"
    net = copy.deepcopy(dense)
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net
    from lightning_eigendamage.channels.baselines import slimming_penalty

    train(net, data, 1, FINETUNE_LR, 1, penalty=lambda m: slimming_penalty(m, 1e-4))
    torch.save(net.state_dict(), path)
    return net


KEY_FIELDS = ("model", "method", "variant", "flops_x", "seed", "finetune", "protocol_bn")
LATENCY_FIELDS = ("latency_x", "memory_format")  # only in latency-matched rows


def row_key(r: dict[str, Any]) -> str:
    key = "|".join(str(r[k]) for k in KEY_FIELDS)
    if r.get("latency_x") is not None:
        key += "|" + "|".join(str(r[k]) for k in LATENCY_FIELDS)
    return key


def done_keys() -> set[str]:
    path = RESULTS / "records.jsonl"
    if not path.exists():
        return set()
    return {row_key(json.loads(line)) for line in path.read_text().splitlines() if line.strip()}


def prune_copy(
    args: argparse.Namespace, dense: nn.Module, data: Any, calib: list, ratio: float
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``dense`` with ``ratio`` of its FLOPs removed by ``method`` (EigenDamage with the
    options of ``variant``; the peers through ``benchmarks.baselines_tp.prune_baseline``, NN
    Slimming from its own sparsity-trained copy). Returns the network and what the record keeps."""
    from lightning_eigendamage import prune

    method, seed = args.method, args.seed
    info: dict[str, Any] = {}
    if method == EIGEN:
        net = copy.deepcopy(dense)
        opts = dict(VARIANTS[args.variant])
        report = prune(net, calib, ratio=ratio, target="flops", seed=seed, **opts)
        info = {"options": opts, "target_reached": report.target_reached, "forms": _forms(report)}
        return net, info
    from benchmarks.baselines_tp import prune_baseline

    slim = method == "slimming"
    net = slimming_net(args.model, data, dense, args.threads) if slim else copy.deepcopy(dense)
    cap = {} if args.group_cap is None else {"max_group_ratio": args.group_cap}
    rep = prune_baseline(net, calib, method, ratio=ratio, target="flops", seed=seed, **cap)
    if rep.skipped:
        info["skipped"] = rep.skipped
    # the output width of every conv/linear after pruning: shows a layer the ranking emptied
    info["widths"] = {
        n: m.weight.shape[0] for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    return net, info


def load_dense(model: str) -> nn.Module:
    dense = build_model(model, 10, 1)
    dense.load_state_dict(torch.load(dense_path(model), weights_only=True))
    return dense.eval()


def interleaved_latency(
    dense: nn.Module, pruned: nn.Module, x: torch.Tensor, repeats: int, memory_format: str
) -> tuple[float, float]:
    """Median seconds of one eval forward of ``dense`` and ``pruned`` on ``x``, timed alternately
    (``repeats`` rounds after 3 warm-up rounds), on copies in ``memory_format`` (``"nchw"`` or
    ``"channels_last"``)."""
    nets = [copy.deepcopy(dense).eval(), copy.deepcopy(pruned).eval()]
    if memory_format == "channels_last":
        nets = [n.to(memory_format=torch.channels_last) for n in nets]
        x = x.contiguous(memory_format=torch.channels_last)
    times: list[list[float]] = [[], []]
    with torch.inference_mode():
        for r in range(repeats + 3):
            for i, net in enumerate(nets):
                t = time.perf_counter()
                net(x)
                if r >= 3:
                    times[i].append(time.perf_counter() - t)
    med = [sorted(t)[len(t) // 2] for t in times]
    return med[0], med[1]


def match_latency(
    args: argparse.Namespace, dense: nn.Module, data: Any, calib: list
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune ``dense`` with ``args.method`` to ``1/args.latency_x`` of its measured latency.

    Latency: an eval forward at batch ``LATENCY_BATCH`` on ``args.latency_threads`` threads, in
    ``args.memory_format``, as the median of ``args.latency_repeats`` rounds timed alternately with
    the dense network. The FLOPs ratio is found by bisection on ``[0, MAX_RATIO]`` (at most
    ``args.bisect_steps`` probes after the end point; a probe within ±2 % ends it); the chosen
    network is then timed again with twice the repeats, and ``latency_matched`` says whether that
    measurement is within ±5 % of the target. A method whose most pruned network (or whose
    pruning fails) stays slower than the target is recorded with ``latency_matched: false``.
    """
    torch.set_num_threads(args.latency_threads)
    target = 1.0 / args.latency_x
    x = data.x_test[:LATENCY_BATCH]
    probes: list[dict[str, Any]] = []
    best: tuple[float, float, nn.Module, dict] | None = None
    prune_at = ratio_pruner(args, dense, data, calib)

    def probe(ratio: float) -> float | None:
        nonlocal best
        torch.set_num_threads(args.threads)
        try:
            net, info = prune_at(ratio)
        except Exception as e:  # a method that cannot prune this far: an unreachable probe
            probes.append({"ratio": round(ratio, 4), "error": f"{type(e).__name__}: {e}"[:200]})
            return None
        torch.set_num_threads(args.latency_threads)
        t_dense, t_net = interleaved_latency(dense, net, x, args.latency_repeats, args.memory_format)
        rel = t_net / t_dense
        probes.append({"ratio": round(ratio, 4), "latency_rel": round(rel, 4)})
        print(f"  probe ratio {ratio:.4f}: latency ×{rel:.3f} (target ×{target:.3f})", flush=True)
        if best is None or abs(rel / target - 1) < abs(best[0] / target - 1):
            best = (rel, ratio, net, info)
        return rel

    lo, hi = 0.0, MAX_RATIO
    rel_hi = probe(hi)
    if rel_hi is not None and rel_hi > target:
        pass  # even the most pruned network is too slow: reported as not matched
    else:
        for _ in range(args.bisect_steps):
            mid = 0.5 * (lo + hi)
            rel = probe(mid)
            if rel is None or rel < target:
                hi = mid
            else:
                lo = mid
            if rel is not None and abs(rel / target - 1) <= 0.02:
                break
    if best is None:
        raise RuntimeError(f"{args.method} could not prune {args.model} at any probed ratio: {probes}")
    _, ratio, net, info = best
    t_dense, t_net = interleaved_latency(dense, net, x, 2 * args.latency_repeats, args.memory_format)
    rel = t_net / t_dense
    info |= {
        "ratio_found": round(ratio, 4),
        "latency_ms": {"dense": round(1e3 * t_dense, 3), "pruned": round(1e3 * t_net, 3)},
        "latency_rel": round(rel, 4),
        "latency_target_rel": round(target, 4),
        "latency_matched": abs(rel / target - 1) <= 0.05,
        "latency_batch": LATENCY_BATCH,
        "latency_threads": args.latency_threads,
        "probes": probes,
    }
    torch.set_num_threads(args.threads)
    return net, info


def ratio_pruner(args: argparse.Namespace, dense: nn.Module, data: Any, calib: list) -> Any:
    """``ratio → (network, info)`` for repeated prunings of ``dense`` at different ratios. For
    one-shot EigenDamage the capture and eigendecompositions are done once (``analyse``) and each
    call only decides and applies on a copy of the analysed network (what ``prune()`` does with
    ``shots=1``); the other methods prune a fresh copy each time."""
    from lightning_eigendamage import PruneOptions, analyse, apply, decide

    opts = dict(VARIANTS[args.variant])
    if args.method != EIGEN or opts.get("shots", 1) != 1:
        return lambda ratio: prune_copy(args, dense, data, calib, ratio)
    options = PruneOptions(target="flops", seed=args.seed, **opts)
    base = copy.deepcopy(dense)
    analysis = analyse(base, calib, options)

    def prune_at(ratio: float) -> tuple[nn.Module, dict[str, Any]]:
        net, an = copy.deepcopy((base, analysis))  # one memo: the copy's analysis points into it
        report = apply(net, an, decide(an, ratio, options), options)
        return net, {"options": opts, "target_reached": report.target_reached, "forms": _forms(report)}

    return prune_at


def reproducible(args: argparse.Namespace) -> bool:
    """Whether pruning again at a recorded ratio gives the same network: not with forms chosen by
    timing (``form_by="latency"``), whose choice depends on the machine's load at the time."""
    return args.method not in OURS or VARIANTS[args.variant].get("form_by") != "latency"


def matched_net_path(args: argparse.Namespace) -> Path:
    """Where an after-pruning latency row whose network cannot be rebuilt from its ratio (see
    :func:`reproducible`) keeps the network it matched, for the fine-tuned row to continue."""
    name = f"latency-{args.model}-{args.method}-{args.variant}-x{args.latency_x:g}-{args.memory_format}"
    return Path(args.cache) / f"{name}-s{args.seed}.pt"


LATENCY_FIGURES = ("ratio_found", "latency_ms", "latency_rel", "latency_target_rel", "latency_matched")
LATENCY_FIGURES += ("latency_batch", "latency_threads", "probes")


def latency_figures(before: dict[str, Any]) -> dict[str, Any]:
    """What a fine-tuned latency row keeps of the after-pruning record it continues: the
    bisection's result and timings, and that record's command."""
    return {k: before[k] for k in LATENCY_FIGURES} | {"latency_from": before["command"]}


def continue_matched(args: argparse.Namespace, before: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The network an after-pruning latency row saved (forms chosen by timing), with that
    record's pruning and latency figures, for the fine-tuned row to continue."""
    net = torch.load(matched_net_path(args), weights_only=False)  # our own cache file: a module
    pruning = {k: before[k] for k in ("options", "target_reached", "forms") if k in before}
    return net, pruning | latency_figures(before)


def matched_before(args: argparse.Namespace) -> dict[str, Any] | None:
    """The after-pruning latency-matched record this fine-tuned row continues, if there is one."""
    path = RESULTS / "records.jsonl"
    if not path.exists():
        return None
    want = dict(model=args.model, method=args.method, seed=args.seed, finetune=0)
    want |= dict(latency_x=args.latency_x, memory_format=args.memory_format)
    variant = args.variant if args.method in OURS else channel_variant(args)
    for line in path.read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if r and all(r.get(k) == v for k, v in want.items()) and r["variant"] == variant:
            return r
    return None


def iterative_prune_and_finetune(
    args: argparse.Namespace, dense: nn.Module, data: Any, calib: list
) -> tuple[nn.Module, dict[str, Any]]:
    """EigenDamage in three rounds during the fine-tune, as ``benchmarks/run.py``'s iterative
    method: at steps 0, T/6 and T/3 of the T fine-tuning steps, each removing ``1 − k^(−1/3)`` of
    the current FLOPs (so the rounds compound to ÷k), with the options of ``args.variant`` and
    factors from the calibration batches on the partly trained network. After each later round
    the optimizer is rebuilt and its momentum carried across the rebuilt layers
    (``lightning_eigendamage.optim.carry_optimizer_state``). Returns the network fine-tuned and
    the record's fields (``acc_after_first_round`` in place of the one-shot ``acc_after``)."""
    from lightning_eigendamage import prune
    from lightning_eigendamage.optim import carry_optimizer_state

    fraction = 1.0 - (1.0 / args.flops_x) ** (1.0 / 3.0)
    opts = dict(VARIANTS[args.variant])
    net = copy.deepcopy(dense)
    rounds: list[dict[str, Any]] = []

    def one_round(step: int) -> dict:
        changes: dict = {}
        was = net.training
        report = prune(net, calib, ratio=fraction, target="flops", seed=args.seed, changes=changes, **opts)
        net.train(was)
        rounds.append({"step": step, "target_reached": report.target_reached, "forms": _forms(report)})
        return changes

    one_round(0)
    refresh_bn(net, calib)
    first = accuracy(net, data.x_test[:QUICK_TEST], data.y_test[:QUICK_TEST])
    steps_per_epoch = math.ceil(len(data.y_train) / RECIPE["batch"])
    total = args.finetune * steps_per_epoch
    at = {max(1, total // 6), max(2, total // 3)}

    def on_step(step: int, _total: int, opt: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
        if step not in at:
            return None
        changes = one_round(step)
        new = sgd(net, FINETUNE_LR)
        carry_optimizer_state(net, [opt], [new], changes)
        return new

    t1 = time.time()
    train(net, data, args.finetune, FINETUNE_LR, args.seed + 1, on_step=on_step)
    return net, {
        "options": opts,
        "rounds": rounds,
        "round_fraction": fraction,
        "acc_after_first_round": first,
        "finetune_s": round(time.time() - t1, 1),
    }


def gradual_prune(
    args: argparse.Namespace, dense: nn.Module, data: Any, calib: list
) -> tuple[nn.Module, dict[str, Any]]:
    """EigenDamage after gradual removal (``lightning_eigendamage.gradual``, the callback's
    ``gradual=`` option, run here in the plain training loop): the plan for ``÷k`` is made on the
    dense network (its options from ``args.variant``), then ``--gradual-epochs`` epochs of the
    fine-tuning recipe (lr 0.01 cosine) add ``λ_t · Q_G (M ⊙ W*) Q_Aᵀ`` to the gradient of every
    marked layer, ``λ_t`` growing linearly to ``--gradual-penalty``; then the usual one-shot
    prune with freshly captured factors. The penalised epochs come on top of the fine-tune (the
    record says how many)."""
    from lightning_eigendamage import GradualRemoval, PruneOptions, analyse, decide, prune
    from lightning_eigendamage.gradual import marked_layers, marked_norm, penalty_grad

    opts = dict(VARIANTS[args.variant])
    ratio = 1.0 - 1.0 / args.flops_x
    options = PruneOptions(target="flops", seed=args.seed, **opts)
    net = copy.deepcopy(dense)
    an = analyse(net, calib, options)
    marked = marked_layers(an, decide(an, ratio, options), {id(p): n for n, p in net.named_parameters()})
    del an
    params = dict(net.named_parameters())
    steps = args.gradual_epochs * math.ceil(len(data.y_train) / RECIPE["batch"])
    settings = GradualRemoval(steps=steps, penalty=args.gradual_penalty)
    masks = [m.mask for m in marked]

    def norm() -> float:
        return math.sqrt(
            sum(marked_norm(params[m.param], m.q_a, m.q_g, k) ** 2 for m, k in zip(marked, masks))
        )

    def after_backward(step: int) -> None:
        lam = settings.strength(step + 1)
        for m, k in zip(marked, masks):
            p = params[m.param]
            p.grad.add_(penalty_grad(p, m.q_a, m.q_g, k, lam).to(p.dtype))

    before = norm()
    t0 = time.time()
    train(net, data, args.gradual_epochs, FINETUNE_LR, args.seed + 2, after_backward=after_backward)
    info = {
        "options": opts,
        "gradual": {"epochs": args.gradual_epochs, "steps": steps, "penalty": args.gradual_penalty},
        "marked_norm_before": before,
        "marked_norm_after": norm(),
        "gradual_s": round(time.time() - t0, 1),
    }
    refresh_bn(net, calib)
    info["acc_before_prune"] = accuracy(net, data.x_test[:QUICK_TEST], data.y_test[:QUICK_TEST])
    report = prune(net, calib, ratio=ratio, target="flops", seed=args.seed, **opts)
    info |= {"target_reached": report.target_reached, "forms": _forms(report)}
    return net, info


def run_row(args: argparse.Namespace) -> dict[str, Any] | None:
    from lightning_eigendamage.costs import count_flops, count_params

    torch.set_num_threads(args.threads)
    if args.method == ITER and (args.latency_x is not None or not args.finetune):
        raise SystemExit(f"{ITER} prunes during the fine-tune: it needs --flops-x and --finetune N")
    if args.method == GRADUAL and args.latency_x is not None:
        raise SystemExit(f"{GRADUAL} needs --flops-x")
    if args.group_cap is not None and (args.method in OURS or not 0.0 < args.group_cap < 1.0):
        raise SystemExit("--group-cap is a channel method's per-layer cap, in (0, 1)")
    variant = args.variant if args.method in OURS else channel_variant(args)
    latency = args.latency_x is not None
    rec: dict[str, Any] = {
        "model": args.model,
        "method": args.method,
        "variant": variant,
        "flops_x": None if latency else args.flops_x,
        "seed": args.seed,
        "finetune": args.finetune,
        "protocol_bn": not args.no_protocol_bn,
    }
    if latency:
        rec |= {"latency_x": args.latency_x, "memory_format": args.memory_format}
    if row_key(rec) in done_keys():
        print(f"done already: {row_key(rec)}")
        return None
    data = load_data("fashion-mnist", root=args.data_root)
    dense = load_dense(args.model)
    calib = calibration(data, args.seed)
    example = calib[0][0][:1]
    base_flops, base_params = count_flops(dense, example), count_params(dense)
    torch.manual_seed(args.seed)
    t0 = time.time()
    if args.method == ITER:
        net, info = iterative_prune_and_finetune(args, dense, data, calib)
    elif args.method == GRADUAL:
        net, info = gradual_prune(args, dense, data, calib)
    elif latency and args.finetune and reproducible(args) and (before := matched_before(args)) is not None:
        # The bisection (timed on a quiet machine) was recorded by the after-pruning row; the
        # fine-tuned row prunes at the ratio it found and keeps its latency figures.
        net, info = ratio_pruner(args, dense, data, calib)(before["ratio_found"])
        info |= latency_figures(before)
    elif (
        latency
        and args.finetune
        and (before := matched_before(args)) is not None
        and matched_net_path(args).exists()
    ):
        net, info = continue_matched(args, before)
    elif latency:
        net, info = match_latency(args, dense, data, calib)
        if not reproducible(args) and not args.finetune:
            matched_net_path(args).parent.mkdir(parents=True, exist_ok=True)
            torch.save(net, matched_net_path(args))
    else:
        net, info = prune_copy(args, dense, data, calib, 1.0 - 1.0 / args.flops_x)
    rec |= info
    rec["prune_s"] = round(time.time() - t0, 2)
    if args.method != ITER:
        if not args.no_protocol_bn:
            refresh_bn(net, calib)
        rec["acc_after_quick"] = accuracy(net, data.x_test[:QUICK_TEST], data.y_test[:QUICK_TEST])
        if args.finetune:
            rec["acc_after"] = accuracy(net, data.x_test, data.y_test)
            t1 = time.time()
            train(net, data, args.finetune, FINETUNE_LR, args.seed + 1)
            rec["finetune_s"] = round(time.time() - t1, 1)
    if args.finetune:
        refresh_bn(net, calib)
        rec["acc_finetuned"] = accuracy(net, data.x_test, data.y_test)
    rec["flops"], rec["params"] = count_flops(net, example), count_params(net)
    rec["flops_reached_x"] = base_flops / max(rec["flops"], 1)
    rec["param_ratio"] = rec["params"] / base_params
    rec["dense_acc"] = json.loads((RESULTS / f"dense-{args.model}.json").read_text())["test_accuracy"]
    rec["threads"] = args.threads
    rec["date"] = time.strftime("%Y-%m-%d %H:%M")
    rec["command"] = single_command(args)
    with open(RESULTS / "records.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)
    return rec


def _forms(report: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in report.layers:
        if r.skipped is None:
            out[r.form] = out.get(r.form, 0) + 1
    return out


def channel_variant(args: argparse.Namespace) -> str:
    """A channel method's variant in the record: ``"-"`` with Torch-Pruning's default cap on the
    fraction of a layer's channels removed (0.95, the paper's ``prune_ratio_limit``), else
    ``cap<x>``."""
    return "-" if args.group_cap is None else f"cap{args.group_cap:g}"


def single_command(args: argparse.Namespace) -> str:
    parts = ["python benchmarks/converged.py row", f"--model {args.model}", f"--method {args.method}"]
    if args.method in OURS:
        parts.append(f"--variant {args.variant}")
    if args.group_cap is not None:
        parts.append(f"--group-cap {args.group_cap:g}")
    if args.method == GRADUAL:
        parts.append(f"--gradual-epochs {args.gradual_epochs} --gradual-penalty {args.gradual_penalty:g}")
    if args.latency_x is not None:
        parts += [f"--latency-x {args.latency_x:g}", f"--memory-format {args.memory_format}"]
        parts += [f"--latency-threads {args.latency_threads}", f"--latency-repeats {args.latency_repeats}"]
    else:
        parts.append(f"--flops-x {args.flops_x:g}")
    parts.append(f"--seed {args.seed}")
    if args.finetune:
        parts.append(f"--finetune {args.finetune}")
    if args.no_protocol_bn:
        parts.append("--no-protocol-bn")
    return " ".join(parts)


def _argv(
    model: str, method: str, flops_x: float | None, *, variant: str | None = None, **flags: Any
) -> list[str]:
    """A ``row`` command line: ``--key value`` for each flag (``True`` flags as switches)."""
    argv = ["--model", model, "--method", method]
    if flops_x is not None:
        argv += ["--flops-x", f"{flops_x:g}"]
    if variant is not None:
        argv += ["--variant", variant]
    for key, value in flags.items():
        opt = "--" + key.replace("_", "-")
        argv += [opt] if value is True else [opt, str(value)]
    return argv


def grid_rows(name: str, models: tuple[str, ...] = ("resnet20-narrow", "vgg-narrow")) -> list[list[str]]:
    """The argument lists of a named grid (each a ``row`` command)."""
    rows = []
    if name == "after-pruning":
        for model in models:
            for fx in (2, 4, 8):
                for seed in (0, 1) if fx > 2 else (0,):
                    for v in VARIANTS:
                        if v not in NOT_IN_ABLATION:
                            rows.append(_argv(model, EIGEN, fx, variant=v, seed=seed))
                    rows += [_argv(model, m, fx, seed=seed) for m in PEERS]
    elif name == "plain-user":  # what prune() gives without the protocol's BatchNorm re-estimation
        for model in models:
            for v in ("paper-no-bn", "paper", "defaults"):
                rows.append(_argv(model, EIGEN, 2, variant=v, no_protocol_bn=True))
    elif name == "finetune":  # in order of priority: the leaders after pruning first
        plan = {
            "resnet20-narrow": [(4, EIGEN), (4, "taylor"), (4, "l2"), (8, EIGEN), (8, "taylor")],
            "vgg-narrow": [(4, EIGEN), (4, "taylor"), (4, "l2"), (8, EIGEN), (8, "taylor"), (8, "l2")],
        }
        for model in models:
            for fx, m in plan[model]:
                rows.append(_argv(model, m, fx, variant="defaults" if m == EIGEN else None, finetune=3))
    elif name == "finetune-seed1":  # the second seed of the fine-tuned leaders (mean of 2 seeds)
        plan = {
            "resnet20-narrow": [(4, EIGEN), (4, "l2"), (8, EIGEN), (8, "taylor")],
            "vgg-narrow": [(8, "l2")],
        }
        for model in models:
            for fx, m in plan[model]:
                variant = "defaults" if m == EIGEN else None
                rows.append(_argv(model, m, fx, variant=variant, finetune=3, seed=1))
    elif name == "finetune-all":  # the most accurate EigenDamage setting after pruning, fine-tuned
        for model in models:
            rows += [_argv(model, EIGEN, fx, variant="all", finetune=3) for fx in (4, 8)]
    elif name == "second-order":  # the paper's channel baselines, after pruning
        for model in models:
            for fx in (2, 4, 8):
                for seed in (0, 1) if fx > 2 else (0,):
                    rows += [_argv(model, m, fx, seed=seed) for m in SECOND_ORDER]
    elif name == "iterative":  # EigenDamage in three rounds during the 3-epoch fine-tune
        for model in models:
            rows += [_argv(model, ITER, fx, variant="defaults", finetune=3) for fx in (4, 8, 2)]
            rows += [_argv(model, ITER, fx, variant="defaults", finetune=3, seed=1) for fx in (4, 8)]
    elif name == "finetune-more":  # the other methods fine-tuned (one seed), then ÷2
        for model in models:
            for fx in (4, 8):
                rows += [_argv(model, m, fx, finetune=3) for m in ("slimming", "l1", *SECOND_ORDER)]
            rows.append(_argv(model, EIGEN, 2, variant="defaults", finetune=3))
            rows += [_argv(model, m, 2, finetune=3) for m in ("l2", "taylor")]
    elif name == "finetune10":  # the leaders at ÷8 with 10 fine-tuning epochs
        for model in models:
            rows.append(_argv(model, EIGEN, 8, variant="defaults", finetune=10))
            rows += [_argv(model, m, 8, finetune=10) for m in ("l2", "taylor")]
    elif name == "finetune-complete":  # every method fine-tuned: ÷2 seed 0, ÷4 / ÷8 seeds 0 and 1
        # in order of priority (rows already recorded are skipped): the leaders first, then the
        # paper's baselines, the 10-epoch rows, the second seeds of the baselines and iterative
        leaders = (EIGEN, "l1", "l2", "taylor", "slimming")

        def ft(model: str, m: str, fx: float, epochs: int = 3, seed: int = 0) -> list[str]:
            variant = "defaults" if m in (EIGEN, ITER) else None
            return _argv(model, m, fx, variant=variant, finetune=epochs, seed=seed)

        for model in models:
            rows += [ft(model, m, fx, seed=s) for fx in (4, 8) for s in (0, 1) for m in leaders]
        for model in models:
            rows += [ft(model, m, 2) for m in leaders]
        for model in models:
            rows += [ft(model, m, fx) for fx in (4, 8) for m in SECOND_ORDER]
        for model in models:
            rows += [ft(model, m, 2) for m in SECOND_ORDER]
        for model in models:
            rows += [ft(model, m, 8, epochs=10) for m in leaders[:4]]
        for model in models:
            rows += [ft(model, m, fx, seed=1) for fx in (4, 8) for m in SECOND_ORDER]
        for model in models:
            rows += [ft(model, ITER, fx, seed=s) for fx, s in ((4, 1), (8, 1), (2, 0))]
    elif name == "baselines-cap":  # the paper's channel baselines with a 0.75 per-layer cap
        for model, budgets in (("vgg-narrow", (2, 4)), ("resnet20-narrow", (8,))):
            if model in models:
                rows += [
                    _argv(model, m, fx, group_cap=0.75, finetune=3) for fx in budgets for m in SECOND_ORDER
                ]
    elif name in ("latency-forms", "latency-forms-finetune"):  # forms chosen by measured time
        for model in models:
            if name == "latency-forms-finetune":
                for fmt in ("nchw", "channels_last"):
                    lat = dict(latency_x=1.22, memory_format=fmt, finetune=3)
                    rows.append(_argv(model, EIGEN, None, variant="latency-forms", **lat))
                continue
            for fmt, ks in (("nchw", (1.22, 1.5, 2)), ("channels_last", (1.22,))):
                for k in ks:
                    lat = dict(latency_x=k, memory_format=fmt)
                    rows.append(_argv(model, EIGEN, None, variant="latency-forms", **lat))
    elif name in ("latency", "latency-finetune"):  # matched measured latency (batch 64, 2 threads)
        # ×0.82, ×0.67, ×0.5, ×0.33 of the dense time; fine-tuned at ×0.82 and ×0.5
        ks = (1.22, 1.5, 2, 3) if name == "latency" else (1.22, 2)
        extra = {} if name == "latency" else {"finetune": 3}
        for model in models:
            for fmt in ("nchw", "channels_last"):
                for k in ks:
                    for m in (EIGEN, "l1", "l2", "taylor"):
                        variant = "defaults" if m == EIGEN else None
                        rows.append(
                            _argv(model, m, None, variant=variant, latency_x=k, memory_format=fmt, **extra)
                        )
    else:
        raise ValueError(f"unknown grid {name!r}")
    return rows


def run_grid(args: argparse.Namespace) -> None:
    rows = grid_rows(args.grid, tuple(args.models))
    mine = rows[args.part :: args.parts]
    if args.reverse:  # a second worker from the other end; rows done meanwhile are skipped
        mine = mine[::-1]
    for i, argv in enumerate(mine):
        row_args = parse_args(["row", *argv, "--threads", str(args.threads), "--data-root", args.data_root])
        if row_args.latency_x is not None and args.latency_repeats is not None:
            row_args.latency_repeats = args.latency_repeats
        print(f"[{i + 1}/{len(mine)}] {single_command(row_args)}", flush=True)
        run_row(row_args)


def train_step_times(args: argparse.Namespace) -> None:
    """Seconds per training step (forward, backward, SGD step; batch 128) of the dense network and
    of its ``÷k`` prunings by EigenDamage (each variant in ``--variants``), by each channel method
    in ``--channel-methods`` (e.g. ``kron-obs-in-seq``) and by each Torch-Pruning importance in
    ``--tp-methods`` (L2 by default), and with ``--infer-batch`` eval-mode inference at that batch,
    timed interleaved in one process (medians of ``--repeats`` rounds), with the FLOPs reduction
    each pruning reached (``flops_reached_x``: a variant whose forms are chosen by time can fall
    short of ``÷k``); printed and appended to ``train_step.jsonl`` with the command."""
    from benchmarks.baselines_tp import prune_baseline
    from lightning_eigendamage import prune
    from lightning_eigendamage.costs import count_flops

    torch.set_num_threads(args.threads)
    data = load_data("fashion-mnist", root=args.data_root)
    dense = build_model(args.model, 10, 1)
    dense.load_state_dict(torch.load(dense_path(args.model), weights_only=True))
    calib = calibration(data, 0)
    ratio = 1.0 - 1.0 / args.flops_x
    nets = {"dense": copy.deepcopy(dense)}
    for v in args.variants:
        nets[f"eigendamage:{v}"] = copy.deepcopy(dense)
        prune(nets[f"eigendamage:{v}"], calib, ratio=ratio, target="flops", **VARIANTS[v])
    for m in args.channel_methods:
        nets[m] = copy.deepcopy(dense)
        prune_baseline(nets[m], calib, m, ratio=ratio, target="flops")
    for m in args.tp_methods:
        nets[f"tp-{m}"] = copy.deepcopy(dense)
        prune_baseline(nets[f"tp-{m}"], calib, m, ratio=ratio, target="flops")
    x, y = data.x_train[:128], data.y_train[:128]
    xi = data.x_train[: args.infer_batch]
    flops = {k: count_flops(n, x[:1]) for k, n in nets.items()}
    opts = {k: torch.optim.SGD(n.parameters(), lr=1e-3, momentum=0.9) for k, n in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    infer: dict[str, list[float]] = {k: [] for k in nets}
    for r in range(args.repeats + 2):
        for k, net in nets.items():
            net.train()
            t = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opts[k].step()
            if r >= 2:  # warm-up rounds
                times[k].append(time.perf_counter() - t)
            if args.infer_batch:  # eval-mode inference, interleaved the same way
                net.eval()
                with torch.inference_mode():
                    t = time.perf_counter()
                    net(xi)
                    if r >= 2:
                        infer[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    inf = {k: sorted(v)[len(v) // 2] for k, v in infer.items() if v}
    tp = [k for k in med if k.startswith("tp-")]
    rec = {
        "model": args.model,
        "flops_x": args.flops_x,
        "threads": args.threads,
        "seconds_per_step": med,
        "vs_dense": {k: med[k] / med["dense"] for k in med},
        **({"vs_tp_l2": {k: med[k] / med["tp-l2"] for k in med}} if "tp-l2" in med else {}),
        "vs_fastest_tp": {k: med[k] / min(med[t] for t in tp) for k in med} if tp else {},
        **(
            {
                "infer_batch": args.infer_batch,
                "infer_seconds": inf,
                "infer_speedup_vs_dense": {k: inf["dense"] / inf[k] for k in inf},
            }
            if inf
            else {}
        ),
        "flops_reached_x": {k: flops["dense"] / flops[k] for k in nets},
        "command": "python benchmarks/converged.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    with open(RESULTS / "train_step.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec, indent=1))


WIDTH_MODELS = ("vgg19", "vgg19-narrow", "resnet32-wide", "resnet32-narrow")


def width_rows(args: argparse.Namespace) -> None:
    """Latency against channel pruning at the paper's widths (VGG19, the wide ResNet-32) and at a
    quarter of them, on Fashion-MNIST padded to 32×32.

    Short schedule, one seed: ``--train-images`` training images (a seeded subset) for
    ``--epochs`` epochs of the recipe, cached; then for each ``÷k`` in ``--flops-x``: EigenDamage
    (defaults) and Torch-Pruning L2 on the same calibration batches, BatchNorm re-estimated,
    accuracy on the first 2,000 test images, and the eval latency at batch ``LATENCY_BATCH`` on
    ``--latency-threads`` threads of the dense network and both prunings, timed interleaved
    (median of ``--latency-repeats`` rounds) in NCHW and ``channels_last``. The accuracies come
    from a short schedule and only say that nothing collapsed; the point is the latency ratio.
    One record per (network, ÷k) in ``width.jsonl``, with the command.
    """
    from benchmarks.baselines_tp import prune_baseline
    from lightning_eigendamage import prune
    from lightning_eigendamage.costs import count_flops

    if args.train_images < CALIB_BATCHES * CALIB_SIZE:
        raise SystemExit(f"--train-images must be at least {CALIB_BATCHES * CALIB_SIZE} (the calibration)")
    torch.set_num_threads(args.threads)
    out = RESULTS / "width.jsonl"
    done = set()
    if out.exists():
        done = {
            (r["model"], r["flops_x"], r["train_images"], r["epochs"])
            for r in map(json.loads, out.read_text().splitlines())
        }
    full = load_data("fashion-mnist", root=args.data_root)
    perm = torch.randperm(len(full.y_train), generator=torch.Generator().manual_seed(0))[: args.train_images]
    pad = lambda x: F.pad(x, (2, 2, 2, 2))  # noqa: E731  28×28 → 32×32
    data = argparse.Namespace(
        x_train=pad(full.x_train[perm]),
        y_train=full.y_train[perm],
        x_test=pad(full.x_test[:2000]),
        y_test=full.y_test[:2000],
    )
    for model in args.models:
        todo = [fx for fx in args.flops_x if (model, fx, args.train_images, args.epochs) not in done]
        if not todo:
            continue
        cache = Path(args.cache) / f"width-{model}-n{args.train_images}-e{args.epochs}.pt"
        dense = build_model(model, 10, 1)
        t0 = time.time()
        if cache.exists():
            dense.load_state_dict(torch.load(cache, weights_only=True))
        else:
            torch.manual_seed(0)
            train(dense, data, args.epochs, RECIPE["lr"], 0)
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dense.state_dict(), cache)
        train_s = round(time.time() - t0, 1)
        if args.train_only:
            print(f"{model}: trained and cached in {train_s} s ({cache})", flush=True)
            continue
        dense.eval()
        dense_acc = accuracy(dense, data.x_test, data.y_test)
        calib = calibration(data, 0)
        x = data.x_test[:LATENCY_BATCH]
        base = count_flops(dense, x[:1])
        for fx in todo:
            nets: dict[str, nn.Module] = {}
            rec: dict[str, Any] = {
                "model": model,
                "flops_x": fx,
                "train_images": args.train_images,
                "epochs": args.epochs,
                "dense_acc": dense_acc,
                "train_s": train_s,
            }
            t1 = time.time()
            nets["eigendamage"] = copy.deepcopy(dense)
            prune(nets["eigendamage"], calib, ratio=1 - 1 / fx, target="flops", seed=0)
            rec["prune_s_eigendamage"] = round(time.time() - t1, 1)
            nets["tp-l2"] = copy.deepcopy(dense)
            prune_baseline(nets["tp-l2"], calib, "l2", ratio=1 - 1 / fx, target="flops", seed=0)
            for name, net in nets.items():
                refresh_bn(net, calib)
                rec[f"acc_{name}"] = accuracy(net, data.x_test, data.y_test)
                rec[f"flops_x_{name}"] = base / count_flops(net, x[:1])
            torch.set_num_threads(args.latency_threads)
            for fmt in ("nchw", "channels_last"):
                for name, net in nets.items():
                    t_dense, t_net = interleaved_latency(dense, net, x, args.latency_repeats, fmt)
                    rec[f"speedup_{name}_{fmt}"] = t_dense / t_net
                    rec[f"dense_ms_{fmt}"] = 1e3 * t_dense
                rec[f"ed_over_tp_{fmt}"] = rec[f"speedup_eigendamage_{fmt}"] / rec[f"speedup_tp-l2_{fmt}"]
            torch.set_num_threads(args.threads)
            rec |= {
                "latency_batch": LATENCY_BATCH,
                "latency_threads": args.latency_threads,
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "command": f"python benchmarks/converged.py width --models {model} --flops-x {fx:g} "
                f"--train-images {args.train_images} --epochs {args.epochs} "
                f"--latency-threads {args.latency_threads} --latency-repeats {args.latency_repeats}",
            }
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="train and cache a converged dense network")
    p.add_argument("--model", required=True, choices=["resnet20-narrow", "vgg-narrow", "mobilenetv2-narrow"])
    p.add_argument("--epochs", type=int, default=6)
    r = sub.add_parser("row", help="prune the dense network with one method and measure")
    r.add_argument("--model", required=True, choices=["resnet20-narrow", "vgg-narrow", "mobilenetv2-narrow"])
    r.add_argument("--method", required=True, choices=list(METHODS))
    r.add_argument("--variant", default="defaults", choices=list(VARIANTS))
    target = r.add_mutually_exclusive_group(required=True)
    target.add_argument("--flops-x", type=float, help="prune to 1/k of the dense FLOPs")
    target.add_argument(
        "--latency-x", type=float, help=f"prune to 1/k of the dense latency (batch {LATENCY_BATCH}, measured)"
    )
    r.add_argument("--memory-format", default="nchw", choices=["nchw", "channels_last"])
    r.add_argument("--latency-threads", type=int, default=2)
    r.add_argument("--latency-repeats", type=int, default=15)
    r.add_argument("--bisect-steps", type=int, default=7)
    r.add_argument(
        "--gradual-epochs", type=int, default=1, help=f"{GRADUAL}: penalised epochs before the prune"
    )
    r.add_argument("--gradual-penalty", type=float, default=5.0, help=f"{GRADUAL}: the penalty's ceiling")
    r.add_argument(
        "--group-cap",
        type=float,
        default=None,
        help="channel methods: the most of a layer's channels removed (default 0.95, TP's and the paper's)",
    )
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--finetune", type=int, default=0, help="fine-tuning epochs after pruning")
    r.add_argument(
        "--no-protocol-bn", action="store_true", help="measure without the protocol's BN re-estimation"
    )
    t = sub.add_parser("trainstep", help="training-step time of pruned networks against dense and TP-L2")
    t.add_argument("--model", required=True, choices=["resnet20-narrow", "vgg-narrow", "mobilenetv2-narrow"])
    t.add_argument("--flops-x", type=float, default=4.0)
    t.add_argument("--variants", nargs="*", default=["paper", "defaults"], choices=list(VARIANTS))
    t.add_argument("--tp-methods", nargs="*", default=["l2"], choices=["l1", "l2", "taylor"])
    t.add_argument(
        "--infer-batch", type=int, default=0, help="also time eval-mode inference at this batch (0: no)"
    )
    t.add_argument("--channel-methods", nargs="*", default=[], choices=[m for m in METHODS if m not in OURS])
    t.add_argument("--repeats", type=int, default=21)
    g = sub.add_parser("grid", help="run the rows of a named grid (resumable; --parts/--part split it)")
    g.add_argument("--grid", required=True)
    g.add_argument("--parts", type=int, default=1)
    g.add_argument("--part", type=int, default=0)
    g.add_argument("--models", nargs="+", default=["resnet20-narrow", "vgg-narrow"])
    g.add_argument("--reverse", action="store_true", help="run the rows from the last one")
    g.add_argument("--latency-repeats", type=int, default=None, help="for latency-matched rows")
    w = sub.add_parser("width", help="latency against channel pruning at the paper's widths (32×32)")
    w.add_argument("--models", nargs="+", default=list(WIDTH_MODELS), choices=list(WIDTH_MODELS))
    w.add_argument("--flops-x", type=float, nargs="+", default=[2.0, 4.0])
    w.add_argument("--train-images", type=int, default=4000)
    w.add_argument("--epochs", type=int, default=1)
    w.add_argument("--latency-threads", type=int, default=2)
    w.add_argument("--latency-repeats", type=int, default=7)
    w.add_argument("--train-only", action="store_true", help="only train and cache the dense networks")
    sub.add_parser("table", help="tables.md and plots from the records (benchmarks/tables.py --converged)")
    for q in (p, r, g, t, w):
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--data-root", default="data")
        q.add_argument("--cache", default="data/converged-cache")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cmd == "pretrain":
        pretrain(args)
    elif args.cmd == "row":
        run_row(args)
    elif args.cmd == "trainstep":
        train_step_times(args)
    elif args.cmd == "width":
        width_rows(args)
    elif args.cmd == "table":
        from benchmarks.tables import converged_report

        print(converged_report(RESULTS))
    else:
        run_grid(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
