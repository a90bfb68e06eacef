"""After the surgery: BatchNorm re-estimation and reconstruction against independent computations;
allocation by damage per cost; multi-shot removal."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
from models import ConvNet, conv_batches
from torch import nn

from lightning_eigendamage import KFELayer, PruneOptions, analyse, prune
from lightning_eigendamage.eigenbasis import pruner as pruner_mod

# ---------------------------------------------------------------------------------------------
# BatchNorm re-estimation
# ---------------------------------------------------------------------------------------------


class TwoBranch(nn.Module):
    """stem (excluded) → BN0 → [pruned conv → BN1] + [excluded conv → BNb] → head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv, self.bn1 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.side, self.bnb = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 5)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn0(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        h = torch.relu(self.bn1(self.conv(h))) + torch.relu(self.bnb(self.side(h)))
        return self.head(torch.relu(self.fc(h.mean((2, 3)))))


def _trained_two_branch() -> TwoBranch:
    torch.manual_seed(0)
    m = TwoBranch()
    m.train()
    with torch.no_grad():  # non-trivial running statistics everywhere
        for _ in range(3):
            m(torch.randn(16, 3, 10, 10) * 2 + 0.5)
    return m.eval()


def test_batchnorm_downstream_of_pruned_layers_is_re_estimated_exactly() -> None:
    model = _trained_two_branch()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(12, 3, 10, 10, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(3)
    ]
    untouched = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("bn0.", "bnb."))}
    report = prune(model, batches, ratio=0.5, form="bottleneck", exclude=["stem", "side"])
    assert isinstance(model.conv, KFELayer)
    assert report.recalibrated_bn == ["bn1"]
    # Independent computation: BN1's input on each batch in the pruned model (everything upstream
    # in eval mode), its per-batch channel mean and unbiased variance, averaged over the batches.
    means, vars_ = [], []
    with torch.no_grad():
        for x, _ in batches:
            z = model.conv(model.trunk(x))
            means.append(z.mean((0, 2, 3)))
            vars_.append(z.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(model.bn1.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var, torch.stack(vars_).mean(0), rtol=1e-5, atol=1e-6)
    assert model.bn1.momentum == 0.1 and not model.training
    for k, v in untouched.items():  # not downstream of a pruned layer: bitwise as before
        assert torch.equal(model.state_dict()[k], v), k


def test_recalibrate_bn_false_leaves_every_buffer_alone() -> None:
    model = _trained_two_branch()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(12, 3, 10, 10, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(2)
    ]
    bufs = {k: v.clone() for k, v in model.named_buffers()}
    report = prune(
        model, batches, ratio=0.5, form="bottleneck", exclude=["stem", "side"], recalibrate_bn=False
    )
    assert report.recalibrated_bn == []
    for k, v in model.named_buffers():
        assert torch.equal(v, bufs[k]), k


def test_batches_from_a_one_shot_iterator_are_reused_for_calibration() -> None:
    model = _trained_two_branch()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(12, 3, 10, 10, generator=g), torch.randint(0, 5, (12,), generator=g)) for _ in range(2)
    ]
    report = prune(model, iter(batches), ratio=0.5, form="bottleneck", exclude=["stem", "side"])
    assert report.batches == 2 and report.recalibrated_bn == ["bn1"]
    assert model.bn1.num_batches_tracked.item() == 2


@pytest.mark.parametrize("own_generator", [False, True])
def test_a_shuffling_loader_is_replayed_for_calibration(own_generator: bool) -> None:
    """BatchNorm is re-estimated on the batches the capture saw, and the caller's RNG is drawn
    from by the capture only (independent check: the same batches drawn beforehand, as a list)."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(2)
    ds = TensorDataset(
        torch.randn(64, 3, 10, 10, generator=g) * 2 + 0.5, torch.randint(0, 5, (64,), generator=g)
    )
    kw = dict(ratio=0.5, form="bottleneck", exclude=["stem", "side"], max_batches=2)

    def loader() -> DataLoader:
        gen = torch.Generator().manual_seed(7) if own_generator else None
        return DataLoader(ds, batch_size=12, shuffle=True, generator=gen)

    a = _trained_two_branch()  # (it seeds the global RNG itself)
    torch.manual_seed(123)
    prune(a, loader(), **kw)
    rng_after = torch.get_rng_state()

    b = _trained_two_branch()
    torch.manual_seed(123)
    seen = list(itertools.islice(loader(), 2))  # what the capture's pass drew
    prune(b, seen, **kw)
    for name in ("running_mean", "running_var"):
        assert torch.allclose(getattr(a.bn1, name), getattr(b.bn1, name), atol=1e-6), name

    c = _trained_two_branch()
    torch.manual_seed(123)
    prune(c, loader(), **kw, recalibrate_bn=False)  # the capture alone
    assert torch.equal(torch.get_rng_state(), rng_after)


# ---------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------


class Linear3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(10, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.l2(self.l1(x)))


def _brute_optimum(r_out: torch.Tensor, r_in: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Predictions of ``min_{C, b} Σ ‖R_out C R_in x + b − t‖²`` by one least-squares solve over
    ``vec(C)`` and ``b`` (Kronecker design), independent of the library's normal equations."""
    u = x @ r_in.T  # (rows, r_in)
    rows, c_out = t.shape
    # prediction[row, o] = Σ_{a,i} R_out[o, a] C[a, i] u[row, i] + b[o]
    design_c = torch.einsum("oa,ri->roai", r_out, u).reshape(rows * c_out, -1)
    design_b = torch.eye(c_out, dtype=t.dtype).repeat(rows, 1)
    design = torch.cat([design_c, design_b], 1)
    sol = torch.linalg.lstsq(design, t.reshape(-1, 1), driver="gelsd").solution
    return (design @ sol).reshape(rows, c_out)


