"""Conv1d (text and audio models) gets everything Conv2d has: factors against a brute-force
definition, function preservation with forced forms, restore with weights_only, optimizer
transplant, and a text classifier pruned to half its FLOPs."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_eigendamage import KFELayer, prune, restore_pruned
from lightning_eigendamage.curvature import capture_factors
from lightning_eigendamage.optim import carry_optimizer_state

CASES = {
    "stride2_pad1": dict(kernel_size=3, stride=2, padding=1),
    "dilation2_same": dict(kernel_size=3, dilation=2, padding="same"),
    "even_kernel_same": dict(kernel_size=4, padding="same"),
    "valid_stride3": dict(kernel_size=5, stride=3, padding=0),
    "pointwise_stride2": dict(kernel_size=1, stride=2),
    "reflect_pad": dict(kernel_size=3, padding=2, padding_mode="reflect"),
    "circular_stride2": dict(kernel_size=3, stride=2, padding=1, padding_mode="circular"),
}


def _pad_1d(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """Pad ``x`` ``(N, C, L)`` as ``conv`` does, from the definitions (not with the library)."""
    (k,), (d,) = conv.kernel_size, conv.dilation
    if conv.padding == "same":
        total = d * (k - 1)
        lo, hi = total // 2, total - total // 2
    elif conv.padding == "valid":
        lo = hi = 0
    else:
        lo = hi = conv.padding[0]
    mode = {"zeros": "constant"}.get(conv.padding_mode, conv.padding_mode)
    return F.pad(x, (lo, hi), mode=mode)


def _brute_factors(model: nn.Module, conv: nn.Conv1d, batches, seed: int):
    """Channel-form A (every read of every offset, padded reads included) and G, by explicit
    loops over offsets and locations and autograd per batch, true Fisher with ``seed``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
    a_tot = g_tot = 0.0
    a_rows = g_rows = 0
    for x, _ in batches:
        store: dict = {}

        def hook(m, i, o, store=store):
            store.update(x=i[0].detach(), s=o)

        h = conv.register_forward_hook(hook)
        logits = model(x)
        h.remove()
        y = torch.multinomial(torch.softmax(logits.detach().float(), -1), 1, generator=gen).squeeze(1)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), store["s"])
        xp = _pad_1d(conv, store["x"]).double()
        l_out = grad.shape[2]
        for t in range(l_out):
            for delta in range(k):
                a = xp[:, :, t * s + delta * d]  # (N, C_in)
                a_tot = a_tot + a.T @ a
                a_rows += a.shape[0]
        dr = grad.permute(0, 2, 1).reshape(-1, grad.shape[1]).double()
        g_tot = g_tot + dr.T @ dr
        g_rows += dr.shape[0]
    return a_tot / a_rows, g_tot / g_rows


class _Head(nn.Module):
    def __init__(self, conv_kwargs: dict, length: int = 17) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, **conv_kwargs)
        with torch.no_grad():
            h = self.conv(torch.zeros(1, 4, length))
        self.fc = nn.Linear(h.numel(), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv1d_factors_match_brute_force(case: str) -> None:
    torch.manual_seed(0)
    model = _Head(CASES[case])
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(5, 4, 17, generator=g), torch.zeros(5, dtype=torch.long)) for _ in range(2)]
    res = capture_factors(
        model,
        {"conv": model.conv, "fc": model.fc},
        batches,
        factors_for=["conv", "fc"],
        generator=torch.Generator().manual_seed(7),
    )
    a_ref, g_ref = _brute_factors(model, model.conv, batches, seed=7)
    lf = res.layers["conv"]
    torch.testing.assert_close(lf.a().double(), a_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lf.g().double(), g_ref, rtol=1e-5, atol=1e-9)
    l_out = model.conv(batches[0][0]).shape[2]
    assert lf.locations == pytest.approx(l_out)
    assert (lf.geometry.loc_in, lf.geometry.loc_out, lf.geometry.k2) == (17, l_out, model.conv.kernel_size[0])


