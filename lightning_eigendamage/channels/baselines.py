"""Parameter-space baselines of the EigenDamage paper (docs/method.md §8): scores of whole output
channels of a Conv2d/Linear, and the OBS weight updates that go with them.

Conventions (the same as :mod:`lightning_eigendamage.curvature`):

- A layer's weight is the matrix ``W = weight.reshape(C_out, -1)`` of shape ``(C_out, d)`` with
  ``d = C_in·kh·kw`` for a Conv2d (``groups=1``) and ``d = C_in`` for a Linear; row ``i`` is output
  channel ``i``. This is the order of the patch-form conv ``A`` (``a_form="patch"``).
- With row-major ``vec(W)`` the per-example weight gradient is ``Σ_t D_t a_tᵀ`` and the K-FAC
  Fisher block is ``F ≈ T · (G ⊗ A)`` with ``A`` ``(d, d)``, ``G`` ``(C_out, C_out)`` averaged over
  examples *and* the ``T`` output locations per example (KFC; ``T = 1`` for a plain Linear).
- Every score is a predicted loss increase ``½ δwᵀ F δw`` in the same units as
  :func:`~lightning_eigendamage.criteria.eigendamage_scores` (the ``½`` and ``T`` change no ranking
  inside a layer but do across layers), returned in float64.
- Removing output channel ``i`` means ``δW[i, :] = −W[i, :]``: the channel's pre-activation output
  becomes its bias. OBS methods additionally change the *kept* rows of the same layer.

Where the public reference code differs (it is wrong, and we implement the formula instead):
Kron-OBD/Kron-OBS there use ``Σ_jk W_ij² A_jk`` instead of the quadratic form ``w_iᵀ A w_i``,
and Kron-OBS sums single-row updates instead of solving the joint update for the removed set.

Nothing here imports Lightning; the only stateful part is :class:`DiagFisherCapture` (hooks) for
the per-example diagonal Fisher that C-OBD needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..curvature import CaptureOptions, HookCapture, compute_dtype, conv_patches, drive_capture

if TYPE_CHECKING:
    from typing_extensions import Unpack

CRITERIA = ("c-obd", "c-obs", "kron-obd", "kron-obs")
OBS_CRITERIA = ("c-obs", "kron-obs")
DEFAULT_DAMPING = 1e-3
GREEDY_STEPS = 32  # steps of the greedy sequential scores per group (greedy_input_obs_scores)


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """``weight.reshape(C_out, -1)`` of a Conv2d/Linear, detached, float64: ``(C_out, d)``."""
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"expected nn.Conv2d or nn.Linear, got {type(module).__name__}")
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1).to(torch.float64)


def damped(factor: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``F + γ·(tr F / n)·I``, symmetrised, float64 (relative damping: scale-free across layers).

    An all-zero factor (a layer no gradient reaches) gets ``γ·I``.
    """
    if damping < 0:
        raise ValueError(f"damping must be ≥ 0, got {damping!r}")
    f = factor.detach().to(torch.float64)
    f = (f + f.T).mul_(0.5)
    scale = float(torch.diagonal(f).mean()) if f.numel() else 0.0
    if not scale > 0.0:
        scale = 1.0
    f.diagonal().add_(damping * scale)  # in place: no d×d identity
    return f