def test_reconstruction_of_a_linear_network_is_the_least_squares_optimum() -> None:
    torch.manual_seed(0)
    model = Linear3().double()
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    batches = [
        (torch.randn(40, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g))
        for _ in range(3)
    ]
    report = prune(model, batches, ratio=0.5, form="bottleneck", reconstruct=True, reconstruct_damping=0.0)
    assert isinstance(model.l1, KFELayer) and isinstance(model.l2, KFELayer)
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        # l1: its input is the network input in both networks.
        t1 = dense.l1(x)
        r_in, r_out = model.l1.rotate_in.weight.double(), model.l1.rotate_out.weight.double()
        torch.testing.assert_close(model.l1(x), _brute_optimum(r_out, r_in, x, t1), rtol=1e-7, atol=1e-9)
        # l2: its input comes from the already re-fitted l1; its target is the dense l2's output.
        x2, t2 = model.l1(x), dense.l2(dense.l1(x))
        r_in, r_out = model.l2.rotate_in.weight.double(), model.l2.rotate_out.weight.double()
        torch.testing.assert_close(model.l2(x2), _brute_optimum(r_out, r_in, x2, t2), rtol=1e-7, atol=1e-9)
    assert set(report.reconstruction_error) == {"l1", "l2"}


def test_reconstruction_lowers_the_output_error_of_a_conv_net() -> None:
    torch.manual_seed(0)
    base = ConvNet().eval()
    batches = conv_batches(4, n=16)
    held_out = conv_batches(1, n=32, seed=9)[0][0]
    errors = {}
    for rec in (False, True):
        model = copy.deepcopy(base)
        report = prune(model, batches, ratio=0.6, recalibrate_bn=False, reconstruct=rec)
        with torch.no_grad():
            ref, out = base(held_out), model.eval()(held_out)
        errors[rec] = ((out - ref).norm() / ref.norm()).item()
        assert bool(report.reconstruction_error) is rec
    assert errors[True] < 0.8 * errors[False], errors


# ---------------------------------------------------------------------------------------------
# Allocation: damage per unit of cost, several shots
# ---------------------------------------------------------------------------------------------


def test_damage_per_cost_divides_each_side_by_what_removing_one_direction_saves() -> None:
    torch.manual_seed(0)
    batches, net = conv_batches(2), ConvNet()
    plain = analyse(copy.deepcopy(net), batches, PruneOptions(target="flops", rank_by="damage"))
    per = analyse(copy.deepcopy(net), batches, PruneOptions(target="flops", rank_by="damage_per_cost"))
    for a, b in zip(plain.layers, per.layers):
        g = a.geo
        d_out, _, d_in = a.state.core.shape
        cost_out = 2 * g.loc_out * (g.k2 * d_in + g.c_out)
        cost_in = 2 * (g.loc_out * g.k2 * d_out + g.loc_in * g.c_in)
        torch.testing.assert_close(b.s_out, a.s_out / cost_out, rtol=1e-12, atol=0)
        torch.testing.assert_close(b.s_in, a.s_in / cost_in, rtol=1e-12, atol=0)
    params = analyse(copy.deepcopy(net), batches, PruneOptions(target="params", rank_by="damage_per_cost"))
    for a, b in zip(plain.layers, params.layers):
        d_out, _, d_in = a.state.core.shape
        torch.testing.assert_close(b.s_out, a.s_out / (a.geo.k2 * d_in + a.geo.c_out), rtol=1e-12, atol=0)


