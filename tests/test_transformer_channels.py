"""A stock ``nn.TransformerEncoder`` text classifier through the channel engine: the
feed-forward widths are pruned, the pruned layers still run PyTorch's fused fast path in eval
mode, and every path (fused, module-by-module, train mode) gives the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from models import TextClassifier, TextDecoder, token_batches

from lightning_eigendamage import prune_channels, restore_pruned
from lightning_eigendamage.costs import count_flops, module_path


def _fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = torch._transformer_encoder_layer_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    return calls


@pytest.mark.parametrize("norm_first", [False, True])
def test_feed_forward_widths_are_pruned_and_the_fast_path_still_runs(
    norm_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = TextClassifier(norm_first)
    batches = token_batches()
    x = batches[0][0]
    dense_flops = count_flops(model, x)
    # the heads stay (an encoder layer that loses heads leaves the fused path: test_attention_heads)
    report = prune_channels(model, batches, ratio=0.3, target="flops", exclude=["*.self_attn"])
    assert report.target_reached
    widths = [layer.linear1.out_features for layer in model.enc.layers]
    assert all(w < 64 for w in widths)
    assert [layer.linear2.in_features for layer in model.enc.layers] == widths
    # FLOPs counted module by module (the fused kernel hides its products from the counter):
    # the feed-forward products shrink by exactly 2·2·32·(64 - w) per token and layer
    saved = sum(2 * 2 * 32 * (64 - w) for w in widths) * x.shape[1]
    assert dense_flops - count_flops(model, x) == saved == dense_flops - report.flops_after

    model.eval()
    calls = _fused_calls(monkeypatch)
    with torch.no_grad():
        fused = model(x)
    assert len(calls) == 2  # both pruned layers ran in the fused fast path
    with module_path(), torch.no_grad():
        eager = model(x)
    assert len(calls) == 2
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    model.train()  # dropout 0: train mode computes the same function, through the modules
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager, rtol=1e-5, atol=1e-6)


def test_nothing_removed_keeps_the_function_and_counting_flops_keeps_the_setting() -> None:
    torch.manual_seed(0)
    model = TextClassifier()
    dense = copy.deepcopy(model)
    batches = token_batches()
    report = prune_channels(model, batches, ratio=0.0)
    assert report.channels_removed == 0 and torch.backends.mha.get_fastpath_enabled()
    model.eval(), dense.eval()
    with torch.no_grad():
        assert torch.equal(model(batches[1][0]), dense(batches[1][0]))


def test_pruned_encoder_saves_and_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    model = TextClassifier(dropout=0.1)
    batches = token_batches()
    prune_channels(model, batches, ratio=0.3, target="flops")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = TextClassifier(dropout=0.1)
    restore_pruned(fresh, tmp_path / "m.pt")
    model.eval(), fresh.eval()
    x = batches[2][0]
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert [m.linear1.out_features for m in fresh.enc.layers] == [
        m.linear1.out_features for m in model.enc.layers
    ]


def test_decoder_feed_forward_widths_are_pruned_and_counted() -> None:
    torch.manual_seed(0)
    model = TextDecoder()
    batches = token_batches()
    x = batches[0][0]
    dense_flops = count_flops(model, x)
    # the heads stay here (they are tested in test_attention_heads): only feed-forward widths go
    attention = ["*.self_attn", "*.multihead_attn"]
    report = prune_channels(model, batches, ratio=0.2, target="flops", exclude=attention)
    widths = [layer.linear1.out_features for layer in model.dec.layers]
    assert report.target_reached and all(w < 64 for w in widths)
    assert [layer.linear2.in_features for layer in model.dec.layers] == widths
    saved = sum(2 * 2 * 32 * (64 - w) for w in widths) * x.shape[1]
    assert dense_flops - count_flops(model, x) == saved == dense_flops - report.flops_after
