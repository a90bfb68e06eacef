"""prune_channels: real channel removal scored and compensated with K-FAC on the layers that read
each channel (lightning_eigendamage/channels/engine.py), against independent computations."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from models import ResBlock, TinyResNet, tiny_maxvit, tiny_swin
from torch import nn

from lightning_eigendamage.channels import engine as channels_mod
from lightning_eigendamage.channels.baselines import damped_inverse, input_obs_scores, input_obs_update
from lightning_eigendamage.channels.engine import prune_channels, restore_channels
from lightning_eigendamage.costs import count_flops
from lightning_eigendamage.curvature import capture_factors

torch.set_num_threads(min(2, torch.get_num_threads()))


def _net(heads: int = 1) -> TinyResNet:
    torch.manual_seed(0)
    net = TinyResNet(heads=heads)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.train()
    net(torch.randn(64, 3, 8, 8))  # running statistics that fit the inputs
    return net.eval()


def _batches(n_batches: int = 3, n: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen))
        for _ in range(n_batches)
    ]


def test_flops_target_is_met_and_every_layer_stays_a_plain_narrower_layer():
    net, batches = _net(), _batches()
    x = batches[0][0]
    before = count_flops(net, x)
    report = prune_channels(net, batches, ratio=0.5, target="flops")
    assert report.flops_before == before and report.flops_after == count_flops(net, x)
    assert 0.47 <= report.flops_fraction_removed <= 0.56
    assert report.method == "kron-obs-in" and report.channels_removed > 0
    kinds = {type(m) for m in net.modules()}
    assert kinds <= {TinyResNet, ResBlock, nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.Sequential}
    assert net.fc.out_features == 5 and net(x).shape == (16, 5) and not net.training
    # the residual channels go together: the stem, l1.c2 and the l1 input of l2 keep one width
    assert net.stem.out_channels == net.l1.c2.out_channels == net.l1.c1.in_channels == net.bn.num_features


def test_readers_absorb_the_removed_channels_by_least_squares():
    """An MLP whose hidden activations span 5 of 10 dimensions: removing 5 hidden channels with the
    compensation keeps the function (damping ~0), removing them without it does not."""
    torch.manual_seed(0)
    # the hidden activations are affine in the 4 inputs
    net = nn.Sequential(nn.Linear(4, 10), nn.Identity(), nn.Linear(10, 3)).eval()
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(64, 4, generator=gen), torch.randint(0, 3, (64,), generator=gen)) for _ in range(2)
    ]
    x = batches[0][0]
    with torch.no_grad():
        dense = net(x)
    pruned = copy.deepcopy(net)
    report = prune_channels(pruned, batches, ratio=0.5, damping=1e-10)
    assert report.channels_removed == 5 and pruned[0].out_features == 5 and pruned[2].in_features == 5
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), dense, rtol=1e-5, atol=1e-5)
        kept = [i for i in range(10) if i not in report.groups[0]["removed"]]
        naive = F.linear(
            F.linear(x, net[0].weight[kept], net[0].bias[kept]), net[2].weight[:, kept], net[2].bias
        )
    assert (naive - dense).abs().max() > 1e-2


def test_scores_and_update_are_the_input_side_kron_obs_of_each_reader():
    net, batches = _net(), _batches()
    ref = copy.deepcopy(net)
    w0 = ref.l1.c2.weight.detach().double().reshape(8, -1)
    report = prune_channels(net, batches, ratio=0.3)
    removed = next(g["removed"] for g in report.groups if g["root"] == "l1.c1")
    assert removed, "the test needs l1's inner group to lose channels"
    layers = {"l1.c2": ref.l1.c2}
    gen = torch.Generator().manual_seed(0)
    lf = capture_factors(ref, layers, batches, factors_for=list(layers), a_form="patch", generator=gen)
    a_inv = damped_inverse(lf.layers["l1.c2"].a(), 1e-3)
    assert input_obs_scores(w0, a_inv, lf.layers["l1.c2"].g(), 9).shape == (8,)
    want = w0 + input_obs_update(w0, a_inv, removed, 9)
    kept_cols = [j for j in range(72) if j // 9 not in removed]
    rows = [i for i in range(8) if i not in next(g["removed"] for g in report.groups if g["root"] == "stem")]
    got = net.l1.c2.weight.detach().double().reshape(net.l1.c2.out_channels, -1)
    torch.testing.assert_close(got, want[rows][:, kept_cols], rtol=1e-5, atol=1e-6)


def _input_mean(net: nn.Module, bn: nn.Module, batches) -> torch.Tensor:
    seen = []
    hook = bn.register_forward_pre_hook(lambda m, i: seen.append(i[0].mean((0, 2, 3))))
    with torch.no_grad():
        for b in batches:
            net(b[0])
    hook.remove()
    return torch.stack(seen).mean(0)


def test_batchnorm_downstream_of_compensated_layers_is_re_estimated():
    batches = _batches()
    ref = _net()
    report = prune_channels(net := _net(), batches, ratio=0.3)
    off = _net()
    prune_channels(off, batches, ratio=0.3, recalibrate_bn=False)
    # l1.b2 follows l1.c2, which read the removed channels of l1.c1: its statistics fit it again
    err_on = (net.l1.b2.running_mean - _input_mean(net, net.l1.b2, batches)).abs().max()
    err_off = (off.l1.b2.running_mean - _input_mean(off, off.l1.b2, batches)).abs().max()
    assert err_on < 2e-3 and err_off > 10 * err_on
    # the stem's BatchNorm is upstream of every compensated layer: its kept statistics stay
    kept = [i for i in range(8) if i not in next(g["removed"] for g in report.groups if g["root"] == "stem")]
    torch.testing.assert_close(net.bn.running_mean, ref.bn.running_mean[kept], rtol=0, atol=0)
    torch.testing.assert_close(net.bn.running_var, ref.bn.running_var[kept], rtol=0, atol=0)


def test_every_output_width_is_kept_and_excluded_layers_keep_theirs():
    net, batches = _net(heads=2), _batches()
    out, extra = net(batches[0][0])
    report = prune_channels(net, batches, ratio=0.5, exclude=["l1.c1"], forward_fn=lambda m, b: m(b[0])[0])
    assert report.channels_removed > 0
    new_out, new_extra = net(batches[0][0])
    assert new_out.shape == out.shape and new_extra["aux"].shape == extra["aux"].shape
    assert (net.l1.c1.in_channels, net.l1.c1.out_channels) == (net.stem.out_channels, 8)
    assert any("l1.c1" in why for why in report.skipped.values())

    class Features(nn.Module):  # returns a conv's channels too, which a classifier also reads
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1)
            self.b = nn.Conv2d(6, 7, 3, padding=1)
            self.fc = nn.Linear(7, 5)

        def forward(self, x):
            h = self.b(torch.relu(self.a(x)))
            return self.fc(torch.relu(h).mean((2, 3))), h

    torch.manual_seed(0)
    feat = Features().eval()
    prune_channels(feat, batches, ratio=0.5, forward_fn=lambda m, b: m(b[0])[0])
    assert feat.b.out_channels == 7 and feat.fc.in_features == 7 and feat.a.out_channels < 6
    assert feat(batches[0][0])[1].shape == (16, 7, 8, 8)


def test_groups_with_unscored_parameters_are_left_whole():
    class WithNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.norm = nn.LayerNorm(8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 3)

        def forward(self, x):
            return self.c(torch.relu(self.b(self.norm(self.a(x)))))

    torch.manual_seed(0)
    net = WithNorm().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen))]
    report = prune_channels(net, batches, ratio=0.4)
    assert net.a.out_features == 8 and net.norm.normalized_shape == (8,)
    assert net.b.out_features < 8 and net.c.in_features == net.b.out_features
    assert any("LayerNorm" in why for why in report.skipped.values())


def test_a_failure_leaves_the_model_as_it_was(monkeypatch):
    net, batches = _net(), _batches()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    widths = [(m.in_channels, m.out_channels) for m in net.modules() if isinstance(m, nn.Conv2d)]

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(channels_mod, "recalibrate_batchnorm", boom)
    params = {n: p for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    calls = []
    handle = net.stem.register_forward_hook(lambda m, i, o: calls.append(1))
    net.last = net.stem(batches[0][0])  # an activation kept as an attribute (not a graph leaf)
    with pytest.raises(RuntimeError, match="interrupted"):
        prune_channels(net, batches, ratio=0.5)
    assert [(m.in_channels, m.out_channels) for m in net.modules() if isinstance(m, nn.Conv2d)] == widths
    after = net.state_dict()
    assert set(after) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    # the same Parameter objects: an optimizer built before still trains the model
    assert all(p is params[n] for n, p in net.named_parameters())
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], net.parameters()))
    handle.remove()  # the model's own hook dicts: the handle still removes its hook
    calls.clear()
    assert net(batches[0][0]).shape == (16, 5)
    assert not calls


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(ratio=1.0), "ratio"),
        (dict(ratio=0.5, target="params"), "target"),
        (dict(ratio=0.5, layer_cap=0.0), "layer_cap"),
        (dict(ratio=0.5, min_channels=0), "min_channels"),
        (dict(ratio=0.5, rank_by="flops"), "rank_by"),
        (dict(ratio=0.5, damping=0.0), "damping"),
        (dict(ratio=0.5, max_factor_dim=0), "max_factor_dim"),
        (dict(ratio=0.5, damping=float("inf")), "damping"),
        (dict(ratio=0.5, max_batches=0), "max_batches"),
        (dict(ratio=0.5, max_batches=1.5), "max_batches"),
        (dict(ratio=0.5, rank_by=[]), "rank_by"),
        (dict(ratio=0.5, greedy_steps=0), "greedy_steps"),
        (dict(ratio=0.5, greedy_steps=2.5), "greedy_steps"),
        (dict(ratio=0.5, greedy_steps="8"), "greedy_steps"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    net = _net()
    with pytest.raises(ValueError, match=match):
        prune_channels(net, _batches(), **kwargs)


def test_type_errors_name_the_problem():
    net, batches = _net(), _batches()
    with pytest.raises(TypeError, match="recalibrate_bn"):
        prune_channels(net, batches, ratio=0.5, recalibrate_bn="no")
    with pytest.raises(TypeError, match="seed"):
        prune_channels(net, batches, ratio=0.5, seed="x")
    with pytest.raises(TypeError, match="single Tensor"):
        prune_channels(net, batches[0][0], ratio=0.5)


def test_empty_batches_and_nothing_prunable_are_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        prune_channels(_net(), [], ratio=0.5)
    net = _net()
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(RuntimeError, match="no dependency group .* can change width: 4× .* excluded by user"):
        prune_channels(net, _batches(), ratio=0.5, exclude=[nn.Conv2d, nn.Linear])
    for k, v in net.state_dict().items():  # found before anything was captured or changed
        assert torch.equal(v, state[k])


def test_a_layer_run_twice_is_not_scored_and_its_groups_stay_whole():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.shared = nn.Linear(8, 8)
            self.c = nn.Linear(8, 8)
            self.e = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.shared(torch.relu(self.shared(torch.relu(self.a(x))))))
            return self.e(torch.relu(self.c(h)))

    torch.manual_seed(0)
    net = Twice().eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen))]
    report = prune_channels(net, batches, ratio=0.3)
    assert report.skipped["shared"] == "called 2 times per forward pass"
    assert (net.a.out_features, net.shared.in_features, net.shared.out_features) == (8, 8, 8)
    assert net.c.out_features < 8  # the group after it is free


def test_layers_with_too_wide_factors_are_not_scored_before_any_capture(monkeypatch):
    net, batches = _net(), _batches()
    seen = []
    real = channels_mod.capture_factors

    def spy(model, layers, *args, **kwargs):
        seen.append(set(layers))
        return real(model, layers, *args, **kwargs)

    monkeypatch.setattr(channels_mod, "capture_factors", spy)
    # l1.c2 and l2.c1 read 8 channels through 3×3 kernels: 72-wide patch factors; l2.c2: 108
    report = prune_channels(net, batches, ratio=0.3, max_factor_dim=80)
    assert seen and not seen[0] & {"l2.c2"} and "l1.c2" in seen[0]
    assert "max_factor_dim=80" in report.skipped["l2.c2"]
    assert net.l2.c2.in_channels == 12  # its input group stays whole


def test_a_model_torch_pruning_cannot_trace_is_a_clear_error_and_stays_as_it_was(monkeypatch):
    import torch_pruning as tp

    def fails(self, *args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fails)
    net, batches = _net(), _batches()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match="could not build the channel dependencies.*ZeroDivisionError"):
        prune_channels(net, batches, ratio=0.5)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def _tiny_maxvit() -> nn.Module:
    return tiny_maxvit()


def _tiny_swin() -> nn.Module:
    return tiny_swin()


@pytest.mark.parametrize(
    ("make", "match", "outside"),
    [
        # Torch-Pruning's shape inference gives up on the window reshapes (full size: the groups
        # grow until memory runs out); the classifier reads the untraced stage's output
        (_tiny_swin, "could not infer the shapes", {"head"}),
        # one channel of to_qkv maps to indices beyond the layer's width (full size: 18,432
        # indices of a 1,536-wide layer, and the full group exhausts memory); every layer is in a
        # traced part or an attention whose heads can go
        (_tiny_maxvit, "index mapping .* is broken", set()),
    ],
)
def test_a_broken_torch_pruning_graph_is_detected_and_the_model_pruned_by_parts(
    make, match, outside, tmp_path
):
    from lightning_eigendamage.channels.parts import UntraceableError

    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(4, 3, 32, 32)
    batches = [(x, torch.randint(0, 10, (4,)))]
    with pytest.raises(UntraceableError, match=match):  # the whole graph, checked before any group
        channels_mod.dependency_graph(net, x)
    before = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = prune_channels(net, batches, ratio=0.3, target="flops")
    assert report.channels_removed > 0 and report.flops_after < report.flops_before
    listed = {k for k, v in report.skipped.items() if v.startswith("in a part whose channel dependencies")}
    assert listed == outside
    out = net(x)
    assert out.shape == before.shape and torch.isfinite(out).all()
    torch.save(net.state_dict(), tmp_path / "p.pt")
    fresh = make().eval()
    restore_channels(fresh, tmp_path / "p.pt", x)
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)


def _widths(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_restore_channels_rebuilds_the_pruned_widths_from_a_plain_state_dict(tmp_path):
    from lightning_eigendamage import restore_channels

    net, batches = _net(), _batches()
    prune_channels(net, batches, ratio=0.5, target="flops")
    path = tmp_path / "pruned.pt"
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, path)  # as Lightning saves it
    torch.manual_seed(123)
    fresh = TinyResNet().eval()  # other weights, full widths
    assert _widths(fresh) != _widths(net)
    with pytest.raises(RuntimeError, match="size mismatch"):
        copy.deepcopy(fresh).load_state_dict(net.state_dict())
    out = restore_channels(fresh, path, batches[0][0])
    assert out is fresh
    assert _widths(fresh) == _widths(net)
    assert fresh.l2.c1.in_channels == net.l2.c1.in_channels and fresh.fc.in_features == net.fc.in_features
    x = batches[1][0]
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    # already narrowed: loads again
    restore_channels(fresh, net.state_dict(), x)
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
    # a bare state_dict into another full-width model
    other = restore_channels(TinyResNet().eval(), net.state_dict(), x)
    torch.testing.assert_close(other(x), net(x), rtol=0, atol=0)


def test_restore_channels_refuses_a_checkpoint_that_does_not_fit_and_leaves_the_model_alone():
    from lightning_eigendamage import restore_channels

    net, batches = _net(), _batches()
    prune_channels(net, batches, ratio=0.5, target="flops")
    state = net.state_dict()
    fresh = TinyResNet().eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    wider = dict(state)
    wider["stem.weight"] = torch.zeros(9, 3, 3, 3)  # the model's stem has 8 channels
    with pytest.raises(ValueError, match="stem.weight has 9 output channels"):
        restore_channels(fresh, wider, batches[0][0])
    head = dict(state)
    head["fc.weight"], head["fc.bias"] = state["fc.weight"][:3], state["fc.bias"][:3]  # a 3-class model's
    with pytest.raises(ValueError, match="narrows fc, whose outputs are the model's"):
        restore_channels(fresh, head, batches[0][0])
    broken = dict(state)
    broken["fc.bias"] = torch.zeros(7)  # fits no width the groups can give
    with pytest.raises(RuntimeError, match="fc.bias"):
        restore_channels(fresh, broken, batches[0][0])
    assert _widths(fresh) == {k: tuple(v.shape) for k, v in before.items()}
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_channel_pruned_lightning_fit_resumes_from_its_checkpoint_after_restore_channels(tmp_path):
    from lit_models import LitClassifier, image_data, loader, small_cnn, trainer

    from lightning_eigendamage import restore_channels

    data = image_data(n=64, size=8)
    calib = [(x, y) for x, y in loader(data)]

    def pruned() -> LitClassifier:
        torch.manual_seed(0)
        lit = LitClassifier(small_cnn(10))
        prune_channels(lit, calib, ratio=0.5, target="flops")
        return lit

    straight = pruned()
    trainer(max_epochs=2).fit(straight, loader(data))

    first = pruned()
    t = trainer(max_epochs=1)
    t.fit(first, loader(data))
    path = tmp_path / "epoch1.ckpt"
    t.save_checkpoint(path)

    torch.manual_seed(7)
    fresh = LitClassifier(small_cnn(10))  # as a new process builds it: full widths
    restore_channels(fresh, path, calib[0][0])
    t2 = trainer(max_epochs=2)
    t2.fit(fresh, loader(data), ckpt_path=path)  # optimizer state (momentum) loads: same shapes
    assert t2.global_step == 2 * len(loader(data))
    for (k, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=k)


def test_frozen_parameters_stay_frozen():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip
    net[1].requires_grad_(False)
    net[0].bias.requires_grad_(False)
    prune_channels(net, [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,)))], ratio=0.5)
    assert net[1].weight.shape[0] < 8  # narrowed, and still frozen
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == ["0.bias", "1.weight", "1.bias"]


class _FoldedTokens(nn.Module):
    """(N, T, 10) inputs whose tokens are folded into the rows of the Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(10, 32), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        h = torch.relu(self.b(torch.relu(self.a(x.reshape(n * t, -1)))))
        return self.fc(h.reshape(n, t, -1).mean(1))


