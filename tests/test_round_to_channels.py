"""``round_to`` in the channel engine: every narrowed dependency group keeps a multiple of
``round_to`` channels (its lowest-ranked ones removed), the target is still met or the report
says why, and ``round_to=1`` plans exactly as the plain global ranking.

The selection itself (:func:`~lightning_eigendamage.channels.engine._select`) is checked on
hand-made groups whose units have fixed FLOPs and known scores, against an independent
re-implementation of the plain ranking; the widths on small networks (plain convs, a grouped conv,
attention heads) are read off the pruned layers' shapes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from models import conv_batches, warm_up_bn
from torch import nn

from lightning_eigendamage import PruneOptions, prune
from lightning_eigendamage.channels import engine as channels_mod
from lightning_eigendamage.costs import count_flops
from lightning_eigendamage.report import TARGET_TOLERANCE, TargetNotReachedWarning

torch.set_num_threads(min(2, torch.get_num_threads()))


# ---------------------------------------------------------------------------------------------
# The selection on hand-made groups
# ---------------------------------------------------------------------------------------------


def _group(scores: list[float], flops: list[int], width: int = 1) -> channels_mod._Group:
    """A group of ``len(scores)`` units of ``width`` channels; unit ``u`` scores ``scores[u]``
    (spread over its channels) and saves ``flops[u]`` FLOPs."""
    n = len(scores) * width
    per = torch.tensor(scores, dtype=torch.float64).repeat_interleave(width) / width
    units = [list(range(u * width, (u + 1) * width)) for u in range(len(scores))]
    return channels_mod._Group(nn.Identity(), None, n, per, [], [], [], units, list(flops))


def _scenario(seed: int, widths: tuple[int, ...] = (1, 1, 1, 1), ties: bool = False) -> tuple[list, int]:
    """Four groups of 5 to 40 units with random scores (with ``ties``, five values only) and
    per-unit FLOPs; the total FLOPs."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for w in widths:
        k = int(torch.randint(5, 41, (1,), generator=gen))
        scores = torch.rand(k, generator=gen)
        scores = ((scores * 5).floor() / 5 if ties else scores).tolist()
        flops = [int(f) for f in torch.randint(50, 5000, (1,), generator=gen).repeat(k)]
        groups.append(_group(scores, flops, w))
    total = sum(sum(g.unit_flops) for g in groups) + 10_000  # FLOPs outside the groups
    return groups, total


def _select(groups: list, total: int, ratio: float, round_to: int, target: str = "flops", **kw) -> tuple:
    return channels_mod._select(
        groups,
        {},
        ratio=ratio,
        target=target,
        max_group_ratio=kw.pop("cap", 0.95),
        min_channels=1,
        other_flops=total,
        flops_before=total,
        round_to=round_to,
        **kw,
    )


def _plain_ranking(
    groups: list, total: int, ratio: float, target: str, tol: float = 0.03, cap: float = 0.95
) -> list:
    """The global ranking without rounding, written out independently: units by score (ties by
    group, then unit), each group under its cap; with a FLOPs target, a unit that would land
    below ``(1 − tol)·goal`` is passed over and taken afterwards only if the goal is not met."""
    caps = [max(0, min(math.floor(cap * g.n + 1e-9), g.n - 1)) for g in groups]
    pool = sorted(
        (float(g.scores[g.units[u]].sum()), gi, u) for gi, g in enumerate(groups) for u in range(len(g.units))
    )
    flops, removed = total, 0
    chosen: list[list[int]] = [[] for _ in groups]
    goal_f, goal_c = (1 - ratio) * total, math.floor(ratio * sum(g.n for g in groups) + 1e-9)

    def done() -> bool:
        return flops <= goal_f if target == "flops" else removed >= goal_c

    passed = []
    for _, gi, u in pool:
        if done():
            break
        unit = groups[gi].units[u]
        if len(chosen[gi]) + len(unit) > caps[gi]:
            continue
        if target == "flops" and flops - groups[gi].unit_flops[u] < (1 - tol) * goal_f:
            passed.append((gi, u))
            continue
        chosen[gi] += unit
        flops -= groups[gi].unit_flops[u]
        removed += len(unit)
    for gi, u in passed:
        if done():
            break
        unit = groups[gi].units[u]
        if len(chosen[gi]) + len(unit) <= caps[gi]:
            chosen[gi] += unit
            flops -= groups[gi].unit_flops[u]
            removed += len(unit)
    return [sorted(c) for c in chosen]


