"""The scripts in ``examples/`` run as a user runs them (``python examples/<name>.py``, on tiny
data) and do what they say: the files they leave are loaded here, independently of the scripts,
and checked (smaller model, FLOPs target met, identical outputs after reloading and export)."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lightning_eigendamage
from lightning_eigendamage import restore_pruned

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, out: Path, *args: str, tiny_by_env: bool = False) -> str:
    """Run ``examples/<name>`` in a fresh interpreter on tiny data; its stdout and stderr."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    if tiny_by_env:
        env["EIGENDAMAGE_EXAMPLES_TINY"] = "1"
    else:
        env.pop("EIGENDAMAGE_EXAMPLES_TINY", None)
        args = ("--tiny", *args)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--out", str(out), *args],
        cwd=out.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    return text


def _module(name: str) -> ModuleType:
    """An example imported as a module (for its model classes), without running its main()."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_examples_use_only_public_names() -> None:
    public = set(lightning_eigendamage.__all__)
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert {p.name for p in scripts} >= {"lightning_callback.py", "plain_pytorch.py", "resume_and_export.py"}
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_eigendamage"):
                assert node.module == "lightning_eigendamage", (path.name, node.module)
                assert {a.name for a in node.names} <= public, (path.name, [a.name for a in node.names])
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("lightning_eigendamage.") for a in node.names), path.name


def test_lightning_callback_example_halves_the_flops_while_it_trains(tmp_path: Path) -> None:
    out = tmp_path / "callback"
    text = _run("lightning_callback.py", out, tiny_by_env=True)  # tiny through the environment
    # the callback printed the round's report, which says the target was reached
    assert "target    remove 50.0% of the FLOPs (÷2.00): reached" in text
    # the saved weights load into a freshly built (dense) LightningModule, which gets smaller
    example = _module("lightning_callback")
    dense, fresh = example.Classifier(), example.Classifier()
    fresh.load_state_dict(torch.load(out / "pruned.pt", weights_only=True))  # enable_pruned_loading
    x = example.make_data(4)[:][0]
    assert _params(fresh) < 0.7 * _params(dense)
    assert _flops(dense, x) / _flops(fresh, x) >= 1.97
    # structure="auto" chose channels (Torch-Pruning is installed): plain, narrower convolutions
    narrower = [
        name
        for name, m in fresh.net.named_children()
        if isinstance(m, nn.Conv2d) and m.out_channels < dense.net.get_submodule(name).out_channels
    ]
    assert narrower and not any(isinstance(m, lightning_eigendamage.KFELayer) for m in fresh.modules())
    assert (out / "report.json").exists()


def test_plain_pytorch_example_prunes_a_torchvision_model(tmp_path: Path) -> None:
    out = tmp_path / "plain"
    text = _run("plain_pytorch.py", out)
    assert "target    remove 50.0% of the FLOPs (÷2.00): reached" in text
    assert "restored from it: same outputs True" in text
    dense = torchvision.models.mobilenet_v3_small(num_classes=10)
    fresh = restore_pruned(torchvision.models.mobilenet_v3_small(num_classes=10), out / "pruned.pt")
    x = torch.randn(2, 3, 32, 32)  # the tiny run's image size
    assert _params(fresh) < _params(dense)
    assert _flops(dense, x) / _flops(fresh, x) >= 1.97
    with torch.no_grad():
        assert torch.isfinite(fresh(x)).all()


def test_resume_and_export_example_reloads_and_exports_identically(tmp_path: Path) -> None:
    out = tmp_path / "resume"
    text = _run("resume_and_export.py", out)
    assert "1. stopped after epoch 1: 1 round done" in text
    assert "2. resumed and finished: 2 rounds in all" in text
    assert "3. same outputs: load_from_checkpoint True, restore_pruned True" in text
    example = _module("resume_and_export")
    x = torch.load(out / "example_input.pt", weights_only=True)
    expected = torch.load(out / "expected_output.pt", weights_only=True)

    # the checkpoint of the finished run, loaded here: the pruned model, its outputs exactly
    ckpt = out / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 3  # the resumed run went on to the end (max_epochs=4)
    loaded = example.Classifier.load_from_checkpoint(ckpt, weights_only=True).eval()
    net = restore_pruned(example.make_net(), out / "pruned_net.pt").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        assert torch.equal(net(x), expected)
    # two rounds of 30 % of the FLOPs each: about ÷2 in all
    dense = example.make_net()
    assert _flops(dense, x) / _flops(net, x) >= 1 / (0.7 + 0.005) ** 2 - 0.01
    assert _params(net) < _params(dense)

    # the exported files need nothing of the library and give the same outputs
    program = torch.export.load(out / "pruned.pt2")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-6)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-4, atol=1e-5)
