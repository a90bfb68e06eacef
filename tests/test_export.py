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


def test_torchscript_matches_eager():
    model, x = _pruned()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)


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


def test_capture_on_a_compiled_model_does_not_recompile_every_batch():
    """The capture hooks are not traced: their state (capture on/off, calls, layer names) must not
    become guards, or every batch of a capture window recompiles the user's compiled model."""
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    from lightning_eigendamage.curvature import KFACapture

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = ConvNet().eval()
    compiled = torch.compile(model, backend="eager")
    batches = conv_batches(6, n=8, size=16)
    layers = {"c0": model.features[0], "c2": model.features[2], "fc1": model.fc1}

    def run(net):
        with KFACapture(layers) as cap:
            for x, y in batches:
                cap.begin_batch()
                cap.grad_scale = float(len(y))
                F.cross_entropy(net(x), y).backward()
                assert cap.end_batch(len(y))
                F.cross_entropy(net(x), y).backward()  # a batch with capture off, hooks still on
        return {n: (lf.a(), lf.g()) for n, lf in cap.layers.items()}

    got = run(compiled)
    graphs = counters["stats"]["unique_graphs"]
    model.zero_grad()
    want = run(model)
    for name in layers:
        torch.testing.assert_close(got[name][0], want[name][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[name][1], want[name][1], rtol=1e-5, atol=1e-9)
    assert graphs <= 8  # a few graphs between the hooks, not some per batch


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


@pytest.mark.parametrize("bias_kv", [False, True])
def test_a_head_pruned_attention_compiles_with_torchscript(bias_kv):
    """A head-pruned ``nn.MultiheadAttention`` (``PrunedHeadsAttention``) failed to script
    (``Optional[Tensor]`` has no ``repeat``). Scripted, it computes what it does eagerly: inside
    an ``nn.TransformerEncoderLayer``, and alone with its attention weights and ``bias_k``."""
    import warnings

    from torch import nn

    from lightning_eigendamage.attention import PrunedHeadsAttention

    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(8, 32)
            self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.fc = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.enc(self.emb(x)).mean(1))

    torch.manual_seed(0)
    net = Text().eval()
    if bias_kv:
        net.enc.self_attn = nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True).eval()
    batches = [(torch.randn(8, 6, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(net, batches, ratio=0.5, target="flops", structure="channels")
    attn = net.enc.self_attn
    assert isinstance(attn, PrunedHeadsAttention) and attn.num_heads < 4
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x), rtol=1e-5, atol=1e-6)
        z = net.emb(x)
        scripted = torch.jit.script(attn)
        got, got_w = scripted(z, z, z, need_weights=True)
        want, want_w = attn(z, z, z, need_weights=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("structure", ["channels", "eigenbasis"])
def test_prune_reaches_the_layers_of_a_submodule_compiled_before(structure):
    """A model holding ``torch.compile(net)`` whose code was compiled, without hooks, on the
    calibration batches' shape in eval mode: the capture's hooks were never called (every layer
    "never called in the forward pass"). ``prune`` now makes the compiled code call them, puts
    torch's setting back, and the compiled model computes what the eager one does."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = ConvNet()
    batches = conv_batches(2, n=8, size=16)
    warm_up_bn(net, batches)
    wrapper = torch.nn.Sequential(torch.compile(net, backend="eager")).eval()
    wrapper(batches[0][0])  # with autograd, as the capture's pass runs
    with torch.no_grad():
        wrapper(batches[0][0])  # and without, as the checks run
    report = prune(wrapper, batches, ratio=0.5, structure=structure, target="flops")
    assert report.flops_after < report.flops_before
    assert torch._dynamo.config.skip_nnmodule_hook_guards
    with torch.no_grad():
        torch.testing.assert_close(wrapper(batches[0][0]), net.eval()(batches[0][0]), rtol=1e-5, atol=1e-6)
