"""Carrying optimizer state (momentum, Adam moments) over a pruning round.

After :func:`~lightning_eigendamage.prune` rebuilt some layers, the optimizers are rebuilt from
scratch. This module fills the new optimizers' per-parameter state from the old ones:

- A parameter that was not rebuilt (same ``nn.Parameter`` object: other layers, BatchNorm, …)
  keeps its state exactly (the same state dict).
- A rebuilt layer's tensors get the state of the tensor they come from, transformed like the
  weights. With ``P_in = Q_A[:, kept_in]`` ``(d_in, r_in)`` and ``P_out = Q_G[:, kept_out]``
  ``(d_out, r_out)`` (:class:`~lightning_eigendamage.pruner.LayerChange`):

  - core ``W (d_out, k², d_in)``: ``M' = P_outᵀ M P_in`` for every kernel offset, i.e. the state
    is rotated into the eigenbasis and sliced exactly like ``W* = Q_Gᵀ W Q_A``. A side whose
    rotation is folded into the core uses the identity if the old layer had no rotation on that
    side (the folded core's gradient is then the old one on that side);
  - ``rotate_in`` ``R_in (d_in, C_in)``: ``M' = P_inᵀ M``; ``rotate_out`` ``R_out (C_out, d_out)``:
    ``M' = M P_out`` (only when the old layer had that stage);
  - the bias: copied (its value is unchanged).

  Because ``P_in``, ``P_out`` have orthonormal columns, a linear state (a sum of past gradients:
  SGD's ``momentum_buffer``, Adam's ``exp_avg``) transformed this way is exactly the sum of the
  past gradients projected into the new coordinates. A second-moment state (Adam's
  ``exp_avg_sq``, RMSprop's ``square_avg``, Adagrad's ``sum``) is an elementwise mean of squares,
  which a rotation does not determine; it is mapped with the squared matrices
  (``V' = (P_out∘P_out)ᵀ V (P_in∘P_in)``), exact when the old gradient coordinates are
  uncorrelated and always a convex mix of old second moments, so step sizes stay on scale.
  Scalars (``step``) are copied.

- State is **reset** (the tensor starts fresh, like a new parameter) where no transform exists:
  a new rotation stage of a layer that had none (``rotate_in``/``rotate_out`` of a first-time
  bottleneck), a core whose folded side had a rotation before, and any optimizer state this
  module does not know (e.g. Adamax's ``exp_inf``) or whose shape differs from the parameter's.
  Resets are listed in the returned :class:`TransplantReport`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .eigenbasis.basis import weight_as_3d, weight_from_3d
from .eigenbasis.layers import KFELayer
from .eigenbasis.plan import LayerChange

LINEAR_KEYS = frozenset({"momentum_buffer", "exp_avg", "grad_avg"})
SQUARE_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"})


@dataclass
class TransplantReport:
    """What happened to each trainable tensor's optimizer state (plain data via ``to_dict``).

    ``kept``: parameters not rebuilt (state carried as is); ``carried``: rebuilt tensors whose
    state was rotated/sliced or copied; ``reset``: rebuilt tensors starting with fresh state,
    name → reason. Tensors whose source had no state yet are in neither ``carried`` nor ``reset``.
    """

    kept: int = 0
    carried: list[str] = field(default_factory=list)
    reset: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "carried": list(self.carried), "reset": dict(self.reset)}

    def summary(self) -> str:
        text = f"optimizer state: {self.kept} tensors kept, {len(self.carried)} rotated/carried"
        if self.reset:
            reasons: dict[str, list[str]] = {}
            for name, why in self.reset.items():
                reasons.setdefault(why, []).append(name)
            parts = [f"{why}: {', '.join(names)}" for why, names in reasons.items()]
            text += f", {len(self.reset)} reset ({'; '.join(parts)})"
        return text


def stage_parameters(unit: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of a plain Conv2d/Linear or a :class:`KFELayer` by role.

    Roles: ``"core"`` (the kernel weight), ``"rin"`` / ``"rout"`` (rotation weights, if present),
    ``"bias"`` (on the last stage, if any).
    """
    if isinstance(unit, KFELayer):
        roles = {"core": unit.core.weight}
        if unit.rotate_in is not None:
            roles["rin"] = unit.rotate_in.weight
        if unit.rotate_out is not None:
            roles["rout"] = unit.rotate_out.weight
        last = unit.rotate_out if unit.rotate_out is not None else unit.core
    else:
        roles = {"core": unit.weight}
        last = unit
    if last.bias is not None:
        roles["bias"] = last.bias
    return roles


