"""prune(): function preservation per form, real reductions, iterative pruning, restore, errors."""

from __future__ import annotations

import copy
import io
import time

import pytest
import torch
from models import ConvNet, TinyTransformer, conv_batches, resnet18, seq_batches, warm_up_bn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_eigendamage import KFELayer, prune, restore_pruned
from lightning_eigendamage.costs import count_flops


def _conv():
    torch.manual_seed(0)
    model = ConvNet()
    batches = conv_batches(3, n=16, size=16)
    warm_up_bn(model, batches)
    return model, batches


def _resnet():
    torch.manual_seed(0)
    model = resnet18()
    batches = conv_batches(2, n=8, size=32)
    warm_up_bn(model, batches)
    return model, batches


def _transformer():
    torch.manual_seed(0)
    return TinyTransformer().eval(), seq_batches(3, n=16)


MODELS = {"convnet": _conv, "resnet18": _resnet, "transformer": _transformer}
RATIOS = {"convnet": 0.5, "resnet18": 0.5, "transformer": 0.7}


def _rel_err(a, b):
    return float((a - b).norm() / b.norm())


def _layer_inputs(model, names, x):
    """Inputs seen by the named modules in one eval forward."""
    got = {}
    mods = dict(model.named_modules())
    hs = [
        mods[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, i[0].detach())) for n in names
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return got


def _module_cost(module, x):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(x[:1])
    return fc.get_total_flops(), sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("form", ["bottleneck", "fold_in", "fold_out"])
@pytest.mark.parametrize("which", sorted(MODELS))
def test_forced_forms_preserve_function(which, form):
    model, batches = MODELS[which]()
    x = batches[0][0]
    with torch.no_grad():
        ref = model(x)
    report = prune(model, batches[:1], ratio=0.0, form=form)
    pruned = [r for r in report.layers if r.skipped is None]
    assert pruned and all(r.form == form for r in pruned)
    mods = dict(model.named_modules())
    for r in pruned:
        assert isinstance(mods[r.name], KFELayer) and mods[r.name].form == form
        assert (r.kept_in, r.kept_out) == (r.in_features, r.out_features)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert _rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("form", ["bottleneck", "fold_in", "dense"])
def test_channels_last_models_stay_channels_last(form):
    model, batches = _conv()
    model = model.to(memory_format=torch.channels_last)
    x = batches[0][0].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model.eval()(x)
    report = prune(model, batches[:1], ratio=0.0, form=form)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(r.form == form for r in report.layers if r.skipped is None)
    for m in convs:
        if m.weight.shape[2:] != (1, 1) or m.weight.shape[1] > 1:
            assert m.weight.is_contiguous(memory_format=torch.channels_last), m
    with torch.no_grad():
        assert _rel_err(model.eval()(x), ref) <= 1e-5


def test_transformer_fastpath_layers_are_skipped_and_eval_works():
    model, batches = _transformer()
    report = prune(model, batches, ratio=0.7)
    reasons = {r.name: r.skipped for r in report.layers}
    assert "fused Transformer fast path" in reasons["enc.linear1"]
    assert "fused Transformer fast path" in reasons["enc.linear2"]
    assert "applied through its weights by its attention module" in reasons["enc.self_attn.out_proj"]
    assert type(model.enc.linear1) is nn.Linear and type(model.enc.linear2) is nn.Linear
    with torch.no_grad():
        model.eval()(batches[0][0])


