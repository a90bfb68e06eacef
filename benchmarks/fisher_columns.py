"""Does reading every other output column into the patch-form ``A`` change what channels prune?

    python benchmarks/fisher_columns.py [--data-root data] [--threads 2] [--models ...]
                                        [--out benchmarks/results/converged/fisher_columns.jsonl]

The channel engine's ``A`` of a convolution is the patch form, ``Σ p pᵀ`` over the ``C_in·k²``
patches its output positions read: the dearest part of a capture batch. ``KFACapture(
a_columns=s)`` sums it over every ``s``-th column of each output map (the first column rotating
with the batch), ``s`` times cheaper; ``G`` is not thinned. This script measures what that costs
in the result, as ``fisher_examples.py`` does for the examples: on each converged network of
``benchmarks/converged.py`` (full Fashion-MNIST, the dense weights committed in
``benchmarks/results/converged/``), at ÷2 and ÷4 FLOPs, a fresh copy is captured on the grid's 10
calibration batches of 128 (seed 0, true Fisher) the way the callback captures (``max_examples``
examples of each batch, ``a_columns``), then decided and pruned by ``structure="channels"``;
BatchNorm is re-estimated on the whole calibration batches in every case, so only the factors
differ. A row records, per setting ``"<examples>/<columns>"`` (``"all/1"``: every example, every
column), the test accuracy right after the cut (no fine-tune), the FLOPs reached and how many
removed channels differ from the ``"all/1"`` plan. The rows replace the file's.
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
from lightning_eigendamage.curvature import capture_factors  # noqa: E402
from lightning_eigendamage.discovery import find_layers  # noqa: E402
from lightning_eigendamage.engine import get_engine  # noqa: E402

MODELS = ("resnet20-narrow", "vgg-narrow", "mobilenetv2-narrow")
# (examples of each batch, every how many output columns): None = every example
SETTINGS = ((None, 1), (32, 1), (32, 2), (16, 1), (16, 2))


def key(examples: int | None, columns: int) -> str:
    return f"{'all' if examples is None else examples}/{columns}"


def compare(model: str, ratio: float, data: object, calib: list) -> dict:
    """One model and ratio: the channel result with the factors of each setting."""
    engine, dense = get_engine("channels"), load_dense(model)
    options = PruneOptions(structure="channels", target="flops", seed=0)
    example = calib[0][0][:1]
    flops_dense = count_flops(dense, example)
    removed, acc, flops_x = {}, {}, {}
    for examples, columns in SETTINGS:
        net = copy.deepcopy(dense)
        cands = [c for c in find_layers(net) if c.skipped is None]
        captured = capture_factors(
            net,
            {c.name: c.hook_module for c in cands},
            calib,
            factors_for=engine.factor_layers(net, cands, options),
            a_form="patch",
            fisher="true",
            generator=torch.Generator().manual_seed(0),
            max_examples=examples,
            a_columns=columns,
        )
        analysis = engine.analyse(net, calib, options, captured=captured)
        plan = engine.decide(analysis, ratio, options)
        engine.apply(net, analysis, plan, options)
        k = key(examples, columns)
        removed[k] = {g["root"]: set(g["removed"]) for g in plan.groups}
        acc[k] = accuracy(net, data.x_test, data.y_test)
        flops_x[k] = round(flops_dense / count_flops(net, example), 3)
    base = removed[key(None, 1)]
    return {
        "model": model,
        "structure": "channels",
        "flops_x_asked": round(1 / (1 - ratio), 2),
        "accuracy": acc,
        "flops_x": flops_x,
        "removed": sum(len(v) for v in base.values()),
        "differing": {k: plan_difference(base, b) for k, b in removed.items() if k != key(None, 1)},
    }


def rows(model: str, data: object, calib: list) -> list[dict]:
    return [compare(model, ratio, data, calib) for ratio in (0.5, 0.75)]


def main(argv: list[str] | None = None) -> None:
    out = ROOT / "benchmarks/results/converged/fisher_columns.jsonl"
    comparison_main(argv, __doc__, "fisher_columns.py", out, rows, MODELS, threads=2)


if __name__ == "__main__":
    main()
