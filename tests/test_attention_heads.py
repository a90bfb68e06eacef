"""Attention heads in the channel engine: whole heads removed from ``nn.MultiheadAttention``,
timm-style ``qkv``/``proj`` and ``q_proj``/``k_proj``/``v_proj``/``out_proj`` attention.

Checked against independent computations: a head-pruned attention equals the dense one with the
head's output-projection columns zeroed; :class:`PrunedHeadsAttention` with every head equals
``nn.MultiheadAttention`` (masks, weights, layouts); the routed capture of ``out_proj`` sees the
attention output ``z`` computed by hand and leaves the outputs unchanged; a head's score is the
brute-force joint Kron-OBS damage of its columns; the compensation is the least-squares refit of
the output projection on ``z``; pruned models save, reload and run in train and eval mode.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from models import LOADERS, TextClassifier, TextDecoder, least_squares_refit, reloaded, token_batches
from torch import nn

from lightning_eigendamage import prune_channels, restore_pruned
from lightning_eigendamage.attention import (
    PrunedHeadsAttention,
    find_head_blocks,
    functional_owners,
    head_block,
    remove_heads,
    routed_out_projections,
)
from lightning_eigendamage.channels import engine as channels_mod
from lightning_eigendamage.costs import count_flops, module_path
from lightning_eigendamage.curvature import capture_factors

DAMPING = 1e-3


class QKVAttention(nn.Module):
    """timm-style: one ``qkv`` Linear laid out ``(3, H, d)``, ``proj``."""

    def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        z = F.scaled_dot_product_attention(q, k, v)
        return self.proj(z.transpose(1, 2).reshape(b, n, -1))


class SplitAttention(nn.Module):
    """``q_proj``/``k_proj``/``v_proj``/``out_proj``, as many text models name them."""

    def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.scaled_dot_product_attention(
            self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        )
        return self.out_proj(z.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class FixedWidthAttention(SplitAttention):
    """Reshapes its output to the input's width: it cannot run with a head fewer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.scaled_dot_product_attention(
            self.heads(self.q_proj(x)), self.heads(self.k_proj(x)), self.heads(self.v_proj(x))
        )
        return self.out_proj(z.transpose(1, 2).reshape(x.shape))


class TimmAttention(QKVAttention):
    """timm's current ``Attention``: it reshapes the heads' outputs to ``attn_dim`` (``H·d``, an
    attribute beside ``num_heads``), so ``attn_dim`` must follow the head count."""

    def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__(dim, num_heads)
        self.attn_dim = num_heads * self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        z = F.scaled_dot_product_attention(q, k, v)
        return self.proj(z.transpose(1, 2).reshape(b, n, self.attn_dim))


class LlamaStyleAttention(nn.Module):
    """``q_proj``/``k_proj``/``v_proj``/``o_proj`` with ``num_key_value_heads`` (equal to
    ``num_heads``: no grouped queries) used for the keys and values, as HuggingFace's Llama-style
    code writes it."""

    def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = num_heads, num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(z.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class MHAWrapper(nn.Module):
    def __init__(self, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class Net(nn.Module):
    """Linear embedding, an attention block with a residual, mean-pool, Linear."""

    def __init__(self, attn: nn.Module, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.attn = attn
        self.fc = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h)
        return self.fc(h.mean(1))


def _batches(n: int = 3, size: int = 16) -> list:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(size, 7, 6, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)
    ]


ATTENTIONS = {"mha": MHAWrapper, "qkv": QKVAttention, "split": SplitAttention}


def _reader(net: Net) -> nn.Linear:
    a = net.attn
    return (
        a.attn.out_proj
        if isinstance(a, MHAWrapper)
        else a.proj
        if isinstance(a, QKVAttention)
        else a.out_proj
    )


@pytest.mark.parametrize("kind", list(ATTENTIONS))
def test_removing_a_head_equals_zeroing_its_output_columns(kind: str) -> None:
    torch.manual_seed(0)
    dense = Net(ATTENTIONS[kind]()).eval()
    x = _batches()[0][0]
    for h in range(4):
        net = copy.deepcopy(dense)
        (block,) = find_head_blocks(net)
        assert block.kind == kind and (block.num_heads, block.head_dim) == (4, 4)
        changed = remove_heads(block, [h])
        want = copy.deepcopy(dense)
        with torch.no_grad():
            _reader(want).weight[:, 4 * h : 4 * h + 4] = 0
            torch.testing.assert_close(net(x), want(x), rtol=1e-5, atol=1e-6)
        (after,) = find_head_blocks(net)
        assert after.num_heads == 3 and _reader(net).in_features == 12
        for _, old, new, index in changed:  # new is old at the recorded flat positions
            assert torch.equal(new.detach().reshape(-1), old.detach().reshape(-1)[index])
        if kind == "mha":
            assert isinstance(net.attn.attn, PrunedHeadsAttention) and net.attn.attn.embed_dim == 16
            assert net.attn.attn.in_proj_weight.shape == (36, 16)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("extra", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}])
