"""The public halves of prune() (analyse → decide → apply), the plan as data, options validated
once, and the criterion and adapter registries."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from models import ConvNet, conv_batches
from torch import nn

from lightning_eigendamage import (
    LayerAdapter,
    Plan,
    PruneOptions,
    analyse,
    apply,
    decide,
    prune,
    register,
    register_criterion,
)
from lightning_eigendamage.eigenbasis.criteria import criterion_names


def _state(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [type(m).__name__ for m in model.modules()], copy.deepcopy(model.state_dict())


def _same(model: nn.Module, saved: tuple[list[str], dict[str, torch.Tensor]]) -> bool:
    types, sd = _state(model)
    if types != saved[0] or sd.keys() != saved[1].keys():
        return False
    return all(torch.equal(v, saved[1][k]) if torch.is_tensor(v) else v == saved[1][k] for k, v in sd.items())


def test_apply_refuses_an_analysis_that_does_not_fit_the_model() -> None:
    torch.manual_seed(0)
    model, batches, opts = ConvNet(), conv_batches(2), PruneOptions(target="flops")
    an = analyse(model, batches, opts)
    plan = decide(an, 0.5, opts)
    copy_ok = copy.deepcopy(model)
    apply(copy_ok, an, plan, opts)  # a copy of the analysed model is fine

    changed = copy.deepcopy(model)
    name = an.layers[1].name
    with torch.no_grad():
        changed.get_submodule(name).weight.zero_()
    saved = _state(changed)
    with pytest.raises(ValueError, match=rf"layer '{name}' \(its weights changed since\)"):
        apply(changed, an, plan, opts)
    assert _same(changed, saved)

    other = copy.deepcopy(model)  # same names, another kernel size at one layer
    other.features[2] = nn.Conv2d(16, 24, 5, dilation=2, padding="same")
    saved = _state(other)
    with pytest.raises(ValueError, match=r"layer 'features.2' \(its parameter shapes differ\)"):
        apply(other, an, plan, opts)
    assert _same(other, saved)

    apply(model, an, plan, opts)
    saved = _state(model)
    with pytest.raises(ValueError, match=r"it is a KFELayer now, a Conv2d when analysed"):
        apply(model, an, plan, opts)  # the same plan twice
    assert _same(model, saved)


def test_analyse_decide_apply_is_prune() -> None:
    torch.manual_seed(0)
    a = ConvNet()
    b = copy.deepcopy(a)
    batches = conv_batches(2)
    ra = prune(a, batches, ratio=0.5, target="flops", layer_cap=0.8, shots=1)
    opts = PruneOptions(target="flops", layer_cap=0.8, shots=1)  # prune() repeats the halves per shot
    an = analyse(b, batches, opts)
    plan = decide(an, 0.5, opts)
    rb = apply(b, an, plan, opts)
    assert ra.to_dict() == rb.to_dict()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if torch.is_tensor(sa[k]):
            assert torch.equal(sa[k], sb[k]), k
    # The plan says what the report reports.
    for entry in rb.layers:
        if entry.skipped is None:
            lp = plan[entry.name]
            assert (lp.form, lp.params, lp.flops) == (entry.form, entry.params_after, entry.flops_after)
    for w in an.layers:
        lp = plan[w.name]
        assert list(lp.kept_in) == sorted(lp.kept_in) and len(lp.kept_in) <= w.s_in.numel()
        entry = next(r for r in rb.layers if r.name == w.name)
        assert entry.removed_in == w.s_in.numel() - len(lp.kept_in)


def test_plan_is_plain_data_and_round_trips() -> None:
    torch.manual_seed(0)
    model = ConvNet()
    opts = PruneOptions()
    an = analyse(model, conv_batches(2), opts)
    plan = decide(an, 0.5, opts)
    assert Plan.from_dict(plan.to_dict()) == plan
    buf = io.BytesIO()
    torch.save(plan.to_dict(), buf)
    buf.seek(0)
    assert Plan.from_dict(torch.load(buf, weights_only=True)) == plan
    with pytest.raises(KeyError):
        plan["nope"]
    with pytest.raises(AttributeError):  # frozen
        plan.ratio = 0.3


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(layer_cap=1.5), ValueError, r"layer_cap must be in \(0, 1\]"),
        (dict(round_to=0), ValueError, "round_to must be a positive integer"),
        (dict(max_batches=0), ValueError, "max_batches must be a positive integer"),
        (dict(method="nope"), ValueError, "method must be one of"),
        (dict(exclude=123), TypeError, "exclude takes"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(forward_fn=3), TypeError, "forward_fn must be a callable"),
    ],
)
def test_options_are_validated_once_at_construction(kwargs, err, match) -> None:
    with pytest.raises(err, match=match):
        PruneOptions(**kwargs)


def test_decide_rejects_a_bad_ratio() -> None:
    opts = PruneOptions()
    an = analyse(ConvNet(), conv_batches(1), opts)
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
        decide(an, 1.0, opts)


def test_a_registered_criterion_decides_which_directions_stay() -> None:
    """A criterion that scores input direction j as j (and outputs likewise) must keep the highest
    indices: the kept sets are exactly what the criterion says, not what EigenDamage would say."""

    def by_index(w_star, lam_a, lam_g, locations):
        r_out, _, r_in = w_star.shape
        return (torch.arange(r_out, dtype=torch.float64), torch.arange(r_in, dtype=torch.float64))

    register_criterion("by_index", by_index)
    assert "by_index" in criterion_names()
    torch.manual_seed(0)
    opts = PruneOptions(method="by_index", form="bottleneck")
    an = analyse(ConvNet(), conv_batches(2), opts)
    plan = decide(an, 0.5, opts)
    for w in an.layers:
        lp = plan[w.name]
        n_in = w.s_in.numel()
        assert list(lp.kept_in) == list(range(n_in - len(lp.kept_in), n_in))
    with pytest.raises(TypeError):
        register_criterion("broken", 3)


def test_register_refuses_what_is_not_a_module_type() -> None:
    class Bad(LayerAdapter):
        kind = "bad"
        module_type = int  # not an nn.Module

    with pytest.raises(TypeError, match="nn.Module subclass"):
        register(Bad())

    class Clash(LayerAdapter):
        kind = "linear"  # taken by nn.Linear
        module_type = nn.Bilinear

    with pytest.raises(ValueError, match="registered as 'linear'"):
        register(Clash())

    with pytest.raises(TypeError, match="not nn.Module"):  # it matched every module: prune() failed
        register(LayerAdapter())

    class Partial(LayerAdapter):
        kind = "partial"
        module_type = nn.Bilinear

    with pytest.raises(TypeError, match="Partial must implement widths, geometry"):
        register(Partial())


def test_numbers_from_numpy_and_tensors_are_taken_as_python_numbers() -> None:
    """A config or a sweep hands over NumPy scalars and 0-d tensors; bools are never numbers."""
    np = pytest.importorskip("numpy")
    from lightning_eigendamage import GradualRemoval, PruningSchedule

    torch.manual_seed(0)
    model, batches = ConvNet(), conv_batches(2)
    plain = prune(copy.deepcopy(model), batches, ratio=0.5, target="flops").to_dict()
    for ratio in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        report = prune(copy.deepcopy(model), batches, ratio=ratio, target="flops")
        assert report.to_dict() == plain and type(report.ratio) is float
    for bad in (True, np.bool_(True), "0.5", torch.tensor([0.1, 0.2]), float("nan")):
        with pytest.raises(ValueError, match="ratio must be a number in"):
            prune(copy.deepcopy(model), batches, ratio=bad)
    opts = PruneOptions(
        layer_cap=np.float32(0.75), min_rank=np.int64(2), shots=torch.tensor(2), seed=np.int64(1)
    )
    assert (opts.layer_cap, opts.min_rank, opts.shots, opts.seed) == (0.75, 2, 2, 1)
    assert all(type(v) in (int, float) for v in (opts.layer_cap, opts.min_rank, opts.shots, opts.seed))
    with pytest.raises(ValueError, match="min_rank must be an integer"):
        PruneOptions(min_rank=np.float32(2.0))
    schedule = PruningSchedule(epochs={np.int64(1): np.float32(0.5)}, fisher_batches=np.int64(4))
    assert schedule.epochs == {1: 0.5} and type(next(iter(schedule.epochs))) is int
    assert schedule.fisher_batches == 4 and type(schedule.fisher_batches) is int
    with pytest.raises(TypeError, match="schedule keys are epoch numbers"):
        PruningSchedule(epochs={np.float32(1.0): 0.5})
    assert GradualRemoval(np.int64(3), np.float32(2.0)) == GradualRemoval(3, 2.0)


def test_options_and_individual_option_arguments_are_not_mixed() -> None:
    model = ConvNet()
    before = copy.deepcopy(model.state_dict())
    opts = PruneOptions(target="flops")
    with pytest.raises(ValueError, match="target was also given"):
        prune(model, conv_batches(1), ratio=0.5, options=opts, target="params")
    with pytest.raises(ValueError, match="layer_cap, shots was also given"):
        prune(model, conv_batches(1), ratio=0.5, options=opts, shots=2, layer_cap=0.5)
    with pytest.raises(TypeError, match="options must be a PruneOptions"):
        prune(model, conv_batches(1), ratio=0.5, options={"target": "flops"})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    report = prune(model, conv_batches(1), ratio=0.5, options=opts, layer_cap=0.75)  # the default: fine
    assert report.target == "flops"


def test_distributed_without_a_process_group_is_an_error() -> None:
    import torch.distributed as dist

    assert not dist.is_initialized()
    model = ConvNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="distributed=True needs an initialised"):
        prune(model, conv_batches(1), ratio=0.5, distributed=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_apply_checks_an_edited_plan_and_reports_the_costs_of_what_it_built() -> None:
    torch.manual_seed(0)
    model, batches, opts = ConvNet(), conv_batches(2), PruneOptions(target="flops")
    an = analyse(model, batches, opts)
    d = decide(an, 0.5, opts).to_dict()
    i = next(k for k, lp in enumerate(d["layers"]) if lp["changed"] and lp["form"] == "bottleneck")
    name = d["layers"][i]["name"]
    saved = _state(model)
    for kept_in, match in (
        ([0, 0, 1], "distinct"),
        ([99], r"in \[0, "),
        ([], "at least one"),
        ([2, 1], "ascending"),
    ):
        bad = copy.deepcopy(d)
        bad["layers"][i]["kept_in"] = kept_in
        with pytest.raises(ValueError, match=match):
            apply(model, an, Plan.from_dict(bad), opts)
        assert _same(model, saved)
    bad = copy.deepcopy(d)
    bad["layers"][i]["form"] = "folded"
    with pytest.raises(ValueError, match="unknown form 'folded'"):
        apply(model, an, Plan.from_dict(bad), opts)
    edited = copy.deepcopy(d)
    edited["layers"][i]["kept_in"] = edited["layers"][i]["kept_in"][:1]
    edited["layers"][i]["params"] = edited["layers"][i]["flops"] = 1  # stale costs are recomputed
    report = apply(model, an, Plan.from_dict(edited), opts)
    layer = {r.name: r for r in report.layers}[name]
    built = sum(p.numel() for p in model.get_submodule(name).parameters())
    assert layer.kept_in == 1 and layer.params_after == built
    assert report.params_after == sum(p.numel() for p in model.parameters())
