"""Direction scores (a registry of criteria) and the global pruning decision (pure functions).

A criterion maps a layer's weight in the eigenbasis and the factors' eigenvalues to one score per
output and per input eigen-direction: the estimated loss increase of removing it. Criteria are
registered by name (:func:`register_criterion`); ``prune(method=...)`` picks one.

In the KFE the Fisher is diagonal, so removing the weight ``W*_{iδj}`` costs (docs/method.md §3)

    ΔL_{iδj} = ½ · T · (W*_{iδj})² · λ_G,i · λ_A,j

with ``T`` the layer's output locations per example. A whole output direction ``i`` scores
``Σ_{δ,j} ΔL_{iδj}`` and an input direction ``j`` scores ``Σ_{i,δ} ΔL_{iδj}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# (w_star (r_out, k², r_in), lam_a (r_in,), lam_g (r_out,), locations T) → (out (r_out,), in (r_in,))
Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


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


_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, fn: Criterion) -> Criterion:
    """Make ``fn`` available as ``prune(method=name)`` (see :data:`Criterion` for its signature)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a criterion name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"a criterion must be callable, got {type(fn).__name__}")
    _CRITERIA[name] = fn
    return fn


def criterion(name: str) -> Criterion:
    """The criterion registered under ``name``."""
    try:
        return _CRITERIA[name]
    except KeyError:
        raise ValueError(f"method must be one of {criterion_names()}, got {name!r}") from None


def criterion_names() -> tuple[str, ...]:
    return tuple(_CRITERIA)


register_criterion("eigendamage", eigendamage_scores)


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