@pytest.mark.parametrize("which", sorted(MODELS))
def test_pruning_reduces_costs_and_model_still_trains(which):
    model, batches = MODELS[which]()
    x = batches[0][0]
    candidates = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    inputs = _layer_inputs(model, candidates, x)
    before = {n: _module_cost(dict(model.named_modules())[n], inputs[n]) for n in candidates}
    report = prune(model, batches, ratio=RATIOS[which])
    assert report.flops_after < report.flops_before
    assert report.params_after < report.params_before
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert 0 < report.realised_fraction <= RATIOS[which]
    assert any(r.form != "dense" for r in report.layers)
    # No layer costs more than before (measured independently with FlopCounterMode).
    mods = dict(model.named_modules())
    for n in candidates:
        flops, params = _module_cost(mods[n], inputs[n])
        assert flops <= before[n][0] and params <= before[n][1], n
    # The reported totals agree with a fresh count (module by module: PyTorch's fused Transformer
    # fast path hides its products from the counter).
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.eval()(x[:1])
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    assert fc.get_total_flops() == report.flops_after
    # Trains: forward, backward, optimizer step changes every trainable parameter.
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before_p = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), batches[0][1])
    loss.backward()
    opt.step()
    for a, p in zip(before_p, model.parameters()):
        assert p.grad is not None
        # A conv bias right before a train-mode BatchNorm has a ~0 gradient by construction.
        if p.grad.abs().max() > 1e-6:
            assert not torch.equal(a, p)
    with torch.no_grad():
        out = model.eval()(x)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("which", ["convnet", "transformer"])
def test_two_prunes_stay_three_stages_and_match_plan(which):
    model, batches = MODELS[which]()
    prune(model, batches, ratio=RATIOS[which])
    report = prune(model, batches, ratio=0.5)
    mods = dict(model.named_modules())
    for m in model.modules():
        if isinstance(m, KFELayer):
            kids = list(m.children())
            assert 1 <= len(kids) <= 3
            assert all(type(k) in (nn.Conv2d, nn.Linear) for k in kids)
    for r in report.layers:
        m = mods[r.name]
        if isinstance(m, KFELayer):
            assert (m.rank_in, m.rank_out, m.form) == (r.kept_in, r.kept_out, r.form)
        else:
            assert r.form == "dense" and (r.kept_in, r.kept_out) == (r.in_features, r.out_features)
    assert report.flops_after <= report.flops_before
    # A second round with nothing removed keeps the function (bases merged into rotations).
    x = batches[0][0]
    with torch.no_grad():
        ref = model.eval()(x)
    prune(model, batches[:1], ratio=0.0, form="bottleneck")
    with torch.no_grad():
        out = model.eval()(x)
    assert _rel_err(out, ref) <= 1e-5
    assert all(len(list(m.children())) <= 3 for m in model.modules() if isinstance(m, KFELayer))


@pytest.mark.parametrize("which", ["convnet", "resnet18"])
def test_restore_pruned_reproduces_outputs_with_weights_only(which):
    model, batches = MODELS[which]()
    fresh = copy.deepcopy(model)
    prune(model, batches, ratio=0.5)
    prune(model, batches, ratio=0.3)
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, buf)  # Lightning-style dict
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    restore_pruned(fresh, ckpt)
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_restore_pruned_keeps_frozen_rotations_frozen():
    model, batches = _conv()
    fresh, trainable_fresh = copy.deepcopy(model), copy.deepcopy(model)
    prune(model, batches, ratio=0.5, train_rotations=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".rotate_" in n for n in frozen)
    restore_pruned(fresh, model.state_dict())
    assert {n for n, p in fresh.named_parameters() if not p.requires_grad} == frozen
    # an old record without the flag, and one of trainable rotations, restore as trainable
    sd = model.state_dict()
    old = {k: ({kk: vv for kk, vv in v.items() if kk != "rotations_trainable"} if isinstance(v, dict) else v)
           for k, v in sd.items()}  # fmt: skip
    restore_pruned(trainable_fresh, old)
    assert all(p.requires_grad for p in trainable_fresh.parameters())
    # into layers of the same structure, a frozen record loads and, as torch's loading does,
    # leaves requires_grad alone
    trainable_fresh.load_state_dict(sd)
    assert all(p.requires_grad for p in trainable_fresh.parameters())


