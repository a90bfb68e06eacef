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


def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median eval-forward time of ``model`` on ``x``, in milliseconds."""
    model.eval()
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Build, prune, time and save a torchvision model; returns the numbers it printed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilenet_v3_small", help="a torchvision.models builder name")
    p.add_argument("--flops-x", type=float, default=2.0, help="FLOPs target: dense / pruned")
    p.add_argument("--size", type=int, default=64, help="image side")
    p.add_argument("--structure", default="auto", choices=("auto", "channels", "eigenbasis"))
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

    report = prune(model, batches, ratio=1 - 1 / args.flops_x, target="flops", structure=args.structure)
    print(report.summary())

    x = torch.randn(8, 3, size, size)
    t_dense, t_pruned = latency_ms(dense, x, repeats), latency_ms(model, x, repeats)
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
