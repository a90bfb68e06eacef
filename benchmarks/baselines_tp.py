"""The paper's channel baselines and today's peers, on the channel-removal engine of
:func:`lightning_eigendamage.channels.remove_channels` (Torch-Pruning's dependency graph).

Benchmark code: it needs the optional dependency ``torch-pruning`` (``pip install
lightning-eigendamage[baselines]``; tested with 1.6.1). The maths is in
:mod:`lightning_eigendamage.channels.baselines`; this module turns each method's per-channel scores into
the engine's inputs (docs/method.md §8):

1. A group's channel score is the *sum* of the scores of every Conv2d/Linear (or, for Network
   Slimming, BatchNorm) in the group whose output channels it removes; for the input-side
   Kron-OBS methods (``kron-obs-in…``) the sum over the layers that read the channel.
   Today's peers (Torch-Pruning's own L1/L2 magnitude and group Taylor importances) score groups
   their own way, with Torch-Pruning's defaults.
2. One global ranking over all groups' channels, at most ``max_group_ratio`` of a group and
   never its last ``min_channels``, until the channel or FLOPs target.
3. For C-OBS / Kron-OBS, every layer that loses output rows first receives its OBS update on the
   rows it keeps; for ``kron-obs-in…`` the readers' kept columns absorb the removed ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from lightning_eigendamage.channels.baselines import (
    CRITERIA,
    DEFAULT_DAMPING,
    InputObsUpdate,
    ObsUpdate,
    c_obs_scores,
    capture_diag_fisher,
    channel_scores,
    kron_obd_scores,
    kron_obs_scores,
    obs_update,
    slimming_scores,
    weight_matrix,
)
from lightning_eigendamage.channels.engine import (
    ChannelPruneReport,
    Scores,
    dependency_graph,
    input_side_scores,
    last_layer,
    prune_channels,
    remove_channels,
    sequential_group_scores,
)
from lightning_eigendamage.curvature import capture_factors, split_batch, to_device
from lightning_eigendamage.eigenbasis.pruner import find_layers

PEERS = ("l1", "l2", "taylor")
# input-side Kron-OBS: a channel is scored by the layers that read it and removed with their
# least-squares compensation (docs/method.md §8), ranked by damage per FLOP saved
# (what it is ranked by: the raw score, score per FLOP saved, or score over its group's mean score,
# Torch-Pruning's normaliser, which spreads the removal evenly over the layers)
INPUT_SIDE = {
    "kron-obs-in": "score",
    "kron-obs-in-flop": "per_flop",
    "kron-obs-in-mean": "relative",
    "kron-obs-in-mean-nocomp": "relative",  # the same channels, removed without the compensation
    # ranked by √damage over its group's mean √damage: a norm-like spread (damage is quadratic in
    # the weights), so a group with a few large scores is not stripped of all the others
    "kron-obs-in-sqrt": "relative",
    "kron-obs-in-sqrt-nocomp": "relative",
    # √ of greedy sequential scores: each group's channels removed step by step, every reader moved
    # to its compensated state after each step (channels.sequential_group_scores)
    "kron-obs-in-seq": "relative",
    "kron-obs-in-seq-flop": "relative_per_flop",  # the same over the FLOPs one channel saves
    "kron-obs-in-seq-median": "relative_median",  # over the group's median, not its mean
}
# prune_channels itself with a ranking of its own: name → its options (the latency table measured
# on the process's threads: at batch 64 for inference, or the training step at the recipe's 128)
ENGINE_RANKED: dict[str, dict[str, Any]] = {
    "kron-obs-in-seq-latency": {"rank_by": "relative_per_latency", "latency_batch": 64},
    "kron-obs-in-seq-latency-train": {
        "rank_by": "relative_per_latency",
        "latency_batch": 128,
        "latency_mode": "training",
    },
    # kron-obs-in-seq's ranking with every group's kept width a multiple of 8 (round_to)
    "kron-obs-in-seq-r8": {"rank_by": "relative", "round_to": 8},
}
# a peer's channels (Torch-Pruning's importance chooses them) removed with the input-side Kron-OBS
# compensation of their readers: separates "which channels go" from "how the rest absorb them"
COMPENSATED_PEERS = {"l1-comp": "l1"}
METHODS = (
    CRITERIA + tuple(INPUT_SIDE) + tuple(ENGINE_RANKED) + ("slimming",) + PEERS + tuple(COMPENSATED_PEERS)
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
    if method in INPUT_SIDE:
        return input_side_scores(
            model,
            batches,
            exclude=exclude,
            damping=damping,
            seed=seed,
            fisher=fisher,
            loss_fn=loss_fn,
            input_fn=input_fn,
            max_batches=max_batches,
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
        if (why := lf.unusable()) is not None:
            skipped[name] = why
            continue
        w = weight_matrix(module)
        a, g = lf.a().to(w.device), lf.g().to(w.device)
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
    if method in ENGINE_RANKED:
        return prune_channels(
            model,
            batches,
            ratio=ratio,
            target=target,
            recalibrate_bn=False,  # as for the other methods: the protocol re-estimates BN itself
            **ENGINE_RANKED[method],
            layer_cap=max_group_ratio,
            min_channels=min_channels,
            exclude=ignored or None,
            fisher=fisher,
            damping=damping,
            seed=seed,
            max_batches=max_batches,
            loss_fn=loss_fn,
            input_fn=input_fn,
        )
    kwargs = dict(
        ratio=ratio,
        target=target,
        ignored_layers=ignored,
        exempt_last=exempt_last,
        max_group_ratio=max_group_ratio,
        min_channels=min_channels,
        method=method,
    )

    def scores_of(criterion: str) -> tuple[Scores, dict, dict[str, str]]:
        return baseline_scores(
            model,
            batches,
            criterion,
            fisher=fisher,
            damping=damping,
            exclude=ignored or None,
            seed=seed,
            max_batches=max_batches,
            loss_fn=loss_fn,
            input_fn=input_fn,
        )

    if method in COMPENSATED_PEERS:
        _, in_updates, _ = scores_of("kron-obs-in")
        imp = magnitude_importance(1 if COMPENSATED_PEERS[method] == "l1" else 2)
        return remove_channels(model, example_inputs, importance=imp, in_updates=in_updates, **kwargs)
    if method in PEERS:
        if method == "taylor":
            accumulate_gradients(model, batches, loss_fn=loss_fn, input_fn=input_fn, max_batches=max_batches)
            imp = taylor_importance()
        else:
            imp = magnitude_importance(1 if method == "l1" else 2)
        try:
            return remove_channels(model, example_inputs, importance=imp, **kwargs)
        finally:
            model.zero_grad(set_to_none=True)
    scores, updates, skipped = scores_of(method)
    if method.startswith("kron-obs-in-seq"):
        ignored = [*ignored, *([last] if exempt_last and (last := last_layer(model, example_inputs)) else [])]
        graph = dependency_graph(model, example_inputs, ignored)
        imp = sequential_group_scores(graph, updates)  # GREEDY_STEPS, prune_channels' default
        kwargs |= dict(ignored_layers=ignored, exempt_last=False)
        report = remove_channels(
            model,
            example_inputs,
            importance=imp,
            in_updates=updates,
            rank_by=INPUT_SIDE[method],
            graph=graph,
            **kwargs,
        )
        report.skipped = skipped
        return report
    if method in INPUT_SIDE:
        if method.startswith("kron-obs-in-sqrt"):
            scores = {m: s.clamp_min(0).sqrt() for m, s in scores.items()}
        report = remove_channels(
            model,
            example_inputs,
            in_scores=scores,
            in_updates=None if method.endswith("-nocomp") else updates,
            rank_by=INPUT_SIDE[method],
            **kwargs,
        )
    else:
        report = remove_channels(model, example_inputs, scores=scores, updates=updates, **kwargs)
    report.skipped = skipped
    return report
