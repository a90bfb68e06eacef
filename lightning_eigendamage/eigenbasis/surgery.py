"""Building pruned layers from a plan and swapping them into a model atomically.

A layer's current state is read as three linear maps (float64)

    R_in (d_in, C_in)  ·  core W (d_out, k², d_in)  ·  R_out (C_out, d_out)

(identities where a stage is absent; a plain Conv2d/Linear is ``R_in = R_out = I``). Given new
eigenbases ``Q_A (d_in, d_in)`` and ``Q_G (d_out, d_out)`` of the core's factors and the kept
directions, the new stages are ``R_in' = Q_A[:, kept_in]ᵀ R_in``,
``W*' = Q_G[:, kept_out]ᵀ W Q_A[:, kept_in]`` and ``R_out' = R_out Q_G[:, kept_out]``: the bases are
merged into the existing rotations, so a layer never grows beyond three stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import adapter_for
from .basis import to_kfe, weight_as_3d, weight_from_3d
from .layers import KFELayer, empty_from_record, form_of, is_record, same_architecture, stage_like


@dataclass
class LayerState:
    template: nn.Module  # the module whose kernel/stride/padding the core keeps
    c_in: int
    c_out: int
    r_in: torch.Tensor | None  # (d_in, C_in) or None for identity
    core: torch.Tensor  # (d_out, k², d_in)
    r_out: torch.Tensor | None  # (C_out, d_out) or None for identity
    bias: torch.Tensor | None  # (C_out,)

    @property
    def form(self) -> str:
        return form_of(self.r_in is not None, self.r_out is not None)


def _mat(weight: torch.Tensor) -> torch.Tensor:
    """A 1×1 conv or linear weight as a matrix ``(out, in)`` in float64."""
    return weight.detach().reshape(weight.shape[0], weight.shape[1]).to(torch.float64)


def read_state(unit: nn.Module) -> LayerState:
    """The current three-map decomposition of a plain layer (Conv2d, Conv1d, Linear) or a
    :class:`KFELayer`."""
    if isinstance(unit, KFELayer):
        core = unit.core
        bias_owner = unit.rotate_out if unit.rotate_out is not None else core
        return LayerState(
            template=core,
            c_in=unit.in_features,
            c_out=unit.out_features,
            r_in=None if unit.rotate_in is None else _mat(unit.rotate_in.weight),
            core=weight_as_3d(core.weight.detach().to(torch.float64)),
            r_out=None if unit.rotate_out is None else _mat(unit.rotate_out.weight),
            bias=None if bias_owner.bias is None else bias_owner.bias.detach(),
        )
    c_in, c_out = adapter_for(unit).widths(unit)
    return LayerState(
        template=unit,
        c_in=c_in,
        c_out=c_out,
        r_in=None,
        core=weight_as_3d(unit.weight.detach().to(torch.float64)),
        r_out=None,
        bias=None if unit.bias is None else unit.bias.detach(),
    )


def build_layer(
    state: LayerState,
    q_a: torch.Tensor,
    q_g: torch.Tensor,
    kept_in: list[int],
    kept_out: list[int],
    form: str,
    *,
    train_rotations: bool = True,
) -> nn.Module:
    """The new module for one layer (not yet installed), on the layer's device and dtype.

    Args:
        q_a: eigenvectors of the core's ``A`` ``(d_in, d_in)``; q_g: of its ``G`` ``(d_out, d_out)``.
        kept_in / kept_out: indices of kept eigen-directions (columns of ``q_a`` / ``q_g``).
        form: "bottleneck", "fold_in", "fold_out" or "dense" (a single Conv2d/Linear of the
            original widths holding the low-rank weight ``R_out W*' R_in``).
        The new conv stages keep the layer's memory format (``torch.channels_last`` or not).
        train_rotations: if False, rotation stages get ``requires_grad=False``.
    """
    tmpl = state.template
    dev, dt = tmpl.weight.device, tmpl.weight.dtype
    idx_in = torch.as_tensor(kept_in, dtype=torch.long, device=q_a.device)
    idx_out = torch.as_tensor(kept_out, dtype=torch.long, device=q_g.device)
    qa = q_a.index_select(1, idx_in).to(torch.float64)
    qg = q_g.index_select(1, idx_out).to(torch.float64)
    core = state.core.to(qa.device)
    w_star = to_kfe(core, qa, qg)  # (r_out, k², r_in)
    r_in = qa.T if state.r_in is None else qa.T @ state.r_in.to(qa.device)  # (r_in, C_in)
    r_out = qg if state.r_out is None else state.r_out.to(qg.device) @ qg  # (C_out, r_out)
    has_in = form in ("bottleneck", "fold_out")
    has_out = form in ("bottleneck", "fold_in")
    if form not in ("bottleneck", "fold_in", "fold_out", "dense"):
        raise ValueError(f"unknown form {form!r}")
    w = w_star
    if not has_in:
        w = torch.einsum("odr,rc->odc", w, r_in)
    if not has_out:
        w = torch.einsum("co,odr->cdr", r_out, w)
    with torch.no_grad():
        core_mod = stage_like(tmpl, w.shape[2], w.shape[0], pointwise=False, bias=False)
        core_mod.weight.copy_(weight_from_3d(w, core_mod).to(dev, dt))
        rot_in = rot_out = None
        if has_in:
            rot_in = stage_like(tmpl, state.c_in, r_in.shape[0], pointwise=True, bias=False)
            rot_in.weight.copy_(r_in.reshape(rot_in.weight.shape).to(dev, dt))
            rot_in.weight.requires_grad_(train_rotations)
        if has_out:
            rot_out = stage_like(
                tmpl, r_out.shape[1], state.c_out, pointwise=True, bias=state.bias is not None
            )
            rot_out.weight.copy_(r_out.reshape(rot_out.weight.shape).to(dev, dt))
            rot_out.weight.requires_grad_(train_rotations)
        last = rot_out if rot_out is not None else core_mod
        if state.bias is not None:
            if last.bias is None:
                last.bias = nn.Parameter(torch.empty(state.c_out, device=dev, dtype=dt))
            last.bias.copy_(state.bias.to(dev, dt))
    new = (
        core_mod
        if form == "dense"
        else KFELayer(rot_in, core_mod, rot_out, in_features=state.c_in, out_features=state.c_out)
    )
    if is_channels_last(tmpl.weight):
        new.to(memory_format=torch.channels_last)  # keep the model's memory format
    return new


def is_channels_last(weight: torch.Tensor) -> bool:
    """Whether a 4-d weight is stored channels-last (and not also plain contiguous)."""
    return (
        weight.dim() == 4
        and weight.is_contiguous(memory_format=torch.channels_last)
        and not weight.is_contiguous()
    )


def swap_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Install ``replacements`` (qualified name → module) all at once; on any error, none stays.

    Names are resolved before anything changes, and swaps done so far are undone if a later one
    fails, so the model is either fully updated or unchanged.
    """
    resolved = []
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if child not in parent._modules:
            raise KeyError(f"{name!r} is not a submodule of the model")
        resolved.append((parent, child, parent._modules[child], new))
    done = []
    try:
        for parent, child, old, new in resolved:
            setattr(parent, child, new)
            done.append((parent, child, old))
    except BaseException:
        for parent, child, old in reversed(done):
            setattr(parent, child, old)
        raise


def records_in(state_dict: dict) -> dict[str, dict]:
    """Pruned-layer records found in a state_dict: module name → record.

    A record is the ``_extra_state`` of a :class:`KFELayer` (see
    :func:`~lightning_eigendamage.layers.is_record`); other ``_extra_state`` values and keys that
    are not strings are not records and are left to the loading checks.
    """
    out = {}
    for key, value in state_dict.items():
        if isinstance(key, str) and key.endswith("._extra_state") and is_record(value):
            out[key[: -len("._extra_state")]] = value
    return out


def layers_for_records(
    model: nn.Module, records: dict[str, dict], *, narrower: bool = False
) -> dict[str, nn.Module]:
    """The empty pruned layers that ``records`` ask for, by name; ``model`` is not changed.

    Modules already matching their record are left out. Every record is checked against the
    module it names (kind, widths, form, ranks) before this returns, so a bad record raises here.
    ``narrower``: records may be narrower than their modules (the checkpoint of a model that
    lost channels before layers were rewritten; see :func:`~.layers.empty_from_record`).

    Raises:
        ValueError: a record names a module the model lacks, or does not fit it.
    """
    modules = dict(model.named_modules())
    replacements = {}
    for name, rec in records.items():
        mod = modules.get(name)
        if mod is None:
            raise ValueError(
                f"checkpoint has a pruned layer {name!r} that this model does not have; was it "
                "saved from another model class (or with a different prefix)?"
            )
        if isinstance(mod, KFELayer):
            if same_architecture(mod.get_extra_state(), rec):
                continue
            template = _template_of(mod)
        else:
            template = mod
        try:
            replacements[name] = empty_from_record(template, rec, narrower=narrower)
        except ValueError as err:
            raise ValueError(f"cannot restore pruned layer {name!r}: {err}") from None
        w = getattr(template, "weight", None)
        if isinstance(w, torch.Tensor) and is_channels_last(w):  # the memory format of the layer
            replacements[name] = replacements[name].to(memory_format=torch.channels_last)
    return replacements


def reshape_to_records(model: nn.Module, records: dict[str, dict]) -> dict[str, nn.Module]:
    """Replace the modules named in ``records`` with empty pruned layers of those shapes.

    Modules already matching their record are left alone. Validates every record before swapping
    anything (atomic: on an error the model is unchanged). Returns the replaced originals
    (name → old module), e.g. to undo with :func:`swap_modules`.
    """
    replacements = layers_for_records(model, records)
    old = {name: model.get_submodule(name) for name in replacements}
    swap_modules(model, replacements)
    return old


def _template_of(layer: KFELayer) -> nn.Module:
    """A module of the layer's original widths with the core's kernel settings (for reshaping)."""
    core = layer.core
    tmpl = stage_like(core, layer.in_features, layer.out_features, pointwise=False, bias=False)
    last = layer.rotate_out if layer.rotate_out is not None else core
    if last.bias is not None:
        tmpl.bias = nn.Parameter(torch.empty(layer.out_features))
    return tmpl
