"""EigenDamage scores and the kept directions against a straightforward computation of docs/method.md §3."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_eigendamage import prune
from lightning_eigendamage.curvature import capture_factors


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 10, 3, stride=2, padding=1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(h.mean((2, 3)))


def _reference_plan(model, res, ratio, cap, min_rank):
    """§3 written out with numpy loops: eigh, W* per offset, damages, pooled quantile, cap, min_rank."""
    layers = {"c1": model.c1, "c2": model.c2}
    data = {}
    pooled = []
    for name, conv in layers.items():
        lf = res.layers[name]
        la, qa = np.linalg.eigh(lf.a().double().numpy())
        lg, qg = np.linalg.eigh(lf.g().double().numpy())
        la = np.where(la <= 1e-10 * max(la[-1], 1), 0, la)
        lg = np.where(lg <= 1e-10 * max(lg[-1], 1), 0, lg)
        w = conv.weight.detach().double().numpy()  # (O, I, kh, kw)
        c_out, c_in, kh, kw = w.shape
        t = lf.locations
        dmg = np.zeros((c_out, kh, kw, c_in))
        for dh in range(kh):
            for dw in range(kw):
                ws = qg.T @ w[:, :, dh, dw] @ qa
                for i in range(c_out):
                    for j in range(c_in):
                        dmg[i, dh, dw, j] = 0.5 * t * ws[i, j] ** 2 * lg[i] * la[j]
        s_out = dmg.sum(axis=(1, 2, 3))
        s_in = dmg.sum(axis=(0, 1, 2))
        data[name] = (s_out, s_in, qa, qg, w)
        pooled += [s_out, s_in]
    thr = np.quantile(np.concatenate(pooled), ratio)
    plan = {}
    for name, (s_out, s_in, qa, qg, w) in data.items():
        kept = []
        for s in (s_out, s_in):
            order = np.argsort(s, kind="stable")
            # Scores are continuous here (no ties), so "under the threshold" is unambiguous.
            n_rm = min(int((s < thr).sum()), int(np.floor(cap * len(s))), len(s) - min_rank)
            kept.append(sorted(order[max(n_rm, 0) :].tolist()))
        plan[name] = (kept[0], kept[1], qa, qg, w)
    return plan, thr


@pytest.mark.parametrize("ratio,cap,min_rank", [(0.5, 0.95, 1), (0.7, 0.5, 1), (0.9, 0.95, 4)])
def test_kept_directions_and_weights_match_reference(ratio, cap, min_rank):
    torch.manual_seed(0)
    model = TwoConv().eval()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(2)
    ]
    res = capture_factors(
        model,
        {"c1": model.c1, "c2": model.c2, "fc": model.fc},
        batches,
        factors_for=["c1", "c2", "fc"],
        fisher="empirical",
    )
    plan, thr = _reference_plan(model, res, ratio, cap, min_rank)

    pruned = copy.deepcopy(model)
    report = prune(
        pruned,
        batches,
        ratio=ratio,
        fisher="empirical",
        layer_cap=cap,
        min_rank=min_rank,
        form="bottleneck",
        rank_by="damage",  # the paper's global ranking, which the reference computes
    )
    assert report.threshold == pytest.approx(thr, rel=1e-6)
    x = batches[0][0]
    ref = copy.deepcopy(model)
    removed = total = 0
    for name, (ko, ki, qa, qg, w) in plan.items():
        entry = next(r for r in report.layers if r.name == name)
        assert (entry.kept_out, entry.kept_in) == (len(ko), len(ki))
        # The pruned layer equals Q_G[:, ko] W*[ko, :, ki] Q_A[:, ki]ᵀ per kernel offset.
        low = np.zeros_like(w)
        for dh in range(w.shape[2]):
            for dw in range(w.shape[3]):
                ws = qg.T @ w[:, :, dh, dw] @ qa
                low[:, :, dh, dw] = qg[:, ko] @ ws[np.ix_(ko, ki)] @ qa[:, ki].T
        getattr(ref, name).weight.data = torch.from_numpy(low).float()
        removed += w.shape[0] - len(ko) + w.shape[1] - len(ki)
        total += w.shape[0] + w.shape[1]
    assert report.realised_fraction == pytest.approx(removed / total)
    assert report.realised_fraction <= ratio + 1e-12
    torch.testing.assert_close(pruned(x), ref(x), rtol=1e-4, atol=1e-5)


def test_min_rank_keeps_most_important_direction():
    """With a cap of 1 and min_rank 1 the surviving direction is the highest-scoring one."""
    from lightning_eigendamage.eigenbasis.criteria import keep_side

    s = torch.tensor([0.3, 5.0, 0.1, 2.0])
    d = keep_side(s, marked=4, cap=1.0, min_rank=1)
    assert d.kept == [1] and d.removed == 3
    d = keep_side(s, marked=4, cap=0.5, min_rank=1)
    assert d.kept == [1, 3]
    d = keep_side(s, marked=1, cap=1.0, min_rank=1)
    assert d.kept == [0, 1, 3]


def test_ties_at_zero_are_broken_by_rank():
    """Many exact-zero scores (directions without curvature) must not block pruning."""
    from lightning_eigendamage.eigenbasis.criteria import global_marks

    a = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
    b = torch.tensor([0.0, 0.0, 3.0, 4.0])
    assert global_marks([a, b], 0.5) == [4, 1]  # ceil(0.5·9) = 5 lowest, ties in pooled order
    assert global_marks([a, b], 0.0) == [0, 0]
    c = torch.tensor([0.5, 0.1, 0.9, 0.3])
    assert global_marks([c], 0.5) == [2]  # = #scores below the 0.5-quantile (0.4)


def test_scores_use_locations_factor():
    """T scales conv scores: doubling the spatial size (4× locations) scales c1's scores by ~4."""
    from lightning_eigendamage.eigenbasis.criteria import eigendamage_scores

    w = torch.randn(3, 9, 2, dtype=torch.float64)
    la, lg = torch.rand(2, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    o1, i1 = eigendamage_scores(w, la, lg, 1.0)
    o4, i4 = eigendamage_scores(w, la, lg, 4.0)
    torch.testing.assert_close(o4, 4 * o1)
    torch.testing.assert_close(i4, 4 * i1)
    manual = 0.5 * (w[1] ** 2 * la[None, :] * lg[1]).sum()
    torch.testing.assert_close(o1[1], manual)
    assert F is not None


def test_eigh_factor_float32_path_for_wide_factors_is_accurate():
    """Wide factors are decomposed in float32: the basis is still orthonormal to ~1e-6."""
    from lightning_eigendamage.eigenbasis.basis import eigh_factor

    torch.manual_seed(0)
    n = 96
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    lam = torch.logspace(-9, 1, n, dtype=torch.float64)
    f = q @ torch.diag(lam) @ q.T
    e64, v64 = eigh_factor(f, float64_max=n)
    e32, v32 = eigh_factor(f, float64_max=n - 1)
    assert v32.dtype == e32.dtype == torch.float64
    eye = torch.eye(n, dtype=torch.float64)
    assert (v32.T @ v32 - eye).abs().max() < 1e-5
    w = torch.randn(7, n, dtype=torch.float64)
    assert (w @ v32 @ v32.T - w).norm() / w.norm() < 1e-5
    torch.testing.assert_close(e32[-10:], e64[-10:], rtol=1e-4, atol=0)
    assert (e32[: n // 3] == 0).all()  # below float32 resolution: no curvature claimed
    assert (e64[: n // 3] > 0).sum() > 0  # float64 still resolves some of them


def test_eigh_factor_falls_back_to_float64_when_float32_does_not_converge(monkeypatch):
    from lightning_eigendamage import eigenbasis

    real = torch.linalg.eigh
    calls = []

    def flaky(m):
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    a = torch.randn(20, 6, dtype=torch.float64)
    f = a @ a.T  # rank 6 of 20
    evals, evecs = eigenbasis.eigh_factor(f, float64_max=4)
    assert calls == [torch.float32, torch.float64]
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, f, rtol=1e-8, atol=1e-8)


def test_eigh_factors_batches_same_size_factors_and_matches_one_by_one(monkeypatch):
    from lightning_eigendamage import eigenbasis

    torch.manual_seed(1)
    factors = []
    for n in (6, 9, 6, 6, 9, 4):
        a = torch.randn(n, n + 3, dtype=torch.float64)
        factors.append(a @ a.T / (n + 3))
    real = torch.linalg.eigh
    shapes = []

    def recording(m):
        shapes.append(tuple(m.shape))
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", recording)
    got = eigenbasis.eigh_factors(factors)
    assert sorted(shapes) == sorted([(3, 6, 6), (2, 9, 9), (4, 4)])  # one call per size
    for f, (evals, evecs) in zip(factors, got):
        e1, v1 = eigenbasis.eigh_factor(f)
        torch.testing.assert_close(evals, e1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, f, rtol=1e-9, atol=1e-10)

    # A batch that does not converge is redone factor by factor.
    def batch_fails(m):
        if m.dim() == 3:
            raise torch.linalg.LinAlgError("did not converge")
        return real(m)

    monkeypatch.setattr(torch.linalg, "eigh", batch_fails)
    for f, (evals, evecs) in zip(factors, eigenbasis.eigh_factors(factors)):
        torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.T, f, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reader_inverse_precision_follows_the_model(dtype: torch.dtype) -> None:
    """The readers' ``A⁻¹`` is factorised in float32 for a float32 model (to float32 rounding of
    the float64 inverse) and in float64 for a float64 model (to float64 rounding)."""
    from lightning_eigendamage.channels.baselines import damped_inverse
    from lightning_eigendamage.channels.engine import scores_from_factors

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).to(dtype)
    x = torch.randn(8, 3, 7, 7, dtype=dtype)
    layers = {"2": net[2]}
    cap = capture_factors(net, layers, [x], factors_for=["2"], a_form="patch")
    _, updates = scores_from_factors(layers, cap, 1e-3, {})
    want = damped_inverse(cap.layers["2"].a(), 1e-3)
    got = updates[net[2]].a_inv
    assert got.dtype == torch.float64
    err = float((got - want).abs().max() / want.abs().max())
    if dtype == torch.float64:
        assert err < 1e-11
    else:
        assert 1e-11 < err < 1e-4  # float32 rounding: neither exact nor off
