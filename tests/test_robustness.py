"""Defects a new user meets first: non-finite eigendecompositions, silent shortfalls of a target,
run lengths, forwards with more than one input, Transformer decoders, modes and bad input."""

from __future__ import annotations

import copy
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lit_models import LitClassifier, MemoryLogger, image_data, loader, small_cnn, trainer
from models import ConvNet, conv_batches
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_eigendamage import (
    EigenDamagePruning,
    KFELayer,
    PruningSchedule,
    TargetNotReachedWarning,
    ZeroCurvatureWarning,
    eigenbasis,
    prune,
    pruner,
)

# ---------------------------------------------------------------------------------------------
# 1. Never a non-finite weight
# ---------------------------------------------------------------------------------------------


def _psd(n: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return a @ a.T / rank


def test_eigh_that_returns_nan_without_raising_falls_back_to_float64(monkeypatch) -> None:
    """torch.linalg.eigh in float32 can return NaN silently: the result is checked, redone."""
    real = torch.linalg.eigh
    calls = []

    def silent_nan(m):
        calls.append(m.dtype)
        evals, evecs = real(m)
        if m.dtype == torch.float32:
            return torch.full_like(evals, float("nan")), torch.full_like(evecs, float("nan"))
        return evals, evecs

    monkeypatch.setattr(torch.linalg, "eigh", silent_nan)
    f = _psd(20, 8)
    evals, evecs = eigenbasis.eigh_factor(f, float64_max=4)
    assert calls == [torch.float32, torch.float64]
    assert torch.isfinite(evals).all() and torch.isfinite(evecs).all()
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, f, rtol=1e-8, atol=1e-8)


def test_eigh_that_returns_a_wrong_basis_is_redone(monkeypatch) -> None:
    """A finite but wrong basis (not orthonormal) fails the probe check and is redone."""
    real = torch.linalg.eigh

    def garbage_f32(m):
        evals, evecs = real(m)
        if m.dtype == torch.float32:
            return evals, evecs + 0.1 * torch.ones_like(evecs)
        return evals, evecs

    monkeypatch.setattr(torch.linalg, "eigh", garbage_f32)
    f = _psd(16, 16, seed=1)
    evals, evecs = eigenbasis.eigh_factor(f, float64_max=4)
    eye = torch.eye(16, dtype=torch.float64)
    assert (evecs.T @ evecs - eye).abs().max() < 1e-10
    # The batched path checks each result as well.
    got = eigenbasis.eigh_factors([f, _psd(16, 5, seed=2)], float64_max=4)
    for _, evecs in got:
        assert (evecs.T @ evecs - eye).abs().max() < 1e-10


def test_factor_that_no_attempt_can_decompose_leaves_its_layer_whole(monkeypatch) -> None:
    """Every eigh of the 24-wide factors returns NaN: those layers are left whole with the reason,
    the others are pruned, and no parameter of the model is non-finite."""
    real = torch.linalg.eigh

    def nan_for_24(m):
        evals, evecs = real(m)
        if m.shape[-1] == 24:
            return torch.full_like(evals, float("nan")), torch.full_like(evecs, float("nan"))
        return evals, evecs

    torch.manual_seed(0)
    model = ConvNet()
    before = copy.deepcopy(model)
    monkeypatch.setattr(torch.linalg, "eigh", nan_for_24)
    report = prune(model, conv_batches(2), ratio=0.5)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    by_name = {r.name: r for r in report.layers}
    # features.2 (16→24) and features.5 (24→32) have a 24-wide factor.
    for name in ("features.2", "features.5"):
        assert "eigendecomposition failed" in (by_name[name].skipped or ""), name
        assert type(model.get_submodule(name)) is type(before.get_submodule(name))
        torch.testing.assert_close(
            model.get_submodule(name).weight, before.get_submodule(name).weight, rtol=0, atol=0
        )
    assert isinstance(model.features[7], KFELayer) and isinstance(model.fc1, KFELayer)


