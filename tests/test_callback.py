"""EigenDamagePruning: fits that prune, LR/optimizer continuity, capture correctness, errors."""

from __future__ import annotations

import copy
import io
import logging
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.plugins import MixedPrecision
from lit_models import (
    LitClassifier,
    MemoryLogger,
    Snapshot,
    image_data,
    loader,
    resnet18,
    small_cnn,
    trainer,
)
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, MultiStepLR, StepLR
from torch.utils.data import DataLoader, Dataset

from lightning_eigendamage import EigenDamagePruning, KFELayer, PruningSchedule, enable_pruned_loading
from lightning_eigendamage.costs import count_flops
from lightning_eigendamage.curvature import KFACapture, capture_factors
from lightning_eigendamage.eigenbasis.pruner import find_layers


class Recording(EigenDamagePruning):
    """Records, per round, the factors, the changes, the old optimizer state and the step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("verbose", False)
        kwargs.setdefault("structure", "eigenbasis")  # these tests are about the eigenbasis
        super().__init__(*args, **kwargs)
        self.rounds: list[dict[str, Any]] = []

    def prune_model(self, trainer, pl_module, captured, fraction, example):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        old_state = {}
        for opt in trainer.optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    if p in opt.state and opt.state[p]:
                        old_state[names[id(p)]] = {
                            k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()
                        }
        factors = {
            n: (lf.a().clone(), lf.g().clone()) for n, lf in captured.layers.items() if lf.a_sum is not None
        }
        report, changes = super().prune_model(trainer, pl_module, captured, fraction, example)
        self.rounds.append(
            dict(
                step=trainer.global_step,
                epoch=trainer.current_epoch,
                batches=captured.batches,
                skipped=captured.skipped_batches,
                factors=factors,
                changes=changes,
                old_state=old_state,
            )
        )
        return report, changes


def _fit(model: pl.LightningModule, cb: pl.Callback | list, data=None, **kw: Any) -> pl.Trainer:
    t = trainer(callbacks=cb if isinstance(cb, list) else [cb], **kw)
    t.fit(model, data if data is not None else loader(image_data(64), 16))
    return t


# ---------------------------------------------------------------------------------------------
# Acceptance: a fit prunes, the optimizer holds the new parameters, everything keeps training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_fit_prunes_rebuilds_optimizer_and_trains_every_parameter(arch: str) -> None:
    torch.manual_seed(0)
    if arch == "cnn":
        net, ds = small_cnn(), image_data(64, 12)
    else:
        net, ds = resnet18(), image_data(32, 32)
    model = LitClassifier(net, lr=0.02)
    example = ds[:2][0]
    dense_flops = count_flops(model, example)
    cb = EigenDamagePruning(schedule={0: 0.5}, verbose=False, structure="eigenbasis")
    snap = Snapshot(epochs=(0,))  # after cb in the list: the state right after pruning
    t = _fit(model, [cb, snap], loader(ds, 16), max_epochs=3)

    assert len(cb.reports) == 1
    assert any(isinstance(m, KFELayer) for m in model.modules())
    flops = count_flops(model, example)
    assert flops < dense_flops
    assert flops == cb.reports[0].flops_after
    # The optimizer holds exactly the model's current parameters, each once.
    (opt,) = t.optimizers
    held = [p for g in opt.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held})
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    # Every parameter (new rotation stages and cores included) changed after the prune.
    after = dict(model.named_parameters())
    assert set(after) <= set(snap.states[0])
    frozen = [n for n, p in after.items() if torch.equal(p.detach(), snap.states[0][n])]
    assert frozen == []


# ---------------------------------------------------------------------------------------------
# Acceptance: LR schedulers continue where they were
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, interval, schedule",
    [
        (lambda o: StepLR(o, 1, 0.5), "epoch", {0: 0.5}),
        (lambda o: MultiStepLR(o, [2], 0.1), "epoch", {0: 0.5}),
        (lambda o: CosineAnnealingLR(o, T_max=7), "step", PruningSchedule(steps={3: 0.5}, fisher_batches=2)),
    ],
    ids=["StepLR", "MultiStepLR", "CosineAnnealingLR-step"],
)
def test_lr_sequence_is_the_same_with_and_without_pruning(make, interval, schedule) -> None:
    def lrs(prune: bool) -> tuple[list[float], int]:
        torch.manual_seed(0)
        model = LitClassifier(small_cnn(), scheduler=make, interval=interval)
        log = MemoryLogger()
        cbs: list = [LearningRateMonitor(logging_interval="step")]
        if prune:
            cbs.append(EigenDamagePruning(schedule=schedule, verbose=False, structure="eigenbasis"))
        t = _fit(model, cbs, max_epochs=3, logger=log, log_every_n_steps=1)
        if prune:
            assert len(cbs[1].reports) == 1
        return log.series("lr-SGD"), t.lr_scheduler_configs[0].scheduler.last_epoch

    (plain, plain_last), (pruned, pruned_last) = lrs(False), lrs(True)
    assert len(plain) == 12 and len(set(plain)) >= 2  # one per step, and the LR does change
    assert pruned == pytest.approx(plain, rel=1e-12, abs=0.0)
    assert pruned_last == plain_last


# ---------------------------------------------------------------------------------------------
# Acceptance: optimizer state carried over (against a hand computation) or documented reset
# ---------------------------------------------------------------------------------------------


def _as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def _expected_momentum(old_kind: str, old_has: set[str], change, old: dict, name: str) -> dict[str, Any]:
    """Hand computation of the documented rules, on the parameters' own layouts (numpy einsum).

    ``old`` maps old parameter names to momentum buffers. Returns new-parameter name → expected
    buffer, or "reset".
    """
    qa, qg = _as_np(change.q_a), _as_np(change.q_g)
    p_in, p_out = qa[:, change.kept_in], qg[:, change.kept_out]
    has_in = change.form in ("bottleneck", "fold_out")
    has_out = change.form in ("bottleneck", "fold_in")
    core_old = f"{name}.core.weight" if old_kind == "kfe" else f"{name}.weight"
    prefix = f"{name}.core" if change.form != "dense" else name
    out: dict[str, Any] = {}
    m = _as_np(old[core_old])
    if (not has_out and "rout" in old_has) or (not has_in and "rin" in old_has):
        out[f"{prefix}.weight"] = "reset"
    else:
        left = p_out.T if has_out else np.eye(m.shape[0])
        right = p_in if has_in else np.eye(m.shape[1])
        if m.ndim == 4:
            out[f"{prefix}.weight"] = np.einsum("ao,oihw,ib->abhw", left, m, right)
        else:
            out[f"{prefix}.weight"] = left @ m @ right
    if has_in:
        key = f"{name}.rotate_in.weight"
        out[key] = (p_in.T @ _as_np(old[key]).reshape(p_in.shape[0], -1)) if "rin" in old_has else "reset"
    if has_out:
        key = f"{name}.rotate_out.weight"
        out[key] = (_as_np(old[key]).reshape(-1, p_out.shape[0]) @ p_out) if "rout" in old_has else "reset"
    bias_old = [k for k in old if k.startswith(f"{name}.") and k.endswith("bias")]
    if bias_old:
        bias_new = f"{name}.rotate_out.bias" if has_out else f"{prefix}.bias"
        out[bias_new] = _as_np(old[bias_old[0]])
    return out


def test_sgd_momentum_is_rotated_and_sliced_like_the_weights() -> None:
    """Two rounds: the first rebuilds plain layers, the second already pruned ones (rotations
    with momentum of their own). Carried buffers are compared with a numpy hand computation,
    untouched parameters must keep theirs exactly, and resets must be reported."""
    torch.manual_seed(0)
    model = LitClassifier(small_cnn(), lr=0.02, momentum=0.9)
    cb = Recording(schedule={0: 0.5, 1: 0.5})
    snap = Snapshot(epochs=(0, 1))
    _fit(model, [cb, snap], max_epochs=3)
    assert len(cb.rounds) == 2
    checked = {"carried": 0, "reset": 0, "kept": 0, "second-round rotations": 0}
    for r, rnd in enumerate(cb.rounds):
        old = {n: s["momentum_buffer"] for n, s in rnd["old_state"].items()}
        new = snap.optim[r]  # after the prune of epoch r: name → state
        touched, resets = set(), set()
        for name, change in rnd["changes"].items():
            kfe = isinstance(change.old, KFELayer)
            old_has = set()
            if kfe:
                old_has = {
                    k for k, m in (("rin", change.old.rotate_in), ("rout", change.old.rotate_out)) if m
                }
            for pname, want in _expected_momentum(
                "kfe" if kfe else "plain", old_has, change, old, name
            ).items():
                touched.add(pname)
                if isinstance(want, str):
                    assert pname not in new, f"{pname} should start with fresh state"
                    resets.add(pname)
                    continue
                got = _as_np(new[pname]["momentum_buffer"])
                np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-6)
                checked["carried"] += 1
                if "rotate" in pname:
                    checked["second-round rotations"] += 1
            touched |= {f"{name}.{k}" for k, _ in change.new.named_parameters()}
        checked["reset"] += len(resets)
        assert set(cb.transplants[r]["reset"]) == resets
        # Parameters of layers that were not rebuilt keep their momentum exactly.
        for pname, state in new.items():
            if pname not in touched:
                assert torch.equal(state["momentum_buffer"], old[pname]), pname
                checked["kept"] += 1
    assert checked["carried"] >= 4 and checked["kept"] >= 4 and checked["reset"] >= 1
    assert checked["second-round rotations"] >= 1, checked


# ---------------------------------------------------------------------------------------------
# Acceptance: validation before training, no prunable layer, skipped layers are logged
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, err, match",
    [
        ({3: 0.5}, ValueError, r"epoch\(s\) \[3\].*max_epochs=3\) only runs epochs 0\.\.2"),
        ({0: 1.0}, ValueError, r"must be a number in \[0, 1\)"),
        ({"epochz": {0: 0.5}}, ValueError, r"unknown schedule key"),
        ({}, ValueError, r"schedule is empty.*e\.g\."),
        (PruningSchedule(steps={100: 0.5}), ValueError, r"step\(s\) \[100\].*max_steps=10"),
    ],
)
def test_bad_schedules_raise_before_training(schedule, err, match) -> None:
    model = LitClassifier(small_cnn())
    with pytest.raises(err, match=match):
        _fit(model, EigenDamagePruning(schedule=schedule, structure="eigenbasis"), max_epochs=3, max_steps=10)
    assert model.steps_run == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fisher="fisher"), r"fisher must be one of \('true', 'empirical'\)"),
        (dict(layer_cap=0.0), r"layer_cap must be in \(0, 1\]"),
        (dict(min_rank=0), r"min_rank must be an integer ≥ 1"),
        (dict(exclude=[3]), r"exclude takes module instances"),
        (dict(input_fn="x"), r"input_fn must be a callable"),
        (dict(method="obd"), r"method must be one of"),
    ],
)
def test_bad_options_raise_in_init(kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        EigenDamagePruning(schedule={0: 0.5}, **kwargs, structure="eigenbasis")


class _Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dw(x).mean((2, 3))


def test_model_without_prunable_layer_raises_at_setup() -> None:
    model = LitClassifier(_Depthwise())
    with pytest.raises(ValueError, match=r"no prunable layer.*net\.dw: depthwise convolution"):
        _fit(model, EigenDamagePruning(schedule={0: 0.5}, structure="eigenbasis"), max_epochs=2)
    assert model.steps_run == 0


def test_model_whose_only_layer_is_the_classifier_raises_before_training() -> None:
    model = LitClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 10)))
    with pytest.raises(ValueError, match=r"no prunable layer.*net\.1: last layer \(exempt_last=True\)"):
        _fit(model, EigenDamagePruning(schedule={0: 0.5}, structure="eigenbasis"), max_epochs=2)
    assert model.steps_run == 0


def test_stochastic_weight_averaging_beside_the_callback_is_refused_before_training() -> None:
    from lightning.pytorch.callbacks import StochasticWeightAveraging

    model = LitClassifier(small_cnn())
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    with pytest.raises(ValueError, match="cannot run beside StochasticWeightAveraging"):
        _fit(model, [EigenDamagePruning(schedule={0: 0.5}, structure="eigenbasis"), swa], max_epochs=2)
    assert model.steps_run == 0


def test_ema_weight_averaging_beside_the_callback_is_refused_before_training() -> None:
    """Lightning's WeightAveraging (EMA) keeps a copy of the weights, as SWA does: its first update
    after a round failed on the changed shapes."""
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip("this Lightning has no EMAWeightAveraging")
    model = LitClassifier(small_cnn())
    ema = callbacks.EMAWeightAveraging(decay=0.9)
    with pytest.raises(ValueError, match="cannot run beside EMAWeightAveraging"):
        _fit(model, [EigenDamagePruning(schedule={0: 0.5}), ema], max_epochs=2)
    assert model.steps_run == 0


def test_one_instance_fitting_a_new_model_starts_over_and_the_same_model_goes_on() -> None:
    import pickle

    cb = EigenDamagePruning(schedule={0: 0.5}, verbose=False, structure="eigenbasis")
    first, second = LitClassifier(small_cnn()), LitClassifier(small_cnn())
    _fit(first, cb, max_epochs=1)
    assert len(cb.reports) == 1 and any(isinstance(m, KFELayer) for m in first.modules())
    _fit(second, cb, max_epochs=1)  # a fresh model, no checkpoint: pruned too, one report
    assert len(cb.reports) == 1 and any(isinstance(m, KFELayer) for m in second.modules())
    assert cb.reports[0].params_before == sum(p.numel() for p in small_cnn().parameters())
    pickle.loads(pickle.dumps(cb))  # spawning launchers pickle callbacks
    again = cb.reports[0]
    _fit(second, cb, max_epochs=2)  # the same model fitted again: its round is not repeated
    assert cb.reports == [again]


def test_single_logit_with_the_categorical_likelihood_raises_before_training() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 8), nn.ReLU(), nn.Linear(8, 1))
    model = LitClassifier(net)
    with pytest.raises(ValueError, match=r"single logit on class_dim=-1.*likelihood='bernoulli'"):
        _fit(model, EigenDamagePruning(schedule={0: 0.5}, structure="eigenbasis"), max_epochs=2)
    assert model.steps_run == 0


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.body = nn.Conv2d(16, 32, 3, padding=1)
        self.aux = nn.Linear(32, 32)
        self.unused = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.body(torch.relu(self.grouped(torch.relu(self.stem(x))))))
        return self.head(torch.relu(self.aux(h.mean((2, 3)))))


def test_skipped_layers_are_logged_with_reasons(caplog) -> None:
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
            model = LitClassifier(_Mixed())
            cb = EigenDamagePruning(
                schedule={0: 0.5}, exclude=["net.aux"], verbose=False, structure="eigenbasis"
            )
            _fit(model, cb, max_epochs=2)
    finally:
        log.removeHandler(caplog.handler)
    text = caplog.text
    # one line per reason, as the reports word them
    assert "  1× grouped convolution (groups=2): net.grouped\n" in text
    assert "  1× excluded by user: net.aux\n" in text
    assert "  1× never called in the forward pass (called functionally, or unused): net.unused\n" in text
    assert "  1× last layer (exempt_last=True): net.head\n" in text
    skipped = {r.name: r.skipped for r in cb.reports[0].layers if r.skipped}
    assert set(skipped) == {"net.grouped", "net.aux", "net.unused", "net.head"}


# ---------------------------------------------------------------------------------------------
# Capture: what the callback accumulates equals an independent capture; training is untouched
# ---------------------------------------------------------------------------------------------


def _reference_factors(net: nn.Module, ds, batch_size: int, **kw: Any) -> dict[str, tuple]:
    ref = LitClassifier(copy.deepcopy(net))
    cands = find_layers(ref)
    res = capture_factors(
        ref,
        {c.name: c.hook_module for c in cands},
        loader(ds, batch_size),
        factors_for=[c.name for c in cands if c.skipped is None],
        **kw,
    )
    return {n: (lf.a(), lf.g()) for n, lf in res.layers.items() if lf.a_sum is not None}


def _assert_factors_close(got: dict, want: dict, rtol: float) -> None:
    assert set(got) == set(want) and got
    for name in want:
        for x, y in zip(got[name], want[name]):
            err = float((x.double() - y.double()).norm() / y.double().norm())
            assert err < rtol, (name, err)


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_captured_factors_match_an_independent_capture(fisher: str) -> None:
    """lr=0: the weights stay put, so the callback's factors (accumulated during training, with
    accumulate_grad_batches=2 for the empirical Fisher) must equal capture_factors() run on the
    same batches afterwards."""
    torch.manual_seed(0)
    net, ds = small_cnn(bn=False), image_data(48)
    model = LitClassifier(copy.deepcopy(net), lr=0.0, momentum=0.0)
    cb = Recording(schedule={0: 0.5}, fisher=fisher, seed=3)
    _fit(model, cb, loader(ds, 16), max_epochs=1, accumulate_grad_batches=2)
    assert cb.rounds[0]["batches"] == 3
    gen = torch.Generator().manual_seed(3)
    want = _reference_factors(net, ds, 16, fisher=fisher, generator=gen)
    _assert_factors_close(cb.rounds[0]["factors"], want, rtol=1e-5)


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_fisher_examples_takes_the_factors_from_every_s_th_example(fisher: str) -> None:
    """fisher_examples=4 of batches of 16: the factors are those of examples 0, 4, 8, … alone
    (the true Fisher's sampled pass runs on them once the first batch checked that it may; the
    empirical Fisher's hooks thin the rows of your own step, which accumulates over 2 batches).
    The true Fisher's first batch samples labels for all 16 examples: its G is compared only
    with the empirical one's thinning (exact), A in both cases."""
    torch.manual_seed(0)
    net, ds = small_cnn(bn=False), image_data(48)
    model = LitClassifier(copy.deepcopy(net), lr=0.0, momentum=0.0)
    cb = Recording(schedule=PruningSchedule(epochs={0: 0.5}, fisher_examples=4), fisher=fisher, seed=3)
    _fit(model, cb, loader(ds, 16), max_epochs=1, accumulate_grad_batches=2)
    assert cb.rounds[0]["batches"] == 3
    gen = torch.Generator().manual_seed(3)
    thinned = torch.utils.data.Subset(ds, range(0, 48, 4))
    want = _reference_factors(net, thinned, 4, fisher=fisher, generator=gen)
    whole = _reference_factors(net, ds, 16, fisher=fisher, generator=torch.Generator().manual_seed(3))
    got = cb.rounds[0]["factors"]
    if fisher == "true":  # A only (the labels are sampled)
        got, want, whole = ({n: f[:1] for n, f in d.items()} for d in (got, want, whole))
    _assert_factors_close(got, want, rtol=1e-5)
    with pytest.raises(AssertionError):  # and not those of every example
        _assert_factors_close(got, whole, rtol=1e-5)


@pytest.mark.parametrize(
    ("structure", "rows", "conv_rows"), [("channels", 32, 32 * 6 * 3), ("eigenbasis", 64, 64 * 36 * 9)]
)
def test_fisher_examples_auto_is_the_engine_s_choice(structure: str, rows: int, conv_rows: int) -> None:
    """The default fisher_examples="auto": 32 examples of each batch of 64 for the channel
    engine, all of them for the eigenbasis (one row per example for the Linear layers). The 3×3
    conv on 6×6 maps: the channel engine's patch-form ``A`` reads every other column of the output
    map of those 32 (6 rows of 3 each); the eigenbasis' channel form every read of every example
    (36 positions, 9 offsets)."""

    class Rows(EigenDamagePruning):
        def prune_model(self, trainer, pl_module, captured, fraction, example):
            self.rows = {n: lf.a_rows for n, lf in captured.layers.items() if lf.a_sum is not None}
            return super().prune_model(trainer, pl_module, captured, fraction, example)

    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    cb = Rows(schedule=PruningSchedule(at_start=0.3, fisher_batches=1), structure=structure, verbose=False)
    assert cb.schedule.fisher_examples == "auto"
    _fit(model, cb, loader(image_data(64), 64), max_epochs=1)
    assert cb.rows["net.9"] == rows
    assert cb.rows["net.5"] == conv_rows


@pytest.mark.parametrize("progress", [True, False])
def test_progress_prints_each_round_s_phases(progress: bool, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    schedule = PruningSchedule(at_start=0.3, fisher_batches=1)
    cb = EigenDamagePruning(schedule, structure="channels", verbose=False, progress=progress)
    assert cb.progress is progress
    _fit(model, cb, loader(image_data(32), 16), max_epochs=1)
    err = capsys.readouterr().err
    phases = ("channels: analysis (curvature capture and scores)", "channels: decision", "channels: surgery")
    for phase in phases:
        assert (f"{phase}" in err) is progress, (phase, err[-2000:])
    assert ("done in" in err) is progress


def test_fp16_with_grad_scaler_gives_float32_factors() -> None:
    """Empirical Fisher under float16 autocast with a GradScaler (loss × 2¹²): G must be unscaled.
    Tolerance: 2 % relative (Frobenius) per factor, float16 activations and gradients."""

    def factors(**kw: Any) -> Recording:
        torch.manual_seed(0)
        model = LitClassifier(small_cnn(bn=False), lr=0.0, momentum=0.0)
        cb = Recording(schedule={0: 0.5}, fisher="empirical")
        _fit(model, cb, loader(image_data(48), 16), max_epochs=1, **kw)
        return cb

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10_000)
    fp32 = factors()
    fp16 = factors(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert scaler.get_scale() == 2.0**12
    assert fp16.rounds[0]["batches"] == fp32.rounds[0]["batches"] == 3
    _assert_factors_close(fp16.rounds[0]["factors"], fp32.rounds[0]["factors"], rtol=2e-2)


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_bf16_mixed_fit_prunes_on_cpu(fisher: str) -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    cb = EigenDamagePruning(schedule={0: 0.5}, fisher=fisher, verbose=False, structure="eigenbasis")
    _fit(model, cb, max_epochs=2, precision="bf16-mixed")
    (report,) = cb.reports
    assert report.skipped_batches == 0 and report.batches == 4
    assert report.flops_after < report.flops_before


def test_capture_under_autocast_is_computed_in_float32() -> None:
    """A activations summed under float16 autocast would overflow (65504): the hooks turn it off."""
    lin = nn.Linear(64, 8)
    x = 40.0 * torch.randn(256, 64)
    caps = []
    for autocast in (False, True):
        cap = KFACapture({"lin": lin})
        with cap, torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            cap.begin_batch()
            lin(x).float().sum().backward()
            assert cap.end_batch(256)
        caps.append(cap.layers["lin"])
    assert torch.isfinite(caps[1].a_sum).all()
    ref = (x.double().T @ x.double()) / 256
    for lf in caps:  # float32 products: relative error ~1e-7 (float16 would be ~1e-3 or inf)
        assert float((lf.a() - ref).norm() / ref.norm()) < 1e-5


def test_true_fisher_capture_leaves_training_bit_identical() -> None:
    """The sampled backward touches neither .grad, BatchNorm statistics, dropout/global RNG nor
    the optimizer: up to the prune the run equals one without the callback, bit for bit."""
    torch.manual_seed(0)
    net, ds = small_cnn(bn=True, dropout=0.3), image_data(64)

    def run(with_cb: bool) -> Snapshot:
        model = LitClassifier(copy.deepcopy(net))
        snap = Snapshot(epochs=(0, 1))  # before the pruning callback: sees the state before pruning
        cbs: list = [snap] + (
            [EigenDamagePruning(schedule={1: 0.5}, verbose=False, structure="eigenbasis")] if with_cb else []
        )
        torch.manual_seed(1)
        dl = DataLoader(ds, batch_size=16, shuffle=True)
        _fit(model, cbs, dl, max_epochs=2)
        if with_cb:
            assert cbs[1].reports[0].batches == 4
        return snap

    ref, got = run(False), run(True)
    for e in (0, 1):
        assert set(ref.states[e]) == set(got.states[e])
        for k in ref.states[e]:
            assert torch.equal(ref.states[e][k], got.states[e][k]), (e, k)
        for k in ref.optim[e]:
            assert torch.equal(ref.optim[e][k]["momentum_buffer"], got.optim[e][k]["momentum_buffer"])


# ---------------------------------------------------------------------------------------------
# Schedule objects: steps, fisher_batches, at_start, targets
# ---------------------------------------------------------------------------------------------


def test_step_point_with_fisher_batches_and_accumulation() -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    cb = Recording(schedule=PruningSchedule(steps={3: 0.5}, fisher_batches=2))
    _fit(model, cb, loader(image_data(64), 8), max_epochs=2, accumulate_grad_batches=2)
    (rnd,) = cb.rounds
    assert rnd["step"] == 3 and rnd["epoch"] == 0
    assert rnd["batches"] == 2


def test_epoch_point_with_fisher_batches_uses_the_last_batches() -> None:
    torch.manual_seed(0)
    net, ds = small_cnn(bn=False), image_data(64)
    model = LitClassifier(copy.deepcopy(net), lr=0.0, momentum=0.0)
    cb = Recording(schedule=PruningSchedule(epochs={0: 0.5}, fisher_batches=2), fisher="empirical")
    _fit(model, cb, loader(ds, 16), max_epochs=1)
    assert cb.rounds[0]["batches"] == 2
    last_two = torch.utils.data.Subset(ds, range(32, 64))
    want = _reference_factors(net, last_two, 16, fisher="empirical")
    _assert_factors_close(cb.rounds[0]["factors"], want, rtol=1e-5)


def test_one_shot_pruning_at_fit_start() -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    dense = count_flops(model, image_data(2)[:][0])
    cb = Recording(schedule=PruningSchedule(at_start=0.5, fisher_batches=3))
    snap = Snapshot(epochs=(1,))
    t = _fit(model, [cb, snap], max_epochs=2)
    (rnd,) = cb.rounds
    assert rnd["step"] == 0 and rnd["batches"] == 3 and rnd["old_state"] == {}
    assert model.steps_run == 8
    assert count_flops(model, image_data(2)[:][0]) < dense
    held = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in model.parameters()}


def test_rebuilt_layers_keep_the_mode_of_the_layers_they_replace() -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    model.net[3].eval()  # e.g. a frozen part of a backbone: Lightning 2.6 keeps modes as given
    cb = EigenDamagePruning(
        schedule=PruningSchedule(at_start=0.5, fisher_batches=1), form="bottleneck", structure="eigenbasis"
    )
    _fit(model, cb, max_epochs=1)
    assert isinstance(model.net[3], KFELayer) and isinstance(model.net[5], KFELayer)
    assert not any(m.training for m in model.net[3].modules())
    assert all(m.training for m in model.net[5].modules())


def test_flops_target_is_met() -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    log = MemoryLogger()
    cb = EigenDamagePruning(
        schedule=PruningSchedule(epochs={0: 0.6}, target="flops"), verbose=False, structure="eigenbasis"
    )
    _fit(model, cb, max_epochs=2, logger=log, log_every_n_steps=1)
    (r,) = cb.reports
    assert r.target == "flops"
    assert r.flops_after <= 0.4 * r.flops_before
    assert log.series("pruning/compression") == [pytest.approx(r.flops_before / r.flops_after)]


def test_metrics_are_logged_through_lightning() -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    log = MemoryLogger()
    cb = EigenDamagePruning(schedule={0: 0.5, 1: 0.3}, verbose=False, structure="eigenbasis")
    _fit(model, cb, max_epochs=3, logger=log, log_every_n_steps=1)
    assert len(cb.reports) == 2
    assert log.series("pruning/params") == [float(r.params_after) for r in cb.reports]
    assert log.series("pruning/flops") == [float(r.flops_after) for r in cb.reports]
    dense = cb.reports[0].flops_before
    assert log.series("pruning/compression") == pytest.approx([dense / r.flops_after for r in cb.reports])
    assert log.series("pruning/realised_fraction") == pytest.approx([r.realised_fraction for r in cb.reports])
    for key in ("pruning/time_capture_s", "pruning/time_prune_s", "pruning/time_optim_s"):
        assert len(log.series(key)) == 2 and all(v >= 0 for v in log.series(key))
    assert cb.reports[1].params_before == cb.reports[0].params_after


# ---------------------------------------------------------------------------------------------
# Inputs, optimizer mistakes, state
# ---------------------------------------------------------------------------------------------


class _DictData(Dataset):
    def __init__(self) -> None:
        self.ds = image_data(32)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.ds[i]
        return {"image": x, "label": y}


class _DictModel(LitClassifier):
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        return nn.functional.cross_entropy(self(batch["image"]), batch["label"])


def test_dict_batches_need_input_fn() -> None:
    model = _DictModel(small_cnn())
    with pytest.raises(
        TypeError, match=r"dict batch: pass EigenDamagePruning\(\.\.\., input_fn=lambda batch"
    ):
        _fit(
            model,
            EigenDamagePruning(schedule={0: 0.5}, structure="eigenbasis"),
            DataLoader(_DictData(), batch_size=8),
            max_epochs=2,
        )
    assert model.steps_run == 0
    cb = EigenDamagePruning(
        schedule={0: 0.5}, input_fn=lambda b: b["image"], verbose=False, structure="eigenbasis"
    )
    _fit(_DictModel(small_cnn()), cb, DataLoader(_DictData(), batch_size=8), max_epochs=2)
    assert cb.reports[0].flops_after < cb.reports[0].flops_before


class _StaleOptimizer(LitClassifier):
    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.frozen_list = list(self.parameters())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.frozen_list, lr=0.01)


