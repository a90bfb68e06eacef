"""Factors from every s-th example of each batch (``KFACapture(max_examples=...)``,
``PruningSchedule(fisher_examples=...)``): the same factors as a capture of those examples alone,
by both routes (the pass on the thinned batch, the hooks thinning the rows), ``T`` kept right where
the first dimension is not the batch, and batch statistics left to the whole batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_eigendamage.curvature.factors as factors
from lightning_eigendamage import PruningSchedule
from lightning_eigendamage.curvature import KFACapture, capture_batch, capture_factors, conv_patch_a


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(5 * 9, 4),
    ).eval()


def _layers(net: nn.Sequential) -> dict[str, nn.Module]:
    return {"0": net[0], "2": net[2], "4": net[4]}


@pytest.mark.parametrize("route", ["thinned pass", "hooks"])
@pytest.mark.parametrize("a_form", ["patch", "channel"])
def test_thinned_factors_are_those_of_the_kept_examples(route: str, a_form: str) -> None:
    """50 examples, at most 16: every 4th (13 examples) feeds A, G and T, as if only they ran."""
    net = _net()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 3, 6, 6, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    mods = _layers(net)
    ref = capture_factors(
        net, mods, [(x[::4], y[::4])], factors_for=list(mods), a_form=a_form, fisher="empirical"
    )
    fwd = None if route == "thinned pass" else (lambda m, b: m(b[0]))  # a forward_fn runs whole
    got = capture_factors(
        net,
        mods,
        [(x, y)],
        factors_for=list(mods),
        a_form=a_form,
        fisher="empirical",
        max_examples=16,
        forward_fn=fwd,
    )
    for name in mods:
        r, g = ref.layers[name], got.layers[name]
        assert (g.a_rows, g.g_rows) == (r.a_rows, r.g_rows)
        # float32 passes: the loss is a mean over 50 examples here, over 13 there (rounding)
        torch.testing.assert_close(g.a(), r.a(), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(g.g(), r.g(), rtol=1e-5, atol=1e-9)
        assert g.locations == pytest.approx(r.locations) and g.examples == pytest.approx(13)


def test_at_most_max_examples_leaves_the_capture_whole() -> None:
    net = _net()
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    mods = _layers(net)
    a = capture_factors(net, mods, [(x, y)], factors_for=list(mods), fisher="empirical")
    b = capture_factors(net, mods, [(x, y)], factors_for=list(mods), fisher="empirical", max_examples=16)
    for name in mods:
        assert b.layers[name].a_rows == a.layers[name].a_rows
        torch.testing.assert_close(b.layers[name].a(), a.layers[name].a(), rtol=0, atol=0)


def test_first_dimension_not_the_batch_keeps_locations() -> None:
    """A Linear fed ``(L, N, E)`` (sequence first): its rows are thinned along L, and
    ``T = g_rows / examples`` is still L (the examples are counted by the share kept)."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    x = torch.randn(10, 4, 6)  # L=10 tokens of N=4 examples
    cap = KFACapture({"lin": lin}, max_examples=5)  # every 2nd token
    with cap:
        cap.begin_batch()
        cap.grad_scale = 1.0
        lin(x).pow(2).sum().backward()
        assert cap.end_batch(4)
    lf = cap.layers["lin"]
    assert lf.a_rows == 5 * 4 and lf.locations == pytest.approx(10.0)
    rows = x[::2].reshape(-1, 6).double()
    torch.testing.assert_close(lf.a(), rows.T @ rows / 20)


