"""The channel engine captures factors only where its scores read them.

A group's channels are scored at its readers (input-side Kron-OBS): a producer's factors and
those of a reader whose group is left whole anyway (a transformer's LayerNorm-coupled residual
width) are never read. Those layers are hooked only to see them run (at most once per forward
pass), which drops their factors' cost (``fc1``'s ``3072²`` ``G`` in each ViT-B block) from the
capture, also the callback's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import TextClassifier, token_batches
from torch import nn

from lightning_eigendamage import prune_channels
from lightning_eigendamage.channels import engine as channels_engine

pytest.importorskip("torch_pruning")

READERS = {f"enc.layers.{i}.{n}" for i in range(2) for n in ("linear2", "self_attn.out_proj")}


def _spy_factors(monkeypatch) -> list[list[str]]:
    """Record the ``factors_for`` of every capture the channel engine runs."""
    seen: list[list[str]] = []
    real = channels_engine.capture_factors

    def spy(model, layers, batches, *, factors_for, **kw):
        seen.append(sorted(factors_for))
        return real(model, layers, batches, factors_for=factors_for, **kw)

    monkeypatch.setattr(channels_engine, "capture_factors", spy)
    return seen


def test_a_transformer_captures_the_readers_only_and_prunes_as_with_every_factor(monkeypatch) -> None:
    """On a stock text classifier only the feed-forward ``linear2`` (it reads the hidden width)
    and the attention's ``out_proj`` (it reads the heads) get factors; ``linear1`` and the
    classifier read the residual width, which LayerNorm keeps whole. The pruned model is bitwise
    the one pruned with every layer's factors."""
    torch.manual_seed(0)
    base = TextClassifier()
    batches = token_batches()
    seen = _spy_factors(monkeypatch)
    lean = copy.deepcopy(base)
    report = prune_channels(lean, batches, ratio=0.3, target="flops")
    assert seen == [sorted(READERS)]
    assert report.flops_after < report.flops_before

    def every(self, model, layers, exclude, skipped):  # the former capture: every scorable layer
        return list(layers)

    monkeypatch.setattr(channels_engine.ChannelGraph, "factor_layers", every)
    full = copy.deepcopy(base)
    prune_channels(full, batches, ratio=0.3, target="flops")
    assert len(seen) == 2 and set(seen[1]) > READERS
    a, b = lean.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


class Siamese(nn.Module):
    """A stem that runs twice per forward pass (on the image and on its mirror image): it reads
    only the input, so its factors are never read, but it still must not change width."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x) + self.stem(x.flip(3)))
        h = torch.relu(self.mid(torch.relu(self.body(h))))
        return self.fc(h.mean((2, 3)))


def test_a_producer_called_twice_keeps_its_group_whole_and_says_why(monkeypatch) -> None:
    from models import conv_batches

    torch.manual_seed(0)
    model = Siamese()
    seen = _spy_factors(monkeypatch)
    report = prune_channels(model, conv_batches(2, n=8, size=8), ratio=0.3)
    assert "stem" not in seen[0] and {"body", "mid", "fc"} <= set(seen[0])
    assert model.stem.out_channels == 8 and model.body.in_channels == 8
    assert "called 2 times per forward pass" in report.skipped["stem"]
    assert any("stem" in why and "called 2 times" in why for why in report.skipped.values() if why)
    assert model.mid.out_channels < 12  # the other groups are pruned


def test_the_callback_captures_the_engine_s_factor_layers() -> None:
    from lit_models import LitClassifier, loader, trainer
    from torch.utils.data import TensorDataset

    from lightning_eigendamage import EigenDamagePruning

    torch.manual_seed(0)
    model = LitClassifier(TextClassifier())
    data = TensorDataset(torch.randint(0, 50, (32, 12)), torch.randint(0, 5, (32,)))
    seen: list[set[str]] = []

    class Spy(EigenDamagePruning):
        def _open_capture(self, pl_module):
            cap = super()._open_capture(pl_module)
            seen.append(set(cap.factors_for))
            return cap

    cb = Spy({0: 0.3}, structure="channels", verbose=False)
    trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(data, batch_size=8))
    assert seen and seen[0] == {f"net.{n}" for n in READERS}
    assert model.net.enc.layers[0].linear1.out_features < 64  # a feed-forward width was pruned
