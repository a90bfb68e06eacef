"""Capture, ``prune()`` and the callback on an accelerator (``LED_TEST_DEVICE``, default ``cuda``).

The device is named by the environment variable ``LED_TEST_DEVICE`` (``cuda``, ``cuda:1``,
``mps`` or ``cpu``). When it is not available every test here is skipped, with the reason naming
what is missing; the normal test suite (no variable, no GPU) skips them. ``LED_TEST_DEVICE=cpu``
runs the same tests on the CPU: that is what ``benchmarks/gpu_check.sh --device cpu --quick``
(and so ``tests/test_gpu_check.py``) does, so the code paths are exercised in CI.

Every check compares against an independent computation: the capture on the device against the
same capture in float64 on the CPU, a full-rank forced form against the model's own outputs before
the prune, the FLOPs of the pruned model counted again by ``torch.utils.flop_counter``, and the
optimizer of the fit against the model's parameters after the prune. TF32 is switched off for
these tests (it would change the float32 results by ~1e-3 relative on Ampere and later GPUs).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lit_models import LitClassifier, image_data, small_cnn
from lit_models import trainer as make_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_eigendamage import EigenDamagePruning, KFELayer, PruningSchedule, prune
from lightning_eigendamage.costs import count_flops
from lightning_eigendamage.curvature import capture_factors
from lightning_eigendamage.eigenbasis.pruner import find_layers
from lightning_eigendamage.report import TARGET_TOLERANCE

DEVICE_NAME = os.environ.get("LED_TEST_DEVICE", "cuda")


def _unavailable(name: str) -> str | None:
    """Why ``name`` cannot be used here (a sentence naming what is missing), or None."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        return f"LED_TEST_DEVICE={name!r} is not a torch device name ({e})"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda or "none (a CPU-only build)"
            return (
                f"LED_TEST_DEVICE={name}: no usable CUDA GPU (torch.cuda.is_available() is False; torch "
                f"{torch.__version__}, CUDA runtime {built}); set LED_TEST_DEVICE=cpu to run these tests on "
                "the CPU"
            )
        index = dev.index or 0
        if index >= torch.cuda.device_count():
            return f"LED_TEST_DEVICE={name}: only {torch.cuda.device_count()} CUDA device(s) visible"
        return None
    if dev.type == "mps":
        return None if torch.backends.mps.is_available() else f"LED_TEST_DEVICE={name}: MPS is not available"
    return f"LED_TEST_DEVICE={name}: device type {dev.type!r} is not supported by these tests"


_WHY = _unavailable(DEVICE_NAME)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")
DEVICE = torch.device(DEVICE_NAME) if _WHY is None else torch.device("cpu")


def _lightning_device() -> tuple[str, Any]:
    """``(accelerator, devices)`` for a one-device ``pl.Trainer`` on :data:`DEVICE`."""
    if DEVICE.type == "cuda":
        return "gpu", [DEVICE.index or 0]
    return DEVICE.type, 1


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """Full float32 on the device (TF32 convolutions and matmuls off), restored afterwards."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def _batches(n: int = 3, batch: int = 16, size: int = 12, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``n`` CPU batches of random images and labels (10 classes)."""
    ds = image_data(n * batch, size, seed=seed)
    return [ds[i * batch : (i + 1) * batch] for i in range(n)]


def _on(
    batches: list[tuple[torch.Tensor, ...]], device: torch.device, dtype: torch.dtype | None = None
) -> list:
    """The batches on ``device``, images cast to ``dtype`` (labels stay int64)."""
    return [(x.to(device, dtype or x.dtype), y.to(device)) for x, y in batches]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b``, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _devices_of(module: nn.Module) -> set[torch.device]:
    return {t.device for t in [*module.parameters(), *module.buffers()]}


def _same_device(d: torch.device) -> bool:
    """``d`` is :data:`DEVICE` (a bare ``cuda`` matches any index: tensors report ``cuda:0``)."""
    return d.type == DEVICE.type and (DEVICE.index is None or d.index == DEVICE.index)


def _trained_cnn(seed: int = 0) -> nn.Module:
    """``small_cnn`` with non-trivial BatchNorm statistics (a few train-mode forwards)."""
    torch.manual_seed(seed)
    net = small_cnn()
    with torch.no_grad():
        for x, _ in _batches(2, seed=seed + 1):
            net(x)
    return net.eval()


# ---------------------------------------------------------------------------------------------
# K-FAC capture
# ---------------------------------------------------------------------------------------------


