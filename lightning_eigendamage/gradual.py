"""Gradual removal in the eigenbasis: a growing penalty on the coordinates a prune will cut.

For ``steps`` optimizer steps before a prune point, the
:class:`~lightning_eigendamage.EigenDamagePruning` callback (option ``gradual=``) adds to each
affected weight's gradient the gradient of

    P(W) = λ_t/2 · Σ_δ ‖M ⊙ (Q_Gᵀ W3[:, δ, :] Q_A)‖²_F

where ``W3`` ``(d_out, k², d_in)`` is the layer's core weight in its 3-d view
(:func:`~lightning_eigendamage.eigenbasis.weight_as_3d`), ``Q_A`` ``(d_in, d_in)`` and ``Q_G``
``(d_out, d_out)`` are the eigenbases of its K-FAC factors (columns), and ``M`` ``(d_out, 1,
d_in)`` marks the eigen-coordinates the current plan removes: ``M[i, ·, j] = 1`` when output
direction ``i`` or input direction ``j`` is removed (EigenDamage removes whole rows and columns of
``W* = Q_Gᵀ W Q_A``), else 0. Since ``M`` is binary and the bases are orthogonal,

    ∂P/∂W3[:, δ, :] = λ_t · Q_G (M ⊙ W*[:, δ, :]) Q_Aᵀ

reshaped back to the weight's own layout. The network thus moves its function off those
coordinates before they are cut (the idea of GReg, Wang et al., *Neural Pruning via Growing
Regularization*, ICLR 2021, applied in the Kronecker-factored eigenbasis).

``λ_t`` grows linearly over the window: at the ``t``-th optimizer step of the window
(``t = 1 … steps``), ``λ_t = penalty · t / steps`` (GReg's fixed increments up to a ceiling, with
increment ``penalty / steps`` per step and ceiling ``penalty``).

This module is plain tensor maths and settings; it never imports Lightning. Shapes depend only on
the weight's dimensions, so the same code serves every registered layer type (Linear
``(C_out, C_in)``, Conv1d ``(C_out, C_in, k)``, Conv2d ``(C_out, C_in, kh, kw)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .eigenbasis.basis import to_kfe, weight_as_3d
from .values import as_int, as_real


@dataclass(frozen=True)
class GradualRemoval:
    """Settings of gradual removal before each prune point (``EigenDamagePruning(gradual=...)``).

    Args:
        steps: optimizer steps before each prune point during which the penalty applies (an
            integer ≥ 1). The window of a point that prunes after optimizer step ``S`` covers
            steps ``S − steps + 1 … S``; its plan is made from factors captured on training
            batches of the steps just before the window.
        penalty: the ceiling ``λ_max > 0`` of the penalty strength, reached on the window's last
            step (``λ_t = penalty · t / steps``). It is in units of the loss per squared weight:
            with plain SGD at learning rate ``η`` the marked coordinates shrink by about
            ``η·λ_t`` of their value per step (more with momentum), so ``η · penalty`` well below
            2 keeps the update stable.

    Raises:
        TypeError: ``steps`` not an int, ``penalty`` not a real number.
        ValueError: ``steps < 1``; ``penalty`` not finite or not positive.
    """

    steps: int
    penalty: float

    def __post_init__(self) -> None:
        steps = as_int(self.steps)
        if steps is None:
            raise TypeError(
                f"GradualRemoval(steps=...) must be an int (optimizer steps before each prune "
                f"point), got {type(self.steps).__name__} {self.steps!r}"
            )
        if steps < 1:
            raise ValueError(f"GradualRemoval(steps=...) must be ≥ 1, got {steps}")
        object.__setattr__(self, "steps", steps)
        p = as_real(self.penalty)
        if p is None:
            raise TypeError(
                f"GradualRemoval(penalty=...) must be a real number, got {type(self.penalty).__name__} "
                f"{self.penalty!r}"
            )
        if not math.isfinite(p) or p <= 0:
            raise ValueError(
                f"GradualRemoval(penalty=...) must be a finite number > 0 (the ceiling of the "
                f"penalty strength), got {p!r}"
            )
        object.__setattr__(self, "penalty", float(p))

    def strength(self, t: int) -> float:
        """``λ_t = penalty · clamp(t, 0, steps) / steps`` for the ``t``-th step of the window
        (``t = 1`` is the first; 0 before the window; ``penalty`` from step ``steps`` on)."""
        return self.penalty * min(max(int(t), 0), self.steps) / self.steps


def marked_mask(
    d_in: int,
    d_out: int,
    removed_in: Sequence[int],
    removed_out: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``M`` ``(d_out, 1, d_in)``: 1 where output direction ``i ∈ removed_out`` or input direction
    ``j ∈ removed_in``, else 0 (broadcasts over the ``k²`` kernel offsets of ``W*``)."""
    rows = torch.zeros(d_out, dtype=torch.bool, device=device)
    cols = torch.zeros(d_in, dtype=torch.bool, device=device)
    if len(removed_out):
        rows[torch.as_tensor(list(removed_out), dtype=torch.long, device=device)] = True
    if len(removed_in):
        cols[torch.as_tensor(list(removed_in), dtype=torch.long, device=device)] = True
    return (rows[:, None, None] | cols[None, None, :]).to(dtype)