def test_pruned_heads_attention_with_every_head_is_multihead_attention(
    batch_first: bool, extra: dict
) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, **extra).double()
    mine = copy.deepcopy(mha)
    mine.__class__ = PrunedHeadsAttention
    q, kv = torch.randn(3, 5, 16, dtype=torch.double), torch.randn(3, 7, 16, dtype=torch.double)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -2:] = True
    masks = [
        {},
        {"key_padding_mask": pad},
        {"attn_mask": torch.randn(5, 7, dtype=torch.double)},
        {"attn_mask": torch.rand(5, 7) > 0.7},
        {"attn_mask": torch.randn(12, 5, 7, dtype=torch.double), "key_padding_mask": pad.double() * -1e4},
    ]
    for kw in masks:
        for need in (True, False):
            for avg in (True, False):
                out, w = mha(q, kv, kv, need_weights=need, average_attn_weights=avg, **kw)
                out2, w2 = mine(q, kv, kv, need_weights=need, average_attn_weights=avg, **kw)
                torch.testing.assert_close(out2, out, rtol=1e-10, atol=1e-12)
                assert (w is None) == (w2 is None)
                if w is not None:
                    torch.testing.assert_close(w2, w, rtol=1e-10, atol=1e-12)
    x = torch.randn(5, 16, dtype=torch.double)  # unbatched
    torch.testing.assert_close(mine(x, x, x)[0], mha(x, x, x)[0], rtol=1e-10, atol=1e-12)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.double)
    qq = q if batch_first else q  # self-attention with the causal hint and no mask
    torch.testing.assert_close(
        mine(qq, qq, qq, is_causal=True, need_weights=False)[0],
        mha(qq, qq, qq, attn_mask=causal, is_causal=True, need_weights=False)[0],
        rtol=1e-10,
        atol=1e-12,
    )


def _attention_output(net: Net, x: torch.Tensor) -> torch.Tensor:
    """``z`` (the input of ``out_proj``) of ``net``'s self-attention on ``net.embed(x)``, by
    hand: ``(N·T, E)``."""
    mha = net.attn.attn
    x = net.embed(x)
    n, t, e = x.shape
    h, d = mha.num_heads, e // mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = (qkv[..., i * e : (i + 1) * e].reshape(n, t, h, d).transpose(1, 2) for i in range(3))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (att @ v).transpose(1, 2).reshape(n * t, e)


def test_the_routed_capture_sees_the_attention_output_and_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    net = Net(MHAWrapper()).double()
    batches = [(x.double(), y) for x, y in _batches()]
    x = batches[0][0]
    out_proj = net.attn.attn.out_proj
    with torch.no_grad():
        plain = net(x)
        with routed_out_projections(functional_owners(net), [out_proj]):
            assert torch.equal(net(x), plain)
    assert net.attn.attn.out_proj is out_proj and not net.attn.attn._forward_pre_hooks
    cap = capture_factors(
        net,
        {"attn.attn.out_proj": out_proj},
        batches,
        factors_for=["attn.attn.out_proj"],
        a_form="patch",
        fisher="empirical",
    )
    lf = cap.layers["attn.attn.out_proj"]
    with torch.no_grad():
        z = torch.cat([_attention_output(net, b[0]) for b in batches])
    torch.testing.assert_close(lf.a(), z.T @ z / z.shape[0], rtol=1e-8, atol=1e-10)
    assert lf.g().abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(net(x), plain)  # the hooks are gone and out_proj is the real one


