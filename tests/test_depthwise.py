"""Depthwise convolutions follow their channel group (the channel engine).

In an inverted residual, the expansion conv's output channel ``c``, its BatchNorm, the depthwise
conv's filter ``c`` and the projection conv's input column ``c`` are one unit. Checked against
an independent computation: the pruned network equals the dense one whose projection conv reads
only the kept channels, refitted to them by least squares on the captured inputs
(``W'_K = W_K + W_S·A_SK·A_KK⁻¹`` with the damped second moment ``A`` of the projection's
input); the FLOPs the plan counted equal those measured on the pruned network.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import conv_batches, layer_patches, least_squares_refit, warm_up_bn
from torch import nn

from lightning_eigendamage import prune_channels
from lightning_eigendamage.costs import count_flops

DAMPING = 1e-3


class InvertedResidual(nn.Module):
    """Stem 3→8, then 8 → expand ×3 (1×1) → depthwise 3×3 → project (1×1) → 8, added to the
    stem's output; mean-pooled into Linear(8, 5). ``multiplier``: depthwise filters per channel."""

    def __init__(self, multiplier: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.exp = nn.Conv2d(8, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24 * multiplier, 3, padding=1, groups=24, bias=False)
        self.bn2 = nn.BatchNorm2d(24 * multiplier)
        self.proj = nn.Conv2d(24 * multiplier, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = nn.functional.relu6(self.bn1(self.exp(x)))
        y = nn.functional.relu6(self.bn2(self.dw(y)))
        x = x + self.bn3(self.proj(y))
        return self.fc(x.mean((2, 3)))


def _setup(multiplier: int = 1) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = InvertedResidual(multiplier)
    batches = conv_batches(3, n=16, size=8, n_classes=5)
    warm_up_bn(model, batches)
    return model, batches


def _refitted(dense: nn.Module, batches: list, removed: list[int]) -> nn.Module:
    """The dense network whose projection conv reads only the kept channels, refitted to them
    by least squares on its captured inputs (an independent computation of the compensation)."""
    w = dense.proj.weight.detach().double()[:, :, 0, 0]
    refit = least_squares_refit(w, layer_patches(dense, dense.proj, batches), removed, 1, DAMPING)
    out = copy.deepcopy(dense)
    with torch.no_grad():
        out.proj.weight.copy_(refit.float()[:, :, None, None])
    return out


def test_depthwise_conv_follows_its_group_scored_and_compensated_at_the_projection() -> None:
    model, batches = _setup()
    dense = copy.deepcopy(model)
    x = batches[0][0]
    report = prune_channels(
        model,
        batches,
        ratio=0.25,
        exclude=["stem"],  # the residual group stays whole: only the expanded channels can go
        recalibrate_bn=False,
        damping=DAMPING,
    )
    (group,) = report.groups
    assert group["root"] in ("exp", "dw") and group["channels"] == 24  # one group, whichever root
    removed = group["removed"]
    kept = [c for c in range(24) if c not in removed]
    assert len(removed) == 6 and not any("depthwise" in why for why in report.skipped.values())
    # the depthwise conv lost the same channels, its filters kept whole: a plain narrower layer
    assert model.dw.groups == model.dw.in_channels == model.dw.out_channels == 18
    assert torch.equal(model.dw.weight, dense.dw.weight[kept])
    assert torch.equal(model.exp.weight, dense.exp.weight[kept])
    for bn in ("bn1", "bn2"):
        assert torch.equal(getattr(model, bn).running_var, getattr(dense, bn).running_var[kept])
    assert model.proj.in_channels == 18
    # the projection reads the kept channels, refitted: the pruned network is the refitted dense one
    want = _refitted(dense, batches, removed)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            model.proj.weight[:, :, 0, 0], want.proj.weight[:, kept, 0, 0], rtol=1e-5, atol=1e-6
        )
    # the plan counted the depthwise conv's FLOPs: per channel 2·H·W·(8 + 3·3 + 8)
    flops = count_flops(model, x)
    assert report.flops_planned == report.flops_after == flops
    assert count_flops(dense, x) - flops == 6 * 2 * 8 * 8 * (8 + 9 + 8)


def test_nothing_removed_keeps_the_function() -> None:
    model, batches = _setup()
    dense = copy.deepcopy(model)
    report = prune_channels(model, batches, ratio=0.0, recalibrate_bn=False)
    assert report.channels_removed == 0
    x = batches[1][0]
    with torch.no_grad():
        assert torch.equal(model(x), dense(x))


def test_a_channel_multiplier_leaves_the_group_whole_and_says_why() -> None:
    model, batches = _setup(multiplier=2)
    with pytest.raises(RuntimeError, match="no dependency group .* can change width: .*channel multiplier 2"):
        prune_channels(model, batches, ratio=0.2, exclude=["stem"])  # (stem: the only other group)
    assert model.dw.out_channels == 48
    report = prune_channels(model, batches, ratio=0.2)  # the stem's group can go: it says why not dw's
    assert model.dw.out_channels == 48 and report.channels_removed > 0
    assert any("channel multiplier 2" in why for why in report.skipped.values()), report.skipped


def test_pruned_depthwise_network_saves_and_reloads(tmp_path) -> None:
    model, batches = _setup()
    prune_channels(model, batches, ratio=0.3, target="flops")
    assert model.dw.out_channels < 24
    path = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), path)
    from lightning_eigendamage import restore_pruned

    fresh = InvertedResidual()
    restore_pruned(fresh, path)
    x = batches[0][0]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert fresh.dw.groups == fresh.dw.in_channels == fresh.dw.out_channels == model.dw.out_channels


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_torchvision_inverted_residuals_lose_their_expanded_channels(name: str) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, name)(num_classes=5)
    batches = conv_batches(1, n=4, size=32, n_classes=5)
    dws = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    report = prune_channels(model, batches, ratio=0.4, target="flops")
    assert report.target_reached
    # no group left whole for a depthwise conv (a depthwise conv whose group lost no channel
    # is listed as following it)
    left = {k: why for k, why in report.skipped.items() if k.startswith("group of")}
    assert not any("depthwise" in why for why in left.values()), left
    narrowed = [n for n, m in model.named_modules() if n in dws and m.out_channels < dws[n]]
    assert len(narrowed) >= len(dws) // 2, (narrowed, dws)
    for n, m in model.named_modules():
        if n in dws:
            assert m.groups == m.in_channels == m.out_channels


