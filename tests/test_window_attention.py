"""Heads of torchvision's window attentions, Swin V1 and MaxViT
(:mod:`lightning_eigendamage.window_attention`).

Checked against independent computations: :class:`PrunedWindowAttention` with every head equals
torchvision's ``ShiftedWindowAttention`` (padding, cyclic shift and its mask included), and
:class:`PrunedRelativeAttention` MaxViT's ``RelativePositionalMultiHeadAttention``; removing a head
equals zeroing its columns of ``proj`` (``merge``); the routed capture hands ``proj`` the same input
that the pruned form's own module call does and leaves the outputs unchanged (MaxViT's ``merge``
is called as a module: nothing to route); a small Swin and a small MaxViT (whose whole channel
graphs cannot be built) lose heads and reload exactly through the three loaders.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from models import LOADERS, reloaded, tiny_maxvit, tiny_swin
from torch import nn

from lightning_eigendamage import prune_channels
from lightning_eigendamage.attention import (
    find_head_blocks,
    functional_owners,
    reads_weights_itself,
    remove_heads,
    routed_out_projections,
)
from lightning_eigendamage.window_attention import PrunedRelativeAttention, PrunedWindowAttention, as_pruned

torchvision = pytest.importorskip("torchvision")


def _swin() -> nn.Module:
    """Two stages of two blocks (the second of each shifted), window 3 on a 10×10 map (padded to
    12×12), 2 and 4 heads of 8."""
    torch.manual_seed(0)
    return tiny_swin(depths=(2, 2), heads=(2, 4), window=3)


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 40, 40, generator=torch.Generator().manual_seed(1))


def test_the_pruned_form_with_every_head_is_torchvisions_window_attention() -> None:
    net, x = _swin(), _x()
    blocks = find_head_blocks(net)
    assert [(b.kind, b.num_heads, b.head_dim) for b in blocks] == [("window", 2, 8)] * 2 + [
        ("window", 4, 8)
    ] * 2
    assert sum(1 for b in blocks if sum(b.module.shift_size) > 0) == 2  # the shift mask is exercised
    ours = copy.deepcopy(net)
    for b in find_head_blocks(ours):
        as_pruned(b.module, b.head_dim)
    assert all(isinstance(b.module, PrunedWindowAttention) for b in find_head_blocks(ours))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), net(x), rtol=1e-5, atol=1e-6)
    ours.train(), net.train()  # no dropout: the same in train mode
    torch.testing.assert_close(ours(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads", [[0], [1], [0, 2]])
def test_removing_heads_equals_zeroing_their_projection_columns(heads: list[int]) -> None:
    net, x = _swin(), _x()
    removed, zeroed = copy.deepcopy(net), copy.deepcopy(net)
    for br, bz in zip(find_head_blocks(removed), find_head_blocks(zeroed)):
        gone = [h for h in heads if h < br.num_heads - 1] or [0]
        with torch.no_grad():
            bz.reader.weight[:, bz.columns(gone)] = 0.0
        remove_heads(br, gone)
        assert br.module.num_heads == bz.num_heads - len(gone)
        assert br.module.relative_position_bias_table.shape[1] == br.module.num_heads
        assert br.module.qkv.weight.shape[0] == 3 * 8 * br.module.num_heads
    with torch.no_grad():
        torch.testing.assert_close(removed(x), zeroed(x), rtol=1e-5, atol=1e-6)


def _unwindow(z: torch.Tensor, attn: nn.Module, height: int, width: int) -> torch.Tensor:
    """Per-window rows ``(B·nW, N, D)`` put back on the ``(B, H, W, D)`` map (shift undone,
    padding cut), as the window attention does after ``proj``."""
    (wh, ww), d = attn.window_size, z.shape[-1]
    ph, pw = -(-height // wh) * wh, -(-width // ww) * ww
    shift = [0 if wh >= ph else attn.shift_size[0], 0 if ww >= pw else attn.shift_size[1]]
    b = z.shape[0] // ((ph // wh) * (pw // ww))
    z = z.view(b, ph // wh, pw // ww, wh, ww, d).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, d)
    if sum(shift) > 0:
        z = torch.roll(z, shifts=(shift[0], shift[1]), dims=(1, 2))
    return z[:, :height, :width]


def test_the_routed_capture_hands_proj_the_attention_output() -> None:
    net, x = _swin(), _x()
    owners = functional_owners(net)
    assert set(owners) == {b.reader for b in find_head_blocks(net)}
    ref = copy.deepcopy(net)  # the pruned form calls proj as a module, on z per window
    for b in find_head_blocks(ref):
        as_pruned(b.module, b.head_dim)
    assert functional_owners(ref) == {}
    routed, direct, shapes = [], [], []
    hs = [m.register_forward_hook(lambda m, a, o: routed.append(a[0].detach())) for m in owners]
    for b in find_head_blocks(ref):
        hs.append(b.reader.register_forward_hook(lambda m, a, o: direct.append(a[0].detach())))
        hs.append(b.module.register_forward_pre_hook(lambda m, a: shapes.append((m, *a[0].shape[1:3]))))
    with torch.no_grad():
        plain = net(x)
        with routed_out_projections(owners, list(owners)):
            out = net(x)
        ref(x)
    for h in hs:
        h.remove()
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)  # the outputs are the model's
    assert len(routed) == len(direct) == len(shapes) == 4
    assert any(sum(m.shift_size) > 0 for m, _, _ in shapes)
    for r, d, (attn, height, width) in zip(routed, direct, shapes):
        torch.testing.assert_close(r, _unwindow(d, attn, height, width), rtol=1e-5, atol=1e-6)


def _prune_heads(net: nn.Module, x: torch.Tensor, heads: str) -> tuple[Any, list[int]]:
    """``prune_channels`` at ÷1.67 FLOPs on one batch of ``x``: the report and each attention's
    head count after (read from its ``heads`` attribute), fewer in all, at least one each."""
    batches = [(x, torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2)))]
    before = [b.num_heads for b in find_head_blocks(net)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune_channels(net, batches, ratio=0.4, target="flops")
    assert report.target_reached
    after = [getattr(b.module, heads) for b in find_head_blocks(net)]
    assert sum(after) < sum(before) and all(h >= 1 for h in after)
    return report, after


def test_a_small_swin_loses_heads_and_widths_and_reloads(tmp_path) -> None:
    net, x = _swin(), _x(8)
    report, after = _prune_heads(net, x, "num_heads")
    assert any(m.out_features < 64 for n, m in net.named_modules() if n.endswith("mlp.0"))
    # heads went, so their qkv rows went: not listed as left whole
    assert not any(k.endswith(".attn.qkv") for k in report.skipped)
    assert "heads" in report.summary()
    y = net(x)
    assert y.shape == (8, 10) and torch.isfinite(y).all()
    net.train()
    net(x).sum().backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad
    )
    net.eval()
    path = tmp_path / "swin.pt"
    torch.save(net.state_dict(), path)
    for load in LOADERS:
        fresh = reloaded(_swin, net, path, x, load)
        assert [b.module.num_heads for b in find_head_blocks(fresh)] == after, load
        with torch.no_grad():
            assert torch.equal(fresh(x), y), load
    _scripts_as_eager(net, x)


def _scripts_as_eager(net: nn.Module, x: torch.Tensor) -> None:
    """``torch.jit.script`` of the head-pruned model computes what it computes eagerly (a class
    annotation under postponed evaluation and a tensor unpacked into q, k, v failed to script)."""
    assert any(type(m) in (PrunedWindowAttention, PrunedRelativeAttention) for m in net.modules())
    scripted = torch.jit.script(net.eval())
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# MaxViT
# ---------------------------------------------------------------------------------------------


def _maxvit() -> nn.Module:
    """One stage of two MaxViT blocks 32 wide: four attentions (window and grid) of 4 heads of 8
    over groups of 4 tokens, with relative-position bias tables and attention logits of unit
    scale (torchvision draws the tables and ``to_qkv`` at 0.02: a wrong bias column or scale
    would barely show)."""
    torch.manual_seed(0)
    net = tiny_maxvit(channels=32, head_dim=8, layers=2).eval()
    with torch.no_grad():
        for b in find_head_blocks(net):
            b.module.relative_position_bias_table.normal_()
            b.module.to_qkv.weight.normal_(std=0.5)
    return net


def _mx(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_the_pruned_form_with_every_head_is_maxvits_relative_attention() -> None:
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    torch.manual_seed(0)
    attn = RelativePositionalMultiHeadAttention(feat_dim=32, head_dim=8, max_seq_len=9).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 5, 9, 32)  # (B, G, P, D): 5 groups of 3×3 tokens
    ours = copy.deepcopy(attn)
    as_pruned(ours, 8)
    assert type(ours) is PrunedRelativeAttention and (ours.n_heads, ours.head_dim) == (4, 8)
    assert ours.scale_factor == attn.scale_factor == 32**-0.5  # as built, not recomputed
    with torch.no_grad():
        torch.testing.assert_close(ours(x), attn(x), rtol=1e-5, atol=1e-6)
    # to_qkv and merge are called as modules: no routed capture, their hooks fire
    assert not reads_weights_itself(attn) and not reads_weights_itself(ours)
    seen = []
    hook = ours.merge.register_forward_hook(lambda m, a, o: seen.append(a[0].shape))
    with torch.no_grad():
        ours(x)
    hook.remove()
    assert seen == [torch.Size([2, 5, 9, 32])]
    # in a whole model: the window and the grid attentions of each block
    net, x = _maxvit(), _mx()
    blocks = find_head_blocks(net)
    assert [(b.kind, b.num_heads, b.head_dim, b.reader_name.rpartition(".")[2]) for b in blocks] == [
        ("window", 4, 8, "merge")
    ] * 4
    assert [p for b in blocks for p in b.producers] == [b.module.to_qkv for b in blocks]
    assert functional_owners(net) == {}
    ours = copy.deepcopy(net)
    for b in find_head_blocks(ours):
        as_pruned(b.module, b.head_dim)
    assert all(type(b.module) is PrunedRelativeAttention for b in find_head_blocks(ours))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads", [[0], [1], [0, 2], [1, 2, 3]])
def test_removing_maxvit_heads_equals_zeroing_their_merge_columns(heads: list[int]) -> None:
    net, x = _maxvit(), _mx()
    tokens = torch.randn(2, 5, 4, 32, generator=torch.Generator().manual_seed(3))  # 5 groups of 2×2
    removed, zeroed = copy.deepcopy(net), copy.deepcopy(net)
    for br, bz in zip(find_head_blocks(removed), find_head_blocks(zeroed)):
        with torch.no_grad():
            bz.reader.weight[:, bz.columns(heads)] = 0.0
        kept = [h for h in range(4) if h not in heads]
        table = br.module.relative_position_bias_table.detach().clone()
        remove_heads(br, heads)
        m = br.module
        with torch.no_grad():  # each attention alone (outputs of order one), then the model
            torch.testing.assert_close(m(tokens), bz.module(tokens), rtol=1e-5, atol=1e-6)
        assert type(m) is PrunedRelativeAttention and m.n_heads == 4 - len(heads) and m.head_dim == 8
        assert m.to_qkv.weight.shape == (3 * 8 * m.n_heads, 32) and m.to_qkv.out_features == 24 * m.n_heads
        assert m.merge.weight.shape == (32, 8 * m.n_heads) and m.merge.in_features == 8 * m.n_heads
        assert torch.equal(m.relative_position_bias_table, table[:, kept])  # one column per kept head
        assert m.scale_factor == 32**-0.5
    with torch.no_grad():
        torch.testing.assert_close(removed(x), zeroed(x), rtol=1e-5, atol=1e-6)


def test_a_small_maxvit_loses_heads_and_reloads(tmp_path) -> None:
    net, x = _maxvit(), _mx(8)
    report, after = _prune_heads(net, x, "n_heads")
    blocks = find_head_blocks(net)
    for b in blocks:
        m, h = b.module, b.module.n_heads
        assert (b.num_heads, b.head_dim) == (h, 8) and m.scale_factor == 32**-0.5
        assert m.to_qkv.out_features == m.to_qkv.weight.shape[0] == 3 * h * 8
        assert m.merge.in_features == m.merge.weight.shape[1] == h * 8
        assert m.relative_position_bias_table.shape == (9, h)
        if h < 4:  # its heads went, so its to_qkv rows went: not listed as left whole
            assert type(m) is PrunedRelativeAttention
            assert f"{b.name}.to_qkv" not in report.skipped and f"heads of {b.name}" not in report.skipped
    assert "heads" in report.summary()
    y = net(x)
    assert y.shape == (8, 10) and torch.isfinite(y).all()
    trained = copy.deepcopy(net).train()  # a copy: train mode moves the BatchNorm statistics
    trained(x).sum().backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in trained.parameters() if p.requires_grad
    )
    path = tmp_path / "maxvit.pt"
    torch.save(net.state_dict(), path)
    for load in LOADERS:
        fresh = reloaded(_maxvit, net, path, x, load)
        got = find_head_blocks(fresh)
        assert [b.module.n_heads for b in got] == after, load
        assert [type(b.module) for b in got] == [type(b.module) for b in blocks], load
        with torch.no_grad():
            assert torch.equal(fresh(x), y), load
    _scripts_as_eager(net, x)


def test_attention_projections_are_not_reported_as_outside_the_traced_parts() -> None:
    """MaxViT's attention modules cannot be traced, but their heads can go: a pruning that keeps
    every head does not list ``merge`` or ``to_qkv`` as left whole for the parts."""
    net, x = _maxvit(), _mx(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune_channels(net, [(x, torch.randint(0, 10, (8,)))], ratio=0.1, target="flops")
    listed = [k for k, why in report.skipped.items() if why.startswith("in a part whose")]
    assert not any(k.endswith((".merge", ".to_qkv")) for k in listed), listed