def test_optimizer_built_from_a_stale_parameter_list_is_an_error() -> None:
    with pytest.raises(
        RuntimeError, match=r"no longer in the model: build the optimizer from self\.parameters"
    ):
        _fit(
            _StaleOptimizer(small_cnn()),
            EigenDamagePruning(schedule={0: 0.5}, verbose=False, structure="eigenbasis"),
            max_epochs=2,
        )


def test_state_dict_is_plain_data_and_round_trips() -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    cb = EigenDamagePruning(schedule={0: 0.5, 1: 0.5}, verbose=False, structure="eigenbasis")
    _fit(model, cb, max_epochs=2)
    buf = io.BytesIO()
    torch.save(cb.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["done"] == ["epoch:0", "epoch:1"]
    other = EigenDamagePruning(schedule={0: 0.5, 1: 0.5}, structure="eigenbasis")
    other.load_state_dict(state)
    assert [r.to_dict() for r in other.reports] == [r.to_dict() for r in cb.reports]
    assert other.state_dict()["done"] == state["done"]
    assert torch.equal(other.state_dict()["generator"], state["generator"])


def test_round_to_and_form_by_are_passed_to_prune(monkeypatch) -> None:
    import lightning_eigendamage.eigenbasis.pruner as pruner_mod

    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    seen = []
    real = pruner_mod.time_modules

    def spy(mods, example, repeats=7, *, backward=False):
        seen.append(example.shape[0])
        return real(mods, example, repeats=2)

    monkeypatch.setattr(pruner_mod, "time_modules", spy)
    cb = EigenDamagePruning(
        schedule={0: 0.6},
        round_to=4,
        form_by="latency",
        latency_batch=3,
        verbose=False,
        structure="eigenbasis",
    )
    _fit(model, cb, max_epochs=1)
    assert seen and set(seen) == {3}
    for m in model.modules():
        if isinstance(m, KFELayer):
            assert m.rotate_in is None or m.rank_in % 4 == 0 or m.rank_in == m.in_features
            assert m.rotate_out is None or m.rank_out % 4 == 0 or m.rank_out == m.out_features
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        EigenDamagePruning(schedule={0: 0.5}, round_to=0, structure="eigenbasis")
    with pytest.raises(ValueError, match="form_by must be one of"):
        EigenDamagePruning(schedule={0: 0.5}, form_by="speed", structure="eigenbasis")


def test_compiled_network_is_pruned_without_recompiling_every_batch() -> None:
    """``self.net = torch.compile(net)``: the callback finds the layers through the compiled
    wrapper, prunes them in place, and its capture hooks are not traced (a bounded number of
    graphs: probe, capture on/off, new shapes after the round; not some per batch)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = small_cnn()
    compiled = torch.compile(net, backend="eager")
    cb = EigenDamagePruning(
        schedule=PruningSchedule(epochs={0: 0.5}, fisher_batches=3), verbose=False, structure="eigenbasis"
    )
    _fit(LitClassifier(compiled), cb, max_epochs=3)
    assert len(cb.reports) == 1 and cb.reports[0].flops_after < cb.reports[0].flops_before
    assert any(isinstance(m, KFELayer) for m in net.modules())
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), net.eval()(x))
    assert counters["stats"]["unique_graphs"] <= 16


@pytest.mark.parametrize("structure", ["auto", "eigenbasis"])
def test_a_network_compiled_before_fit_calls_the_capture_hooks(structure: str) -> None:
    """The compiled network already ran at the training batch's shape before fit (a sanity check,
    the user's own call): its code had been compiled without the callback's hooks, which torch's
    compiler then never called, and the probe found every layer "never called in the forward
    pass". The capture now sees the layers; the round prunes and the compiled network computes
    what the eager one does."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = small_cnn()
    compiled = torch.compile(net, backend="eager")
    x = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        compiled.eval()(x)  # compiled now, without any hook, as the probe will run it (a sanity check)
    compiled.train()
    cb = EigenDamagePruning(
        schedule=PruningSchedule(epochs={0: 0.5}, fisher_batches=3), verbose=False, structure=structure
    )
    _fit(LitClassifier(compiled), cb, max_epochs=2)
    assert len(cb.reports) == 1 and cb.reports[0].flops_after < cb.reports[0].flops_before
    assert torch._dynamo.config.skip_nnmodule_hook_guards  # the setting is put back after fit
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), net.eval()(x))