def test_a_flops_target_holds_when_the_model_folds_tokens_into_rows():
    torch.manual_seed(0)
    net = _FoldedTokens().eval()
    batches = [(torch.randn(16, 12, 10), torch.randint(0, 5, (16,)))]
    report = prune_channels(net, batches, ratio=0.5, target="flops")
    assert report.flops_planned == report.flops_after  # the search counts every row
    assert 0.5 <= report.flops_fraction_removed <= 0.56  # was 0.98


class _Detached(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(h.mean((2, 3))), h.detach()  # features returned without autograd history


class _FrozenNorm(nn.Module):
    def __init__(self) -> None:
        from torchvision.ops import FrozenBatchNorm2d

        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.n, self.fc = (
            FrozenBatchNorm2d(8),
            nn.Linear(8, 5),
        )  # per-channel buffers, no module Torch-Pruning knows

    def forward(self, x: torch.Tensor):
        return self.fc(torch.relu(self.b(torch.relu(self.n(self.a(x))))).mean((2, 3)))


def test_a_narrowed_model_that_breaks_is_refused_and_put_back_if_the_trial_cut_missed_it(monkeypatch):
    # the trial cut leaves the FrozenBatchNorm2d's group whole (below); without it, the check
    # after the real cut refuses the model and puts it back
    from lightning_eigendamage.channels import engine

    monkeypatch.setattr(engine, "wrong_groups", lambda *a, **k: {})
    torch.manual_seed(0)
    net = _FrozenNorm().eval()
    x = torch.randn(16, 3, 8, 8)
    batches = [(x, torch.randint(0, 5, (16,)))]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match="fails on the example inputs"):
        prune_channels(net, batches, ratio=0.5)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in state.items()}
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_a_group_read_by_a_module_the_graph_does_not_know_stays_whole():
    torch.manual_seed(0)
    net = _FrozenNorm().eval()  # the FrozenBatchNorm2d after a keeps 8 channels of buffers
    x = torch.randn(16, 3, 8, 8)
    report = prune_channels(net, [(x, torch.randint(0, 5, (16,)))], ratio=0.2)
    assert "the narrowed model fails (RuntimeError" in report.skipped["group of a"]
    assert net.a.out_channels == 8 and net.b.out_channels < 8
    assert net(x).shape == (16, 5)


