"""``prune(structure="auto")`` where the channel graph covers only part of the model
(:mod:`lightning_eigendamage.fallback`): the layers no traced part covers are pruned in their
eigenbasis, the rest loses channels, and the model as a whole meets the target.

Checked against independent computations: the rewritten layer equals an eigenbasis pruning of
that layer alone asked for its share of the target, the share computed from the conv's FLOPs by
hand; the whole model's FLOPs are counted again from the pruned model; a channel step that fails
leaves every module and tensor of the model as it was; the mixed model reloads exactly.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_channel_parts import ShuffleNet, _batches
from torch import nn

from lightning_eigendamage import PruneReport, prune, restore_pruned
from lightning_eigendamage.channels.engine import ChannelEngine
from lightning_eigendamage.costs import count_flops, count_layer_flops
from lightning_eigendamage.eigenbasis.layers import KFELayer
from lightning_eigendamage.engine import get_engine
from lightning_eigendamage.fallback import channels_with_eigenbasis
from lightning_eigendamage.options import PruneOptions
from lightning_eigendamage.report import TARGET_TOLERANCE, TargetNotReachedWarning

RATIO = 0.3


def _quiet_prune(model: nn.Module, batches, **kwargs) -> PruneReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune(model, batches, ratio=RATIO, target="flops", **kwargs)


def test_layer_flops_are_the_convs_multiply_adds():
    net = ShuffleNet().eval()
    x = torch.randn(2, 3, 8, 8)
    got = count_layer_flops(net, x, ["stem.0", "head", "units.0.branch.3"])
    assert got == {
        "stem.0": 2 * 3 * 8 * 9 * 8 * 8,
        "head": 2 * 8 * 10,
        "units.0.branch.3": 2 * 12 * 9 * 8 * 8,  # depthwise: one input channel per output
    }


def test_auto_prunes_the_uncovered_layer_in_its_eigenbasis_for_its_share():
    torch.manual_seed(0)
    net = ShuffleNet().eval()
    batches = _batches()
    x = batches[0][0]
    reference = copy.deepcopy(net)
    report = _quiet_prune(net, batches, structure="auto")

    # the stem (in no traced part) is rewritten, the branches lose channels
    assert isinstance(net.stem[0], KFELayer)
    assert set(report.eigenbasis_layers) == {"stem.0"}
    assert report.eigenbasis_layers["stem.0"].startswith("in a part whose channel dependencies")
    assert all(u.branch[0].out_channels < 12 for u in net.units)
    assert "stem.0" not in report.skipped and "stem.0" not in report.left_whole

    # the whole model meets the target, counted again on the pruned model
    before, after = count_flops(reference, x), count_flops(net, x)
    assert (report.flops_before, report.flops_after) == (before, after)
    assert RATIO - TARGET_TOLERANCE <= 1 - after / before <= RATIO + 0.02 and report.target_reached

    # the stem is what an eigenbasis pruning of it alone, asked for its share, gives
    share = RATIO * (2 * 3 * 8 * 9 * 8 * 8) / before
    alone = copy.deepcopy(reference)
    others = [m for name, m in alone.named_modules() if name and name not in ("stem", "stem.0")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(
            alone,
            batches,
            ratio=share,
            target="flops",
            structure="eigenbasis",
            exclude=others,
            recalibrate_bn=False,
        )
    assert isinstance(alone.stem[0], KFELayer)
    assert (alone.stem[0].rank_in, alone.stem[0].rank_out) == (net.stem[0].rank_in, net.stem[0].rank_out)
    torch.testing.assert_close(net.stem[0](x), alone.stem[0](x), rtol=1e-5, atol=1e-6)

    entry = next(r for r in report.layers if r.name == "stem.0")
    assert entry.skipped is None and entry.kept_out == net.stem[0].rank_out
    assert "rewritten in their eigenbasis" in report.summary()
    assert PruneReport.from_dict(report.to_dict()).eigenbasis_layers == report.eigenbasis_layers


def test_structure_channels_leaves_the_uncovered_layer_whole():
    torch.manual_seed(0)
    net = ShuffleNet().eval()
    report = _quiet_prune(net, _batches(), structure="channels")
    assert type(net.stem[0]) is nn.Conv2d and net.stem[0].out_channels == 8
    assert report.eigenbasis_layers == {}
    assert report.skipped["stem.0"].startswith("in a part whose channel dependencies")


def test_the_mixed_model_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    net = ShuffleNet().eval()
    batches = _batches()
    _quiet_prune(net, batches, structure="auto")
    x = batches[1][0]
    out = net(x)
    torch.save(net.state_dict(), tmp_path / "mixed.pt")
    fresh = ShuffleNet().eval()
    restore_pruned(fresh, tmp_path / "mixed.pt")
    assert isinstance(fresh.stem[0], KFELayer)
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)


def test_a_failed_channel_step_puts_the_rewritten_layers_back(monkeypatch):
    torch.manual_seed(0)
    net = ShuffleNet().eval()
    batches = _batches()
    modules = dict(net.named_modules())
    state = {k: v.clone() for k, v in net.state_dict().items()}

    def fail(*args, **kwargs):
        raise RuntimeError("surgery failed")

    monkeypatch.setattr(ChannelEngine, "apply", fail)
    engine = get_engine("channels")
    options = PruneOptions(structure="channels", target="flops")
    prepared = engine.check(net, batches[0][0], options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="surgery failed"):
            channels_with_eigenbasis(net, batches, RATIO, options, engine, prepared=prepared)
    assert dict(net.named_modules()).keys() == modules.keys()
    assert all(net.get_submodule(n) is m for n, m in modules.items() if n)
    after = net.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())

    # through prune(structure="auto"): the whole model then goes to the eigenbasis
    with pytest.warns(UserWarning, match="channels failed on this model"):
        report = prune(net, batches, ratio=RATIO, target="flops", structure="auto")
    assert report.structure == "eigenbasis" and report.eigenbasis_layers == {}


def test_a_model_whose_graph_builds_is_pruned_by_channels_alone():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = (
                nn.Conv2d(3, 8, 3, padding=1),
                nn.Conv2d(8, 8, 3, padding=1),
                nn.Linear(8, 10),
            )

        def forward(self, x):
            return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))

    torch.manual_seed(0)
    net = Plain().eval()
    report = _quiet_prune(net, _batches(), structure="auto")
    assert report.structure == "channels" and report.eigenbasis_layers == {}
    assert not any(isinstance(m, KFELayer) for m in net.modules())


@pytest.mark.parametrize("stride, mode", [(1, "zeros"), (2, "zeros"), (1, "reflect")])
def test_the_channel_form_of_a_patch_capture_is_the_channel_capture(stride, mode):
    """``channel_form`` sums the patch form's diagonal kernel blocks over ``k`` times the rows:
    the channel-form capture of the same batches, to float64 rounding."""
    from lightning_eigendamage.curvature import capture_factors, channel_form

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=stride, padding=1, padding_mode=mode),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(4),
    )
    net(torch.randn(1, 3, 7, 7))
    net = net.double()
    batches = [(torch.randn(6, 3, 7, 7, dtype=torch.float64), torch.randint(0, 4, (6,))) for _ in range(2)]
    layers = {"0": net[0], "3": net[3]}

    def capture(form: str):
        return capture_factors(
            net, layers, batches, factors_for=list(layers), a_form=form, fisher="empirical"
        )

    patch, channel = capture("patch"), capture("channel")
    assert patch.layers["0"].a_sum.shape == (27, 27)
    got = channel_form(patch, ["0", "3"], layers)
    for name in layers:
        g, w = got.layers[name], channel.layers[name]
        assert g.a_rows == w.a_rows
        torch.testing.assert_close(g.a(), w.a(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(g.g(), w.g(), rtol=1e-12, atol=1e-14)
    assert patch.layers["0"].a_sum.shape == (27, 27)  # the patch capture is not changed


def test_the_callback_under_auto_prunes_the_uncovered_layer_in_its_eigenbasis(tmp_path):
    """The same split in a callback round, from the factors captured during training: the stem
    is rewritten, its optimizer state carried over, training goes on (a second round too: it
    failed on the rewritten stem's stages), and the checkpoint reloads into a fresh module."""
    from lit_models import LitClassifier, image_data, loader, trainer

    from lightning_eigendamage import EigenDamagePruning, PruningSchedule, enable_pruned_loading

    torch.manual_seed(0)
    model = LitClassifier(ShuffleNet())
    schedule = PruningSchedule({0: RATIO, 1: RATIO}, target="flops")
    cb = EigenDamagePruning(schedule, structure="auto", verbose=False)
    t = trainer(max_epochs=3, callbacks=[cb], enable_checkpointing=True, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader(image_data(32, size=8)))
    report, again = cb.reports  # the second round prunes the rewritten stem no further
    assert again.eigenbasis_layers == {} and again.target_reached
    assert cb.structure == "channels" and set(report.eigenbasis_layers) == {"net.stem.0"}
    assert isinstance(model.net.stem[0], KFELayer)
    assert all(u.branch[0].out_channels < 12 for u in model.net.units)
    assert report.target_reached and 1 - report.flops_after / report.flops_before >= RATIO - TARGET_TOLERANCE
    carried = cb.transplants[0]["carried"]
    assert any(name.startswith("net.stem.0.") for name in carried), carried
    assert any(name.startswith("net.units.") for name in carried), carried
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    want = model(x)
    assert torch.isfinite(want).all()
    (ckpt,) = tmp_path.rglob("*.ckpt")
    fresh = LitClassifier(ShuffleNet())
    enable_pruned_loading(fresh)
    fresh.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    torch.testing.assert_close(fresh.eval()(x), want, rtol=0, atol=0)


class _Opaque(torch.autograd.Function):
    """An op Torch-Pruning cannot see through (the identity, by hand)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        return g


def _split_shuffle(y: torch.Tensor) -> torch.Tensor:
    a, b = y.chunk(2, 1)
    c = torch.cat([a, 2 * b], 1)
    n, ch, h, w = c.shape
    return c.view(n, 2, ch // 2, h, w).transpose(1, 2).reshape(n, ch, h, w)


class _Inner(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.p, self.q = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(_split_shuffle(torch.relu(self.p(x))))


class _Outer(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.pre, self.inner = nn.Conv2d(c, 2 * c, 3, padding=1), _Inner(2 * c)
        self.post = nn.Conv2d(2 * c, c, 3, padding=1)
        self.side = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.post(_Opaque.apply(self.inner(torch.relu(self.pre(x)))))
        return torch.relu(y + self.side(x))


class _Nested(nn.Module):
    """Most of the FLOPs in layers no traced part covers; few channel groups to narrow."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.o1, self.o2, self.fc = (
            nn.Conv2d(3, 16, 3, padding=1),
            _Outer(16),
            _Outer(16),
            nn.Linear(16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.o2(self.o1(torch.relu(self.stem(x)))).mean((2, 3)))


def test_what_the_channel_step_cannot_remove_the_eigenbasis_layers_take(monkeypatch):
    """The channel groups are exhausted before their part of the target: the unreachable layers
    are pruned again in their eigenbasis for what is lacking, and the model meets the target
    (counted anew); without that step it is missed."""
    import lightning_eigendamage.fallback as fallback

    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)
    ]
    x = batches[0][0]

    def run() -> tuple[nn.Module, PruneReport]:
        torch.manual_seed(0)
        net = _Nested().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return net, prune(net, batches, ratio=0.4, target="flops", structure="auto")

    dense = _Nested().eval()
    net, report = run()
    assert report.structure == "channels" and {"stem", "o1.pre", "o2.pre"} <= set(report.eigenbasis_layers)
    assert report.flops_after == count_flops(net, x) and report.flops_before == count_flops(dense, x)
    assert report.target_reached and 0.4 - TARGET_TOLERANCE <= report.reached <= 0.4 + 0.02
    monkeypatch.setattr(fallback, "_topped_up", lambda model, batches, options, names, d, report, u: report)
    with pytest.warns(TargetNotReachedWarning, match="in their eigenbasis"):
        torch.manual_seed(0)
        prune(_Nested().eval(), batches, ratio=0.4, target="flops", structure="auto")


