"""Baseline criteria (C-OBD, C-OBS, Kron-OBD, Kron-OBS, Network Slimming) against independent
dense computations: the Kronecker Fisher ``F = T·(G ⊗ A)`` built with ``torch.kron`` and OBD/OBS
quantities solved directly from their definitions, and per-example gradients from autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_eigendamage.channels.baselines import (
    CRITERIA,
    DiagFisherCapture,
    InputObsUpdate,
    Reader,
    c_obd_scores,
    c_obs_scores,
    c_obs_update,
    capture_diag_fisher,
    channel_scores,
    damped,
    damped_inverse,
    greedy_input_obs_scores,
    input_obs_scores,
    input_obs_update,
    kron_obd_scores,
    kron_obs_damage,
    kron_obs_scores,
    kron_obs_update,
    obs_update,
    per_example_weight_grads,
    slimming_penalty,
    slimming_scores,
    weight_matrix,
)
from lightning_eigendamage.curvature import capture_factors

torch.set_num_threads(min(2, torch.get_num_threads()))
DT = torch.float64


# ---------------------------------------------------------------------------------------------
# Dense references
# ---------------------------------------------------------------------------------------------


def spd(n: int, gen: torch.Generator, cond: float = 1.0) -> torch.Tensor:
    """A random symmetric positive definite matrix with correlated (non-diagonal) entries."""
    m = torch.randn(n, n, generator=gen, dtype=DT)
    return m @ m.T / n + cond * 0.1 * torch.eye(n, dtype=DT)


def dense_fisher(g: torch.Tensor, a: torch.Tensor, locations: float) -> torch.Tensor:
    """``T·(G ⊗ A)`` for row-major ``vec(W)`` (index ``i·d + j`` is ``W_ij``)."""
    return locations * torch.kron(g, a)


def row_mask(c_out: int, d: int, rows: list[int]) -> torch.Tensor:
    m = torch.zeros(c_out, d, dtype=torch.bool)
    m[rows] = True
    return m.reshape(-1)


def obs_constrained(
    f: torch.Tensor, w: torch.Tensor, removed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force OBS: minimise ``½ δwᵀ F δw`` subject to ``(w + δw)_S = 0`` for the boolean mask
    ``S`` over ``vec(W)``, by eliminating the free part ``U``: ``δw_U = F_UU⁻¹ F_US w_S``.

    Returns ``(δw, ½ δwᵀ F δw)``.
    """
    s, u = removed, ~removed
    delta = torch.zeros_like(w)
    delta[s] = -w[s]
    if bool(u.any()):
        delta[u] = torch.linalg.solve(f[u][:, u], f[u][:, s] @ w[s])
    return delta, 0.5 * delta @ f @ delta


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(3)
    c_out, d, t = 5, 7, 3.0
    w = torch.randn(c_out, d, generator=gen, dtype=DT)
    return w, spd(d, gen), spd(c_out, gen), t


# ---------------------------------------------------------------------------------------------
# Kron-OBD
# ---------------------------------------------------------------------------------------------


def test_kron_obd_is_the_quadratic_form_of_the_kronecker_fisher(problem):
    w, a, g, t = problem
    c_out, d = w.shape
    f_full = dense_fisher(g, a, t)
    f_obd = dense_fisher(torch.diag(torch.diagonal(g)), a, t)  # F ≈ diag(G) ⊗ A
    got = kron_obd_scores(w, a, g, t)
    for i in range(c_out):
        dw = torch.zeros(c_out, d, dtype=DT)
        dw[i] = -w[i]
        v = dw.reshape(-1)
        torch.testing.assert_close(got[i], 0.5 * v @ f_obd @ v)
        torch.testing.assert_close(got[i], 0.5 * v @ f_full @ v)


