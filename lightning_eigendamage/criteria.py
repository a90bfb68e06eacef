"""EigenDamage scores and the global pruning decision (pure functions on tensors and plain data).

In the KFE the Fisher is diagonal, so removing the weight ``W*_{iδj}`` costs (method.md §3)

    ΔL_{iδj} = ½ · T · (W*_{iδj})² · λ_G,i · λ_A,j

with ``T`` the layer's output locations per example. A whole output direction ``i`` scores
``Σ_{δ,j} ΔL_{iδj}`` and an input direction ``j`` scores ``Σ_{i,δ} ΔL_{iδj}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def eigendamage_scores(
    w_star: torch.Tensor, lam_a: torch.Tensor, lam_g: torch.Tensor, locations: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of output and input eigen-directions.

    Args:
        w_star: KFE weight ``(r_out, k², r_in)``.
        lam_a: eigenvalues of ``A`` ``(r_in,)``; lam_g: eigenvalues of ``G`` ``(r_out,)``.
        locations: ``T``.

    Returns:
        ``(out_scores (r_out,), in_scores (r_in,))`` in float64.
    """
    w2 = w_star.to(torch.float64) ** 2
    damage = 0.5 * locations * w2 * lam_g[:, None, None] * lam_a[None, None, :]
    return damage.sum(dim=(1, 2)), damage.sum(dim=(0, 1))


@dataclass
class SideDecision:
    kept: list[int]  # indices kept, ascending
    removed: int


def keep_side(scores: torch.Tensor, marked: int, cap: float, min_rank: int) -> SideDecision:
    """Which directions of one side survive.

    ``marked`` directions of this side fall under the global threshold (see
    :func:`global_marks`); the least important of them are removed, but at most
    ``floor(cap·n)`` and never so many that fewer than ``min_rank`` remain, so the survivors are
    always the most important ones (ties broken by index).
    """
    n = scores.numel()
    order = torch.argsort(scores, stable=True)
    n_remove = max(0, min(marked, math.floor(cap * n + 1e-9), n - min_rank))
    kept = sorted(int(i) for i in order[n_remove:])
    return SideDecision(kept=kept, removed=n_remove)


def global_threshold(scores: list[torch.Tensor], ratio: float) -> float:
    """The ``ratio``-quantile (linear interpolation) of all scores pooled together."""
    pooled = torch.cat([s.reshape(-1).to(torch.float64).cpu() for s in scores])
    if ratio <= 0.0:
        return float("-inf")
    return float(torch.quantile(pooled, ratio))


def global_marks(scores: list[torch.Tensor], ratio: float) -> list[int]:
    """How many directions of each score vector fall under the global ``ratio``-quantile.

    Without ties these are exactly the scores strictly below :func:`global_threshold`:
    ``k = ceil(ratio·(n−1))`` of the ``n`` pooled scores. Ties (typically the many exact zeros of
    directions without curvature) are broken by rank, in pooled order, so that exactly ``k``
    directions are marked even when more than ``k`` share the threshold value.
    """
    sizes = [s.numel() for s in scores]
    pooled = torch.cat([s.reshape(-1).to(torch.float64).cpu() for s in scores])
    n = pooled.numel()
    k = max(0, math.ceil(ratio * (n - 1) - 1e-9)) if n else 0
    mark = torch.zeros(n, dtype=torch.bool)
    mark[torch.argsort(pooled, stable=True)[:k]] = True
    return [int(m.sum()) for m in torch.split(mark, sizes)]


def plan_directions(
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ratio: float,
    *,
    layer_cap: float,
    min_rank: int,
) -> dict[str, dict[str, list[int]]]:
    """Global decision: for each layer, the output and input directions kept.

    Args:
        scores: layer name → ``(out_scores, in_scores)``.
        ratio: fraction of all pooled directions targeted (the threshold's quantile).

    Returns:
        ``{name: {"kept_out": [...], "kept_in": [...]}}``: plain data.
    """
    flat = [s for pair in scores.values() for s in pair]
    marks = iter(global_marks(flat, ratio))
    plan = {}
    for name, (s_out, s_in) in scores.items():
        out = keep_side(s_out, next(marks), layer_cap, min_rank)
        inn = keep_side(s_in, next(marks), layer_cap, min_rank)
        plan[name] = {"kept_out": out.kept, "kept_in": inn.kept}
    return plan