def test_a_group_whose_cut_changes_a_returned_shape_stays_whole_and_the_rest_is_pruned():
    # b's channels are returned (detached: the graph cannot see it); the trial cut finds it
    torch.manual_seed(0)
    net = _Detached().eval()
    x = torch.randn(16, 3, 8, 8)
    report = prune_channels(
        net, [(x, torch.randint(0, 5, (16,)))], ratio=0.3, forward_fn=lambda m, b: m(b[0])[0]
    )
    assert "an output of shape (1, 8, 8, 8) became (1, 7, 8, 8)" in report.skipped["group of b"]
    assert net.b.out_channels == 8 and net.a.out_channels < 8  # a's group is cut, b's is not
    assert [tuple(t.shape) for t in net(x)] == [(16, 5), (16, 8, 8, 8)]


def test_no_grad_inference_mode_and_modes():
    net, batches = _net(), _batches()
    with torch.no_grad():  # the capture and the tracing turn autograd on themselves
        report = prune_channels(copy.deepcopy(net), batches, ratio=0.5)
    assert report.channels_removed > 0
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        prune_channels(copy.deepcopy(net), batches, ratio=0.5)
    net.train()
    net.l1.eval()  # mixed modes come back as they were
    modes = [m.training for m in net.modules()]
    prune_channels(net, batches, ratio=0.5)
    assert [m.training for m in net.modules()] == modes


