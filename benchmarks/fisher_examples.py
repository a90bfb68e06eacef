"""Does estimating the factors from fewer examples of each batch change what gets pruned?

    python benchmarks/fisher_examples.py [--data-root data] [--threads 2] [--models ...]
                                         [--out benchmarks/results/converged/fisher_examples.jsonl]

``PruningSchedule(fisher_examples=m)`` makes the callback estimate ``A`` and ``G`` from every
``s``-th example of each captured batch (``s = ⌈N/m⌉``): the true Fisher's sampled pass runs on
those examples only. This script measures what that costs in the result. On each converged
network of ``benchmarks/converged.py`` (full Fashion-MNIST, the dense weights committed in
``benchmarks/results/converged/``), with each structure (``channels``, ``eigenbasis``), at ÷2 and
÷4 FLOPs, it analyses a fresh copy on the grid's 10 calibration batches of 128 (seed 0), thinned
to every ``s``-th example (the pass the callback runs with ``fisher_examples=m``, true Fisher,
seed 0), decides and prunes; BatchNorm is re-estimated on the whole calibration batches in every
case, so only the factors differ. A row records, per ``m`` (``null``: every example), the test
accuracy right after the cut (no fine-tune), the FLOPs reached and, for channels, how many
removed channels differ from the all-examples plan (symmetric difference over the groups). The
rows replace the file's.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.converged import accuracy, comparison_main, load_dense, plan_difference  # noqa: E402
from lightning_eigendamage import PruneOptions  # noqa: E402
from lightning_eigendamage.costs import count_flops  # noqa: E402
from lightning_eigendamage.engine import get_engine  # noqa: E402

MODELS = ("resnet20-narrow", "vgg-narrow", "mobilenetv2-narrow")
EXAMPLES = (None, 32, 16)
STRUCTURES = ("channels", "eigenbasis")


def thinned(calib: list, m: int | None) -> list:
    """Every ``⌈N/m⌉``-th example of each batch (all of them for ``m=None``)."""
    if m is None:
        return calib
    return [(x[:: -(-x.shape[0] // m)], y[:: -(-x.shape[0] // m)]) for x, y in calib]


def compare(model: str, structure: str, ratio: float, data: object, calib: list) -> dict:
    """One model, structure and ratio: the result with the factors of each ``m``."""
    engine, dense = get_engine(structure), load_dense(model)
    options = PruneOptions(structure=structure, target="flops", seed=0)
    example = calib[0][0][:1]
    flops_dense = count_flops(dense, example)
    removed, acc, flops_x = {}, {}, {}
    for m in EXAMPLES:
        net = copy.deepcopy(dense)
        analysis = engine.analyse(net, thinned(calib, m), options)
        full = copy.copy(analysis)  # BatchNorm re-estimated on the whole batches in every case
        full.calibration = _calibration(analysis, calib)
        plan = engine.decide(full, ratio, options)
        engine.apply(net, full, plan, options)
        key = str(m)
        if structure == "channels":
            removed[key] = {g["root"]: set(g["removed"]) for g in plan.groups}
        acc[key] = accuracy(net, data.x_test, data.y_test)
        flops_x[key] = round(flops_dense / count_flops(net, example), 3)
    row = {"model": model, "structure": structure, "flops_x_asked": round(1 / (1 - ratio), 2)}
    row |= {"accuracy": acc, "flops_x": flops_x}
    if removed:
        a = removed["None"]
        row["removed"] = sum(len(v) for v in a.values())
        row["differing"] = {k: plan_difference(a, b) for k, b in removed.items() if k != "None"}
    return row


def _calibration(analysis: object, calib: list) -> list:
    """The analysis' calibration in its own form, on the whole batches."""
    own = analysis.calibration
    if isinstance(own, list) and own and torch.is_tensor(own[0]):
        return [x.to(own[0].device) for x, _ in calib]  # channels: the inputs
    return calib  # eigenbasis: the batches


def rows(model: str, data: object, calib: list) -> list[dict]:
    return [
        compare(model, structure, ratio, data, calib) for structure in STRUCTURES for ratio in (0.5, 0.75)
    ]


def main(argv: list[str] | None = None) -> None:
    out = ROOT / "benchmarks/results/converged/fisher_examples.jsonl"
    comparison_main(argv, __doc__, "fisher_examples.py", out, rows, MODELS, threads=2)


if __name__ == "__main__":
    main()