def test_head_scores_are_the_brute_force_joint_damage_and_the_projection_is_refitted() -> None:
    torch.manual_seed(0)
    net = Net(MHAWrapper(8, 2), dim=8)
    dense = copy.deepcopy(net)
    batches = _batches()
    name = "attn.attn.out_proj"
    out_proj = net.attn.attn.out_proj
    layers = {name: out_proj}
    captured = capture_factors(
        net, layers, batches, factors_for=[name], a_form="patch", generator=torch.Generator().manual_seed(0)
    )
    _, updates = channels_mod.scores_from_factors(layers, captured, DAMPING, {})
    block = head_block("attn.attn", net.attn.attn)
    group = channels_mod._head_group(block, 1, updates[out_proj], None, root=False)
    lf = captured.layers[name]
    a, g, t = lf.a().double(), lf.g().double(), float(lf.locations)
    a = a + DAMPING * torch.trace(a) / 8 * torch.eye(8, dtype=torch.float64)
    w = out_proj.weight.detach().double()
    f = t * torch.kron(g, a)  # vec row-major: index o·8 + col ↔ G ⊗ A
    brute = []
    for h in range(2):
        fixed = torch.tensor([o * 8 + c for o in range(8) for c in range(4 * h, 4 * h + 4)])
        free = torch.tensor([i for i in range(64) if i not in set(fixed.tolist())])
        d_fixed = -w[:, 4 * h : 4 * h + 4].reshape(-1)
        d_free = -torch.linalg.solve(f[free][:, free], f[free][:, fixed] @ d_fixed)
        d = torch.zeros(64, dtype=torch.float64)
        d[fixed], d[free] = d_fixed, d_free
        brute.append(0.5 * d @ f @ d)
    scores = torch.stack([group.scores[u].sum() for u in group.units])
    torch.testing.assert_close(scores, torch.stack(brute), rtol=1e-6, atol=1e-12)
    # the engine removes the cheaper head and refits out_proj on the attention output by least squares
    report = prune_channels(
        net,
        batches,
        ratio=0.4,
        exclude=["embed", "fc"],
        recalibrate_bn=False,
        damping=DAMPING,
        greedy_steps=None,
    )
    (entry,) = [e for e in report.groups if e.get("head_dim")]
    gone = int(torch.stack(brute).argmin())
    assert entry["removed"] == list(range(4 * gone, 4 * gone + 4))
    with torch.no_grad():
        z = torch.cat([_attention_output(dense.double(), b[0].double()) for b in batches])
    want = least_squares_refit(
        dense.attn.attn.out_proj.weight.detach().double(), z, entry["removed"], 1, DAMPING
    )
    kept = [c for c in range(8) if c not in entry["removed"]]
    torch.testing.assert_close(net.attn.attn.out_proj.weight.double(), want[:, kept], rtol=1e-4, atol=1e-6)
    assert net.attn.attn.num_heads == 1 and report.flops_after == count_flops(net, batches[0][0])


def test_encoder_layers_lose_heads_run_in_both_modes_and_reload(tmp_path) -> None:
    torch.manual_seed(0)
    model = TextClassifier()
    batches = token_batches()
    x = batches[0][0]
    # only heads can go: the feed-forward widths are excluded
    report = prune_channels(model, batches, ratio=0.25, target="flops", exclude=["*.linear1", "*.linear2"])
    assert report.target_reached and report.flops_after == count_flops(model, x) == report.flops_planned
    heads = [layer.self_attn.num_heads for layer in model.enc.layers]
    assert min(heads) < 4 and all(h >= 1 for h in heads)
    assert f"enc.layers.0.self_attn 4→{heads[0]}, enc.layers.1.self_attn 4→{heads[1]}" in report.summary()
    for layer in model.enc.layers:
        attn = layer.self_attn
        assert attn.in_proj_weight.shape == (3 * 8 * attn.num_heads, 32)
        assert attn.out_proj.weight.shape == (32, 8 * attn.num_heads)
    model.eval()
    with torch.no_grad():
        fast = model(x)  # eval mode: torch's fused path where heads are whole, ours elsewhere
    with module_path(), torch.no_grad():
        eager = model(x)
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-6)
    model.train()
    out = model(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    model.eval()
    path = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), path)
    for load in LOADERS:
        fresh = reloaded(TextClassifier, model, path, x, load)
        assert [layer.self_attn.num_heads for layer in fresh.enc.layers] == heads
        with torch.no_grad():
            assert torch.equal(fresh(x), eager), load


def test_timm_and_split_attention_lose_heads_and_reload(tmp_path) -> None:
    for cls in (QKVAttention, SplitAttention):
        torch.manual_seed(0)
        net = Net(cls())
        batches = _batches()
        x = batches[0][0]
        report = prune_channels(net, batches, ratio=0.3, exclude=["embed", "fc"])
        (entry,) = [e for e in report.groups if e.get("head_dim")]
        assert entry["removed"] and net.attn.num_heads == 4 - len(entry["removed"]) // 4
        net.eval()
        path = tmp_path / f"{cls.__name__}.pt"
        torch.save(net.state_dict(), path)
        fresh = Net(cls())
        restore_pruned(fresh, path)
        fresh.eval()
        assert fresh.attn.num_heads == net.attn.num_heads
        with torch.no_grad():
            assert torch.equal(fresh(x), net(x))


