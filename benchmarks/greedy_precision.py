"""Do the greedy channel scores (and the readers' ``A⁻¹``) choose the same channels in float32 as
in float64?

    python benchmarks/greedy_precision.py [--data-root data] [--threads 1] [--models ...]
                                          [--out benchmarks/results/converged/greedy_precision.jsonl]

On each converged network of ``benchmarks/converged.py`` (full Fashion-MNIST, the dense weights
committed in ``benchmarks/results/converged/``) and at ÷2 and ÷4 FLOPs, the channel engine
(``structure="channels"``, ``target="flops"``, seed 0, the grid's calibration batches of seed 0)
analyses a fresh copy and decides in three variants: the greedy states and the readers' ``A⁻¹``
in float64 (``float64``), the greedy states in float32 (``float32``:
``lightning_eigendamage.channels.baselines.GREEDY_DTYPE``), and both in float32
(``float32-inverse``: ``lightning_eigendamage.channels.engine.INVERSE_DTYPE``, the Cholesky
factorisation and inverse). A row records the channels removed, how many differ between
``float32`` and ``float64`` (``differing``) and between ``float32-inverse`` and ``float32``
(``differing_inverse``) (symmetric difference, summed over the groups), the time of each analysis
and decision and the test accuracy right after the cut (BatchNorm re-estimated, no fine-tune).
The rows replace the file's.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.converged import accuracy, comparison_main, load_dense, plan_difference  # noqa: E402
from lightning_eigendamage import PruneOptions  # noqa: E402
from lightning_eigendamage.channels import baselines as greedy  # noqa: E402
from lightning_eigendamage.channels import engine as channel_engine  # noqa: E402
from lightning_eigendamage.engine import get_engine  # noqa: E402

MODELS = ("resnet20-narrow", "vgg-narrow", "mobilenetv2-narrow")
VARIANTS = {  # (greedy dtype, inverse dtype)
    "float64": (torch.float64, torch.float64),
    "float32": (torch.float32, torch.float64),
    "float32-inverse": (torch.float32, torch.float32),
}


def compare(model: str, ratio: float, data: object, calib: list) -> dict:
    """One model at one ratio: the plans, times and accuracies of each variant."""
    engine, dense = get_engine("channels"), load_dense(model)
    options = PruneOptions(structure="channels", target="flops", seed=0)
    removed, seconds, analyse_s, acc = {}, {}, {}, {}
    defaults = greedy.GREEDY_DTYPE, channel_engine.INVERSE_DTYPE
    try:
        for name, (greedy_dtype, inverse_dtype) in VARIANTS.items():
            greedy.GREEDY_DTYPE, channel_engine.INVERSE_DTYPE = greedy_dtype, inverse_dtype
            net = copy.deepcopy(dense)
            t0 = time.perf_counter()
            analysis = engine.analyse(net, calib, options)
            analyse_s[name] = time.perf_counter() - t0
            t0 = time.perf_counter()
            plan = engine.decide(analysis, ratio, options)
            seconds[name] = time.perf_counter() - t0
            engine.apply(net, analysis, plan, options)
            removed[name] = {g["root"]: set(g["removed"]) for g in plan.groups}
            acc[name] = accuracy(net, data.x_test, data.y_test)
    finally:
        greedy.GREEDY_DTYPE, channel_engine.INVERSE_DTYPE = defaults
    return {
        "model": model,
        "flops_x": round(1 / (1 - ratio), 2),
        "removed": sum(len(v) for v in removed["float64"].values()),
        "differing": plan_difference(removed["float64"], removed["float32"]),
        "differing_inverse": plan_difference(removed["float32"], removed["float32-inverse"]),
        "analyse_s": analyse_s,
        "decide_s": seconds,
        "accuracy": acc,
    }


def rows(model: str, data: object, calib: list) -> list[dict]:
    return [compare(model, ratio, data, calib) for ratio in (0.5, 0.75)]


def main(argv: list[str] | None = None) -> None:
    out = ROOT / "benchmarks/results/converged/greedy_precision.jsonl"
    comparison_main(argv, __doc__, "greedy_precision.py", out, rows, MODELS)


if __name__ == "__main__":
    main()
