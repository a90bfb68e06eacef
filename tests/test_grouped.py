"""Grouped convolutions in the channel engine: channels go in units (the same position in every
conv group, so the groups keep equal widths), scored and compensated conv group by conv group.

Checked against independent computations on a tiny ResNeXt-style block: the pruned network
equals the dense one whose readers are refitted by least squares on their captured inputs
(``W'_K = W_K + W_S·A_SK·A_KK⁻¹`` with the damped second moment ``A``), per conv group for the
grouped conv (block-diagonal: group ``j`` reads only its own inputs); and the unit scores equal
the brute-force joint Kron-OBS damage of removing one position from every conv group.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import conv_batches, layer_patches, least_squares_refit, warm_up_bn
from torch import nn

from lightning_eigendamage import prune_channels, restore_pruned
from lightning_eigendamage.channels import engine as channels_mod
from lightning_eigendamage.costs import count_flops

DAMPING = 1e-3


class GroupedBlock(nn.Module):
    """stem 3→8, conv_a 1×1 8→8, gconv 3×3 8→8 in 2 conv groups, conv_c 1×1 8→6, Linear(6, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv_c = nn.Conv2d(8, 6, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv_a(x)))
        x = torch.relu(self.bn2(self.gconv(x)))
        x = torch.relu(self.bn3(self.conv_c(x)))
        return self.fc(x.mean((2, 3)))


def _setup() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = GroupedBlock()
    batches = conv_batches(3, n=16, size=8, n_classes=5)
    warm_up_bn(model, batches)
    return model, batches


def test_a_grouped_conv_reads_units_refitted_conv_group_by_conv_group() -> None:
    model, batches = _setup()
    dense = copy.deepcopy(model)
    x = batches[0][0]
    # only conv_a's output channels can go (stem's and conv_c's groups are excluded whole)
    report = prune_channels(
        model, batches, ratio=0.5, exclude=["stem", "conv_c"], recalibrate_bn=False, damping=DAMPING
    )
    (group,) = report.groups
    removed = sorted(group["removed"])
    positions = sorted({c % 4 for c in removed})
    # whole units: the same positions in both conv groups, so each keeps the same width
    assert removed == sorted(positions + [p + 4 for p in positions]) and len(removed) == 4
    assert model.gconv.groups == 2 and model.gconv.in_channels == 4 and model.gconv.out_channels == 8
    kept = [c for c in range(8) if c not in removed]
    assert torch.equal(model.conv_a.weight, dense.conv_a.weight[kept])
    # independent: per conv group, refit gconv's weights from the kept inputs of that group
    p = layer_patches(dense, dense.gconv, batches)  # (rows, 8·9), channel-major
    w = dense.gconv.weight.detach().double()  # (8, 4, 3, 3)
    want = copy.deepcopy(dense)
    with torch.no_grad():
        for j in range(2):
            wj = w[4 * j : 4 * j + 4].reshape(4, 36)
            pj = p[:, 36 * j : 36 * j + 36]
            local = [c - 4 * j for c in removed if 4 * j <= c < 4 * j + 4]
            want.gconv.weight[4 * j : 4 * j + 4] = (
                least_squares_refit(wj, pj, local, 9, DAMPING).reshape(4, 4, 3, 3).float()
            )
        torch.testing.assert_close(model(x), want(x), rtol=1e-4, atol=1e-5)
    assert report.flops_planned == report.flops_after == count_flops(model, x)


def test_a_grouped_conv_loses_output_units_and_its_reader_is_refitted() -> None:
    model, batches = _setup()
    dense = copy.deepcopy(model)
    x = batches[0][0]
    report = prune_channels(
        model,
        batches,
        ratio=0.5,
        exclude=["stem", "conv_a", "fc"],  # only gconv's output channels can go
        recalibrate_bn=False,
        damping=DAMPING,
    )
    (group,) = report.groups
    removed = sorted(group["removed"])
    positions = sorted({c % 4 for c in removed})
    assert removed == sorted(positions + [p + 4 for p in positions]) and len(removed) == 4
    kept = [c for c in range(8) if c not in removed]
    assert model.gconv.groups == 2 and model.gconv.out_channels == 4 and model.gconv.in_channels == 8
    assert torch.equal(model.gconv.weight, dense.gconv.weight[kept])  # rows of both conv groups
    want = copy.deepcopy(dense)
    p = layer_patches(dense, dense.conv_c, batches)
    with torch.no_grad():
        w = dense.conv_c.weight.detach().double().reshape(6, 8)
        want.conv_c.weight.copy_(least_squares_refit(w, p, removed, 1, DAMPING).reshape(6, 8, 1, 1).float())
        torch.testing.assert_close(model(x), want(x), rtol=1e-4, atol=1e-5)
    assert report.flops_planned == report.flops_after == count_flops(model, x)


