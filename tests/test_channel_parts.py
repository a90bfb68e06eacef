"""Channels part by part where Torch-Pruning cannot build the whole model's graph
(:mod:`lightning_eigendamage.channels.parts`).

Checked against independent computations: on a model whose whole graph *does* build, the parts'
groups are the whole graph's groups that stay inside one part, and pruning the same channels
through either graph gives the same model to the last bit; a group that would narrow a residual
add of a part's input is never offered; a ShuffleNet-V2-style model (channel shuffle: the whole
graph fails) is pruned inside its branches, keeps its output shapes, reloads exactly from a plain
state_dict, and names what it left whole.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_eigendamage import prune_channels, restore_channels
from lightning_eigendamage.channels import engine as channels_mod
from lightning_eigendamage.channels.parts import PartsGraph, UntraceableError, input_readers, split_graph


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class Unit(nn.Module):
    """A ShuffleNet-V2 unit: half the channels pass, the other half go through a branch
    (1×1, depthwise 3×3, 1×1), then the halves are concatenated and shuffled."""

    def __init__(self, c: int, m: int, shuffle: bool = True) -> None:
        super().__init__()
        h = c // 2
        self.shuffle = shuffle
        self.branch = nn.Sequential(
            nn.Conv2d(h, m, 1, bias=False),
            nn.BatchNorm2d(m),
            nn.ReLU(),
            nn.Conv2d(m, m, 3, padding=1, groups=m, bias=False),
            nn.BatchNorm2d(m),
            nn.Conv2d(m, h, 1, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        out = torch.cat([a, self.branch(b)], 1)
        return _shuffle(out, 2) if self.shuffle else out


class ShuffleNet(nn.Module):
    def __init__(self, shuffle: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.units = nn.Sequential(Unit(8, 12, shuffle), Unit(8, 12, shuffle))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(self.stem(x)).mean((2, 3)))


class Residual(nn.Module):
    """``c(x + b(a(x)))``: the add ties ``b``'s outputs to the part's input ``x``."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.c = (
            nn.Conv2d(c, c, 3, padding=1),
            nn.Conv2d(c, c, 3, padding=1),
            nn.Conv2d(c, c, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x + self.b(torch.relu(self.a(x))))


class WithResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.res = Residual()
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.res(torch.relu(self.stem(x)))).mean((2, 3)))


def _batches(n: int = 2, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 3, size, size, generator=g), torch.randint(0, 10, (16,), generator=g))
        for _ in range(n)
    ]


def _parts(model: nn.Module, x: torch.Tensor) -> PartsGraph:
    """The parts' graph of ``model``, as if its whole graph had failed."""
    return split_graph(
        model,
        (x,),
        {},
        UntraceableError("forced"),
        build=channels_mod.dependency_graph,
        outputs=lambda m, a: channels_mod._output_layers(m, a, lambda mm, z: mm(*z)),
        untouched=channels_mod._untouched,
    )


def _members(group, model: nn.Module) -> frozenset:
    """The model's modules in ``group`` (not Torch-Pruning's stand-ins for cat, split…), each
    with its side, and the channels they lose with the root's first two."""
    own = {id(m) for m in model.modules()}
    return frozenset(
        (id(it.dep.target.module), it.dep.handler.__name__) for it in group if id(it.dep.target.module) in own
    )


def test_the_whole_graph_of_the_shuffle_model_fails():
    with pytest.raises(UntraceableError):
        channels_mod.dependency_graph(ShuffleNet().eval(), torch.randn(2, 3, 8, 8))


def test_parts_groups_are_the_whole_graphs_groups_inside_one_part():
    torch.manual_seed(0)
    net = ShuffleNet(shuffle=False).eval()  # traceable whole: the reference
    x = torch.randn(2, 3, 8, 8)
    whole = channels_mod.dependency_graph(net, x, channels_mod._output_layers(net, x, channels_mod._forward))
    ignored = channels_mod._output_layers(net, x, channels_mod._forward)
    roots = (nn.Conv2d, nn.Linear)
    reference = {
        _members(g, net) for g in whole.get_all_groups(ignored_layers=ignored, root_module_types=roots)
    }
    parts = _parts(net, x)
    # stem and head hold one layer each: traced together as the model's own layers, with the
    # units' output cut off (the stem's output then reaches nothing)
    assert [p.name for p in parts.parts] == ["units", "the model (its own layers)"]
    found = {_members(g, net) for g in parts.get_all_groups(ignored_layers=ignored, root_module_types=roots)}
    part_layers = {id(m) for p in parts.parts for m in p.layers}
    inside = {g for g in reference if all(i in part_layers for i, _ in g)}
    # the first conv → depthwise → last conv stream of each branch; not the stream that leaves
    # the part (the branches' outputs are concatenated into the units' output)
    assert found == inside and len(found) == 2