def test_restore_from_path_and_mismatch_leaves_model_unchanged(tmp_path):
    model, batches = _conv()
    prune(model, batches, ratio=0.5)
    path = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), path)
    fresh = ConvNet()
    restore_pruned(fresh, path)
    pruned_names = {n for n, m in model.named_modules() if isinstance(m, KFELayer)}
    assert pruned_names and pruned_names == {n for n, m in fresh.named_modules() if isinstance(m, KFELayer)}
    # A binary file object, as torch.load takes it.
    x = batches[0][0]
    with open(path, "rb") as f:
        from_file = restore_pruned(ConvNet(), f)
    with torch.no_grad():
        assert torch.equal(from_file.eval()(x), model.eval()(x))
    with pytest.raises(TypeError, match="binary file object"):
        restore_pruned(ConvNet(), [1, 2])
    # Another model class: clear error, nothing changed.
    other = TinyTransformer()
    snapshot = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="does not have"):
        restore_pruned(other, path)
    assert other.state_dict().keys() == snapshot.keys()
    # A corrupted record: clear error, nothing changed.
    sd = torch.load(path, weights_only=True)
    key = next(k for k in sd if k.endswith("_extra_state"))
    sd[key] = dict(sd[key], in_features=999)
    fresh2 = ConvNet()
    before = copy.deepcopy(fresh2.state_dict())
    with pytest.raises(ValueError, match="do not match"):
        restore_pruned(fresh2, sd)
    assert fresh2.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in fresh2.state_dict().items())
    # Weights that do not fit the recorded shapes: load fails, modules swapped back.
    sd = torch.load(path, weights_only=True)
    wkey = next(k for k in sd if k.endswith("core.weight"))
    sd[wkey] = sd[wkey][:1]
    fresh3 = ConvNet()
    with pytest.raises(RuntimeError, match="size mismatch"):
        restore_pruned(fresh3, sd)
    assert not any(isinstance(m, KFELayer) for m in fresh3.modules())


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", None, True])
def test_bad_ratio(bad):
    model, batches = _conv()
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
        prune(model, batches, ratio=bad)


def test_no_prunable_layer():
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        prune(nn.Sequential(nn.ReLU()), [torch.randn(2, 3)], ratio=0.5)
    model, batches = _conv()
    with pytest.raises(ValueError, match="no prunable layer.*excluded by user"):
        prune(model, batches, ratio=0.5, exclude=[nn.Conv2d, "fc*"])
    # Only the last layer is prunable → it is exempt → nothing left.
    with pytest.raises(ValueError, match="no prunable layer.*last layer"):
        prune(nn.Sequential(nn.Linear(3, 2)), [torch.randn(4, 3)], ratio=0.5)


def test_empty_batches():
    model, _ = _conv()
    with pytest.raises(ValueError, match="batches is empty"):
        prune(model, [], ratio=0.5)
    with pytest.raises(ValueError, match="batches is empty"):
        prune(model, iter(()), ratio=0.5)


def test_non_finite_batches_counted_and_all_bad_leaves_model_unchanged():
    model, batches = _conv()
    x, y = batches[0]
    bad = x.clone()
    bad[0, 0, 0, 0] = float("inf")
    report = prune(copy.deepcopy(model), [(x, y), (bad, y), (x, y)], ratio=0.3)
    assert report.batches == 2 and report.skipped_batches == 1
    snapshot = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="all 2 batches gave non-finite curvature"):
        prune(model, [(bad, y), (bad, y)], ratio=0.3)
    assert model.state_dict().keys() == snapshot.keys()
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_exclusions_by_instance_type_and_pattern():
    model, batches = _conv()
    import re

    report = prune(
        model, batches, ratio=0.5, exclude=[model.features[0], nn.Linear, re.compile(r"features\.7")]
    )
    reasons = {r.name: r.skipped for r in report.layers}
    assert reasons["features.0"] == "excluded by user"
    assert reasons["fc1"] == "excluded by user"
    assert reasons["features.7"] == "excluded by user"
    assert reasons["fc2"] == "excluded by user"  # matched by type before the last-layer rule
    assert type(model.features[0]) is nn.Conv2d and type(model.fc1) is nn.Linear
    with pytest.raises(TypeError, match="exclude takes"):
        prune(model, batches, ratio=0.5, exclude=[3])