@pytest.mark.parametrize("cap", [0.95, 0.5])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("target", ["flops", "channels"])
def test_round_to_1_selects_exactly_as_the_plain_global_ranking(target: str, ties: bool, cap: float) -> None:
    for seed in range(40):
        groups, total = _scenario(seed, ties=ties)
        for ratio in (0.3, 0.5, 0.75, 0.9):
            chosen, _ = _select(groups, total, ratio, 1, target, cap=cap)
            assert chosen == _plain_ranking(groups, total, ratio, target, cap=cap), (seed, ratio)


def _ranked(g: channels_mod._Group) -> list[int]:
    """The group's units from lowest to highest score (ties: lower index first)."""
    s = [float(g.scores[u].sum()) for u in g.units]
    return sorted(range(len(g.units)), key=lambda u: (s[u], u))


@pytest.mark.parametrize("round_to", [2, 4, 8])
@pytest.mark.parametrize("widths", [(1, 1, 1, 1), (1, 2, 3, 4)])
def test_rounded_groups_keep_multiples_lose_their_lowest_ranked_units_and_meet_the_target(
    round_to: int, widths: tuple[int, ...]
) -> None:
    reached_some = False
    for seed in range(30):
        groups, total = _scenario(seed, widths)
        for ratio in (0.3, 0.5, 0.75):
            chosen, planned = _select(groups, total, ratio, round_to)
            # the FLOPs planned are exactly those of the units removed
            saved = sum(
                g.unit_flops[u]
                for g, c in zip(groups, chosen)
                for u, unit in enumerate(g.units)
                if unit[0] in c
            )
            assert planned == total - saved
            for g, c in zip(groups, chosen):
                kept = g.n - len(c)
                assert kept == g.n or (kept > 0 and kept % round_to == 0), (seed, ratio, g.n, kept)
                w = len(g.units[0])
                gone = _ranked(g)[: len(c) // w]
                assert c == sorted(ch for u in gone for ch in g.units[u]), (seed, ratio)
            # the target is met, or every group is as narrow as the caps and round_to allow
            if planned <= (1 - ratio) * total:
                reached_some = True
            else:
                for g, c in zip(groups, chosen):
                    cap = channels_mod._caps([g], 0.95, 1)[0]
                    assert len(c) == channels_mod._round_removals(g, cap, round_to)[-1] * len(g.units[0])
    assert reached_some


def test_a_block_that_would_overshoot_the_goal_is_passed_over_for_a_smaller_one() -> None:
    """B's channels rank lowest, but a block of 8 of them removes 8,000 FLOPs where 700 are
    asked; A's block of 8 (800 FLOPs) meets the goal within the tolerance instead."""
    a = _group([0.1 + 0.01 * u for u in range(16)], [100] * 16)
    b = _group([0.01] * 16, [1000] * 16)
    total = 1600 + 16000 + 20000
    chosen, planned = _select([a, b], total, 700 / total, 8)
    assert chosen == [list(range(8)), []] and planned == total - 800
    chosen, planned = _select([a, b], total, 700 / total, 1)  # unrounded: one of B's channels
    assert chosen == [[], [0]] and planned == total - 1000


def test_kept_widths_are_rounded_up_then_blocks_go_by_their_mean_rank() -> None:
    """The plain ranking takes A's 7 lowest channels (kept 9). With round_to=4 A keeps 12 (its 3
    highest-ranked removed ones come back, not 8 kept by rounding to the nearest multiple); the
    next block is then B's 4 lowest (mean rank 0.75), not A's next 4 (mean 0.95)."""
    a = _group([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 2.0] + [3.0] * 8, [100] * 16)
    b = _group([0.75] * 16, [100] * 16)
    total = 1600 + 1600 + 10_000
    assert _select([a, b], total, 700 / total, 1)[0] == [list(range(7)), []]
    chosen, planned = _select([a, b], total, 700 / total, 4)
    assert chosen == [[0, 1, 2, 3], [0, 1, 2, 3]] and planned == total - 800


def test_the_counts_a_group_may_lose_step_by_what_makes_its_width_a_multiple() -> None:
    removals = channels_mod._round_removals
    plain = _group([1.0] * 20, [1] * 20)  # 20 channels: keeps 16, 8 (multiples of 8 below 20)
    assert removals(plain, 19, 8) == [0, 4, 12]
    assert removals(plain, 10, 8) == [0, 4]  # the cap (10 removed at most) forbids keeping 8
    assert removals(plain, 19, 1) == list(range(20))
    small = _group([1.0] * 8, [1] * 8)  # n ≤ round_to: left whole
    assert removals(small, 7, 8) == [0]
    pairs = _group([1.0] * 8, [1] * 8, width=2)  # 16 channels in units of 2 (a grouped conv's)
    assert removals(pairs, 15, 4) == [0, 2, 4, 6]  # keeps 12, 8, 4 channels: every 2nd unit
    assert removals(pairs, 15, 2) == list(range(8))  # a unit of 2 is a multiple of 2 already
    heads = _group([1.0] * 4, [1] * 4, width=4)  # 4 heads of 4
    assert removals(heads, 15, 4) == [0, 1, 2, 3]  # head widths are multiples: any count
    assert removals(heads, 15, 8) == [0, 2]  # two heads at a time
    odd = _group([1.0] * 5, [1] * 5, width=3)  # 15 channels in units of 3, round_to 4: keeps 12
    assert removals(odd, 14, 4) == [0, 1]


# ---------------------------------------------------------------------------------------------
# Whole networks: the pruned layers' shapes
# ---------------------------------------------------------------------------------------------


class _Plain(nn.Module):
    """conv 3→24, conv 24→32, conv 32→40 (stride 2), Linear 40→48, Linear 48→5; BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        self.c2, self.b2 = nn.Conv2d(24, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 40, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(40)
        self.fc1, self.fc2 = nn.Linear(40, 48), nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


class _Grouped(nn.Module):
    """conv 3→16, grouped conv 16→16 in 2 conv groups, conv 16→12, Linear 12→5; BatchNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ba = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.g, self.bg = nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(16)
        self.c, self.bc = nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.ba(self.a(x)))
        x = torch.relu(self.bg(self.g(x)))
        x = torch.relu(self.bc(self.c(x)))
        return self.fc(x.mean((2, 3)))