def test_pruning_through_the_parts_equals_pruning_through_the_whole_graph():
    torch.manual_seed(0)
    net = ShuffleNet(shuffle=False).eval()
    batches = _batches()
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    ra = prune_channels(a, batches, ratio=0.25, target="channels", exclude=["stem", "head"])
    forced = _parts(b, batches[0][0])
    real = channels_mod.channel_graph
    try:
        channels_mod.channel_graph = lambda m, e, ignored=(): forced  # the parts' graph instead
        rb = prune_channels(b, batches, ratio=0.25, target="channels", exclude=["stem", "head"])
    finally:
        channels_mod.channel_graph = real
    assert ra.groups == rb.groups and ra.channels_removed > 0
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_a_residual_add_of_the_part_input_is_never_narrowed():
    torch.manual_seed(0)
    net = WithResidual().eval()
    x = torch.randn(2, 3, 8, 8)
    parts = _parts(net, x)
    part = next(p for p in parts.parts if p.name == "res")
    # a and c read the part's input x (c through the add), b does not
    assert part.readers == {net.res.a, net.res.c}
    assert input_readers(net.res, (torch.randn(2, 8, 8, 8),)) == part.readers
    groups = list(parts.get_all_groups(ignored_layers=[], root_module_types=(nn.Conv2d, nn.Linear)))
    roots = {g[0].dep.target.module for g in groups}
    # Torch-Pruning offers b's outputs (with c's inputs), which would break x + b(…): refused
    assert net.res.b not in roots and roots == {net.res.a}
    before = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forced, real = parts, channels_mod.channel_graph
        channels_mod.channel_graph = lambda m, e, ignored=(): forced
        try:
            prune_channels(net, [(x, torch.zeros(2, dtype=torch.long))], ratio=0.5, target="channels")
        finally:
            channels_mod.channel_graph = real
    assert net.res.b.out_channels == 8 and net.res.a.out_channels < 8
    assert net(x).shape == before.shape


def test_a_shuffle_model_is_pruned_inside_its_branches_and_reloads(tmp_path):
    torch.manual_seed(0)
    net = ShuffleNet().eval()
    batches = _batches()
    x = batches[0][0]
    report = prune_channels(net, batches, ratio=0.3, target="flops")
    assert report.target_reached and report.reached >= 0.3 - 1e-3
    for unit in net.units:
        assert unit.branch[0].out_channels < 12 and unit.branch[3].in_channels == unit.branch[0].out_channels
        assert unit.branch[5].out_channels == 4  # the branch's output is the unit's
    assert net.stem[0].out_channels == 8 and net.head.in_features == 8
    # the layers outside the parts are named, under one reason
    assert "stem.0" in report.skipped and "head" not in report.skipped  # head: the model's output
    assert report.skipped["stem.0"].startswith(
        "in a part whose channel dependencies Torch-Pruning cannot build;"
    )
    assert "1 reason" in report.summary() or "in a part whose channel dependencies" in report.summary()
    out = net(x)
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    torch.save(net.state_dict(), tmp_path / "pruned.pt")
    fresh = ShuffleNet().eval()
    restore_channels(fresh, tmp_path / "pruned.pt", x)
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)


def test_a_group_the_graph_maps_wrongly_is_left_whole_and_the_rest_pruned():
    class Flat(nn.Module):  # the graph builds, but maps a's 16 channels onto b's 4 inputs
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 16, 1), nn.Conv2d(4, 8, 1), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.b(torch.pixel_shuffle(torch.relu(self.a(x)), 2)).mean((2, 3)))

    net = Flat().eval()
    report = prune_channels(net, _batches(1), ratio=0.2)  # was an error: nothing pruned
    assert "index mapping through this model's reshapes is broken" in report.skipped["group of a"]
    assert (net.a.out_channels, net.b.in_channels) == (16, 4) and net.b.out_channels < 8
    assert net(_batches(1)[0][0]).shape == (16, 10)


