"""Pruned models under torch.export and torch.compile."""

from __future__ import annotations

import pytest
import torch
from models import ConvNet, conv_batches, warm_up_bn

from lightning_eigendamage import prune


def _pruned():
    torch.manual_seed(0)
    model = ConvNet()
    batches = conv_batches(2, n=8, size=16)
    warm_up_bn(model, batches)
    prune(model, batches, ratio=0.5)
    return model.eval(), batches[0][0]


def test_torch_export_matches_eager():
    model, x = _pruned()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_recompiles_after_prune(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvNet().eval()
    batches = conv_batches(2, n=8, size=16)
    compiled = torch.compile(model, backend=backend)
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    prune(model, batches, ratio=0.5)  # swaps modules of the compiled model in place
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    # A second prune changes shapes again: still no stale graph.
    prune(model, batches, ratio=0.5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_onnx_export_matches_eager(tmp_path):
    onnx = pytest.importorskip(
        "onnx", reason="ONNX export is optional: pip install onnx onnxscript onnxruntime"
    )
    ort = pytest.importorskip("onnxruntime")
    model, x = _pruned()
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)