def test_new_stage_with_non_finite_weights_is_never_installed(monkeypatch) -> None:
    real_build = pruner.build_layer

    def poisoned(state, q_a, q_g, kept_in, kept_out, form, **kw):
        new = real_build(state, q_a, q_g, kept_in, kept_out, form, **kw)
        if (state.c_in, state.c_out) == (24, 32):  # features.5
            with torch.no_grad():
                next(new.parameters()).view(-1)[0] = float("inf")
        return new

    monkeypatch.setattr(pruner, "build_layer", poisoned)
    torch.manual_seed(0)
    model = ConvNet()
    old = model.features[5]
    report = prune(model, conv_batches(2), ratio=0.5)
    assert model.features[5] is old
    assert all(torch.isfinite(p).all() for p in model.parameters())
    entry = next(r for r in report.layers if r.name == "features.5")
    assert entry.skipped == "its new stages had non-finite weights"
    assert (entry.kept_in, entry.kept_out, entry.form) == (24, 32, "dense")
    assert entry.params_after == entry.params_before
    assert isinstance(model.features[7], KFELayer)


# ---------------------------------------------------------------------------------------------
# 2. An unreachable target is said
# ---------------------------------------------------------------------------------------------


def test_unreachable_flops_target_warns_and_is_in_the_report() -> None:
    torch.manual_seed(0)
    model = ConvNet()
    with pytest.warns(TargetNotReachedWarning, match=r"asked to remove 80\.0% of the flops") as rec:
        report = prune(model, conv_batches(2), ratio=0.8, target="flops", exclude=["features.*"])
    msg = str(rec[0].message)
    assert "layer_cap=0.75" in msg and "excluded by user" in msg
    reached = 1 - report.flops_after / report.flops_before
    assert not report.target_reached
    assert report.reached == pytest.approx(reached)
    assert report.reached < 0.8 - 0.005
    assert report.limited_by and "excluded by user" in report.limited_by
    d = report.to_dict()
    assert d["target_reached"] is False and d["reached"] == report.reached
    assert d["limited_by"] == report.limited_by
    assert type(report).from_dict(d) == report


def test_reachable_target_is_reported_reached_without_warning() -> None:
    torch.manual_seed(0)
    model = ConvNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TargetNotReachedWarning)
        report = prune(model, conv_batches(2), ratio=0.4, target="params")
    assert report.target_reached and report.limited_by is None
    assert report.reached == pytest.approx(1 - report.params_after / report.params_before)
    assert report.reached >= 0.4 - 0.005


def test_callback_says_an_unreachable_target_once_and_logs_it() -> None:
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    logger = MemoryLogger()
    cb = EigenDamagePruning(
        PruningSchedule(epochs={0: 0.9}, fisher_batches=2, target="flops"),
        exclude=["net.0", "net.3"],
        verbose=False,
        structure="eigenbasis",
    )
    with pytest.warns(TargetNotReachedWarning, match="EigenDamagePruning round epoch:0") as rec:
        trainer(max_epochs=2, callbacks=[cb], logger=logger, log_every_n_steps=1).fit(
            model, loader(image_data(32))
        )
    assert len([w for w in rec if issubclass(w.category, TargetNotReachedWarning)]) == 1
    assert cb.reports[0].target_reached is False
    assert logger.series("pruning/target_reached") == [0.0]


# ---------------------------------------------------------------------------------------------
# 4. A prune point the run never reaches
# ---------------------------------------------------------------------------------------------


def test_step_point_beyond_the_run_is_an_error_before_training() -> None:
    model = LitClassifier(small_cnn())
    before = copy.deepcopy(model.state_dict())
    cb = EigenDamagePruning(PruningSchedule(steps={1000: 0.5}), verbose=False, structure="eigenbasis")
    with pytest.raises(ValueError, match=r"step\(s\) \[1000\].*only 12 optimizer step"):
        trainer(max_epochs=3, callbacks=[cb]).fit(model, loader(image_data(64)))  # 3 × 4 steps
    assert model.steps_run == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_step_point_within_the_run_is_accepted() -> None:
    model = LitClassifier(small_cnn())
    cb = EigenDamagePruning(
        PruningSchedule(steps={12: 0.3}, fisher_batches=2), verbose=False, structure="eigenbasis"
    )
    trainer(max_epochs=3, callbacks=[cb]).fit(model, loader(image_data(64)))
    assert len(cb.reports) == 1


