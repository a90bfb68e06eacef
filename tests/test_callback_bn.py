"""The callback's BatchNorm re-estimation after a round (``recalibrate_bn``), against statistics
computed by hand from the round's example batch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lit_models import LitClassifier, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eigendamage import EigenDamagePruning, KFELayer


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8, generator=g)
    return TensorDataset(x, torch.randint(0, 4, (64,), generator=g))


class _LastBatchBuffers(pl.Callback):
    """The BatchNorm buffers after the last training batch (before the round at epoch end)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        bn = pl_module.net[3]
        self.buffers = {"mean": bn.running_mean.clone(), "var": bn.running_var.clone()}


def _fit(recalibrate_bn: bool | None) -> tuple[LitClassifier, _LastBatchBuffers, TensorDataset]:
    data = _data()
    lit = LitClassifier(_net(), lr=0.01)
    kw = {} if recalibrate_bn is None else {"recalibrate_bn": recalibrate_bn}
    # Prune the middle conv at the end of the only epoch: nothing trains after the round.
    cb = EigenDamagePruning({0: 0.5}, exclude=["net.0"], verbose=False, **kw, structure="eigenbasis")
    last = _LastBatchBuffers()
    with pytest.warns(UserWarning, match="no fine-tuning"):
        trainer(max_epochs=1, callbacks=[last, cb], limit_val_batches=0).fit(
            lit, DataLoader(data, batch_size=16, shuffle=False)
        )
    assert isinstance(lit.net[2], KFELayer)  # the layer feeding the BatchNorm was pruned
    return lit, last, data


@pytest.mark.parametrize("recalibrate_bn", [None, True])  # None: the default
def test_round_reestimates_downstream_batchnorm_on_its_example_batch(recalibrate_bn) -> None:
    lit, last, data = _fit(recalibrate_bn)
    bn = lit.net[3]
    seen: list[torch.Tensor] = []
    h = bn.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
    lit.eval()
    with torch.no_grad():
        lit(data.tensors[0][48:])  # the last batch: the round's example
    h.remove()
    x = seen[0]  # (16, 16, 8, 8): the pruned network's input to the BatchNorm
    mean = x.mean(dim=(0, 2, 3))
    var = x.permute(1, 0, 2, 3).reshape(16, -1).var(dim=1, unbiased=True)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(bn.running_var, last.buffers["var"], rtol=1e-3)
    assert bn.momentum == 0.1 and bn.training is False  # momentum and mode restored


def test_recalibrate_bn_false_leaves_the_statistics_of_the_last_batch() -> None:
    lit, last, _ = _fit(False)
    bn = lit.net[3]
    assert torch.equal(bn.running_mean, last.buffers["mean"])
    assert torch.equal(bn.running_var, last.buffers["var"])


def test_recalibrate_bn_is_validated() -> None:
    with pytest.raises((TypeError, ValueError), match="recalibrate_bn"):
        EigenDamagePruning({0: 0.5}, recalibrate_bn="yes", structure="eigenbasis")
