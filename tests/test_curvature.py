"""K-FAC factors against brute-force definitions (docs/method.md §1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_eigendamage.curvature import (
    KFACapture,
    capture_factors,
    conv_channel_a,
    conv_patch_a,
)

CONV_CASES = {
    "stride2_pad1": dict(kernel_size=3, stride=2, padding=1),
    "dilation2_same": dict(kernel_size=3, dilation=2, padding="same"),
    "even_kernel_same": dict(kernel_size=(4, 2), padding="same"),
    "rect_stride_valid": dict(kernel_size=(3, 2), stride=(2, 1), padding=0),
    "pointwise_stride2": dict(kernel_size=1, stride=2),
    "reflect_pad": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular_stride2": dict(kernel_size=3, stride=2, padding=2, padding_mode="circular"),
}


def _explicit_pad(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Pad ``x`` the way ``conv`` does, computed here from scratch (not with the library)."""
    if conv.padding == "same":
        pads = []
        for d, k in zip(conv.dilation, conv.kernel_size):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        (pt, pb), (pl, pr) = pads
    elif conv.padding == "valid":
        pt = pb = pl = pr = 0
    else:
        (pt, pl), (pb, pr) = conv.padding, conv.padding
    mode = {"zeros": "constant"}.get(conv.padding_mode, conv.padding_mode)
    return F.pad(x, (pl, pr, pt, pb), mode=mode)