def test_a_callback_round_reports_why_the_uncovered_layers_it_left_whole_were_left():
    """The eigenbasis step rewrites only some of the uncovered layers (its global ranking); the
    others were reported as "no capture hook saw it", their factors having been taken from the
    channel step too."""
    from lit_models import LitClassifier, image_data, loader, trainer

    from lightning_eigendamage import EigenDamagePruning, PruningSchedule

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(_split_shuffle(self.conv2(torch.relu(self.conv1(x)))) + x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.block = nn.Conv2d(3, 16, 3, padding=1), Block(16)
            self.inner = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 1))
            self.head = nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.inner(self.block(torch.relu(self.stem(x)))).mean((2, 3)))

    torch.manual_seed(0)
    model = LitClassifier(Net())
    cb = EigenDamagePruning(PruningSchedule({0: RATIO}, target="flops"), structure="auto", verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(32, size=8)))
    (report,) = cb.reports
    uncovered = {"net.stem", "net.block.conv1", "net.block.conv2"}
    assert report.eigenbasis_layers and set(report.eigenbasis_layers) < uncovered
    for name in uncovered - set(report.eigenbasis_layers):  # left whole, with the real reason
        assert report.left_whole[name].startswith("in a part whose channel dependencies"), report.left_whole


class _Audio(nn.Module):
    """Conv1d layers (most of the FLOPs) and a Linear head: only the Linear group can lose
    channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 16, 9, stride=2, padding=4)
        self.c1 = nn.Conv1d(16, 32, 5, padding=2)
        self.c2 = nn.Conv1d(32, 32, 1)
        self.fc, self.out = nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(torch.relu(self.stem(x))))))
        return self.out(torch.relu(self.fc(x.mean(-1))))


def _audio_batches() -> list:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 1, 64, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(2)
    ]


def test_conv1d_layers_go_to_the_eigenbasis_under_auto():
    """Channels are removed only from Conv2d/Linear groups: "auto" chose channels (the graph
    builds) and removed 0.5 % of a Conv1d network's FLOPs, asked for ÷2. Its Conv1d layers are now
    pruned in their eigenbasis for their share, the Linear group by channels for the rest; the
    target is met, counted again on the pruned model, and the model reloads exactly."""
    torch.manual_seed(0)
    net, batches = _Audio().eval(), _audio_batches()
    x = batches[0][0]
    before = count_flops(net, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune(net, batches, ratio=0.5, target="flops", structure="auto")
    assert report.structure == "channels"
    assert set(report.eigenbasis_layers) == {"c1", "c2"}  # the 1-channel stem: kept whole, said so
    assert "only Conv2d and Linear layers lose channels" in report.left_whole["stem"]
    assert all(
        "only Conv2d and Linear layers lose channels" in why for why in report.eigenbasis_layers.values()
    )
    assert isinstance(net.c1, KFELayer) and isinstance(net.c2, KFELayer)
    after = count_flops(net, x)
    assert (report.flops_before, report.flops_after) == (before, after)
    assert 1 - after / before >= 0.5 - TARGET_TOLERANCE and report.target_reached
    assert "channels cannot reach" in report.summary()
    fresh = restore_pruned(_Audio().eval(), net.state_dict())
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


def test_the_callback_under_auto_prunes_conv1d_layers_in_their_eigenbasis():
    """The same through a callback round, from the factors captured during training (the patch
    form of a Conv1d's ``A`` from every other time step, in the channel form for the eigenbasis):
    the Conv1d layers are rewritten, the target met, training goes on with finite weights."""
    from lit_models import LitClassifier, loader, trainer
    from torch.utils.data import TensorDataset

    from lightning_eigendamage import EigenDamagePruning, PruningSchedule

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 1, 64), torch.randint(0, 5, (32,)))
    model = LitClassifier(_Audio())
    cb = EigenDamagePruning(PruningSchedule({0: 0.5}, target="flops"), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_epochs=2, callbacks=[cb]).fit(model, loader(data, 8))
    (report,) = cb.reports
    assert cb.structure == "channels" and {"net.c1", "net.c2"} <= set(report.eigenbasis_layers)
    assert isinstance(model.net.c1, KFELayer) and report.target_reached
    assert all(torch.isfinite(p).all() for p in model.parameters())