# A transform: (source role, left (r_out, d_out) or None, right (d_in, r_in) or None), or a reason.
_Transform = tuple[str, torch.Tensor | None, torch.Tensor | None]


def role_transforms(change: LayerChange) -> dict[str, _Transform | str]:
    """For each role of the new layer: where its state comes from and how, or why it is reset.

    The matrices act on the 3-d view ``(rows, k², cols)`` of a weight (``weight_as_3d``; a
    rotation ``(out, in)`` is ``(out, 1, in)``): ``M' = left · M · right``, identity where None.
    """
    old, new = stage_parameters(change.old), stage_parameters(change.new)
    p_in = change.q_a[:, change.kept_in]  # (d_in, r_in)
    p_out = change.q_g[:, change.kept_out]  # (d_out, r_out)
    out: dict[str, _Transform | str] = {}
    for role in new:
        if role == "core":
            if "rout" in new:
                left = p_out.T
            elif "rout" not in old:
                left = None
            else:
                out[role] = "core absorbed the old rotate_out (state not separable)"
                continue
            if "rin" in new:
                right = p_in
            elif "rin" not in old:
                right = None
            else:
                out[role] = "core absorbed the old rotate_in (state not separable)"
                continue
            out[role] = ("core", left, right)
        elif role == "rin":
            out[role] = ("rin", p_in.T, None) if "rin" in old else "new rotation stage"
        elif role == "rout":
            out[role] = ("rout", None, p_out) if "rout" in old else "new rotation stage"
        else:
            out[role] = ("bias", None, None) if "bias" in old else "new bias"
    return out


def _as_3d(t: torch.Tensor, role: str) -> torch.Tensor:
    if role == "bias":
        return t.reshape(1, 1, -1)
    if role == "core":
        return weight_as_3d(t)
    return t.reshape(t.shape[0], 1, t.shape[1])  # a 1×1 conv or linear rotation (out, in)


def _apply(
    t: torch.Tensor,
    role: str,
    left: torch.Tensor | None,
    right: torch.Tensor | None,
    like: nn.Parameter,
    like_module: nn.Module | None,
    square: bool,
) -> torch.Tensor:
    """``left · t · right`` on the 3-d view (squared matrices if ``square``), shaped like ``like``."""
    x = _as_3d(t.detach().to(torch.float64), role)
    if left is not None:
        lm = left.to(x.device, torch.float64)
        lm = lm * lm if square else lm
        x = (lm @ x.reshape(x.shape[0], -1)).reshape(lm.shape[0], x.shape[1], x.shape[2])
    if right is not None:
        rm = right.to(x.device, torch.float64)
        rm = rm * rm if square else rm
        x = x @ rm
    if role == "core" and like_module is not None:
        x = weight_from_3d(x, like_module)
    return x.reshape(like.shape).to(device=t.device, dtype=t.dtype).contiguous()


def _transform_state(
    state: Mapping[str, Any], src: nn.Parameter, fn: Callable[[torch.Tensor, bool], torch.Tensor]
) -> tuple[dict[str, Any] | None, str | None]:
    new: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape != src.shape:
                return None, f"optimizer state {key!r} is not shaped like its parameter"
            if key in LINEAR_KEYS:
                new[key] = fn(value, False)
            elif key in SQUARE_KEYS:
                new[key] = fn(value, True)
            else:
                return None, f"no rotation rule for optimizer state {key!r}"
        elif isinstance(value, torch.Tensor):
            new[key] = value.clone()
        else:
            new[key] = value
    return new, None