def damped_inverse(factor: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``(F + γ·(tr F / n)·I)⁻¹`` in float64 (see :func:`damped`); needs ``γ > 0`` unless F is SPD.

    Computed through ``eigh`` with round-off negative eigenvalues of ``F`` clamped to 0 first.
    """
    f = factor.detach().to(torch.float64)
    f = 0.5 * (f + f.T)
    evals, evecs = torch.linalg.eigh(f)
    evals = evals.clamp_min(0.0)
    scale = float(evals.mean()) if evals.numel() else 0.0
    if not scale > 0.0:
        scale = 1.0
    d = evals + damping * scale
    if bool((d <= 0).any()):
        raise ValueError("the factor is singular and damping is 0: pass damping > 0")
    return (evecs / d) @ evecs.T


def _as_index(removed: Sequence[int] | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(list(removed) if not isinstance(removed, torch.Tensor) else removed)
    idx = idx.to(dtype=torch.long, device=device).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise IndexError(f"removed rows must be in [0, {n}), got {idx.tolist()}")
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"removed rows contain duplicates: {idx.tolist()}")
    return idx


def _check_shapes(w: torch.Tensor, a: torch.Tensor | None, g: torch.Tensor | None) -> None:
    if w.dim() != 2:
        raise ValueError(
            f"weight must be the (C_out, d) matrix weight.reshape(C_out, -1), got {tuple(w.shape)}"
        )
    if a is not None and tuple(a.shape) != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"A must be ({w.shape[1]}, {w.shape[1]}) for a weight {tuple(w.shape)}, got {tuple(a.shape)}"
        )
    if g is not None and tuple(g.shape) != (w.shape[0], w.shape[0]):
        raise ValueError(
            f"G must be ({w.shape[0]}, {w.shape[0]}) for a weight {tuple(w.shape)}, got {tuple(g.shape)}"
        )


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


# ---------------------------------------------------------------------------------------------
# Scores and OBS updates (pure functions)
# ---------------------------------------------------------------------------------------------


def c_obd_scores(weight: torch.Tensor, fisher_diag: torch.Tensor) -> torch.Tensor:
    """C-OBD: OBD with the exact diagonal Fisher, summed over a channel's weights.

    ``s_i = ½ Σ_j W_ij² F_ij`` with ``F_ij = E_n[(∂ℓ_n/∂W_ij)²]`` from per-example gradients
    (:func:`capture_diag_fisher`; the location sum is inside the per-example gradient, so there is no
    ``T`` factor).

    Args:
        weight: ``(C_out, d)``; fisher_diag: ``(C_out, d)``.

    Returns:
        ``(C_out,)`` float64.
    """
    w = _f64(weight)
    f = _f64(fisher_diag)
    if w.dim() != 2 or f.shape != w.shape:
        raise ValueError(
            f"weight and fisher_diag must both be (C_out, d); got {tuple(w.shape)}, {tuple(f.shape)}"
        )
    return 0.5 * (w**2 * f).sum(1)


def c_obs_scores(
    weight: torch.Tensor, a_inv: torch.Tensor, g_inv: torch.Tensor, locations: float = 1.0
) -> torch.Tensor:
    """C-OBS: single-weight OBS saliencies with ``F⁻¹ ≈ (1/T)·G⁻¹ ⊗ A⁻¹``, summed over a channel.

    ``s_i = ½ · T · Σ_j W_ij² / ([G⁻¹]_ii [A⁻¹]_jj)``: each term is the OBS loss increase
    ``½ w_q² / [F⁻¹]_qq`` of removing weight ``q = (i, j)`` *alone* (compensated by all others).

    Args:
        weight: ``(C_out, d)``; a_inv: damped ``A⁻¹`` ``(d, d)``; g_inv: damped ``G⁻¹``
            ``(C_out, C_out)`` (:func:`damped_inverse`); locations: ``T``.

    Returns:
        ``(C_out,)`` float64.
    """
    w = _f64(weight)
    _check_shapes(w, a_inv, g_inv)
    denom = torch.outer(torch.diagonal(_f64(g_inv)), torch.diagonal(_f64(a_inv)))
    return 0.5 * locations * (w**2 / denom).sum(1)


def c_obs_update(
    weight: torch.Tensor, a_inv: torch.Tensor, g_inv: torch.Tensor, removed: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """C-OBS weight update for removing the rows ``removed``: ``δW = −G⁻¹ C A⁻¹``.

    ``C_ij = W_ij / ([G⁻¹]_ii [A⁻¹]_jj)`` for ``i`` in ``removed`` and ``0`` elsewhere. This is
    exactly the *sum of the single-weight OBS updates* ``−F⁻¹ e_q w_q / [F⁻¹]_qq`` over every
    weight ``q`` of the removed rows, with ``F⁻¹ = (1/T)·G⁻¹ ⊗ A⁻¹`` (``T`` cancels), i.e. what C-OBS
    (and the reference code) does: each weight is compensated as if it were removed alone. It is
    *not* the joint OBS solution, so ``(W + δW)[removed]`` is in general not zero; those rows are
    removed afterwards anyway, and only ``δW[kept]`` survives. The bias is not updated.

    Args:
        weight: ``(C_out, d)``; a_inv, g_inv: damped inverses; removed: row indices.

    Returns:
        ``δW`` ``(C_out, d)`` float64 (rows ``removed`` included).
    """
    w = _f64(weight)
    _check_shapes(w, a_inv, g_inv)
    a_inv, g_inv = _f64(a_inv), _f64(g_inv)
    idx = _as_index(removed, w.shape[0], w.device)
    c = torch.zeros_like(w)
    denom = torch.outer(torch.diagonal(g_inv)[idx], torch.diagonal(a_inv))
    c[idx] = w[idx] / denom
    return -(g_inv @ c @ a_inv)


def kron_obd_scores(
    weight: torch.Tensor, a: torch.Tensor, g: torch.Tensor, locations: float = 1.0
) -> torch.Tensor:
    """Kron-OBD: OBD with ``F ≈ T · (diag(G) ⊗ A)``: ``s_i = ½ · T · G_ii · w_iᵀ A w_i``.

    ``w_i`` is row ``i`` of ``W``; this equals ``½ δwᵀ F δw`` for ``δW = −W[i, :]`` on row ``i``
    only, with either the full ``T·(G ⊗ A)`` or its block-diagonal ``T·(diag G ⊗ A)``. (The
    reference code computes ``Σ_jk W_ij² A_jk``, which is not this quadratic form.)

    Args:
        weight: ``(C_out, d)``; a: ``A`` ``(d, d)``; g: ``G`` ``(C_out, C_out)`` (only its diagonal
            is used); locations: ``T``.

    Returns:
        ``(C_out,)`` float64.
    """
    w = _f64(weight)
    _check_shapes(w, a, g)
    quad = ((w @ _f64(a)) * w).sum(1)
    return 0.5 * locations * torch.diagonal(_f64(g)) * quad


def kron_obs_scores(
    weight: torch.Tensor, a: torch.Tensor, g_inv: torch.Tensor, locations: float = 1.0
) -> torch.Tensor:
    """Kron-OBS: OBS loss increase of removing one whole row, ``s_i = ½ · T · w_iᵀ A w_i / [G⁻¹]_ii``.

    With ``F = T·(G ⊗ A)`` and ``S`` the weights of row ``i``, ``[F⁻¹]_SS = (1/T)·[G⁻¹]_ii · A⁻¹``
    and the OBS increase ``½ w_Sᵀ ([F⁻¹]_SS)⁻¹ w_S`` is the formula above; ``A`` is never inverted.

    Args:
        weight: ``(C_out, d)``; a: ``A`` ``(d, d)``; g_inv: damped ``G⁻¹`` ``(C_out, C_out)``;
            locations: ``T``.

    Returns:
        ``(C_out,)`` float64.
    """
    w = _f64(weight)
    _check_shapes(w, a, g_inv)
    quad = ((w @ _f64(a)) * w).sum(1)
    return 0.5 * locations * quad / torch.diagonal(_f64(g_inv))


def kron_obs_update(
    weight: torch.Tensor, g_inv: torch.Tensor, removed: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Joint Kron-OBS update for removing the rows ``R = removed`` together.

    ``δW = −G⁻¹[:, R] ([G⁻¹]_RR)⁻¹ W[R, :]``: the minimiser of ``½ δwᵀ F δw`` subject to
    ``(W + δW)[R, :] = 0`` for ``F = T·(G ⊗ A)``, whatever ``A`` is (``A`` cancels), so
    ``(W + δW)[R] = 0`` exactly and the kept rows absorb the removed ones through ``G``'s
    correlations. Summing the single-row updates ``−G⁻¹[:, r] w_rᵀ / [G⁻¹]_rr`` (reference code) is
    wrong as soon as two removed rows are correlated.

    Because ``A`` cancels, the same update is exact for a bias treated as a weight on a constant
    input: pass ``cat([W, b[:, None]], 1)`` to update the bias too.

    Args:
        weight: ``(C_out, d)``; g_inv: damped ``G⁻¹`` ``(C_out, C_out)``; removed: row indices.

    Returns:
        ``δW`` ``(C_out, d)`` float64.
    """
    w = _f64(weight)
    _check_shapes(w, None, g_inv)
    g_inv = _f64(g_inv)
    idx = _as_index(removed, w.shape[0], w.device)
    if idx.numel() == 0:
        return torch.zeros_like(w)
    coeff = torch.linalg.solve(g_inv[idx][:, idx], w[idx])  # ([G⁻¹]_RR)⁻¹ W_R  (|R|, d)
    return -(g_inv[:, idx] @ coeff)


def kron_obs_damage(
    weight: torch.Tensor,
    a: torch.Tensor,
    g_inv: torch.Tensor,
    removed: Sequence[int] | torch.Tensor,
    locations: float = 1.0,
) -> torch.Tensor:
    """Predicted loss increase of the joint Kron-OBS removal of rows ``R``:
    ``½ · T · tr(W_Rᵀ ([G⁻¹]_RR)⁻¹ W_R A)`` (a 0-dim float64 tensor).

    For a single row it equals :func:`kron_obs_scores`; for a set it is *not* the sum of the rows'
    scores unless ``[G⁻¹]_RR`` is diagonal.
    """
    w = _f64(weight)
    _check_shapes(w, a, g_inv)
    g_inv = _f64(g_inv)
    idx = _as_index(removed, w.shape[0], w.device)
    if idx.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=w.device)
    w_r = w[idx]
    coeff = torch.linalg.solve(g_inv[idx][:, idx], w_r)
    return 0.5 * locations * ((coeff @ _f64(a)) * w_r).sum()