class Awkward(nn.Module):
    """One layer of every kind that must be skipped, around two prunable convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.twice = nn.Conv2d(16, 16, 1)
        self.frozen = nn.Conv2d(16, 16, 1)
        self.frozen.requires_grad_(False)
        self.tied_a = nn.Conv2d(16, 16, 1)
        self.tied_b = nn.Conv2d(16, 16, 1)
        self.tied_b.weight = self.tied_a.weight
        self.unused = nn.Linear(16, 16)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = self.depthwise(self.grouped(h))
        h = self.twice(torch.relu(self.twice(h)))
        h = self.tied_b(self.tied_a(self.frozen(h)))
        h = torch.relu(self.body(h))
        return self.head(h.mean((2, 3)))


def test_layers_that_cannot_be_handled_are_skipped_with_reasons():
    torch.manual_seed(0)
    model = Awkward()
    batches = conv_batches(2, n=8, size=8, n_classes=5)
    x = batches[0][0]
    snapshot = copy.deepcopy(model)
    report = prune(model, batches, ratio=0.6)
    reasons = {r.name: r.skipped for r in report.layers}
    assert reasons["grouped"] == "grouped convolution (groups=4)"
    assert reasons["depthwise"] == "depthwise convolution"
    assert reasons["twice"] == "called 2 times per forward pass"
    assert reasons["frozen"] == "frozen parameters"
    assert reasons["tied_a"] == reasons["tied_b"] == "tied or shared parameters"
    assert reasons["unused"].startswith("never called")
    assert reasons["head"].startswith("last layer")
    assert reasons["stem"] is None and reasons["body"] is None
    for name in ("grouped", "depthwise", "twice", "frozen", "tied_a", "tied_b", "unused", "head"):
        new, old = getattr(model, name), getattr(snapshot, name)
        assert type(new) is type(old)
        assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    assert model.tied_b.weight is model.tied_a.weight
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


def test_targets_in_params_and_flops():
    for target in ("params", "flops"):
        model, batches = _conv()
        report = prune(model, batches, ratio=0.6, target=target)
        before = report.params_before if target == "params" else report.flops_before
        after = report.params_after if target == "params" else report.flops_after
        assert 1 - after / before >= 0.6 - 1e-9
        assert 1 - after / before <= 0.75, (target, after / before)


def test_keeps_mode_device_dtype_and_float64():
    torch.manual_seed(0)
    model = ConvNet().double().train()
    batches = [(x.double(), y) for x, y in conv_batches(2, n=8, size=16)]
    prune(model, batches, ratio=0.5)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())


def test_other_bad_arguments():
    model, batches = _conv()
    for kwargs, msg in [
        (dict(method="obd"), "method must be one of"),
        (dict(fisher="exact"), "fisher must be one of"),
        (dict(target="latency"), "target must be one of"),
        (dict(layer_cap=0.0), "layer_cap must be in"),
        (dict(min_rank=0), "min_rank must be an integer"),
        (dict(form="tiny"), "form must be one of"),
        (dict(likelihood="poisson"), "likelihood must be one of"),
    ]:
        with pytest.raises(ValueError, match=msg):
            prune(model, batches, ratio=0.5, **kwargs)


def test_form_choice_never_exceeds_current_params_or_flops():
    """A form cheaper in FLOPs but dearer in parameters (or vice versa) is not eligible."""
    from lightning_eigendamage.costs import Cost, Geometry, form_cost
    from lightning_eigendamage.eigenbasis.pruner import _choose, _LayerWork
    from lightning_eigendamage.eigenbasis.surgery import read_state

    conv = nn.Conv2d(8, 8, 3, padding=1)
    state = read_state(conv)
    geo = Geometry(8, 8, 64, 64, 9)
    dense = form_cost(geo, "dense", 8, 8, bias=True)
    z = torch.zeros(8)
    work = _LayerWork(None, state, geo, True, None, None, z, z, dense)
    f, cost, changed = _choose(work, 2, 2, "auto")
    assert changed and cost.fits_in(dense) and cost.flops < dense.flops
    # Pretend the layer is currently tiny in parameters: nothing fits, so it stays as it is.
    work.current = Cost(params=10, flops=dense.flops)
    assert _choose(work, 2, 2, "auto") == ("dense", work.current, False)
    work.current = Cost(params=dense.params, flops=10)
    assert _choose(work, 2, 2, "auto") == ("dense", work.current, False)


def test_enable_pruned_loading_makes_plain_load_state_dict_work():
    from lightning_eigendamage import enable_pruned_loading

    model, batches = _conv()
    prune(model, batches, ratio=0.5)
    sd = model.state_dict()
    fresh = ConvNet()
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(sd)
    handle = enable_pruned_loading(fresh)
    fresh.load_state_dict(sd)
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
    # Nested under a prefix (e.g. a LightningModule holding the network as ``self.net``).
    outer_pruned, outer_fresh = nn.Module(), nn.Module()
    outer_pruned.net, outer_fresh.net = model, ConvNet()
    enable_pruned_loading(outer_fresh)
    outer_fresh.load_state_dict(outer_pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(outer_fresh.net.eval()(x), model(x))
    handle.remove()


def _layers_by_input_shape(model: nn.Module, x: torch.Tensor) -> dict[tuple, str]:
    """Per-example input shape → name of the first Conv2d/Linear that gets it (how a stand-in
    for ``time_modules`` tells the layers apart)."""
    shapes: dict[tuple, str] = {}

    def record(name):
        def hook(module, inputs):
            shapes.setdefault(tuple(inputs[0].shape[1:]), name)

        return hook

    hooks = [
        m.register_forward_pre_hook(record(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return shapes


def test_form_by_latency_picks_the_fastest_eligible_form(monkeypatch):
    import lightning_eigendamage.eigenbasis.pruner as pruner_mod

    # Pretend the layer as it is now is always fastest: nothing changes.
    def unchanged_fastest(mods, example, repeats=7, *, backward=False):
        return {k: (0.0 if k == "unchanged" else 1.0) for k in mods}

    monkeypatch.setattr(pruner_mod, "time_modules", unchanged_fastest)
    model, batches = _conv()
    report = prune(model, batches, ratio=0.6, form_by="latency")
    assert not any(isinstance(m, KFELayer) for m in model.modules())
    assert report.flops_after == report.flops_before and report.realised_fraction == 0

    # Pretend fold_out is fastest wherever it is eligible; the module structure follows.
    seen = []

    def fold_out_fastest(mods, example, repeats=7, *, backward=False):
        seen.append((sorted(mods), tuple(example.shape)))
        return {k: (0.0 if k == "fold_out" else 1.0) for k in mods}

    monkeypatch.setattr(pruner_mod, "time_modules", fold_out_fastest)
    model, batches = _conv()
    report = prune(model, batches, ratio=0.6, form_by="latency", latency_batch=5)
    assert seen and all(shape[0] == 5 for _, shape in seen)
    mods = dict(model.named_modules())
    for r in report.layers:
        if r.skipped is None and r.form != "dense":
            assert mods[r.name].form == r.form
    assert any(r.form == "fold_out" for r in report.layers)
    assert report.flops_after < report.flops_before


def test_form_by_latency_meets_a_flops_target_with_the_chosen_forms(monkeypatch):
    """A layer kept whole because it runs faster gives back its FLOPs cut: the threshold must rise
    until the realised cut, counted on the built model, reaches the target again."""
    import lightning_eigendamage.eigenbasis.pruner as pruner_mod

    ratio = 0.5
    model0, batches = _conv()
    paper = dict(rank_by="damage", layer_cap=0.95)  # the allocation this scenario was built on
    by_cost = prune(copy.deepcopy(model0), batches, ratio=ratio, target="flops", **paper)
    # features.2 (cut on cost) is timed as fastest when left whole; every other layer as fastest
    # in a reduced form. The target stays reachable: features.5 holds most of the FLOPs.
    big = next(r for r in by_cost.layers if r.name == "features.2")
    assert big.flops_after < big.flops_before
    shapes = _layers_by_input_shape(model0, batches[0][0])

    def timing(mods, example, repeats=7, *, backward=False):
        name = shapes[tuple(example.shape[1:])]
        order = ["unchanged"] if name == big.name else ["bottleneck", "fold_in", "fold_out", "unchanged"]
        best = next(k for k in order if k in mods)
        return {k: (0.0 if k == best else 1.0) for k in mods}

    monkeypatch.setattr(pruner_mod, "time_modules", timing)
    model = copy.deepcopy(model0)
    report = prune(model, batches, ratio=ratio, target="flops", form_by="latency", **paper)
    assert not isinstance(dict(model.named_modules())[big.name], KFELayer)  # the timing was obeyed
    flops = count_flops(model, batches[0][0])
    assert flops == report.flops_after
    assert flops <= (1 - ratio) * report.flops_before * 1.001  # the target holds on the real model
    assert report.quantile > by_cost.quantile  # by pruning more elsewhere


@pytest.mark.parametrize(("target", "ratio"), [("flops", 0.3), ("params", 0.2)])
def test_form_by_latency_lands_on_the_target_where_a_form_flips(monkeypatch, target, ratio):
    """features.5 (most of the FLOPs) is timed fastest whole until its bottleneck is narrow, and
    every other layer is timed fastest whole: the cut jumps from 0 to about half the FLOPs (0.44
    of the parameters) as the threshold rises. The search keeps the bottleneck and widens it back
    to the target."""
    import lightning_eigendamage.eigenbasis.pruner as pruner_mod

    model, batches = _conv()
    shapes = _layers_by_input_shape(model, batches[0][0])

    def timing(mods, example, repeats=7, *, backward=False):
        best = "unchanged"
        if shapes[tuple(example.shape[1:])] == "features.5" and "bottleneck" in mods:
            core = mods["bottleneck"].core
            if core.in_channels + core.out_channels <= 16:
                best = "bottleneck"
        return {k: (0.0 if k == best else 1.0) for k in mods}

    monkeypatch.setattr(pruner_mod, "time_modules", timing)
    report = prune(model, batches, ratio=ratio, target=target, form_by="latency", recalibrate_bn=False)
    layer = dict(model.named_modules())["features.5"]
    assert isinstance(layer, KFELayer) and layer.form == "bottleneck"
    assert layer.core.in_channels + layer.core.out_channels > 16  # widened past the flip
    if target == "flops":
        removed = 1 - count_flops(model, batches[0][0]) / report.flops_before
    else:
        removed = 1 - sum(p.numel() for p in model.parameters()) / report.params_before
    # one direction of features.5 is 0.01 of the parameters; landed at the flip: 0.53 / 0.44
    assert ratio <= removed <= ratio + 0.011, removed


def test_form_by_latency_real_timing_runs():
    model, batches = _conv()
    report = prune(model, batches, ratio=0.6, form_by="latency", latency_batch=4)
    mods = dict(model.named_modules())
    for r in report.layers:
        m = mods[r.name]
        if isinstance(m, KFELayer):
            assert (m.rank_in, m.rank_out, m.form) == (r.kept_in, r.kept_out, r.form)
    assert report.flops_after <= report.flops_before
    with pytest.raises(ValueError, match="form_by must be one of"):
        prune(model, batches, ratio=0.5, form_by="speed")


def test_round_to_rounds_kept_widths_up_to_multiples():
    model, batches = _conv()
    plain = prune(copy.deepcopy(model), batches, ratio=0.6)
    report = prune(model, batches, ratio=0.6, round_to=8)
    mods = dict(model.named_modules())
    seen = 0
    for r in report.layers:
        m = mods[r.name]
        if isinstance(m, KFELayer):
            if m.rotate_in is not None:
                assert m.rank_in % 8 == 0 or m.rank_in == m.in_features
                seen += 1
            if m.rotate_out is not None:
                assert m.rank_out % 8 == 0 or m.rank_out == m.out_features
                seen += 1
    assert seen
    assert report.realised_fraction <= plain.realised_fraction
    with pytest.raises(ValueError, match="round_to must be a positive integer"):
        prune(model, batches, ratio=0.5, round_to=0)


@pytest.mark.parametrize(
    ("model_format", "latency_format", "timed_last"),
    [
        ("contiguous", "model", False),
        ("channels_last", "model", True),
        ("contiguous", "channels_last", True),
        ("channels_last", "contiguous", False),
    ],
)
def test_latency_format_sets_the_memory_format_forms_are_timed_in(
    monkeypatch, model_format, latency_format, timed_last
):
    """Every candidate and the example are timed in the asked format; the model keeps its own."""
    import lightning_eigendamage.eigenbasis.pruner as pruner_mod

    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    seen = []

    def record(mods, example, repeats=7, *, backward=False):
        want = torch.channels_last if timed_last else torch.contiguous_format
        for mod in mods.values():
            convs = [p for p in mod.parameters() if p.dim() == 4]
            seen.append(all(p.is_contiguous(memory_format=want) for p in convs))
        if example.dim() == 4:  # (a Linear's 2-d example has no memory format)
            seen.append(example.is_contiguous(memory_format=want) and example.is_contiguous() != timed_last)
        return {k: (0.0 if k == "unchanged" else 1.0) for k in mods}

    monkeypatch.setattr(pruner_mod, "time_modules", record)
    model, batches = _conv()
    model = model.to(memory_format=fmt[model_format])
    before = copy.deepcopy(model.state_dict())
    prune(model, batches, ratio=0.6, form_by="latency", latency_format=latency_format, recalibrate_bn=False)
    assert seen and all(seen)
    for name, p in model.state_dict().items():  # the model was not converted (nor changed)
        assert torch.equal(p, before[name]) and p.stride() == before[name].stride(), name
    with pytest.raises(ValueError, match="latency_format must be one of"):
        prune(model, batches, ratio=0.5, form_by="latency", latency_format="nhwc")


class _SlowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        time.sleep(0.004)
        return g


class _SlowIn(nn.Module):
    """A 1×1 conv whose forward (``slow_forward``) or backward (otherwise) sleeps 4 ms."""

    def __init__(self, slow_forward: bool) -> None:
        super().__init__()
        self.conv, self.slow_forward = nn.Conv2d(2, 2, 1), slow_forward

    def forward(self, x):
        if self.slow_forward:
            time.sleep(0.004)
            return self.conv(x)
        return _SlowBackward.apply(self.conv(x))


def test_time_modules_backward_times_the_training_step_and_writes_no_grad():
    from lightning_eigendamage.costs import time_modules

    mods = {"slow_fwd": _SlowIn(True), "slow_bwd": _SlowIn(False)}
    x = torch.randn(3, 2, 4, 4)
    fwd = time_modules(mods, x, repeats=3)
    step = time_modules(mods, x, repeats=3, backward=True)
    assert fwd["slow_bwd"] < fwd["slow_fwd"]  # an eval forward does not see the backward
    assert step["slow_bwd"] > 0.004 and step["slow_fwd"] > 0.004  # the step sees both
    assert all(p.grad is None for m in mods.values() for p in m.parameters())
    assert not x.requires_grad and x.grad is None


def test_latency_mode_training_times_forward_and_backward(monkeypatch):
    import lightning_eigendamage.eigenbasis.pruner as pruner_mod

    seen = []

    def record(mods, example, repeats=7, *, backward=False):
        seen.append(backward)
        return {k: (0.0 if k == "fold_out" else 1.0) for k in mods}

    monkeypatch.setattr(pruner_mod, "time_modules", record)
    for mode, want in (("inference", False), ("training", True)):
        seen.clear()
        model, batches = _conv()
        report = prune(model, batches, ratio=0.6, form_by="latency", latency_mode=mode)
        assert seen and set(seen) == {want}
        assert any(r.form == "fold_out" for r in report.layers)
        assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="latency_mode must be one of"):
        prune(model, batches, ratio=0.5, form_by="latency", latency_mode="train")
