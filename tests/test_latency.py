"""Channels ranked by measured latency (``rank_by="relative_per_latency"`` / ``"damage_per_latency"``).

No timing is asserted (machines are noisy): the fit is checked on constructed times, the ranking
on a constructed latency table where FLOPs and latency disagree, and the table's life cycle
(measured once, kept in the report, reused by later rounds and after a resume) by counting the
measurements.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import TinyResNet, conv_batches, warm_up_bn
from torch import nn

from lightning_eigendamage import prune_channels
from lightning_eigendamage.channels import engine as channels_mod
from lightning_eigendamage.channels import latency as latency_mod


def test_the_fit_recovers_non_negative_coefficients() -> None:
    true = [2e-4, 3e-7, 1e-6, 0.0]
    feats, times = [], []
    for a, b in [(64, 64), (64, 32), (32, 64), (32, 32), (16, 16), (48, 48)]:
        feats.append([1.0, a * b, b, a])
        times.append(true[0] + true[1] * a * b + true[2] * b + true[3] * a)
    coef = latency_mod._fit(feats, times)
    torch.testing.assert_close(torch.tensor(coef), torch.tensor(true), rtol=1e-6, atol=1e-12)
    # a negative least-squares coefficient is dropped, the others refitted
    times_neg = [t - 5e-7 * f[3] for t, f in zip(times, feats)]
    coef = latency_mod._fit(feats, times_neg)
    assert min(coef) >= 0.0 and coef[3] == 0.0
    assert latency_mod.seconds([1.0, 2.0, 3.0, 4.0], 8, 6, 2, False) == 1.0 + 2.0 * 4 * 6 + 3.0 * 6 + 4.0 * 8
    assert latency_mod.seconds([1.0, 2.0, 0.0, 0.0], 8, 8, 8, True) == 1.0 + 2.0 * 8


def _two_groups() -> tuple[list, dict, nn.Linear, nn.Linear]:
    la, lb = nn.Linear(4, 4), nn.Linear(4, 4)
    costs = {la: channels_mod._LayerCost(2, 4, 4, 1, False), lb: channels_mod._LayerCost(2, 4, 4, 1, False)}
    groups = []
    for m in (lb, la):  # lb is group 0: the first on a tie
        effects = [(m, "out", __import__("collections").Counter(range(4)))]
        groups.append(channels_mod._Group(m, None, 4, torch.ones(4, dtype=torch.float64), effects, [], []))
    return groups, costs, la, lb


def test_ranking_by_latency_changes_the_choice_where_flops_and_latency_disagree() -> None:
    groups, costs, la, lb = _two_groups()
    flops = sum(c.flops() for c in costs.values())
    kw = dict(
        ratio=1 / 8, target="channels", max_group_ratio=1.0, min_channels=1, other_flops=0, flops_before=flops
    )
    # equal scores, equal FLOPs: by FLOPs the tie goes to the first group (lb)
    chosen, _ = channels_mod._select(groups, costs, rank_by="per_flop", **kw)
    assert chosen == [[0], []]
    # la's channels cost 100× the time of lb's (a measured table): by latency la's goes first
    table = {la: [0.0, 0.0, 1e-3, 0.0], lb: [0.0, 0.0, 1e-5, 0.0]}
    chosen, _ = channels_mod._select(groups, costs, rank_by="per_latency", latency=table, **kw)
    assert chosen == [[], [0]]
    chosen, _ = channels_mod._select(groups, costs, rank_by="relative_per_latency", latency=table, **kw)
    assert chosen == [[], [0]]


def _setup() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = TinyResNet()
    batches = conv_batches(2, n=16, size=16)
    warm_up_bn(model, batches)
    return model, batches


def _counting(monkeypatch: pytest.MonkeyPatch, table_of=None) -> list[int]:
    calls: list[int] = []
    real = channels_mod.measure

    def counted(layers, shapes, **kw):
        calls.append(1)
        return table_of(layers) if table_of is not None else real(layers, shapes, **kw)

    monkeypatch.setattr(channels_mod, "measure", counted)
    return calls


def test_a_constructed_table_steers_the_channels_and_is_kept_in_the_report(monkeypatch) -> None:
    model, batches = _setup()
    dense = copy.deepcopy(model)
    # every layer's output channels are cheap, except l2.c1's, which are very expensive
    table = {}

    def table_of(layers):
        for name in layers:
            table[name] = [1e-4, 0.0, 1e-2 if name == "l2.c1" else 1e-8, 0.0]
        return dict(table)

    calls = _counting(monkeypatch, table_of)
    report = prune_channels(
        model, batches, ratio=0.2, target="flops", rank_by="damage_per_latency", latency_batch=8
    )
    assert calls == [1] and report.latency_table["layers"] == table
    assert report.latency_table["setting"] == {
        "device": "cpu",
        "batch": 8,
        "memory_format": "model",
        "mode": "inference",
    }
    by_flops = prune_channels(dense, batches, ratio=0.2, target="flops", rank_by="damage_per_cost")
    assert by_flops.latency_table is None
    # l2.c1's group loses (far) more channels when its channels are the ones that cost time
    assert model.l2.c1.out_channels < dense.l2.c1.out_channels


def test_the_table_is_measured_once_per_setting_and_reused_by_later_rounds(monkeypatch) -> None:
    from lightning_eigendamage.engine import get_engine
    from lightning_eigendamage.options import PruneOptions

    model, batches = _setup()
    calls = _counting(monkeypatch)
    engine = get_engine("channels")
    options = PruneOptions(
        structure="channels", target="flops", rank_by="relative_per_latency", latency_batch=4
    )
    prepared = engine.check(model, batches[0][0], options)
    for _ in range(2):
        report, _ = engine.prune(model, batches, ratio=0.15, options=options, prepared=prepared)
        assert report.latency_table is prepared.latency
    assert calls == [1]
    # another setting measures again
    other = PruneOptions(
        structure="channels", target="flops", rank_by="relative_per_latency", latency_batch=2
    )
    engine.prune(model, batches, ratio=0.1, options=other, prepared=prepared)
    assert len(calls) == 2


def test_the_callback_keeps_the_table_in_its_state_and_a_resumed_fit_never_remeasures(
    tmp_path, monkeypatch
) -> None:
    from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint
    from lit_models import LitClassifier, image_data, loader, trainer

    from lightning_eigendamage import EigenDamagePruning

    calls = _counting(monkeypatch)
    torch.manual_seed(0)

    def callback() -> EigenDamagePruning:
        return EigenDamagePruning(
            {0: 0.2, 1: 0.2},
            structure="channels",
            rank_by="relative_per_latency",
            latency_batch=4,
            verbose=False,
        )

    model = LitClassifier(TinyResNet(), lr=0.01)
    cb = callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1)
    stop = LambdaCallback(on_train_epoch_end=lambda trainer, _: setattr(trainer, "should_stop", True))
    t = trainer(
        max_epochs=2, callbacks=[cb, ckpt, stop], enable_checkpointing=True, default_root_dir=tmp_path
    )
    t.fit(model, loader(image_data(32, size=16, n_classes=5)))
    assert calls == [1] and cb.reports[0].latency_table is not None
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    saved = [v for k, v in state["callbacks"].items() if "EigenDamagePruning" in k][0]
    assert saved["reports"][0]["latency_table"] == cb.reports[0].latency_table
    # resume: round 1 ranks with the saved table
    cb2 = callback()
    t2 = trainer(max_epochs=2, callbacks=[cb2], default_root_dir=tmp_path)
    t2.fit(
        LitClassifier(TinyResNet(), lr=0.01),
        loader(image_data(32, size=16, n_classes=5)),
        ckpt_path=tmp_path / "last.ckpt",
    )
    assert len(cb2.reports) == 2 and calls == [1]
    assert cb2.reports[1].latency_table == cb.reports[0].latency_table


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_each_width_is_timed_in_the_mode_asked_for(mode: str, monkeypatch) -> None:
    """A training-step table times every copy of the layer forward and backward in training mode
    (BatchNorm on the batch's statistics); an inference table a forward in eval mode. Seen
    through the shared timer (``costs.time_modules``), which records each module's mode."""
    from lightning_eigendamage import costs

    seen: list[tuple[bool, bool, bool]] = []
    real = costs.time_modules

    def spy(modules, example, repeats=7, *, backward=False, train_mode=False):
        flags: list[bool] = []
        hooks = [
            m.register_forward_pre_hook(lambda mod, inp: flags.append(mod.training)) for m in modules.values()
        ]
        try:
            out = real(modules, example, repeats, backward=backward, train_mode=train_mode)
        finally:
            for h in hooks:
                h.remove()
        seen.append((backward, all(flags), not any(flags)))
        return out

    monkeypatch.setattr(latency_mod, "time_modules", spy)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    table = latency_mod.measure(
        {"c": conv}, {"c": (4, 6, 6)}, batch=2, memory_format="model", mode=mode, repeats=1
    )
    assert set(table) == {"c"} and len(seen) >= 4
    training = mode == "training"
    assert all(b == training and (ran_train if training else ran_eval) for b, ran_train, ran_eval in seen), (
        seen
    )
