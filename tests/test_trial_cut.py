"""The trial cut (:func:`~lightning_eigendamage.channels.engine.wrong_groups`): a dependency group
whose removal is not what Torch-Pruning's graph says (an operation on channels it does not model)
is found before anything is scored, and left whole with the reason; the rest of the model is
pruned. Independent check: the cut model against the full model with the same channels zeroed at
their readers, and a brute-force list of which groups are misrouted."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_eigendamage.channels import engine, prune_channels, restore_channels
from lightning_eigendamage.channels.engine import channel_graph, wrong_groups


def _allow_all(module) -> None:
    return None


class _Flip(nn.Module):
    """``b`` reads ``a``'s channels reversed: the graph maps them one to one, so a cut keeps every
    shape but hands ``b`` the wrong channels (only the values show it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x)).flip(1)))
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


class _Clean(nn.Module):
    """Every kind of coupling the graph models: a residual add, a depthwise conv in an inverted
    residual, a grouped conv, a concatenation and a flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.r1, self.r2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Conv2d(16, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.side = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(12 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.r2(torch.relu(self.r1(h)))
        h = h + self.project(self.dw(self.expand(h)))
        h = torch.cat([torch.relu(self.grouped(h)), torch.relu(self.side(h))], 1)
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 2).flatten(1))


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _wrong(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    graph = channel_graph(model, x, [model.fc])
    return {k: why for k, (_, why) in wrong_groups(model, graph, [model.fc], x, _allow_all).items()}


def test_a_misrouting_that_keeps_every_shape_is_found_by_the_values():
    torch.manual_seed(0)
    net = _Flip().eval()
    wrong = _wrong(net, _x())
    assert list(wrong) == ["a"]  # b's and c's groups cut as the graph says
    assert "an output moved by" in wrong["a"]


def test_the_trial_puts_the_model_back_exactly():
    torch.manual_seed(0)
    net = _Flip().eval()
    params = {n: p for n, p in net.named_parameters()}
    state = copy.deepcopy(net.state_dict())
    hooks = {n: (dict(m._forward_pre_hooks), dict(m._state_dict_hooks)) for n, m in net.named_modules()}
    # the gradient accumulators DDP hooks into (a change of a Parameter's dtype would reset them)
    accumulators = {n: p.view_as(p).grad_fn.next_functions[0][0] for n, p in params.items()}
    _wrong(net, _x())
    assert {n: p for n, p in net.named_parameters()} == params  # the same Parameter objects
    for n, p in net.named_parameters():
        assert p.view_as(p).grad_fn.next_functions[0][0] is accumulators[n], n
    for k, v in net.state_dict().items():
        assert v.shape == state[k].shape and torch.equal(v, state[k])
    after = {n: (dict(m._forward_pre_hooks), dict(m._state_dict_hooks)) for n, m in net.named_modules()}
    assert after == hooks


def test_no_group_of_a_model_the_graph_maps_right_is_flagged():
    torch.manual_seed(0)
    net = _Clean().eval()
    assert _wrong(net, _x()) == {}


def test_the_cut_model_equals_the_masked_model_where_the_graph_is_right():
    # what the trial relies on, checked on every group of the clean model, one at a time
    torch.manual_seed(0)
    net = _Clean().eval()
    x = _x()
    graph = channel_graph(net, x, [net.fc])
    names = {m: n for n, m in net.named_modules()}
    groups = engine._all_groups(graph, [net.fc])
    assert len(groups) >= 4
    tried = 0
    for group in groups:
        root = group[0].dep.target.module
        units = engine._units(group, graph) or [[c] for c in range(len(group[0].idxs))]
        if isinstance(units, str):  # left whole in any case (why not: the string)
            continue
        tried += 1
        assert engine._trial(net, graph, [(names[root], group, units[0])], x) is None, names[root]
    assert tried >= 3


@pytest.mark.parametrize("shuffled", [("u1",), ("u0", "u2")])
def test_the_halving_finds_exactly_the_misrouted_groups(shuffled, monkeypatch):
    class Unit(nn.Module):
        def __init__(self, flip: bool) -> None:
            super().__init__()
            self.a, self.b, self.flip = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), flip

        def forward(self, x):
            h = torch.relu(self.a(x))
            return x + self.b(h.flip(1) if self.flip else h)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.u0, self.u1, self.u2, self.u3 = (Unit(f"u{i}" in shuffled) for i in range(4))
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.u3(self.u2(self.u1(self.u0(self.stem(x))))).mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    calls = []
    trial = engine._trial
    monkeypatch.setattr(engine, "_trial", lambda *a: calls.append(1) or trial(*a))
    wrong = _wrong(net, _x())
    assert sorted(wrong) == sorted(f"{u}.a" for u in shuffled)
    assert len(calls) <= 1 + 2 * len(shuffled) * 3  # 5 groups: 2·k·⌈log₂ 5⌉ halvings at most


def test_pruning_leaves_the_misrouted_group_whole_and_cuts_the_rest():
    torch.manual_seed(0)
    net = _Flip().eval()
    x = _x(16)
    report = prune_channels(net, [(x, torch.randint(0, 5, (16,)))], ratio=0.3)
    assert report.skipped["group of a"].startswith("left whole: cutting one of its channels changes")
    assert net.a.out_channels == 8 and net.b.in_channels == 8
    assert net.b.out_channels < 6 or net.c.out_channels < 6
    assert torch.isfinite(net(x)).all()


class _Dense(nn.Module):
    """Two DenseNet layers: each concatenates its input with a new conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.n1, self.c1 = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1)
        self.n2, self.c2 = nn.BatchNorm2d(10), nn.Conv2d(10, 4, 3, padding=1)
        self.n3 = nn.BatchNorm2d(14)
        self.fc = nn.Linear(14, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.cat([h, self.c1(torch.relu(self.n1(h)))], 1)
        h = torch.cat([h, self.c2(torch.relu(self.n2(h)))], 1)
        return self.fc(torch.relu(self.n3(h)).mean((2, 3)))


@pytest.mark.parametrize("make", [_Dense, _Clean])
def test_the_trial_changes_nothing_where_the_graph_is_right(make, monkeypatch):
    # the trial cuts every group, concatenations included (Torch-Pruning keeps their sizes in
    # the graph), then puts the model back: pruning must give what it gives without the trial
    torch.manual_seed(0)
    net = make().eval()
    x = _x(16)
    batches = [(x, torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(1)))]
    plain = copy.deepcopy(net)
    prune_channels(net, batches, ratio=0.3)
    monkeypatch.setattr(engine, "wrong_groups", lambda *a, **k: {})
    prune_channels(plain, batches, ratio=0.3)
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    for k, v in net.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k]), k
    assert torch.equal(net(x), plain(x))