def test_kron_obd_is_not_the_reference_codes_form(problem):
    w, a, g, t = problem
    reference = 0.5 * t * torch.diagonal(g) * (w**2 @ a).sum(1)  # Σ_jk W_ij² A_jk
    assert not torch.allclose(kron_obd_scores(w, a, g, t), reference, rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Kron-OBS
# ---------------------------------------------------------------------------------------------


def test_kron_obs_single_row_score_is_the_obs_minimum(problem):
    w, a, g, t = problem
    c_out, d = w.shape
    gamma = 1e-2
    f = dense_fisher(damped(g, gamma), a, t)
    got = kron_obs_scores(w, a, damped_inverse(g, gamma), t)
    for i in range(c_out):
        delta, loss = obs_constrained(f, w.reshape(-1), row_mask(c_out, d, [i]))
        torch.testing.assert_close(got[i], loss)
        torch.testing.assert_close(kron_obs_damage(w, a, damped_inverse(g, gamma), [i], t), loss)
        torch.testing.assert_close(kron_obs_update(w, damped_inverse(g, gamma), [i]).reshape(-1), delta)


def test_kron_obs_joint_update_is_the_constrained_least_squares_solution(problem):
    w, a, g, t = problem
    c_out, d = w.shape
    removed = [0, 2, 3]
    g_inv = damped_inverse(g, 0.0)  # G is SPD: no damping needed for the check
    f = dense_fisher(g, a, t)
    mask = row_mask(c_out, d, removed)
    delta, loss = obs_constrained(f, w.reshape(-1), mask)

    joint = kron_obs_update(w, g_inv, removed)
    torch.testing.assert_close(joint.reshape(-1), delta)
    torch.testing.assert_close((w + joint)[removed], torch.zeros(len(removed), d, dtype=DT))
    torch.testing.assert_close(kron_obs_damage(w, a, g_inv, removed, t), loss)

    # Summing single-row updates (the reference code) is a different, worse update.
    summed = sum(kron_obs_update(w, g_inv, [r]) for r in removed)
    assert (summed - joint).abs().max() > 1e-3
    forced = summed.clone()
    forced[removed] = -w[removed]  # the removed rows are deleted anyway
    v = forced.reshape(-1)
    assert 0.5 * v @ f @ v > loss * (1 + 1e-6)
    # And the joint damage is not the sum of the single-row scores.
    assert not torch.isclose(loss, kron_obs_scores(w, a, g_inv, t)[removed].sum(), rtol=1e-3)


# ---------------------------------------------------------------------------------------------
# Input-side Kron-OBS (the layers that read a removed channel compensate for it)
# ---------------------------------------------------------------------------------------------


def col_mask(c_out: int, d: int, chans: list[int], block: int) -> torch.Tensor:
    m = torch.zeros(c_out, d, dtype=torch.bool)
    for c in chans:
        m[:, c * block : (c + 1) * block] = True
    return m.reshape(-1)


@pytest.mark.parametrize("block", [1, 3])
def test_input_obs_scores_and_joint_update_are_the_constrained_obs_minimum(block):
    gen = torch.Generator().manual_seed(5)
    c_out, n_in, t = 4, 5, 2.0
    d = n_in * block
    w = torch.randn(c_out, d, generator=gen, dtype=DT)
    a, g = spd(d, gen), spd(c_out, gen)
    a_inv = damped_inverse(a, 0.0)  # A is SPD: the exact inverse
    f = dense_fisher(g, a, t)
    got = input_obs_scores(w, a_inv, g, block, t)
    assert got.shape == (n_in,)
    for c in range(n_in):
        delta, loss = obs_constrained(f, w.reshape(-1), col_mask(c_out, d, [c], block))
        torch.testing.assert_close(got[c], loss)
        torch.testing.assert_close(input_obs_update(w, a_inv, [c], block).reshape(-1), delta)
    removed = [0, 3]
    delta, loss = obs_constrained(f, w.reshape(-1), col_mask(c_out, d, removed, block))
    joint = input_obs_update(w, a_inv, removed, block)
    torch.testing.assert_close(joint.reshape(-1), delta)
    v = joint.reshape(-1)
    torch.testing.assert_close(0.5 * v @ f @ v, loss)
    assert not torch.isclose(loss, got[removed].sum(), rtol=1e-3)  # correlated: not additive


def test_input_obs_update_is_the_least_squares_fit_from_the_kept_inputs():
    gen = torch.Generator().manual_seed(6)
    n, n_in, block, c_out = 400, 6, 2, 3
    d = n_in * block
    x = torch.randn(n, d, generator=gen, dtype=DT) @ torch.randn(d, d, generator=gen, dtype=DT)
    w = torch.randn(c_out, d, generator=gen, dtype=DT)
    removed = [1, 4]
    cols = [j for c in removed for j in range(c * block, (c + 1) * block)]
    kept = [j for j in range(d) if j not in cols]
    new = w + input_obs_update(w, damped_inverse(x.T @ x / n, 1e-12), removed, block)
    assert float(new[:, cols].abs().max()) == 0.0
    best = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T  # argmin ‖x_K w_Kᵀ − x wᵀ‖²
    torch.testing.assert_close(new[:, kept], best, rtol=1e-6, atol=1e-8)


def _brute_greedy(readers, n):
    """The greedy removal order by brute force: each step removes the channel whose removal
    together with those removed so far has the least dense-OBS damage (summed over the readers,
    each minimised over its own kept weights); the scores are the increments, raised to the
    running maximum."""

    def joint(chans):
        total = torch.zeros((), dtype=DT)
        for w, a, g, t, block, channel_of in readers:
            cols = [i for i, c in enumerate(channel_of) if c in chans]
            if cols:
                total = (
                    total
                    + obs_constrained(dense_fisher(g, a, t), w.reshape(-1), col_mask(*w.shape, cols, block))[
                        1
                    ]
                )
        return total

    removed, done, scores, running = [], torch.zeros((), dtype=DT), torch.zeros(n, dtype=DT), 0.0
    for _ in range(n):
        best = min((c for c in range(n) if c not in removed), key=lambda c: float(joint([*removed, c])))
        removed.append(best)
        now = joint(removed)
        running = max(running, float(now - done))
        scores[best], done = running, now
    return scores, removed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block", [1, 3])
def test_greedy_scores_are_the_brute_force_sequential_obs_removal(block, dtype, monkeypatch):
    """Readers of one 5-channel group (one reads the channels in another order, one of them twice,
    as after a concatenation; two share a layout and are stacked): the greedy scores follow the
    removal that a dense OBS solve picks step by step, and near-copies do not both score low.
    The states updated in float32 (the default) give the same removal order and the float64
    scores to 1e-5."""
    from lightning_eigendamage.channels import baselines as greedy_mod

    monkeypatch.setattr(greedy_mod, "GREEDY_DTYPE", dtype)
    gen = torch.Generator().manual_seed(7)
    n = 5
    x = torch.randn(300, n, generator=gen, dtype=DT)
    x[:, 4] = x[:, 1] + 0.05 * torch.randn(300, generator=gen, dtype=DT)  # channel 4 ≈ channel 1
    readers, specs = [], []
    # -1: a column of another group (a concatenation): it compensates but is never removed here
    other = torch.randn(300, 2, generator=gen, dtype=DT) + x[:, [0, 2]]
    for channel_of, c_out, t in (
        ([0, 1, 2, 3, 4], 3, 1.0),
        ([4, 2, 0, 3, 1, 2], 4, 2.5),
        ([-1, 0, 3, -1], 2, 1.5),
        ([0, 1, 2, 3, 4], 3, 0.7),  # the first reader's layout: the two advance as one stacked state
    ):
        extra = iter(range(n, n + 2))
        src = torch.cat([x, other], 1)[:, [c if c >= 0 else next(extra) for c in channel_of]]
        feats = torch.repeat_interleave(src, block, dim=1)
        feats = feats + 0.3 * torch.randn(feats.shape, generator=gen, dtype=DT)
        a = feats.T @ feats / len(feats)
        w, g = torch.randn(c_out, a.shape[0], generator=gen, dtype=DT), spd(c_out, gen)
        mine = [(c, [i * block + k for k in range(block)]) for i, c in enumerate(channel_of) if c >= 0]
        update = InputObsUpdate(w, damped_inverse(a, 0.0), block, g, t)
        readers.append(Reader(update, [c for c, _ in mine], [cc for _, cc in mine]))
        specs.append((w, a, g, t, block, channel_of))
    got = greedy_input_obs_scores(readers, n, max_steps=n)
    want, order = _brute_greedy(specs, n)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-9}
    torch.testing.assert_close(got, want, **tol)
    assert sorted(range(n), key=lambda c: (float(got[c]), order.index(c))) == order
    single = torch.zeros(n, dtype=DT)
    for w, a, g, t, _, channel_of in specs:
        s = input_obs_scores(w, damped_inverse(a, 0.0), g, block, t)
        for i, c in enumerate(channel_of):
            single[c] += s[i] if c >= 0 else 0.0
    twins = sorted([1, 4], key=lambda c: float(got[c]))
    assert float(got[twins[1]]) > 3 * float(single[twins[1]])  # the survivor of the pair now costs more
    # fewer steps: several channels a step, the scores still rise along the removal order
    coarse = greedy_input_obs_scores(readers, n, max_steps=2)
    assert coarse.shape == (n,) and bool((coarse >= 0).all())
    assert int(coarse.argmin()) == int(got.argmin())
    with pytest.raises(ValueError, match="max_steps"):
        greedy_input_obs_scores(readers, n, max_steps=0)
    with pytest.raises(ValueError, match="G"):
        greedy_input_obs_scores([Reader(InputObsUpdate(w, damped_inverse(a, 0.0), block), [0], [[0]])], n)


