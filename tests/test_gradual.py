"""Gradual removal in the eigenbasis (``EigenDamagePruning(gradual=GradualRemoval(...))``).

The penalty's gradient against autograd, what a fit with the option does to the marked
coordinates and to the function at the prune, that the optimizer and LR schedule stay the user's,
checkpoints inside a window, the checks of the settings, and DDP on two CPU processes (the fit is
``tests/ddp_fit.py --config gradual``). Fits are tiny (64 images of 12×12, 8 per batch, no BatchNorm
so train and eval mode agree, no dropout, ``shuffle=False``), a few seconds each.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ddp_fit
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import LitClassifier, image_data, loader, small_cnn, trainer
from torch import nn
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_eigendamage import EigenDamagePruning, GradualRemoval, PruningSchedule
from lightning_eigendamage.gradual import (
    GradualWindow,
    marked_mask,
    marked_norm,
    penalty_grad,
    penalty_value,
)

# ---------------------------------------------------------------------------------------------
# 1. The penalty's gradient
# ---------------------------------------------------------------------------------------------


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _brute_force_penalty(weight: torch.Tensor, q_a, q_g, rows: set[int], cols: set[int], lam: float):
    """``λ/2 Σ_offsets ‖M ⊙ (Q_Gᵀ W[:, :, offset] Q_A)‖²`` written out offset by offset, with the
    mask built entry by entry (independent of the library's 3-d view and mask)."""
    c_out, c_in = weight.shape[:2]
    m = torch.tensor(
        [[1.0 if (i in rows or j in cols) else 0.0 for j in range(c_in)] for i in range(c_out)],
        dtype=torch.float64,
    )
    total = torch.zeros((), dtype=torch.float64)
    kernel = weight.shape[2:]
    for offset in [()] if not kernel else list(torch.cartesian_prod(*[torch.arange(k) for k in kernel])):
        idx = (slice(None), slice(None)) + tuple(int(o) for o in torch.atleast_1d(torch.as_tensor(offset)))
        w = weight[idx] if kernel else weight
        total = total + (m * (q_g.T @ w @ q_a)).pow(2).sum()
    return 0.5 * lam * total


@pytest.mark.parametrize("shape", [(5, 4), (6, 3, 3, 3), (4, 5, 3)], ids=["linear", "conv2d", "conv1d"])
def test_penalty_gradient_equals_autograd(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(1)
    c_out, c_in = shape[:2]
    weight = torch.randn(*shape, generator=g, dtype=torch.float64)
    q_a, q_g = _orthogonal(c_in, g), _orthogonal(c_out, g)
    removed_in, removed_out = [1, c_in - 1], [0, 2]
    lam = 0.7
    mask = marked_mask(c_in, c_out, removed_in, removed_out)
    assert mask.shape == (c_out, 1, c_in)

    w = weight.clone().requires_grad_(True)
    ref = _brute_force_penalty(w, q_a, q_g, set(removed_out), set(removed_in), lam)
    (ref_grad,) = torch.autograd.grad(ref, w)

    got = penalty_grad(weight, q_a, q_g, mask, lam)
    assert got.shape == weight.shape
    torch.testing.assert_close(got, ref_grad, rtol=1e-10, atol=1e-12)
    ref = float(ref.detach())
    assert penalty_value(weight, q_a, q_g, mask, lam) == pytest.approx(ref, rel=1e-10)
    assert marked_norm(weight, q_a, q_g, mask) == pytest.approx(math.sqrt(2 * ref / lam), rel=1e-10)
    # Non-trivial: the gradient is neither zero nor the whole weight's.
    assert float(got.norm()) > 0.1 * lam * float(weight.norm())
    full = penalty_grad(weight, q_a, q_g, torch.ones_like(mask), lam)
    torch.testing.assert_close(full, lam * weight, rtol=1e-10, atol=1e-12)  # M = 1: λ·W (Q orthogonal)


def test_strength_grows_linearly_to_the_ceiling() -> None:
    gr = GradualRemoval(steps=4, penalty=2.0)
    assert [gr.strength(t) for t in range(7)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


# ---------------------------------------------------------------------------------------------
# Fits
# ---------------------------------------------------------------------------------------------

PRUNE_STEP = 20  # 8 batches per epoch: the round falls inside epoch 2
STEPS, PENALTY = 10, 20.0
PROBE = image_data(32, seed=5).tensors[0]  # fixed inputs for the function before / after the prune


class Watch(EigenDamagePruning):
    """Records the weights at the window's start and at the prune, the outputs on ``PROBE`` just
    before and after the surgery, and the optimizer/scheduler as seen at every optimizer step."""

    def __init__(self, *args: Any, probe: torch.Tensor = PROBE, **kwargs: Any) -> None:
        kwargs.setdefault("verbose", False)
        kwargs.setdefault("structure", "eigenbasis")  # these tests are about the eigenbasis
        super().__init__(*args, **kwargs)
        self.probe = probe
        self.window: GradualWindow | None = None
        self.at_start: dict[str, torch.Tensor] | None = None
        self.at_prune: dict[str, torch.Tensor] = {}
        self.change: float = float("nan")
        self.steps: list[dict[str, Any]] = []
        self.weights_at: dict[int, dict[str, torch.Tensor]] = {}  # before optimizer step `k + 1`

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.weights_at[trainer.global_step] = {
            n: p.detach().clone() for n, p in pl_module.named_parameters()
        }
        if self.gradual_window is not None and self.at_start is None:
            self.window = self.gradual_window
            self.at_start = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        added = {n: p.grad - grads[n] for n, p in pl_module.named_parameters() if n in grads}
        sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
        self.steps.append(
            {
                "step": trainer.global_step,
                "optimizer": trainer.optimizers[0],
                "hooked": optimizer,
                "groups": [
                    (list(g["params"]), {k: v for k, v in g.items() if k != "params"})
                    for g in trainer.optimizers[0].param_groups
                ],
                "scheduler": sched,
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "in_window": self.gradual_window is not None,
                "penalised": sum(float(a.norm()) for a in added.values()),
            }
        )

    def prune_model(self, trainer, pl_module, captured, fraction, example):
        self.at_prune = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        mode = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            before = pl_module(self.probe)
        out = super().prune_model(trainer, pl_module, captured, fraction, example)
        with torch.no_grad():
            after = pl_module(self.probe)
        pl_module.train(mode)
        self.change = float((after - before).norm() / before.norm())
        return out


def _fit(gradual: GradualRemoval | None, *, scheduler: Any = None, callbacks: tuple = (), **kw: Any) -> tuple:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn(bn=False), lr=0.05, scheduler=scheduler, interval="step")
    cb = Watch(PruningSchedule(steps={PRUNE_STEP: 0.7}, fisher_batches=4), gradual=gradual)
    t = trainer(max_steps=PRUNE_STEP + 2, callbacks=[cb, *callbacks], **kw)
    t.fit(model, loader(image_data(64), batch_size=8))
    return cb, model


def _sched(opt: torch.optim.Optimizer) -> StepLR:
    return StepLR(opt, step_size=4, gamma=0.8)


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same fit with and without the option; the first keeps a checkpoint per epoch."""
    ckpts = tmp_path_factory.mktemp("ckpts")
    ckpt = ModelCheckpoint(dirpath=ckpts, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    return {
        "gradual": _fit(
            GradualRemoval(STEPS, PENALTY), scheduler=_sched, callbacks=[ckpt], enable_checkpointing=True
        ),
        "plain": _fit(None, scheduler=_sched),
        "ckpts": ckpts,
    }


def _marked(weights: dict[str, torch.Tensor], window: GradualWindow, side: str = "both") -> float:
    """``‖M ⊙ W*‖`` over the window's layers; ``side="in"`` / ``"out"``: only the removed input
    directions (columns) / output directions (rows) of ``W*``."""
    total = 0.0
    for m in window.layers:
        d_in, d_out = m.q_a.shape[0], m.q_g.shape[0]
        rin = m.removed_in if side in ("both", "in") else ()
        rout = m.removed_out if side in ("both", "out") else ()
        total += marked_norm(weights[m.param], m.q_a, m.q_g, marked_mask(d_in, d_out, rin, rout)) ** 2
    return math.sqrt(total)


def test_gradual_removal_empties_the_marked_coordinates_and_preserves_the_function(fits) -> None:
    (cb, _), (plain, _) = fits["gradual"], fits["plain"]
    win = cb.window
    assert win is not None and win.point == f"step:{PRUNE_STEP}"
    assert (win.start, win.end) == (PRUNE_STEP - STEPS, PRUNE_STEP)
    assert sum(len(m.removed_in) + len(m.removed_out) for m in win.layers) > 20
    # Up to the window both runs are the same run: the window's capture changed nothing.
    for n, p in cb.at_start.items():
        assert torch.equal(p, plain.weights_at[win.start][n]), n
    # The penalty ran on exactly the window's steps.
    assert [s["step"] for s in cb.steps if s["penalised"] > 0] == list(range(win.start, win.end))
    # The marked coordinates (in the window's bases) went towards zero; without the option they
    # stayed where training left them.
    with_opt, without = _marked(cb.at_prune, win), _marked(plain.at_prune, win)
    assert _marked(cb.at_start, win) == pytest.approx(_marked(plain.weights_at[win.start], win))
    assert with_opt < 0.2 * without, (with_opt, without)
    for side in ("in", "out"):  # whole columns and whole rows of W* alike
        assert _marked(cb.at_prune, win, side) < 0.2 * _marked(plain.at_prune, win, side), side
    # ... and the prune then changes the outputs on fixed inputs much less.
    assert cb.change < 0.6 * plain.change, (cb.change, plain.change)
    assert len(cb.reports) == len(plain.reports) == 1 and cb.gradual_window is None


def test_the_optimizer_and_lr_schedule_stay_the_users(fits) -> None:
    (cb, _), (plain, _) = fits["gradual"], fits["plain"]
    before = [s for s in cb.steps if s["step"] < PRUNE_STEP]
    window = [s for s in before if s["in_window"]]
    assert len(window) == STEPS and all(s["penalised"] > 0 for s in window)
    first = before[0]
    for s in before:
        assert s["optimizer"] is first["optimizer"] and s["hooked"] is first["optimizer"]
        assert s["scheduler"] is first["scheduler"] and s["scheduler"].optimizer is first["optimizer"]
        assert len(s["groups"]) == len(first["groups"]) == 1
        (params, hp), (params0, hp0) = s["groups"][0], first["groups"][0]
        assert len(params) == len(params0) and all(a is b for a, b in zip(params, params0))
        assert {k: v for k, v in hp.items() if k not in ("lr", "initial_lr")} == {
            k: v for k, v in hp0.items() if k not in ("lr", "initial_lr")
        }
    # The LR follows the user's StepLR exactly, as in the run without the option.
    lrs = [s["lr"] for s in before]
    assert lrs == pytest.approx([0.05 * 0.8 ** (i // 4) for i in range(PRUNE_STEP)], rel=1e-12, abs=0)
    assert lrs == [s["lr"] for s in plain.steps if s["step"] < PRUNE_STEP]


def test_conv1d_and_linear_layers_are_penalised_alike() -> None:
    """Any layer type the callback prunes: a Conv1d/Linear model (through the adapters' 3-d view)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
    schedule = PruningSchedule(steps={12: 0.5}, fisher_batches=2)
    cb = Watch(schedule, gradual=GradualRemoval(6, PENALTY), probe=data.tensors[0][:16])
    trainer(max_steps=13, callbacks=[cb]).fit(LitClassifier(net, lr=0.05), loader(data, batch_size=8))
    win = cb.window
    assert {m.param for m in win.layers} >= {"net.2.weight", "net.6.weight"}  # a Conv1d and a Linear
    assert cb.at_start["net.2.weight"].dim() == 3
    assert [s["step"] for s in cb.steps if s["penalised"] > 0] == list(range(6, 12))
    assert _marked(cb.at_prune, win) < 0.3 * _marked(cb.at_start, win)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_the_window_survives_state_dict_and_a_resume_inside_it(fits) -> None:
    """The checkpoint at the end of epoch 1 (step 16) falls inside the window of steps 11..20: it
    holds the window as plain data, and the run resumed from it penalises from its first step on
    with the very bases and masks of the window (without the saved window it would capture again
    and start a window with other bases a step later). The weights are not compared with the
    uninterrupted run's: Lightning resumes a checkpoint taken at an epoch's end by replaying one
    batch (batch_idx 8, then the epoch from batch 0), so the two runs see different batches."""
    gradual = GradualRemoval(STEPS, PENALTY)
    full, _ = fits["gradual"]
    path = fits["ckpts"] / "epoch=1.ckpt"
    state = torch.load(path, weights_only=True)["callbacks"]
    (saved,) = [v for k, v in state.items() if k.startswith("Watch")]
    got = GradualWindow.from_dict(saved["gradual"])
    want = full.window
    assert (got.point, got.start, got.end) == (want.point, want.start, want.end) == ("step:20", 10, 20)
    for a, b in zip(got.layers, want.layers, strict=True):
        assert a.param == b.param and (a.removed_in, a.removed_out) == (b.removed_in, b.removed_out)
        assert torch.equal(a.q_a, b.q_a.cpu()) and torch.equal(a.q_g, b.q_g.cpu())
    other = EigenDamagePruning({0: 0.5}, gradual=gradual, structure="eigenbasis")
    other.load_state_dict(saved)
    assert other.gradual_window.to_dict()["layers"][0]["removed_out"] == list(want.layers[0].removed_out)

    torch.manual_seed(0)
    resumed_model = LitClassifier(small_cnn(bn=False), lr=0.05, scheduler=_sched, interval="step")
    resumed = Watch(PruningSchedule(steps={PRUNE_STEP: 0.7}, fisher_batches=4), gradual=gradual)
    trainer(max_steps=PRUNE_STEP + 2, callbacks=[resumed]).fit(
        resumed_model, loader(image_data(64), batch_size=8), ckpt_path=str(path)
    )
    penalised = [s["step"] for s in resumed.steps if s["penalised"] > 0]
    assert penalised[0] == 16 and penalised[-1] == PRUNE_STEP - 1  # from the first resumed step on
    back = resumed.window
    assert (back.point, back.start, back.end) == (want.point, want.start, want.end)
    for a, b in zip(back.layers, want.layers, strict=True):
        assert a.param == b.param and (a.removed_in, a.removed_out) == (b.removed_in, b.removed_out)
        assert torch.equal(a.q_a, b.q_a.cpu()) and torch.equal(a.q_g, b.q_g.cpu())
    assert len(resumed.reports) == 1 and resumed.gradual_window is None


@pytest.mark.parametrize("structure", ["eigenbasis", "channels"])
def test_a_resume_while_the_next_windows_factors_are_captured_is_the_uninterrupted_run(
    structure: str, tmp_path: Path
) -> None:
    """The window of steps 13..17 reads the factors of the 16 batches before it, from step 0 on:
    the checkpoints at the ends of epochs 0 and 1 fall among them. They hold those factors now
    (they did not: the resumed run captured again from fewer batches, planned another window and
    ended up to 1.04 away from the uninterrupted run's weights)."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 12, 12, generator=g), torch.randint(0, 10, (48,), generator=g))

    def fit(ckpt: Path | None, where: Path) -> nn.Module:
        cb = EigenDamagePruning({2: 0.3}, structure=structure, gradual=GradualRemoval(5, 1.0), verbose=False)
        keep = ModelCheckpoint(dirpath=where, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        torch.manual_seed(0)
        model = LitClassifier(small_cnn(bn=False), lr=0.05)
        t = trainer(max_epochs=3, callbacks=[cb, keep], enable_checkpointing=True, deterministic=True)
        t.fit(model, loader(data, batch_size=8), ckpt_path=None if ckpt is None else str(ckpt))
        assert len(cb.reports) == 1
        return model

    full = fit(None, tmp_path / "full").state_dict()
    for epoch in (0, 1):
        resumed = fit(tmp_path / "full" / f"epoch={epoch}.ckpt", tmp_path / f"from{epoch}").state_dict()
        assert resumed.keys() == full.keys()
        for k, v in full.items():  # (an eigenbasis layer's record is plain data)
            assert torch.equal(resumed[k], v) if torch.is_tensor(v) else resumed[k] == v, (epoch, k)


def test_state_dict_without_the_option_is_unchanged() -> None:
    assert "gradual" not in EigenDamagePruning({0: 0.5}, structure="eigenbasis").state_dict()
    assert (
        EigenDamagePruning({0: 0.5}, gradual=GradualRemoval(1, 1.0), structure="eigenbasis").state_dict()[
            "gradual"
        ]
        is None
    )


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps": 0, "penalty": 1.0}, ValueError, r"steps=\.\.\.\) must be ≥ 1, got 0"),
        ({"steps": -3, "penalty": 1.0}, ValueError, r"must be ≥ 1"),
        ({"steps": 2.5, "penalty": 1.0}, TypeError, r"steps=\.\.\.\) must be an int"),
        ({"steps": True, "penalty": 1.0}, TypeError, r"must be an int"),
        ({"steps": "3", "penalty": 1.0}, TypeError, r"must be an int"),
        ({"steps": 3, "penalty": -1.0}, ValueError, r"penalty=\.\.\.\) must be a finite number > 0"),
        ({"steps": 3, "penalty": 0}, ValueError, r"> 0"),
        ({"steps": 3, "penalty": float("nan")}, ValueError, r"finite"),
        ({"steps": 3, "penalty": float("inf")}, ValueError, r"finite"),
        ({"steps": 3, "penalty": "1"}, TypeError, r"penalty=\.\.\.\) must be a real number"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        GradualRemoval(**kwargs)


def test_bad_combinations_with_the_schedule_are_refused_by_the_constructor() -> None:
    with pytest.raises(TypeError, match=r"gradual must be a lightning_eigendamage.GradualRemoval"):
        EigenDamagePruning({0: 0.5}, gradual={"steps": 3, "penalty": 1.0}, structure="eigenbasis")
    with pytest.raises(ValueError, match=r"has only an at_start point"):
        EigenDamagePruning(
            PruningSchedule(at_start=0.5), gradual=GradualRemoval(3, 1.0), structure="eigenbasis"
        )
    with pytest.raises(ValueError, match=r"steps=5\) does not fit before the round step:5.*pass steps ≤ 4"):
        EigenDamagePruning(
            PruningSchedule(steps={5: 0.5}), gradual=GradualRemoval(5, 1.0), structure="eigenbasis"
        )
    with pytest.raises(ValueError, match=r"before the round step:14.*the round step:10 \(step 10\)"):
        EigenDamagePruning(
            PruningSchedule(steps={10: 0.5, 14: 0.5}), gradual=GradualRemoval(4, 1.0), structure="eigenbasis"
        )
    EigenDamagePruning(
        PruningSchedule(steps={10: 0.5, 15: 0.5}), gradual=GradualRemoval(4, 1.0), structure="eigenbasis"
    )


def _fit_fails(cb: EigenDamagePruning, data: Any, match: str, **kw: Any) -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn(bn=False))
    with pytest.raises(ValueError, match=match):
        trainer(callbacks=[cb], **kw).fit(model, data)
    assert model.steps_run == 0  # refused before the first training step


def test_epoch_points_are_checked_at_train_start() -> None:
    data = loader(image_data(64), batch_size=8)  # 8 optimizer steps per epoch
    # Epoch 0 prunes after step 8: a window of 8 steps leaves none to measure curvature.
    _fit_fails(
        EigenDamagePruning(
            {0: 0.5, 2: 0.5}, gradual=GradualRemoval(8, 1.0), verbose=False, structure="eigenbasis"
        ),
        data,
        r"before the round epoch:0, which prunes after optimizer step 8",
        max_epochs=3,
    )
    # With accumulate_grad_batches=2 an epoch is 4 steps: epochs 1 and 2 prune after steps 8 and 12.
    _fit_fails(
        EigenDamagePruning(
            {1: 0.5, 2: 0.5}, gradual=GradualRemoval(4, 1.0), verbose=False, structure="eigenbasis"
        ),
        data,
        r"before the round epoch:2, which prunes after optimizer step 12: only 4 step\(s\) lie between "
        r"it and the round epoch:1 \(step 8\)",
        max_epochs=4,
        accumulate_grad_batches=2,
    )


class _Stream(IterableDataset):
    def __iter__(self):
        ds = image_data(32)
        return iter(zip(ds.tensors[0], ds.tensors[1]))


def test_epoch_points_need_a_loader_with_a_length() -> None:
    cb = EigenDamagePruning({0: 0.5}, gradual=GradualRemoval(2, 1.0), verbose=False, structure="eigenbasis")
    _fit_fails(
        cb, DataLoader(_Stream(), batch_size=8), r"the training dataloader has no length", max_epochs=1
    )


def test_an_at_start_round_prunes_without_a_window_and_says_so() -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn(bn=False))
    cb = Watch(
        PruningSchedule(at_start=0.3, steps={6: 0.3}, fisher_batches=2), gradual=GradualRemoval(3, 5.0)
    )
    with pytest.warns(UserWarning, match=r"at_start round has no optimizer steps before it"):
        trainer(max_steps=8, callbacks=[cb]).fit(model, loader(image_data(64), batch_size=8))
    assert len(cb.reports) == 2
    assert [s["step"] for s in cb.steps if s["penalised"] > 0] == [3, 4, 5]


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------


def test_ddp_ranks_apply_the_same_penalty(tmp_path: Path) -> None:
    """Two CPU processes (gloo), each on its half of the data: the window's bases and masks, the
    weights after the window and after the prune are the same on both ranks, and the penalty did
    move the weights."""
    ddp_fit.run("gradual", str(tmp_path), strategy="ddp_spawn", accelerator="cpu", devices=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    r0, r1 = ranks
    assert len(r0["rounds"]) == len(r1["rounds"]) == 1
    w0, w1 = r0["windows"], r1["windows"]
    assert len(w0) == len(w1) == 1 and w0[0]["layers"], "no window was recorded"
    assert {k: w0[0][k] for k in ("point", "start", "end")} == {
        k: w1[0][k] for k in ("point", "start", "end")
    }
    for a, b in zip(w0[0]["layers"], w1[0]["layers"]):
        assert a["param"] == b["param"] and a["removed_in"] == b["removed_in"]
        assert a["removed_out"] == b["removed_out"]
        assert torch.equal(a["q_a"], b["q_a"]) and torch.equal(a["q_g"], b["q_g"])
    # The ranks captured on different data (the window's plan had something to agree on) ...
    assert any(not torch.equal(r0["window_local"][n], r1["window_local"][n]) for n in r0["window_local"])
    # ... and held the same weights at the window's start, at its end and after the prune.
    for key in ("window_start", "window_end"):
        assert r0[key].keys() == r1[key].keys()
        for n in r0[key]:
            assert torch.equal(r0[key][n], r1[key][n]), f"{key}: {n}"
    for n in r0["rounds"][0]["params"]:
        assert torch.equal(r0["rounds"][0]["params"][n], r1["rounds"][0]["params"][n]), n
    for n in r0["final"]:
        assert torch.equal(r0["final"][n], r1["final"][n]), n
    # The penalty acted: the marked coordinates shrank over the window.
    win = GradualWindow.from_dict(w0[0])
    assert _marked(r0["window_end"], win) < 0.5 * _marked(r0["window_start"], win)


def test_gradual_removal_with_channels_pulls_the_readers_off_the_channels_to_be_cut() -> None:
    """``structure="channels"``: the window marks, in each reader, the input columns of the
    channels the plan removes (identity bases); the penalty empties them, and the cut then
    changes the outputs on fixed inputs much less than without it."""

    def fit(gradual: GradualRemoval | None) -> Watch:
        torch.manual_seed(0)
        model = LitClassifier(small_cnn(bn=False), lr=0.05)
        schedule = PruningSchedule(steps={PRUNE_STEP: 0.5}, fisher_batches=4)
        cb = Watch(schedule, gradual=gradual, structure="channels")
        trainer(max_steps=PRUNE_STEP + 2, callbacks=[cb]).fit(model, loader(image_data(64), batch_size=8))
        return cb

    cb, plain = fit(GradualRemoval(STEPS, PENALTY)), fit(None)
    win = cb.window
    assert win is not None and win.layers and all(not m.removed_out for m in win.layers)
    assert sum(len(m.removed_in) for m in win.layers) >= 5
    for m in win.layers:  # identity bases: the penalty is on the weights' own columns
        assert torch.equal(m.q_a, torch.eye(m.q_a.shape[0], dtype=torch.float64))
    assert [s["step"] for s in cb.steps if s["penalised"] > 0] == list(range(win.start, win.end))
    assert _marked(cb.at_prune, win) < 0.2 * _marked(plain.at_prune, win)
    assert cb.reports[0].structure == plain.reports[0].structure == "channels"
    assert cb.change < 0.6 * plain.change, (cb.change, plain.change)


def test_epoch_windows_under_a_gradient_accumulation_scheduler_are_refused_before_training() -> None:
    """A GradientAccumulationScheduler changes the optimizer steps per epoch after the windows
    were placed from the epoch-0 accumulation: the window never opened, without a word."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    gradual = GradualRemoval(steps=3, penalty=1.0)
    cb = EigenDamagePruning(schedule={1: 0.5}, structure="eigenbasis", gradual=gradual)
    t = trainer(callbacks=[cb, GradientAccumulationScheduler({0: 2})], max_epochs=2)
    with pytest.raises(ValueError, match="GradientAccumulationScheduler changes them"):
        t.fit(model, loader(image_data(64), 8))
    assert model.steps_run == 0
