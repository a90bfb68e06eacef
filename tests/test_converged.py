"""benchmarks/converged.py: the crop, the calibration batches and the grids (the runs themselves
are benchmarks, not tests)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import converged  # noqa: E402


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    g = torch.Generator().manual_seed(0)
    out = converged.random_crop(x, 2, g)
    assert out.shape == x.shape
    g = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (2,), generator=g)
    dx = torch.randint(0, 5, (2,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        want = padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 6]
        assert torch.equal(out[i], want)


def test_calibration_batches_are_fixed_by_the_seed() -> None:
    data = SimpleNamespace(x_train=torch.randn(3000, 1, 4, 4), y_train=torch.randint(0, 10, (3000,)))
    a, b, c = (converged.calibration(data, s) for s in (0, 0, 1))
    assert len(a) == converged.CALIB_BATCHES and a[0][0].shape[0] == converged.CALIB_SIZE
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])


def test_grid_rows_parse_and_have_distinct_keys() -> None:
    for name in ("after-pruning", "plain-user", "finetune", "finetune-all"):
        keys = set()
        for argv in converged.grid_rows(name):
            args = converged.parse_args(["row", *argv])
            rec = {
                "model": args.model,
                "method": args.method,
                "variant": args.variant if args.method == converged.EIGEN else "-",
                "flops_x": args.flops_x,
                "seed": args.seed,
                "finetune": args.finetune,
                "protocol_bn": not args.no_protocol_bn,
            }
            keys.add(converged.row_key(rec))
        assert len(keys) == len(converged.grid_rows(name)), name