class _TrainOnlyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.aux = nn.Linear(8, 5), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.a(x))
        out = self.fc(torch.relu(self.b(h)).mean((2, 3)))
        return (out, self.aux(h.mean((2, 3)))) if self.training else out


def test_a_head_that_runs_only_in_training_keeps_what_it_reads_and_the_model_runs_in_both_modes():
    """The graph is traced in eval mode; the group the train-only ``aux`` reads (``a``'s outputs)
    is left whole (it used to make the whole call fail), the rest narrows."""
    torch.manual_seed(0)
    net = _TrainOnlyHead().train()
    batches = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,)))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the target is out of reach with a's group whole)
        report = prune_channels(net, batches, ratio=0.5)
    assert net.training
    assert net.a.out_channels == 8 and net.aux.in_features == 8 and net.b.out_channels < 8
    assert "read by aux" in report.skipped["group of a"]
    out, aux = net(batches[0][0])  # both modes run
    assert out.shape == aux.shape == (16, 5)
    assert net.eval()(batches[0][0]).shape == (16, 5)


def test_an_unreachable_target_warns():
    from lightning_eigendamage import TargetNotReachedWarning

    net, batches = _net(), _batches()
    with pytest.warns(TargetNotReachedWarning, match="removed 0.[0-9]+ of the flops for a ratio of 0.990"):
        report = prune_channels(net, batches, ratio=0.99, target="flops")
    assert report.flops_fraction_removed < 0.98