def test_input_obs_bad_inputs_name_the_problem():
    w, a = torch.ones(2, 6, dtype=DT), torch.eye(6, dtype=DT)
    with pytest.raises(ValueError, match="divisor"):
        input_obs_scores(w, a, torch.eye(2, dtype=DT), block=4)
    with pytest.raises(ValueError, match="duplicates"):
        input_obs_update(w, a, [1, 1], block=2)
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        input_obs_update(w, a, [3], block=2)
    with pytest.raises(ValueError, match="A must be"):
        input_obs_scores(w, torch.eye(5, dtype=DT), torch.eye(2, dtype=DT))


def test_kron_obs_update_of_the_bias_is_exact_for_a_constant_input(problem):
    w, a, g, t = problem
    c_out, d = w.shape
    gen = torch.Generator().manual_seed(9)
    b = torch.randn(c_out, generator=gen, dtype=DT)
    mean = 0.3 * torch.randn(d, generator=gen, dtype=DT)
    a_ext = torch.zeros(d + 1, d + 1, dtype=DT)  # E[[a;1][a;1]ᵀ] with E[a] = mean
    a_ext[:d, :d] = a + torch.outer(mean, mean)
    a_ext[:d, d] = a_ext[d, :d] = mean
    a_ext[d, d] = 1.0
    removed = [1, 4]
    w_ext = torch.cat([w, b[:, None]], 1)
    delta, _ = obs_constrained(dense_fisher(g, a_ext, t), w_ext.reshape(-1), row_mask(c_out, d + 1, removed))
    delta = delta.reshape(c_out, d + 1)
    dw, db = obs_update("kron-obs", w, a=a, g=g, bias=b, damping=0.0)(removed)
    torch.testing.assert_close(dw, delta[:, :d])
    torch.testing.assert_close(db, delta[:, d])


