"""The engine protocol, run the same way on every registered engine (the contract), and the
callback with ``structure="channels"`` and ``"auto"``.

Contract, per engine and per model (plain CNN, residual network, Linear MLP): capture → analyse →
decide (plain data) → a failure injected after the surgery (the report cannot be built) leaves the
model bitwise as it was → apply → save → restore into a freshly built model (bitwise-equal
outputs) → optimizer state carried, compared with the state transformed by hand.
"""

from __future__ import annotations

import copy
import io
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import LitClassifier, image_data, loader, small_cnn, trainer
from models import TinyResNet, conv_batches, warm_up_bn
from torch import nn

import lightning_eigendamage.channels.engine as channels_mod
import lightning_eigendamage.eigenbasis.pruner as pruner_mod
from lightning_eigendamage import (
    EigenDamagePruning,
    GradualRemoval,
    KFELayer,
    PruneOptions,
    PruningSchedule,
    enable_pruned_loading,
    restore_pruned,
)
from lightning_eigendamage.costs import count_flops
from lightning_eigendamage.curvature import capture_factors
from lightning_eigendamage.engine import engine_names, get_engine

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _cnn() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    return small_cnn(n_classes=10), conv_batches(3, n=16, size=12, n_classes=10)


def _resnet() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    return TinyResNet(), conv_batches(3, n=16, size=12, n_classes=5)


def _mlp() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
    g = torch.Generator().manual_seed(1)
    return net, [
        (torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)) for _ in range(3)
    ]


MODELS = {"cnn": _cnn, "resnet": _resnet, "mlp": _mlp}
# Sequential models: layer → the layer whose output channels it reads (for the hand-made slices).
READS = {
    "cnn": {"0": None, "1": "0", "3": "0", "5": "3", "9": "5", "12": "9"},
    "mlp": {"0": None, "2": "0", "4": "2"},
}


class Injected(RuntimeError):
    pass


def _raising_report(*args: Any, **kwargs: Any) -> Any:
    raise Injected("report failed after the surgery")