def _brute_conv_a(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-form and patch-form A by unfolding and explicit loops over offsets."""
    xp = _explicit_pad(conv, x)
    patches = F.unfold(xp, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    n, ck, locs = patches.shape
    c = x.shape[1]
    k2 = ck // c
    per_offset = patches.reshape(n, c, k2, locs)
    a_chan = torch.zeros(c, c, dtype=torch.float64)
    for delta in range(k2):
        rows = per_offset[:, :, delta, :].permute(0, 2, 1).reshape(-1, c).double()
        a_chan += rows.T @ rows
    a_chan /= n * locs * k2
    p = patches.permute(0, 2, 1).reshape(-1, ck).double()
    return a_chan, p.T @ p / (n * locs)


@pytest.mark.parametrize("size", [(9, 10), (20, 21)])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_channel_and_patch_a_match_unfold_definition(case, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, **CONV_CASES[case])
    x = torch.randn(3, 4, *size)
    out = conv(x)
    a_sum, reads = conv_channel_a(x, conv, out.shape[2], out.shape[3])
    p_sum, rows = conv_patch_a(x, conv)
    a_ref, p_ref = _brute_conv_a(conv, x)
    k2 = conv.kernel_size[0] * conv.kernel_size[1]
    assert reads == 3 * out.shape[2] * out.shape[3] * k2
    assert rows == 3 * out.shape[2] * out.shape[3]
    torch.testing.assert_close(a_sum.double() / reads, a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_sum.double() / rows, p_ref, rtol=1e-5, atol=1e-6)


class ConvHead(nn.Module):
    def __init__(self, conv_kwargs, n_classes=4, size=9):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, **conv_kwargs)
        with torch.no_grad():
            h = self.conv(torch.zeros(1, 3, size, size))
        self.fc = nn.Linear(h.numel(), n_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _brute_factors(model, layer, batches, fisher, seed):
    """Factors of ``layer`` by explicit autograd per batch: D = ∂(Σ_n ℓ_n)/∂s, A from definitions."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    a_tot = g_tot = 0
    a_rows = g_rows = 0
    for x, y in batches:
        store = {}

        def hook(m, inp, out, store=store):
            store["x"] = inp[0].detach()
            store["s"] = out

        h = layer.register_forward_hook(hook)
        logits = model(x)
        h.remove()
        if fisher == "true":
            probs = torch.softmax(logits.detach().float(), -1)
            y = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (d,) = torch.autograd.grad(loss, store["s"])
        if isinstance(layer, nn.Conv2d):
            a_chan, _ = _brute_conv_a(layer, store["x"])
            locs = d.shape[2] * d.shape[3]
            k2 = layer.kernel_size[0] * layer.kernel_size[1]
            n_reads = x.shape[0] * locs * k2
            a_tot = a_tot + a_chan * n_reads
            a_rows += n_reads
            dr = d.permute(0, 2, 3, 1).reshape(-1, d.shape[1]).double()
        else:
            xr = store["x"].reshape(-1, store["x"].shape[-1]).double()
            a_tot = a_tot + xr.T @ xr
            a_rows += xr.shape[0]
            dr = d.reshape(-1, d.shape[-1]).double()
        g_tot = g_tot + dr.T @ dr
        g_rows += dr.shape[0]
    return a_tot / a_rows, g_tot / g_rows


@pytest.mark.parametrize("fisher", ["true", "empirical"])
@pytest.mark.parametrize("case", ["stride2_pad1", "dilation2_same", "even_kernel_same", "pointwise_stride2"])
def test_conv_factors_match_brute_force(case, fisher):
    torch.manual_seed(1)
    model = ConvHead(CONV_CASES[case])
    g = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(6, 3, 9, 9, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(3)
    ]
    res = capture_factors(
        model,
        {"conv": model.conv, "fc": model.fc},
        batches,
        factors_for=["conv", "fc"],
        fisher=fisher,
        generator=torch.Generator().manual_seed(11),
    )
    for name, layer in (("conv", model.conv), ("fc", model.fc)):
        a_ref, g_ref = _brute_factors(model, layer, batches, fisher, seed=11)
        lf = res.layers[name]
        torch.testing.assert_close(lf.a().double(), a_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(lf.g().double(), g_ref, rtol=1e-5, atol=1e-9)
    assert res.layers["conv"].locations == pytest.approx(
        model.conv(batches[0][0]).shape[2] * model.conv(batches[0][0]).shape[3]
    )


class SeqNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):  # (N, T, 5) → per-token logits (N, T, 3)
        return self.head(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_linear_factors_on_token_sequences(fisher):
    """Leading dims are locations: A and G average over examples and tokens; the loss sums tokens."""
    torch.manual_seed(2)
    model = SeqNet()
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(4, 6, 5, generator=g), torch.randint(0, 3, (4, 6), generator=g)) for _ in range(2)
    ]
    res = capture_factors(
        model,
        {"lin": model.lin},
        batches,
        factors_for=["lin"],
        fisher=fisher,
        generator=torch.Generator().manual_seed(7),
    )
    # Brute force with an explicit double loop over examples and tokens.
    gen = torch.Generator().manual_seed(7)
    a_ref = torch.zeros(5, 5, dtype=torch.float64)
    g_ref = torch.zeros(7, 7, dtype=torch.float64)
    rows = 0
    for x, y in batches:
        s = model.lin(x)
        logits = model.head(torch.tanh(s))
        if fisher == "true":
            probs = torch.softmax(logits.detach().reshape(-1, 3), -1)
            y = torch.multinomial(probs, 1, generator=gen).reshape(4, 6)
        loss = sum(F.cross_entropy(logits[n], y[n], reduction="sum") for n in range(4))
        (d,) = torch.autograd.grad(loss, s)
        for n in range(4):
            for t in range(6):
                a_ref += torch.outer(x[n, t], x[n, t]).double()
                g_ref += torch.outer(d[n, t], d[n, t]).double()
                rows += 1
    lf = res.layers["lin"]
    assert lf.locations == 6
    torch.testing.assert_close(lf.a().double(), a_ref / rows, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lf.g().double(), g_ref / rows, rtol=1e-5, atol=1e-9)


def test_true_fisher_of_last_layer_approaches_exact_expectation():
    """For logits s = W a + b, E_y[D Dᵀ] = diag(p) − p pᵀ exactly; sampled G converges to it."""
    torch.manual_seed(4)
    lin = nn.Linear(3, 4)
    x = torch.randn(8, 3)
    batches = [x] * 400
    res = capture_factors(
        lin, {"l": lin}, batches, factors_for=["l"], fisher="true", generator=torch.Generator().manual_seed(0)
    )
    p = torch.softmax(lin(x).detach().double(), -1)
    exact = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    err = (res.layers["l"].g().double() - exact).abs().max()
    assert err < 0.02, err  # Monte-Carlo error over 3,200 samples
    # ...and the exact expectation is *not* what the empirical Fisher with fixed labels gives.
    emp = capture_factors(
        lin, {"l": lin}, [(x, torch.zeros(8, dtype=torch.long))], factors_for=["l"], fisher="empirical"
    )
    assert (emp.layers["l"].g().double() - exact).abs().max() > 0.1