# ---------------------------------------------------------------------------------------------
# C-OBS
# ---------------------------------------------------------------------------------------------


def test_c_obs_scores_and_update_are_single_weight_obs_with_the_kronecker_inverse(problem):
    w, a, g, t = problem
    c_out, d = w.shape
    gamma = 1e-2
    a_inv, g_inv = damped_inverse(a, gamma), damped_inverse(g, gamma)
    f = dense_fisher(damped(g, gamma), damped(a, gamma), t)
    f_inv = torch.linalg.inv(f)
    v = w.reshape(-1)
    saliency = 0.5 * v**2 / torch.diagonal(f_inv)  # OBS: ½ w_q² / [F⁻¹]_qq
    torch.testing.assert_close(c_obs_scores(w, a_inv, g_inv, t), saliency.reshape(c_out, d).sum(1))

    # Each term is the brute-force OBS minimum of removing that weight alone.
    for q in (0, 9, 20):
        mask = torch.zeros(c_out * d, dtype=torch.bool)
        mask[q] = True
        delta_q, loss_q = obs_constrained(f, v, mask)
        torch.testing.assert_close(saliency[q], loss_q)
        torch.testing.assert_close(-f_inv[:, q] * v[q] / f_inv[q, q], delta_q)

    removed = [1, 3]
    expected = torch.zeros_like(v)
    for q in row_mask(c_out, d, removed).nonzero().squeeze(1).tolist():
        expected -= f_inv[:, q] * v[q] / f_inv[q, q]  # sum of single-weight OBS updates
    got = c_obs_update(w, a_inv, g_inv, removed)
    torch.testing.assert_close(got.reshape(-1), expected)
    dw, db = obs_update("c-obs", w, a=a, g=g, damping=gamma)(removed)
    torch.testing.assert_close(dw, got)
    assert db is None