def test_relative_ranks_by_the_square_root_of_each_readers_damage(monkeypatch):
    net, batches = _net(), _batches()
    seen: dict[str, dict] = {}
    scores, collect, select = (
        channels_mod.scores_from_factors,
        channels_mod._collect_groups,
        channels_mod._select,
    )

    def spy_scores(*args, **kwargs):
        out = scores(*args, **kwargs)
        seen["damage"] = {m: s.clone() for m, s in out[0].items()}
        return out

    def spy_collect(dg, ignored, costs, out_scores, importance, names, in_scores, *rest):
        assert importance is None
        seen["ranked"] = in_scores
        return collect(dg, ignored, costs, out_scores, importance, names, in_scores, *rest)

    def spy_select(*args, **kwargs):
        seen["rank_by"] = kwargs["rank_by"]
        return select(*args, **kwargs)

    monkeypatch.setattr(channels_mod, "scores_from_factors", spy_scores)
    monkeypatch.setattr(channels_mod, "_collect_groups", spy_collect)
    monkeypatch.setattr(channels_mod, "_select", spy_select)
    prune_channels(copy.deepcopy(net), batches, ratio=0.5, target="flops", greedy_steps=None)
    assert seen["rank_by"] == "relative" and set(seen["ranked"]) == set(seen["damage"])
    for m, s in seen["damage"].items():
        torch.testing.assert_close(seen["ranked"][m], s.clamp_min(0).sqrt())
    kw = dict(ratio=0.5, target="flops", rank_by="relative_damage", greedy_steps=None)
    prune_channels(copy.deepcopy(net), batches, **kw)
    assert seen["rank_by"] == "relative"
    for m, s in seen["damage"].items():
        torch.testing.assert_close(seen["ranked"][m], s)