def test_capture_leaves_grad_bn_stats_rng_and_mode_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    grads = [p.grad.clone() for p in model.parameters()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,)))] * 2
    rng = torch.get_rng_state()
    for fisher in ("true", "empirical"):
        capture_factors(model, {"c": model[0], "l": model[4]}, batches, factors_for=["c", "l"], fisher=fisher)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert not model[0]._forward_hooks and not model[4]._forward_hooks


def test_hooks_removed_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return self.lin(x)

    model = Boom()
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        capture_factors(model, {"lin": model.lin}, [torch.randn(2, 3)] * 3, factors_for=["lin"])
    assert not model.lin._forward_hooks
    assert model.training


@pytest.mark.parametrize(
    "bad_value", [float("nan"), float("inf"), -1e25]
)  # -1e25: finite, its square overflows
@pytest.mark.parametrize("a_form", ["channel", "patch"])
def test_a_batch_with_any_non_finite_factor_entry_is_skipped(bad_value: float, a_form: str) -> None:
    """The finiteness check reads the factors' diagonals: one bad pixel of one example in one
    channel, whatever makes the factors non-finite (NaN, inf, or a finite value whose products
    overflow float32), drops the whole batch for every layer."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 2))
    mods = {"0": net[0], "3": net[3]}
    good = torch.randn(4, 3, 5, 5)
    bad = good.clone()
    bad[1, 2, 4, 0] = bad_value
    res = capture_factors(net, mods, [good, bad, good], factors_for=list(mods), a_form=a_form)
    assert res.batches == 2 and res.skipped_batches == 1
    ref = capture_factors(net, mods, [good, good], factors_for=list(mods), a_form=a_form)
    for name in mods:
        torch.testing.assert_close(res.layers[name].a(), ref.layers[name].a())
        assert torch.isfinite(res.layers[name].g()).all()  # (its sampled labels differ from ref's)


def test_non_finite_batches_are_skipped_and_counted():
    lin = nn.Linear(3, 2)
    good = torch.randn(4, 3)
    bad = good.clone()
    bad[0, 0] = float("nan")
    res = capture_factors(lin, {"l": lin}, [good, bad, good], factors_for=["l"])
    assert res.batches == 2 and res.skipped_batches == 1
    assert torch.isfinite(res.layers["l"].a()).all()
    ref = capture_factors(lin, {"l": lin}, [good, good], factors_for=["l"])
    torch.testing.assert_close(res.layers["l"].a(), ref.layers["l"].a())


def test_module_called_twice_is_flagged():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    with KFACapture({"lin": lin}) as cap:
        cap.begin_batch()
        model(torch.randn(2, 3))
        cap.end_batch(2)
    assert cap.layers["lin"].max_calls == 2


def test_capture_does_not_keep_activations_alive_after_their_backward():
    """A layer's input is held for the backward only as long as autograd holds it: keeping every
    input to the end of the batch grows the heap on each captured step (measured: +10 % step time)."""
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    seen = []
    model[2].register_forward_pre_hook(lambda m, inputs: seen.append(weakref.ref(inputs[0])) and None)
    with KFACapture({"0": model[0], "2": model[2]}) as cap:
        cap.begin_batch()
        model(torch.randn(4, 3, 8, 8)).square().sum().backward()
        assert seen and seen[0]() is None  # freed with the graph, before end_batch
        assert cap.end_batch(4)
    assert cap.layers["2"].a_sum is not None and cap.layers["2"].g_sum is not None


class TwoBranch(nn.Module):
    """A conv branch on the input and a Linear branch on a learned query (not downstream of it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)
        self.query = nn.Parameter(torch.randn(2, 6))
        self.q1 = nn.Linear(6, 6)
        self.q2 = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        q = self.q2(torch.tanh(self.q1(self.query))).mean(0)
        return self.fc(h) + q


