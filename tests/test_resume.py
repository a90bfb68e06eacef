"""Checkpoints, resume and loading of models pruned by EigenDamagePruning.

Fits are tiny (64 images of 12×12, 4 batches per epoch, ``shuffle=False``, no dropout) so that a
resumed run can be compared number for number with an uninterrupted one. Lightning does not restore
the global RNG, so nothing in these fits draws from it after the model is built; the true-Fisher
labels come from the callback's own generator, whose state is in the checkpoint.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import LitClassifier, Snapshot, image_data, loader, small_cnn, trainer
from models import ConvNet, conv_batches, warm_up_bn
from torch import nn
from torch.optim.lr_scheduler import StepLR

from lightning_eigendamage import (
    EigenDamagePruning,
    KFELayer,
    enable_pruned_loading,
    prune,
    restore_pruned,
)
from lightning_eigendamage.checkpoint import has_pruned_loading
from lightning_eigendamage.curvature import KFACapture, capture_batch

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = {0: 0.5, 2: 0.5}  # one round before the checkpoint at epoch 1, one after it


class LossLit(LitClassifier):
    """``LitClassifier`` on ``small_cnn`` with a StepLR, logging the epoch's mean training loss."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(small_cnn(), lr=lr, momentum=0.9, scheduler=lambda o: StepLR(o, 1, gamma=0.7))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


class PrunableLit(LossLit):
    """Built from hyperparameters only, with pruned loading: ``load_from_checkpoint`` works."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.save_hyperparameters()
        enable_pruned_loading(self)


class History(pl.Callback):
    """Per-epoch mean training loss and learning rate (an epoch end re-run on resume has no loss)."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.lr: dict[int, float] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = trainer.current_epoch
        self.lr[e] = trainer.optimizers[0].param_groups[0]["lr"]
        if "train_loss" in trainer.callback_metrics:
            self.loss[e] = float(trainer.callback_metrics["train_loss"])


class Counting(EigenDamagePruning):
    """Records each round it runs: epoch, number of capture batches and the factors used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("verbose", False)
        kwargs.setdefault("structure", "eigenbasis")  # these tests are about the eigenbasis
        super().__init__(*args, **kwargs)
        self.rounds: list[dict[str, Any]] = []

    def prune_model(self, trainer, pl_module, captured, fraction, example):
        factors = {
            n: (lf.a().clone(), lf.g().clone()) for n, lf in captured.layers.items() if lf.a_sum is not None
        }
        self.rounds.append(dict(epoch=trainer.current_epoch, batches=captured.batches, factors=factors))
        return super().prune_model(trainer, pl_module, captured, fraction, example)


class EpochEndCheckpoint(ModelCheckpoint):
    """Saves in ``on_train_epoch_end`` (after the prune); its own state key so it can sit next to
    a ModelCheckpoint with the same monitor settings."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(save_on_train_epoch_end=True, save_top_k=-1, filename="{epoch}", **kw)

    @property
    def state_key(self) -> str:
        return "EpochEndCheckpoint"


class _Kill(pl.Callback):
    def __init__(self, at_epoch: int) -> None:
        self.at_epoch = at_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.at_epoch:
            sys.stdout.flush()
            os._exit(17)  # no teardown, no exception handling: as if the process were killed


def _data() -> Any:
    return loader(image_data(64), 16)


def _model(cls: type[LossLit] = LossLit) -> LossLit:
    torch.manual_seed(0)
    return cls()


def _final(snap: Snapshot) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    last = max(snap.states)
    return snap.states[last], snap.optim[last]


def _assert_same_run(ref: tuple, res: tuple, epochs: list[int]) -> None:
    """Loss and LR per epoch, final parameters/buffers and final optimizer state."""
    (ref_hist, ref_snap), (hist, snap) = ref, res
    assert epochs and all(e in hist.loss for e in epochs)
    for e in epochs:
        assert hist.loss[e] == pytest.approx(ref_hist.loss[e], rel=1e-6, abs=1e-7), e
        assert hist.lr[e] == pytest.approx(ref_hist.lr[e], rel=1e-12), e
    (ref_state, ref_opt), (state, opt) = _final(ref_snap), _final(snap)
    assert state.keys() == ref_state.keys()
    for k, v in ref_state.items():
        assert state[k].shape == v.shape, k
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert opt.keys() == ref_opt.keys()
    for name, entries in ref_opt.items():
        torch.testing.assert_close(
            opt[name]["momentum_buffer"], entries["momentum_buffer"], rtol=1e-5, atol=1e-6
        )