def test_several_shots_recapture_and_meet_the_target(monkeypatch) -> None:
    calls = []
    real = pruner_mod.capture_factors

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pruner_mod, "capture_factors", counting)
    torch.manual_seed(0)
    model = ConvNet()
    report = prune(model, iter(conv_batches(2)), ratio=0.6, target="flops", shots=3)
    assert len(calls) == 3
    assert report.shots == 3 and report.ratio == 0.6
    assert report.target_reached and report.reached >= 0.6 - 0.005
    assert report.flops_after <= 0.405 * report.flops_before
    assert all(len(list(m.children())) <= 3 for m in model.modules() if isinstance(m, KFELayer))


def test_several_shots_warn_once_for_the_whole_call_and_count_every_direction() -> None:
    import warnings

    from lightning_eigendamage import TargetNotReachedWarning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [(torch.randn(16, 12), torch.randint(0, 3, (16,))) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # layer_cap 0.5 on both sides of a bottleneck keeps at least a quarter of each core: ÷4 of
        # the parameters is out of reach, and each of the two shots' own share (50 %) is too
        report = prune(model, batches, ratio=0.75, target="params", shots=2, layer_cap=0.5, form="bottleneck")
    missed = [w for w in caught if issubclass(w.category, TargetNotReachedWarning)]
    assert len(missed) == 1, [str(w.message) for w in missed]
    assert "asked to remove 75.0% of the params in 2 shots" in str(missed[0].message)
    assert f"removed {report.reached:.1%}" in str(missed[0].message)
    assert not report.target_reached and report.limited_by and "layer_cap=0.5" in report.limited_by
    # every direction of the dense layers (input and output sides), against those kept at the end
    pruned = [r for r in report.layers if r.skipped is None]
    total = sum(r.in_features + r.out_features for r in pruned)
    kept = sum(r.kept_in + r.kept_out for r in pruned)
    assert report.realised_fraction == pytest.approx(1 - kept / total, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shots=0), "shots must be a positive integer"),
        (dict(seed=2**70), r"seed must be in \[0, 2\*\*64\)"),
        (dict(rank_by="flops"), "rank_by must be one of"),
        (dict(reconstruct_damping=-1.0), "reconstruct_damping must be a finite number ≥ 0"),
        (dict(shots=2, changes={}), "with shots > 1 there are several"),
    ],
)
def test_bad_allocation_and_calibration_options(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        prune(ConvNet(), conv_batches(1), ratio=0.5, **kwargs)


@pytest.mark.parametrize("name", ["recalibrate_bn", "reconstruct", "train_rotations", "exempt_last"])
@pytest.mark.parametrize("value", ["no", 0.5, None])
def test_switches_must_be_booleans(name: str, value: Any) -> None:
    model = ConvNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        prune(model, conv_batches(1), ratio=0.5, **{name: value})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_several_shots_reconstruct_once_against_the_dense_model() -> None:
    torch.manual_seed(0)
    base = ConvNet().eval()
    model = copy.deepcopy(base)
    report = prune(model, conv_batches(3), ratio=0.6, target="flops", shots=2, reconstruct=True)
    pruned = {n for n, m in model.named_modules() if isinstance(m, KFELayer)}
    assert pruned and set(report.reconstruction_error) == pruned
    assert all(e < 1.0 for e in report.reconstruction_error.values())


def _mlp_bn1d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 5),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("how", ["prune", "prune_channels"])
def test_a_batch_of_one_example_is_left_out_of_the_batchnorm_re_estimation(how: str) -> None:
    from lightning_eigendamage import PruningWarning, prune_channels
    from lightning_eigendamage.calibration import recalibrate_batchnorm

    gen = torch.Generator().manual_seed(1)
    full = [(torch.randn(16, 10, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(2)]
    last = (torch.randn(1, 10, generator=gen), torch.randint(0, 5, (1,), generator=gen))
    fn = prune if how == "prune" else prune_channels
    net = _mlp_bn1d()
    with pytest.warns(PruningWarning, match="1 calibration batch"):
        fn(net, full + [last], ratio=0.5)
    # the re-estimated statistics are those of the two full batches alone
    again = copy.deepcopy(net)
    bns = [m for m in again.modules() if isinstance(m, nn.BatchNorm1d) and int(m.num_batches_tracked) > 0]
    assert bns
    assert recalibrate_batchnorm(again, bns, [x for x, _ in full], lambda m, x: m(x)) == 2
    for (k, x), y in zip(net.state_dict().items(), again.state_dict().values()):
        if torch.is_tensor(x):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)