def channel_scores(
    criterion: str,
    weight: torch.Tensor,
    *,
    a: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    fisher_diag: torch.Tensor | None = None,
    locations: float = 1.0,
    damping: float = DEFAULT_DAMPING,
) -> torch.Tensor:
    """Per-output-channel scores ``(C_out,)`` of one layer for ``criterion`` in :data:`CRITERIA`.

    ``c-obd`` needs ``fisher_diag``; the others need the K-FAC factors ``a`` (patch form for a
    conv) and ``g``; ``c-obs`` damps and inverts both, ``kron-obs`` only ``G``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion == "c-obd":
        if fisher_diag is None:
            raise ValueError("c-obd needs fisher_diag (capture_diag_fisher)")
        return c_obd_scores(weight, fisher_diag)
    if a is None or g is None:
        raise ValueError(f"{criterion} needs the K-FAC factors a and g (capture_factors(a_form='patch'))")
    if criterion == "c-obs":
        return c_obs_scores(weight, damped_inverse(a, damping), damped_inverse(g, damping), locations)
    if criterion == "kron-obd":
        return kron_obd_scores(weight, a, g, locations)
    return kron_obs_scores(weight, a, damped_inverse(g, damping), locations)


def _column_blocks(d: int, block: int) -> int:
    if block < 1 or d % block:
        raise ValueError(f"block must be a positive divisor of the weight's {d} columns, got {block!r}")
    return d // block


def input_obs_scores(
    weight: torch.Tensor, a_inv: torch.Tensor, g: torch.Tensor, block: int = 1, locations: float = 1.0
) -> torch.Tensor:
    """Input-side Kron-OBS: the loss increase of removing one *input* channel of a layer while the
    other input columns absorb it, ``s_c = ½ · T · tr(W_cᵀ G W_c ([A⁻¹]_cc)⁻¹)``.

    Input channel ``c`` owns the ``block`` consecutive columns ``W_c = W[:, c·b:(c+1)·b]`` of
    ``W = weight.reshape(C_out, -1)`` (``b = kh·kw`` for a conv, 1 for a Linear). With
    ``F = T·(G ⊗ A)`` and ``δW_c = −W_c`` fixed, the minimiser over the kept columns is
    :func:`input_obs_update` and its increase is the formula above; ``G`` only weighs the damage,
    the compensation itself is the least-squares fit of the layer's outputs (``A`` is the
    calibration inputs' second moment). This is what channel pruning costs a layer that *reads*
    the removed channel (its producer's rows are simply gone).

    Args:
        weight: ``(C_out, d)``; a_inv: damped ``A⁻¹`` ``(d, d)``; g: ``G`` ``(C_out, C_out)``;
            block: columns per input channel; locations: ``T``.

    Returns:
        ``(d / block,)`` float64.
    """
    w = _f64(weight)
    _check_shapes(w, a_inv, g)
    n = _column_blocks(w.shape[1], block)
    p = _f64(a_inv).reshape(n, block, n, block)
    idx = torch.arange(n, device=w.device)
    m = torch.linalg.inv(p[idx, :, idx, :])  # ([A⁻¹]_cc)⁻¹  (n, b, b)
    wc = w.reshape(w.shape[0], n, block).permute(1, 0, 2)  # (n, C_out, b)
    gw = torch.einsum("oj,cjb->cob", _f64(g), wc)
    return 0.5 * locations * torch.einsum("cob,cbe,coe->c", gw, m, wc)


def _submatrix(m: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``m[rows][:, cols]`` ``(|rows|, |cols|)`` of a matrix ``m`` ``(..., n, d)`` (leading
    dimensions batched) by one gather of the flat positions ``rows·d + cols`` from the flattened
    matrix: several times faster on CPU than two selections, the second along the last dimension."""
    n, d = m.shape[-2:]
    flat = (rows[:, None] * d + cols[None, :]).flatten()
    lead = m.shape[:-2]
    out = m.reshape(*lead, n * d).index_select(len(lead), flat)
    return out.view(*lead, rows.numel(), cols.numel())


def input_obs_update(
    weight: torch.Tensor, a_inv: torch.Tensor, removed: Sequence[int] | torch.Tensor, block: int = 1
) -> torch.Tensor:
    """Joint input-side Kron-OBS update for removing the input channels ``removed`` together.

    With ``R`` the removed channels' columns and ``P = A⁻¹`` (damped),
    ``δW = −W_R (P_RR)⁻¹ P_R,:``: ``(W + δW)[:, R] = 0`` and the kept columns ``K`` gain
    ``W_R A_RK A_KK⁻¹``, the damped least-squares fit of ``W a`` from the kept inputs over the
    calibration distribution (``G`` cancels). ``A`` holds no mean column, so a bias is left as it
    is: a BatchNorm after the layer, re-estimated, takes up the mean shift.

    Args:
        weight: ``(C_out, d)``; a_inv: damped ``A⁻¹`` ``(d, d)``; removed: input channel indices;
            block: columns per input channel.

    Returns:
        ``δW`` ``(C_out, d)`` float64.
    """
    w = _f64(weight)
    _check_shapes(w, a_inv, None)
    n = _column_blocks(w.shape[1], block)
    ch = _as_index(removed, n, w.device)
    if ch.numel() == 0:
        return torch.zeros_like(w)
    cols = (ch[:, None] * block + torch.arange(block, device=w.device)).reshape(-1)
    kept = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    kept[cols] = False
    keep = kept.nonzero().flatten()
    p = _f64(a_inv)
    p_rr, p_rk = _submatrix(p, cols, cols), _submatrix(p, cols, keep)  # P_RR, P_RK
    try:  # P_RR is SPD: Cholesky, and only the kept columns' coefficients (|R|, |K|)
        coeff = torch.cholesky_solve(p_rk, torch.linalg.cholesky(p_rr))
    except torch.linalg.LinAlgError:
        coeff = torch.linalg.solve(p_rr, p_rk)
    delta = torch.empty_like(w)
    delta[:, keep] = -(w[:, cols] @ coeff)
    delta[:, cols] = -w[:, cols]  # exactly
    return delta


@dataclass
class InputObsUpdate:
    """A consumer layer's input-side OBS compensation, applied once its removed input channels
    are known: call it with them to get ``δW`` ``(C_out, d)`` for ``weight.reshape(C_out, -1)``.
    ``g`` and ``locations`` (``G`` and ``T``, when known) weigh the damage of a removal
    (:func:`greedy_input_obs_scores`)."""

    weight: torch.Tensor  # (C_out, d) float64
    a_inv: torch.Tensor  # damped A⁻¹ (d, d)
    block: int
    g: torch.Tensor | None = None  # G (C_out, C_out)
    locations: float = 1.0

    def __call__(self, removed: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return input_obs_update(self.weight, self.a_inv, removed, self.block)


@dataclass
class GroupedInputObsUpdate:
    """A grouped conv's input-side OBS compensation. Conv group ``j`` maps input channels
    ``[j·s, (j+1)·s)`` to output channels ``[j·o, (j+1)·o)`` only, so its weight and Fisher are
    block-diagonal: one :class:`InputObsUpdate` per conv group (``parts[j]``: ``W_j`` ``(o, s·k²)``,
    its block ``A_j`` of the patch-form ``A`` and ``G_j`` of ``G``). Called with the removed input
    channels (the conv's own indices), it returns ``δW`` ``(C_out, s·k²)`` for
    ``weight.reshape(C_out, -1)``: each conv group refitted from its own kept inputs."""

    parts: list[InputObsUpdate]
    in_per_group: int  # s

    def __call__(self, removed: Sequence[int] | torch.Tensor) -> torch.Tensor:
        removed = [int(c) for c in removed]
        out = []
        for j, part in enumerate(self.parts):
            lo = j * self.in_per_group
            local = [c - lo for c in removed if lo <= c < lo + self.in_per_group]
            out.append(part(local) if local else torch.zeros_like(part.weight))
        return torch.cat(out, 0)


@dataclass
class Reader:
    """One layer that reads a dependency group's channels, for :func:`greedy_input_obs_scores`:
    ``columns[i]`` are the columns of ``W = weight.reshape(C_out, -1)`` that group channel
    ``channels[i]`` feeds (a conv input channel's ``k²`` columns, or every feature a flattened
    channel becomes)."""

    update: InputObsUpdate
    channels: list[int]
    columns: list[list[int]]


def _layout(reader: Reader) -> tuple[dict[int, list[int]], list[int]]:
    """``({channel: its local columns}, the reader's columns in local order)``: the columns of
    ``W`` the group's channels feed, numbered ``0…d−1`` in the order of ``W``."""
    cols: dict[int, set[int]] = {}  # channel → its columns in the reader's W
    for c, cc in zip(reader.channels, reader.columns):
        cols.setdefault(int(c), set()).update(int(x) for x in cc)
    mine = sorted(set().union(*cols.values()))
    local = {x: i for i, x in enumerate(mine)}
    return {c: sorted(local[x] for x in cc) for c, cc in cols.items()}, mine


# The dtype the greedy states are updated in: float32 halves the time of the updates of ``P``
# (the round's largest cost on DenseNet-121 and ViT-B/16) and chose the same channels as float64
# on the three converged networks at ÷2 and ÷4 FLOPs; the increments are summed in float64.
GREEDY_DTYPE = torch.float32


class _GreedyReader:
    """The state of one or more readers during :func:`greedy_input_obs_scores`, on the kept
    columns of the group's channels only: ``W_K``, ``G·W_K`` and ``P_KK`` of ``P = A⁻¹``
    (damped), shrunk at every removal. The reader's other columns (another group's channels,
    after a concatenation) keep absorbing what is removed, but never change what the group's
    columns cost: the removal updates ``W_c`` and ``P_cc`` of a group column ``c`` through
    ``P_cR`` alone, so those columns are dropped up front (exactly: ``P_KK`` is the block of
    ``P``, not ``(A_KK)⁻¹``).

    Readers with the same layout (the same channels on the same local columns, as many outputs,
    one device: DenseNet's 1×1 convs reading one layer's growth) are stacked and advance
    together: one batched operation per step instead of one per reader. ``W`` and ``G·W`` are
    held transposed, ``(R, d, C_out)``, and ``P`` ``(R, d, d)`` is gathered through its flat
    positions, so that every selection of columns is a gather of whole rows (several times
    faster than selecting along the last dimension)."""

    def __init__(self, readers: Sequence[tuple[Reader, tuple[dict[int, list[int]], list[int]]]]) -> None:
        """``readers``: each with its :func:`_layout`, the first's local layout shared by all."""
        if any(r.update.g is None for r, _ in readers):
            raise ValueError("every reader needs its G (InputObsUpdate.g) to weigh the damage")
        self.cols, mine = readers[0][1]
        wts, ps, gwts = [], [], []
        for r, (_, columns) in readers:
            u = r.update
            w = u.weight.detach().to(GREEDY_DTYPE)
            idx = torch.tensor(columns, device=w.device)
            w = w.index_select(1, idx)
            wts.append(w.T)
            ps.append(u.a_inv.detach().to(GREEDY_DTYPE).index_select(0, idx).index_select(1, idx))
            gwts.append((u.g.detach().to(w.device, GREEDY_DTYPE) @ w).T)
        self.wt, self.p, self.gwt = torch.stack(wts), torch.stack(ps), torch.stack(gwts)
        self.t = torch.tensor([float(r.update.locations) for r, _ in readers], dtype=GREEDY_DTYPE)
        self.t = self.t.to(self.wt.device)
        self.pos = torch.arange(len(mine))  # local column → kept position (-1: removed)

    @staticmethod
    def key(reader: Reader, cols: dict[int, list[int]]) -> tuple:
        """Readers with equal keys (``cols``: the reader's local layout) can share one state."""
        w = reader.update.weight
        return (tuple(sorted((c, tuple(cc)) for c, cc in cols.items())), int(w.shape[0]), str(w.device))

    def add_increments(self, inc: torch.Tensor, live: set[int]) -> None:
        """``inc[c] += Σ_readers ½·T·tr(W_cᵀ G W_c (P_cc)⁻¹)`` for every live channel ``c`` read."""
        by_size: dict[int, list[tuple[int, list[int]]]] = {}
        for c, cc in self.cols.items():
            if c in live:
                by_size.setdefault(len(cc), []).append((c, cc))
        r, d, c_out = self.wt.shape
        for members in by_size.values():  # channels of one column count, batched
            chans = torch.tensor([c for c, _ in members])
            idx = self.pos[torch.tensor([cc for _, cc in members])].to(self.wt.device)  # (m, s)
            m, s = idx.shape
            flat = (idx[:, :, None] * d + idx[:, None, :]).flatten()
            blocks = self.p.reshape(r, d * d).index_select(1, flat).view(r, m, s, s)  # P_cc
            wc = self.wt.index_select(1, idx.flatten()).view(r, m, s, c_out)  # W_cᵀ
            gwc = self.gwt.index_select(1, idx.flatten()).view(r, m, s, c_out)
            # tr(W_cᵀ G W_c (P_cc)⁻¹) = Σ (G W_c) ⊙ (W_c (P_cc)⁻¹), by a solve (P_cc is SPD;
            # a division where a channel is one column)
            sol = wc / blocks if s == 1 else torch.linalg.solve(blocks, wc)
            per = (gwc * sol).sum((2, 3)) * (0.5 * self.t)[:, None]  # (R, m)
            inc.index_add_(0, chans, per.sum(0).to("cpu", torch.float64))

    def remove(self, channels: set[int]) -> None:
        """The joint OBS removal of ``channels``' columns ``R`` from the kept ones ``K``:
        ``W_K −= W_R C``, ``G·W_K −= G·W_R C``, ``P_KK −= P_KR C`` with ``C = (P_RR)⁻¹ P_RK``."""
        gone = [x for c in channels if c in self.cols for x in self.cols.pop(c)]
        if not gone:
            return
        mask = torch.zeros(self.wt.shape[1], dtype=torch.bool)
        mask[self.pos[torch.tensor(gone)]] = True
        dev = self.wt.device
        r, k = mask.nonzero().flatten().to(dev), (~mask).nonzero().flatten().to(dev)
        p_rk = _submatrix(self.p, r, k)  # (R, |R|, |K|): P_KR = P_RKᵀ
        coeff = torch.linalg.solve(_submatrix(self.p, r, r), p_rk)  # (P_RR)⁻¹ P_RK
        # each kept block gathered once (one copy), then updated in place: W_Kᵀ −= Cᵀ W_Rᵀ
        coeff_t = coeff.transpose(1, 2)
        self.wt = self.wt.index_select(1, k).baddbmm_(coeff_t, self.wt.index_select(1, r), alpha=-1)
        self.gwt = self.gwt.index_select(1, k).baddbmm_(coeff_t, self.gwt.index_select(1, r), alpha=-1)
        self.p = _submatrix(self.p, k, k).baddbmm_(p_rk.transpose(1, 2), coeff, alpha=-1)
        kept = self.pos >= 0
        kept[kept.clone()] = ~mask
        self.pos = torch.where(kept, kept.long().cumsum(0) - 1, -1)


def greedy_input_obs_scores(
    readers: Sequence[Reader],
    n: int,
    max_steps: int = GREEDY_STEPS,
    units: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Scores of a group's ``n`` channels from a greedy, sequential input-side Kron-OBS removal.

    Single-channel scores (:func:`input_obs_scores`) assume every *other* channel stays to
    compensate: two near-copies of one feature both score about zero, and a ranking by them
    removes both. Here the channels are removed one step at a time, each step the ones whose
    removal now costs least, and every reader ``j`` is moved to the state after the joint OBS
    removal so far (exact for the quadratic model): with ``R`` the columns just removed and
    ``P = A⁻¹`` (damped),

    - ``W ← W − W_R (P_RR)⁻¹ P_R,:`` (the kept columns absorb the removed ones),
    - ``P ← P − P_:,R (P_RR)⁻¹ P_R,:`` (the inverse of ``A`` over the kept columns, zero on ``R``),

    and the increment of removing channel ``c`` next is ``Σ_j ½·T_j·tr(W_jcᵀ G_j W_jc (P_j,cc)⁻¹)``
    on those states. The increments of ``S`` removals add up to the joint damage of removing
    them together. A channel's score is its increment when removed, raised to the largest one
    before it (scores never fall along the removal order, so a ranking by them keeps it).

    Args:
        readers: the group's readers, each with ``update.g`` set (the damage needs ``G``).
        n: the group's channel count; a channel no reader reads scores 0.
        max_steps: at most this many steps (``⌈n / max_steps⌉`` channels removed per step):
            a reader pays ``O(C_out²·d)`` once (``G·W``) and ``O(d·r·(d + C_out))`` a step,
            ``d`` its columns fed by the group, ``r`` of them removed.
        units: channels that can only go together (a grouped conv keeps equal group widths, so
            the channels at one position of every conv group are one unit); each step removes
            whole units, a unit's increment is the sum of its channels'. Default: every channel
            its own unit.

    Returns:
        ``(n,)`` float64, non-negative: each channel of a unit scores the unit's score divided
        by its size (a unit's channels sum to its score).
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    scores = torch.zeros(n, dtype=torch.float64)
    alike: dict[tuple, list] = {}
    for r in readers:
        laid = _layout(r)  # once per reader: it keys the stacking and builds the state
        alike.setdefault(_GreedyReader.key(r, laid[0]), []).append((r, laid))
    states = [_GreedyReader(rs) for rs in alike.values()]
    groups = [list(u) for u in units] if units is not None else [[c] for c in range(n)]
    read = set().union(*(st.cols for st in states)) if states else set()
    alive = {ui for ui, u in enumerate(groups) if read.intersection(u)}
    per_step = max(1, math.ceil(len(alive) / max_steps))
    member = torch.tensor([c for u in groups for c in u], dtype=torch.int64)  # unit costs, batched
    owner = torch.tensor([ui for ui, u in enumerate(groups) for _ in u], dtype=torch.int64)
    running = 0.0
    while alive:
        inc = torch.zeros(n, dtype=torch.float64)
        live = {c for ui in alive for c in groups[ui]}
        for st in states:
            st.add_increments(inc, live)
        per_unit = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, owner, inc[member]).tolist()
        cost = {ui: per_unit[ui] for ui in alive}
        order = sorted(alive, key=lambda ui: (cost[ui], ui))[:per_step]
        for ui in order:
            running = max(running, cost[ui])
            scores[groups[ui]] = running / len(groups[ui])
            alive.discard(ui)
        for st in states:
            st.remove({c for ui in order for c in groups[ui]})
    return scores.clamp_min(0.0)


@dataclass
class ObsUpdate:
    """A layer's OBS compensation, ready to apply once the removed rows are known.

    Call it with the removed rows to get ``(δW (C_out, d), δb (C_out,) or None)``; add them to
    ``weight.reshape(C_out, -1)`` and ``bias``. ``kron-obs`` also updates the bias (exact, see
    :func:`kron_obs_update`); ``c-obs`` does not.
    """

    criterion: str
    weight: torch.Tensor  # (C_out, d) float64
    bias: torch.Tensor | None  # (C_out,) float64
    g_inv: torch.Tensor
    a_inv: torch.Tensor | None = None

    def __call__(self, removed: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.criterion == "c-obs":
            return c_obs_update(self.weight, self.a_inv, self.g_inv, removed), None
        if self.bias is None:
            return kron_obs_update(self.weight, self.g_inv, removed), None
        full = kron_obs_update(torch.cat([self.weight, self.bias[:, None]], 1), self.g_inv, removed)
        return full[:, :-1], full[:, -1]


def obs_update(
    criterion: str,
    weight: torch.Tensor,
    *,
    a: torch.Tensor,
    g: torch.Tensor,
    bias: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
) -> ObsUpdate:
    """The :class:`ObsUpdate` of ``c-obs`` or ``kron-obs`` for one layer (damped inverses inside)."""
    if criterion not in OBS_CRITERIA:
        raise ValueError(f"only {OBS_CRITERIA} have a weight update, got {criterion!r}")
    w = _f64(weight)
    _check_shapes(w, a, g)
    b = None if bias is None else _f64(bias)
    g_inv = damped_inverse(g, damping)
    a_inv = damped_inverse(a, damping) if criterion == "c-obs" else None
    return ObsUpdate(criterion, w, b, g_inv, a_inv)


# ---------------------------------------------------------------------------------------------
# Network Slimming
# ---------------------------------------------------------------------------------------------

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def slimming_penalty(model: nn.Module, lam: float = 1e-4) -> torch.Tensor:
    """Network Slimming's sparsity term ``λ · Σ |γ|`` over every affine BatchNorm scale of ``model``.

    Add it to the training loss (Liu et al. 2017 use ``λ ≈ 1e-4``); differentiable (its subgradient
    is ``λ·sign(γ)``). A model without affine BatchNorm gives a zero tensor.
    """
    terms = [
        m.weight.abs().sum() for m in model.modules() if isinstance(m, _BN_TYPES) and m.weight is not None
    ]
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=None if p is None else p.device)
    return lam * torch.stack(terms).sum()


def slimming_scores(bn: nn.Module) -> torch.Tensor:
    """Network Slimming channel scores ``|γ|`` ``(C,)`` float64 of an affine BatchNorm."""
    if not isinstance(bn, _BN_TYPES) or bn.weight is None:
        raise TypeError(f"expected an affine BatchNorm, got {type(bn).__name__}")
    return bn.weight.detach().abs().to(torch.float64)


# ---------------------------------------------------------------------------------------------
# Per-example gradients and the diagonal Fisher (C-OBD)
# ---------------------------------------------------------------------------------------------


def per_example_weight_grads(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients ``g_n = Σ_t D_{n,t} a_{n,t}ᵀ`` ``(N, C_out, d)``.

    Args:
        module: ``nn.Conv2d`` (``groups=1``) or ``nn.Linear``.
        x: the layer input, ``(N, C_in, H, W)`` or ``(N, *, C_in)``.
        grad_output: ``∂ℓ_n/∂s`` of the per-example losses w.r.t. the layer output,
            ``(N, C_out, H_out, W_out)`` or ``(N, *, C_out)``.
    """
    n = x.shape[0]
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped convolution (groups={module.groups}) is not supported")
        patches = conv_patches(x, module)  # (N, d, T)
        d_out = grad_output.reshape(n, grad_output.shape[1], -1)  # (N, C_out, T)
        return torch.bmm(d_out, patches.transpose(1, 2))
    if isinstance(module, nn.Linear):
        a = x.reshape(n, -1, x.shape[-1])  # (N, T, C_in)
        d_out = grad_output.reshape(n, -1, grad_output.shape[-1])  # (N, T, C_out)
        return torch.bmm(d_out.transpose(1, 2), a)
    raise TypeError(f"expected nn.Conv2d or nn.Linear, got {type(module).__name__}")


def diag_fisher_sum(
    module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor, chunk_elements: int = 1 << 24
) -> torch.Tensor:
    """``Σ_n g_n ⊙ g_n`` ``(C_out, d)`` of the per-example weight gradients, in chunks of examples so
    that at most about ``chunk_elements`` gradient entries exist at once."""
    n = x.shape[0]
    c_out = module.weight.shape[0]
    d = module.weight[0].numel()
    step = max(1, chunk_elements // max(c_out * d, 1))
    total = None
    for s in range(0, n, step):
        g = per_example_weight_grads(module, x[s : s + step], grad_output[s : s + step])
        part = (g * g).sum(0)
        total = part if total is None else total + part
    return total


@dataclass
class _DiagLayer:
    sum: torch.Tensor | None = None
    examples: int = 0
    max_calls: int = 0
    fired: bool = False
    reached: bool = False
    pending: torch.Tensor | None = None


class DiagFisherCapture(HookCapture):
    """Hooks that accumulate the diagonal Fisher ``E_n[(∂ℓ_n/∂W)²]`` of Conv2d/Linear weights.

    A :class:`~lightning_eigendamage.curvature.HookCapture` like the K-FAC capture, driven by
    :func:`~lightning_eigendamage.curvature.capture_batch`, so the true/empirical Fisher
    conventions are exactly those of the K-FAC capture: the output gradient ``D`` of the
    per-example loss is read by a tensor hook on the layer's output and multiplied by
    ``grad_scale`` (``N`` for a batch-mean loss), and ``.grad`` is never written.
    Only the first call per forward pass is recorded (``max_calls`` tells callers to skip layers
    called more than once: their per-example gradient sums over calls).
    """

    layer_type = _DiagLayer
    layers: dict[str, _DiagLayer]

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        factors_for: Iterable[str] | None = None,
        accum_dtype: torch.dtype = torch.float64,
        chunk_elements: int = 1 << 24,
    ) -> None:
        for name, m in modules.items():
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                raise TypeError(f"{name}: expected nn.Conv2d or nn.Linear, got {type(m).__name__}")
        super().__init__(modules, factors_for=factors_for, accum_dtype=accum_dtype)
        for name in self.factors_for:
            m = self.modules[name]
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise ValueError(f"{name}: grouped convolution (groups={m.groups}) is not supported")
        self.chunk_elements = chunk_elements

    def fisher(self) -> dict[str, torch.Tensor]:
        """Layer name → diagonal Fisher ``(C_out, d)`` (sum / examples), for layers that got one."""
        return {
            n: lay.sum / lay.examples
            for n, lay in self.layers.items()
            if lay.sum is not None and lay.examples
        }

    # -- what is recorded and committed ----------------------------------------------------------
    def pending_values(self, layer: _DiagLayer) -> list[torch.Tensor]:
        return [] if layer.pending is None else [layer.pending]

    def clear_pending(self, layer: _DiagLayer) -> None:
        layer.pending = None

    def commit(self, layer: _DiagLayer, n_examples: int) -> None:
        layer.sum = layer.pending if layer.sum is None else layer.sum + layer.pending
        layer.examples += n_examples

    def record(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.watch_grad(output, self._grad_hook(name, module, inputs[0].detach()))

    def _grad_hook(self, name: str, module: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if not self.recording or self.calls(name) > 1:
                return
            dtype = compute_dtype(grad.dtype)
            d = grad.detach().to(dtype) * float(self.grad_scale)
            s = diag_fisher_sum(module, x.to(dtype), d, self.chunk_elements)
            self.layers[name].pending = s.to(self.accum_dtype)
            self.layers[name].reached = True

        return hook


@dataclass
class DiagFisherResult:
    """Diagonal Fisher per layer name ``(C_out, d)`` and what the capture saw."""

    fisher: dict[str, torch.Tensor]
    batches: int
    skipped_batches: int
    max_calls: dict[str, int] = field(default_factory=dict)


def capture_diag_fisher(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable[Any],
    *,
    factors_for: Iterable[str] | None = None,
    **options: Unpack[CaptureOptions],
) -> DiagFisherResult:
    """Run ``model`` over ``batches`` in eval mode and accumulate the per-example diagonal Fisher.

    The counterpart of :func:`~lightning_eigendamage.curvature.capture_factors` (same batches, same
    ``options`` of :func:`~lightning_eigendamage.curvature.drive_capture`, same
    ``fisher="true"``/``"empirical"`` conventions, same seeded label sampling: default generator
    seeded with 0 on the model's device), giving ``F_q = (1/N) Σ_n (∂ℓ_n/∂w_q)²`` for every weight
    of each module in ``factors_for``, shaped like ``weight.reshape(C_out, -1)``.
    """
    cap = DiagFisherCapture(modules, factors_for=factors_for)
    drive_capture(model, cap, batches, what="the diagonal Fisher", **options)
    return DiagFisherResult(
        fisher=cap.fisher(),
        batches=cap.batches,
        skipped_batches=cap.skipped_batches,
        max_calls={n: lay.max_calls for n, lay in cap.layers.items()},
    )