# ---------------------------------------------------------------------------------------------
# Acceptance: killed after a prune, resumed in another process with a fresh model
# ---------------------------------------------------------------------------------------------


def _killed_run(ckpt_dir: str) -> None:
    """Child process: prune at epoch 0, checkpoint (last / best / every 2 epochs), die at epoch 2."""
    torch.set_num_threads(min(2, torch.get_num_threads()))  # as conftest.py, for equal sums
    d = Path(ckpt_dir)
    callbacks = [
        Counting(schedule=SCHEDULE),  # the class resuming below: callback state is keyed by class
        ModelCheckpoint(dirpath=d / "last", save_last=True),  # last.ckpt (and the latest epoch)
        ModelCheckpoint(dirpath=d / "best", monitor="train_loss", mode="min", save_top_k=1),
        ModelCheckpoint(dirpath=d / "every", every_n_epochs=2, save_top_k=-1),
        _Kill(at_epoch=2),
    ]
    t = trainer(callbacks=callbacks, max_epochs=4, enable_checkpointing=True)
    t.fit(_model(), _data())


def _fit_with_history(cb: pl.Callback, model: LossLit, ckpt_path: str | None = None, **kw: Any) -> tuple:
    hist, snap = History(), Snapshot(epochs=tuple(range(8)))
    t = trainer(callbacks=[cb, hist, snap], **{"max_epochs": 4, **kw})
    t.fit(model, _data(), ckpt_path=ckpt_path)
    return hist, snap


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("killed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    code = "import sys, test_resume; test_resume._killed_run(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(d)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 17, proc.stderr[-3000:]
    return d


@pytest.fixture(scope="module")
def uninterrupted() -> tuple:
    cb = Counting(schedule=SCHEDULE)
    hist, snap = _fit_with_history(cb, _model())
    assert [r["epoch"] for r in cb.rounds] == [0, 2]
    return hist, snap, cb


@pytest.mark.parametrize("kind", ["last", "best", "every"])
def test_resume_in_a_new_process_matches_the_uninterrupted_run(
    kind: str, killed: Path, uninterrupted: tuple
) -> None:
    (path,) = sorted((killed / kind).glob("last.ckpt" if kind == "last" else "*.ckpt"))
    ckpt = torch.load(path, weights_only=True)  # the whole checkpoint is plain data
    start = ckpt["epoch"]
    assert start in (0, 1)
    assert ckpt["callbacks"]["Counting"]["done"] == ["epoch:0"]

    model = _model()  # fresh and unpruned
    assert not any(isinstance(m, KFELayer) for m in model.modules())
    cb = Counting(schedule=SCHEDULE)
    hist, snap = _fit_with_history(cb, model, ckpt_path=str(path))

    ref_hist, ref_snap, ref_cb = uninterrupted
    # The round before the checkpoint is not repeated, the one after it happens, with the same
    # (sampled) factors as in the uninterrupted run.
    assert [r["epoch"] for r in cb.rounds] == [2]
    # (float32 passes: entries agree to 1e-5 relative, or to 1e-6 of the factor's largest entry
    # where they are small, as the summation order of the kernels' threads may differ; both
    # processes run on two threads: conftest puts back a thread count a test changed)
    for name, (a, g) in ref_cb.rounds[1]["factors"].items():
        for got, want in zip(cb.rounds[0]["factors"][name], (a, g)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert [r.flops_after for r in cb.reports] == [r.flops_after for r in ref_cb.reports]
    assert [[(lr.kept_in, lr.kept_out, lr.form) for lr in r.layers] for r in cb.reports] == [
        [(lr.kept_in, lr.kept_out, lr.form) for lr in r.layers] for r in ref_cb.reports
    ]
    assert cb.state_dict()["done"] == ["epoch:0", "epoch:2"]
    _assert_same_run((ref_hist, ref_snap), (hist, snap), list(range(start + 1, 4)))


# ---------------------------------------------------------------------------------------------
# Acceptance: checkpoints before a scheduled prune and at the end of a pruning epoch
# ---------------------------------------------------------------------------------------------

WINDOW_SCHEDULE = {1: 0.5}


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Validation every 2 epochs: ModelCheckpoint saves at the validation end of epoch 1, inside
    the capture window, before the epoch-end prune; EpochEndCheckpoint saves after each epoch end."""
    d = tmp_path_factory.mktemp("windowed")
    cb = Counting(schedule=WINDOW_SCHEDULE)
    hist, snap = History(), Snapshot(epochs=(0, 1, 2))
    ckpts = [ModelCheckpoint(dirpath=d, filename="val-{epoch}", save_top_k=-1), EpochEndCheckpoint(dirpath=d)]
    t = trainer(
        callbacks=[cb, hist, snap, *ckpts], max_epochs=3, check_val_every_n_epoch=2, enable_checkpointing=True
    )
    t.fit(_model(), _data(), _data())
    assert [r["epoch"] for r in cb.rounds] == [1]
    return d, (hist, snap), cb


@pytest.mark.parametrize(
    "name, rounds_after_resume, epochs",
    [
        ("epoch=0.ckpt", 1, [1, 2]),  # before the capture window: capture and prune after resume
        ("val-epoch=1.ckpt", 1, [2]),  # inside it (all of epoch 1 captured), before the prune
        ("epoch=1.ckpt", 0, [2]),  # after the prune, at the end of the pruning epoch
    ],
)
def test_each_prune_happens_once_with_the_factors_it_would_have_had(
    windowed: tuple, name: str, rounds_after_resume: int, epochs: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    d, ref, ref_cb = windowed
    ckpt = torch.load(d / name, weights_only=True)
    saved = ckpt["callbacks"]["Counting"]
    assert (saved["capture"] is not None) == name.startswith("val-")  # factors only inside the window
    cb = Counting(schedule=WINDOW_SCHEDULE)
    hist, snap = History(), Snapshot(epochs=(0, 1, 2))
    t = trainer(callbacks=[cb, hist, snap], max_epochs=3, check_val_every_n_epoch=2)
    with caplog.at_level(logging.INFO):
        t.fit(_model(), _data(), _data(), ckpt_path=str(d / name))
    # A round resumed inside its window has only the checkpoint's one-row example: no BN pass.
    skipped_bn = "BatchNorm statistics are not re-estimated in this round" in caplog.text
    assert skipped_bn == name.startswith("val-")

    assert len(cb.rounds) == rounds_after_resume
    assert len(cb.reports) == 1 and cb.state_dict()["done"] == ["epoch:1"]
    if rounds_after_resume:
        (got,), (want,) = cb.rounds, ref_cb.rounds
        assert got["epoch"] == 1 and got["batches"] == want["batches"] == 4
        assert got["factors"].keys() == want["factors"].keys()
        for layer, (a, g) in want["factors"].items():
            torch.testing.assert_close(got["factors"][layer][0], a, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(got["factors"][layer][1], g, rtol=1e-5, atol=1e-9)
    _assert_same_run(ref, (hist, snap), epochs)


def test_epoch_end_rerun_after_a_prune_does_not_prune_again(tmp_path: Path) -> None:
    """With step-based training Lightning re-runs the saved epoch's ``on_train_epoch_end``.

    (Lightning 2.6.6 itself does not resume step-based training identically, pruning or not: its
    epoch LR scheduler steps again on the re-run, so only the pruning is compared here.)
    """
    kw = dict(max_epochs=-1, max_steps=12)  # 4 batches per epoch: epochs 0, 1, 2
    cb = Counting(schedule=WINDOW_SCHEDULE)
    snap = Snapshot(epochs=(2,))
    t = trainer(callbacks=[cb, snap, EpochEndCheckpoint(dirpath=tmp_path)], enable_checkpointing=True, **kw)
    t.fit(_model(), _data())
    assert [r["epoch"] for r in cb.rounds] == [1]

    seen: list[int] = []

    class EpochEnds(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append(trainer.current_epoch)

    cb2 = Counting(schedule=WINDOW_SCHEDULE)
    model = _model()
    t = trainer(callbacks=[cb2, EpochEnds()], **kw)
    t.fit(model, _data(), ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert seen == [1, 2]  # epoch 1's end ran again
    assert cb2.rounds == [] and len(cb2.reports) == 1
    assert {k: v.shape for k, v in model.state_dict().items() if torch.is_tensor(v)} == {
        k: v.shape for k, v in snap.states[2].items()
    }


# ---------------------------------------------------------------------------------------------
# Acceptance: inference loading (restore_pruned, load_from_checkpoint) with weights_only=True
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[PrunableLit, Path]:
    """A PrunableLit pruned at epoch 0 and trained to the end of epoch 1; last.ckpt holds it."""
    d = tmp_path_factory.mktemp("trained")
    model = _model(PrunableLit)
    ckpt = ModelCheckpoint(dirpath=d, save_last=True)
    cbs = [EigenDamagePruning(schedule={0: 0.5}, verbose=False, structure="eigenbasis"), ckpt]
    t = trainer(callbacks=cbs, max_epochs=2, enable_checkpointing=True)
    t.fit(model, _data())
    assert any(isinstance(m, KFELayer) for m in model.modules())
    return model.eval(), d / "last.ckpt"


def test_restore_pruned_from_a_lightning_checkpoint_reproduces_outputs(trained: tuple) -> None:
    model, path = trained
    x = image_data(8)[:][0]
    fresh = LossLit()
    assert restore_pruned(fresh, path) is fresh  # loads with torch.load(weights_only=True)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_validate_with_ckpt_path_loads_a_pruned_checkpoint_while_the_callback_is_in_the_trainer(
    trained: tuple,
) -> None:
    model, path = trained
    fresh = LossLit()
    t = trainer(callbacks=[EigenDamagePruning(schedule={0: 0.5}, verbose=False, structure="eigenbasis")])
    (metrics,) = t.validate(fresh, _data(), ckpt_path=str(path), verbose=False)
    x = image_data(8)[:][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    assert metrics["val_loss"] > 0


def test_load_from_checkpoint_with_enable_pruned_loading_reproduces_outputs(trained: tuple) -> None:
    model, path = trained
    x = image_data(8)[:][0]
    loaded = PrunableLit.load_from_checkpoint(path, weights_only=True)
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    # Without the pre-hook the pruned checkpoint does not load into a fresh model.
    with pytest.raises(RuntimeError, match="Unexpected key"):
        LossLit.load_from_checkpoint(path, weights_only=True)


# ---------------------------------------------------------------------------------------------
# Acceptance: a checkpoint that does not fit the model fails clearly and changes nothing
# ---------------------------------------------------------------------------------------------


class WiderLit(LossLit):
    """Another architecture: a layer the pruned checkpoint has, with other widths."""

    def __init__(self) -> None:
        super().__init__()
        self.net[3] = nn.Conv2d(16, 48, 3, padding=1, stride=2)
        self.net[5] = nn.Conv2d(48, 32, 3, padding=1)


class OtherLit(LossLit):
    """Another model class: the network lives under another name."""

    def __init__(self) -> None:
        super().__init__()
        self.body = self.net
        del self.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _corrupt(path: Path, out: Path, how: str) -> Path:
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    key = next(k for k, v in sd.items() if k.endswith("._extra_state") and v["form"] == "bottleneck")
    if how == "rank":  # a well-formed record that disagrees with its own weights
        sd[key] = dict(sd[key], rank_in=sd[key]["rank_in"] + 1)
    else:
        sd[key] = dict(sd[key], form="pyramid")
    torch.save(ckpt, out)
    return out


@pytest.mark.parametrize(
    "make, how, err, match",
    [
        (OtherLit, None, ValueError, "does not have"),
        (WiderLit, None, ValueError, "do not match"),
        (LossLit, "rank", RuntimeError, "size mismatch"),
        (LossLit, "form", ValueError, "unknown form"),
    ],
)
def test_mismatched_checkpoint_raises_and_changes_nothing(
    trained: tuple, tmp_path: Path, make: type, how: str | None, err: type, match: str
) -> None:
    _, path = trained
    if how is not None:
        path = _corrupt(path, tmp_path / "bad.ckpt", how)
    routes = {
        "resume": lambda m: trainer(callbacks=[EigenDamagePruning(schedule={2: 0.5})], max_epochs=3).fit(
            m, _data(), ckpt_path=str(path)
        ),
        "restore_pruned": lambda m: restore_pruned(m, path),
    }
    for route, load in routes.items():
        model = make()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        kinds = [type(m) for m in model.modules()]
        with pytest.raises(err, match=match):
            load(model)
        assert [type(m) for m in model.modules()] == kinds, route
        assert not has_pruned_loading(model), route  # not even the callback's hook stays
        after = model.state_dict()
        assert after.keys() == before.keys(), route
        assert all(torch.equal(after[k], v) for k, v in before.items()), route


# ---------------------------------------------------------------------------------------------
# Optimizer state loads by position: rebuilt layers must register parameters in the same order
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["bottleneck", "fold_in", "fold_out"])
def test_restored_layers_register_parameters_in_the_pruned_order(form: str) -> None:
    torch.manual_seed(0)
    model = ConvNet()  # convs with and without bias, a Linear
    batches = conv_batches(1, n=4, size=8)
    warm_up_bn(model, batches)
    prune(model, batches, ratio=0.5, form=form, exempt_last=False)
    fresh = ConvNet()
    restore_pruned(fresh, model.state_dict())
    assert [(n, p.shape) for n, p in fresh.named_parameters()] == [
        (n, p.shape) for n, p in model.named_parameters()
    ]


def test_resume_keeps_frozen_rotations_frozen(trained: tuple) -> None:
    """Records do not store ``requires_grad``: the callback's pre-hook applies ``train_rotations``."""
    _, path = trained
    state = torch.load(path, weights_only=True)["state_dict"]
    for train_rotations in (False, True):
        model = LossLit()
        cb = EigenDamagePruning(schedule={3: 0.5}, train_rotations=train_rotations, structure="eigenbasis")
        cb.setup(trainer(max_epochs=4), model, "fit")
        model.load_state_dict(state)  # what Trainer.fit(ckpt_path=...) does next
        rotations = [
            s.weight.requires_grad
            for m in model.modules()
            if isinstance(m, KFELayer)
            for s in (m.rotate_in, m.rotate_out)
            if s is not None
        ]
        assert rotations and all(r == train_rotations for r in rotations)
        cb.teardown(trainer(), model, "fit")
        assert not has_pruned_loading(model)  # the callback's hook goes with the fit


def test_capture_state_round_trips_as_plain_data_and_rejects_other_layers() -> None:
    torch.manual_seed(0)
    model = ConvNet().eval()
    batches = conv_batches(2, n=4, size=8)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    gen = torch.Generator().manual_seed(0)
    with KFACapture(layers) as cap:
        for x, y in batches:
            capture_batch(model, cap, x, y, generator=gen)
    buf = io.BytesIO()
    torch.save(cap.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = KFACapture(layers)
    again.load_state_dict(state)
    assert (again.batches, again.fire_order) == (cap.batches, cap.fire_order) == (2, list(layers))
    for name, lf in cap.layers.items():
        other = again.layers[name]
        assert torch.equal(other.a_sum, lf.a_sum) and torch.equal(other.g_sum, lf.g_sum)
        assert (other.a_rows, other.g_rows, other.examples, other.geometry, other.input_shape) == (
            lf.a_rows,
            lf.g_rows,
            lf.examples,
            lf.geometry,
            lf.input_shape,
        )
    fewer = KFACapture({n: m for n, m in layers.items() if n != "fc2"})
    with pytest.raises(ValueError, match="saved factors are for layers"):
        fewer.load_state_dict(state)
    state["layers"]["fc1"]["a_sum"] = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="the layer needs"):
        again.load_state_dict(state)
    assert torch.equal(again.layers["fc1"].a_sum, cap.layers["fc1"].a_sum)  # unchanged


def test_loaded_generator_state_wins_over_a_reused_callbacks_own() -> None:
    class Stub:
        global_rank = 0

    model = LossLit()
    cb = EigenDamagePruning(schedule={0: 0.5}, seed=0, structure="eigenbasis")
    saved = torch.Generator().manual_seed(123).get_state()
    cb.on_fit_start(Stub(), model)  # a first fit: the callback has a generator of its own
    cb.load_state_dict(dict(cb.state_dict(), generator=saved))
    assert torch.equal(cb.state_dict()["generator"], saved)
    cb.on_fit_start(Stub(), model)  # the resumed fit
    assert torch.equal(cb._generator.get_state(), saved)


class _EpochLit(LossLit):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.log("epoch_seen", float(self.current_epoch))


@pytest.mark.parametrize("own_hook", [False, True])
@pytest.mark.parametrize("structure", ["channels", "eigenbasis"])
def test_test_with_the_best_checkpoint_from_before_the_last_round_loads_it(
    structure: str, own_hook: bool, tmp_path: Path
) -> None:
    """``trainer.test(ckpt_path="best")`` after a fit whose best checkpoint comes before the last
    round: the model in memory is narrower than the checkpoint (or has layers rewritten that the
    checkpoint holds dense), and the load failed on the shapes. It must give what a fresh model
    given that checkpoint gives (with the user's own ``enable_pruned_loading`` hook too)."""
    torch.manual_seed(0)
    model = _EpochLit()
    if own_hook:
        enable_pruned_loading(model)
    best = ModelCheckpoint(dirpath=tmp_path, monitor="epoch_seen", mode="min", save_top_k=1)
    # a small first round leaves layers the second one rewrites (eigenbasis) or narrows further
    cb = EigenDamagePruning(schedule={0: 0.05, 1: 0.5}, structure=structure, verbose=False)
    t = trainer(callbacks=[cb, best], max_epochs=3, enable_checkpointing=True)
    t.fit(model, _data(), _data())
    assert len(cb.reports) == 2 and "epoch=0" in best.best_model_path
    fresh = _EpochLit()
    restore_pruned(fresh, best.best_model_path)
    assert [type(m) for m in fresh.modules()] != [type(m) for m in model.modules()] or any(
        a.shape != b.shape for a, b in zip(fresh.state_dict().values(), model.state_dict().values())
    )  # the model in memory is not the checkpoint's architecture
    (metrics,) = t.validate(model, _data(), ckpt_path="best", verbose=False)
    x = image_data(8)[:][0]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))
    (again,) = trainer(callbacks=[]).validate(fresh, _data(), verbose=False)
    assert metrics["val_loss"] == pytest.approx(again["val_loss"], rel=1e-6)


def test_the_users_own_hook_loads_an_earlier_checkpoint_into_a_model_pruned_further(tmp_path: Path) -> None:
    """Without the callback (a ``ddp_spawn`` test process has only what the model carries): the
    hook of ``enable_pruned_loading`` keeps the architecture from when it was registered."""
    import copy

    torch.manual_seed(0)
    model = PrunableLit()
    worker = copy.deepcopy(model)  # what a spawned process fits; the callback never sees `model`
    ck = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    cb = EigenDamagePruning(schedule={0: 0.3, 1: 0.5}, structure="channels", verbose=False)
    trainer(callbacks=[cb, ck], max_epochs=2, enable_checkpointing=True).fit(worker, _data())
    model.load_state_dict(worker.state_dict())  # the final weights back, as ddp_spawn does
    (first,) = sorted(tmp_path.glob("epoch=0*.ckpt"))
    state = torch.load(first, weights_only=True)["state_dict"]
    assert any(v.shape != model.state_dict()[k].shape for k, v in state.items() if k in model.state_dict())
    model.load_state_dict(state)  # the model in memory was pruned further
    fresh = PrunableLit()
    fresh.load_state_dict(state)
    x = image_data(8)[:][0]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))


class _StopAfterEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_a_resume_with_fewer_batches_per_epoch_keeps_the_next_rounds(tmp_path: Path) -> None:
    """Resumed with fewer batches per epoch (another world size under DDP), the epochs that had
    ended were counted from global_step over the new steps per epoch: epoch 2's round ran at once,
    with no factors, and was lost. Where the last batch stood is now saved with the callback."""
    torch.manual_seed(0)
    ck = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = EigenDamagePruning(schedule={0: 0.3, 2: 0.3}, structure="channels", verbose=False)
    t = trainer(callbacks=[first, ck, _StopAfterEpoch(1)], max_epochs=3, enable_checkpointing=True)
    with pytest.warns(UserWarning, match="before the round"):
        t.fit(PrunableLit(), loader(image_data(64), 8))  # 8 steps per epoch
    assert t.global_step == 16 and len(first.reports) == 1
    again = EigenDamagePruning(schedule={0: 0.3, 2: 0.3}, structure="channels", verbose=False)
    model = PrunableLit()
    trainer(callbacks=[again], max_epochs=3).fit(
        model, loader(image_data(64), 16), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert len(again.reports) == 2 and again.skipped_rounds == []