def test_unit_scores_are_the_brute_force_joint_damage_of_one_position_per_conv_group() -> None:
    """Single scores (``greedy_steps=None``), ``rank_by="score"`` parts: the score of unit ``p``
    (conv_a channels ``p`` and ``p+4``) is the sum over the two conv groups of gconv of the
    brute-force minimum ``½·T·vec(δW)ᵀ(G_j ⊗ A_j)vec(δW)`` over updates that zero input ``p``."""
    model, batches = _setup()
    from lightning_eigendamage.curvature import capture_factors

    layers = {"gconv": model.gconv}
    captured = capture_factors(
        model,
        layers,
        batches,
        factors_for=["gconv"],
        a_form="patch",
        generator=torch.Generator().manual_seed(0),
    )
    (
        scores,
        updates,
    ) = channels_mod.scores_from_factors(layers, captured, DAMPING, {})
    lf = captured.layers["gconv"]
    a, g, t = lf.a().double(), lf.g().double(), float(lf.locations)
    w = model.gconv.weight.detach().double()
    for c in range(8):
        j, local = divmod(c, 4)
        aj = a[36 * j : 36 * j + 36, 36 * j : 36 * j + 36]
        aj = aj + DAMPING * torch.trace(aj) / 36 * torch.eye(36, dtype=torch.float64)
        gj = g[4 * j : 4 * j + 4, 4 * j : 4 * j + 4]
        wj = w[4 * j : 4 * j + 4].reshape(4, 36)
        # brute force: minimise over δW with δW[:, removed cols] = −W[:, removed cols]
        f = t * torch.kron(gj, aj)  # vec row-major: index o·36 + col  ↔  G ⊗ A
        cols = list(range(local * 9, local * 9 + 9))
        fixed = torch.tensor([o * 36 + q for o in range(4) for q in cols])
        free = torch.tensor([i for i in range(144) if i not in set(fixed.tolist())])
        d_fixed = -wj[:, cols].reshape(-1)
        d_free = -torch.linalg.solve(f[free][:, free], f[free][:, fixed] @ d_fixed)
        d = torch.zeros(144, dtype=torch.float64)
        d[fixed], d[free] = d_fixed, d_free
        brute = 0.5 * d @ f @ d
        torch.testing.assert_close(scores[model.gconv][c], brute, rtol=1e-6, atol=1e-12)
    assert isinstance(updates[model.gconv], channels_mod.GroupedInputObsUpdate)


def test_pruned_grouped_network_saves_and_reloads(tmp_path) -> None:
    model, batches = _setup()
    prune_channels(model, batches, ratio=0.4, target="flops")
    assert model.gconv.in_channels < 8 or model.gconv.out_channels < 8
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = GroupedBlock()
    restore_pruned(fresh, tmp_path / "m.pt")
    model.eval(), fresh.eval()
    x = batches[1][0]
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert (fresh.gconv.in_channels, fresh.gconv.out_channels, fresh.gconv.groups) == (
        model.gconv.in_channels,
        model.gconv.out_channels,
        2,
    )


@pytest.mark.parametrize("name", ["regnet_y_400mf"])
def test_torchvision_grouped_convs_lose_channels_in_equal_groups(name: str) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, name)(num_classes=5)
    grouped = {
        n: (m.in_channels, m.out_channels)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and 1 < m.groups != m.in_channels
    }
    report = prune_channels(model, conv_batches(1, n=4, size=32, n_classes=5), ratio=0.4, target="flops")
    assert report.target_reached
    left = {k: why for k, why in report.skipped.items() if k.startswith("group of")}
    assert not any("grouped" in why for why in left.values()), left
    mods = dict(model.named_modules())
    narrowed = [n for n, (i, o) in grouped.items() if (mods[n].in_channels, mods[n].out_channels) != (i, o)]
    assert len(narrowed) >= len(grouped) // 2
    for n in grouped:
        m = mods[n]
        assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0


class _Mixed(nn.Module):
    """An inverted residual (depthwise) followed by a grouped block, for the callback."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.exp = nn.Conv2d(8, 16, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = nn.functional.relu6(self.bn1(self.exp(x)))
        x = nn.functional.relu6(self.bn2(self.dw(x)))
        x = torch.relu(self.bn3(self.gconv(x)))
        return self.fc(x.mean((2, 3)))


def test_the_callback_narrows_depthwise_and_grouped_convs_and_reloads(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lit_models import LitClassifier, image_data, loader, trainer

    from lightning_eigendamage import EigenDamagePruning

    torch.manual_seed(0)
    model = LitClassifier(_Mixed(), lr=0.01)
    cb = EigenDamagePruning({0: 0.3, 1: 0.3}, structure="channels", verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1)
    t = trainer(max_epochs=2, callbacks=[cb, ckpt], enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(model, loader(image_data(64)))
    net = model.net
    assert net.dw.groups == net.dw.in_channels == net.dw.out_channels < 16
    assert net.gconv.groups == 4 and net.gconv.in_channels == net.dw.out_channels
    assert net.gconv.in_channels % 4 == 0 and net.gconv.out_channels % 4 == 0
    assert net.gconv.out_channels < 16 or net.gconv.in_channels < 16
    # every parameter trained, with state of its shape
    assert {id(p) for g in t.optimizers[0].param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()
    }
    for p, state in t.optimizers[0].state.items():
        assert state["momentum_buffer"].shape == p.shape
    # the checkpoint loads into a freshly built module through the loading hook alone
    from lightning_eigendamage import restore_pruned

    fresh = LitClassifier(_Mixed())
    restore_pruned(fresh, tmp_path / "last.ckpt")
    x = torch.randn(2, 3, 12, 12)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
