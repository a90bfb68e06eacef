"""What a pruning call decided, as data: between deciding (:func:`~lightning_eigendamage.decide`)
and doing (:func:`~lightning_eigendamage.apply`).

A :class:`Plan` holds one :class:`LayerPlan` per scored layer (the eigen-directions kept on each
side, the form, the planned cost) and the threshold bookkeeping. It is frozen and converts to
and from plain data (``to_dict`` / ``from_dict``), so it can be logged, broadcast to other
processes or stored. :class:`LayerChange` is what applying a plan did to one layer, with live
modules and tensors (used to carry optimizer state over), so it is not plain data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one layer.

    ``kept_in`` / ``kept_out``: indices (ascending) of the kept eigen-directions of the core's
    ``A`` / ``G`` (all of them on a side whose rotation is folded into the core); ``form``: the
    layer's form afterwards (``"bottleneck"``, ``"fold_in"``, ``"fold_out"``, ``"dense"``);
    ``changed``: whether the layer is rebuilt (False: left as it is, e.g. no cheaper form);
    ``params`` / ``flops``: the layer's planned cost afterwards (per example, 2 FLOPs per MAC).
    """

    name: str
    kept_in: tuple[int, ...]
    kept_out: tuple[int, ...]
    form: str
    changed: bool
    params: int
    flops: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kept_in"], d["kept_out"] = list(self.kept_in), list(self.kept_out)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerPlan:
        return cls(
            name=str(d["name"]),
            kept_in=tuple(int(i) for i in d["kept_in"]),
            kept_out=tuple(int(i) for i in d["kept_out"]),
            form=str(d["form"]),
            changed=bool(d["changed"]),
            params=int(d["params"]),
            flops=int(d["flops"]),
        )


@dataclass(frozen=True)
class Plan:
    """Decisions for every scored layer of one pruning call.

    ``target`` / ``ratio``: what was asked (``"directions"``: ``ratio`` is the quantile of the
    pooled scores; ``"params"`` / ``"flops"``: the fraction to remove); ``quantile``: the
    quantile the decision used (found by bisection for params/flops); ``threshold``: the pooled
    score at that quantile.
    """

    layers: tuple[LayerPlan, ...]
    target: str
    ratio: float
    quantile: float
    threshold: float = field(default=float("nan"))

    def __getitem__(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [lp.to_dict() for lp in self.layers],
            "target": self.target,
            "ratio": self.ratio,
            "quantile": self.quantile,
            "threshold": self.threshold,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(
            layers=tuple(LayerPlan.from_dict(x) for x in d["layers"]),
            target=str(d["target"]),
            ratio=float(d["ratio"]),
            quantile=float(d["quantile"]),
            threshold=float(d["threshold"]),
        )


@dataclass
class LayerChange:
    """How applying a plan rewrote one layer (live modules and tensors: not for checkpoints).

    The old core weight ``W`` ``(d_out, k², d_in)`` became ``W*' = Q_G[:, kept_out]ᵀ W Q_A[:, kept_in]``,
    the rotations ``R_in' = Q_A[:, kept_in]ᵀ R_in`` and ``R_out' = R_out Q_G[:, kept_out]`` (see
    :mod:`lightning_eigendamage.surgery`), then folded according to ``form``.
    """

    old: nn.Module  # the unit before the call: a plain layer or KFELayer
    new: nn.Module  # its installed replacement
    q_a: torch.Tensor  # (d_in, d_in) eigenvectors of the core's A, float64
    q_g: torch.Tensor  # (d_out, d_out) eigenvectors of the core's G, float64
    kept_in: list[int]
    kept_out: list[int]
    form: str
