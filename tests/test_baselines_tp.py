"""Channel pruning of the baselines through Torch-Pruning's dependency graph (benchmarks/baselines_tp.py).

torch-pruning is installed by the Makefile (``[baselines]`` extra); these tests must not be skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from models import TinyResNet
from torch import nn

from benchmarks.baselines_tp import (
    METHODS,
    baseline_scores,
    magnitude_importance,
    prune_baseline,
)
from lightning_eigendamage.channels.baselines import (
    CRITERIA,
    DEFAULT_DAMPING,
    capture_diag_fisher,
    channel_scores,
    damped_inverse,
    input_obs_scores,
    kron_obs_update,
    weight_matrix,
)
from lightning_eigendamage.channels.engine import remove_channels
from lightning_eigendamage.costs import count_flops
from lightning_eigendamage.curvature import capture_factors

torch.set_num_threads(min(2, torch.get_num_threads()))


def _resnet(seed: int = 0) -> TinyResNet:
    """SiLU instead of ReLU: no channel is dead (zero gradient, so zero second-order score) by
    chance, yet a channel that is zero before the activation stays zero after it."""
    torch.manual_seed(seed)
    model = TinyResNet(act=F.silu)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _batches(n_batches: int = 2, n: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 5, (n,), generator=gen))
        for _ in range(n_batches)
    ]


def _zero_channel(conv: nn.Conv2d, bn: nn.BatchNorm2d, consumers: list[nn.Conv2d], ch: int) -> None:
    """Make channel ``ch`` exactly zero after BN (and unused by its consumers)."""
    with torch.no_grad():
        conv.weight[ch] = 0
        bn.weight[ch] = 0
        bn.bias[ch] = 0
        for c in consumers:
            c.weight[:, ch] = 0


def _resnet_with_dead_channels() -> TinyResNet:
    m = _resnet()
    _zero_channel(m.l1.c1, m.l1.b1, [m.l1.c2], 1)
    _zero_channel(m.l1.c1, m.l1.b1, [m.l1.c2], 3)
    # Residual group: the stem's channel 2 and l1.c2's channel 2 are added together.
    _zero_channel(m.stem, m.bn, [m.l1.c1], 2)
    _zero_channel(m.l1.c2, m.l1.b2, [m.l2.c1, m.l2.sc[0]], 2)
    _zero_channel(m.l2.c1, m.l2.b1, [m.l2.c2], 5)
    return m


# round_to=8 keeps widths in multiples of 8: it cannot remove just the dead channels here
@pytest.mark.parametrize("method", [m for m in METHODS if m != "kron-obs-in-seq-r8"])
def test_removes_real_channels_and_preserves_outputs_when_they_are_zero(method):
    model = _resnet_with_dead_channels()
    batches = _batches()
    x = batches[0][0]
    with torch.no_grad():
        before = model(x)
    # 4 dead channels out of 8 + 8 + 12 + 12 = 40 prunable (the classifier is exempt).
    report = prune_baseline(model, batches, method, ratio=0.1, target="channels", example_inputs=x)
    assert report.channels_total == 40 and report.channels_removed == 4
    removed = {g["root"]: g["removed"] for g in report.groups}
    assert removed == {"l2.sc.0": [], "stem": [2], "l1.c1": [1, 3], "l2.c1": [5]}
    assert (model.stem.out_channels, model.l1.c2.out_channels, model.l1.c1.in_channels) == (7, 7, 7)
    assert (model.l1.c1.out_channels, model.l1.b1.num_features, model.l1.c2.in_channels) == (6, 6, 6)
    assert (model.l2.c1.out_channels, model.l2.c2.in_channels, model.l2.sc[0].in_channels) == (11, 11, 7)
    assert model.fc.out_features == 5 and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", CRITERIA)
def test_baseline_scores_are_the_criterion_on_patch_form_factors(method):
    model = _resnet()
    batches = _batches()
    scores, _, skipped = baseline_scores(model, batches, method, damping=1e-2)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert not skipped and set(scores) == set(layers.values())
    gen = torch.Generator().manual_seed(0)
    if method == "c-obd":
        diag = capture_diag_fisher(model, layers, batches, generator=gen).fisher
    else:
        caps = capture_factors(
            model, layers, batches, factors_for=list(layers), a_form="patch", generator=gen
        )
    for name, module in layers.items():
        w = weight_matrix(module)
        if method == "c-obd":
            expected = channel_scores(method, w, fisher_diag=diag[name])
        else:
            lf = caps.layers[name]
            expected = channel_scores(method, w, a=lf.a(), g=lf.g(), locations=lf.locations, damping=1e-2)
        torch.testing.assert_close(scores[module], expected)


@pytest.mark.parametrize("method", ["kron-obs", "c-obs", "kron-obd"])
def test_obs_update_lands_on_the_kept_rows(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1),  # with bias: Kron-OBS updates it too
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    batches = _batches()
    conv = model[3]
    w0, b0 = weight_matrix(conv), conv.bias.detach().clone().double()
    scores, updates, skipped = baseline_scores(model, batches, method)
    assert not skipped and set(scores) == {model[0], model[3], model[7]}
    assert (conv in updates) == (method != "kron-obd")
    expected_update = copy.deepcopy(updates.get(conv))

    report = remove_channels(model, batches[0][0], ratio=0.3, scores=scores, updates=updates, method=method)
    removed = next(g["removed"] for g in report.groups if g["root"] == "3")
    assert removed, "the test needs the conv to lose rows"
    kept = [i for i in range(8) if i not in removed]
    if method == "kron-obd":
        dw, db = torch.zeros_like(w0), None
    else:
        dw, db = expected_update(removed)
    torch.testing.assert_close(weight_matrix(conv), (w0 + dw)[kept], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.bias.detach().double(), (b0 if db is None else b0 + db)[kept])
    if method == "kron-obs":  # the joint update, not a sum of single-row updates
        joint = kron_obs_update(torch.cat([w0, b0[:, None]], 1), expected_update.g_inv, removed)
        torch.testing.assert_close(dw, joint[:, :-1])
        if len(removed) > 1:
            single = sum(kron_obs_update(w0, expected_update.g_inv, [r]) for r in removed)
            assert (single - dw)[kept].abs().max() > 1e-6


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


def test_input_side_update_lands_on_the_readers_kept_columns():
    model = _chain()
    batches = _batches()
    conv, fc = model[3], model[7]
    w_conv, w_fc = weight_matrix(conv), weight_matrix(fc)
    in_scores, updates, skipped = baseline_scores(model, batches, "kron-obs-in")
    assert not skipped and set(updates) == {model[0], conv, fc}
    expected = {m: copy.deepcopy(updates[m]) for m in (conv, fc)}
    report = prune_baseline(model, batches, "kron-obs-in-mean", ratio=0.6, target="channels")
    removed = {g["root"]: g["removed"] for g in report.groups}
    assert removed["0"] and removed["3"], "the test needs both groups to lose channels"
    rows = {conv: [i for i in range(8) if i not in removed["3"]], fc: list(range(5))}
    for module, w0, chans, block in ((conv, w_conv, removed["0"], 9), (fc, w_fc, removed["3"], 1)):
        kept = [j for j in range(w0.shape[1]) if j // block not in chans]
        want = (w0 + expected[module](chans))[rows[module]][:, kept]
        torch.testing.assert_close(weight_matrix(module), want, rtol=1e-5, atol=1e-6)
        assert (want - w0[rows[module]][:, kept]).abs().max() > 1e-4, "the kept columns are compensated"
    # the scores are the input side's (of the layer that reads the channel), from patch factors
    fresh = _chain()
    gen = torch.Generator().manual_seed(0)
    lf = capture_factors(fresh, {"3": fresh[3]}, batches, factors_for=["3"], a_form="patch", generator=gen)
    a, g, t = lf.layers["3"].a(), lf.layers["3"].g(), lf.layers["3"].locations
    want = input_obs_scores(w_conv, damped_inverse(a, DEFAULT_DAMPING), g, 9, t)
    torch.testing.assert_close(in_scores[conv], want)


def test_rank_by_group_mean_spreads_the_removal_over_the_groups():
    model = _chain()
    x = torch.randn(2, 3, 8, 8)
    in_scores = {  # the first group's scores are a thousand times the second's
        model[3]: 1000.0 * torch.arange(1.0, 7.0),
        model[7]: torch.arange(1.0, 9.0),
    }
    by = {}
    for rank_by in ("score", "relative"):
        net = copy.deepcopy(model)
        scores = {net[3]: in_scores[model[3]], net[7]: in_scores[model[7]]}
        rep = remove_channels(net, x, ratio=0.5, in_scores=scores, rank_by=rank_by)
        by[rank_by] = {g["root"]: len(g["removed"]) for g in rep.groups}
    assert by["score"] == {"0": 0, "3": 7}  # raw scores: the cheap group first, down to its cap
    assert by["relative"] == {"0": 3, "3": 4}  # normalised: about half of each
    with pytest.raises(ValueError, match="rank_by"):
        remove_channels(copy.deepcopy(model), x, ratio=0.5, in_scores=in_scores, rank_by="flops")


def test_rank_by_group_mean_per_flop_takes_the_flop_heavy_group_first():
    """Relative scores over the FLOPs one channel's removal saves: group "0" (conv 3→6 read by a
    3×3 conv on 8×8) saves 2·64·9·(3 + 8) FLOPs a channel, group "3" (conv 6→8 read by the head)
    2·(64·9·6 + 5); the seven lowest keys go (half of the 14 channels)."""
    model = _chain()
    x = torch.randn(2, 3, 8, 8)
    s0, s3 = torch.arange(1.0, 7.0), torch.arange(1.0, 9.0)
    saved = {"0": 2 * 64 * 9 * (3 + 8), "3": 2 * (64 * 9 * 6 + 5)}
    keys = [(float(v / s0.mean()) / saved["0"], "0") for v in s0]
    keys += [(float(v / s3.mean()) / saved["3"], "3") for v in s3]
    want = {"0": 0, "3": 0}
    for _, g in sorted(keys)[:7]:
        want[g] += 1
    net = copy.deepcopy(model)
    rep = remove_channels(net, x, ratio=0.5, in_scores={net[3]: s0, net[7]: s3}, rank_by="relative_per_flop")
    got = {g["root"]: len(g["removed"]) for g in rep.groups}
    assert got == want and got["0"] > 3  # more of the FLOP-heavy group than "relative" takes


def test_rank_by_group_median_is_not_pulled_by_a_few_large_scores():
    """Group "0" has one score 100 among five near 1: its mean (17.5) makes the five look cheap,
    its median (1) does not. Four of the 14 channels go, lowest key first."""
    model = _chain()
    x = torch.randn(2, 3, 8, 8)
    s0, s3 = torch.tensor([0.9, 1.0, 1.0, 1.1, 1.2, 100.0]), torch.arange(1.0, 9.0)
    got = {}
    for rank_by in ("relative", "relative_median"):
        net = copy.deepcopy(model)
        rep = remove_channels(net, x, ratio=0.29, in_scores={net[3]: s0, net[7]: s3}, rank_by=rank_by)
        got[rank_by] = {g["root"]: len(g["removed"]) for g in rep.groups}
    assert got["relative"] == {"0": 4, "3": 0}  # about 1/17.5 for five, 1/4.5 at best in "3"
    assert got["relative_median"] == {"0": 1, "3": 3}  # 1/4, 2/4, 3/4 (median 4), then 0.9/1


def test_group_score_is_the_sum_over_coupled_layers():
    """The stem and l1.c2 are coupled by the residual add: a channel's score is their sum."""
    model = _resnet()
    model.train()
    stats = model.bn.running_mean.clone()
    big = 1e6
    scores = {
        # sum: 9, 8, 6.5, 7 → channel 2; the stem alone → 0; l1.c2 alone → 3; the max → 1.
        model.stem: torch.tensor([1.0, 4, 6, 7, 50, 50, 50, 50]),
        model.l1.c2: torch.tensor([8.0, 4, 0.5, 0, 50, 50, 50, 50]),
        model.l1.c1: torch.full((8,), big),
        model.l2.c1: torch.full((12,), big),
        model.l2.c2: torch.full((12,), big),
    }
    report = remove_channels(model, torch.randn(2, 3, 8, 8), ratio=1 / 40, scores=scores)
    removed = {g["root"]: g["removed"] for g in report.groups}
    assert removed == {"l2.sc.0": [], "stem": [2], "l1.c1": [], "l2.c1": []}
    assert model.stem.out_channels == 7 and model.l1.c2.out_channels == 7
    assert model.training, "the model's mode is restored"
    torch.testing.assert_close(model.bn.running_mean, stats[[0, 1, 3, 4, 5, 6, 7]])