def _setup(make: type[nn.Module]) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = make()
    batches = conv_batches(3, n=16, size=8, n_classes=5)
    warm_up_bn(model, batches)
    return model.eval(), batches


def _shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        n: (m.weight.shape[0], m.weight.shape[1] * (m.groups if isinstance(m, nn.Conv2d) else 1))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def _prune(model: nn.Module, batches: list, ratio: float, target: str, round_to: int, **kw) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TargetNotReachedWarning)
        return prune(
            model, batches, ratio=ratio, structure="channels", target=target, round_to=round_to, **kw
        )


@pytest.mark.parametrize("target", ["flops", "channels"])
@pytest.mark.parametrize("round_to", [4, 8])
def test_every_narrowed_layer_keeps_a_multiple_and_the_target_is_met(target: str, round_to: int) -> None:
    model, batches = _setup(_Plain)
    before = _shapes(model)
    report = _prune(model, batches, 0.5, target, round_to)
    after = _shapes(model)
    assert after["fc2"] == (5, after["fc1"][0])
    producers = ["c1", "c2", "c3", "fc1"]
    for p, reader in zip(producers, producers[1:] + ["fc2"]):
        out = after[p][0]
        assert after[reader][1] == out  # the reader reads exactly the kept channels
        assert out == before[p][0] or out % round_to == 0, (p, out)
    assert any(after[p][0] < before[p][0] for p in producers)
    assert report.target_reached and report.reached >= 0.5 - TARGET_TOLERANCE
    assert report.flops_after == count_flops(model, batches[0][0]) == report.flops_planned
    for g in report.groups:
        kept = g["channels"] - len(g["removed"])
        assert kept == g["channels"] or kept % round_to == 0