@pytest.mark.parametrize("rank_by", ["relative", "relative_damage"])
def test_greedy_scores_rank_each_group_by_the_root_of_its_sequential_damage(monkeypatch, rank_by):
    """By default (``greedy_steps=32``) each group is scored once by the greedy sequential removal
    over its readers, and ranked by the square root of that (``"relative"``) or by it."""
    net, batches = _net(), _batches()
    greedy, collect, select = (
        channels_mod.greedy_input_obs_scores,
        channels_mod._collect_groups,
        channels_mod._select,
    )
    made: list[torch.Tensor] = []
    ranked: list[torch.Tensor] = []

    def spy_greedy(readers, n, max_steps, units=None):
        assert max_steps == 32 and readers and all(r.update.g is not None for r in readers)
        made.append(greedy(readers, n, max_steps, units))
        return made[-1]

    def spy_collect(dg, ignored, costs, out_scores, imp, names, in_scores, *rest):
        assert not in_scores and imp is not None

        def recorded(group):
            ranked.append(imp(group))
            return ranked[-1]

        return collect(dg, ignored, costs, out_scores, recorded, names, in_scores, *rest)

    def spy_select(*args, **kwargs):
        assert kwargs["rank_by"] == "relative"
        return select(*args, **kwargs)

    monkeypatch.setattr(channels_mod, "greedy_input_obs_scores", spy_greedy)
    monkeypatch.setattr(channels_mod, "_collect_groups", spy_collect)
    monkeypatch.setattr(channels_mod, "_select", spy_select)
    prune_channels(net, batches, ratio=0.5, target="flops", rank_by=rank_by)
    assert len(made) == len(ranked) >= 3  # one greedy run per scored group
    for m, r in zip(made, ranked):
        torch.testing.assert_close(r, m.sqrt() if rank_by == "relative" else m)