# ---------------------------------------------------------------------------------------------
# Dispatch, damping and bad inputs
# ---------------------------------------------------------------------------------------------


def test_channel_scores_dispatch(problem):
    w, a, g, t = problem
    fd = torch.rand(w.shape, dtype=DT)
    gamma = 1e-3
    torch.testing.assert_close(channel_scores("c-obd", w, fisher_diag=fd), c_obd_scores(w, fd))
    torch.testing.assert_close(
        channel_scores("c-obs", w, a=a, g=g, locations=t, damping=gamma),
        c_obs_scores(w, damped_inverse(a, gamma), damped_inverse(g, gamma), t),
    )
    torch.testing.assert_close(
        channel_scores("kron-obd", w, a=a, g=g, locations=t), kron_obd_scores(w, a, g, t)
    )
    torch.testing.assert_close(
        channel_scores("kron-obs", w, a=a, g=g, locations=t, damping=gamma),
        kron_obs_scores(w, a, damped_inverse(g, gamma), t),
    )
    assert set(CRITERIA) == {"c-obd", "c-obs", "kron-obd", "kron-obs"}


def test_damping_is_relative_to_the_mean_eigenvalue():
    f = torch.diag(torch.tensor([4.0, 2.0, 0.0], dtype=DT))
    torch.testing.assert_close(damped(f, 0.5), torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=DT)))
    torch.testing.assert_close(damped_inverse(f, 0.5), torch.diag(torch.tensor([0.2, 1 / 3, 1.0], dtype=DT)))
    torch.testing.assert_close(damped(torch.zeros(2, 2), 0.1), 0.1 * torch.eye(2, dtype=DT))
    with pytest.raises(ValueError, match="damping > 0"):
        damped_inverse(f, 0.0)
    with pytest.raises(ValueError, match="damping must be"):
        damped(f, -1.0)