def test_capture_on_device_equals_float64_capture_on_cpu() -> None:
    """Empirical Fisher (deterministic): every layer's ``A`` and ``G`` captured on the device in
    float32 match the float64 capture of the same model on the CPU (1e-4 relative)."""
    net = _trained_cnn()
    batches = _batches(3)
    cands = [c for c in find_layers(net) if c.skipped is None]
    names = [c.name for c in cands]

    def capture(model: nn.Module, data: list) -> dict[str, Any]:
        mods = {c.name: c.hook_module for c in find_layers(model)}
        res = capture_factors(model, mods, data, factors_for=names, fisher="empirical")
        assert res.batches == len(data) and res.skipped_batches == 0
        return res.layers

    ref64 = copy.deepcopy(net).double()
    want = capture(ref64, _on(batches, torch.device("cpu"), torch.float64))
    on_dev = copy.deepcopy(net).to(DEVICE)
    got = capture(on_dev, _on(batches, DEVICE))
    assert all(_same_device(d) for d in _devices_of(on_dev))
    assert set(got) == set(want) == set(names)
    for name in names:
        g, w = got[name], want[name]
        assert g.a_sum.device.type == DEVICE.type, f"{name}: A left the device"
        assert (g.a_rows, g.g_rows, g.examples) == (w.a_rows, w.g_rows, w.examples), name
        assert _rel(g.a(), w.a()) < 1e-4, (name, "A", _rel(g.a(), w.a()))
        assert _rel(g.g(), w.g()) < 1e-4, (name, "G", _rel(g.g(), w.g()))


def test_true_fisher_capture_on_device_is_finite_and_positive() -> None:
    """True Fisher (labels sampled on the device's generator, so not comparable draw for draw
    with the CPU): factors finite, symmetric, positive semi-definite, and ``A`` (which does not
    depend on the labels) equal to the CPU float64 ``A``."""
    net = _trained_cnn()
    batches = _batches(2)
    names = [c.name for c in find_layers(net) if c.skipped is None]
    on_dev = copy.deepcopy(net).to(DEVICE)
    mods = {c.name: c.hook_module for c in find_layers(on_dev)}
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    got = capture_factors(on_dev, mods, _on(batches, DEVICE), factors_for=names, fisher="true", generator=gen)
    ref64 = copy.deepcopy(net).double()
    mods64 = {c.name: c.hook_module for c in find_layers(ref64)}
    want = capture_factors(
        ref64, mods64, _on(batches, torch.device("cpu"), torch.float64), factors_for=names, fisher="empirical"
    )
    for name in names:
        lf = got.layers[name]
        for f in (lf.a(), lf.g()):
            f = f.double().cpu()
            assert torch.isfinite(f).all(), name
            assert torch.allclose(f, f.T, atol=1e-6 * float(f.abs().max())), name
            assert float(torch.linalg.eigvalsh(f).min()) >= -1e-5 * float(f.abs().max()), name
        assert float(lf.g().abs().sum()) > 0, name
        assert _rel(lf.a(), want.layers[name].a()) < 1e-4, name


# ---------------------------------------------------------------------------------------------
# prune() on the device
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["bottleneck", "fold_in", "fold_out"])
def test_full_rank_forced_form_on_device_keeps_outputs(form: str) -> None:
    """``ratio=0`` with a forced form rewrites every layer in its eigenbasis at full rank: the
    model stays on the device and its outputs are those before the prune (1e-4 relative)."""
    net = _trained_cnn().to(DEVICE)
    batches = _on(_batches(2), DEVICE)
    x = batches[0][0]
    with torch.no_grad():
        ref = net(x)
    report = prune(net, batches, ratio=0.0, form=form, recalibrate_bn=False)
    rebuilt = [r for r in report.layers if r.skipped is None]
    assert rebuilt and all(r.form == form for r in rebuilt)
    assert all((r.kept_in, r.kept_out) == (r.in_features, r.out_features) for r in rebuilt)
    mods = dict(net.named_modules())
    assert all(isinstance(mods[r.name], KFELayer) for r in rebuilt)
    assert all(_same_device(d) for d in _devices_of(net)), _devices_of(net)
    assert not net.training  # the mode is kept
    with torch.no_grad():
        out = net(x)
    assert out.device == ref.device
    assert _rel(out, ref) < 1e-4, _rel(out, ref)


def test_ratio_zero_auto_form_on_device_changes_nothing() -> None:
    """``ratio=0``, default forms: nothing is removed and no layer is cheaper rewritten, so the
    outputs are unchanged."""
    net = _trained_cnn().to(DEVICE)
    batches = _on(_batches(2), DEVICE)
    with torch.no_grad():
        ref = net(batches[0][0])
    report = prune(net, batches, ratio=0.0, recalibrate_bn=False)
    assert report.flops_after == report.flops_before and report.params_after == report.params_before
    with torch.no_grad():
        out = net(batches[0][0])
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("k", [2, 4])
def test_flops_target_on_device(k: int) -> None:
    """÷k FLOPs on the device: the model stays there, its outputs are finite, and the FLOPs of
    the pruned model, counted again, equal the report's and meet the target."""
    net = _trained_cnn().to(DEVICE)
    batches = _on(_batches(3), DEVICE)
    x = batches[0][0]
    before = count_flops(net, x)
    report = prune(net, batches, ratio=1.0 - 1.0 / k, target="flops")
    assert all(_same_device(d) for d in _devices_of(net)), _devices_of(net)
    assert any(isinstance(m, KFELayer) for m in net.modules())
    with torch.no_grad():
        out = net(x)
    assert _same_device(out.device) and torch.isfinite(out).all()
    after = count_flops(net, x)
    assert (before, after) == (report.flops_before, report.flops_after)
    assert report.target_reached, report.limited_by
    assert after <= before * (1.0 / k + TARGET_TOLERANCE), (before / after, k)
    # A CPU copy of the pruned model computes the same function (the surgery left nothing behind).
    cpu = copy.deepcopy(net).cpu().double()
    with torch.no_grad():
        assert _rel(out, cpu(x.cpu().double())) < 1e-4