class _LBFGSClassifier(LitClassifier):
    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=2, history_size=3)


@pytest.mark.parametrize("structure", ["channels", "eigenbasis"])
def test_lbfgs_starts_its_history_again_after_a_round(structure: str) -> None:
    """LBFGS keeps flat vectors over all the parameters under the first one; carried over a round
    they no longer fit (its first step after the round failed on the lengths)."""
    torch.manual_seed(0)
    model = _LBFGSClassifier(small_cnn())
    cb = EigenDamagePruning(schedule={0: 0.5}, structure=structure, verbose=False)
    _fit(model, cb, max_epochs=2)
    assert len(cb.reports) == 1
    assert set(cb.transplants[0]["reset"]) == {"LBFGS"}
    assert "starts again" in cb.transplants[0]["reset"]["LBFGS"]
    (opt,) = model.trainer.optimizers
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert opt.state[opt.param_groups[0]["params"][0]]["d"].numel() == n  # trained on after the round


class _TwoOptimizers(LitClassifier):
    """Manual optimization stepping two optimizers per batch: ``global_step`` grows by 2 a batch."""

    def __init__(self) -> None:
        super().__init__(small_cnn())
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        body, head = self.optimizers()
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        body.step()
        head.step()

    def configure_optimizers(self) -> Any:
        head = list(self.net[-1].parameters())
        ids = {id(p) for p in head}
        body = [p for p in self.parameters() if id(p) not in ids]
        return [torch.optim.SGD(body, lr=0.05, momentum=0.9), torch.optim.SGD(head, lr=0.05)]