class TextCNN(nn.Module):
    """Token ids ``(N, T)`` → embedding → three Conv1d (padding, dilation, stride) → max pool → head."""

    def __init__(self, vocab: int = 50, dim: int = 24, width: int = 32, n_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.convs = nn.Sequential(
            nn.Conv1d(dim, width, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, dilation=2, padding="same"),
            nn.ReLU(inplace=True),
            nn.Conv1d(width, width, 3, stride=2, padding=1, bias=False),
            nn.ReLU(),
        )
        self.head = nn.Linear(width, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.convs(self.embed(tokens).transpose(1, 2))
        return self.head(h.amax(2))


def _text_batches(n_batches: int = 3, n: int = 8, t: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 50, (n, t), generator=g), torch.randint(0, 4, (n,), generator=g))
        for _ in range(n_batches)
    ]


@pytest.mark.parametrize("form", ["bottleneck", "fold_in", "fold_out"])
def test_forced_forms_preserve_the_function_at_ratio_0(form: str) -> None:
    torch.manual_seed(0)
    model = TextCNN().eval()
    dense = copy.deepcopy(model)
    batches = _text_batches()
    report = prune(model, batches, ratio=0.0, form=form)
    rebuilt = [r for r in report.layers if r.skipped is None]
    assert {r.name for r in rebuilt} == {"convs.0", "convs.2", "convs.4"}
    for r in rebuilt:
        layer = model.get_submodule(r.name)
        assert isinstance(layer, KFELayer) and layer.kind == "conv1d" and layer.form == form
        stages = [m for m in (layer.rotate_in, layer.core, layer.rotate_out) if m is not None]
        assert all(isinstance(m, nn.Conv1d) for m in stages)
    x = batches[0][0]
    with torch.no_grad():
        out, ref = model(x), dense(x)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_text_classifier_pruned_to_half_its_flops() -> None:
    torch.manual_seed(0)
    model = TextCNN()
    report = prune(model, _text_batches(), ratio=0.5, target="flops")
    assert report.target_reached
    assert report.flops_after <= 0.505 * report.flops_before
    assert report.flops_compression >= 1.98
    reasons = {r.name: r.skipped for r in report.layers}
    assert reasons["embed"].startswith("embedding lookup")  # listed, with the reason
    assert reasons["head"] == "last layer (exempt_last=True)"
    assert any(isinstance(m, KFELayer) for m in model.modules())
    x = _text_batches(1)[0][0]
    assert torch.isfinite(model(x)).all()


def test_recurrent_layers_are_listed_as_not_pruned() -> None:
    class Rnn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.gru, self.lstm = (
                nn.Embedding(30, 8),
                nn.GRU(8, 8, batch_first=True),
                nn.LSTM(8, 8),
            )
            self.mid, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            h, _ = self.gru(self.embed(t))
            h, _ = self.lstm(h)
            return self.head(torch.relu(self.mid(h[:, -1])))

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 30, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g))]
    report = prune(Rnn(), batches, ratio=0.5)
    reasons = {r.name: r.skipped for r in report.layers}
    assert reasons["gru"].startswith("recurrent layer") and reasons["lstm"].startswith("recurrent layer")
    assert reasons["embed"].startswith("embedding lookup")
    assert reasons["mid"] is None


def test_restore_pruned_conv1d_with_weights_only() -> None:
    torch.manual_seed(0)
    model = TextCNN()
    fresh = copy.deepcopy(model)
    batches = _text_batches()
    prune(model, batches, ratio=0.5)
    prune(model, batches, ratio=0.3)
    assert any(isinstance(m, KFELayer) for m in model.modules())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    restore_pruned(fresh, torch.load(buf, weights_only=True))
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_sgd_momentum_of_a_conv1d_core_is_rotated_like_its_weight() -> None:
    """``M' = Q_G[:, kept_out]ᵀ M Q_A[:, kept_in]`` at every kernel offset, computed here with
    einsum on the ``(C_out, C_in, k)`` layout."""
    torch.manual_seed(0)
    model = TextCNN()
    batches = _text_batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    old_momentum = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters()}
    changes: dict = {}
    prune(model, batches, ratio=0.5, form="bottleneck", changes=changes)
    new_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    carry_optimizer_state(model, [opt], [new_opt], changes)
    assert changes
    for name, change in changes.items():
        m = old_momentum[f"{name}.weight"].double()  # (C_out, C_in, k)
        qa = change.q_a[:, change.kept_in].double()
        qg = change.q_g[:, change.kept_out].double()
        want = torch.einsum("oa,oik,ib->abk", qg, m, qa)
        got = new_opt.state[change.new.core.weight]["momentum_buffer"].double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