class _Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            yield torch.randn(3, 12, 12, generator=g), int(torch.randint(0, 10, (1,), generator=g))


def test_step_points_of_a_run_of_unknown_length_warn() -> None:
    model = LitClassifier(small_cnn())
    cb = EigenDamagePruning(PruningSchedule(steps={1000: 0.5}), verbose=False, structure="eigenbasis")
    with pytest.warns(UserWarning, match=r"length is unknown.*\[1000\]"):
        trainer(max_epochs=1, callbacks=[cb]).fit(model, DataLoader(_Stream(), batch_size=2))


# ---------------------------------------------------------------------------------------------
# 5. Modules whose forward takes more than the input (Lightning's own LightningTransformer)
# ---------------------------------------------------------------------------------------------


def _tiny_lightning_transformer():
    from lightning.pytorch.demos.transformer import LightningTransformer, Transformer

    class TinyLT(LightningTransformer):
        def __init__(self) -> None:
            super().__init__(vocab_size=40)
            self.model = Transformer(vocab_size=40, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0)

        def prepare_data(self) -> None:  # the demo's would download WikiText-2
            pass

        def train_dataloader(self) -> DataLoader:
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, 40, (24, 9), generator=g)
            pairs = list(zip(tokens[:, :-1], tokens[:, 1:]))
            return DataLoader(pairs, batch_size=4)

    torch.manual_seed(0)
    return TinyLT()


def test_lightning_transformer_without_forward_fn_names_the_options() -> None:
    model = _tiny_lightning_transformer()
    cb = EigenDamagePruning({0: 0.5}, verbose=False, structure="eigenbasis")
    with pytest.raises(RuntimeError, match=r"forward_fn=.*input_fn") as err:
        trainer(max_epochs=2, callbacks=[cb]).fit(model)
    assert isinstance(err.value.__cause__, TypeError)


def test_lightning_transformer_is_pruned_with_forward_fn() -> None:
    model = _tiny_lightning_transformer()
    cb = EigenDamagePruning(
        PruningSchedule(epochs={0: 0.5}, fisher_batches=3),
        forward_fn=lambda m, b: m(*b),
        verbose=False,
        structure="eigenbasis",
    )
    trainer(max_epochs=2, callbacks=[cb]).fit(model)
    report = cb.reports[0]
    reasons = {r.name: r.skipped for r in report.layers}
    # The decoder's feed-forward linears have no fused fast path: they are pruned.
    dec = "model.transformer.decoder.layers.0."
    assert reasons[dec + "linear1"] is None and reasons[dec + "linear2"] is None
    assert "fast path" in reasons["model.transformer.encoder.layers.0.linear1"]
    assert any(isinstance(model.get_submodule(dec + n), KFELayer) for n in ("linear1", "linear2"))
    assert report.flops_after < report.flops_before
    assert report.batches == 3
    inputs, target = next(iter(model.train_dataloader()))
    model.eval()
    with torch.no_grad():
        out = model(inputs, target)
    assert out.shape == (4 * 8, 40) and torch.isfinite(out).all()


def test_prune_takes_forward_fn() -> None:
    """Plain PyTorch: a module with forward(x, y) pruned with forward_fn; FLOPs counted through it."""

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.b(torch.relu(self.a(x))) * scale))

    torch.manual_seed(0)
    m = TwoInputs()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, generator=g), torch.rand(8, 1, generator=g)) for _ in range(2)]
    with pytest.raises(TypeError):
        prune(copy.deepcopy(m), batches, ratio=0.5)
    report = prune(m, batches, ratio=0.5, forward_fn=lambda mod, b: mod(*b))
    assert report.flops_before == 2 * (6 * 16 + 16 * 16 + 16 * 3)
    assert report.flops_after < report.flops_before
    with pytest.raises(TypeError, match="forward_fn must be a callable"):
        prune(m, batches, ratio=0.5, forward_fn="m(*b)")


