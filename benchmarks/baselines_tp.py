"""Channel pruning for the paper's baselines and today's peers, with Torch-Pruning's dependency graph.

Benchmark code: it needs the optional dependency ``torch-pruning`` (``pip install
lightning-eigendamage[baselines]``; tested with 1.6.1). The maths is in
:mod:`lightning_eigendamage.baselines`; this module only turns per-channel scores into a real
structured pruning (docs/method.md §8):

1. Torch-Pruning's :class:`~torch_pruning.DependencyGraph` groups channels that must go together
   (a conv's output channel, its BatchNorm, the next layers' input channels, and every layer
   coupled to it through residual adds or concatenations).
2. A group's channel score is the *sum* of the scores of every Conv2d/Linear (or, for Network
   Slimming, BatchNorm) in the group whose output channels it removes (docs/method.md §8).
   Today's peers (Torch-Pruning's own L1/L2 magnitude and group Taylor importances) score groups
   their own way, with Torch-Pruning's defaults.
3. One global ranking over all groups' channels: the lowest-scoring channels are removed, at most
   ``max_group_ratio`` of a group and never its last ``min_channels``, until ``ratio`` of the
   prunable channels (``target="channels"``) or of the model's FLOPs (``target="flops"``) is gone.
4. For C-OBS / Kron-OBS, every layer that loses output rows first receives its OBS update
   ``δW`` (and ``δb`` for Kron-OBS) on the rows it keeps; then Torch-Pruning removes the channels.

FLOPs are per example, 2 per multiply-add, counted by ``torch.utils.flop_counter`` in eval mode
(:func:`lightning_eigendamage.costs.count_flops`); the search uses an exact analytic count of the
Conv2d/Linear FLOPs, and treats every other op's FLOPs as fixed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from lightning_eigendamage.baselines import (
    CRITERIA,
    DEFAULT_DAMPING,
    InputObsUpdate,
    ObsUpdate,
    c_obs_scores,
    capture_diag_fisher,
    channel_scores,
    damped_inverse,
    input_obs_scores,
    kron_obd_scores,
    kron_obs_scores,
    obs_update,
    slimming_scores,
    weight_matrix,
)
from lightning_eigendamage.costs import count_flops, count_params
from lightning_eigendamage.curvature import capture_factors, split_batch, to_device
from lightning_eigendamage.pruner import find_layers

PEERS = ("l1", "l2", "taylor")
# input-side Kron-OBS: a channel is scored by the layers that read it and removed with their
# least-squares compensation (docs/method.md §8), ranked by damage per FLOP saved
# (what it is ranked by: the raw score, score per FLOP saved, or score over its group's mean score,
# Torch-Pruning's normaliser, which spreads the removal evenly over the layers)
INPUT_SIDE = {"kron-obs-in": "score", "kron-obs-in-flop": "per_flop", "kron-obs-in-mean": "group_mean"}
RANKS = ("score", "per_flop", "group_mean")
METHODS = CRITERIA + tuple(INPUT_SIDE) + ("slimming",) + PEERS
TARGETS = ("channels", "flops")

Scores = dict[nn.Module, torch.Tensor]
Update = Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor | None]]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class ChannelPruneReport:
    """What :func:`prune_channels` did; ``to_dict()`` is plain data.

    ``groups``: one entry per prunable dependency group: ``root`` (module name), ``channels``
    (before), ``removed`` (root channel indices). FLOPs are per example (FlopCounterMode).
    """

    method: str
    target: str
    ratio: float
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    channels_total: int
    channels_removed: int
    flops_planned: int = 0  # the analytic count the search stopped at (equals flops_after)
    groups: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def flops_fraction_removed(self) -> float:
        return 1.0 - self.flops_after / max(self.flops_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Analytic Conv2d/Linear FLOPs under channel removal
# ---------------------------------------------------------------------------------------------


@dataclass
class _LayerCost:
    """``flops = coef · (c_in / groups) · c_out`` (``coef = 2·Σ_calls T·k²``); depthwise: ``coef · c``."""

    coef: int
    c_in: int
    c_out: int
    groups: int
    depthwise: bool

    def flops(self) -> int:
        if self.depthwise:
            return self.coef * self.c_out
        return self.coef * (self.c_in // self.groups) * self.c_out


def _layer_costs(model: nn.Module, example: Any) -> tuple[dict[nn.Module, _LayerCost], list[nn.Module]]:
    """Per Conv2d/Linear that runs on ``example``: its cost model, and the modules in call order."""
    costs: dict[nn.Module, _LayerCost] = {}
    order: list[nn.Module] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        n = output.shape[0]
        if isinstance(module, nn.Conv2d):
            t = output.shape[2] * output.shape[3]
            k2 = module.kernel_size[0] * module.kernel_size[1]
            c_in, c_out, groups = module.in_channels, module.out_channels, module.groups
        else:
            t = output.numel() // (n * module.out_features)
            k2, c_in, c_out, groups = 1, module.in_features, module.out_features, 1
        if module not in costs:
            depthwise = groups > 1 and groups == c_in == c_out
            costs[module] = _LayerCost(0, c_in, c_out, groups, depthwise)
            order.append(module)
        costs[module].coef += 2 * t * k2

    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        _run(model, _first(example))
    finally:
        for h in handles:
            h.remove()
    return costs, order


def _first(example: Any) -> Any:
    if isinstance(example, torch.Tensor):
        return example[:1]
    if isinstance(example, (tuple, list)):
        return type(example)(_first(e) for e in example)
    return example


def _run(model: nn.Module, example: Any) -> Any:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            return model(example)
    finally:
        for m, mode in modes.items():
            m.training = mode


# ---------------------------------------------------------------------------------------------
# Groups and their scores
# ---------------------------------------------------------------------------------------------


@dataclass
class _Group:
    root: nn.Module
    root_fn: Callable
    n: int
    scores: torch.Tensor  # (n,) float64
    # per member Conv2d/Linear: (module, side, Counter root_idx → number of its indices)
    effects: list[tuple[nn.Module, str, Counter]]
    rows: list[tuple[nn.Module, list[int], list[int]]]  # out-side members: (module, idxs, root_idxs)
    cols: list[tuple[nn.Module, list[int], list[int]]]  # in-side members: (module, idxs, root_idxs)


def _group_score(
    group: Any, dg: tp.DependencyGraph, n: int, scores: Scores | None, importance: Any, in_scores: Scores
):
    """``(n,)`` float64 scores of a full group's root channels, or None if nothing in it is scored:
    the sum of the output-channel ``scores`` of its producers and the input-channel ``in_scores``
    of the layers that read it."""
    if importance is not None:
        s = importance(group)
        return None if s is None else s.detach().to(torch.float64).reshape(-1)
    total = torch.zeros(n, dtype=torch.float64)
    hit = False
    for item in group:
        module = item.dep.target.module
        out_side = dg.is_out_channel_pruning_fn(item.dep.handler)
        table = (scores or {}) if out_side else in_scores
        if module in table and (out_side or dg.is_in_channel_pruning_fn(item.dep.handler)):
            idxs, roots = list(item.idxs), list(item.root_idxs)
            if any(r is None for r in roots):
                continue
            total.index_add_(0, torch.tensor(roots), table[module].detach().cpu().to(torch.float64)[idxs])
            hit = True
    return total if hit else None


def _collect_groups(
    dg: tp.DependencyGraph,
    ignored: list[nn.Module],
    costs: dict[nn.Module, _LayerCost],
    scores: Scores | None,
    importance: Any,
    names: dict[nn.Module, str],
    in_scores: Scores,
) -> list[_Group]:
    groups = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        root_item = group[0]
        root = root_item.dep.target.module
        n = len(root_item.idxs)
        s = _group_score(group, dg, n, scores, importance, in_scores)
        if s is None:
            continue
        if s.numel() != n or not bool(torch.isfinite(s).all()):
            raise ValueError(f"group rooted at {names.get(root)}: scores must be {n} finite numbers")
        effects, rows, cols = [], [], []
        for item in group:
            module = item.dep.target.module
            if module not in costs:
                continue
            side = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            roots = [r for r in item.root_idxs if r is not None]
            effects.append((module, side, Counter(roots)))
            (rows if side == "out" else cols).append((module, list(item.idxs), list(item.root_idxs)))
        groups.append(_Group(root, root_item.dep.handler, n, s, effects, rows, cols))
    return groups


# ---------------------------------------------------------------------------------------------
# Global selection
# ---------------------------------------------------------------------------------------------


def _select(
    groups: list[_Group],
    costs: dict[nn.Module, _LayerCost],
    *,
    ratio: float,
    target: str,
    max_group_ratio: float,
    min_channels: int,
    other_flops: int,
    flops_before: int,
    flops_tolerance: float = 0.03,
    rank_by: str = "score",
) -> tuple[list[list[int]], int]:
    """Root channels removed per group (lowest scores first under the caps, until the target), and
    the analytic FLOPs after removal. ``rank_by="per_flop"`` ranks by score per FLOP that the
    channel's removal saves from the unpruned network, ``"group_mean"`` by score over the mean
    score of its group."""
    caps = [max(0, min(math.floor(max_group_ratio * g.n + 1e-9), g.n - min_channels)) for g in groups]
    state = {m: _LayerCost(c.coef, c.c_in, c.c_out, c.groups, c.depthwise) for m, c in costs.items()}
    flops = other_flops + sum(c.flops() for c in state.values())
    goal_channels = math.floor(ratio * sum(g.n for g in groups) + 1e-9)
    goal_flops = (1.0 - ratio) * flops_before
    chosen: list[list[int]] = [[] for _ in groups]
    n_removed = 0

    def done() -> bool:
        return n_removed >= goal_channels if target == "channels" else flops <= goal_flops

    def apply(gi: int, c: int, dry: bool) -> int:
        """FLOPs change of removing root channel ``c`` of group ``gi`` (applied unless ``dry``)."""
        delta = 0
        for module, side, counter in groups[gi].effects:
            k = counter.get(c, 0)
            if not k:
                continue
            st = state[module]
            new = _LayerCost(st.coef, st.c_in, st.c_out, st.groups, st.depthwise)
            if side == "out" or new.depthwise:
                new.c_out -= k
                if new.depthwise:
                    new.c_in = new.groups = new.c_out
            else:
                new.c_in -= k
            delta += new.flops() - st.flops()
            if not dry:
                state[module] = new
        return delta

    def rank(gi: int, c: int) -> float:
        score = float(groups[gi].scores[c])
        if rank_by == "per_flop":
            return score / max(-apply(gi, c, dry=True), 1)
        if rank_by == "group_mean":
            return score / max(float(groups[gi].scores.mean()), 1e-300)
        return score

    pool = sorted(
        ((rank(gi, c), gi, c) for gi, g in enumerate(groups) for c in range(g.n)),
        key=lambda x: (x[0], x[1], x[2]),
    )
    # With a FLOPs target, a channel whose removal would land more than `flops_tolerance` below
    # the goal is passed over for the next ones in the ranking (a thin, cheap channel elsewhere);
    # only if the goal cannot be met otherwise are passed-over channels taken, in ranking order.
    floor = (1.0 - flops_tolerance) * goal_flops
    passed: list[tuple[int, int]] = []
    for _, gi, c in pool:
        if done():
            break
        if len(chosen[gi]) >= caps[gi]:
            continue
        if target == "flops" and flops + apply(gi, c, dry=True) < floor:
            passed.append((gi, c))
            continue
        chosen[gi].append(c)
        n_removed += 1
        flops += apply(gi, c, dry=False)
    for gi, c in passed:
        if done():
            break
        if len(chosen[gi]) >= caps[gi]:
            continue
        chosen[gi].append(c)
        n_removed += 1
        flops += apply(gi, c, dry=False)
    return [sorted(c) for c in chosen], flops


# ---------------------------------------------------------------------------------------------
# prune_channels
# ---------------------------------------------------------------------------------------------


def _check(ratio: float, target: str, max_group_ratio: float, min_channels: int) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not 0.0 < max_group_ratio <= 1.0:
        raise ValueError(f"max_group_ratio must be in (0, 1], got {max_group_ratio!r}")
    if not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"min_channels must be an integer ≥ 1, got {min_channels!r}")


def last_layer(model: nn.Module, example_inputs: Any) -> nn.Module | None:
    """The last Conv2d/Linear to run on ``example_inputs`` (the classifier, usually)."""
    _, order = _layer_costs(model, example_inputs)
    return order[-1] if order else None


def prune_channels(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float,
    target: str = "channels",
    scores: Scores | None = None,
    importance: Callable[[Any], torch.Tensor | None] | None = None,
    updates: dict[nn.Module, Update] | None = None,
    in_scores: Scores | None = None,
    in_updates: dict[nn.Module, Callable[[list[int]], torch.Tensor]] | None = None,
    rank_by: str = "score",
    ignored_layers: Iterable[nn.Module] | None = None,
    exempt_last: bool = True,
    max_group_ratio: float = 0.95,
    min_channels: int = 1,
    method: str = "custom",
    flops_tolerance: float = 0.03,
) -> ChannelPruneReport:
    """Remove real channels of ``model`` in place, ranked globally by group scores.

    Args:
        model: any ``nn.Module`` Torch-Pruning can trace; its train/eval modes are kept.
        example_inputs: a batch the model accepts (traced once; FLOPs use its first example).
        ratio: in ``[0, 1)``: fraction of the prunable channels (``target="channels"``) or of the
            model's FLOPs (``target="flops"``) to remove.
        scores: module → per-output-channel scores ``(C_out,)`` (Conv2d/Linear, or BatchNorm for
            Network Slimming); a group's score is the sum over its members. Groups with no scored
            member are left alone.
        importance: instead of ``scores``, a Torch-Pruning importance called on each full group.
        updates: module → OBS update (``removed rows → (δW (C_out, d), δb or None)``), applied to
            ``weight.reshape(C_out, -1)`` / ``bias`` before the channels are removed.
        in_scores: module → per-input-channel scores (``(C_in,)`` of a Conv2d, ``(in_features,)``
            of a Linear) of the layers that read a group, added to its score.
        in_updates: module → input-side update (``removed input channels → δW (C_out, d)``),
            applied like ``updates`` to the layers that lose input channels.
        rank_by: ``"score"``, ``"per_flop"`` or ``"group_mean"`` (see :func:`_select`).
        ignored_layers: modules whose output channels are never removed; with ``exempt_last`` the
            last Conv2d/Linear to run is added.
        max_group_ratio: at most this fraction of one group's channels is removed;
            ``min_channels``: channels always kept per group (the best ones).
        flops_tolerance: with ``target="flops"``, a channel whose removal would leave fewer than
            ``(1 − flops_tolerance)`` of the goal's FLOPs is passed over for the next ones in the
            ranking (when the cheap channels are capped, one wide early channel can cost several
            % of the goal), so that matched-FLOPs comparisons land within the tolerance.

    Returns:
        A :class:`ChannelPruneReport`.
    """
    _check(ratio, target, max_group_ratio, min_channels)
    if rank_by not in RANKS:
        raise ValueError(f"rank_by must be one of {RANKS}, got {rank_by!r}")
    if sum(x is not None for x in (scores, importance, in_scores)) != 1:
        raise ValueError(
            "pass exactly one of scores= (per-layer channel scores), in_scores= (per-layer input "
            "channel scores) or importance= (Torch-Pruning)"
        )
    ignored = list(ignored_layers or [])
    if exempt_last:
        last = last_layer(model, example_inputs)
        if last is not None and last not in ignored:
            ignored.append(last)
    names = {m: n for n, m in model.named_modules()}
    modes = {m: m.training for m in model.modules()}
    params_before = count_params(model)
    flops_before = count_flops(model, example_inputs)
    costs, _ = _layer_costs(model, example_inputs)
    other = flops_before - sum(c.flops() for c in costs.values())

    model.eval()  # tracing runs a forward pass: keep BatchNorm statistics untouched
    try:
        # Torch-Pruning calls model(*example_inputs) first: a batch tensor must not be unpacked.
        traced = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=traced, verbose=False)
        groups = _collect_groups(dg, ignored, costs, scores, importance, names, in_scores or {})
        chosen, planned = _select(
            groups,
            costs,
            ratio=ratio,
            target=target,
            max_group_ratio=max_group_ratio,
            min_channels=min_channels,
            other_flops=other,
            flops_before=flops_before,
            flops_tolerance=flops_tolerance,
            rank_by=rank_by,
        )
        # OBS updates first, on the full-size weights; a module's output rows belong to one group.
        removed_rows: dict[nn.Module, list[int]] = {}
        removed_cols: dict[nn.Module, list[int]] = {}
        for g, sel in zip(groups, chosen):
            keep = set(sel)
            for module, idxs, roots in g.rows:
                removed_rows.setdefault(module, []).extend(i for i, r in zip(idxs, roots) if r in keep)
            for module, idxs, roots in g.cols:
                removed_cols.setdefault(module, []).extend(i for i, r in zip(idxs, roots) if r in keep)
        with torch.no_grad():
            for module, update in (updates or {}).items():
                rows = sorted(set(removed_rows.get(module, [])))
                if not rows:
                    continue
                dw, db = update(rows)
                module.weight.add_(dw.reshape(module.weight.shape).to(module.weight))
                if db is not None and module.bias is not None:
                    module.bias.add_(db.to(module.bias))
            for module, update in (in_updates or {}).items():
                chans = sorted(set(removed_cols.get(module, [])))
                if chans:
                    module.weight.add_(update(chans).reshape(module.weight.shape).to(module.weight))
        for g, sel in zip(groups, chosen):
            if not sel:
                continue
            group = dg.get_pruning_group(g.root, g.root_fn, sel)
            if not dg.check_pruning_group(group):
                raise RuntimeError(f"pruning {len(sel)} channels of {names.get(g.root)} would empty a layer")
            group.prune()
    finally:
        for m, mode in modes.items():
            m.training = mode
    return ChannelPruneReport(
        method=method,
        target=target,
        ratio=float(ratio),
        params_before=params_before,
        params_after=count_params(model),
        flops_before=flops_before,
        flops_after=count_flops(model, example_inputs),
        channels_total=sum(g.n for g in groups),
        channels_removed=sum(len(s) for s in chosen),
        flops_planned=planned,
        groups=[
            {"root": names.get(g.root, "?"), "channels": g.n, "removed": s} for g, s in zip(groups, chosen)
        ],
    )


# ---------------------------------------------------------------------------------------------
# Scores for every method
# ---------------------------------------------------------------------------------------------


def magnitude_importance(p: int) -> tp.importance.GroupMagnitudeImportance:
    """Torch-Pruning's group L``p`` magnitude importance with its defaults (mean over the group,
    normalised by the group mean): ``p=1`` is the "L1" peer, ``p=2`` the "L2" peer."""
    return tp.importance.GroupMagnitudeImportance(p=p)


def taylor_importance() -> tp.importance.GroupTaylorImportance:
    """Torch-Pruning's group Taylor importance ``Σ|w·∂L/∂w|`` with its defaults; needs ``.grad``
    (see :func:`accumulate_gradients`)."""
    return tp.importance.GroupTaylorImportance()


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    max_batches: int | None = None,
) -> int:
    """Fill ``.grad`` with the gradient of the mean training loss over ``batches`` (eval mode, so
    BatchNorm statistics are untouched; modes restored). Returns the number of batches used."""
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y))
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    model.zero_grad(set_to_none=True)
    batches = list(batches if max_batches is None else (b for i, b in zip(range(max_batches), batches)))
    try:
        for batch in batches:
            x, y = split_batch(batch, input_fn)
            loss = loss_fn(model(to_device(x, device)), to_device(y, device)) / len(batches)
            loss.backward()
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not batches:
        raise ValueError("batches is empty")
    return len(batches)


def baseline_scores(
    model: nn.Module,
    batches: Iterable[Any],
    method: str,
    *,
    fisher: str = "true",
    damping: float = DEFAULT_DAMPING,
    exclude: Any = None,
    seed: int = 0,
    max_batches: int | None = None,
    loss_fn: Callable | None = None,
    input_fn: Callable | None = None,
) -> tuple[Scores, dict[nn.Module, ObsUpdate | InputObsUpdate], dict[str, str]]:
    """Per-layer output-channel scores of a parameter-space baseline, and OBS updates.

    ``method`` in ``("c-obd", "c-obs", "kron-obd", "kron-obs", "kron-obs-in", "slimming")``; for
    ``kron-obs-in`` the scores are per *input* channel and the updates :class:`InputObsUpdate`
    (pass them as ``in_scores`` / ``in_updates``). Curvature comes from
    ``batches`` exactly as for EigenDamage (eval mode, true Fisher with labels sampled by a generator
    seeded with ``seed``, or the empirical Fisher), with the patch-form ``A`` for convs.
    Layers the core cannot score correctly (grouped/depthwise convs, shared or frozen weights,
    layers run more than once per forward, no gradient) are returned in ``skipped`` with the reason.

    Returns:
        ``(scores, updates, skipped)``: module → ``(C_out,)`` float64; module → :class:`ObsUpdate`
        (C-OBS/Kron-OBS only); layer name → reason.
    """
    if method == "slimming":
        bns = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
        ]
        return {bn: slimming_scores(bn) for bn in bns}, {}, {}
    if method not in CRITERIA + tuple(INPUT_SIDE):
        raise ValueError(
            f"method must be one of {CRITERIA + tuple(INPUT_SIDE) + ('slimming',)}, got {method!r}"
        )
    cands = find_layers(model, exclude)
    skipped = {c.name: c.skipped for c in cands if c.skipped is not None}
    layers = {c.name: c.unit for c in cands if c.skipped is None}
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    common = dict(
        factors_for=list(layers),
        fisher=fisher,
        loss_fn=loss_fn,
        input_fn=input_fn,
        generator=gen,
        max_batches=max_batches,
    )
    scores: Scores = {}
    updates: dict[nn.Module, ObsUpdate | InputObsUpdate] = {}
    if method == "c-obd":
        res = capture_diag_fisher(model, layers, batches, **common)
        for name, module in layers.items():
            if res.max_calls.get(name, 0) > 1:
                skipped[name] = f"called {res.max_calls[name]} times per forward pass"
            elif name not in res.fisher:
                skipped[name] = "never called, or no gradient reached its output"
            else:
                scores[module] = channel_scores("c-obd", weight_matrix(module), fisher_diag=res.fisher[name])
        return scores, updates, skipped
    res = capture_factors(model, layers, batches, a_form="patch", **common)
    for name, module in layers.items():
        lf = res.layers[name]
        if lf.max_calls > 1:
            skipped[name] = f"called {lf.max_calls} times per forward pass"
            continue
        if not lf.reached or lf.a_rows == 0 or lf.g_rows == 0:
            skipped[name] = "never called, or no gradient reached its output"
            continue
        w = weight_matrix(module)
        a, g = lf.a().to(w.device), lf.g().to(w.device)
        if method in INPUT_SIDE:
            block = w.shape[1] // (
                module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            )
            a_inv = damped_inverse(a, damping)
            scores[module] = input_obs_scores(w, a_inv, g, block, lf.locations)
            updates[module] = InputObsUpdate(w, a_inv, block)
            continue
        if method == "kron-obd":
            scores[module] = kron_obd_scores(w, a, g, lf.locations)
            continue
        bias = None if module.bias is None else module.bias.detach()
        upd = obs_update(method, w, a=a, g=g, bias=bias, damping=damping)  # holds the damped inverses
        if method == "c-obs":
            scores[module] = c_obs_scores(w, upd.a_inv, upd.g_inv, lf.locations)
        else:
            scores[module] = kron_obs_scores(w, a, upd.g_inv, lf.locations)
        updates[module] = upd
    return scores, updates, skipped


def prune_baseline(
    model: nn.Module,
    batches: Sequence[Any],
    method: str,
    *,
    ratio: float,
    target: str = "flops",
    example_inputs: Any = None,
    fisher: str = "true",
    damping: float = DEFAULT_DAMPING,
    ignored_layers: Iterable[nn.Module] | None = None,
    exempt_last: bool = True,
    max_group_ratio: float = 0.95,
    min_channels: int = 1,
    seed: int = 0,
    max_batches: int | None = None,
    loss_fn: Callable | None = None,
    input_fn: Callable | None = None,
) -> ChannelPruneReport:
    """Score channels with ``method`` (:data:`METHODS`) and remove them with :func:`prune_channels`.

    ``batches`` (a re-iterable sequence) give the curvature (C-OBD/C-OBS/Kron-OBD/Kron-OBS) or the
    gradients (``taylor``); ``example_inputs`` defaults to the first batch's input. ``slimming``,
    ``l1``, ``l2`` use the weights only. Matched-FLOPs comparisons use ``target="flops"``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if example_inputs is None:
        if not batches:
            raise ValueError("batches is empty and no example_inputs given")
        device = next(model.parameters()).device
        example_inputs = to_device(split_batch(batches[0], input_fn)[0], device)
    ignored = list(ignored_layers or [])
    kwargs = dict(
        ratio=ratio,
        target=target,
        ignored_layers=ignored,
        exempt_last=exempt_last,
        max_group_ratio=max_group_ratio,
        min_channels=min_channels,
        method=method,
    )
    if method in PEERS:
        if method == "taylor":
            accumulate_gradients(model, batches, loss_fn=loss_fn, input_fn=input_fn, max_batches=max_batches)
            imp = taylor_importance()
        else:
            imp = magnitude_importance(1 if method == "l1" else 2)
        try:
            return prune_channels(model, example_inputs, importance=imp, **kwargs)
        finally:
            model.zero_grad(set_to_none=True)
    scores, updates, skipped = baseline_scores(
        model,
        batches,
        method,
        fisher=fisher,
        damping=damping,
        exclude=ignored or None,
        seed=seed,
        max_batches=max_batches,
        loss_fn=loss_fn,
        input_fn=input_fn,
    )
    if method in INPUT_SIDE:
        report = prune_channels(
            model, example_inputs, in_scores=scores, in_updates=updates, rank_by=INPUT_SIDE[method], **kwargs
        )
    else:
        report = prune_channels(model, example_inputs, scores=scores, updates=updates, **kwargs)
    report.skipped = skipped
    return report
