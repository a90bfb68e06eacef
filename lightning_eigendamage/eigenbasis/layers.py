"""The pruned layer: up to three stages ``rotate_in → core → rotate_out``.

A Conv2d, Conv1d or Linear (any type registered in :mod:`~lightning_eigendamage.adapters`) with
weight ``W`` is rewritten in the Kronecker-factored eigenbasis (KFE) as
``W = Q_G · W* · Q_Aᵀ``. After removing eigen-directions it becomes

    x ─ rotate_in (1×1, C_in→r_in, weight Q_A[:, kept_in]ᵀ)
      ─ core      (original kernel/stride/padding, r_in→r_out, weight W*[kept_out, :, kept_in])
      ─ rotate_out(1×1, r_out→C_out, weight Q_G[:, kept_out], original bias)

Either rotation may be folded into the core (``form`` "fold_in" / "fold_out") when that is cheaper;
the input and output widths never change, so every consumer of the activation keeps working.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters import adapter_for, registered_names

FORMS = ("bottleneck", "fold_in", "fold_out", "dense")
_RECORD_FORMAT = "lightning_eigendamage/v1"


def form_of(has_rotate_in: bool, has_rotate_out: bool) -> str:
    """Name of the form with the given stages present."""
    if has_rotate_in and has_rotate_out:
        return "bottleneck"
    if has_rotate_out:
        return "fold_in"
    if has_rotate_in:
        return "fold_out"
    return "dense"


class KFELayer(nn.Module):
    """A Conv2d, Conv1d or Linear rewritten as ``rotate_in → core → rotate_out`` (stages may be
    absent).

    ``rotate_in`` and ``rotate_out`` are 1×1 convolutions (for convolutions) or bias-free linear
    maps (for Linear), of the core's type; the bias of the original layer lives on the last stage
    present. The module keeps an architecture record in its ``_extra_state`` (plain data), which
    :func:`lightning_eigendamage.restore_pruned` reads to rebuild the layer from a state_dict.

    Attributes:
        kind: the core's adapter kind (``"conv2d"``, ``"conv1d"`` or ``"linear"``).
        in_features / out_features: the original widths ``C_in`` / ``C_out`` (unchanged).
        rank_in / rank_out: widths of the core, ``r_in`` / ``r_out``.
    """

    # Python-side descriptions, not part of the computation: TorchScript leaves them out.
    __jit_unused_properties__ = ["form", "rank_in", "rank_out"]

    def __init__(
        self,
        rotate_in: nn.Module | None,
        core: nn.Module,
        rotate_out: nn.Module | None,
        *,
        in_features: int,
        out_features: int,
    ) -> None:
        super().__init__()
        adapter = adapter_for(core)
        if adapter is None:
            raise TypeError(f"core must be an {registered_names()}, got {type(core).__name__}")
        self.kind = adapter.kind
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rotate_in = rotate_in
        self.core = core
        self.rotate_out = rotate_out

    @property
    def form(self) -> str:
        return form_of(self.rotate_in is not None, self.rotate_out is not None)

    @property
    def rank_in(self) -> int:
        return _in_width(self.core)

    @property
    def rank_out(self) -> int:
        return _out_width(self.core)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate_in is not None:
            x = self.rotate_in(x)
        x = self.core(x)
        if self.rotate_out is not None:
            x = self.rotate_out(x)
        return x

    def get_extra_state(self) -> dict[str, Any]:
        return architecture_record(self)

    def set_extra_state(self, state: Any) -> None:
        # The structure is fixed by construction (see restore); a record that disagrees with it
        # means the weights would be loaded into the wrong architecture.
        mine = architecture_record(self)
        if not same_architecture(state, mine):
            raise ValueError(
                f"pruned-layer record {state!r} does not match this layer's architecture {mine!r}"
            )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, form={self.form}, in={self.in_features}, out={self.out_features}, "
            f"rank_in={self.rank_in}, rank_out={self.rank_out}"
        )


def _in_width(m: nn.Module) -> int:
    return adapter_for(m).widths(m)[0]


def _out_width(m: nn.Module) -> int:
    return adapter_for(m).widths(m)[1]


def architecture_record(layer: KFELayer) -> dict[str, Any]:
    """Plain-data description of a :class:`KFELayer` (safe for ``torch.load(weights_only=True)``)."""
    return {
        "format": _RECORD_FORMAT,
        "kind": layer.kind,
        "form": layer.form,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "rank_in": layer.rank_in,
        "rank_out": layer.rank_out,
        # whether the rotations train (prune(train_rotations=False) freezes them); a record
        # without the key is read as True
        "rotations_trainable": all(
            s.weight.requires_grad for s in (layer.rotate_in, layer.rotate_out) if s is not None
        ),
    }


def same_architecture(a: Any, b: Any) -> bool:
    """Whether two records describe the same layer structure (``rotations_trainable``, which
    loading does not change, is not part of it)."""
    if not (is_record(a) and is_record(b)):
        return a == b
    drop = ("rotations_trainable",)
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def is_record(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == _RECORD_FORMAT


def stage_like(template: nn.Module, c_in: int, c_out: int, *, pointwise: bool, bias: bool) -> nn.Module:
    """A module of ``template``'s type with new widths, on its device and dtype.

    ``pointwise=True`` gives a 1×1, stride-1, unpadded conv (a rotation stage); otherwise the
    template's kernel, stride, padding, dilation and padding mode are kept (the core stage).
    """
    adapter = adapter_for(template)
    if adapter is None:
        raise TypeError(f"cannot build a stage like a {type(template).__name__}")
    # The new module's default initialisation is overwritten by its caller; it must not draw from
    # the user's global random streams (dropout, shuffling and so on would shift after a prune).
    device = template.weight.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        return adapter.stage(template, c_in, c_out, pointwise=pointwise, bias=bias)


def empty_from_record(template: nn.Module, record: dict[str, Any], *, narrower: bool = False) -> KFELayer:
    """An uninitialised :class:`KFELayer` with the architecture in ``record``.

    ``template`` is the layer's original module (e.g. a Conv2d, as in a freshly built model);
    it supplies kernel size, stride, padding etc. Weights are left as initialised: load them.
    The record is checked in full (kind, widths, form, ranks between 1 and the widths) before
    anything is allocated. ``narrower``: the record's widths may be narrower than the template's
    (a layer that lost channels before it was rewritten in its eigenbasis: the checkpoint of a
    channel-pruned model); the layer is then built over a template of the record's widths.

    Raises:
        ValueError: the record does not describe a pruned layer over ``template``.
    """
    adapter = adapter_for(template)
    if adapter is None:
        raise ValueError(f"cannot rebuild a pruned layer over a {type(template).__name__}")
    kind = adapter.kind
    if record.get("kind") != kind:
        raise ValueError(f"record is for a {record.get('kind')!r} layer, model has a {kind!r} here")
    c_in, c_out = _in_width(template), _out_width(template)
    w_in, w_out = record.get("in_features"), record.get("out_features")
    if (
        narrower
        and (w_in, w_out) != (c_in, c_out)
        and all(isinstance(w, int) and not isinstance(w, bool) for w in (w_in, w_out))
        and 1 <= w_in <= c_in
        and 1 <= w_out <= c_out
        and getattr(template, "groups", 1) == 1
    ):
        template = stage_like(template, w_in, w_out, pointwise=False, bias=template.bias is not None)
        c_in, c_out = w_in, w_out
    if (w_in, w_out) != (c_in, c_out):
        raise ValueError(
            f"record widths {record.get('in_features')}→{record.get('out_features')} do not "
            f"match the model's {c_in}→{c_out}"
        )
    form = record.get("form")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r} in record")
    r_in, r_out = record.get("rank_in"), record.get("rank_out")
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in (r_in, r_out)):
        raise ValueError(f"bad ranks {r_in!r}, {r_out!r} in record")
    if r_in > c_in or r_out > c_out:  # pruning only removes directions: a corrupted record
        raise ValueError(f"ranks {r_in}, {r_out} exceed the layer's widths {c_in}→{c_out}")
    has_in = form in ("bottleneck", "fold_out")
    has_out = form in ("bottleneck", "fold_in")
    if (not has_in and r_in != c_in) or (not has_out and r_out != c_out):
        raise ValueError(f"ranks {r_in}, {r_out} are inconsistent with form {form!r}")
    bias = template.bias is not None
    rot_in = stage_like(template, c_in, r_in, pointwise=True, bias=False) if has_in else None
    core = stage_like(template, r_in, r_out, pointwise=False, bias=bias and not has_out)
    rot_out = stage_like(template, r_out, c_out, pointwise=True, bias=bias) if has_out else None
    trainable = record.get("rotations_trainable", True)
    if not isinstance(trainable, bool):
        raise ValueError(f"bad rotations_trainable {trainable!r} in record")
    for stage in (rot_in, rot_out):
        if stage is not None:
            stage.weight.requires_grad_(trainable)
    return KFELayer(rot_in, core, rot_out, in_features=c_in, out_features=c_out)