def _momentum_step(model: nn.Module, batches: list) -> tuple[torch.optim.Optimizer, dict[str, torch.Tensor]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    names = {id(p): n for n, p in model.named_parameters()}
    return opt, {names[id(p)]: s["momentum_buffer"].clone() for p, s in opt.state.items()}


def _kept(report: Any, total: dict[str, int], prefix: str = "") -> dict[str, list[int]]:
    """Kept channels of each group root, from the report's plain plan (``total``: the widths)."""
    kept = {name: list(range(n)) for name, n in total.items()}
    for g in report.groups:
        kept[g["root"].removeprefix(prefix)] = [c for c in range(g["channels"]) if c not in set(g["removed"])]
    return kept


def _hand_sliced(kind: str, name: str, old: torch.Tensor, kept: dict[str, list[int]]) -> torch.Tensor:
    """``old`` (a momentum of parameter ``name`` of a sequential model) sliced like its layer."""
    layer, _, role = name.rpartition(".")
    src = READS[kind][layer]
    if old.dim() == 1:  # bias, BatchNorm weight/bias: the layer's own output channels (BN: its source's)
        return old[kept[src if role in ("weight", "bias") and layer == "1" else layer]]
    out = old[kept[layer]]
    return out if src is None else out[:, kept[src]]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("structure", engine_names())
def test_engine_contract(structure: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = MODELS[kind]()
    if kind != "mlp":
        warm_up_bn(model, batches)
    opt, old_momentum = _momentum_step(model, batches)
    engine = get_engine(structure)
    options = PruneOptions(structure=structure, form="bottleneck" if structure == "eigenbasis" else "auto")
    x = batches[0][0]

    # capture in the engine's form of A, then analyse and decide
    cands = engine.candidates(model, options)
    captured = capture_factors(
        model,
        {c.name: c.hook_module for c in cands},
        batches,
        factors_for=[c.name for c in cands if c.skipped is None],
        a_form=engine.a_form,
        generator=torch.Generator().manual_seed(0),
    )
    analysis = engine.analyse(model, batches, options, captured=captured)
    plan = engine.decide(analysis, 0.4, options)
    data = plan.to_dict()  # plain data: through torch.save / weights_only and back, the same plan
    buf = io.BytesIO()
    torch.save(data, buf)
    buf.seek(0)
    assert type(plan).from_dict(torch.load(buf, weights_only=True)) == plan

    # a failure after the surgery: the model is bitwise as it was, with the same objects
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    monkeypatch.setattr(
        pruner_mod if structure == "eigenbasis" else channels_mod, "PruneReport", _raising_report
    )
    with pytest.raises(Injected):
        engine.apply(model, analysis, plan, options)
    monkeypatch.undo()
    assert dict(model.named_modules()) == modules and dict(model.named_parameters()) == params
    assert all(not m._state_dict_hooks for m in model.modules())  # no layer left marked as narrowed
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert all(p.dtype == torch.float32 for p in model.parameters())

    # apply for real
    dense_flops = count_flops(model, x)
    report, change = engine.apply(model, analysis, plan, options)
    assert report.structure == structure and report.flops_after == count_flops(model, x)
    assert report.flops_after < dense_flops or structure == "eigenbasis"  # (forced bottlenecks may grow)
    if structure == "channels":
        assert not any(isinstance(m, KFELayer) for m in model.modules()) and report.channels_removed > 0
    else:
        assert any(isinstance(m, KFELayer) for m in model.modules())

    # save → restore into a freshly built model: bitwise the same outputs
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh, _ = MODELS[kind]()
    restore_pruned(fresh, buf)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))

    # optimizer state carried, against the state transformed by hand
    new_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    transplant = engine.carry_optimizer_state(model, [opt], [new_opt], change)
    # (the eigenbasis's first-time rotation stages start fresh: nothing to carry)
    assert transplant.carried and all(why == "new rotation stage" for why in transplant.reset.values())
    new = {n: new_opt.state[p]["momentum_buffer"] for n, p in model.named_parameters() if p in new_opt.state}
    if structure == "eigenbasis":
        for name, ch in change.items():
            m = old_momentum[f"{name}.weight"].double()
            p_in, p_out = ch.q_a[:, ch.kept_in], ch.q_g[:, ch.kept_out]
            want = torch.einsum("oa,oihw,ib->abhw", p_out, m, p_in) if m.dim() == 4 else p_out.T @ m @ p_in
            torch.testing.assert_close(new[f"{name}.core.weight"].double(), want, rtol=1e-4, atol=1e-8)
    elif kind in READS:
        widths = {n: p.shape[0] for n, p in MODELS[kind]()[0].named_parameters() if n.endswith("weight")}
        kept = _kept(report, {n.rpartition(".")[0]: w for n, w in widths.items()})
        narrowed = [n for n in new if new[n].shape != old_momentum[n].shape]
        assert narrowed
        for name, m in new.items():
            assert torch.equal(m, _hand_sliced(kind, name, old_momentum[name], kept)), name
    else:  # residual: every narrowed momentum is a selection of the old one, element for element
        for name, sl in change.params.items():
            assert torch.equal(new[name].reshape(-1), old_momentum[name].reshape(-1)[sl.index])


# ---------------------------------------------------------------------------------------------
# The callback with channels
# ---------------------------------------------------------------------------------------------