def test_a_concatenation_is_cut_right_after_the_trial():
    torch.manual_seed(0)
    net = _Dense().eval()
    x = _x(16)
    assert _wrong(net, x) == {}
    report = prune_channels(net, [(x, torch.randint(0, 5, (16,)))], ratio=0.3)
    widths = (net.stem.out_channels, net.c1.out_channels, net.c2.out_channels)
    assert sum(widths) < 14 and report.channels_removed == 14 - sum(widths)
    assert (net.n2.num_features, net.c2.in_channels) == (widths[0] + widths[1],) * 2
    assert (net.n3.num_features, net.fc.in_features) == (sum(widths),) * 2
    assert torch.isfinite(net(x)).all()


class _Gated(nn.Module):
    """A gated conv: ``b`` reads ``u * σ(v)``, ``u`` and ``v`` the two halves of ``a``'s output,
    so ``a``'s channels ``i`` and ``i + 8`` can only go together."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.a(x).chunk(2, 1)
        return self.fc(torch.relu(self.b(u * torch.sigmoid(v))).mean((2, 3)))


def test_channels_a_gate_ties_go_together():
    torch.manual_seed(0)
    net = _Gated().eval()
    x = _x(16)
    graph = channel_graph(net, x, [net.fc])
    group = next(g for g in engine._all_groups(graph, [net.fc]) if g[0].dep.target.module is net.a)
    assert engine._units(group, graph) == [[i, i + 8] for i in range(8)]
    with torch.no_grad():  # two gated channels that b never reads: removing them changes nothing
        net.b.weight[:, [1, 5]] = 0
    before = net(x)
    report = prune_channels(
        net, [(x, torch.randint(0, 5, (16,)))], ratio=4 / 24, recalibrate_bn=False, greedy_steps=None
    )
    entry = next(g for g in report.groups if g["root"] == "a")
    assert sorted(entry["removed"]) == [1, 5, 9, 13]  # the two dead pairs, nothing else
    assert (net.a.out_channels, net.b.in_channels) == (12, 6)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
    fresh = _Gated().eval()  # a checkpoint narrows a fresh model by whole pairs too
    restore_channels(fresh, net.state_dict(), x)
    assert torch.equal(fresh(x), net(x))


class _FlipEverywhere(nn.Module):
    """Every group's channels are read reversed: channels can remove none of them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x)).flip(1))).flip(1)
        return self.fc(h.mean((2, 3)))


