"""``make demo`` reports measured latency next to parameters and FLOPs (issue: the demo shows speed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.demo_digits import latency_ms  # noqa: E402


class _Sleeper(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return self.lin(x)


def test_latency_is_the_median_per_forward_and_tells_models_apart() -> None:
    slow, fast = _Sleeper(0.004), _Sleeper(0.0)
    slow.train()
    t = latency_ms({"slow": slow, "fast": fast}, torch.randn(3, 2), repeats=5, min_ms=1.0)
    assert set(t) == {"slow", "fast"}
    assert 3.5 <= t["slow"] <= 20.0  # milliseconds per forward, sleep included
    assert t["fast"] < t["slow"] / 2  # relative: on a loaded machine every forward takes longer
    assert slow.training and fast.training  # modes restored


def test_demo_prints_and_records_latency_of_dense_and_pruned(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "demo_digits.py"),
        "--out", str(out), "--epochs", "1", "--finetune-epochs", "7",
        "--latency-repeats", "3", "--latency-min-ms", "1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ms @1" in proc.stdout and "ms @64" in proc.stdout
    assert "latency: batch 1" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    for model in ("dense", "pruned"):
        lat = res[model]["latency_ms"]
        assert set(lat) == {"1", "64"} and all(v > 0 for v in lat.values())
    assert res["pruned"]["flops"] < res["dense"]["flops"]
    for bs in ("1", "64"):
        want = res["dense"]["latency_ms"][bs] / res["pruned"]["latency_ms"][bs]
        assert abs(res["latency"]["speedup"][bs] - want) < 1e-9