def test_bad_inputs_name_the_problem(problem):
    w, a, g, t = problem
    with pytest.raises(ValueError, match="criterion must be one of"):
        channel_scores("obd", w, a=a, g=g)
    with pytest.raises(ValueError, match="needs fisher_diag"):
        channel_scores("c-obd", w)
    with pytest.raises(ValueError, match="needs the K-FAC factors"):
        channel_scores("kron-obs", w, a=a)
    with pytest.raises(ValueError, match="A must be"):
        kron_obd_scores(w, g, g)
    with pytest.raises(ValueError, match="G must be"):
        kron_obs_update(w, a, [0])
    with pytest.raises(ValueError, match=r"\(C_out, d\)"):
        kron_obd_scores(w.reshape(5, 7, 1), a, g)
    with pytest.raises(ValueError, match="duplicates"):
        kron_obs_update(w, g, [1, 1])
    with pytest.raises(IndexError, match="removed rows must be in"):
        c_obs_update(w, a, g, [5])
    with pytest.raises(ValueError, match="only"):
        obs_update("kron-obd", w, a=a, g=g)
    with pytest.raises(TypeError, match="expected nn.Conv2d or nn.Linear"):
        weight_matrix(nn.BatchNorm2d(3))
    torch.testing.assert_close(kron_obs_update(w, g, []), torch.zeros_like(w))


# ---------------------------------------------------------------------------------------------
# Real layers: weight layout, per-example gradients, diagonal Fisher (C-OBD)
# ---------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Stride, dilation, reflect padding, bias-free conv, BN, and a Linear on tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, dilation=2, padding=2, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(5)
        self.tok = nn.Linear(5, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.c2(torch.relu(self.c1(x)))))
        tokens = h.flatten(2).transpose(1, 2)  # (N, T, 5)
        return self.fc(torch.tanh(self.tok(tokens)).mean(1))


def _tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    m = TinyNet()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.2, 0.2)
        m.bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _batches(n_batches: int = 2, n: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))
        for _ in range(n_batches)
    ]


def _brute_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]):
    """Per-example weight gradients (as ``weight.reshape(C_out, -1)``) by one backward per example."""
    mods = dict(model.named_modules())
    out = {n: [] for n in names}
    for k in range(x.shape[0]):
        loss = F.cross_entropy(model(x[k : k + 1]), y[k : k + 1], reduction="sum")
        grads = torch.autograd.grad(loss, [mods[n].weight for n in names])
        for n, gr in zip(names, grads):
            out[n].append(gr.reshape(gr.shape[0], -1).to(DT))
    return {n: torch.stack(v) for n, v in out.items()}


