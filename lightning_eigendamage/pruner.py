"""One EigenDamage pruning step, framework-free: factors → bases → scores → plan → surgery."""

from __future__ import annotations

import fnmatch
import itertools
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .costs import Cost, Geometry, count_flops, count_params, form_cost, time_modules
from .criteria import eigendamage_scores, global_marks, global_threshold, keep_side
from .curvature import (
    A_FORMS,
    FISHER_TYPES,
    LIKELIHOODS,
    CaptureResult,
    capture_factors,
    split_batch,
    to_device,
)
from .distributed import all_reduce_capture, broadcast_object, is_distributed, split_eigh
from .eigenbasis import eigh_factors, to_kfe
from .layers import FORMS, KFELayer
from .surgery import LayerState, build_layer, is_channels_last, read_state, swap_modules

METHODS = ("eigendamage",)
TARGETS = ("directions", "params", "flops")
FORM_CHOICES = ("auto",) + FORMS
FORM_BY = ("cost", "latency")


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerReport:
    """One Conv2d/Linear considered by a pruning call.

    ``in_features``/``out_features`` are the original widths; ``kept_in``/``kept_out`` the
    eigen-directions (core widths) after the call; ``skipped`` the reason the layer was left
    alone, or None. Costs are per example (FLOPs = 2·MACs), None where unknown.
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    kept_in: int
    kept_out: int
    form: str
    skipped: str | None = None
    removed_in: int = 0
    removed_out: int = 0
    params_before: int | None = None
    params_after: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None


@dataclass
class PruneReport:
    """What a pruning call did. ``to_dict()`` gives plain data (checkpoint-safe).

    ``target_reached``: whether a ``"params"``/``"flops"`` target was met (within
    ``TARGET_TOLERANCE``; always True for ``"directions"``, whose ``ratio`` is a threshold
    quantile); ``reached``: the fraction of the target's unit actually removed (for
    ``"directions"``: ``realised_fraction``); ``limited_by``: why the target was out of reach
    (layer caps, ``min_rank``, skipped layers), None when it was reached.
    """

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    ratio: float
    target: str
    realised_fraction: float
    threshold: float
    quantile: float
    batches: int
    skipped_batches: int
    method: str = "eigendamage"
    fisher: str = "true"
    layers: list[LayerReport] = field(default_factory=list)
    target_reached: bool = True
    reached: float = 0.0
    limited_by: str | None = None

    @property
    def param_compression(self) -> float:
        return self.params_before / max(self.params_after, 1)

    @property
    def flops_compression(self) -> float:
        return self.flops_before / max(self.flops_after, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PruneReport:
        d = dict(d)
        layers = [LayerReport(**entry) for entry in d.pop("layers", [])]
        return cls(**d, layers=layers)

    def summary(self) -> str:
        """A per-layer table (widths before → kept directions, form) with totals."""
        w = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'in→out':>11}  {'kept in→out':>11}  {'form':<10}  note"]
        for r in self.layers:
            note = r.skipped or ""
            lines.append(
                f"{r.name:<{w}}  {f'{r.in_features}→{r.out_features}':>11}  "
                f"{f'{r.kept_in}→{r.kept_out}':>11}  {r.form:<10}  {note}"
            )
        lines.append(
            f"params {self.params_before:,} → {self.params_after:,} "
            f"({self.param_compression:.2f}×), FLOPs/example {self.flops_before:,} → "
            f"{self.flops_after:,} ({self.flops_compression:.2f}×), directions removed "
            f"{self.realised_fraction:.1%} (target {self.target} {self.ratio:g})"
        )
        return "\n".join(lines)


@dataclass
class LayerChange:
    """How :func:`prune` rewrote one layer (live modules and tensors: not for checkpoints).

    The old core weight ``W`` ``(d_out, k², d_in)`` became ``W*' = Q_G[:, kept_out]ᵀ W Q_A[:, kept_in]``,
    the rotations ``R_in' = Q_A[:, kept_in]ᵀ R_in`` and ``R_out' = R_out Q_G[:, kept_out]`` (see
    :mod:`lightning_eigendamage.surgery`), then folded according to ``form``.
    """

    old: nn.Module  # the unit before the call: Conv2d/Linear or KFELayer
    new: nn.Module  # its installed replacement
    q_a: torch.Tensor  # (d_in, d_in) eigenvectors of the core's A, float64
    q_g: torch.Tensor  # (d_out, d_out) eigenvectors of the core's G, float64
    kept_in: list[int]
    kept_out: list[int]
    form: str


# ---------------------------------------------------------------------------------------------
# Finding layers
# ---------------------------------------------------------------------------------------------


def _fastpath_reads_weights(layer: nn.Module) -> bool:
    """Whether PyTorch's fused encoder fast path may read ``layer.linear1/2.weight`` directly.

    Only ``nn.TransformerEncoderLayer`` has such a path (``torch._transformer_encoder_layer_fwd``,
    also entered through ``nn.TransformerEncoder``); decoder layers always call their linears as
    modules. The path is taken in eval mode only when these static conditions hold (checked as
    in ``TransformerEncoderLayer.forward``): if one fails, the linears always run as modules.
    """
    if not isinstance(layer, nn.TransformerEncoderLayer):
        return False
    attn = layer.self_attn
    return bool(
        attn.batch_first
        and attn.in_proj_bias is not None
        and attn._qkv_same_embed_dim
        and getattr(layer, "activation_relu_or_gelu", False)
        and layer.norm1.eps == layer.norm2.eps
        and attn.num_heads % 2 == 0
    )



@dataclass
class Candidate:
    name: str
    unit: nn.Module  # plain Conv2d/Linear, or KFELayer
    hook_module: nn.Module  # the module whose input/output define the factors
    skipped: str | None = None

    @property
    def kind(self) -> str:
        core = self.hook_module
        return "conv2d" if isinstance(core, nn.Conv2d) else "linear"

    @property
    def widths(self) -> tuple[int, int]:
        u = self.unit
        if isinstance(u, KFELayer):
            return u.in_features, u.out_features
        if isinstance(u, nn.Conv2d):
            return u.in_channels, u.out_channels
        return u.in_features, u.out_features


def _matches(name: str, module: nn.Module, exclude: Iterable[Any]) -> bool:
    for e in exclude:
        if isinstance(e, str):
            if fnmatch.fnmatchcase(name, e):
                return True
        elif isinstance(e, re.Pattern):
            if e.fullmatch(name):
                return True
        elif isinstance(e, type):
            if isinstance(module, e):
                return True
        elif e is module:
            return True
    return False


def _normalise_exclude(exclude: Any) -> list[Any]:
    if exclude is None:
        return []
    if isinstance(exclude, (str, re.Pattern, type, nn.Module)):
        return [exclude]
    try:
        items = list(exclude)
    except TypeError:
        raise TypeError(
            "exclude takes a module instance, a module type, a name pattern (glob string), a compiled "
            f"regular expression, or a list of these; got {type(exclude).__name__} {exclude!r}"
        ) from None
    for e in items:
        if not isinstance(e, (str, re.Pattern, type, nn.Module)):
            raise TypeError(
                "exclude takes module instances, module types, name patterns (glob strings) or "
                f"compiled regular expressions; got {type(e).__name__}"
            )
    return items


def find_layers(model: nn.Module, exclude: Any = None) -> list[Candidate]:
    """Every Conv2d/Linear (or already pruned :class:`KFELayer`) in ``model``, with skip reasons
    known before running it."""
    exclude = _normalise_exclude(exclude)
    # Modules or parameters reachable under several names are shared: never rebuilt.
    names_of: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        names_of[id(m)] = names_of.get(id(m), 0) + 1
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))

    found: list[Candidate] = []
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, (KFELayer, nn.Conv2d, nn.Linear)):
                if id(child) in seen:
                    continue
                seen.add(id(child))
                hook = child.core if isinstance(child, KFELayer) else child
                cand = Candidate(name, child, hook)
                cand.skipped = _static_reason(child, hook, module, child_name, names_of, owners)
                if cand.skipped is None and _matches(name, child, exclude):
                    cand.skipped = "excluded by user"
                found.append(cand)
            else:
                visit(f"{name}.", child)

    visit("", model)
    return found


def _static_reason(unit, core, parent, child_name, names_of, owners) -> str | None:
    if isinstance(parent, nn.MultiheadAttention):
        return "called functionally by nn.MultiheadAttention (its hooks never fire)"
    if child_name in ("linear1", "linear2") and _fastpath_reads_weights(parent):
        return "read as .weight by PyTorch's fused Transformer fast path"
    if not isinstance(unit, KFELayer) and type(unit) not in (nn.Conv2d, nn.Linear):
        return f"{type(unit).__name__} subclasses {type(core).__mro__[1].__name__}; its forward may differ"
    if isinstance(core.weight, nn.parameter.UninitializedParameter):
        return "uninitialised lazy module"
    if isinstance(core, nn.Conv2d) and core.groups > 1:
        if core.groups == core.in_channels:
            return "depthwise convolution"
        return f"grouped convolution (groups={core.groups})"
    if names_of.get(id(unit), 0) > 1:
        return "module is shared (registered under several names)"
    stage_params = list(unit.parameters())
    if any(len(owners.get(id(p), ())) > 1 for p in stage_params):
        return "tied or shared parameters"
    if not core.weight.requires_grad:
        return "frozen parameters"
    return None


# ---------------------------------------------------------------------------------------------
# Deciding
# ---------------------------------------------------------------------------------------------


@dataclass
class _LayerWork:
    cand: Candidate
    state: LayerState
    geo: Geometry
    bias: bool
    q_a: torch.Tensor
    q_g: torch.Tensor
    s_out: torch.Tensor
    s_in: torch.Tensor
    current: Cost
    input_shape: tuple[int, ...] | None = None  # per-example input of the whole layer


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if torch.is_tensor(t))


def _unchanged(work: _LayerWork) -> tuple[list[int], list[int], str, Cost, bool]:
    """The decision that leaves a layer as it is."""
    all_in, all_out = list(range(work.s_in.numel())), list(range(work.s_out.numel()))
    return all_in, all_out, work.state.form, work.current, False


def _choose(work: _LayerWork, r_in: int, r_out: int, form: str) -> tuple[str, Cost, bool]:
    """(form, cost, changed): the cheapest equivalent form for core ``r_in→r_out``.

    With ``form="auto"`` only forms that cost no more FLOPs *and* no more parameters than the layer
    does now are eligible; if none is strictly cheaper, the layer is left unchanged.
    """
    d_out, _, d_in = work.state.core.shape
    if form != "auto":
        return form, form_cost(work.geo, form, r_in, r_out, bias=work.bias), True
    if (r_in, r_out) == (d_in, d_out):
        return work.state.form, work.current, False
    best = None
    for f in FORMS:
        c = form_cost(work.geo, f, r_in, r_out, bias=work.bias)
        if c.fits_in(work.current) and (best is None or (c.flops, c.params) < best[1:]):
            best = (f, c.flops, c.params)
    if best is None or (best[1], best[2]) == (work.current.flops, work.current.params):
        return work.state.form, work.current, False
    return best[0], Cost(params=best[2], flops=best[1]), True


def _rounded(scores: torch.Tensor, marked: int, layer_cap: float, min_rank: int, round_to: int) -> list[int]:
    """Kept directions of one side, their number rounded up to a multiple of ``round_to``."""
    kept = keep_side(scores, marked, layer_cap, min_rank).kept
    n = scores.numel()
    if round_to > 1 and len(kept) < n:
        target = min(n, -(-len(kept) // round_to) * round_to)
        kept = keep_side(scores, n - target, layer_cap, min_rank).kept
    return kept


def _decide(
    works: list[_LayerWork], marks: list[int], layer_cap: float, min_rank: int, form: str, round_to: int = 1
):
    """Per layer ``(kept_in, kept_out, form, cost, changed)`` given each side's marked count.

    ``marks`` alternates output and input sides, in ``works`` order. A side whose rotation is
    folded into the core saves nothing by losing directions, so with ``form="auto"`` all of its
    directions are kept (no damage for no gain). With ``round_to > 1`` the kept counts are
    rounded up (keeping the next most important directions) to multiples of it.
    """
    out = []
    for w, m_out, m_in in zip(works, marks[0::2], marks[1::2]):
        ko = _rounded(w.s_out, m_out, layer_cap, min_rank, round_to)
        ki = _rounded(w.s_in, m_in, layer_cap, min_rank, round_to)
        f, cost, changed = _choose(w, len(ki), len(ko), form)
        all_in, all_out = list(range(w.s_in.numel())), list(range(w.s_out.numel()))
        if not changed:
            ki, ko = all_in, all_out
        elif form == "auto":
            if f in ("fold_in", "dense"):
                ki = all_in
            if f in ("fold_out", "dense"):
                ko = all_out
        out.append((ki, ko, f, cost, changed))
    return out


def _quantile_for_target(
    works, pooled, ratio, target, layer_cap, min_rank, form, totals, round_to=1
) -> float:
    """Bisect the quantile so that the removed fraction of ``target`` reaches ``ratio``."""
    before = totals[target]
    fixed = sum(getattr(w.current, target) for w in works)

    def removed_fraction(q: float) -> float:
        dec = _decide(works, global_marks(pooled, q), layer_cap, min_rank, form, round_to)
        after = before - fixed + sum(getattr(d[3], target) for d in dec)
        return 1.0 - after / before

    hi = 1.0 - 1e-9
    if removed_fraction(hi) < ratio:
        return hi
    lo = 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if removed_fraction(mid) >= ratio:
            hi = mid
        else:
            lo = mid
    return hi


def _by_latency(
    works, decisions, batch: int, train_rotations: bool, device, cache: dict | None = None
) -> list:
    """Replace each changed layer's form by the fastest eligible one, measured on ``batch`` inputs.

    Eligible: every form that costs no more FLOPs or parameters than the layer does now, and the
    layer as it is now (then it is left unchanged). Measured once, here; the choice is recorded in
    the module structure, so restoring a checkpoint never re-measures. ``cache`` (any dict) keeps
    the winner per ``(layer, kept_in, kept_out)``: only the widths matter for the timing.
    """
    out = []
    for idx, (w, dec) in enumerate(zip(works, decisions)):
        ki, ko, f, cost, changed = dec
        if not changed or w.input_shape is None:
            out.append(dec)
            continue
        all_in, all_out = list(range(w.s_in.numel())), list(range(w.s_out.numel()))
        options = {"unchanged": (all_in, all_out, w.state.form, w.current, False)}
        for cand in FORMS:
            c_ki = all_in if cand in ("fold_in", "dense") else ki
            c_ko = all_out if cand in ("fold_out", "dense") else ko
            c_cost = form_cost(w.geo, cand, len(c_ki), len(c_ko), bias=w.bias)
            if c_cost.fits_in(w.current) and (len(c_ki), len(c_ko)) != (len(all_in), len(all_out)):
                options[cand] = (c_ki, c_ko, cand, c_cost, True)
        key = (idx, len(ki), len(ko))
        best = None if cache is None else cache.get(key)
        if best is None:
            mods = {"unchanged": w.cand.unit}
            for k, (c_ki, c_ko, cand, _, _) in options.items():
                if k != "unchanged":
                    mods[k] = build_layer(
                        w.state, w.q_a, w.q_g, c_ki, c_ko, cand, train_rotations=train_rotations
                    )
            dt = w.state.template.weight.dtype
            example = torch.randn((batch,) + w.input_shape, device=device, dtype=dt)
            if is_channels_last(w.state.template.weight) and example.dim() == 4:
                example = example.contiguous(memory_format=torch.channels_last)  # as the model runs
            times = time_modules(mods, example)
            best = min(times, key=times.get)
            if cache is not None:
                cache[key] = best
        out.append(options[best])
    return out


def _latency_plan(
    works, pooled, ratio, target, layer_cap, min_rank, totals, round_to, batch, train_rotations, device
) -> tuple[list, float]:
    """Decisions with latency-chosen forms, and their quantile.

    For a ``"params"``/``"flops"`` target the realised cut is measured *after* the forms are
    chosen: a layer left whole (or folded) because that runs faster gives back part of the cut,
    so the quantile is raised (bisection, timings cached per layer width) until the cut with the
    chosen forms reaches ``ratio`` again, or no more can be removed.
    """
    cache: dict = {}

    def plan(q: float) -> list:
        dec = _decide(works, global_marks(pooled, q), layer_cap, min_rank, "auto", round_to)
        return _by_latency(works, dec, batch, train_rotations, device, cache)

    if target == "directions":
        return plan(ratio), ratio
    before = totals[target]
    fixed = sum(getattr(w.current, target) for w in works)

    def removed(dec: list) -> float:
        return 1.0 - (before - fixed + sum(getattr(d[3], target) for d in dec)) / before

    lo = _quantile_for_target(works, pooled, ratio, target, layer_cap, min_rank, "auto", totals, round_to)
    best = (plan(lo), lo)
    if removed(best[0]) >= ratio:
        return best
    hi = 1.0 - 1e-9
    top = plan(hi)
    if removed(top) < ratio:
        return top, hi  # the target cannot be reached with latency-chosen forms
    best = (top, hi)
    for _ in range(8):
        mid = 0.5 * (lo + hi)
        dec = plan(mid)
        got = removed(dec)
        if got >= ratio:
            hi, best = mid, (dec, mid)
            if got <= ratio + 0.01:
                break
        else:
            lo = mid
    return best


# ---------------------------------------------------------------------------------------------
# prune()
# ---------------------------------------------------------------------------------------------


def _check_args(ratio, method, fisher, likelihood, target, layer_cap, min_rank, form, a_form, form_by="cost"):
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if not isinstance(layer_cap, (int, float)) or not 0.0 < layer_cap <= 1.0:
        raise ValueError(f"layer_cap must be in (0, 1], got {layer_cap!r}")
    if not isinstance(min_rank, int) or min_rank < 1:
        raise ValueError(f"min_rank must be an integer ≥ 1, got {min_rank!r}")
    if form not in FORM_CHOICES:
        raise ValueError(f"form must be one of {FORM_CHOICES}, got {form!r}")
    if form_by not in FORM_BY:
        raise ValueError(f"form_by must be one of {FORM_BY}, got {form_by!r}")
    if a_form not in A_FORMS:
        raise ValueError(f"a_form must be one of {A_FORMS}, got {a_form!r}")


def prune(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    ratio: float,
    method: str = "eigendamage",
    fisher: str = "true",
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    target: str = "directions",
    exclude: Any = None,
    exempt_last: bool = True,
    layer_cap: float = 0.95,
    min_rank: int = 1,
    form: str = "auto",
    train_rotations: bool = True,
    likelihood: str = "categorical",
    class_dim: int = -1,
    max_batches: int | None = None,
    seed: int = 0,
    form_by: str = "cost",
    latency_batch: int = 64,
    round_to: int = 1,
    distributed: bool = False,
    process_group: Any = None,
    captured: CaptureResult | None = None,
    changes: dict[str, LayerChange] | None = None,
) -> PruneReport:
    """Prune ``model`` in place with EigenDamage and return a :class:`PruneReport`.

    Each prunable Conv2d/Linear is rewritten in its Kronecker-factored eigenbasis and the
    eigen-directions (rows and columns of ``W*``) with the smallest loss increase
    ``Σ ½·T·W*²·λ_G·λ_A`` are removed under one global threshold: the ``ratio``-quantile of all
    pooled direction scores. Each layer then takes its cheapest equivalent form (bottleneck,
    ``fold_in``, ``fold_out``) and is left whole if none is cheaper than it is now, so no layer
    grows in FLOPs or parameters. Running it on an already pruned model prunes the cores further
    and merges the new bases into the existing rotations.

    Args:
        model: any ``nn.Module``; it stays on its device and dtype, and keeps its train/eval mode.
        batches: iterable of input tensors, ``(input, target, ...)`` tuples, or anything
            ``input_fn`` / ``forward_fn`` understands. Tensors are moved to the model's device.
        input_fn: ``batch → input`` of ``model(input)`` (default: ``batch[0]`` of a tuple/list,
            the batch itself for a tensor).
        forward_fn: ``(model, batch) → output``, for models whose ``forward`` takes more than the
            input (e.g. ``lambda m, b: m(*b)``); used for every forward of the call (capture,
            FLOP count) instead of ``model(input_fn(batch))``. The target of the empirical
            Fisher is then ``batch[1]`` of a tuple/list batch.
        ratio: in ``[0, 1)``: with ``target="directions"`` the quantile of pooled direction scores
            used as threshold (the realised fraction is at most this: see the report); with
            ``"params"``/``"flops"`` the fraction of the model's parameters/FLOPs to remove (the
            threshold is found by bisection).
        fisher: ``"true"`` (targets sampled from the model, seeded by ``seed``) or
            ``"empirical"`` (``loss_fn(output, target)``, default cross-entropy; it must return
            the mean over the batch's examples).
        exclude: module instances, module types, glob patterns on names, or compiled regexes of
            layers to leave alone. ``exempt_last`` also exempts the last layer to run (the
            classifier).
        layer_cap: at most this fraction of one layer's input (and of its output) directions is
            removed in one call. ``min_rank``: directions always kept per side.
        form: ``"auto"`` (cheapest form) or a form forced on every pruned layer (for testing;
            forced forms may cost more than the original layer).
        train_rotations: if False, rotation stages are frozen (``requires_grad=False``).
        likelihood: ``"categorical"`` (classes on ``class_dim``) or ``"gaussian"`` (regression).
        max_batches: use at most this many batches.
        form_by: ``"cost"`` picks each layer's form by FLOPs (then parameters); ``"latency"``
            times the eligible forms (and the layer as it is) on the model's device with
            ``latency_batch`` random inputs and picks the fastest, so a layer whose cheaper forms
            run slower is left whole. A ``params``/``flops`` target is then met with the chosen
            forms: the threshold is raised until the cut reaches ``ratio`` again (or nothing more
            can be removed). Timed once, on rank 0 when ``distributed``.
        round_to: round the kept directions of each pruned side up to a multiple of this (e.g. 8
            for vector-unit and tensor-core friendly widths; the widths' full size is the cap).
        distributed: call on every process of an initialised ``torch.distributed`` group (e.g.
            each DDP rank, with its own shard of ``batches``): factors are summed over processes
            (weighted by rows), the eigendecompositions are split among them and broadcast, and
            rank 0's decisions are broadcast, so every process applies the same surgery.
        process_group: the group for ``distributed`` (default: the world).
        captured: factors already accumulated for this model's layers (used by the callback).
        changes: if a dict is given, it is filled with one :class:`LayerChange` per rebuilt layer
            (bases and kept directions), e.g. to carry optimizer state over (used by the callback).

    Raises:
        ValueError: bad arguments, empty ``batches``, no prunable layer.
        RuntimeError: every batch gave non-finite curvature (the model is left unchanged).
    """
    _check_args(ratio, method, fisher, likelihood, target, layer_cap, min_rank, form, "channel", form_by)
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    if not isinstance(latency_batch, int) or latency_batch < 1:
        raise ValueError(f"latency_batch must be a positive integer, got {latency_batch!r}")
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise TypeError(
            f"batches must be an iterable of batches (a DataLoader, or a list such as [x] or "
            f"[(x, y)]), got a single {type(batches).__name__}: iterating it would give single "
            "examples (or keys); wrap one batch in a list: prune(model, [batch], ...)"
        )
    cands = find_layers(model, exclude)
    if not any(c.skipped is None for c in cands):
        raise ValueError(_no_prunable_message(cands))
    params = list(model.parameters())
    device = params[0].device

    it = iter(batches)
    first = next(it, _EMPTY)
    if first is _EMPTY and captured is None:
        raise ValueError("batches is empty: pruning needs at least one batch to measure curvature")
    if callable(forward_fn) or forward_fn is None:
        pick = (lambda b: b) if forward_fn is not None else (lambda b: split_batch(b, input_fn)[0])
    else:
        raise TypeError(f"forward_fn must be a callable (model, batch) → output, got {forward_fn!r}")
    example = to_device(pick(first), device) if first is not _EMPTY else None
    params_before = count_params(model)
    flops_before = count_flops(model, example, forward_fn) if example is not None else 0

    if captured is None:
        gen = torch.Generator(device=device).manual_seed(seed)
        captured = capture_factors(
            model,
            {c.name: c.hook_module for c in cands},
            itertools.chain([first], it),
            factors_for=[c.name for c in cands if c.skipped is None],
            fisher=fisher,
            loss_fn=loss_fn,
            input_fn=input_fn,
            likelihood=likelihood,
            class_dim=class_dim,
            generator=gen,
            max_batches=max_batches,
            forward_fn=forward_fn,
        )
    if distributed:
        widths = {}
        for c in cands:
            if c.skipped is None:
                h = c.hook_module
                d_in = h.in_channels if isinstance(h, nn.Conv2d) else h.in_features
                d_out = h.out_channels if isinstance(h, nn.Conv2d) else h.out_features
                widths[c.name] = (d_in, d_out)
        all_reduce_capture(captured, widths, device, process_group)
    if captured.batches == 0:
        raise RuntimeError(
            f"all {captured.skipped_batches} batches gave non-finite curvature (NaN/Inf in "
            "activations or gradients); the model was left unchanged"
        )

    _dynamic_skips(cands, captured, exempt_last)
    prunable = [c for c in cands if c.skipped is None]
    if not prunable:
        raise ValueError(_no_prunable_message(cands))

    factors = [f for c in prunable for f in (captured.layers[c.name].a(), captured.layers[c.name].g())]
    bases = (
        split_eigh([f.to(device) for f in factors], eigh_factors, process_group)
        if distributed
        else eigh_factors([f.to(device) for f in factors])
    )
    works = []
    zero_curvature = []
    for i, c in enumerate(prunable):
        lf = captured.layers[c.name]
        state = read_state(c.unit)
        k2 = lf.geometry.k2
        geo = Geometry(state.c_in, state.c_out, lf.geometry.loc_in, lf.geometry.loc_out, k2)
        (lam_a, q_a), (lam_g, q_g) = bases[2 * i], bases[2 * i + 1]
        if not all(bool(torch.isfinite(t).all()) for t in (lam_a, q_a, lam_g, q_g)):
            c.skipped = "eigendecomposition failed (no finite result in float32 or float64)"
            continue
        w_star = to_kfe(state.core.to(device), q_a, q_g)
        if not bool(torch.isfinite(w_star).all()):
            c.skipped = "non-finite weights"
            continue
        s_out, s_in = eigendamage_scores(w_star, lam_a, lam_g, lf.locations)
        if not (bool(s_out.any()) or bool(s_in.any())):
            zero_curvature.append(c.name)
        bias = state.bias is not None
        d_out, _, d_in = state.core.shape
        current = form_cost(geo, state.form, d_in, d_out, bias=bias)
        shape = lf.input_shape
        if shape is not None:
            shape = (state.c_in,) + shape[1:] if c.kind == "conv2d" else shape[:-1] + (state.c_in,)
        works.append(_LayerWork(c, state, geo, bias, q_a, q_g, s_out, s_in, current, shape))
    if not works:
        raise RuntimeError(
            "no layer could be pruned: " + "; ".join(f"{c.name}: {c.skipped}" for c in prunable[:12])
            + "; the model was left unchanged"
        )
    if zero_curvature:
        _warn_zero_curvature(zero_curvature, len(works))

    pooled = [s for w in works for s in (w.s_out, w.s_in)]
    quantile = float(ratio)
    totals = {"params": params_before, "flops": flops_before}
    by_latency = form_by == "latency" and form == "auto"
    if target != "directions" and not by_latency:
        quantile = _quantile_for_target(
            works, pooled, ratio, target, layer_cap, min_rank, form, totals, round_to
        )
    decisions = None
    if by_latency:
        if not (distributed and is_distributed(process_group)) or dist.get_rank(process_group) == 0:
            decisions, quantile = _latency_plan(
                works,
                pooled,
                ratio,
                target,
                layer_cap,
                min_rank,
                totals,
                round_to,
                latency_batch,
                train_rotations,
                device,
            )
    else:
        decisions = _decide(works, global_marks(pooled, quantile), layer_cap, min_rank, form, round_to)
    if distributed:
        # One decision for all processes (timings, at least, differ between them).
        decisions, quantile = broadcast_object((decisions, quantile), process_group)
    thr = global_threshold(pooled, quantile)

    replacements = {}
    for i, (w, (ki, ko, f, _, changed)) in enumerate(zip(works, decisions)):
        if changed:
            new = build_layer(w.state, w.q_a, w.q_g, ki, ko, f, train_rotations=train_rotations)
            if not _all_finite(new):
                # Never install a non-finite weight: the layer stays as it is.
                w.cand.skipped = "its new stages had non-finite weights"
                decisions[i] = _unchanged(w)
                continue
            new.train(w.cand.unit.training)  # the mode of the layer it replaces
            replacements[w.cand.name] = new
    swap_modules(model, replacements)
    if changes is not None:
        for w, (ki, ko, f, _, changed) in zip(works, decisions):
            if changed:
                name = w.cand.name
                changes[name] = LayerChange(w.cand.unit, replacements[name], w.q_a, w.q_g, ki, ko, f)

    total = sum(w.s_out.numel() + w.s_in.numel() for w in works)
    removed = 0
    layer_reports = {}
    for w, (ki, ko, f, cost, _) in zip(works, decisions):
        d_out, _, d_in = w.state.core.shape
        rem_in, rem_out = d_in - len(ki), d_out - len(ko)
        removed += rem_in + rem_out
        layer_reports[w.cand.name] = LayerReport(
            name=w.cand.name,
            kind=w.cand.kind,
            in_features=w.state.c_in,
            out_features=w.state.c_out,
            kept_in=len(ki) if f in ("bottleneck", "fold_out") else w.state.c_in,
            kept_out=len(ko) if f in ("bottleneck", "fold_in") else w.state.c_out,
            form=f,
            removed_in=rem_in,
            removed_out=rem_out,
            params_before=w.current.params,
            params_after=cost.params,
            flops_before=w.current.flops,
            flops_after=cost.flops,
            skipped=w.cand.skipped,
        )
    reports = []
    for c in cands:
        if c.name in layer_reports:
            reports.append(layer_reports[c.name])
            continue
        c_in, c_out = c.widths
        u = c.unit
        reports.append(
            LayerReport(
                name=c.name,
                kind=c.kind,
                in_features=c_in,
                out_features=c_out,
                kept_in=u.rank_in if isinstance(u, KFELayer) else c_in,
                kept_out=u.rank_out if isinstance(u, KFELayer) else c_out,
                form=u.form if isinstance(u, KFELayer) else "dense",
                skipped=c.skipped,
            )
        )
    params_after = count_params(model)
    flops_after = count_flops(model, example, forward_fn) if example is not None else 0
    realised = removed / total if total else 0.0
    if target == "directions":
        reached, reached_ok, limited = realised, True, None
    else:
        before = params_before if target == "params" else flops_before
        after = params_after if target == "params" else flops_after
        reached = 1.0 - after / before if before else 0.0
        reached_ok = reached >= ratio - TARGET_TOLERANCE
        limited = None
        if not reached_ok:
            limited = _what_limits(works, cands, target, totals, layer_cap, min_rank, round_to, by_latency)
            warnings.warn(
                f"prune: target not reached: asked to remove {ratio:.1%} of the {target}, removed "
                f"{reached:.1%} (÷{1 / max(1e-12, 1 - reached):.2f} instead of "
                f"÷{1 / max(1e-12, 1 - ratio):.2f}); limited by {limited}",
                TargetNotReachedWarning,
                stacklevel=2,
            )
    return PruneReport(
        params_before=params_before,
        params_after=params_after,
        flops_before=flops_before,
        flops_after=flops_after,
        ratio=float(ratio),
        target=target,
        realised_fraction=realised,
        threshold=thr,
        quantile=quantile,
        batches=captured.batches,
        skipped_batches=captured.skipped_batches,
        method=method,
        fisher=fisher,
        layers=reports,
        target_reached=reached_ok,
        reached=reached,
        limited_by=limited,
    )


_EMPTY = object()

# A params/flops target counts as reached within this fraction of the model (0.5 percentage points):
# the bisection meets the target with whole directions, and FlopCounterMode's count of the whole
# model can differ slightly from the per-layer costs the bisection adds up.
TARGET_TOLERANCE = 0.005


class PruningWarning(UserWarning):
    """Base class of the warnings :func:`prune` emits (the callback re-emits them on rank zero)."""


class TargetNotReachedWarning(PruningWarning):
    """A ``"params"``/``"flops"`` target could not be met (caps, ``min_rank``, skipped layers)."""


class ZeroCurvatureWarning(PruningWarning):
    """Layers whose curvature is exactly zero: their directions all score 0 (arbitrary order)."""


def _warn_zero_curvature(names: list[str], n_layers: int) -> None:
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    warnings.warn(
        f"prune: {len(names)} of {n_layers} layers have zero curvature (every direction scores 0), "
        f"so their directions are removed in arbitrary order: {shown}. No gradient reaches them: "
        "is a layer downstream zero-initialised (e.g. a classifier head) or the loss constant? "
        "Train the model (a few steps suffice) before pruning it",
        ZeroCurvatureWarning,
        stacklevel=3,
    )


def _what_limits(works, cands, target, totals, layer_cap, min_rank, round_to, by_latency) -> str:
    """Why a params/flops target is out of reach, in words (for the warning and the report)."""
    before = totals[target]
    prunable = sum(getattr(w.current, target) for w in works)
    pooled = [s for w in works for s in (w.s_out, w.s_in)]
    top = _decide(works, global_marks(pooled, 1.0 - 1e-9), layer_cap, min_rank, "auto", round_to)
    floor_share = sum(getattr(d[3], target) for d in top) / before if before else 0.0
    parts = [
        f"the {len(works)} pruned layers hold {prunable / before:.1%} of the {target} and keep at "
        f"least {floor_share:.1%} with layer_cap={layer_cap:g}, min_rank={min_rank}"
        + (f", round_to={round_to}" if round_to > 1 else "")
    ]
    skipped = [c for c in cands if c.skipped is not None]
    if skipped:
        names = ", ".join(f"{c.name} ({c.skipped})" for c in skipped[:6])
        more = f" and {len(skipped) - 6} more" if len(skipped) > 6 else ""
        parts.append(f"{len(skipped)} layer(s) are not pruned: {names}{more}")
    if prunable < before:
        parts.append(f"{1 - prunable / before:.1%} of the {target} lie outside the pruned layers")
    if by_latency:
        parts.append("form_by='latency' leaves layers whole where their reduced forms run slower")
    return "; ".join(parts)


def _dynamic_skips(cands: list[Candidate], captured: CaptureResult, exempt_last: bool) -> None:
    """Skip reasons only known after running the model."""
    last = captured.fire_order[-1] if captured.fire_order else None
    for c in cands:
        lf = captured.layers.get(c.name)
        if c.skipped is not None:
            continue
        if lf is None or not lf.fired:
            c.skipped = "never called in the forward pass (called functionally, or unused)"
        elif lf.max_calls > 1:
            c.skipped = f"called {lf.max_calls} times per forward pass"
        elif exempt_last and c.name == last:
            c.skipped = "last layer (exempt_last=True)"
        elif not lf.reached or lf.a_rows == 0 or lf.g_rows == 0:
            c.skipped = "no gradient reached its output"


def _no_prunable_message(cands: list[Candidate]) -> str:
    if not cands:
        return "no prunable layer: the model has no nn.Conv2d or nn.Linear"
    reasons = "; ".join(f"{c.name}: {c.skipped}" for c in cands[:12])
    more = f" (and {len(cands) - 12} more)" if len(cands) > 12 else ""
    return f"no prunable layer: every Conv2d/Linear is skipped ({reasons}{more})"
