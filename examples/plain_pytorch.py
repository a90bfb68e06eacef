"""Prune a torchvision model in plain PyTorch with ``prune()``: no Lightning, no training loop.

    python examples/plain_pytorch.py                   # MobileNet-V3-small at 64×64, ~10 s on a CPU
    python examples/plain_pytorch.py --model resnet18 --flops-x 3
    python examples/plain_pytorch.py --tiny            # 32×32, seconds (or EIGENDAMAGE_EXAMPLES_TINY=1)

``prune()`` measures the loss curvature on a few batches (here random images: use a few batches
of your training data), removes what costs the least loss until the FLOPs target is met, and
rebuilds the layers in place. The script prints the report, times an eval forward of the dense
and the pruned model, and saves the pruned weights to ``<out>/pruned.pt``: they load into a
freshly built model with ``restore_pruned`` (see ``examples/resume_and_export.py``).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from lightning_eigendamage import prune, restore_pruned

TINY_ENV = "EIGENDAMAGE_EXAMPLES_TINY"


def latency_ms(models: list[nn.Module], x: torch.Tensor, repeats: int) -> list[float]:
    """Median eval-forward time of each model on ``x``, in milliseconds, the models called in
    turn (interleaved, so that a busy machine slows them alike)."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            m.eval()(x)  # warm-up
        for _ in range(repeats):
            for m, ts in zip(models, times):
                t0 = time.perf_counter()
                m(x)
                ts.append(time.perf_counter() - t0)
    return [1000 * sorted(ts)[len(ts) // 2] for ts in times]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Build, prune, time and save a torchvision model; returns the numbers it printed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilenet_v3_small", help="a torchvision.models builder name")
    p.add_argument("--flops-x", type=float, default=2.0, help="FLOPs target: dense / pruned")
    p.add_argument("--size", type=int, default=64, help="image side")
    p.add_argument("--structure", default="channels", choices=("auto", "channels", "eigenbasis"))
    p.add_argument(
        "--rank-by",
        default="relative_per_latency",
        help="channels: rank by the time each channel measurably saves at batch 8 (or 'relative': by FLOPs)",
    )
    p.add_argument("--tiny", action="store_true", help=f"32×32 images, 2 small batches (or {TINY_ENV}=1)")
    p.add_argument("--out", type=Path, default=Path("out/examples/plain_pytorch"))
    args = p.parse_args(argv)
    tiny = args.tiny or os.environ.get(TINY_ENV, "") not in ("", "0")
    size, n_batches, batch_size, repeats = (32, 2, 4, 3) if tiny else (args.size, 4, 16, 10)

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=10)
    # (inputs, targets) batches; the true Fisher (the default) samples its own targets from the
    # model's predictions, so here the targets are not even read
    batches = [
        (torch.randn(batch_size, 3, size, size), torch.randint(0, 10, (batch_size,)))
        for _ in range(n_batches)
    ]
    dense = copy.deepcopy(model).eval()

    # channels ranked by the time they save on this machine at the batch timed below (batch 8)
    ranking = {"rank_by": args.rank_by, "latency_batch": 8} if args.structure == "channels" else {}
    report = prune(
        model, batches, ratio=1 - 1 / args.flops_x, target="flops", structure=args.structure, **ranking
    )
    print(report.summary())

    x = torch.randn(8, 3, size, size)
    t_dense, t_pruned = latency_ms([dense, model], x, repeats)
    print(
        f"\neval forward, batch 8, {torch.get_num_threads()} thread(s): dense {t_dense:.1f} ms, "
        f"pruned {t_pruned:.1f} ms ({t_dense / t_pruned:.2f}× as fast)"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "pruned.pt")
    fresh = restore_pruned(getattr(torchvision.models, args.model)(num_classes=10), args.out / "pruned.pt")
    with torch.inference_mode():
        same = torch.equal(fresh.eval()(x), model.eval()(x))
    print(f"saved {args.out / 'pruned.pt'}; a fresh {args.model} restored from it: same outputs {same}")
    return {
        "flops_x": report.flops_compression,
        "target_reached": float(report.target_reached),
        "speedup": t_dense / t_pruned,
    }


if __name__ == "__main__":
    main()