def _holds_whole_model_state(opt: Optimizer) -> bool:
    """Whether ``opt`` keeps state over all its parameters as one vector (``LBFGS``: its
    directions and previous gradient are flat vectors of every parameter, under the first one)."""
    return isinstance(opt, torch.optim.LBFGS)


_WHOLE_MODEL = (
    "LBFGS keeps its history as vectors over all the parameters, whose length changed: it starts again"
)


def _reset_whole_model(opt: Optimizer, old_optimizers: Sequence[Optimizer], report: TransplantReport) -> None:
    """Record that ``opt`` (:func:`_holds_whole_model_state`) starts without state, where the
    optimizer it replaces had some."""
    if any(_holds_whole_model_state(o) and any(o.state.values()) for o in old_optimizers):
        report.reset[type(opt).__name__] = _WHOLE_MODEL


def carry_optimizer_state(
    model: nn.Module,
    old_optimizers: Sequence[Optimizer],
    new_optimizers: Sequence[Optimizer],
    changes: Mapping[str, LayerChange],
) -> TransplantReport:
    """Fill ``new_optimizers``' state from ``old_optimizers`` across the rebuilt layers.

    Args:
        model: the pruned model (for parameter names in the report).
        old_optimizers: the optimizers from before the pruning round (holding the old tensors).
        new_optimizers: freshly built optimizers over the pruned model's parameters; their
            state is written in place.
        changes: what :func:`~lightning_eigendamage.prune` did (``prune(..., changes=...)``).

    Returns:
        A :class:`TransplantReport` (see the module docstring for the rules).
    """
    old_state: dict[int, tuple[nn.Parameter, dict]] = {}
    for opt in old_optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if p in opt.state and opt.state[p]:
                    old_state[id(p)] = (p, opt.state[p])
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    origin: dict[int, tuple[str, LayerChange, str, _Transform | str]] = {}
    for layer, change in changes.items():
        new_roles = stage_parameters(change.new)
        transforms = role_transforms(change)
        for role, param in new_roles.items():
            origin[id(param)] = (layer, change, role, transforms[role])

    report = TransplantReport()
    for opt in new_optimizers:
        if _holds_whole_model_state(opt):
            _reset_whole_model(opt, old_optimizers, report)
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in old_state:
                    opt.state[p] = old_state[id(p)][1]
                    report.kept += 1
                    continue
                if id(p) not in origin:
                    continue
                layer, change, role, how = origin[id(p)]
                name = names.get(id(p), f"{layer}.{role}")
                old_params = stage_parameters(change.old)
                if isinstance(how, str):
                    if any(id(q) in old_state for q in old_params.values()):
                        report.reset[name] = how
                    continue
                src_role, left, right = how
                src = old_params[src_role]
                if id(src) not in old_state:
                    continue
                new_module = change.new.core if isinstance(change.new, KFELayer) else change.new

                def fn(t: torch.Tensor, square: bool, _p=p, _r=src_role, _l=left, _rt=right, _m=new_module):
                    return _apply(t, _r, _l, _rt, _p, _m, square)

                state, why = _transform_state(old_state[id(src)][1], src, fn)
                if state is None:
                    report.reset[name] = why
                    continue
                opt.state[p] = state
                report.carried.append(name)
    return report