class Recorder(EigenDamagePruning):
    """Keeps, per round, the momentum buffers before it and the engine's change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("verbose", False)
        super().__init__(*args, **kwargs)
        self.rounds: list[dict[str, Any]] = []

    def prune_model(self, trainer, pl_module, captured, fraction, example):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        before = {
            names[id(p)]: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
            for p, s in trainer.optimizers[0].state.items()
        }
        widths = {n: p.shape[0] for n, p in pl_module.named_parameters() if n.endswith("weight")}
        report, change = super().prune_model(trainer, pl_module, captured, fraction, example)
        self.rounds.append({"before": before, "report": report, "change": change, "widths": widths})
        return report, change


def test_channels_leave_fit_with_plain_narrower_layers() -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn(), lr=0.01)
    dense = copy.deepcopy(model.net)
    cb = Recorder({0: 0.4, 1: 0.3}, structure="channels")
    t = trainer(max_epochs=3, callbacks=[cb])
    t.fit(model, loader(image_data(64)))
    assert cb.structure == "channels" and [r.structure for r in cb.reports] == ["channels"] * 2
    assert all(rnd["change"].params for rnd in cb.rounds)
    # plain layers of the same types, narrower, no bottleneck stages
    assert [type(m) for m in model.net] == [type(m) for m in dense]
    assert not any(isinstance(m, KFELayer) for m in model.modules())
    assert model.net[3].out_channels < 32 and model.net[5].in_channels == model.net[3].out_channels
    assert model.net[12].out_features == 10
    x = torch.randn(2, 3, 12, 12)
    assert count_flops(model.net, x) == cb.reports[-1].flops_after < count_flops(dense, x)
    # the optimizer trains every parameter of the narrowed model, with state of its shape
    held = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}
    for p, state in t.optimizers[0].state.items():
        assert state["momentum_buffer"].shape == p.shape


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_channels_carry_optimizer_state_sliced_like_the_parameters(opt: str) -> None:
    """Right after a round, every state tensor of a narrowed parameter is the old state sliced by
    hand (kept output channels of the layer, kept input channels of the layer it reads)."""
    torch.manual_seed(0)
    model = LitClassifier(small_cnn(), opt=opt, lr=0.01)
    seen: dict[str, Any] = {}

    class AfterRound(Recorder):
        def _rebuild_optimizers(self, trainer, pl_module, old_optimizers, changes):
            out = super()._rebuild_optimizers(trainer, pl_module, old_optimizers, changes)
            names = {id(p): n for n, p in pl_module.named_parameters()}
            seen["state"] = {
                names[id(p)]: {k: v.clone() for k, v in s.items()}
                for p, s in trainer.optimizers[0].state.items()
            }
            return out

    cb = AfterRound({0: 0.4}, structure="channels")
    trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(64)))
    rnd = cb.rounds[0]
    widths = {n.removeprefix("net.").rpartition(".")[0]: w for n, w in rnd["widths"].items()}
    kept = _kept(rnd["report"], widths, prefix="net.")
    assert rnd["change"].params and set(seen["state"]) == {n for n, _ in model.named_parameters()}
    keys = ("exp_avg", "exp_avg_sq") if opt == "adam" else ("momentum_buffer",)
    for name, state in seen["state"].items():
        for key in keys:
            want = _hand_sliced("cnn", name.removeprefix("net."), rnd["before"][name][key], kept)
            assert torch.equal(state[key], want), (name, key)
        if opt == "adam":
            assert torch.equal(state["step"], rnd["before"][name]["step"])


def _fit(cb: EigenDamagePruning, model: LitClassifier, root: Path, **kw: Any) -> LitClassifier:
    ckpt = ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
    t = trainer(max_epochs=3, callbacks=[cb, ckpt], enable_checkpointing=True, default_root_dir=root)
    t.fit(model, loader(image_data(64)), **kw)
    return model


def test_channels_resume_into_a_fresh_model_ends_bitwise_equal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = small_cnn()
    fresh = copy.deepcopy(first)
    ref = _fit(
        EigenDamagePruning({0: 0.4, 1: 0.3}, structure="channels", verbose=False),
        LitClassifier(first),
        tmp_path / "a",
    )
    ckpt = torch.load(tmp_path / "a" / "epoch=0.ckpt", weights_only=True)
    assert ckpt["callbacks"]["EigenDamagePruning"]["structure"] == "channels"
    cb = EigenDamagePruning({0: 0.4, 1: 0.3}, structure="auto", verbose=False)
    resumed = _fit(cb, LitClassifier(fresh), tmp_path / "b", ckpt_path=str(tmp_path / "a" / "epoch=0.ckpt"))
    assert cb.structure == "channels" and cb.state_dict()["done"] == ["epoch:0", "epoch:1"]
    a, b = dict(ref.named_parameters()), dict(resumed.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the checkpoint loads into a freshly built module with the loading hook alone
    again = LitClassifier(small_cnn())
    restore_pruned(again, tmp_path / "a" / "epoch=2.ckpt")
    for name, p in again.named_parameters():
        assert torch.equal(p, a[name])


def test_channels_trace_the_graph_once_at_the_probe_and_reuse_it_every_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three rounds on a residual network: Torch-Pruning traces the model once (the probe), and the
    pruned network is bitwise the one re-tracing before every round gives."""
    traces: list[int] = []
    real = channels_mod.dependency_graph

    def counting(*args: Any, **kwargs: Any) -> Any:
        traces.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(channels_mod, "dependency_graph", counting)

    def run() -> LitClassifier:
        torch.manual_seed(0)
        model = LitClassifier(TinyResNet(), lr=0.01)
        cb = EigenDamagePruning({0: 0.3, 1: 0.3, 2: 0.2}, structure="channels", verbose=False)
        trainer(max_epochs=3, callbacks=[cb]).fit(model, loader(image_data(64, n_classes=5)))
        assert [r.channels_removed > 0 for r in cb.reports] == [True] * 3
        return model

    once = run()
    assert len(traces) == 1
    traces.clear()
    monkeypatch.setattr(channels_mod.ChannelGraph, "describes", lambda self, model: False)
    every = run()
    assert len(traces) == 4  # the probe's, then one per round
    a, b = dict(once.named_parameters()), dict(every.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_traced_graph_stops_describing_a_model_whose_modules_change() -> None:
    model, batches = _resnet()
    engine, options = get_engine("channels"), PruneOptions(structure="channels").resolved("channels")
    prepared = engine.check(model, batches[0][0], options)
    assert prepared.describes(model) and not prepared.describes(copy.deepcopy(model))
    model.l1.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    assert not prepared.describes(model)


def test_resuming_with_the_other_structure_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _fit(
        EigenDamagePruning({0: 0.4}, structure="channels", verbose=False),
        LitClassifier(small_cnn()),
        tmp_path,
    )
    cb = EigenDamagePruning({0: 0.4}, structure="eigenbasis", verbose=False)
    with pytest.raises(ValueError, match="structure='channels'"):
        _fit(cb, LitClassifier(small_cnn()), tmp_path / "b", ckpt_path=str(tmp_path / "epoch=0.ckpt"))


def test_auto_prunes_channels_where_the_graph_builds(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    cb = EigenDamagePruning({0: 0.4}, structure="auto", verbose=False)
    assert cb.structure == "auto"
    with caplog.at_level(logging.INFO):
        trainer(max_epochs=1, callbacks=[cb]).fit(LitClassifier(small_cnn()), loader(image_data(32)))
    assert cb.structure == "channels" and cb.reports[0].structure == "channels"
    assert "structure='auto' prunes channels" in caplog.text
    assert cb.reports[0].structure_reason == "the channel dependency graph of this model was built"
    assert cb.state_dict()["structure_reason"] == cb.reports[0].structure_reason


def test_auto_falls_back_to_the_eigenbasis_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch_pruning as tp

    def fails(self, *args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fails)
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    cb = EigenDamagePruning({0: 0.4}, structure="auto", verbose=False)
    with caplog.at_level(logging.INFO):
        trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(32)))
    assert cb.structure == "eigenbasis" and cb.reports[0].structure == "eigenbasis"
    assert any(isinstance(m, KFELayer) for m in model.modules())
    assert "prunes eigenbasis (channels are not possible here: Torch-Pruning could not build" in caplog.text
    # the reason is in the report too (and in prune(structure="auto")'s)
    why = cb.reports[0].structure_reason
    assert why.startswith("channels are not possible here: Torch-Pruning could not build")
    assert type(cb.reports[0]).from_dict(cb.reports[0].to_dict()).structure_reason == why
    from lightning_eigendamage.front import prune as front_prune

    net, batches = _cnn()
    with pytest.warns(UserWarning, match="prunes the eigenbasis"):
        report = front_prune(net, batches, ratio=0.3, structure="auto")
    assert report.structure == "eigenbasis"
    assert report.structure_reason.startswith("channels are not possible")
    # structure="channels" on the same model fails before any training step
    model = LitClassifier(small_cnn())
    with pytest.raises(RuntimeError, match="cannot prune this model: Torch-Pruning could not build"):
        trainer(max_epochs=1, callbacks=[EigenDamagePruning({0: 0.4}, structure="channels")]).fit(
            model, loader(image_data(32))
        )
    assert model.steps_run == 0