def test_the_channels_removed_are_each_groups_lowest_ranked(monkeypatch) -> None:
    seen = {}
    select = channels_mod._select

    def spy(groups, costs, **kw):
        out = select(groups, costs, **kw)
        seen["groups"], seen["chosen"] = groups, out[0]
        return out

    monkeypatch.setattr(channels_mod, "_select", spy)
    model, batches = _setup(_Plain)
    report = _prune(model, batches, 0.6, "flops", 8)
    narrowed = 0
    for g, c, entry in zip(seen["groups"], seen["chosen"], report.groups):
        assert entry["removed"] == c
        # rank_by="relative": within a group the rank orders as the score
        order = sorted(range(g.n), key=lambda i: (float(g.scores[i]), i))
        assert c == sorted(order[: len(c)])
        narrowed += bool(c)
    assert narrowed >= 2


def test_a_grouped_conv_keeps_equal_conv_groups_whose_widths_are_multiples() -> None:
    model, batches = _setup(_Grouped)
    report = _prune(model, batches, 0.5, "channels", 4)
    after = _shapes(model)
    assert model.g.groups == 2
    assert after["a"][0] % 4 == 0 and after["a"][0] < 16 and after["g"][1] == after["a"][0]
    for g in report.groups:
        kept = g["channels"] - len(g["removed"])
        assert kept == g["channels"] or kept % 4 == 0
    for name in ("a", "g"):  # the grouped conv's in and out widths: whole units, multiples of 4
        assert after[name][0] % 4 == 0
    assert after["c"][1] == after["g"][0]
    assert model(batches[0][0]).shape == (16, 5)


@pytest.mark.parametrize("round_to", [4, 8])
def test_attention_heads_go_in_numbers_that_keep_a_multiple_of_round_to(round_to: int) -> None:
    from test_attention_heads import MHAWrapper, Net
    from test_attention_heads import _batches as token_batches

    torch.manual_seed(0)
    net = Net(MHAWrapper(16, 4)).eval()  # 4 heads of 4
    report = _prune(net, token_batches(), 0.6, "flops", round_to, exclude=["embed", "fc"])
    (entry,) = [e for e in report.groups if e.get("head_dim")]
    kept = 16 - len(entry["removed"])
    assert net.attn.attn.out_proj.in_features == kept and kept % round_to == 0 and kept < 16


def test_groups_no_multiple_can_narrow_stay_whole_and_the_report_says_why() -> None:
    model, batches = _setup(_Plain)
    with pytest.warns(TargetNotReachedWarning):
        report = prune(model, batches, ratio=0.5, structure="channels", target="flops", round_to=64)
    assert _shapes(model) == _shapes(_setup(_Plain)[0])  # every group is narrower than 64
    assert not report.target_reached and report.limited_by
    for root in ("c1", "c2", "c3", "fc1"):
        assert "round_to=64" in report.skipped[f"group of {root}"]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8"])
def test_a_bad_round_to_is_a_clear_error(bad) -> None:
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        PruneOptions(structure="channels", round_to=bad)
    model, batches = _setup(_Plain)
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        prune(model, batches, ratio=0.5, structure="channels", round_to=bad)


def test_the_channel_engine_accepts_round_to() -> None:
    assert "round_to" not in channels_mod.ChannelEngine.unused
    assert PruneOptions(structure="channels", round_to=8).round_to == 8


def test_prune_channels_takes_round_to_as_prune_does() -> None:
    """``prune_channels(round_to=…)`` is ``prune(structure="channels", round_to=…)``: the same
    widths."""
    from lightning_eigendamage import prune_channels

    model, batches = _setup(_Plain)
    other, _ = _setup(_Plain)
    prune_channels(model, batches, ratio=0.5, target="flops", round_to=8)
    _prune(other, batches, 0.5, "flops", 8)
    plain, _ = _setup(_Plain)
    prune_channels(plain, batches, ratio=0.5, target="flops")
    assert _shapes(model) == _shapes(other) != _shapes(plain)