@pytest.mark.parametrize("entry", ["1", nn.BatchNorm2d, "bn_instance"])
def test_an_excluded_batchnorm_keeps_its_group_whole(entry):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip
    batches = [(torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,)))]
    report = prune_channels(net, batches, ratio=0.5, exclude=[net[1] if entry == "bn_instance" else entry])
    assert net[1].num_features == 8 and net[0].out_channels == 8 and net[3].in_channels == 8
    assert report.skipped["group of 0"] == "left whole: 1 is excluded by user"
    assert net[3].out_channels < 8  # the other group is still pruned


def _twins() -> nn.Sequential:
    """A conv whose output channels 4–7 are copies of 0–3, read by a conv whose outputs are the
    model's (so the copies' group is the only one that can lose channels)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[0].weight[4:] = net[0].weight[:4]
        net[0].bias[4:] = net[0].bias[:4]
    return net


def test_greedy_scoring_through_a_flatten_keeps_one_of_each_pair_of_copies():
    """The reader is a Linear after a flatten: each conv channel feeds four of its columns, which
    go (and are scored) together."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 6),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[0].weight[4:] = net[0].weight[:4]
        net[0].bias[4:] = net[0].bias[:4]
    gen = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 6, (32,), generator=gen)) for _ in range(3)
    ]
    x = torch.randn(32, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref = net(x)
    report = prune_channels(net, batches, ratio=0.5)
    kept = sorted(set(range(8)) - set(report.groups[0]["removed"]))
    assert net[0].out_channels == 4 and net[4].in_features == 16
    assert sorted(c % 4 for c in kept) == [0, 1, 2, 3]
    with torch.no_grad():
        assert float((net(x) - ref).norm() / ref.norm()) < 1e-2  # the damping's share


def test_greedy_scoring_keeps_one_of_each_pair_of_copies_where_single_scores_drop_both():
    """Each copy alone costs about nothing (its twin absorbs it), so single-channel scores drop
    pairs; the greedy scores see that a channel's twin is gone and keep one of each pair: the
    function is kept to the damping's precision."""
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 6, (16,), generator=gen)) for _ in range(3)
    ]
    x = torch.randn(32, 3, 8, 8, generator=gen)
    errors = {}
    for steps in (None, 8):
        net = _twins()
        with torch.no_grad():
            ref = net(x)
        report = prune_channels(net, batches, ratio=0.5, greedy_steps=steps)
        kept = sorted(set(range(8)) - set(report.groups[0]["removed"]))
        assert net[0].out_channels == len(kept) == 4
        with torch.no_grad():
            errors[steps] = float((net(x) - ref).norm() / ref.norm())
        if steps is not None:
            assert sorted(c % 4 for c in kept) == [0, 1, 2, 3]
    assert errors[8] < 1e-3 < 0.03 < errors[None]