def test_prune_channels_on_device() -> None:
    """Real channel removal on the device: the model stays there, the FLOPs target is met as the
    counter says, and a CPU copy of the pruned model computes the same function."""
    from lightning_eigendamage import prune_channels

    net = _trained_cnn().to(DEVICE)
    batches = _on(_batches(3), DEVICE)
    x = batches[0][0]
    before = count_flops(net, x)
    report = prune_channels(net, batches, ratio=0.5, target="flops")
    assert all(_same_device(d) for d in _devices_of(net)), _devices_of(net)
    assert report.channels_removed > 0 and not any(isinstance(m, KFELayer) for m in net.modules())
    with torch.no_grad():
        out = net(x)
    assert _same_device(out.device) and torch.isfinite(out).all()
    assert (before, count_flops(net, x)) == (report.flops_before, report.flops_after)
    assert 0.47 <= report.flops_fraction_removed <= 0.6
    cpu = copy.deepcopy(net).cpu().double()
    with torch.no_grad():
        assert _rel(out, cpu(x.cpu().double())) < 1e-4


# ---------------------------------------------------------------------------------------------
# The callback in a bf16-mixed fit on the device
# ---------------------------------------------------------------------------------------------


class _Watch(pl.Callback):
    """After the callback (placed after it): where the weights and optimizer state live after the
    prune, whether the optimizer holds the model's parameters, and the losses of every step."""

    def __init__(self) -> None:
        self.losses: dict[int, list[float]] = {}
        self.after_prune: dict[str, Any] = {}
        self.end: dict[str, torch.Tensor] = {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *_: Any
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.setdefault(trainer.current_epoch, []).append(float(loss))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        opt = trainer.optimizers[0]
        held = [p for g in opt.param_groups for p in g["params"]]
        state = {
            "devices": _devices_of(pl_module),
            "state_devices": {
                v.device for p in held for v in opt.state.get(p, {}).values() if torch.is_tensor(v)
            },
            "held": [id(p) for p in held],
            "params": {id(p) for p in params.values()},
            "kfe": sum(isinstance(m, KFELayer) for m in pl_module.modules()),
            "weights": {n: p.detach().clone() for n, p in params.items()},
        }
        if trainer.current_epoch == 0:
            self.after_prune = state
        else:
            self.end = state["weights"]


def test_callback_prunes_on_device_in_a_bf16_mixed_fit() -> None:
    """``Trainer(accelerator=..., devices=1, precision="bf16-mixed")``: the round at the end of
    epoch 0 prunes on the device to ÷2 FLOPs (the report's target reached, weights and momentum
    on the device, the optimizer holding exactly the new parameters), and epoch 1 trains the
    pruned model (finite losses, every parameter moved)."""
    torch.manual_seed(0)
    ds = image_data(64, 12)
    model = LitClassifier(small_cnn(), lr=0.02)
    example = ds[:2][0]
    dense_flops = count_flops(model, example)
    cb = EigenDamagePruning(
        schedule=PruningSchedule(epochs={0: 0.5}, target="flops"), verbose=False, structure="eigenbasis"
    )
    watch = _Watch()
    accelerator, devices = _lightning_device()
    trainer = make_trainer(
        accelerator=accelerator, devices=devices, precision="bf16-mixed", max_epochs=2, callbacks=[cb, watch]
    )
    trainer.fit(model, DataLoader(ds, batch_size=16, shuffle=False))

    (report,) = cb.reports
    assert report.target == "flops" and report.target_reached, report.limited_by
    assert report.skipped_batches == 0 and report.batches == 4
    assert report.flops_after <= report.flops_before * (0.5 + TARGET_TOLERANCE)
    assert report.flops_before == dense_flops
    assert count_flops(model, example) == report.flops_after  # counted again, after the fit
    after = watch.after_prune
    assert after["kfe"] > 0, "nothing was rebuilt"
    assert after["devices"] and all(_same_device(d) for d in after["devices"]), after["devices"]
    assert after["state_devices"] and all(_same_device(d) for d in after["state_devices"])
    assert len(after["held"]) == len(set(after["held"])) and set(after["held"]) == after["params"]
    losses = watch.losses[1]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
    moved = [n for n, w in after["weights"].items() if not torch.equal(w, watch.end[n])]
    assert sorted(moved) == sorted(after["weights"]), "some parameters did not train after the prune"