def test_train_mode_pass_keeps_the_whole_batch_for_its_statistics() -> None:
    """In train mode a BatchNorm normalises with the batch's statistics: the pass runs whole and
    the hooks take every s-th row of what the whole batch gave."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1))
    x = torch.randn(12, 2, 5, 5) * 3 + 1
    cap = KFACapture({"2": net[2]}, a_form="patch", max_examples=4)
    net.train()
    with cap:
        capture_batch(net, cap, x, None, fisher="true", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = net[1](net[0](x))  # the whole batch's statistics
    a, rows = conv_patch_a(h[::3].double(), net[2])
    torch.testing.assert_close(cap.layers["2"].a(), a / rows)


def test_fisher_examples_is_checked() -> None:
    s = PruningSchedule(epochs={0: 0.5}, fisher_examples=8)
    assert PruningSchedule.from_any({"epochs": {0: 0.5}, "fisher_examples": 8}) == s
    for bad in (0, -1, 2.5, "8x"):
        with pytest.raises(ValueError, match="fisher_examples must be an integer ≥ 1, 'auto' or None"):
            PruningSchedule(epochs={0: 0.5}, fisher_examples=bad)
    assert PruningSchedule(epochs={0: 0.5}, fisher_examples=None).fisher_examples is None
    assert PruningSchedule(epochs={0: 0.5}).fisher_examples == "auto"
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_examples must be a positive int or None"):
            KFACapture({"l": nn.Linear(2, 2)}, max_examples=bad)
    cap = KFACapture({"l": nn.Linear(2, 2)}, max_examples=8)
    assert [cap.example_step(n) for n in (1, 8, 9, 16, 17, 50)] == [1, 1, 2, 2, 3, 7]


def _two_batches(n: int = 50) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [
        (torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)) for _ in range(2)
    ]


def test_the_thinned_pass_is_checked_once_then_taken() -> None:
    """First batch whole (hooks thin its rows) and the thinned pass checked against it; the
    second batch runs thinned. The factors are those of the kept examples either way."""
    net = _net()
    mods = _layers(net)
    batches = _two_batches()
    seen: list[int] = []
    handle = net[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    cap = KFACapture(mods, a_form="patch", max_examples=16)
    with cap:
        for x, y in batches:
            capture_batch(net, cap, x, y, fisher="empirical")
    handle.remove()
    assert cap.slices is True and seen == [50, 13, 13]  # whole, the check, thinned
    ref = capture_factors(
        net,
        mods,
        [(x[::4], y[::4]) for x, y in batches],
        factors_for=list(mods),
        a_form="patch",
        fisher="empirical",
    )
    for name in mods:
        torch.testing.assert_close(cap.layers[name].a(), ref.layers[name].a(), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(cap.layers[name].g(), ref.layers[name].g(), rtol=1e-5, atol=1e-9)


class _SequenceFirst(nn.Module):
    """Tokens ``(L, N, E)`` (torch's default layout), attention over L, mean over L → ``(N, C)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(0))


def test_a_sequence_first_input_is_never_sliced() -> None:
    """L=N=12: slicing the first dimension would drop tokens, not examples (the shapes would still
    fit). The check sees the outputs change and every batch runs whole, its rows thinned."""
    net = _SequenceFirst().eval()
    mods = {"linear1": net.layer.linear1, "head": net.head}
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(12, 12, 8, generator=gen) for _ in range(2)]
    cap = KFACapture(mods, max_examples=4)
    with cap:
        for x in batches:
            capture_batch(net, cap, x, None, generator=torch.Generator().manual_seed(0))
    assert cap.slices is False
    hooks = capture_factors(
        net, mods, batches, factors_for=list(mods), max_examples=4, forward_fn=lambda m, b: m(b)
    )  # a forward_fn always runs whole
    for name in mods:
        torch.testing.assert_close(cap.layers[name].a(), hooks.layers[name].a())
    assert cap.layers["linear1"].locations == pytest.approx(12.0)  # T: the tokens of an example