def test_per_example_weight_grads_match_autograd():
    model = _tiny()
    x, y = _batches(1)[0]
    names = ["c1", "c2", "tok", "fc"]
    mods = dict(model.named_modules())
    inputs, outputs = {}, {}

    def record(name):
        def hook(module, inp, out):
            inputs[name], outputs[name] = inp[0], out

        return hook

    hooks = [mods[n].register_forward_hook(record(n)) for n in names]
    loss = F.cross_entropy(model(x), y, reduction="sum")  # Σ_n ℓ_n: its output gradient is D_n
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    expected = _brute_per_example(model, x, y, names)
    for n, gr in zip(names, grads):
        got = per_example_weight_grads(mods[n], inputs[n].detach(), gr)
        assert got.shape == expected[n].shape
        torch.testing.assert_close(got.to(DT), expected[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_diag_fisher_capture_and_c_obd_match_brute_force(fisher):
    model = _tiny()
    batches = _batches()
    names = ["c1", "c2", "tok", "fc"]
    mods = dict(model.named_modules())
    res = capture_diag_fisher(model, {n: mods[n] for n in names}, batches, fisher=fisher)
    assert res.batches == 2 and res.skipped_batches == 0

    gen = torch.Generator().manual_seed(0)  # capture_diag_fisher's default seed
    grads = {n: [] for n in names}
    for x, y in batches:
        if fisher == "true":  # the same draws as sampled_loss: ŷ ~ softmax(logits)
            with torch.no_grad():
                probs = torch.softmax(model(x).float(), dim=-1)
            y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        for n, g in _brute_per_example(model, x, y, names).items():
            grads[n].append(g)
    for n in names:
        g = torch.cat(grads[n])  # (N_total, C_out, d)
        n_total, c_out, d = g.shape
        flat = g.reshape(n_total, -1)
        f_dense = flat.T @ flat / n_total  # the exact (empirical or sampled) Fisher
        torch.testing.assert_close(
            res.fisher[n], torch.diagonal(f_dense).reshape(c_out, d), rtol=1e-4, atol=1e-9
        )
        w = weight_matrix(mods[n])
        expected = []
        for i in range(c_out):  # OBD with the diagonal Fisher: ½ δwᵀ diag(F) δw for δW = −W on row i
            v = torch.zeros(c_out, d, dtype=DT)
            v[i] = -w[i]
            v = v.reshape(-1)
            expected.append(0.5 * v @ torch.diag(torch.diagonal(f_dense)) @ v)
        torch.testing.assert_close(
            c_obd_scores(w, res.fisher[n]), torch.stack(expected), rtol=1e-4, atol=1e-12
        )


def test_diag_fisher_capture_leaves_grads_and_modes_alone():
    model = _tiny()
    model.train()
    mods = dict(model.named_modules())
    bn_mean = model.bn.running_mean.clone()
    res = capture_diag_fisher(model, {"c1": mods["c1"], "fc": mods["fc"]}, _batches(), factors_for=["c1"])
    assert set(res.fisher) == {"c1"}
    assert model.training and all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model.bn.running_mean, bn_mean)
    assert not mods["c1"]._forward_hooks


def test_diag_fisher_rejects_grouped_conv_and_unknown_options():
    with pytest.raises(ValueError, match="grouped convolution"):
        DiagFisherCapture({"g": nn.Conv2d(4, 4, 3, groups=2)})
    model = _tiny()
    with pytest.raises(ValueError, match="fisher must be one of"):
        capture_diag_fisher(model, {"fc": model.fc}, _batches(), fisher="exact")
    with pytest.raises(ValueError, match="batches is empty"):
        capture_diag_fisher(model, {"fc": model.fc}, [])


def test_weight_layout_matches_patch_form_factors():
    """With one example and one output location K-FAC is exact: ``g gᵀ = G ⊗ A``. This pins the
    column order of ``weight.reshape(C_out, -1)`` to the patch-form ``A`` of curvature.py."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=3, padding=1, padding_mode="reflect")
    fc = nn.Linear(3, 4)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), fc).eval()
    x, y = torch.randn(1, 2, 3, 3), torch.tensor([2])  # conv output is 1×1: T = 1
    cap = capture_factors(
        model, {"c": conv, "f": fc}, [(x, y)], factors_for=["c", "f"], fisher="empirical", a_form="patch"
    )
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), [conv.weight, fc.weight])
    for name, gr in zip(["c", "f"], grads):
        lf = cap.layers[name]
        assert lf.locations == 1
        v = gr.reshape(-1).to(DT)
        torch.testing.assert_close(
            dense_fisher(lf.g(), lf.a(), lf.locations), torch.outer(v, v), rtol=1e-5, atol=1e-9
        )


# ---------------------------------------------------------------------------------------------
# Network Slimming
# ---------------------------------------------------------------------------------------------


def test_slimming_penalty_and_scores():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5)
    )
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.0, 1.5]))
        model[4].weight.uniform_(-1, 1)
    lam = 1e-2
    pen = slimming_penalty(model, lam)
    expected = lam * (4.0 + model[4].weight.detach().abs().sum())
    torch.testing.assert_close(pen, expected)
    pen.backward()
    torch.testing.assert_close(model[1].weight.grad, lam * torch.tensor([1.0, -1.0, 0.0, 1.0]))
    assert model[0].weight.grad is None
    torch.testing.assert_close(slimming_scores(model[1]), torch.tensor([0.5, 2.0, 0.0, 1.5], dtype=DT))
    assert float(slimming_penalty(nn.Linear(2, 2))) == 0.0
    with pytest.raises(TypeError, match="affine BatchNorm"):
        slimming_scores(nn.BatchNorm2d(3, affine=False))