def removed_directions(kept: Sequence[int], width: int) -> tuple[int, ...]:
    """The directions ``0 … width−1`` not in ``kept`` (ascending)."""
    keep = set(int(i) for i in kept)
    return tuple(i for i in range(width) if i not in keep)


def bases_fit(weight: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor) -> bool:
    """Whether ``Q_A`` is ``(d_in, d_in)`` and ``Q_G`` ``(d_out, d_out)`` for ``weight``'s 3-d view
    ``(d_out, k², d_in)`` (a weight of at least 2 dimensions)."""
    if weight.dim() < 2:
        return False
    d_out, d_in = weight.shape[0], weight.shape[1]
    return tuple(q_a.shape) == (d_in, d_in) and tuple(q_g.shape) == (d_out, d_out)


def _check(weight: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, mask: torch.Tensor) -> None:
    w3 = weight_as_3d(weight)
    d_out, _, d_in = w3.shape
    if q_a.shape != (d_in, d_in) or q_g.shape != (d_out, d_out) or mask.shape != (d_out, 1, d_in):
        raise ValueError(
            f"a weight of shape {tuple(weight.shape)} (3-d view {tuple(w3.shape)}) needs Q_A "
            f"({d_in}, {d_in}), Q_G ({d_out}, {d_out}) and a mask ({d_out}, 1, {d_in}); got "
            f"{tuple(q_a.shape)}, {tuple(q_g.shape)} and {tuple(mask.shape)}"
        )