def carry_sliced_state(
    model: nn.Module,
    old_optimizers: Sequence[Optimizer],
    new_optimizers: Sequence[Optimizer],
    slices: Mapping[str, tuple[nn.Parameter, nn.Parameter, torch.Tensor]],
) -> TransplantReport:
    """Fill ``new_optimizers``' state from ``old_optimizers`` across a channel cut.

    Args:
        slices: parameter name → ``(old, new, index)``: ``new`` holds the elements of ``old`` at
            the flat positions ``index`` (``(new.numel(),)``, int64), as
            :func:`~lightning_eigendamage.channels.cut_channels` reports them.

    Every state tensor shaped like the old parameter (SGD's momentum, Adam's moments, any other
    per-element state) is sliced exactly like the parameter: ``s' = s.flatten()[index]``, which is
    exact for every elementwise optimizer (each element's state depends on that element's
    gradients only). Scalars (``step``) are copied; state of another shape is a reset (listed in
    the report). Parameters not in ``slices`` keep their state (the same state dict).
    """
    old_state: dict[int, dict] = {}
    for opt in old_optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if p in opt.state and opt.state[p]:
                    old_state[id(p)] = opt.state[p]
    origin = {id(new): (name, old, index) for name, (old, new, index) in slices.items()}
    report = TransplantReport()
    for opt in new_optimizers:
        if _holds_whole_model_state(opt):
            _reset_whole_model(opt, old_optimizers, report)
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in origin:
                    if id(p) in old_state:
                        opt.state[p] = old_state[id(p)]
                        report.kept += 1
                    continue
                name, old, index = origin[id(p)]
                if id(old) not in old_state:
                    continue
                new_state: dict[str, Any] = {}
                why = None
                for key, value in old_state[id(old)].items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        if value.shape != old.shape:
                            why = f"optimizer state {key!r} is not shaped like its parameter"
                            break
                        idx = index.to(value.device)
                        new_state[key] = value.reshape(-1)[idx].reshape(p.shape).clone()
                    elif isinstance(value, torch.Tensor):
                        new_state[key] = value.clone()
                    else:
                        new_state[key] = value
                if why is not None:
                    report.reset[name] = why
                    continue
                opt.state[p] = new_state
                report.carried.append(name)
    return report


def group_origins(
    old: Optimizer,
    new: Optimizer,
    replaced: Sequence[tuple[str, Sequence[nn.Parameter], Sequence[nn.Parameter]]],
) -> list[list[int]]:
    """For each param group of the rebuilt optimizer ``new``, the groups of ``old`` its parameters
    come from, in the order met: the old group of a parameter kept as it was, or, for a pruned
    layer's new parameter, that of the layer's first old parameter ``old`` held (``replaced``:
    per changed layer, its old and new parameters). Empty for a group of new parameters only."""
    owner = {id(p): j for j, g in enumerate(old.param_groups) for p in g["params"]}
    origin: dict[int, int] = {}
    for _, before, after in replaced:
        j = next((owner[id(p)] for p in before if id(p) in owner), None)
        if j is not None:
            for p in after:
                origin.setdefault(id(p), j)
    out = []
    for group in new.param_groups:
        found = [owner.get(id(p), origin.get(id(p))) for p in group["params"]]
        out.append(list(dict.fromkeys(j for j in found if j is not None)))
    return out


def group_map(
    old: Optimizer,
    new: Optimizer,
    replaced: Sequence[tuple[str, Sequence[nn.Parameter], Sequence[nn.Parameter]]],
) -> list[int] | None:
    """For each param group of the rebuilt optimizer ``new``, the group of ``old`` it continues:
    the first of its :func:`group_origins`. None where some new group has none (its
    hyperparameters cannot be told)."""
    origins = group_origins(old, new, replaced)
    return None if any(not o for o in origins) else [o[0] for o in origins]


def remap_group_lists(state: dict[str, Any], mapping: list[int], n_old: int) -> dict[str, Any]:
    """An LR scheduler's ``state_dict`` with every per-group list (``base_lrs``, ``_last_lr``,
    ``min_lrs``, ``lr_lambdas``, …: a list of ``n_old`` entries) re-indexed to the rebuilt
    optimizer's groups (``mapping``: :func:`group_map`); the rest as it is."""
    return {
        k: [v[j] for j in mapping] if isinstance(v, list) and len(v) == n_old else v for k, v in state.items()
    }