def test_reasons_are_grouped_once_each_with_their_names() -> None:
    from lightning_eigendamage.report import group_reasons

    multiplier = "depthwise convolution (channel multiplier 2): its group is left whole"
    skipped = {
        "a.dw": multiplier,
        "b.dw": multiplier,
        "group of a.exp": "left whole: a.dw is not scored (grouped convolution (groups=4))",
        "group of b.exp": "left whole: b.dw is not scored (grouped convolution (groups=4))",
        "group of c": "left whole: c.ln (LayerNorm) has parameters; exclude it",
    }
    got = group_reasons(skipped)
    assert got == [
        (multiplier, ["a.dw", "b.dw"]),
        ("group left whole: a member is not scored (grouped convolution (groups=4))", ["a.exp", "b.exp"]),
        ("group left whole: a member (LayerNorm) has parameters", ["c"]),
    ]
    model, batches = _setup(multiplier=2)
    with pytest.raises(RuntimeError) as err:  # every group left whole: the reasons, once each
        prune_channels(model, batches, ratio=0.2, exclude=["stem"])
    lines = str(err.value).split(": ", 1)[1].split("; ")
    assert sum(x.startswith("2× group left whole: a member is not scored (depthwise") for x in lines) == 1
    assert "1× group left whole: a member is excluded by user: proj" in lines


def test_the_callback_does_not_list_a_following_depthwise_conv_as_left_alone(caplog) -> None:
    import logging

    from lit_models import LitClassifier, image_data, loader, trainer

    from lightning_eigendamage import EigenDamagePruning

    torch.manual_seed(0)
    model = LitClassifier(InvertedResidual())
    cb = EigenDamagePruning({0: 0.3}, structure="channels", exempt_last=True, verbose=False)
    with caplog.at_level(logging.INFO):
        trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(32, size=8, n_classes=5)))
    said = [r.getMessage() for r in caplog.records if "will not be pruned" in r.getMessage()]
    assert said and any("net.fc" in m for m in said)  # the classifier (exempt_last) is listed
    assert not any("net.dw" in m or "depthwise" in m for m in said), said
    assert model.net.dw.out_channels < 24  # it lost channels with its group