def test_flops_target_is_met_and_matches_the_flop_counter():
    class Mixed(nn.Module):
        """Depthwise-separable branch concatenated with the stem, on top of a residual net."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 6, 1)
            self.head = nn.Conv2d(14, 10, 3, stride=2, padding=1)
            self.fc = nn.Linear(10, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.stem(x))
            h = torch.cat([h, torch.relu(self.pw(torch.relu(self.dw(h))))], 1)
            return self.fc(torch.relu(self.head(h)).mean((2, 3)))

    for model in (_resnet(), Mixed().eval()):
        x = torch.randn(1, 3, 8, 8)  # a batch of one: Torch-Pruning must not unpack it
        before = count_flops(model, x)
        report = remove_channels(
            model, x, ratio=0.3, target="flops", importance=magnitude_importance(2), method="l2"
        )
        assert report.flops_before == before
        assert report.flops_after == count_flops(model, x) == report.flops_planned
        assert 0.3 <= report.flops_fraction_removed < 0.45
        model(x)


def test_bad_arguments_name_the_problem():
    model = _resnet()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="ratio must be"):
        remove_channels(model, x, ratio=1.0, importance=magnitude_importance(1))
    with pytest.raises(ValueError, match="target must be one of"):
        remove_channels(model, x, ratio=0.1, target="params", importance=magnitude_importance(1))
    with pytest.raises(ValueError, match="exactly one of"):
        remove_channels(model, x, ratio=0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        prune_baseline(model, _batches(), "obd", ratio=0.1)
    with pytest.raises(ValueError, match="finite"):
        remove_channels(model, x, ratio=0.1, scores={model.l1.c1: torch.full((8,), float("nan"))})


def test_the_engine_checks_its_scores_and_options_before_any_change():
    import numpy as np

    model = _chain()
    x = torch.randn(2, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    good = {model[0]: torch.rand(6)}
    cases = [
        (dict(scores={"0": torch.rand(6)}), "keyed by module"),  # a name: was silently ignored
        (dict(scores={model[0]: torch.rand(5)}), "must be 6 finite numbers"),  # was an IndexError
        (dict(in_scores={model[3]: torch.rand(3)}), "must be 6 finite numbers"),
        (dict(scores=good, flops_tolerance=-1), "flops_tolerance"),
        (dict(scores=good, max_group_ratio="0.5"), "max_group_ratio"),
        (dict(scores=good, target=3), "target"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            remove_channels(model, x, ratio=0.5, **kwargs)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k])
    report = remove_channels(model, x, ratio=np.float32(0.5), scores=good)  # NumPy numbers are numbers
    assert report.channels_removed == 3 and model[0].out_channels == 3


def test_the_round_to_8_method_keeps_multiples_of_8() -> None:
    """``kron-obs-in-seq-r8`` is ``prune_channels(round_to=8)``: the 12-wide groups keep 8, the
    8-wide ones stay whole (no narrower multiple), and the report says why."""
    model = _resnet()
    batches = _batches()
    report = prune_baseline(model, batches, "kron-obs-in-seq-r8", ratio=0.2, target="channels")
    widths = {g["root"]: g["channels"] - len(g["removed"]) for g in report.groups}
    assert widths and all(w % 8 == 0 for w in widths.values()), widths
    assert model.l2.c1.out_channels == 8
    assert any("round_to=8" in why for why in report.skipped.values())
