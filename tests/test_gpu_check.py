"""``benchmarks/gpu_check.sh --device cpu --quick`` end to end (about a minute on 2 cores).

The CPU quick run is what exercises ``tests/test_cuda.py`` in CI (``LED_TEST_DEVICE=cpu``), the
``--smoke`` path of ``benchmarks/speed.py`` and the synthetic paper-preset epoch of
``benchmarks/run.py``; this test checks that it passes and writes what a GPU run would.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torch_pruning")

ROOT = Path(__file__).resolve().parents[1]


def _positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def test_gpu_check_quick_on_cpu(tmp_path: Path) -> None:
    """Exit 0; every part ran and passed; the device tests passed on the CPU (not skipped); the
    JSON figures are finite and positive; summary.md says what ran and that it is no measurement."""
    out = tmp_path / "gpu"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "LED_TEST_"))}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gpu_check: all parts passed" in proc.stdout
    assert (out / ".gitignore").read_text().strip() == "*"  # quick output is never committed

    # Every part ran, passed, and its time was recorded (and printed).
    parts = [line.split("\t") for line in (out / "parts.tsv").read_text().splitlines()]
    assert [p[0] for p in parts] == ["tests", "speed", "epoch-vgg19-narrow", "eval"]
    for name, secs, rc, status in parts:
        assert rc == "0" and status == "ok" and float(secs) > 0, (name, rc, status)
        assert f"=== {name}: ok in" in proc.stdout

    # The device tests ran on the CPU and passed (none skipped); the NCCL variant is skipped with
    # its reason, printed by -rs, where there are fewer than 2 GPUs.
    cases = list(ET.parse(out / "tests.xml").getroot().iter("testcase"))
    cuda = [c for c in cases if c.get("classname", "").endswith("test_cuda")]
    assert len(cuda) >= 9
    for c in cuda:
        assert c.find("skipped") is None and c.find("failure") is None and c.find("error") is None, c.get(
            "name"
        )
    ddp = [c for c in cases if c.get("classname", "").endswith("test_ddp")]
    assert len(ddp) == 4 and all("[gpu-" in c.get("name", "") for c in ddp)  # both structures
    assert {c.get("name").split("[gpu-")[1] for c in ddp} == {"rounds]", "channels]"}
    log = (out / "tests.log").read_text()
    if torch.cuda.device_count() < 2:
        assert all(c.find("skipped") is not None for c in ddp)
        assert "SKIPPED" in log and "the NCCL variant needs 2 CUDA devices" in log

    # speed.py --smoke: every figure finite and positive, ÷2 and ÷4 against Torch-Pruning.
    speed = json.loads((out / "speed.json").read_text())
    assert speed["smoke"] is True and speed["device"] == "cpu"
    for r in speed["capture"].values():
        assert all(
            _positive(r[k]) for k in ("plain_s", "empirical_ratio", "true_step_ratio", "epoch_ratio")
        ), r
    assert speed["prune"] and all(
        _positive(r["prune_s"]) and _positive(r["flops_x"]) for r in speed["prune"].values()
    )
    (rnd,) = speed["rounds"].values()  # one channel round, by phase
    parts = ("check_s", "analysis_s", "decide_single_s", "decide_greedy_s", "surgery_s")
    assert all(_positive(rnd[k]) for k in (*parts, "round_s", "greedy_over_single")), rnd
    assert rnd["round_s"] == pytest.approx(
        rnd["check_s"] + rnd["analysis_s"] + rnd["decide_greedy_s"] + rnd["surgery_s"]
    )
    for r in speed["memory"].values():
        assert all(_positive(r[k]) for k in ("train_peak_mb", "prune_peak_mb", "ratio", "factors_mb")), r
    vs = speed["vs_torch_pruning"]
    assert {(r["target"], r["batch"]) for r in vs} == {(t, b) for t in ("÷2", "÷4") for b in (1, 4)}
    for r in vs:
        assert all(_positive(r[k]) for k in ("flops_x", "speedup", "tp_flops_x", "tp_speedup", "vs_tp")), r
        k = float(r["target"][1:])
        assert abs(r["flops_x"] / k - 1) < 0.05 and abs(r["tp_flops_x"] / k - 1) < 0.05, r

    # One paper-preset epoch on synthetic CIFAR-shaped data, and the estimate built from it.
    est = json.loads((out / "paper_epoch.json").read_text())
    assert est["quick"] is True and est["dataset"] == "synthetic-cifar10"
    assert est["table"] == {"methods": 10, "flops_targets": 3, "seeds": 2, "rows": 60, "epochs": 9400}
    m = est["models"]["vgg19-narrow"]
    for key in ("pretrain_epoch_s", "finetune_epoch_s", "prune_s", "eval_epoch_s", "estimate_h_per_dataset"):
        assert _positive(m[key]), (key, m[key])
    assert m["train_images"] == 64 and m["estimate_includes_eval"] is True
    assert abs(m["flops_reduction"] / 2 - 1) < 0.05
    assert est["estimate_h_all"] == pytest.approx(2 * m["estimate_h_per_dataset"])
    record = json.loads((out / m["record"]).read_text())
    assert record["preset"] == "paper" and record["protocol"]["finetune_lr"] == 1e-3

    summary = (out / "summary.md").read_text()
    assert "NOT GPU measurements" in summary
    assert "Command: `bash benchmarks/gpu_check.sh --device cpu --quick --out" in summary
    assert "Device: cpu, " in summary and f"{len(cuda)} passed, {len(ddp)} skipped, 0 failed" in summary
    assert "| resnet32 | nchw | 4 |" in summary
    assert f"**{m['estimate_h_per_dataset']:.1f} h** per dataset" in summary
    assert "SMOKE RUN" in (out / "speed.log").read_text()  # says its numbers are not measurements