# ---------------------------------------------------------------------------------------------
# 6. Only the encoder has a fused fast path
# ---------------------------------------------------------------------------------------------


class _Seq2Seq(nn.Module):
    def __init__(self, nhead: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.t = nn.Transformer(16, nhead, 1, 1, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(self.t(h, h).mean(1))


def test_decoder_linears_are_pruned_and_match_eager_in_train_and_eval() -> None:
    torch.manual_seed(0)
    model = _Seq2Seq()
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 7, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
    report = prune(model, batches, ratio=0.0, form="bottleneck")
    reasons = {r.name: r.skipped for r in report.layers}
    assert reasons["t.decoder.layers.0.linear1"] is None
    assert reasons["t.decoder.layers.0.linear2"] is None
    assert "fast path" in reasons["t.encoder.layers.0.linear1"]  # the encoder's is real
    assert isinstance(model.t.decoder.layers[0].linear1, KFELayer)
    x = torch.randn(4, 7, 6)
    for mode in (True, False):
        model.train(mode), dense.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)


def test_encoder_layer_without_a_possible_fast_path_is_pruned() -> None:
    """An odd head count rules the fused path out (as torch checks it): the linears are prunable."""
    torch.manual_seed(0)
    model = _Seq2Seq(nhead=1)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 7, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]
    dense = copy.deepcopy(model)
    report = prune(model, batches, ratio=0.0, form="bottleneck")
    assert {r.name: r.skipped for r in report.layers}["t.encoder.layers.0.linear1"] is None
    model.eval(), dense.eval()
    x = torch.randn(4, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 7. Modes are kept
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_new_stages_take_the_mode_of_the_layer_they_replace(training: bool) -> None:
    torch.manual_seed(0)
    model = ConvNet().train(training)
    report = prune(model, conv_batches(2), ratio=0.5)
    rebuilt = [r.name for r in report.layers if r.skipped is None and r.form != "dense"]
    assert rebuilt
    for name in rebuilt:
        for sub in model.get_submodule(name).modules():
            assert sub.training is training, name
    assert all(m.training is training for m in model.modules())


# ---------------------------------------------------------------------------------------------
# 8. Clear errors and warnings
# ---------------------------------------------------------------------------------------------


def test_exclude_that_is_not_a_list_says_what_to_pass() -> None:
    with pytest.raises(TypeError, match=r"exclude takes .* got int 123"):
        prune(ConvNet(), conv_batches(1), ratio=0.5, exclude=123)
    with pytest.raises(TypeError, match=r"exclude takes .* got int 123"):
        EigenDamagePruning({0: 0.5}, exclude=123, structure="eigenbasis")


def test_a_bare_tensor_as_batches_says_to_wrap_it() -> None:
    model = ConvNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"single Tensor.*prune\(model, \[batch\]"):
        prune(model, torch.randn(4, 3, 16, 16), ratio=0.5)
    with pytest.raises(TypeError, match=r"single dict"):
        prune(model, {"x": torch.randn(4, 3, 16, 16)}, ratio=0.5)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for one_batch in ((x, y), [x, y]):
        with pytest.raises(TypeError, match=r"looks like one \(input, target\) batch.*\[\(x, y\)\]"):
            prune(model, one_batch, ratio=0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_zero_curvature_warns_and_names_the_layers() -> None:
    """A zero-initialised head (as torchvision's ViT has) stops every gradient: all scores are 0."""
    torch.manual_seed(0)
    model = ConvNet()
    nn.init.zeros_(model.fc2.weight)
    with pytest.warns(ZeroCurvatureWarning, match=r"5 of 5 layers have zero curvature.*features\.0"):
        prune(model, conv_batches(2), ratio=0.5)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroCurvatureWarning)
        prune(ConvNet(), conv_batches(2), ratio=0.5)


