"""carry_optimizer_state(): Adam moments, unknown state, untouched parameters (no Lightning)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_eigendamage import KFELayer, prune
from lightning_eigendamage.optim import carry_optimizer_state, role_transforms


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 10),
    )


def _trained(opt_cls, **kw):
    torch.manual_seed(0)
    model = _net()
    opt = opt_cls(model.parameters(), **kw)
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    old = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return model, opt, batches, old


def test_adam_moments_are_rotated_and_step_copied() -> None:
    model, opt, batches, old = _trained(torch.optim.Adam, lr=1e-3)
    changes = {}
    prune(model, batches, ratio=0.6, form="bottleneck", changes=changes)
    assert set(changes) == {"0", "2"}
    new_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    report = carry_optimizer_state(model, [opt], [new_opt], changes)
    state = {n: new_opt.state[p] for n, p in model.named_parameters() if p in new_opt.state}

    ch = changes["2"]
    p_in = ch.q_a[:, ch.kept_in].numpy()
    p_out = ch.q_g[:, ch.kept_out].numpy()
    m, v = old["2.weight"]["exp_avg"].double().numpy(), old["2.weight"]["exp_avg_sq"].double().numpy()
    want_m = np.einsum("oa,oihw,ib->abhw", p_out, m, p_in)
    want_v = np.einsum("oa,oihw,ib->abhw", p_out**2, v, p_in**2)
    np.testing.assert_allclose(state["2.core.weight"]["exp_avg"].numpy(), want_m, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(state["2.core.weight"]["exp_avg_sq"].numpy(), want_v, rtol=1e-4, atol=1e-12)
    assert (state["2.core.weight"]["exp_avg_sq"] >= 0).all()
    assert float(state["2.core.weight"]["step"]) == 3.0
    # The bias moved to rotate_out and keeps its state; the classifier keeps its state object.
    assert torch.equal(state["2.rotate_out.bias"]["exp_avg"], old["2.bias"]["exp_avg"])
    assert torch.equal(state["6.weight"]["exp_avg_sq"], old["6.weight"]["exp_avg_sq"])
    assert report.kept == 2  # 6.weight, 6.bias
    # New rotation stages of a first-time bottleneck start fresh, and are reported.
    assert "2.rotate_in.weight" not in state and "2.rotate_out.weight" not in state
    assert report.reset == {
        f"{n}.{s}.weight": "new rotation stage" for n in ("0", "2") for s in ("rotate_in", "rotate_out")
    }
    # The transplanted optimizer steps without complaint.
    x, y = batches[0]
    new_opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    new_opt.step()


def test_unknown_state_is_reset_and_reported() -> None:
    model, opt, batches, _ = _trained(torch.optim.Adamax, lr=1e-3)
    changes = {}
    prune(model, batches, ratio=0.6, form="bottleneck", changes=changes)
    new_opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
    report = carry_optimizer_state(model, [opt], [new_opt], changes)
    assert report.reset["2.core.weight"] == "no rotation rule for optimizer state 'exp_inf'"
    assert model[2].core.weight not in new_opt.state
    assert report.kept == 2
    assert "reset" in report.summary() and "exp_inf" in report.summary()


@pytest.mark.parametrize("form", ["fold_in", "fold_out", "dense"])
def test_folded_forms_of_a_plain_layer_use_the_identity_on_the_folded_side(form: str) -> None:
    model, opt, batches, old = _trained(torch.optim.SGD, lr=0.01, momentum=0.9)
    changes = {}
    prune(model, batches, ratio=0.5, form=form, changes=changes)
    ch = changes["2"]
    assert isinstance(ch.new, KFELayer) == (form != "dense")
    src, left, right = role_transforms(ch)["core"]
    assert src == "core"
    assert (left is None) == (form in ("fold_out", "dense"))
    assert (right is None) == (form in ("fold_in", "dense"))
    new_opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    carry_optimizer_state(model, [opt], [new_opt], changes)
    core = ch.new.core.weight if form != "dense" else ch.new.weight
    got = new_opt.state[core]["momentum_buffer"].double().numpy()
    m = old["2.weight"]["momentum_buffer"].double().numpy()
    lm = ch.q_g[:, ch.kept_out].numpy().T if left is not None else np.eye(m.shape[0])
    rm = ch.q_a[:, ch.kept_in].numpy() if right is not None else np.eye(m.shape[1])
    np.testing.assert_allclose(got, np.einsum("ao,oihw,ib->abhw", lm, m, rm), rtol=1e-4, atol=1e-7)