# -- KFACapture(a_columns=...): the patch-form A from every s-th output column -----------------


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [
        (3, 1, 1, 1),
        (3, 2, 1, 1),
        (1, 1, 0, 1),
        (1, 2, 0, 1),
        (3, 1, 2, 2),
        (5, 2, 2, 1),
        ((1, 3), 1, (0, 1), 1),
    ],
)
@pytest.mark.parametrize("wide", [False, True])
def test_patch_a_over_every_sth_column_is_the_gram_of_those_patches(
    kernel: int, stride: int, padding: int, dilation: int, wide: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``conv_patch_a(x, conv, (every, first))`` against the Gram of the unfolded patches of the
    output columns ``first, first + every, …``, by each of its ways: products per row lag and
    row (``wide=False``), per row lag and range of rows (``wide=True``: what a layer at least
    ``_WIDE`` wide takes at stride 1) and unfolding (1-row kernels)."""
    monkeypatch.setattr(factors, "_WIDE", 1 if wide else 10**9)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, kernel, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(3, 4, 11, 13, dtype=torch.float64)
    h_out, w_out = conv(x).shape[2:]
    patches = nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    patches = patches.reshape(3, -1, h_out, w_out)
    for every in (1, 2, 3):
        for first in range(every):
            a, rows = conv_patch_a(x, conv, (every, first))
            p = patches[..., first::every].permute(0, 2, 3, 1).reshape(-1, patches.shape[1])
            assert rows == p.shape[0] == 3 * h_out * len(range(first, w_out, every))
            torch.testing.assert_close(a, p.T @ p, rtol=1e-12, atol=1e-10)


def test_capture_thins_a_conv_columns_rotating_with_the_batch() -> None:
    """Two batches at ``a_columns=2``: the conv's ``A`` is the mean over the even columns of the
    first batch's map and the odd columns of the second's; ``G``, ``T`` and the Linear's ``A`` are
    those of the whole capture; the channel form of ``A`` ignores the setting."""
    net = _net()
    mods = _layers(net)
    batches = _two_batches(8)
    whole = capture_factors(net, mods, batches, factors_for=list(mods), a_form="patch", fisher="empirical")
    thin = capture_factors(
        net, mods, batches, factors_for=list(mods), a_form="patch", fisher="empirical", a_columns=2
    )
    sums = {"0": 0.0, "2": 0.0}
    rows = {"0": 0, "2": 0}
    with torch.no_grad():
        for b, (x, _) in enumerate(batches):
            h = net[1](net[0](x))
            for name, inp in (("0", x), ("2", h)):
                conv = mods[name]
                w_out = conv(inp).shape[3]
                p = nn.functional.unfold(
                    inp.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride
                )
                p = p.reshape(p.shape[0], p.shape[1], -1, w_out)[..., b % 2 :: 2]
                p = p.permute(0, 2, 3, 1).reshape(-1, p.shape[1])
                sums[name] = sums[name] + p.T @ p
                rows[name] += p.shape[0]
    for name in ("0", "2"):
        lf, ref = thin.layers[name], whole.layers[name]
        assert lf.a_rows == rows[name] < ref.a_rows
        torch.testing.assert_close(lf.a(), sums[name] / rows[name], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(lf.g(), ref.g(), rtol=0, atol=0)
        assert lf.locations == ref.locations
    torch.testing.assert_close(thin.layers["4"].a(), whole.layers["4"].a(), rtol=0, atol=0)
    chan = capture_factors(
        net, mods, batches, factors_for=list(mods), a_form="channel", fisher="empirical", a_columns=2
    )
    ref = capture_factors(net, mods, batches, factors_for=list(mods), a_form="channel", fisher="empirical")
    for name in mods:
        torch.testing.assert_close(chan.layers[name].a(), ref.layers[name].a(), rtol=0, atol=0)


def test_a_columns_is_checked() -> None:
    for bad in (0, -2, 1.5, True, None):
        with pytest.raises(ValueError, match="a_columns must be a positive int"):
            KFACapture({"l": nn.Linear(2, 2)}, a_columns=bad)


def test_a_map_narrower_than_a_columns_is_read_whole() -> None:
    """``a_columns=3`` on a conv whose output map is 2 wide: every column of every batch (it read
    one in two, and column 0 on two batches of three); one 3 wide (not narrower) reads one
    column a batch, each once over three batches."""
    torch.manual_seed(0)
    for width, rows_per_batch in ((2, 8 * 4 * 2), (3, 8 * 4 * 1)):
        conv = nn.Conv2d(2, 3, (1, 1))
        batches = [torch.randn(8, 2, 4, width) for _ in range(3)]
        got = capture_factors(conv, {"c": conv}, batches, factors_for=["c"], a_form="patch", a_columns=3)
        assert got.layers["c"].a_rows == 3 * rows_per_batch
        # against the brute-force mean over the columns each batch read
        picked = [x if width < 3 else x[..., b % 3 :: 3] for b, x in enumerate(batches)]
        rows = torch.cat([p.permute(0, 2, 3, 1).reshape(-1, 2) for p in picked]).double()
        torch.testing.assert_close(got.layers["c"].a(), rows.T @ rows / rows.shape[0])


@pytest.mark.parametrize("columns", [(0, 0), (3, -1), (2, 2), (2, 7), (1, 1), (2.0, 0), (True, 0), (2, None)])
def test_conv_patch_a_refuses_columns_that_select_nothing_or_are_not_integers(columns: tuple) -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with pytest.raises(ValueError, match="columns must be"):
        conv_patch_a(torch.randn(2, 2, 5, 5), conv, columns)