@pytest.mark.parametrize("where", [0, 1])
def test_a_batch_without_examples_is_a_clear_error_and_changes_nothing(where: int) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    before = copy.deepcopy(model.state_dict())
    batches = list(conv_batches(2))
    x, y = batches[where]
    batches[where] = (x[:0], y[:0])
    with pytest.raises(ValueError, match=f"batch {where} holds no examples"):
        prune(model, batches, ratio=0.5)
    assert not any(isinstance(m, KFELayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("form", ["fold_in", "fold_out"])
def test_a_forced_form_that_cannot_reach_the_target_says_so_with_its_own_floor(form: str) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    with pytest.warns(TargetNotReachedWarning) as rec:
        report = prune(model, conv_batches(2), ratio=0.97, target="flops", form=form)
    msg = str(rec[0].message)
    assert f"form={form!r} keeps the" in msg
    # The floor the message names is the one this form reaches, not the free choice of forms'.
    floor = float(re.search(r"keep at least ([0-9.]+)%", msg).group(1)) / 100
    assert floor == pytest.approx(report.flops_after / report.flops_before, abs=0.002)


# ---------------------------------------------------------------------------------------------
# Layers too wide for their factors (max_factor_dim)
# ---------------------------------------------------------------------------------------------


def test_layers_wider_than_max_factor_dim_are_left_whole_and_get_no_factor(monkeypatch) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    batches = conv_batches(2)
    wide = {"features.5", "features.7", "fc1"}  # a side of 32 > 24; fc2 is the exempt last layer
    before = {n: copy.deepcopy(model.get_submodule(n).state_dict()) for n in wide}
    asked = []
    real = pruner.capture_factors

    def spy(*args, **kwargs):
        asked.append(set(kwargs["factors_for"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pruner, "capture_factors", spy)
    report = prune(model, batches, ratio=0.5, max_factor_dim=24)
    assert asked == [{"features.0", "features.2"}]  # no factor is ever allocated for the wide ones
    skipped = {r.name: r.skipped for r in report.layers if r.skipped}
    for name in wide:
        assert "max_factor_dim=24" in skipped[name] and "32×32" in skipped[name]
        mod = model.get_submodule(name)
        assert not isinstance(mod, KFELayer)
        assert all(torch.equal(v, before[name][k]) for k, v in mod.state_dict().items())
    assert isinstance(model.get_submodule("features.2"), KFELayer)  # the narrow ones are pruned
    # None lifts the limit; the default (16384) does not touch these layers.
    for limit in (None, 16384):
        rep = prune(ConvNet(), batches, ratio=0.5, max_factor_dim=limit)
        assert not any("max_factor_dim" in (r.skipped or "") for r in rep.layers)
    for bad in (0, -1, 1.5, True, "32"):
        with pytest.raises(ValueError, match="max_factor_dim must be a positive integer"):
            prune(ConvNet(), batches, ratio=0.5, max_factor_dim=bad)


def test_callback_leaves_layers_wider_than_max_factor_dim_whole(monkeypatch) -> None:
    import lightning_eigendamage.lightning.callback as callback_mod

    asked = []
    real = callback_mod.KFACapture

    def spy(modules, *, factors_for, **kw):
        asked.append(set(factors_for))
        return real(modules, factors_for=factors_for, **kw)

    monkeypatch.setattr(callback_mod, "KFACapture", spy)
    torch.manual_seed(0)
    model = LitClassifier(small_cnn())
    cb = EigenDamagePruning(
        PruningSchedule(epochs={0: 0.5}, fisher_batches=2),
        max_factor_dim=16,
        verbose=False,
        structure="eigenbasis",
    )
    trainer(max_epochs=1, callbacks=[cb]).fit(model, loader(image_data(32)))
    skipped = {r.name: r.skipped for r in cb.reports[0].layers if r.skipped}
    assert {"net.3", "net.5", "net.9"} <= {n for n, s in skipped.items() if "max_factor_dim=16" in s}
    assert isinstance(model.net[0], KFELayer) and isinstance(model.net[3], nn.Conv2d)
    assert {"net.0"} in asked and not any({"net.3", "net.5", "net.9"} & a for a in asked)  # no factor
    with pytest.raises(ValueError, match="max_factor_dim must be a positive integer"):
        EigenDamagePruning({0: 0.5}, max_factor_dim=0, structure="eigenbasis")


def _hooked_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


def test_layers_with_user_hooks_are_left_whole_and_their_hooks_keep_firing() -> None:
    model = _hooked_net().eval()
    seen: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(o))
    model[2].register_forward_pre_hook(lambda m, i: (i[0] * 0.5,))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(2)]
    report = prune(model, batches, ratio=0.0, form="bottleneck")  # full rank: nothing removed
    by_name = {r.name: r for r in report.layers}
    assert "forward pre-hooks and forward hooks" in by_name["2"].skipped
    assert model[2].__class__ is nn.Conv2d  # left whole, hooks and all
    assert isinstance(model[0], KFELayer) and isinstance(model[4], KFELayer)  # the others are pruned
    seen.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert len(seen) == 1  # the user's hook still fires


def test_torch_pruning_masks_and_parametrisations_are_reported_with_the_right_reason_and_widths() -> None:
    from torch.nn.utils import parametrizations
    from torch.nn.utils import prune as torch_prune

    model = _hooked_net()
    torch_prune.l1_unstructured(model[2], "weight", amount=0.3)  # recomputes .weight in a pre-hook
    model[4] = parametrizations.weight_norm(model[4])  # a parametrised subclass of Conv2d
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(2)]
    report = prune(model, batches, ratio=0.5)
    by_name = {r.name: r for r in report.layers}
    assert "forward pre-hooks" in by_name["2"].skipped and "frozen" not in by_name["2"].skipped
    assert "subclasses Conv2d" in by_name["4"].skipped
    for name in ("2", "4"):
        r = by_name[name]
        assert (r.in_features, r.out_features, r.kept_in, r.kept_out) == (8, 8, 8, 8), name
    assert isinstance(model[0], KFELayer)


def test_an_open_capture_is_not_taken_for_user_hooks() -> None:
    """The callback keeps a capture's hooks installed across a window's batches; discovery then
    must still see the layers as prunable."""
    from lightning_eigendamage.curvature import KFACapture
    from lightning_eigendamage.discovery import find_layers

    model = _hooked_net()
    names = [c.name for c in find_layers(model) if c.skipped is None]
    with KFACapture({n: model.get_submodule(n) for n in names}):
        assert [c.name for c in find_layers(model) if c.skipped is None] == names
    model[2].register_forward_hook(lambda m, i, o: None)
    assert "forward hooks" in {c.name: c.skipped for c in find_layers(model)}["2"]


def test_inference_mode_is_named_as_the_cause_and_no_grad_works() -> None:
    model = ConvNet()
    before = copy.deepcopy(model.state_dict())
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inside torch.inference_mode\(\)"):
        prune(model, conv_batches(1), ratio=0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert prune(model, conv_batches(1), ratio=0.5).realised_fraction > 0


def test_dict_batches_take_the_empirical_fisher_through_loss_fn() -> None:
    """The whole dict is loss_fn's target: the same pruning as (x, y) tuples with cross-entropy."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    tuples = conv_batches(2)
    dicts = [{"image": x, "label": y} for x, y in tuples]
    a = ConvNet()
    b = copy.deepcopy(a)
    ra = prune(a, tuples, ratio=0.5, fisher="empirical")
    rb = prune(
        b,
        dicts,
        ratio=0.5,
        fisher="empirical",
        input_fn=lambda d: d["image"],
        loss_fn=lambda out, d: F.cross_entropy(out, d["label"]),
    )
    assert ra.to_dict() == rb.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa if torch.is_tensor(sa[k]))
    with pytest.raises(ValueError, match=r"dict batches needs loss_fn=lambda output, batch"):
        prune(ConvNet(), dicts, ratio=0.5, fisher="empirical", input_fn=lambda d: d["image"])


@pytest.mark.parametrize(
    "kwargs", [{}, {"form_by": "latency"}, {"form_by": "latency", "latency_mode": "training"}, {"shots": 2}]
)
def test_prune_leaves_the_global_random_stream_alone(kwargs) -> None:
    """New stages are initialised and then overwritten, timing inputs are made up: neither may
    shift the user's dropout or shuffling."""
    torch.manual_seed(0)
    model, batches = ConvNet(), conv_batches(2)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # forms chosen by time may stop short of the target
        prune(model, batches, ratio=0.5, target="flops", **kwargs)
    if "form_by" not in kwargs:  # timed forms may all lose to the dense layers on a loaded machine
        assert any(isinstance(m, KFELayer) for m in model.modules())
    assert torch.equal(torch.get_rng_state(), state)


def test_a_callback_round_leaves_the_global_random_stream_alone() -> None:
    states: list[torch.Tensor] = []

    class Spy(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            states.append(torch.get_rng_state())

    cb = EigenDamagePruning(schedule={0: 0.5}, verbose=False, structure="eigenbasis")
    model = LitClassifier(small_cnn())
    trainer(callbacks=[Spy(), cb, Spy()], max_epochs=1).fit(model, loader(image_data(32), 16))
    assert len(cb.reports) == 1 and len(states) == 2
    assert torch.equal(states[0], states[1])


def _snapshot(model: nn.Module):
    return [type(m).__name__ for m in model.modules()], copy.deepcopy(model.state_dict())


def _unchanged(model: nn.Module, snap) -> bool:
    types, sd = _snapshot(model)
    if types != snap[0] or sd.keys() != snap[1].keys():
        return False
    return all(torch.equal(v, snap[1][k]) for k, v in sd.items())


@pytest.mark.parametrize(
    "where, kwargs",
    [
        ("count_flops", {}),  # the report's count, after the swap
        ("reconstruct", {"reconstruct": True}),
        ("recalibrate_batchnorm", {}),
        ("capture_factors", {"shots": 2}),  # the second shot's capture, after the first surgery
        ("recalibrate_batchnorm", {"shots": 2}),
    ],
)
def test_a_call_interrupted_after_the_surgery_leaves_the_model_as_it_was(monkeypatch, where, kwargs) -> None:
    torch.manual_seed(0)
    model, batches = ConvNet(), conv_batches(2)
    model.train()
    snap = _snapshot(model)
    real = getattr(pruner, where)
    calls = {"n": 0}
    fail_at = {"count_flops": 2, "capture_factors": 2}.get(where, 2 if kwargs.get("shots") else 1)

    def interrupted(*args, **kw):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(pruner, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune(model, batches, ratio=0.5, target="flops", **kwargs)
    assert calls["n"] == fail_at
    assert _unchanged(model, snap)
    assert model.training and all(m.training for m in model.modules())


def _two_blocks() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip


@pytest.mark.parametrize("how", ["instance", "glob", "regex"])
def test_excluding_a_container_leaves_every_layer_inside_it_whole(how: str) -> None:
    from lightning_eigendamage import PruningWarning

    model = _two_blocks()
    entry = {"instance": model[0], "glob": "0", "regex": re.compile("0")}[how]
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PruningWarning)  # the entry matches: no warning
        warnings.filterwarnings("ignore", category=TargetNotReachedWarning)
        report = prune(model, batches, ratio=0.6, exclude=[entry])
    skipped = {r.name: r.skipped for r in report.layers}
    assert skipped["0.0"] == skipped["0.2"] == "excluded by user"
    assert isinstance(model[0][0], nn.Conv2d) and isinstance(model[0][2], nn.Conv2d)
    assert isinstance(model.get_submodule("1.0"), KFELayer)  # the other block is pruned


def test_an_exclude_entry_that_matches_nothing_warns() -> None:
    from lightning_eigendamage import PruningWarning

    model = _two_blocks()
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    with pytest.warns(PruningWarning, match=r"exclude entry re.compile\('block'\) matches no module name"):
        prune(copy.deepcopy(model), batches, ratio=0.5, exclude=[re.compile("block")])
    with pytest.warns(PruningWarning, match="exclude entry a Conv2d matches a module that is not part"):
        prune(copy.deepcopy(model), batches, ratio=0.5, exclude=[nn.Conv2d(3, 3, 1)])