def test_auto_prunes_the_eigenbasis_where_channels_can_change_no_group():
    from lightning_eigendamage import PruneOptions, PruningWarning, prune
    from lightning_eigendamage.engine import prepare

    torch.manual_seed(0)
    net = _FlipEverywhere().eval()
    x = _x(16)
    _, reason = prepare("channels", net, x, PruneOptions(structure="channels"))
    assert reason.startswith("no dependency group of this model can change width: 2× group left whole")
    with pytest.warns(PruningWarning, match="prunes the eigenbasis: .*no dependency group"):
        report = prune(net, [(x, torch.randint(0, 5, (16,)))], ratio=0.3, structure="auto")
    assert report.structure == "eigenbasis" and "can change width" in report.structure_reason
    assert report.target_reached and torch.isfinite(net(x)).all()
    with pytest.raises(RuntimeError, match="no dependency group"):  # asked for channels: an error
        prune_channels(_FlipEverywhere().eval(), [(x, torch.randint(0, 5, (16,)))], ratio=0.3)


def test_the_callback_prunes_a_gated_model_with_channels_and_a_misrouted_one_in_its_eigenbasis(caplog):
    import logging
    import warnings

    from lit_models import LitClassifier, image_data, loader, trainer

    from lightning_eigendamage import EigenDamagePruning

    class Gated10(_Gated):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 10)

    class Flip10(_FlipEverywhere):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 10)

    for make, structure in ((Gated10, "channels"), (Flip10, "eigenbasis")):
        torch.manual_seed(0)
        model = LitClassifier(make())
        cb = EigenDamagePruning({0: 0.3}, structure="auto", verbose=False)
        with caplog.at_level(logging.INFO), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(32, size=8)))
        assert cb.structure == structure and cb.reports[0].structure == structure
        assert torch.isfinite(model.net(torch.randn(2, 3, 8, 8))).all()
        if structure == "channels":  # the gate's halves lose channels in pairs
            assert (
                cb.reports[0].channels_removed > 0 and model.net.a.out_channels == 2 * model.net.b.in_channels
            )
    assert model.net.a.out_channels == 8  # the eigenbasis keeps widths
    assert (
        "structure='auto' prunes eigenbasis (channels are not possible here: no dependency group"
        in caplog.text
    )
    with pytest.raises(
        RuntimeError, match="structure='channels'.* cannot prune this model: no dependency group"
    ):
        cb = EigenDamagePruning({0: 0.3}, structure="channels", verbose=False)
        trainer(max_epochs=1, callbacks=[cb]).fit(LitClassifier(Flip10()), loader(image_data(32, size=8)))


