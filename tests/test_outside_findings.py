"""What an outside user found (the one-callback issue, point 5), each reproduced from its
description: non-finite calibration batches, Torch-Pruning's trace failing half-way, the probe's
effect on a seeded loader, ``channels_last`` weights, and the messages for unusable models; and
what trying the library on models its tests did not cover found: a Linear feeding an
``nn.GRU``, a parameter expanded to the batch, the FLOPs of fused recurrent kernels, NaN
calibration batches under channels."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lit_models import LitClassifier, image_data, loader, small_cnn, trainer
from models import TinyResNet, conv_batches, warm_up_bn
from torch import nn
from torch.utils.data import DataLoader

from lightning_eigendamage import (
    EigenDamagePruning,
    PruneOptions,
    PruningSchedule,
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


# -- found by trying the library on models its tests did not cover ----------------------------


class _ConvGru(nn.Module):
    """Conv features, then a Linear feeding an ``nn.GRU`` (Torch-Pruning's index mapping raises
    IndexError on the Linear's group), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        )
        self.inp = nn.Linear(16, 24)
        self.rnn = nn.GRU(24, 32, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.features(x).flatten(2).transpose(1, 2)  # (N, H·W, 16)
        out, _ = self.rnn(torch.relu(self.inp(seq)))
        return self.fc(out[:, -1])


def _images(size: int, classes: int, seed: int = 0, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of 8 random ``3 × size × size`` images with random labels below ``classes``."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, size, size, generator=g), torch.randint(0, classes, (8,), generator=g))
        for _ in range(n)
    ]


def _seq_batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return _images(6, 5, n=n)


def test_a_layer_feeding_a_gru_is_left_whole_and_the_rest_loses_channels():
    torch.manual_seed(0)
    net = _ConvGru().eval()
    batches = _seq_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune(net, batches, ratio=0.3, target="flops", structure="channels")
    assert net.features[0].out_channels < 16  # inside a part Torch-Pruning can trace
    assert (net.inp.out_features, net.rnn.input_size) == (24, 24)
    assert report.left_whole["inp"].endswith(
        "could not build the channel group of inp (IndexError: list index out of range)"
    )
    assert net(batches[0][0]).shape == (8, 5)


def test_a_model_with_only_a_layer_feeding_a_gru_says_why_and_auto_takes_the_eigenbasis():
    class LinearGru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.rnn, self.fc = (
                nn.Linear(10, 24),
                nn.GRU(24, 32, batch_first=True),
                nn.Linear(32, 5),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.rnn(torch.relu(self.inp(x)))[0].mean(1))

    torch.manual_seed(0)
    net = LinearGru()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [(torch.randn(8, 12, 10), torch.randint(0, 5, (8,))) for _ in range(2)]
    with pytest.raises(RuntimeError, match=r"could not build the channel group of inp \(IndexError"):
        prune(net, batches, ratio=0.4, target="flops", structure="channels")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    with pytest.warns(PruningWarning, match="prunes the eigenbasis"):
        report = prune(net, batches, ratio=0.4, target="flops", structure="auto")
    assert report.structure == "eigenbasis"


class _LearnedMemory(nn.Module):
    """A learned memory expanded to the batch and fed to a decoder (DETR-style queries)."""

    def __init__(self, expand: bool) -> None:
        super().__init__()
        self.expand = expand
        self.emb = nn.Embedding(50, 32)
        layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoder(layer, 1)
        self.mem = nn.Parameter(torch.randn(1, 6, 32))
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        mem = self.mem.expand(n, -1, -1) if self.expand else self.mem.repeat(n, 1, 1)
        return self.fc(self.dec(self.emb(x), mem).mean(1))


@pytest.mark.parametrize("structure", ["channels", "eigenbasis"])
def test_a_parameter_expanded_to_the_batch_is_counted_and_pruned(structure):
    from lightning_eigendamage.costs import count_flops

    torch.manual_seed(0)
    net = _LearnedMemory(expand=True)
    x = torch.randint(0, 50, (8, 12))
    other = _LearnedMemory(expand=False)
    other.load_state_dict(net.state_dict())
    assert count_flops(net, x) == count_flops(other, x) > 0  # was: AssertionError from the counter
    batches = [(x, torch.randint(0, 5, (8,))) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune(net, batches, ratio=0.3, target="flops", structure=structure)
    assert report.flops_after < report.flops_before and net(x).shape == (8, 5)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_recurrent_flops_count_every_gate_product(kind):
    from lightning_eigendamage.costs import count_flops

    gates, t, i, h = (4 if kind == "LSTM" else 3), 12, 16, 32
    rnn = getattr(nn, kind)(i, h, num_layers=2, bidirectional=True, batch_first=True)
    # per direction and time step: the gates' products with the input and the hidden state
    expected = 2 * t * 2 * gates * h * (i + h) + 2 * t * 2 * gates * h * (2 * h + h)
    assert count_flops(rnn, torch.randn(3, t, i)) == expected  # an LSTM on CPU was counted as 0
    if kind == "LSTM":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # oneDNN has no projections: the default path
            proj = nn.LSTM(i, h, proj_size=8, batch_first=True)
            assert count_flops(proj, torch.randn(3, t, i)) == 2 * t * (gates * h * (i + 8) + 8 * h)


def test_non_finite_calibration_outputs_are_named_by_the_channel_engine():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [(torch.full((8, 3, 8, 8), float("nan")), torch.randint(0, 5, (8,)))]
    with pytest.raises(RuntimeError, match="output on the first calibration batch is not finite"):
        prune(net, batches, ratio=0.4, target="flops", structure="channels")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def _reloads_exactly(net: nn.Module, build: Any, x: torch.Tensor) -> None:
    """A freshly built model takes ``net``'s state_dict, through ``restore_pruned`` and through
    ``enable_pruned_loading`` + ``load_state_dict``, and computes ``net``'s outputs bit for bit."""
    from lightning_eigendamage import enable_pruned_loading, restore_pruned

    want = net.eval()(x)
    fresh = restore_pruned(build(), net.state_dict()).eval()
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    hooked = build()
    enable_pruned_loading(hooked)
    hooked.load_state_dict(net.state_dict())
    torch.testing.assert_close(hooked.eval()(x), want, rtol=0, atol=0)


def test_a_channel_pruned_torchvision_vit_reloads_into_a_fresh_one():
    """torchvision's ``MLPBlock`` loads by rules of its own (``_load_from_state_dict``): its
    Linear children were not narrowed, and the load failed with a size mismatch."""
    from torchvision.models.vision_transformer import VisionTransformer

    def build() -> nn.Module:
        return VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=256, num_classes=10
        )

    torch.manual_seed(0)
    net = build()
    batches = _images(32, 10, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(net, batches, ratio=0.4, target="flops", structure="channels")
    assert net.encoder.layers[0].mlp[0].out_features < 256
    _reloads_exactly(net, build, batches[0][0])


def test_an_index_mapping_that_outgrows_the_model_stops_the_group_build():
    """torchvision's Swin V2 took all memory building one channel's group (its mapped index lists
    grow around the graph's cycles); the build now stops once a mapping outgrows every dimension.
    Here a flatten maps one channel of ``a`` to 16 features of ``fc``: a bound of 15 stops it, 16
    lets it through, and Torch-Pruning's mapping classes are put back either way."""
    from torch_pruning.dependency import index_mapping

    from lightning_eigendamage.channels import engine as channels_mod
    from lightning_eigendamage.channels.parts import UntraceableError

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.a(x)).flatten(1))

    net = Flat().eval()
    dg = channels_mod.dependency_graph(net, torch.randn(2, 3, 4, 4))
    pruner = dg.get_pruner_of_module(net.a)
    before = dict(vars(index_mapping._FlattenIndexMapping))["__call__"]
    with pytest.raises(UntraceableError, match="maps one channel of a to 16 indices"):
        with channels_mod._bounded_index_mappings(15, "a"):
            dg.get_pruning_group(net.a, pruner.prune_out_channels, [0])
    assert vars(index_mapping._FlattenIndexMapping)["__call__"] is before
    with channels_mod._bounded_index_mappings(16, "a"):
        group = dg.get_pruning_group(net.a, pruner.prune_out_channels, [0])
    assert vars(index_mapping._FlattenIndexMapping)["__call__"] is before
    assert any(it.dep.target.module is net.fc and len(it.idxs) == 16 for it in group)


class _TwoHeads(nn.Module):
    """A classifier and a regressor on one trunk: ``forward`` returns both."""

    def __init__(self, only_logits: bool = False) -> None:
        super().__init__()
        self.only_logits = only_logits
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc, self.cls, self.reg = nn.Linear(8, 16), nn.Linear(16, 10), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> Any:
        h = torch.relu(self.fc(self.trunk(x)))
        return self.cls(h) if self.only_logits else (self.cls(h), self.reg(h))


def test_the_empirical_fisher_takes_a_loss_of_several_outputs():
    """With ``fisher="empirical"`` the user's ``loss_fn`` may take a tuple output (it was refused:
    "curvature capture needs a tensor of logits"); its factors are those of the same loss written
    on the logits alone, and the model is pruned through ``prune``."""
    import torch.nn.functional as F

    from lightning_eigendamage.curvature import capture_factors

    torch.manual_seed(0)
    both, logits = _TwoHeads(), _TwoHeads(only_logits=True)
    logits.load_state_dict(both.state_dict())
    g = torch.Generator().manual_seed(3)
    batches = [
        (
            torch.randn(8, 3, 6, 6, generator=g),
            (torch.randint(0, 10, (8,), generator=g), torch.randn(8, 4, generator=g)),
        )
        for _ in range(2)
    ]
    names = ["trunk.0", "fc", "cls"]

    def factors(net: nn.Module, loss_fn: Any) -> dict[str, Any]:
        layers = {n: net.get_submodule(n) for n in names}
        cap = capture_factors(net, layers, batches, factors_for=names, fisher="empirical", loss_fn=loss_fn)
        return {n: (cap.layers[n].a(), cap.layers[n].g()) for n in names}

    got = factors(both, lambda o, t: F.cross_entropy(o[0], t[0]) + 0.0 * F.mse_loss(o[1], t[1]))
    want = factors(logits, lambda o, t: F.cross_entropy(o, t[0]))
    for n in names:
        torch.testing.assert_close(got[n][0], want[n][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(got[n][1], want[n][1], rtol=1e-6, atol=1e-12)
    with pytest.raises(TypeError, match="or fisher='empirical' with a loss_fn"):
        factors(both, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune(
            both,
            batches,
            ratio=0.3,
            target="flops",
            structure="channels",
            fisher="empirical",
            loss_fn=lambda o, t: F.cross_entropy(o[0], t[0]) + F.mse_loss(o[1], t[1]),
        )
    out = both(batches[0][0])
    assert report.flops_after < report.flops_before and [o.shape for o in out] == [(8, 10), (8, 4)]


def test_per_pixel_logits_with_the_default_class_dim_are_warned_about():
    """An FCN's ``(N, C, H, W)`` logits under the default ``class_dim=-1`` had their width
    sampled as the classes, silently; ``class_dim=1`` is quiet and gives other factors."""
    from lightning_eigendamage.curvature import capture_factors

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    batches = [(torch.randn(4, 3, 6, 6), None)]
    layers = {"0": net[0], "2": net[2]}

    def factors(class_dim: int) -> torch.Tensor:
        cap = capture_factors(net, layers, batches, factors_for=list(layers), class_dim=class_dim)
        return cap.layers["2"].g()

    with pytest.warns(PruningWarning, match=r"class_dim=-1 takes its last dimension \(6\) as the classes"):
        wrong = factors(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)
        right = factors(1)
    assert wrong.shape == right.shape == (5, 5) and not torch.allclose(wrong, right)


@pytest.mark.parametrize("structure", ["channels", "auto"])
def test_a_keyboard_interrupt_from_a_forward_hook_during_the_trace_propagates(structure):
    """Torch-Pruning retries a failed forward with other arguments under a bare ``except``: a
    ``KeyboardInterrupt`` raised in the model's own forward pre-hook while it traced was
    swallowed (``"auto"`` then pruned the eigenbasis)."""
    from lightning_eigendamage.channels import engine as channels_mod

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
    )
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tracing = {"on": False}
    real = channels_mod._traced_graph

    def traced(*args, **kwargs):
        tracing["on"] = True
        try:
            return real(*args, **kwargs)
        finally:
            tracing["on"] = False

    def hook(module, args):
        if tracing["on"] and not tracing.get("pressed"):  # once: Torch-Pruning's retry then runs
            tracing["pressed"] = True
            raise KeyboardInterrupt("pressed during the trace")

    net.register_forward_pre_hook(hook)
    batches = [(torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(channels_mod, "_traced_graph", traced)
        with pytest.raises(KeyboardInterrupt, match="pressed during the trace"):
            prune(net, batches, ratio=0.4, target="flops", structure=structure)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert "_call_impl" not in net.__dict__ and type(net[0]) is nn.Conv2d


@pytest.mark.parametrize("structure", ["channels", "auto"])
def test_a_channels_target_is_reached_with_its_whole_channels(structure):
    """0.4 of 64 prunable channels is 25 whole channels: the selection removed them and the
    report said the target was missed, "the groups that may be narrowed are exhausted"."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    batches = _images(8, 10, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)  # no "target not reached" warning either
        report = prune(net, batches, ratio=0.4, target="channels", structure=structure)
    assert (report.channels_total, report.channels_removed) == (64, 25)
    assert report.target_reached and report.limited_by is None
    assert 64 - (net[0].out_channels + net[2].out_channels) == 25


def test_a_model_pruned_by_channels_then_in_its_eigenbasis_reloads():
    """A layer that lost channels and was then rewritten in its eigenbasis has a record narrower
    than the freshly built layer: ``restore_pruned`` refused it ("record widths 32→31 do not
    match the model's 32→32")."""
    from lightning_eigendamage import restore_pruned
    from lightning_eigendamage.eigenbasis.layers import KFELayer

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip

    net = build()
    batches = _images(8, 10, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(net, batches, ratio=0.4, target="flops", structure="channels")
        prune(net, batches, ratio=0.3, target="flops", structure="eigenbasis")
    narrowed_then_rewritten = [
        m for m in net.modules() if isinstance(m, KFELayer) and (m.in_features < 16 or m.out_features < 16)
    ]
    assert narrowed_then_rewritten
    _reloads_exactly(net, build, batches[1][0])
    # a record narrower than its layer is still refused where nothing lost channels
    plain = build()
    state = net.state_dict()
    state._metadata = {k: v for k, v in state._metadata.items() if "lightning_eigendamage" not in v}
    with pytest.raises(ValueError, match="record widths"):
        restore_pruned(plain, state)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"ratio": "0.5"}, ValueError, r"ratio must be a number in \[0, 1\), got '0.5'"),
        ({"ratio": None}, ValueError, "ratio must be a number"),
        (
            {"ratio": 0.4, "structure": "auto", "target": "params"},
            ValueError,
            "structure='auto' chose 'channels'",
        ),
        ({"ratio": 0.4, "structure": "auto", "shots": 2}, ValueError, "structure='auto' chose 'channels'"),
        ({"ratio": 0.4, "distributed": True}, ValueError, "needs an initialised torch.distributed"),
        ({"ratio": 0.4, "class_dim": 5}, ValueError, "class_dim=5 is out of range"),
    ],
)
def test_bad_prune_arguments_name_the_argument_and_change_nothing(kwargs, error, match):
    """Each was an error from deep inside (a ``TypeError`` on ``<=``, torch's ``IndexError``), a
    refusal that did not say ``"auto"`` had chosen channels, or, for ``distributed=True`` without
    a process group, a silent single-process run (channels)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [(torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,)))]
    with pytest.raises(error, match=match):
        prune(net, batches, **kwargs)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_the_callback_refuses_a_verbose_that_is_not_a_bool():
    with pytest.raises(TypeError, match="verbose must be True or False, got 'yes'"):
        EigenDamagePruning({0: 0.5}, verbose="yes")


@pytest.mark.parametrize("mid", [24, 64, 8])
def test_a_channel_pruned_checkpoint_is_refused_by_a_model_built_with_other_widths(mid, tmp_path):
    """The checkpoint records each narrowed layer's shapes before pruning: a model built with
    another width there took the pruned widths and loaded without complaint (24, 64), or failed
    with a puzzling message (8). A model built as before pruning still loads it exactly."""
    from lightning_eigendamage import enable_pruned_loading, restore_pruned

    def build(width: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(32, 10),
        )  # fmt: skip

    torch.manual_seed(0)
    net = build(32)
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(net, batches, ratio=0.5, target="flops", structure="channels")
    torch.save(net.state_dict(), tmp_path / "p.pt")
    other = build(mid)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="the checkpoint was pruned from a model whose"):
        restore_pruned(other, tmp_path / "p.pt")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    hooked = build(mid)
    enable_pruned_loading(hooked)
    with pytest.raises(ValueError, match="build the model as it was before pruning"):
        hooked.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    x = batches[0][0]
    same = restore_pruned(build(32), tmp_path / "p.pt")
    torch.testing.assert_close(same.eval()(x), net.eval()(x), rtol=0, atol=0)
    # saved again after the reload, the checkpoint still records the widths from before pruning
    again = build(mid)
    with pytest.raises(ValueError, match="the checkpoint was pruned from a model whose"):
        restore_pruned(again, same.state_dict())


def test_a_step_point_on_the_step_that_ends_an_epoch_point_is_refused_before_training():
    """``steps={4: ...}`` with ``epochs={0: ...}`` at 4 steps per epoch: one round ran, the other
    was skipped at run time ("no curvature was captured"). Refused before training now, the model
    untouched; a step point one step later is accepted."""
    torch.manual_seed(0)
    data = loader(image_data(32, size=8), 8)  # 4 steps per epoch
    model = LitClassifier(small_cnn())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = EigenDamagePruning(PruningSchedule(epochs={0: 0.3}, steps={4: 0.3}), verbose=False)
    with pytest.raises(
        ValueError, match="the step point 4 and the epoch point 0 fall on the same optimizer step"
    ):
        trainer(max_epochs=2, callbacks=[cb]).fit(model, data)
    assert model.steps_run == 0 and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    cb = EigenDamagePruning(PruningSchedule(epochs={0: 0.3}, steps={6: 0.3}), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=2, callbacks=[cb]).fit(LitClassifier(small_cnn()), data)
    assert len(cb.reports) == 2


def test_under_max_steps_an_epoch_point_never_reached_or_ending_on_a_step_point_is_refused() -> None:
    """``Trainer(max_steps=...)`` (4 steps per epoch): an epoch point in an epoch the run never
    reaches did nothing, silently; a step point on the step that ends an epoch point's epoch was
    only refused without ``max_steps``. Both are refused before training now; the epoch that
    ``max_steps`` cuts short ends at ``max_steps`` (Lightning still ends it), so a step point there
    coincides too, and an epoch point in it is reached."""
    data = loader(image_data(32, size=8), 8)  # 4 steps per epoch
    cases = [
        (PruningSchedule(epochs={2: 0.3}), 8, r"the epoch point\(s\) \[2\] are never reached: max_steps=8"),
        (PruningSchedule(epochs={0: 0.3}, steps={4: 0.3}), 12, "the step point 4 and the epoch point 0"),
        (PruningSchedule(epochs={1: 0.3}, steps={6: 0.3}), 6, "the step point 6 and the epoch point 1"),
    ]
    for schedule, max_steps, match in cases:
        model = LitClassifier(small_cnn())
        with pytest.raises(ValueError, match=match):
            trainer(max_steps=max_steps, callbacks=[EigenDamagePruning(schedule, verbose=False)]).fit(
                model, data
            )
        assert model.steps_run == 0
    cb = EigenDamagePruning(PruningSchedule(epochs={1: 0.3}), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=6, callbacks=[cb]).fit(LitClassifier(small_cnn()), data)
    assert len(cb.reports) == 1  # epoch 1, cut short at step 6, still prunes


class _Doubles(nn.Module):
    """``x.mul_(2)`` (in place, on its input) or ``x * 2``, then two convs and a classifier."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place
        self.c1, self.c2, self.fc = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.Linear(16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mul_(2) if self.in_place else x * 2
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("structure", ["channels", "eigenbasis", "auto"])
def test_a_model_that_changes_its_input_in_place_is_pruned_as_one_that_does_not(structure):
    """The checks ran the model again and again on the caller's tensors: an in-place ``mul_``
    doubled the calibration batch at each run, and every trial cut "changed what the model
    computes" (channels: nothing prunable; ``"auto"``: the eigenbasis). The model now gets copies:
    it is pruned exactly as the same model written out of place, and the batches are unchanged."""

    def run(in_place: bool) -> tuple[nn.Module, Any, list[torch.Tensor]]:
        torch.manual_seed(0)
        net = _Doubles(in_place)
        g = torch.Generator().manual_seed(0)
        xs = [torch.rand(8, 3, 8, 8, generator=g) for _ in range(3)]
        kept = [x.clone() for x in xs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = prune(
                net,
                [(x, torch.randint(0, 10, (8,))) for x in xs],
                ratio=0.4,
                target="flops",
                structure=structure,
            )
        assert all(torch.equal(x, k) for x, k in zip(xs, kept))  # the caller's batches as they were
        return net, report, xs

    net, report, _ = run(True)
    ref, want, _ = run(False)
    assert report.structure == want.structure and report.flops_after == want.flops_after
    assert [tuple(p.shape) for p in net.parameters()] == [tuple(p.shape) for p in ref.parameters()]


def test_a_model_of_layer_types_no_structure_prunes_says_so_by_every_structure() -> None:
    """Only nn.Conv3d layers: every structure refuses, naming the Conv3d layers; ``"auto"`` says
    that it tried channels first (it used to advise trying 'channels' or 'auto'), the eigenbasis
    no longer advises channels, which cannot prune it either; the model is left as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(4, 2, 5, 5, 5), torch.randint(0, 4, (4,)))]
    note = "its nn.Conv3d ×2 are of a type no structure prunes"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        with pytest.raises(ValueError, match="tried channels first") as auto:
            prune(model, batches, ratio=0.5, structure="auto")
        assert auto.value.args[0].count(note) == 1 and "may prune it" not in auto.value.args[0]
        with pytest.raises(RuntimeError, match=note):
            prune(model, batches, ratio=0.5, structure="channels")
        with pytest.raises(ValueError, match=note) as eig:
            prune(model, batches, ratio=0.5, structure="eigenbasis")
        assert "may prune it" not in eig.value.args[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _SplitAttention(nn.Module):
    """Attention with separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` and ``num_heads``."""

    def __init__(self, d: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, d // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape

        def heads(v: torch.Tensor) -> torch.Tensor:
            return v.view(n, t, self.num_heads, self.head_dim).transpose(1, 2)

        o = nn.functional.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return self.out_proj(o.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim))


class _TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm, self.attn, self.head = (
            nn.Linear(8, 32),
            nn.LayerNorm(32),
            _SplitAttention(),
            nn.Linear(32, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.head((h + self.attn(self.norm(h))).mean(1))


def test_heads_removed_then_projections_in_their_eigenbasis_reload_and_a_failed_load_changes_nothing() -> (
    None
):
    """Heads of a q/k/v/out-projection attention removed (channels), then its projections
    rewritten in their eigenbasis: the fresh model's attention module was replaced by its narrowed
    copy holding the original Linear children, after the rebuilt projections had been put into
    the original: the load failed on missing keys, and the failed load left the fresh model's
    projections rewritten. Now both routes reload exactly, and a load that fails leaves the fresh
    model's modules and tensors as they were."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 6, 8), torch.randint(0, 5, (8,))) for _ in range(2)]
    net = _TokenClassifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        prune(net, batches, ratio=0.4, structure="channels", target="flops")
        assert net.attn.num_heads < 4
        prune(net, batches, ratio=0.4, structure="eigenbasis", target="flops")
    assert type(net.attn.q_proj).__name__ == "KFELayer"
    _reloads_exactly(net, _TokenClassifier, batches[0][0])

    from lightning_eigendamage import restore_pruned

    bad = dict(net.state_dict())
    bad["head.weight"] = torch.zeros(5, 31)
    bad = type(net.state_dict())(bad)
    bad._metadata = net.state_dict()._metadata
    fresh = _TokenClassifier()
    modules = dict(fresh.named_modules())
    tensors = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match="head.weight"):
        restore_pruned(fresh, bad)
    assert dict(fresh.named_modules()) == modules and fresh.attn.num_heads == 4
    assert all(torch.equal(tensors[k], v) for k, v in fresh.state_dict().items())


class _DictInput(nn.Module):
    """``forward(inp)`` with ``inp`` a dict; returns a dict of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = torch.relu(self.b(torch.relu(self.a(inp["x"]))))
        return {"logits": self.head(h), "feat": h}


def test_a_dict_input_is_one_argument_everywhere_and_auto_with_a_forward_fn_finds_no_input() -> None:
    """The FLOP count called ``model(**input)`` where the capture and the checks call
    ``model(input)``: the eigenbasis failed on a model taking a dict (channels did not). And
    ``"auto"`` with a ``forward_fn`` on dict batches looked for the model's input (a TypeError)
    before finding that a forward_fn makes it take the eigenbasis."""
    from lightning_eigendamage.costs import count_flops

    torch.manual_seed(0)
    batches = [{"x": torch.randn(8, 8), "y": torch.randint(0, 4, (8,))} for _ in range(2)]
    assert count_flops(_DictInput(), {"x": torch.randn(2, 8)}) == 2 * (8 * 32 + 32 * 32 + 32 * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        for structure in ("eigenbasis", "channels"):
            torch.manual_seed(0)
            net = _DictInput()
            report = prune(
                net,
                batches,
                ratio=0.5,
                structure=structure,
                target="flops",
                input_fn=lambda b: {"x": b["x"]},
                forward_fn=lambda m, b: m({"x": b["x"]})["logits"],
            )
            assert report.flops_after < report.flops_before
        torch.manual_seed(0)
        report = prune(
            _DictInput(),
            batches,
            ratio=0.5,
            structure="auto",
            target="flops",
            forward_fn=lambda m, b: m({"x": b["x"]})["logits"],
        )
    assert report.structure == "eigenbasis" and "forward_fn is given" in report.structure_reason
    assert report.flops_after < report.flops_before


class _RawConv(nn.Module):
    """A conv applied through ``F.conv2d`` with a Parameter of the model's own, between layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.w = nn.Parameter(torch.randn(24, 16, 3, 3) * 0.1)
        self.c3, self.fc, self.head = nn.Conv2d(24, 32, 3, padding=1), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(nn.functional.conv2d(torch.relu(self.stem(x)), self.w, padding=1))
        return self.head(torch.relu(self.fc(torch.relu(self.c3(x)).mean((2, 3)))))


def test_a_group_reaching_a_parameter_used_in_forward_is_left_whole_and_the_rest_pruned() -> None:
    """The stem's group holds a Parameter the forward uses through ``F.conv2d``, whose index
    mapping Torch-Pruning gets wrong: the decision raised an ``UntraceableError`` for the whole
    model (blaming "this model's reshapes"). Now that group is left whole with the reason and the
    other groups meet the target; the pruned model reloads exactly."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    net = _RawConv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        report = prune(net, batches, ratio=0.5, structure="channels", target="flops")
    assert net.stem.out_channels == 16 and net.w.shape == (24, 16, 3, 3)
    assert "used directly in forward" in report.left_whole["group of stem"]
    assert report.target_reached and net.c3.out_channels < 32
    _reloads_exactly(net, _RawConv, batches[0][0])


@pytest.mark.parametrize("structure", ["auto", "channels", "eigenbasis"])
def test_a_missed_target_is_attributed_to_the_callers_line(structure: str) -> None:
    """``TargetNotReachedWarning`` pointed inside the package where ``"auto"`` reached the step
    through its fallback (``fallback.py``); it names the line that called ``prune`` for every
    structure (and ``shots``)."""
    from lightning_eigendamage import TargetNotReachedWarning

    torch.manual_seed(0)
    for extra in ({}, {"shots": 2} if structure == "eigenbasis" else {}):
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,)))]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prune(net, batches, ratio=0.95, structure=structure, target="flops", **extra)
        missed = [w for w in caught if issubclass(w.category, TargetNotReachedWarning)]
        assert missed and all(w.filename == __file__ for w in missed), [
            (w.filename, w.lineno) for w in missed
        ]


def test_auto_falling_back_after_channels_failed_names_its_choice_when_the_eigenbasis_refuses_an_option(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``target="channels"`` under ``"auto"``: when the channel prune fails after the check,
    ``"auto"`` falls back to the eigenbasis, which does not count channels. The error said
    ``structure='eigenbasis'`` as if the user had chosen it; it says ``"auto"`` chose it and why."""
    from lightning_eigendamage.channels.engine import ChannelEngine

    def fails(self, *args, **kwargs):
        raise RuntimeError("a failure after the check")

    monkeypatch.setattr(ChannelEngine, "prune", fails)
    monkeypatch.setattr("lightning_eigendamage.front.channels_with_eigenbasis", fails)
    torch.manual_seed(0)
    net = small_cnn()
    batches = [(torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,)))]
    for options in ({"target": "channels"}, {"options": PruneOptions(structure="auto", target="channels")}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PruningWarning)
            with pytest.raises(
                ValueError, match=r"structure='auto' chose 'eigenbasis' for this model: .*a failure"
            ):
                prune(
                    net,
                    batches,
                    ratio=0.3,
                    **({"structure": "auto"} if "target" in options else {}),
                    **options,
                )


@pytest.mark.parametrize("structure", ["auto", "eigenbasis"])
def test_resuming_from_a_checkpoint_on_an_epochs_last_step_runs_that_epochs_round(
    tmp_path, structure: str
) -> None:
    """A step checkpoint written on the last optimizer step of epoch 1, before its end (where the
    epoch point's round runs): resumed from it, Lightning never ends epoch 1, and the round was
    lost without a word. It now runs at the start of the resumed fit, from the factors the
    checkpoint holds: the resumed run ends where the uninterrupted one does."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, ckpt=None):
        torch.manual_seed(0)
        model = LitClassifier(small_cnn())
        cb = EigenDamagePruning(PruningSchedule(epochs={1: 0.3}), structure=structure, verbose=False)
        every = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_train_steps=4, filename="{step}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(
                max_epochs=3, callbacks=[cb, every], enable_checkpointing=True, default_root_dir=root
            ).fit(model, loader(image_data(32, size=8), 8), ckpt_path=ckpt)  # 4 steps per epoch
        return model, cb

    whole, cb_whole = run(tmp_path / "whole")
    torch.manual_seed(1)  # the fresh model's own weights differ: they come from the checkpoint
    resumed, cb_resumed = run(tmp_path / "resumed", ckpt=tmp_path / "whole" / "step=8.ckpt")
    assert len(cb_whole.reports) == len(cb_resumed.reports) == 1
    got, want = resumed.state_dict(), whole.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        if torch.is_tensor(want[k]):
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
        else:  # an eigenbasis layer's record
            assert got[k] == want[k], k


@pytest.mark.parametrize("structure", ["channels", "auto", "eigenbasis"])
def test_max_batches_bounds_what_is_drawn_from_a_stream_and_what_recalibrates(structure: str) -> None:
    """``max_batches=2`` on an endless stream: channels (and ``"auto"``) listed the whole iterable
    (they never returned), the eigenbasis drew a third batch; channels re-estimated BatchNorm on
    every batch given. Now exactly two are drawn, and the result is that of the first two alone."""
    import itertools

    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))) for _ in range(3)]
    drawn = []

    def stream():
        for i in itertools.count():
            drawn.append(i)
            if i > 20:  # (an endless stream drawn this far would never end)
                raise RuntimeError("the stream was drawn past max_batches")
            yield batches[i % 3]

    torch.manual_seed(0)
    net, ref = small_cnn(), small_cnn()
    ref.load_state_dict(net.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningWarning)
        prune(net, stream(), ratio=0.3, structure=structure, max_batches=2)
        prune(ref, batches[:2], ratio=0.3, structure=structure)
    assert drawn == [0, 1]
    got, want = net.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        if torch.is_tensor(want[k]):
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_an_option_of_another_structure_is_a_value_error_for_the_eigenbasis() -> None:
    """``prune(structure="eigenbasis", damping=0.1)`` raised Python's ``TypeError`` (an unexpected
    keyword); the documented ``ValueError`` names the option, before the model is touched."""
    net = small_cnn()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="damping"):
        prune(net, [(torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,)))], ratio=0.3, damping=0.1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class _TwoInputs(nn.Module):
    """A forward that needs a mask beside the input (a padding mask, as a text model takes)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) * mask[:, None])


def test_channels_on_a_forward_that_needs_more_than_the_input_say_how_they_call_the_model() -> None:
    """With structure="channels", a forward_fn changes only the capture: the graph is traced from
    model(input). A model that cannot run so was a bare TypeError from inside the model."""
    torch.manual_seed(0)
    model = _TwoInputs()
    batches = [(torch.randn(6, 8), torch.ones(6)) for _ in range(2)]
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(TypeError, match=r"calls the model as model\(input\).*missing 1 required"):
        prune(model, batches, ratio=0.3, structure="channels", forward_fn=lambda m, b: m(*b))
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


class _TrainOnlyAux(nn.Module):
    """An auxiliary head that runs in training mode only (GoogLeNet's and Inception's), reading the
    first conv's output; ``use_flag`` gates a second one behind a flag that is off."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1)
        self.c3 = nn.Conv2d(24, 24, 3, padding=1)
        self.fc = nn.Linear(24, 5)
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
        self.flagged = nn.Linear(24, 5)
        self.use_flag = False

    def forward(self, x: torch.Tensor) -> Any:
        f = torch.relu(self.c1(x))
        g = torch.relu(self.c2(f))
        out = self.fc(torch.relu(self.c3(g)).mean((2, 3)))
        if self.use_flag:
            out = out + self.flagged(g.mean((2, 3)))
        return (out, self.aux(f)) if self.training else out


def test_a_layer_that_runs_only_in_training_keeps_the_channels_it_reads() -> None:
    """The channel graph is traced in eval mode: a train-only head reading ``c1`` was not in it,
    ``c1`` was narrowed, and the next training step failed. Its group is now left whole (said
    why), the others still narrow, and a layer that runs in neither mode is warned about."""
    torch.manual_seed(0)
    model = _TrainOnlyAux()
    x = torch.randn(4, 3, 8, 8)
    model(x)  # (the lazy layer)
    model.eval()
    batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))) for _ in range(2)]
    with pytest.warns(PruningWarning, match=r"never ran .*\(flagged\)"):
        report = prune(model, batches, ratio=0.3, target="flops", structure="channels")
    assert model.c1.out_channels == 16 and model.aux[0].in_channels == 16
    assert model.c2.out_channels < 24  # the groups no hidden layer reads still narrow
    assert "read by aux.0" in report.left_whole["group of c1"]
    model.train()
    out, aux = model(x)  # the training-mode forward runs, the aux head on c1's 16 channels
    assert out.shape == aux.shape == (4, 5)


class _ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 32), nn.Linear(32, 12), nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


@pytest.mark.parametrize("load", ["restore_pruned", "hook"])
def test_channels_then_eigenbasis_on_every_narrowed_layer_reloads(load: str) -> None:
    """When every layer that lost channels was then rewritten in its eigenbasis, the state_dict no
    longer said the model lost channels, and a fresh model refused the narrower records."""
    import io

    from lightning_eigendamage import enable_pruned_loading, restore_pruned

    torch.manual_seed(0)
    batches = [(torch.randn(8, 12), torch.randint(0, 5, (8,))) for _ in range(3)]
    model = _ResidualMLP()
    prune(model, batches, ratio=0.5, target="flops", structure="channels")
    assert model.fc1.out_features < 32
    prune(model, batches, ratio=0.3, target="flops", structure="eigenbasis")
    assert type(model.fc1).__name__ == type(model.fc2).__name__ == "KFELayer"
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = _ResidualMLP()
    if load == "restore_pruned":
        restore_pruned(fresh, buf)
    else:
        enable_pruned_loading(fresh)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
    model.eval()
    fresh.eval()
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@dataclasses.dataclass
class _Out:
    logits: torch.Tensor


class _DataclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 24, 3, padding=1),
            nn.Linear(24, 5),
        )

    def forward(self, x: torch.Tensor) -> _Out:
        return _Out(self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3))))


@pytest.mark.parametrize("structure", ["eigenbasis", "channels"])
def test_a_model_returning_a_dataclass_is_pruned_with_a_loss_fn(structure: str) -> None:
    """The error for such a model advises the empirical Fisher with a loss_fn; doing so failed
    ("holds no tensor with a batch dimension"; channels: Torch-Pruning's trace iterated it)."""
    torch.manual_seed(0)
    batches = [(torch.randn(6, 3, 12, 12), torch.randint(0, 5, (6,))) for _ in range(2)]
    model = _DataclassNet()
    report = prune(
        model,
        batches,
        ratio=0.4,
        target="flops",
        structure=structure,
        fisher="empirical",
        loss_fn=lambda out, y: torch.nn.functional.cross_entropy(out.logits, y),
    )
    assert report.target_reached
    assert model(batches[0][0]).logits.shape == (6, 5)  # the output layer kept its width


class _WeightReused(nn.Module):
    """``c2``'s weight is used a second time functionally, and ``c1``'s dtype is read: after a
    rewrite in the eigenbasis, ``self.c1.weight`` would not exist."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(16, 24, 3, padding=1), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x.to(self.c1.weight.dtype)))
        x = torch.relu(self.c2(x))
        x = torch.relu(torch.nn.functional.conv2d(x, self.c2.weight, self.c2.bias, padding=1))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def test_a_layer_whose_weight_the_forward_also_uses_stays_whole_in_the_eigenbasis() -> None:
    """The eigenbasis replaced it by stages without a ``weight``, and the call failed with a bare
    AttributeError from the model's forward."""
    torch.manual_seed(0)
    batches = [(torch.randn(6, 3, 12, 12), torch.randint(0, 5, (6,))) for _ in range(2)]
    model = _WeightReused()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune(model, batches, ratio=0.4, target="flops", structure="eigenbasis")
    assert type(model.c2) is nn.Conv2d and "used outside its own call (conv2d)" in report.left_whole["c2"]
    assert type(model.c1) is nn.Conv2d and "(.dtype)" in report.left_whole["c1"]
    assert type(model.c3).__name__ == "KFELayer"
    assert model(batches[0][0]).shape == (6, 5)


@pytest.mark.parametrize("structure", ["eigenbasis", "channels"])
def test_uninitialised_lazy_layers_are_a_clear_error(structure: str) -> None:
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))]
    with pytest.raises(ValueError, match=r"lazy parameters that are not initialised.*run the model once"):
        prune(model, batches, ratio=0.3, structure=structure)


def test_per_pixel_labels_with_the_wrong_class_dim_say_which_class_dim() -> None:
    """A segmentation output (N, C, H, W) with the default class_dim=-1: cross-entropy's own
    "Expected input batch_size (288) to match target batch_size (1536)" said nothing useful."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4, 8, 8)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the class_dim warning says it first)
        with pytest.raises(ValueError, match=r"output \(4, 3, 8, 8\) has 96 rows .* pass the class_dim"):
            prune(model, batches, ratio=0.3, structure="eigenbasis", fisher="empirical", exempt_last=False)


def test_a_channels_last_model_restored_from_an_eigenbasis_checkpoint_stays_channels_last() -> None:
    import io

    from lightning_eigendamage import restore_pruned

    def build() -> nn.Module:
        convs = [
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.Conv2d(32, 32, 3, padding=1),
        ]
        layers = [m for c in convs for m in (c, nn.ReLU())]
        net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
        return net.to(memory_format=torch.channels_last)

    torch.manual_seed(0)
    x = torch.randn(6, 3, 12, 12).to(memory_format=torch.channels_last)
    batches = [(x, torch.randint(0, 5, (6,))) for _ in range(2)]
    model = build()
    prune(model, batches, ratio=0.5, target="flops", structure="eigenbasis")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = restore_pruned(build(), buf)
    cores = [m.core.weight for m in fresh.modules() if type(m).__name__ == "KFELayer"]
    assert cores and all(w.is_contiguous(memory_format=torch.channels_last) for w in cores if w.shape[-1] > 1)


def test_the_eigenbasis_draws_from_the_global_stream_only_what_one_pass_of_a_loader_draws() -> None:
    """A third ``iter()`` of a shuffling DataLoader (a check whether it was a one-shot iterator)
    drew its next seed from the global generator, which the docs say is never drawn from."""
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 4, (64,)))
    torch.manual_seed(123)
    for _ in DataLoader(data, batch_size=16, shuffle=True):
        pass
    one_pass = torch.get_rng_state()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    torch.manual_seed(123)
    prune(model, DataLoader(data, batch_size=16, shuffle=True), ratio=0.5, structure="eigenbasis")
    assert torch.equal(torch.get_rng_state(), one_pass)


def test_an_infinite_reconstruct_damping_is_refused() -> None:
    """It passed the "≥ 0" check and wrote NaN weights."""
    with pytest.raises(ValueError, match="reconstruct_damping must be a finite number"):
        PruneOptions(reconstruct_damping=float("inf"))


def test_a_registered_criterion_of_the_wrong_shape_or_non_finite_is_refused() -> None:
    """Scores of another length cut layers to that length (report: realised_fraction 4.6)."""
    from lightning_eigendamage import register_criterion

    def wrong_shape(w, lam_a, lam_g, t):
        return torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)

    def not_finite(w, lam_a, lam_g, t):
        return torch.full((w.shape[0],), float("nan")), torch.ones(w.shape[2])

    register_criterion("_test_wrong_shape", wrong_shape)
    register_criterion("_test_not_finite", not_finite)
    batches = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    for method, match in [
        ("_test_wrong_shape", r"must return \(out scores \(16,\)"),
        ("_test_not_finite", "non-finite"),
    ]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        before = [t.clone() for t in model.state_dict().values()]
        with pytest.raises(ValueError, match=match):
            prune(model, batches, ratio=0.5, structure="eigenbasis", method=method)
        assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_a_loss_fn_the_true_fisher_would_ignore_is_refused() -> None:
    """With the default fisher="true" the loss_fn was never called, without a word."""
    with pytest.raises(ValueError, match="loss_fn is used only by fisher='empirical'"):
        PruneOptions(loss_fn=lambda out, y: out.sum())
    with pytest.raises(ValueError, match="loss_fn is used only by fisher='empirical'"):
        EigenDamagePruning(schedule={0: 0.5}, loss_fn=lambda out, y: out.sum(), fisher="true")
    PruneOptions(loss_fn=lambda out, y: out.sum(), fisher="empirical")  # (taken)


def test_the_eigenbasis_functions_check_their_options_model_and_plan() -> None:
    """decide() took channel options on an eigenbasis analysis; None or "auto" options, a plan
    for another target, a string for a model or distributed="no" ended in bare errors."""
    from lightning_eigendamage import analyse, apply, decide

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    batches = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(2)]
    opts = PruneOptions(target="flops")
    an = analyse(model, batches, opts)
    with pytest.raises(ValueError, match="eigenbasis engine's; these options are for structure='channels'"):
        decide(an, 0.5, PruneOptions(structure="channels"))
    with pytest.raises(TypeError, match="takes a PruneOptions, got NoneType"):
        decide(an, 0.5, None)
    plan = decide(an, 0.5, PruneOptions(structure="auto", target="flops"))  # "auto": the eigenbasis
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(ValueError, match="decided for target='flops', the options say target='directions'"):
        apply(model, an, plan, PruneOptions())
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        prune("model", batches, ratio=0.5)
    with pytest.raises(TypeError, match="distributed must be True or False"):
        prune(model, batches, ratio=0.5, distributed="no")


def test_applying_an_analysis_to_a_copy_of_another_dtype_says_the_dtypes_differ() -> None:
    import copy

    from lightning_eigendamage import analyse, apply, decide

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opts = PruneOptions(target="flops")
    an = analyse(model, [torch.randn(16, 8)], opts)
    plan = decide(an, 0.5, opts)
    with pytest.raises(ValueError, match=r"dtypes differ \(torch.float64 now, torch.float32 when analysed"):
        apply(copy.deepcopy(model).double(), an, plan, opts)
