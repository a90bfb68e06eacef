"""What an outside user found (the one-callback issue, point 5), each reproduced from its
description: non-finite calibration batches, Torch-Pruning's trace failing half-way, the probe's
effect on a seeded loader, ``channels_last`` weights, and the messages for unusable models."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lit_models import LitClassifier, image_data, small_cnn, trainer
from models import TinyResNet, conv_batches, warm_up_bn
from torch import nn
from torch.utils.data import DataLoader

from lightning_eigendamage import (
    EigenDamagePruning,
    PruningWarning,
    prune,
    prune_channels,
    restore_channels,
)


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in model.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()]


@pytest.mark.parametrize("how", ["channels", "eigenbasis", "eigenbasis-reconstruct", "eigenbasis-shots"])
def test_a_nan_pixel_in_one_batch_is_left_out_with_a_warning_never_a_nan_model(how: str) -> None:
    torch.manual_seed(0)
    model, batches = TinyResNet(), conv_batches(3, n=16, size=12, n_classes=5)
    warm_up_bn(model, batches)
    batches[1][0][0, 0, 0, 0] = float("nan")
    with pytest.warns(PruningWarning, match=r"batch\(es\) \[1\] .* non-finite"):
        if how == "channels":
            report = prune_channels(model, batches, ratio=0.4)
        else:
            kw = {"reconstruct": True} if how.endswith("reconstruct") else {}
            kw |= {"shots": 2} if how.endswith("shots") else {}
            report = prune(model, batches, ratio=0.4, **kw)
    assert report.recalibrated_bn
    assert all(bool(torch.isfinite(t).all()) for t in _tensors(model))
    model.eval()
    with torch.no_grad():
        assert bool(torch.isfinite(model(batches[0][0])).all())


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_failed_trace_leaves_no_hooks_and_names_the_cause() -> None:
    model = TinyResNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"the model fails on the example inputs .*conv2d"):
        restore_channels(model, model.state_dict(), torch.randn(2, 5))  # not an image batch
    assert _hooks(model) == 0 and "forward" not in model.__dict__
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    # and the next call sees no foreign hooks: every layer is scored
    report = prune_channels(model, conv_batches(2, n=16, size=12, n_classes=5), ratio=0.3)
    assert report.channels_removed > 0 and not any("hook" in why for why in report.skipped.values())


def test_an_interrupt_during_the_trace_stays_an_interrupt() -> None:
    model = TinyResNet()
    calls = []

    def interrupt(module, inputs, output):
        calls.append(1)
        raise KeyboardInterrupt

    handle = model.l2.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        restore_channels(model, model.state_dict(), torch.randn(1, 3, 12, 12))
    handle.remove()
    assert calls and _hooks(model) == 0


class _Snap(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.params = [p.detach().clone() for p in pl_module.parameters()]


@pytest.mark.parametrize("structure", ["channels", "eigenbasis"])
def test_the_probe_does_not_move_a_seeded_loader(structure: str) -> None:
    """A loader with its own seeded generator: epoch 0 (before any round) is the same with and
    without the callback, bitwise."""

    def run(callbacks: list) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = LitClassifier(small_cnn())
        data = DataLoader(
            image_data(64), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(5)
        )
        snap = _Snap()
        trainer(max_epochs=2, callbacks=[*callbacks, snap]).fit(model, data)
        return snap.params

    plain = run([])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruned = run([EigenDamagePruning({1: 0.5}, structure=structure, verbose=False)])
    assert all(torch.equal(a, b) for a, b in zip(plain, pruned))


def test_channels_keep_channels_last_weights() -> None:
    torch.manual_seed(0)
    model = TinyResNet().to(memory_format=torch.channels_last)
    batches = conv_batches(2, n=16, size=12, n_classes=5)
    report = prune_channels(model, batches, ratio=0.4)
    assert report.channels_removed > 0
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


@pytest.mark.parametrize("fn", [prune, prune_channels])
def test_nan_weights_and_meta_models_say_what_is_wrong(fn) -> None:
    model = TinyResNet()
    with torch.no_grad():
        model.l1.c1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf weights in l1\.c1\.weight.*Reload finite weights"):
        fn(model, conv_batches(2, n=8, size=12, n_classes=5), ratio=0.3)
    meta = TinyResNet().to("meta")
    with pytest.raises(ValueError, match="meta device and hold no data.*to_empty"):
        fn(meta, conv_batches(2, n=8, size=12, n_classes=5), ratio=0.3)


def test_restore_channels_into_a_meta_model_is_refused() -> None:
    src = TinyResNet()
    prune_channels(src, conv_batches(2, n=16, size=12, n_classes=5), ratio=0.3)
    meta = TinyResNet().to("meta")
    with pytest.raises(ValueError, match="meta device, where load_state_dict copies nothing"):
        restore_channels(meta, src.state_dict(), torch.randn(1, 3, 12, 12, device="meta"))