def _from_3d(w3: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`~lightning_eigendamage.eigenbasis.weight_as_3d` for a weight of ``shape``."""
    kernel = tuple(shape[2:])
    if not kernel:
        return w3.squeeze(1)
    c_out, _, c_in = w3.shape
    nd = len(kernel)
    return w3.reshape(c_out, *kernel, c_in).permute(0, nd + 1, *range(1, nd + 1))


def marked_coordinates(
    weight: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``M ⊙ W*`` ``(d_out, k², d_in)``, with ``W*[:, δ, :] = Q_Gᵀ W3[:, δ, :] Q_A``.

    Computed in the dtype of ``q_a`` (the weight is cast to it)."""
    _check(weight, q_a, q_g, mask)
    w3 = weight_as_3d(weight.detach().to(q_a.dtype))
    return to_kfe(w3, q_a, q_g) * mask.to(q_a.dtype)


def marked_norm(weight: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, mask: torch.Tensor) -> float:
    """``‖M ⊙ W*‖_F``: how much of the weight still lies on the marked eigen-coordinates."""
    return float(marked_coordinates(weight, q_a, q_g, mask).norm())


def penalty_value(
    weight: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, mask: torch.Tensor, lam: float
) -> float:
    """``λ/2 · ‖M ⊙ W*‖²_F`` (summed over the kernel offsets)."""
    return 0.5 * float(lam) * float(marked_coordinates(weight, q_a, q_g, mask).pow(2).sum())


def penalty_grad(
    weight: torch.Tensor, q_a: torch.Tensor, q_g: torch.Tensor, mask: torch.Tensor, lam: float
) -> torch.Tensor:
    """The gradient of :func:`penalty_value` with respect to ``weight``, shaped like it.

    Args:
        weight: the layer's (core) weight: ``(C_out, C_in)``, ``(C_out, C_in, k)`` or
            ``(C_out, C_in, kh, kw)``; its 3-d view is ``(d_out, k², d_in)``.
        q_a: ``(d_in, d_in)`` eigenvectors (columns) of the layer's input factor ``A``.
        q_g: ``(d_out, d_out)`` eigenvectors (columns) of its output-gradient factor ``G``.
        mask: ``(d_out, 1, d_in)`` marked coordinates (:func:`marked_mask`).
        lam: the strength ``λ``.

    Returns:
        ``λ · Q_G (M ⊙ W*[:, δ, :]) Q_Aᵀ`` for every offset ``δ``, in ``weight``'s layout, in
        the dtype of ``q_a`` (cast it to the weight's dtype to add it to ``.grad``).
    """
    z = marked_coordinates(weight, q_a, q_g, mask)  # (d_out, k², d_in)
    grad3 = to_kfe(z, q_a.T, q_g.T)  # Q_G · Z · Q_Aᵀ per offset
    return _from_3d(grad3 * float(lam), weight.shape).contiguous()


@dataclass
class MarkedLayer:
    """The window's record of one layer: which parameter, its eigenbases and the removed
    directions of the plan (plain data via :meth:`to_dict`)."""

    param: str  # qualified parameter name (e.g. ``"net.3.weight"`` or ``"net.3.core.weight"``)
    q_a: torch.Tensor  # (d_in, d_in), float64
    q_g: torch.Tensor  # (d_out, d_out), float64
    removed_in: tuple[int, ...]
    removed_out: tuple[int, ...]

    @property
    def mask(self) -> torch.Tensor:
        """``M`` ``(d_out, 1, d_in)`` in float64 on the bases' device."""
        return marked_mask(
            self.q_a.shape[0], self.q_g.shape[0], self.removed_in, self.removed_out, device=self.q_a.device
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "param": self.param,
            "q_a": self.q_a.detach().to("cpu", torch.float64, copy=True),
            "q_g": self.q_g.detach().to("cpu", torch.float64, copy=True),
            "removed_in": list(self.removed_in),
            "removed_out": list(self.removed_out),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MarkedLayer:
        return cls(
            param=str(d["param"]),
            q_a=torch.as_tensor(d["q_a"], dtype=torch.float64),
            q_g=torch.as_tensor(d["q_g"], dtype=torch.float64),
            removed_in=tuple(int(i) for i in d["removed_in"]),
            removed_out=tuple(int(i) for i in d["removed_out"]),
        )


@dataclass
class GradualWindow:
    """One window of gradual removal: the prune point it leads to, the optimizer steps it covers
    and the marked layers (plain data via :meth:`to_dict`, as the callback's checkpoints store it).

    ``start``: the window's ``t``-th step is optimizer step ``start + t`` (``trainer.global_step``
    is ``start + t − 1`` while it runs); ``end``: the step after which the point prunes.
    """

    point: str
    start: int
    end: int
    layers: list[MarkedLayer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": self.point,
            "start": self.start,
            "end": self.end,
            "layers": [m.to_dict() for m in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GradualWindow:
        return cls(
            point=str(d["point"]),
            start=int(d["start"]),
            end=int(d["end"]),
            layers=[MarkedLayer.from_dict(m) for m in d["layers"]],
        )


def marked_layers(analysis: Any, plan: Any, param_names: dict[int, str]) -> list[MarkedLayer]:
    """The layers a plan changes, with the directions it removes, as :class:`MarkedLayer`.

    Args:
        analysis: a :class:`~lightning_eigendamage.Analysis` (its scored layers give the bases
            ``Q_A``, ``Q_G`` of each layer's core and the core's parameter).
        plan: the :class:`~lightning_eigendamage.Plan` :func:`~lightning_eigendamage.decide`
            made from it (not applied).
        param_names: ``id(parameter) → qualified name`` of the model's parameters.

    Layers the plan leaves unchanged, or changes without removing a direction (a cheaper form
    only), are not marked. A folded side keeps all its directions in the plan, so it is not
    marked either.
    """
    out = []
    for w in analysis.layers:
        lp = plan[w.name]
        if not lp.changed:
            continue
        d_out, _, d_in = w.state.core.shape
        removed_in = removed_directions(lp.kept_in, d_in)
        removed_out = removed_directions(lp.kept_out, d_out)
        if not (removed_in or removed_out):
            continue
        param = w.state.template.weight
        out.append(
            MarkedLayer(
                param_names[id(param)],
                w.q_a.detach().to(torch.float64),
                w.q_g.detach().to(torch.float64),
                removed_in,
                removed_out,
            )
        )
    return out


def check_windows(ends: dict[str, int], steps: int) -> None:
    """Check that every window fits: ``ends`` maps each prune point (key) to the optimizer step
    after which it prunes.

    A window of ``steps`` steps before a point at step ``S`` covers steps ``S − steps + 1 … S``,
    and its plan needs factors captured on at least one optimizer step before it, after the
    previous round: so ``steps < S₁`` for the first point and ``steps < S_k − S_{k−1}`` between
    consecutive points.

    Raises:
        ValueError: a window that does not fit, naming the points and what to change.
    """
    prev_key, prev = None, 0
    for key, end in sorted(ends.items(), key=lambda kv: (kv[1], kv[0])):
        room = end - prev
        if steps >= room:
            after = "the start of training" if prev_key is None else f"the round {prev_key} (step {prev})"
            raise ValueError(
                f"GradualRemoval(steps={steps}) does not fit before the round {key}, which prunes after "
                f"optimizer step {end}: only {room} step(s) lie between it and {after}, and the window "
                "needs at least one more step before it to measure the curvature its plan is made from; "
                f"pass steps ≤ {room - 1}, or move the prune points further apart"
                if room > 1
                else f"GradualRemoval(steps={steps}) cannot run before the round {key}: it prunes after "
                f"optimizer step {end}, right after {after}, leaving no step for a window; move the "
                "prune points further apart"
            )
        prev_key, prev = key, end