def test_backward_targets_are_few_and_every_layer_is_still_reached():
    """Targets: the input alias, then only layers no earlier target reaches (q1's input is a leaf
    parameter); the factors of every layer still match the brute-force definition."""
    torch.manual_seed(3)
    model = TwoBranch()
    g = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(5, 3, 6, 6, generator=g), torch.randint(0, 4, (5,), generator=g)) for _ in range(2)
    ]
    layers = {"conv": model.conv, "fc": model.fc, "q1": model.q1, "q2": model.q2}
    model.eval()
    with KFACapture(layers) as cap:
        x = batches[0][0].detach() + torch.zeros((), requires_grad=True)
        cap.begin_batch()
        model(x)
        targets = cap.grad_targets(x)
        cap.abort_batch()
    assert len(targets) == 2 and targets[0] is x and targets[1] is model.query
    res = capture_factors(
        model,
        layers,
        batches,
        factors_for=list(layers),
        fisher="true",
        generator=torch.Generator().manual_seed(7),
    )
    for name, layer in layers.items():
        a_ref, g_ref = _brute_factors(model, layer, batches, "true", seed=7)
        torch.testing.assert_close(res.layers[name].a().double(), a_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res.layers[name].g().double(), g_ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("channels", [5, 128, 129, 200])
def test_gram_paths_match_the_definition(channels):
    """Both Gram paths (batched products up to 128 channels, one transposed GEMM above) against
    an explicit float64 sum over examples."""
    from lightning_eigendamage.curvature import gram

    torch.manual_seed(0)
    v = torch.randn(3, channels, 17)
    ref = sum(v[i].double() @ v[i].double().T for i in range(3))
    torch.testing.assert_close(gram(v).double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_true_fisher_of_the_output_layer_has_the_likelihood_s_second_moment(likelihood):
    """For the last layer ``z = W a`` the true Fisher's ``G`` is ``E[D Dᵀ]`` with ``D = ∂ℓ/∂z``:
    ``diag(σ(z)(1 − σ(z)))`` averaged over examples for independent Bernoulli outputs, the
    identity for a unit-variance Gaussian. Sampled, so compared to a tolerance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(20000, 4) * 2
    res = capture_factors(
        model,
        {"out": model[2]},
        [(x, torch.zeros(len(x)))],
        factors_for=["out"],
        likelihood=likelihood,
        generator=torch.Generator().manual_seed(3),
    )
    with torch.no_grad():
        p = torch.sigmoid(model(x))
    expected = torch.diag((p * (1 - p)).mean(0)) if likelihood == "bernoulli" else torch.eye(2)
    torch.testing.assert_close(res.layers["out"].g().float(), expected, rtol=0, atol=0.01)


def test_a_single_logit_with_the_categorical_likelihood_is_an_error():
    from lightning_eigendamage import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    batches = [(torch.randn(16, 4), torch.randint(0, 2, (16, 1)).float()) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for fisher in ("true", "empirical"):
        with pytest.raises(ValueError, match="single logit.*likelihood='bernoulli'"):
            prune(model, batches, ratio=0.5, fisher=fisher)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = prune(model, batches, ratio=0.5, likelihood="bernoulli")
    assert report.realised_fraction > 0 and all(r.skipped is None for r in report.layers[:2])


@pytest.mark.parametrize("size", [(2, 3), (16, 16)])
def test_patch_a_is_the_same_sum_by_rows_and_by_examples(size):
    """Few positions per example (``T < d/2``) take one product of the rows, many take batched
    per-example products: both are the unfold definition."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 5, 3, padding=1)
    x = torch.randn(5, 8, *size)
    p_sum, rows = conv_patch_a(x, conv)
    _, p_ref = _brute_conv_a(conv, x)
    assert rows == 5 * size[0] * size[1]
    torch.testing.assert_close(p_sum.double() / rows, p_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_floats", [1, 50, 2**25])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 2), stride=(2, 3), dilation=(2, 1), padding=(2, 0)),
        dict(kernel_size=5, padding=2, padding_mode="reflect"),
    ],
)
def test_patch_a_by_row_lags_is_the_unfold_definition(kwargs, block_floats, monkeypatch):
    """The row-lag sum (one batched product per kernel-row lag, rows taken in chunks of at most
    ``block_floats`` products) is the Gram of the unfolded patches, also for a channels-last
    (non-contiguous) input; the path is taken where it needs fewer multiply-adds."""
    from lightning_eigendamage.curvature import factors

    calls = []
    real = factors._patch_a_by_row_lags
    monkeypatch.setattr(factors, "_BLOCK_FLOATS", block_floats)
    monkeypatch.setattr(factors, "_patch_a_by_row_lags", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **kwargs)
    x = torch.randn(2, 3, 13, 11).to(memory_format=torch.channels_last)
    p_sum, rows = conv_patch_a(x, conv)
    _, p_ref = _brute_conv_a(conv, x.contiguous())
    assert calls, "the row-lag path was not taken"
    assert rows == 2 * conv(x).shape[2] * conv(x).shape[3]
    torch.testing.assert_close(p_sum.double() / rows, p_ref, rtol=1e-5, atol=1e-6)