def test_manual_optimization_with_two_optimizers_prunes_at_global_steps() -> None:
    """``global_step`` counts both optimizers' steps: a step point the run reaches was refused
    (counted from batches); and a resume after epoch 0 (below) ran epoch 1's round at once, with
    no factors, and lost it."""
    torch.manual_seed(0)
    data = loader(image_data(64), 16)  # 4 batches: 8 optimizer steps per epoch
    cb = EigenDamagePruning(PruningSchedule(steps={12: 0.3}), verbose=False)
    t = trainer(callbacks=[cb], max_epochs=2)
    t.fit(_TwoOptimizers(), data)
    assert t.global_step == 16 and len(cb.reports) == 1


def test_manual_optimization_with_two_optimizers_resumes_after_an_epoch_without_losing_a_round(
    tmp_path,
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = loader(image_data(64), 16)
    torch.manual_seed(0)
    ck = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = EigenDamagePruning(schedule={0: 0.3, 1: 0.3}, verbose=False)
    with pytest.warns(UserWarning, match="before the round"):  # (stopped after epoch 0)
        trainer(callbacks=[first, ck, _StopAfterFirstEpoch()], max_epochs=2, enable_checkpointing=True).fit(
            _TwoOptimizers(), data
        )
    assert len(first.reports) == 1
    again = EigenDamagePruning(schedule={0: 0.3, 1: 0.3}, verbose=False)
    model = _TwoOptimizers()
    enable_pruned_loading(model)
    t = trainer(callbacks=[again], max_epochs=2)
    t.fit(model, data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(again.reports) == 2 and again.skipped_rounds == []


class _StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True  # as EarlyStopping does


def test_training_that_ends_before_a_scheduled_round_says_so() -> None:
    torch.manual_seed(0)
    cb = EigenDamagePruning(schedule={0: 0.3, 2: 0.3}, verbose=False)
    with pytest.warns(UserWarning, match=r"training ended .* before the round\(s\) epoch:2 ran"):
        _fit(LitClassifier(small_cnn()), [cb, _StopAfterFirstEpoch()], max_epochs=3)
    assert len(cb.reports) == 1


class _GroupPerParameter(LitClassifier):
    """One param group per parameter (layer-wise learning rates) and a per-step LambdaLR."""

    def configure_optimizers(self) -> Any:
        groups = [
            {"params": [p], "lr": 0.05 * 0.9**i, "name": n}
            for i, (n, p) in enumerate(self.named_parameters())
        ]
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("structure", ["eigenbasis", "channels"])
def test_a_group_per_parameter_keeps_its_schedule_when_a_round_changes_the_group_count(
    structure: str,
) -> None:
    """The eigenbasis turns a layer's two parameters into three or four: the rebuilt optimizer has
    more groups, and the old scheduler state (one base_lr per old group) made LambdaLR fail and
    StepLR restart. Each new group continues the group of the layer it comes from."""
    torch.manual_seed(0)
    model = _GroupPerParameter(small_cnn())
    cb = EigenDamagePruning(schedule={0: 0.5}, structure=structure, verbose=False)
    t = _fit(model, cb, max_epochs=2)
    (opt,) = t.optimizers
    sched = t.lr_scheduler_configs[0].scheduler
    assert len(sched.base_lrs) == len(opt.param_groups)
    steps = t.global_step
    for g in opt.param_groups:  # every group is where 8 steps of the schedule put it
        assert g["lr"] == pytest.approx(g["initial_lr"] * 0.5**steps, rel=1e-9), g["name"]
    names = [g["name"] for g in opt.param_groups]
    assert names == [n for n, _ in model.named_parameters()]  # the new groups keep their own names


class _WithBackbone(LitClassifier):
    def __init__(self) -> None:
        net = small_cnn()
        super().__init__(net)
        self.backbone = net[:3]  # (the same modules: BackboneFinetuning freezes self.backbone)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def test_a_round_after_backbone_finetuning_added_a_group_says_the_groups_merged() -> None:
    """BackboneFinetuning adds the backbone as a second param group (its own learning rate) at
    the unfreeze; configure_optimizers returns one group, so the rounds after it merge the two:
    said, with both learning rates."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    torch.manual_seed(0)
    cb = EigenDamagePruning(schedule={1: 0.5}, verbose=False)
    ft = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda e: 1.0)
    with pytest.warns(UserWarning, match=r"holds parameters of 2 param groups .* learning rates \["):
        _fit(_WithBackbone(), [cb, ft], max_epochs=2)
    assert len(cb.reports) == 1