def test_the_callback_prunes_a_shuffle_model_by_parts_under_auto(caplog) -> None:
    import logging

    from lit_models import LitClassifier, image_data, loader, trainer

    from lightning_eigendamage import EigenDamagePruning

    torch.manual_seed(0)
    model = LitClassifier(ShuffleNet())
    cb = EigenDamagePruning({0: 0.3}, structure="auto", verbose=False)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(32, size=8)))
    report = cb.reports[0]
    assert cb.structure == "channels" and report.structure == "channels"
    assert report.structure_reason.startswith(
        "the channel dependency graph of this model was built part by part"
    )
    assert "structure='auto' prunes channels (the channel dependency graph of this model was built part" in (
        caplog.text
    )
    assert report.channels_removed > 0
    assert all(u.branch[0].out_channels < 12 for u in model.net.units)
    assert model.net(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_a_failing_class_is_split_at_once_but_a_failing_container_is_not_remembered():
    """A module whose own forward fails (all its children trace) marks its class: its other
    instances are split without a trace. A Sequential that fails as a whole (its children's
    interplay) does not mark nn.Sequential."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(Unit(8, 12, shuffle=False), Unit(8, 12, shuffle=False)),  # fails whole (forced)
        nn.Sequential(Unit(8, 12, shuffle=False), Unit(8, 12, shuffle=False)),  # must be traced whole
        Residual(8),  # fails (forced): its class is remembered
        nn.Sequential(Residual(8), nn.Conv2d(8, 8, 1)),  # holds a Residual: split without a trace
    ).eval()
    first_stage, res = net[0], net[2]
    tried: list[nn.Module] = []

    def build(call: nn.Module, args: tuple, ignored: list) -> object:
        tried.append(call.part)
        if call.part in (first_stage, res):
            raise UntraceableError("forced")
        return channels_mod.dependency_graph(call, args, ignored)

    parts = split_graph(
        net,
        (torch.randn(2, 8, 6, 6),),
        {},
        UntraceableError("forced"),
        build=build,
        outputs=lambda m, a: channels_mod._output_layers(m, a, lambda mm, z: mm(*z)),
        untouched=channels_mod._untouched,
    )
    names = [p.name for p in parts.parts]
    assert names == ["0.0", "0.1", "1"]  # the second stage traced whole although the first failed
    assert net[3] not in tried and net[3][0] not in tried  # a Residual inside: no failed trace
    assert parts.untraced["2"] == "forced" and parts.untraced["3.0"] == "forced"


class DepthwiseFirst(nn.Module):
    """The part's input is read by a depthwise conv: its output channels are its input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.dw, self.bn, self.pw = (
            nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.bn(self.dw(x)))


class Tailed(nn.Module):
    """ShuffleNet's shape: units that cannot be traced together with the model, then a conv and
    the classifier of the model's own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.units = nn.Sequential(Unit(8, 12), Unit(8, 12))
        self.dwf = DepthwiseFirst()
        self.tail = nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tail(self.dwf(self.units(self.stem(x)))).mean((2, 3)))


def test_the_models_own_layers_are_a_part_and_a_depthwise_reader_keeps_its_width(tmp_path):
    torch.manual_seed(0)
    net = Tailed().eval()
    batches = _batches()
    x = batches[0][0]
    parts = _parts(net, x)
    own = next(p for p in parts.parts if p.name == "the model (its own layers)")
    assert own.readers == {net.stem[0], net.tail[0]} and own.outputs == [net.head]
    dwp = next(p for p in parts.parts if p.name == "dwf")
    assert dwp.readers == {net.dwf.dw}
    roots = {
        g[0].dep.target.module for g in parts.get_all_groups([], root_module_types=(nn.Conv2d, nn.Linear))
    }
    assert net.tail[0] in roots  # the tail conv's outputs, read by the classifier
    assert net.dwf.dw not in roots  # its channels are the part's input
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_channels(net, batches, ratio=0.5, target="channels")
    assert net.tail[0].out_channels < 32 and net.head.in_features == net.tail[0].out_channels
    assert net.dwf.dw.out_channels == 8
    out = net(x)
    assert out.shape == (16, 10)
    torch.save(net.state_dict(), tmp_path / "t.pt")
    fresh = Tailed().eval()
    restore_channels(fresh, tmp_path / "t.pt", x)
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)