def test_auto_falls_back_to_the_eigenbasis_where_the_channel_cut_fails(monkeypatch):
    from lightning_eigendamage import PruningWarning, prune
    from lightning_eigendamage.channels.engine import ChannelEngine

    def fails(self, model, *args, **kwargs):
        raise RuntimeError("the narrowed model fails on the example inputs (a test)")

    monkeypatch.setattr(ChannelEngine, "apply", fails)
    torch.manual_seed(0)
    net = _Clean().eval()
    x = _x(16)
    batches = [(x, torch.randint(0, 5, (16,)))]
    widths = {n: tuple(p.shape) for n, p in net.named_parameters()}
    with pytest.raises(RuntimeError, match="a test"):  # asked for channels: the error
        prune(net, batches, ratio=0.3, structure="channels")
    assert {n: tuple(p.shape) for n, p in net.named_parameters()} == widths
    with pytest.warns(PruningWarning, match="prunes the eigenbasis: channels failed on this model .*a test"):
        report = prune(net, batches, ratio=0.3, structure="auto")
    assert (
        report.structure == "eigenbasis"
        and "they failed: the narrowed model fails" in report.structure_reason
    )
    assert report.target_reached and torch.isfinite(net(x)).all()


def test_under_ddp_every_rank_checks_rank_0s_input(monkeypatch):
    # the check runs the model (the trial cut), so its outcome may depend on the data: every
    # rank checks the input rank 0 broadcasts, and all decide alike
    from lit_models import LitClassifier

    from lightning_eigendamage import EigenDamagePruning
    from lightning_eigendamage.lightning import callback as callback_module

    class Clean10(_Clean):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12 * 2 * 2, 10)

    rank0 = torch.randn(3, 3, 8, 8)
    seen, broadcast = [], []
    real = callback_module.prepare
    monkeypatch.setattr(callback_module, "_is_distributed", lambda trainer: True)
    monkeypatch.setattr(
        callback_module, "rank_zero_input", lambda obj, device: broadcast.append(obj) or rank0
    )
    monkeypatch.setattr(
        callback_module,
        "prepare",
        lambda name, m, example, o: seen.append(example) or real(name, m, example, o),
    )
    model = LitClassifier(Clean10())
    model._trainer = object()  # (read only by the patched _is_distributed)
    cb = EigenDamagePruning({0: 0.3}, structure="auto", verbose=False)
    local = torch.randn(16, 3, 8, 8)
    cb._decide_structure(model, (local, torch.zeros(16, dtype=torch.long)))
    assert len(broadcast) == 1 and torch.equal(broadcast[0], local)  # this rank offered its own
    assert len(seen) == 1 and torch.equal(seen[0], rank0)  # and checked rank 0's
    assert cb.structure == "channels"


class _Shared(nn.Module):
    """One conv applied twice (shared weights): its channels cannot change, and it ties every
    group of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.block(torch.relu(self.block(torch.relu(self.stem(x))))))
        return self.fc(h.mean((2, 3)))


def test_a_layer_called_twice_is_known_at_the_check_so_auto_prunes_the_eigenbasis():
    from lightning_eigendamage import PruningWarning, prune

    torch.manual_seed(0)
    x = _x(16)
    batches = [(x, torch.randint(0, 5, (16,)))]
    with pytest.raises(
        RuntimeError, match=r"can change width: 1× .*not scored \(called 2 times per forward pass\)"
    ):
        prune_channels(_Shared().eval(), batches, ratio=0.3)
    net = _Shared().eval()
    with pytest.warns(PruningWarning, match="prunes the eigenbasis"):
        report = prune(net, batches, ratio=0.3, structure="auto", target="flops")
    assert report.structure == "eigenbasis" and report.reached > 0 and torch.isfinite(net(x)).all()