def test_attention_that_cannot_run_with_fewer_heads_is_left_whole_with_the_reason() -> None:
    torch.manual_seed(0)
    net = Net(FixedWidthAttention())
    dense = copy.deepcopy(net)
    report = prune_channels(net, _batches(), ratio=0.2, exclude=["embed"])
    (why,) = [v for k, v in report.skipped.items() if k == "heads of attn"]
    assert "forward fails with a head fewer" in why
    assert net.attn.num_heads == 4 and net.attn.out_proj.in_features == 16
    assert net.attn.q_proj.weight.shape == dense.attn.q_proj.weight.shape


def test_torchvision_vit_loses_heads_and_mlp_widths() -> None:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(2)
    ]
    x = batches[0][0]
    report = prune_channels(vit, batches, ratio=0.4, target="flops")
    assert report.target_reached and report.flops_after == count_flops(vit, x)
    heads = [blk.self_attention.num_heads for blk in vit.encoder.layers]
    mlp = [blk.mlp[0].out_features for blk in vit.encoder.layers]
    assert min(heads) < 4 or min(mlp) < 64
    assert not any(k.startswith("heads of") for k in report.skipped)
    vit.eval()
    with torch.no_grad():
        assert bool(torch.isfinite(vit(x)).all())


def test_the_callback_removes_heads_carries_the_optimizer_state_and_reloads(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lit_models import LitClassifier, loader, trainer
    from torch.utils.data import TensorDataset

    from lightning_eigendamage import EigenDamagePruning

    torch.manual_seed(0)
    model = LitClassifier(Net(MHAWrapper()), lr=0.01, opt="adam")
    cb = EigenDamagePruning(
        {0: 0.3, 1: 0.3}, structure="channels", verbose=False, exclude=["net.embed", "net.fc"]
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 7, 6, generator=g), torch.randint(0, 5, (64,), generator=g))
    t = trainer(max_epochs=2, callbacks=[cb, ckpt], enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(model, loader(data))
    attn = model.net.attn.attn
    assert isinstance(attn, PrunedHeadsAttention) and attn.num_heads < 4
    assert attn.out_proj.in_features == 4 * attn.num_heads
    assert {id(p) for grp in t.optimizers[0].param_groups for p in grp["params"]} == {
        id(p) for p in model.parameters()
    }
    for p, state in t.optimizers[0].state.items():
        assert state["exp_avg"].shape == p.shape
    fresh = LitClassifier(Net(MHAWrapper()), opt="adam")
    restore_pruned(fresh, tmp_path / "last.ckpt")
    x = data.tensors[0][:4]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def test_decoder_self_and_cross_attention_lose_heads_and_reload(tmp_path) -> None:
    torch.manual_seed(0)
    model = TextDecoder(memory=6)  # cross-attention over 6 memory tokens
    batches = token_batches()
    x = batches[0][0]
    dense = copy.deepcopy(model).eval()
    report = prune_channels(model, batches, ratio=0.3, target="flops", exclude=["*.linear1", "*.linear2"])
    assert report.target_reached and report.flops_after == count_flops(model, x) == report.flops_planned
    attns = [a for layer in model.dec.layers for a in (layer.self_attn, layer.multihead_attn)]
    assert sum(4 - a.num_heads for a in attns) * 8 == sum(len(e["removed"]) for e in report.groups)
    assert any(isinstance(layer.multihead_attn, PrunedHeadsAttention) for layer in model.dec.layers)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == dense(x).shape and bool(torch.isfinite(out).all())
    torch.save(model.state_dict(), tmp_path / "dec.pt")
    fresh = TextDecoder(memory=6)
    restore_pruned(fresh, tmp_path / "dec.pt")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_prune_in_the_eigenbasis_points_to_channels_when_nothing_is_prunable() -> None:
    from lightning_eigendamage import prune

    model = TextClassifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no prunable layer.*structure='channels'"):
        prune(model, token_batches(), ratio=0.3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    report = prune(model, token_batches(), ratio=0.3, structure="channels", target="flops")
    assert report.target_reached


def test_a_head_pruned_encoder_exports_with_torch_export_and_onnx(tmp_path) -> None:
    torch.manual_seed(0)
    model = TextClassifier()
    batches = token_batches()
    prune_channels(model, batches, ratio=0.25, target="flops", exclude=["*.linear1", "*.linear2"])
    assert any(isinstance(layer.self_attn, PrunedHeadsAttention) for layer in model.enc.layers)
    model.eval()
    x = batches[0][0]
    with torch.no_grad():
        want = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-6)
    onnx = pytest.importorskip("onnx", reason="ONNX export is optional")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "heads.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), want, rtol=1e-4, atol=1e-5)


def test_a_failed_call_leaves_the_attention_as_it_was(monkeypatch) -> None:
    torch.manual_seed(0)
    model = TextClassifier()
    batches = token_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]

    def fail(*args, **kwargs):
        raise RuntimeError("boom after the cut")

    monkeypatch.setattr(channels_mod, "_check_pruned", fail)
    with pytest.raises(RuntimeError, match="boom"):
        prune_channels(model, batches, ratio=0.25, target="flops", exclude=["*.linear1", "*.linear2"])
    for layer in model.enc.layers:
        attn = layer.self_attn
        assert type(attn) is nn.MultiheadAttention and attn.num_heads == 4 and attn._qkv_same_embed_dim
        assert attn.out_proj.in_features == 32
    assert [id(p) for p in model.parameters()] == params
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("pruned_layers", [(0, 1), (1,)])
def test_head_pruned_encoder_runs_on_the_nested_tensors_of_a_padding_mask(pruned_layers: tuple) -> None:
    """In eval mode with a ``src_key_padding_mask``, ``nn.TransformerEncoder`` packs its input into
    a nested tensor and drops the mask (its choice is made at construction): a head-pruned layer
    gets the nested tensor. Its rows must equal the padded computation with the mask (nested
    tensors off) at every position that is not padding."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2).eval()
    for i in pruned_layers:
        block = head_block("", enc.layers[i].self_attn)
        assert block is not None
        remove_heads(block, [1, 2])
    x = torch.randn(3, 7, 16)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 6:] = True
    with torch.no_grad():
        nested = enc(x, src_key_padding_mask=pad)
        enc.use_nested_tensor = False
        padded = enc(x, src_key_padding_mask=pad)
    keep = ~pad
    torch.testing.assert_close(nested[keep], padded[keep], rtol=1e-5, atol=1e-6)
    assert torch.all(nested[pad] == 0)  # the encoder pads its packed output with zeros


@pytest.mark.parametrize("cls", [TimmAttention, LlamaStyleAttention])
def test_attention_that_reads_attributes_beside_its_head_count_loses_heads_and_reloads(cls, tmp_path) -> None:
    """timm's ``attn_dim`` and a Llama-style ``num_key_value_heads`` (and the ``o_proj`` name):
    their forwards fail with a head fewer unless those attributes follow ``num_heads``, so every
    head was left whole. Removing a head must equal zeroing its output-projection columns, and a
    fresh model must load the pruned weights with the same attributes."""
    torch.manual_seed(0)
    dense = Net(cls()).eval()
    x = _batches()[0][0]
    net = copy.deepcopy(dense)
    (block,) = find_head_blocks(net)
    assert (block.num_heads, block.head_dim) == (4, 4)
    remove_heads(block, [2])
    want = copy.deepcopy(dense)
    with torch.no_grad():
        reader = want.attn.proj if cls is TimmAttention else want.attn.o_proj
        reader.weight[:, 8:12] = 0
        torch.testing.assert_close(net(x), want(x), rtol=1e-5, atol=1e-6)
    tied = "attn_dim" if cls is TimmAttention else "num_key_value_heads"
    assert net.attn.num_heads == 3 and getattr(net.attn, tied) == (12 if cls is TimmAttention else 3)

    torch.manual_seed(0)
    net = Net(cls())
    batches = _batches()
    report = prune_channels(net, batches, ratio=0.3, exclude=["embed", "fc"])
    (entry,) = [e for e in report.groups if e.get("head_dim")]
    assert entry["removed"] and net.attn.num_heads == 4 - len(entry["removed"]) // 4
    net.eval()
    path = tmp_path / "pruned.pt"
    torch.save(net.state_dict(), path)
    for load in LOADERS:
        fresh = reloaded(lambda: Net(cls()), net, path, x, load)
        assert getattr(fresh.attn, tied) == getattr(net.attn, tied), load
        with torch.no_grad():
            assert torch.equal(fresh(x), net(x)), load
