"""Heads of torchvision's Swin window attention (:mod:`lightning_eigendamage.window_attention`).

Checked against independent computations: :class:`PrunedWindowAttention` with every head equals
torchvision's ``ShiftedWindowAttention`` (padding, cyclic shift and its mask included); removing a
head equals zeroing its columns of ``proj``; the routed capture hands ``proj`` the same input that
the pruned form's own module call does and leaves the outputs unchanged; a small Swin (whose whole
channel graph cannot be built) loses heads and feed-forward widths and reloads exactly through the
three loaders.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from models import LOADERS, reloaded, tiny_swin
from torch import nn

from lightning_eigendamage import prune_channels
from lightning_eigendamage.attention import (
    find_head_blocks,
    functional_owners,
    remove_heads,
    routed_out_projections,
)
from lightning_eigendamage.window_attention import PrunedWindowAttention, as_pruned

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


def test_a_small_swin_loses_heads_and_widths_and_reloads(tmp_path) -> None:
    net, x = _swin(), _x(8)
    batches = [(x, torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2)))]
    before = [b.num_heads for b in find_head_blocks(net)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune_channels(net, batches, ratio=0.4, target="flops")
    assert report.target_reached
    after = [b.module.num_heads for b in find_head_blocks(net)]
    assert sum(after) < sum(before) and all(h >= 1 for h in after)
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