def test_a_channels_target_in_the_schedule_removes_that_share_of_the_channels() -> None:
    """``PruningSchedule(target="channels")`` with ``structure="channels"``: a round at 0.25 removes
    ⌊0.25·n⌋ of the ``n`` prunable channels the report counts, as ``"directions"`` does there; the
    eigenbasis refuses it when the callback is built."""
    counts = {}
    for target in ("channels", "directions"):
        torch.manual_seed(0)
        model = LitClassifier(small_cnn(), lr=0.01)
        cb = Recorder(PruningSchedule(epochs={0: 0.25}, target=target), structure="channels")
        trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(64)))
        report = cb.reports[0]
        counts[target] = (report.channels_removed, report.channels_total)
    assert counts["channels"] == counts["directions"]
    removed, total = counts["channels"]
    assert removed == int(0.25 * total)
    with pytest.raises(ValueError, match="target"):
        EigenDamagePruning(PruningSchedule(epochs={0: 0.5}, target="channels"), structure="eigenbasis")


def test_auto_takes_options_one_structure_takes_and_checks_them_against_its_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``target="channels"`` (channels only) with the default ``structure="auto"``: the callback
    is built (it refused, asking for an explicit structure), prunes channels where the graph
    builds, and where it does not, refuses before any training step, naming the structure chosen
    and why. Options no structure takes are refused at construction."""
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    cb = Recorder(PruningSchedule(epochs={0: 0.25}, target="channels"), structure="auto")
    trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(32)))
    assert cb.structure == "channels" and cb.reports[0].channels_removed > 0

    import torch_pruning as tp

    def fails(self, *args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", fails)
    model = LitClassifier(small_cnn())
    cb = EigenDamagePruning(PruningSchedule(epochs={0: 0.25}, target="channels"), verbose=False)
    with pytest.raises(
        ValueError, match=r"structure='auto' chose eigenbasis for this model \(channels are not"
    ):
        trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(32)))
    assert model.steps_run == 0
    with pytest.raises(ValueError, match="no structure takes these options"):
        EigenDamagePruning({0: 0.5}, form="bottleneck", rank_by="relative")


def test_channel_options_are_checked_in_the_constructor() -> None:
    # gradual removal works with both structures (an engine without a penalty would be refused)
    assert EigenDamagePruning({2: 0.5}, structure="channels", gradual=GradualRemoval(steps=2, penalty=1.0))
    with pytest.raises(ValueError, match="form='bottleneck' applies to other structures"):
        EigenDamagePruning({0: 0.5}, structure="channels", form="bottleneck")
    with pytest.raises(ValueError, match="does not apply to structure='eigenbasis'"):
        EigenDamagePruning({0: 0.5}, structure="eigenbasis", rank_by="relative")
    with pytest.raises(ValueError, match="structure must be one of"):
        EigenDamagePruning({0: 0.5}, structure="filters")
    assert EigenDamagePruning({0: 0.5}, structure="channels").layer_cap == 0.95
    assert EigenDamagePruning({0: 0.5}, structure="eigenbasis").layer_cap == 0.75


def test_lightning_cli_config_selects_the_structure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("jsonargparse")
    import sys

    import test_cli

    monkeypatch.setattr(sys, "argv", ["test_structures"])
    init_args = textwrap.indent("schedule: {0: 0.5}\nstructure: channels\nverbose: false", " " * 8)
    path = tmp_path / "config.yaml"
    path.write_text(test_cli.CONFIG.format(root=tmp_path / "root", init_args=init_args))
    cli = test_cli.run_cli(["fit", "--config", str(path)])
    cb = test_cli.the_callback(cli.trainer)
    assert cb.options.structure == "channels" and cb.reports[0].structure == "channels"
    assert not any(isinstance(m, KFELayer) for m in cli.model.modules())
    assert cli.model.net[2].out_channels < 32


# ---------------------------------------------------------------------------------------------
# prune(structure=...) for plain PyTorch
# ---------------------------------------------------------------------------------------------


def test_prune_front_gives_every_structure() -> None:
    from lightning_eigendamage import PruningWarning, prune

    model, batches = _cnn()
    warm_up_bn(model, batches)
    x = batches[0][0]
    report = prune(model, batches, ratio=0.5, structure="channels", target="flops")
    assert report.structure == "channels" and not any(isinstance(m, KFELayer) for m in model.modules())
    assert report.flops_after == count_flops(model, x[:1]) <= 0.5 * report.flops_before * 1.03
    model, batches = _cnn()
    assert prune(model, batches, ratio=0.3, structure="auto").structure == "channels"
    model, batches = _cnn()
    report = prune(model, batches, ratio=0.3)  # the default keeps the eigenbasis
    assert report.structure == "eigenbasis" and any(isinstance(m, KFELayer) for m in model.modules())
    model, batches = _cnn()
    with pytest.warns(PruningWarning, match="prunes the eigenbasis: channels are not possible"):
        report = prune(model, batches, ratio=0.3, structure="auto", forward_fn=lambda m, b: m(b[0]))
    assert report.structure == "eigenbasis"
    with pytest.raises(ValueError, match="form='fold_in' applies to other structures"):
        prune(model, batches, ratio=0.3, structure="channels", form="fold_in")
    with pytest.raises(ValueError, match="structure must be one of"):
        prune(model, batches, ratio=0.3, structure="filters")


@pytest.mark.parametrize(
    "fisher, precision", [("true", "32-true"), ("empirical", "32-true"), ("empirical", "bf16-mixed")]
)
def test_channels_at_start_and_step_points_with_accumulation(fisher: str, precision: str) -> None:
    from lightning_eigendamage import PruningSchedule

    torch.manual_seed(0)
    model = LitClassifier(small_cnn(), lr=0.01)
    cb = EigenDamagePruning(
        PruningSchedule(at_start=0.3, steps={3: 0.3}, fisher_batches=4),
        structure="channels",
        fisher=fisher,
        verbose=False,
    )
    t = trainer(max_epochs=2, accumulate_grad_batches=2, precision=precision, callbacks=[cb])
    t.fit(model, loader(image_data(64)))
    assert [r.structure for r in cb.reports] == ["channels", "channels"]
    assert all(r.batches > 0 and r.channels_removed > 0 for r in cb.reports)
    assert cb.reports[1].flops_after < cb.reports[0].flops_after < cb.reports[0].flops_before
    assert not any(isinstance(m, KFELayer) for m in model.modules())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize(
    "old, new",
    [
        ("pruner", "eigenbasis.pruner"),
        ("criteria", "eigenbasis.criteria"),
        ("plan", "eigenbasis.plan"),
        ("surgery", "eigenbasis.surgery"),
        ("layers", "eigenbasis.layers"),
        ("baselines", "channels.baselines"),
        ("callback", "lightning.callback"),
        ("schedule", "lightning.schedule"),
    ],
)
def test_old_module_paths_keep_working_with_a_deprecation_warning(old: str, new: str) -> None:
    import importlib
    import sys

    sys.modules.pop(f"lightning_eigendamage.{old}", None)
    with pytest.warns(
        DeprecationWarning, match=f"lightning_eigendamage.{old} moved to lightning_eigendamage.{new}"
    ):
        moved = importlib.import_module(f"lightning_eigendamage.{old}")
    assert moved is importlib.import_module(f"lightning_eigendamage.{new}")  # the same module object


def test_the_former_modules_names_are_in_their_packages() -> None:
    from lightning_eigendamage.channels import ChannelEngine, prune_channels, remove_channels  # noqa: F401
    from lightning_eigendamage.eigenbasis import to_kfe, weight_as_3d  # noqa: F401


def test_a_third_engine_needs_only_its_class_and_one_registration_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An engine registered from outside the package is a valid ``structure`` of the callback and
    of ``prune()``, with nothing else changed (here: the channel engine ranking by plain damage)."""
    import lightning_eigendamage.engine as engine_mod
    from lightning_eigendamage import PruningEngine, prune, register_engine
    from lightning_eigendamage.channels import ChannelEngine

    class DamageChannels(ChannelEngine):
        name = "test-damage-channels"
        defaults = {"layer_cap": 0.9, "rank_by": "damage"}

    monkeypatch.setattr(engine_mod, "_ENGINES", dict(engine_mod._ENGINES))  # undone after the test
    assert isinstance(register_engine(DamageChannels()), PruningEngine)
    cb = EigenDamagePruning({0: 0.4}, structure="test-damage-channels", verbose=False)
    assert cb.options.layer_cap == 0.9 and cb.options.rank_by == "damage"
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(32)))
    assert cb.structure == "test-damage-channels" and cb.reports[0].channels_removed > 0
    model, batches = _cnn()
    assert prune(model, batches, ratio=0.3, structure="test-damage-channels").channels_removed > 0

    class Shadow(ChannelEngine):  # a built-in name: prune() would never run it
        name = "eigenbasis"

    with pytest.raises(ValueError, match="structure='eigenbasis' is built in"):
        register_engine(Shadow())


class _Loadable(LitClassifier):
    """Built from hyperparameters alone, with pruned loading: ``load_from_checkpoint`` works."""

    def __init__(self, lr: float = 0.01) -> None:
        torch.manual_seed(0)
        super().__init__(small_cnn(), lr=lr)
        self.save_hyperparameters()
        enable_pruned_loading(self)


def test_channels_checkpoint_loads_with_load_from_checkpoint_all_or_nothing(tmp_path: Path) -> None:
    model = _Loadable()
    _fit(EigenDamagePruning({0: 0.4}, structure="channels", verbose=False), model, tmp_path)
    path = tmp_path / "epoch=2.ckpt"
    loaded = _Loadable.load_from_checkpoint(path).eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert loaded.net[3].out_channels == model.net[3].out_channels < 32
    # a checkpoint whose narrowed BatchNorm disagrees with its conv: refused, the model untouched
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    sd["net.1.running_mean"] = sd["net.1.running_mean"][:-1].clone()
    fresh = _Loadable()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises((RuntimeError, ValueError)):
        fresh.load_state_dict(sd)
    after = fresh.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
