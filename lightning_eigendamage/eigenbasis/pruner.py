"""One EigenDamage pruning step, framework-free: analyse → decide → apply.

- :func:`analyse` finds the prunable layers, captures (or takes) their K-FAC factors,
  eigendecomposes them, rotates each weight into its eigenbasis and scores every direction with
  the chosen criterion: an :class:`Analysis`.
- :func:`decide` turns an analysis and a ``ratio`` into a :class:`~lightning_eigendamage.plan.Plan`
  (kept directions and form per layer, the threshold), meeting a params/flops target by
  bisection and, with ``form_by="latency"``, with forms chosen by measured time.
- :func:`apply` performs the plan's surgery atomically and returns the
  :class:`~lightning_eigendamage.report.PruneReport`.

:func:`prune` is the composition of the three, and what the callback calls.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from ..calibration import downstream_batchnorms, recalibrate_batchnorm, reconstruct
from ..checkpoint import carry_mark
from ..costs import Cost, Geometry, count_flops, count_params, form_cost, time_modules
from ..curvature import CaptureResult, capture_factors, split_batch, to_device
from ..discovery import (
    Candidate,
    check_usable_parameters,
    dynamic_skips,
    find_layers,
    hookable,
    no_prunable_message,
    weights_read_outside,
)
from ..distributed import (
    all_reduce_capture,
    broadcast_object,
    check_process_group,
    is_distributed,
    split_eigh,
)
from ..engine import PruningEngine, register_engine
from ..gradual import MarkedLayer, marked_layers
from ..optim import TransplantReport, carry_optimizer_state, stage_parameters
from ..options import PruneOptions
from ..progress import progress_of
from ..report import (
    TARGET_TOLERANCE,
    LayerReport,
    PruneReport,
    TargetNotReachedWarning,
    ZeroCurvatureWarning,
    warn_user,
)
from ..values import as_real
from .basis import eigh_factors, to_kfe
from .criteria import criterion, global_marks, global_threshold, keep_side
from .layers import FORMS, KFELayer
from .plan import LayerChange, LayerPlan, Plan
from .surgery import LayerState, build_layer, is_channels_last, read_state, swap_modules

# ---------------------------------------------------------------------------------------------
# Analysis: factors → bases → scores
# ---------------------------------------------------------------------------------------------


@dataclass
class ScoredLayer:
    """One prunable layer in its eigenbasis, with scores and its current cost."""

    cand: Candidate
    state: LayerState
    geo: Geometry
    bias: bool
    q_a: torch.Tensor  # (d_in, d_in) eigenvectors of the core's A
    q_g: torch.Tensor  # (d_out, d_out) eigenvectors of the core's G
    s_out: torch.Tensor  # (d_out,) output-direction scores
    s_in: torch.Tensor  # (d_in,) input-direction scores
    current: Cost
    input_shape: tuple[int, ...] | None = None  # per-example input of the whole layer
    fingerprint: tuple = ()  # the layer's type and parameters when analysed (see apply)

    @property
    def name(self) -> str:
        return self.cand.name


_LayerWork = ScoredLayer  # the name earlier versions used


@dataclass
class Analysis:
    """Everything :func:`decide` and :func:`apply` need about a model, measured once.

    ``layers``: the scored layers (in model order); ``candidates``: every layer considered, with
    skip reasons; ``totals``: the model's parameters and FLOPs per example before the call;
    ``example``: the first batch's input (for FLOP counts), on the model's device.
    """

    candidates: list[Candidate]
    layers: list[ScoredLayer]
    totals: dict[str, int]
    example: Any
    batches: int
    skipped_batches: int
    device: torch.device
    zero_curvature: list[str] = field(default_factory=list)
    fire_order: list[str] = field(default_factory=list)
    calibration: Any = None  # the batches again (re-iterable) or those the capture consumed
    replay: Any = None  # RNG states from before the capture's iter() (see calibration_batches)

    @property
    def pooled(self) -> list[torch.Tensor]:
        """Every score vector, alternating output and input sides, in ``layers`` order."""
        return [s for w in self.layers for s in (w.s_out, w.s_in)]


_EMPTY = object()


def analyse(
    model: nn.Module,
    batches: Iterable[Any],
    options: PruneOptions,
    *,
    captured: CaptureResult | None = None,
    distributed: bool = False,
    process_group: Any = None,
) -> Analysis:
    """Find, capture, decompose and score (see :func:`prune` for the arguments).

    Raises:
        TypeError: ``batches`` is a single tensor or dict, or one unwrapped ``(input, target)``
            batch (a tuple or list of tensors of different dtypes or ranks).
        ValueError: empty ``batches``, no prunable layer.
        RuntimeError: every batch gave non-finite curvature, or no layer could be decomposed;
            called inside ``torch.inference_mode()``.
    """
    options = _eigenbasis_options(options, "analyse")
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise TypeError(
            f"batches must be an iterable of batches (a DataLoader, or a list such as [x] or "
            f"[(x, y)]), got a single {type(batches).__name__}: iterating it would give single "
            "examples (or keys); wrap one batch in a list: prune(model, [batch], ...)"
        )
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "prune()/analyse() was called inside torch.inference_mode(), where no gradient can be "
            "taken, and the curvature needs gradients; call it outside (torch.no_grad() around the "
            "call is fine: the capture turns gradients on itself)"
        )
    if (
        isinstance(batches, (tuple, list))
        and len(batches) >= 2
        and all(isinstance(b, torch.Tensor) for b in batches)
        and len({(b.dtype, b.dim()) for b in batches}) > 1
    ):  # batches of bare inputs share dtype and rank; (x, y) does not
        kinds = ", ".join(f"{b.dtype} {tuple(b.shape)}" for b in batches[:4])
        raise TypeError(
            f"batches is a {type(batches).__name__} of tensors of different kinds ({kinds}): that looks "
            "like one (input, target) batch, and iterating it would feed the target to the model as a "
            "batch; wrap it in a list: prune(model, [(x, y)], ...)"
        )
    opts = options
    check_usable_parameters(model, "prune")
    cands = find_layers(model, opts.exclude, unsupported=True, max_factor_dim=opts.max_factor_dim)
    if not any(c.skipped is None for c in cands):
        raise ValueError(no_prunable_message(cands, model))
    device = next(model.parameters()).device

    replay = _rng_snapshot(batches)
    it = iter(batches)
    reiterable = it is not batches
    seen: list[Any] = []
    if not reiterable:  # a one-shot iterator: keep what the capture consumes, for calibration
        it = _recording(it, seen)
    first = next(it, _EMPTY)
    if first is _EMPTY and captured is None:
        raise ValueError("batches is empty: pruning needs at least one batch to measure curvature")
    example = None
    if first is not _EMPTY:
        example = to_device(first if opts.forward_fn else split_batch(first, opts.input_fn)[0], device)
    totals = {"params": count_params(model), "flops": 0}
    if example is not None:
        with weights_read_outside(cands) as reads:  # (the FLOP count's forward pass)
            totals["flops"] = count_flops(model, example, opts.forward_fn)
        for c in cands:
            if c.skipped is None and c.name in reads:
                c.skipped = reads[c.name]

    if captured is None:
        captured = capture_factors(
            model,
            hookable(cands),
            itertools.chain([first], it),
            factors_for=[c.name for c in cands if c.skipped is None],
            fisher=opts.fisher,
            loss_fn=opts.loss_fn,
            input_fn=opts.input_fn,
            likelihood=opts.likelihood,
            class_dim=opts.class_dim,
            generator=torch.Generator(device=device).manual_seed(opts.seed),
            max_batches=opts.max_batches,
            forward_fn=opts.forward_fn,
        )
    if distributed:
        widths = {c.name: c.adapter.widths(c.hook_module) for c in cands if c.skipped is None}
        all_reduce_capture(captured, widths, device, process_group)
    if captured.batches == 0:
        raise RuntimeError(
            f"all {captured.skipped_batches} batches gave non-finite curvature (NaN/Inf in "
            "activations or gradients); the model was left unchanged"
        )

    dynamic_skips(cands, captured.layers, captured.fire_order, opts.exempt_last, backward=True)
    prunable = [c for c in cands if c.skipped is None]
    if not prunable:
        raise ValueError(no_prunable_message(cands, model))

    factors = [f for c in prunable for f in (captured.layers[c.name].a(), captured.layers[c.name].g())]
    factors = [f.to(device) for f in factors]
    bases = split_eigh(factors, eigh_factors, process_group) if distributed else eigh_factors(factors)
    score = criterion(opts.method)
    layers, zero = [], []
    for i, c in enumerate(prunable):
        lf = captured.layers[c.name]
        state = read_state(c.unit)
        geo = Geometry(state.c_in, state.c_out, lf.geometry.loc_in, lf.geometry.loc_out, lf.geometry.k2)
        (lam_a, q_a), (lam_g, q_g) = bases[2 * i], bases[2 * i + 1]
        if not all(bool(torch.isfinite(t).all()) for t in (lam_a, q_a, lam_g, q_g)):
            c.skipped = "eigendecomposition failed (no finite result in float32 or float64)"
            continue
        w_star = to_kfe(state.core.to(device), q_a, q_g)
        if not bool(torch.isfinite(w_star).all()):
            c.skipped = "non-finite weights"
            continue
        s_out, s_in = _checked_scores(
            opts.method, score(w_star, lam_a, lam_g, lf.locations), w_star.shape, c.name
        )
        if not (bool(s_out.any()) or bool(s_in.any())):
            zero.append(c.name)
        d_out, _, d_in = state.core.shape
        bias = state.bias is not None
        if opts.rank_by == "damage_per_cost":
            cost_out, cost_in = _direction_costs(geo, d_in, d_out, opts.target)
            s_out, s_in = s_out / cost_out, s_in / cost_in
        current = form_cost(geo, state.form, d_in, d_out, bias=bias)
        shape = None if lf.input_shape is None else c.adapter.input_shape_at(lf.input_shape, state.c_in)
        layers.append(
            ScoredLayer(c, state, geo, bias, q_a, q_g, s_out, s_in, current, shape, _fingerprint(c.unit))
        )
    if not layers:
        raise RuntimeError(
            "no layer could be pruned: "
            + "; ".join(f"{c.name}: {c.skipped}" for c in prunable[:12])
            + "; the model was left unchanged"
        )
    if zero:
        _warn_zero_curvature(zero, len(layers))
    calib = batches if reiterable else seen
    return Analysis(
        cands,
        layers,
        totals,
        example,
        captured.batches,
        captured.skipped_batches,
        device,
        zero,
        list(captured.fire_order),
        calib,
        replay if reiterable else None,
    )


def _rng_snapshot(batches: Any) -> dict[str, Any]:
    """The random states a re-iterable loader draws from when ``iter()`` is called: torch's
    global CPU generator (a shuffling ``DataLoader`` without a ``generator`` seeds its sampler and
    workers from it) and the loader's own ``generator`` if it has one."""
    gen = getattr(batches, "generator", None)
    gen = gen if isinstance(gen, torch.Generator) else None
    return {"cpu": torch.get_rng_state(), "generator": gen, "state": None if gen is None else gen.get_state()}


@contextlib.contextmanager
def _replaying(replay: dict[str, Any] | None) -> Iterator[None]:
    """Re-iterate with the random states of the capture's ``iter()``, so that a shuffling or
    augmenting loader yields the same batches again; the states are put back afterwards, so the
    caller's RNG is drawn from only by the capture."""
    if replay is None:
        yield
        return
    gen = replay["generator"]
    now_cpu, now_gen = torch.get_rng_state(), None if gen is None else gen.get_state()
    torch.set_rng_state(replay["cpu"])
    if gen is not None:
        gen.set_state(replay["state"])
    try:
        yield
    finally:
        torch.set_rng_state(now_cpu)
        if gen is not None:
            gen.set_state(now_gen)


def _recording(it: Iterable[Any], into: list[Any]) -> Iterable[Any]:
    for b in it:
        into.append(b)
        yield b


def _eigenbasis_options(options: Any, what: str) -> PruneOptions:
    """``options`` for this engine's :func:`analyse` / :func:`decide` / :func:`apply`: a
    :class:`PruneOptions` of ``structure="eigenbasis"`` (``"auto"`` is resolved to it)."""
    if not isinstance(options, PruneOptions):
        raise TypeError(f"{what}() takes a PruneOptions, got {type(options).__name__}")
    if options.structure == "auto":
        return options.resolved("eigenbasis")
    if options.structure != "eigenbasis":
        raise ValueError(
            f"{what}() is the eigenbasis engine's; these options are for structure="
            f"{options.structure!r}: use get_engine({options.structure!r}) or prune(structure=...)"
        )
    return options


def _checked_scores(
    method: str, scores: Any, shape: torch.Size, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A criterion's ``(out scores, in scores)`` for a layer whose KFE weight is ``shape``
    ``(r_out, k², r_in)``, checked: two tensors of ``r_out`` and ``r_in`` finite numbers (a
    registered criterion of the wrong shape would cut the layer to its length)."""
    r_out, _, r_in = shape
    ok = isinstance(scores, (tuple, list)) and len(scores) == 2 and all(torch.is_tensor(t) for t in scores)
    if ok:
        s_out, s_in = scores
        ok = tuple(s_out.shape) == (r_out,) and tuple(s_in.shape) == (r_in,)
    if not ok:
        got = (
            [tuple(t.shape) if torch.is_tensor(t) else type(t).__name__ for t in scores]
            if isinstance(scores, (tuple, list))
            else type(scores).__name__
        )
        raise ValueError(
            f"criterion {method!r} must return (out scores ({r_out},), in scores ({r_in},)) for layer "
            f"{name!r}, got {got}"
        )
    if not (bool(torch.isfinite(s_out).all()) and bool(torch.isfinite(s_in).all())):
        raise ValueError(f"criterion {method!r} gave non-finite scores for layer {name!r}")
    return s_out, s_in


def _direction_costs(geo: Geometry, d_in: int, d_out: int, target: str) -> tuple[float, float]:
    """What removing one output / input direction of a bottleneck ``d_in → d_out`` saves, in the
    target's unit (parameters for ``"params"``, else FLOPs): ``k²·d_in + C_out`` and
    ``k²·d_out + C_in`` parameters; ``2·T_out·(k²·d_in + C_out)`` and
    ``2·(T_out·k²·d_out + T_in·C_in)`` FLOPs per example."""
    if target == "params":
        return float(geo.k2 * d_in + geo.c_out), float(geo.k2 * d_out + geo.c_in)
    out = 2.0 * geo.loc_out * (geo.k2 * d_in + geo.c_out)
    inn = 2.0 * (geo.loc_out * geo.k2 * d_out + geo.loc_in * geo.c_in)
    return out, inn


def _warn_zero_curvature(names: list[str], n_layers: int) -> None:
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    warnings.warn(
        f"prune: {len(names)} of {n_layers} layers have zero curvature (every direction scores 0), "
        f"so their directions are removed in arbitrary order: {shown}. No gradient reaches them: "
        "is a layer downstream zero-initialised (e.g. a classifier head; train the model a few "
        "steps before pruning it), or is the loss constant in the output (the likelihood or "
        "loss_fn does not fit what the model returns)?",
        ZeroCurvatureWarning,
        stacklevel=4,
    )


# ---------------------------------------------------------------------------------------------
# Deciding: scores → plan
# ---------------------------------------------------------------------------------------------


def _choose(work: ScoredLayer, r_in: int, r_out: int, form: str) -> tuple[str, Cost, bool]:
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


def _layer_plan(
    w: ScoredLayer, ki: list[int], ko: list[int], form: str, cost: Cost, changed: bool
) -> LayerPlan:
    return LayerPlan(w.name, tuple(ki), tuple(ko), form, changed, cost.params, cost.flops)


def _unchanged(w: ScoredLayer) -> LayerPlan:
    """The plan that leaves a layer as it is."""
    all_in, all_out = range(w.s_in.numel()), range(w.s_out.numel())
    return _layer_plan(w, list(all_in), list(all_out), w.state.form, w.current, False)


def _rounded(scores: torch.Tensor, marked: int, layer_cap: float, min_rank: int, round_to: int) -> list[int]:
    """Kept directions of one side, their number rounded up to a multiple of ``round_to``."""
    kept = keep_side(scores, marked, layer_cap, min_rank).kept
    n = scores.numel()
    if round_to > 1 and len(kept) < n:
        target = min(n, -(-len(kept) // round_to) * round_to)
        kept = keep_side(scores, n - target, layer_cap, min_rank).kept
    return kept


def _plan_at(layers: list[ScoredLayer], marks: list[int], opts: PruneOptions, form: str) -> list[LayerPlan]:
    """Per layer the plan given each side's marked count (``marks``: output, input, … in order).

    A side whose rotation is folded into the core saves nothing by losing directions, so with
    ``form="auto"`` all of its directions are kept (no damage for no gain). With ``round_to > 1``
    the kept counts are rounded up (keeping the next most important directions) to multiples.
    """
    out = []
    for w, m_out, m_in in zip(layers, marks[0::2], marks[1::2]):
        ko = _rounded(w.s_out, m_out, opts.layer_cap, opts.min_rank, opts.round_to)
        ki = _rounded(w.s_in, m_in, opts.layer_cap, opts.min_rank, opts.round_to)
        f, cost, changed = _choose(w, len(ki), len(ko), form)
        all_in, all_out = list(range(w.s_in.numel())), list(range(w.s_out.numel()))
        if not changed:
            ki, ko = all_in, all_out
        elif form == "auto":
            if f in ("fold_in", "dense"):
                ki = all_in
            if f in ("fold_out", "dense"):
                ko = all_out
        out.append(_layer_plan(w, ki, ko, f, cost, changed))
    return out


def _removed(an: Analysis, plans: list[LayerPlan], target: str) -> float:
    """The fraction of the model's ``target`` (params/flops) that ``plans`` remove."""
    before = an.totals[target]
    fixed = sum(getattr(w.current, target) for w in an.layers)
    return 1.0 - (before - fixed + sum(getattr(p, target) for p in plans)) / before


def _quantile_for_target(an: Analysis, ratio: float, opts: PruneOptions, form: str) -> float:
    """Bisect the quantile so that the removed fraction of ``opts.target`` reaches ``ratio``."""
    pooled = an.pooled

    def removed_at(q: float) -> float:
        return _removed(an, _plan_at(an.layers, global_marks(pooled, q), opts, form), opts.target)

    hi = 1.0 - 1e-9
    if removed_at(hi) < ratio:
        return hi
    lo = 0.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if removed_at(mid) >= ratio:
            hi = mid
        else:
            lo = mid
    return hi


def _by_latency(
    an: Analysis, plans: list[LayerPlan], opts: PruneOptions, cache: dict, last: bool
) -> list[LayerPlan]:
    """Replace each changed layer's form by the fastest eligible one, measured on
    ``opts.latency_batch`` inputs.

    Eligible: every form that costs no more FLOPs or parameters than the layer does now, and the
    layer as it is now (then it is left unchanged). Measured once, here; the choice is recorded in
    the module structure, so restoring a checkpoint never re-measures. ``cache`` keeps the winner
    per ``(layer, kept_in, kept_out)``: only the widths matter for the timing. 4-d inputs are
    timed in ``channels_last`` if ``last``, else contiguous.
    """
    out = []
    for idx, (w, lp) in enumerate(zip(an.layers, plans)):
        if not lp.changed or w.input_shape is None:
            out.append(lp)
            continue
        all_in, all_out = list(range(w.s_in.numel())), list(range(w.s_out.numel()))
        options = {"unchanged": _unchanged(w)}
        for cand in FORMS:
            c_ki = all_in if cand in ("fold_in", "dense") else list(lp.kept_in)
            c_ko = all_out if cand in ("fold_out", "dense") else list(lp.kept_out)
            c_cost = form_cost(w.geo, cand, len(c_ki), len(c_ko), bias=w.bias)
            if c_cost.fits_in(w.current) and (len(c_ki), len(c_ko)) != (len(all_in), len(all_out)):
                options[cand] = _layer_plan(w, c_ki, c_ko, cand, c_cost, True)
        key = (idx, len(lp.kept_in), len(lp.kept_out))
        best = cache.get(key)
        if best is None:
            mods = {"unchanged": w.cand.unit}
            for k, o in options.items():
                if k != "unchanged":
                    mods[k] = build_layer(
                        w.state,
                        w.q_a,
                        w.q_g,
                        list(o.kept_in),
                        list(o.kept_out),
                        o.form,
                        train_rotations=opts.train_rotations,
                    )
            dt = w.state.template.weight.dtype
            gen = torch.Generator().manual_seed(0)  # the user's global random streams stay as they are
            shape = (opts.latency_batch,) + w.input_shape
            example = torch.randn(shape, generator=gen, dtype=dt).to(an.device)
            if example.dim() == 4:
                mods, example = _in_memory_format(mods, example, last)
            times = time_modules(mods, example, backward=opts.latency_mode == "training")
            best = cache[key] = min(times, key=times.get)
        out.append(options[best])
    return out


def _in_memory_format(
    mods: dict[str, nn.Module], example: torch.Tensor, last: bool
) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """The candidate modules and the 4-d example in the memory format the forms are timed in
    (``channels_last`` if ``last``, else contiguous). A candidate in the other format is timed as
    a converted copy, so the model itself (``"unchanged"`` is its live layer) is never converted.
    """
    fmt = torch.channels_last if last else torch.contiguous_format
    out = {}
    for name, mod in mods.items():
        convs = [p for p in mod.parameters() if p.dim() == 4]
        if any(not p.is_contiguous(memory_format=fmt) for p in convs):
            mod = copy.deepcopy(mod).to(memory_format=fmt)
        out[name] = mod
    return out, example.contiguous(memory_format=fmt)


def _latency_plan(an: Analysis, ratio: float, opts: PruneOptions) -> tuple[list[LayerPlan], float]:
    """Plans with latency-chosen forms, and their quantile.

    For a ``"params"``/``"flops"`` target the realised cut is measured *after* the forms are
    chosen: a layer left whole (or folded) because that runs faster gives back part of the cut,
    so the quantile is raised (bisection, timings cached per layer width) until the cut with the
    chosen forms reaches ``ratio`` again, or no more can be removed. Where that lands more than
    0.01 past ``ratio`` (a layer's form flipped from whole to reduced between two quantiles),
    the forms found are kept and the quantile lowered to the smallest cut with those forms that
    reaches ``ratio`` (granularity: one direction); the
    flipped layer then runs its reduced form at a width where leaving it whole may have timed
    faster, and the target holds.
    """
    cache: dict = {}
    pooled = an.pooled
    # "model": channels_last if any layer's weight is (a 1×1 weight is both, so look at all)
    model_last = any(is_channels_last(w.state.template.weight) for w in an.layers)
    last = model_last if opts.latency_format == "model" else opts.latency_format == "channels_last"

    def plan(q: float) -> list[LayerPlan]:
        marks = global_marks(pooled, q)
        return _by_latency(an, _plan_at(an.layers, marks, opts, "auto"), opts, cache, last)

    if opts.target == "directions":
        return plan(ratio), ratio
    lo = floor = _quantile_for_target(an, ratio, opts, "auto")
    best = (plan(lo), lo)
    if _removed(an, best[0], opts.target) >= ratio:
        return best
    hi = 1.0 - 1e-9
    top = plan(hi)
    if _removed(an, top, opts.target) < ratio:
        return top, hi  # the target cannot be reached with latency-chosen forms
    best = (top, hi)
    for _ in range(8):
        mid = 0.5 * (lo + hi)
        dec = plan(mid)
        got = _removed(an, dec, opts.target)
        if got >= ratio:
            hi, best = mid, (dec, mid)
            if got <= ratio + _LATENCY_OVERSHOOT:
                return best
        else:
            lo = mid
    # The cut jumps where a layer's form flips from whole to reduced, so the bisection can land
    # well past the target (half a small network's FLOPs at once). Keep the forms just chosen
    # and lower the quantile: with fixed forms the cut shrinks step by step, to the target. At
    # ``floor`` the cost-chosen forms (the cheapest) just reach it, so fixed forms reach no more.
    forms = [lp.form if lp.changed else None for lp in best[0]]
    lo = floor
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        dec = _plan_with_forms(an.layers, global_marks(pooled, mid), opts, forms)
        if _removed(an, dec, opts.target) >= ratio:
            hi, best = mid, (dec, mid)
        else:
            lo = mid
    return best


_LATENCY_OVERSHOOT = 0.01  # how far past a params/flops target the latency search may land


def _plan_with_forms(
    layers: list[ScoredLayer], marks: list[int], opts: PruneOptions, forms: list[str | None]
) -> list[LayerPlan]:
    """Like :func:`_plan_at`, with each layer's form given (None: left whole). A layer whose
    given form would keep every direction, or cost more FLOPs or parameters than the layer does
    now, is left whole."""
    out = []
    for w, f, m_out, m_in in zip(layers, forms, marks[0::2], marks[1::2]):
        all_in, all_out = list(range(w.s_in.numel())), list(range(w.s_out.numel()))
        if f is None:
            out.append(_unchanged(w))
            continue
        ki = (
            all_in
            if f in ("fold_in", "dense")
            else _rounded(w.s_in, m_in, opts.layer_cap, opts.min_rank, opts.round_to)
        )
        ko = (
            all_out
            if f in ("fold_out", "dense")
            else _rounded(w.s_out, m_out, opts.layer_cap, opts.min_rank, opts.round_to)
        )
        cost = form_cost(w.geo, f, len(ki), len(ko), bias=w.bias)
        if (len(ki), len(ko)) == (len(all_in), len(all_out)) or not cost.fits_in(w.current):
            out.append(_unchanged(w))
        else:
            out.append(_layer_plan(w, ki, ko, f, cost, True))
    return out


def check_ratio(ratio: Any) -> float:
    """``ratio`` as a float in ``[0, 1)`` (NumPy scalars and one-element tensors too), or a
    ValueError."""
    value = as_real(ratio)
    if value is None or not 0.0 <= value < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    return value


def decide(
    analysis: Analysis,
    ratio: float,
    options: PruneOptions,
    *,
    distributed: bool = False,
    process_group: Any = None,
) -> Plan:
    """The plan for removing ``ratio`` (see :func:`prune`) of an analysed model.

    With ``distributed``, rank 0 decides (timings, at least, differ between processes) and its
    plan is broadcast, so every process applies the same surgery.
    """
    ratio = check_ratio(ratio)
    opts, an = _eigenbasis_options(options, "decide"), analysis
    by_latency = opts.form_by == "latency" and opts.form == "auto"
    plans, quantile = None, ratio
    if by_latency:
        if not (distributed and is_distributed(process_group)) or dist.get_rank(process_group) == 0:
            plans, quantile = _latency_plan(an, ratio, opts)
    else:
        if opts.target != "directions":
            quantile = _quantile_for_target(an, ratio, opts, opts.form)
        plans = _plan_at(an.layers, global_marks(an.pooled, quantile), opts, opts.form)
    if distributed:
        payload = None if plans is None else [p.to_dict() for p in plans]
        payload, quantile = broadcast_object((payload, quantile), process_group)
        plans = [LayerPlan.from_dict(p) for p in payload]
    return Plan(tuple(plans), opts.target, ratio, quantile, global_threshold(an.pooled, quantile))


# ---------------------------------------------------------------------------------------------
# Applying: plan → surgery → report
# ---------------------------------------------------------------------------------------------


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if torch.is_tensor(t))


def _fingerprint(unit: nn.Module) -> tuple:
    """What :func:`apply` checks a layer against: its type and, per parameter and buffer, name,
    shape, dtype, and the float64 sum and sum of squares of its values (one tensor at a time)."""
    tensors = [(n, t.detach()) for n, t in unit.state_dict(keep_vars=True).items() if torch.is_tensor(t)]
    sums = [(t.double().sum(), t.double().square().sum()) for _, t in tensors]
    values = torch.stack([torch.stack(p) for p in sums]).cpu().tolist() if sums else []
    return (type(unit), tuple((n, tuple(t.shape), t.dtype) for n, t in tensors), tuple(map(tuple, values)))


def _check_analysis_fits(model: nn.Module, an: Analysis) -> None:
    """Raise before any change if ``model`` is not the analysed model (or a copy of it) as it was:
    a layer missing, of another type or shape, or with other weights (the plan would rebuild it
    from the analysed weights), e.g. an analysis applied twice or to another network."""
    for w in an.layers:
        try:
            unit = model.get_submodule(w.name)
        except AttributeError:
            unit = None
        now, then = (_fingerprint(unit) if unit is not None else None), w.fingerprint
        if unit is None:
            why = "the model has no such layer"
        elif not then or now == then:
            continue
        elif now[0] is not then[0]:
            why = f"it is a {type(unit).__name__} now, a {then[0].__name__} when analysed"
        elif now[1] != then[1]:
            shapes = [(n, shape) for n, shape, _ in now[1]] != [(n, shape) for n, shape, _ in then[1]]
            if shapes:
                why = "its parameter shapes differ"
            else:
                dtypes = sorted({str(d) for _, _, d in then[1]}), sorted({str(d) for _, _, d in now[1]})
                why = f"its dtypes differ ({', '.join(dtypes[1])} now, {', '.join(dtypes[0])} when analysed)"
        else:
            why = "its weights changed since"
        raise ValueError(
            f"apply: the analysis does not fit this model at layer {w.name!r} ({why}); apply an "
            "analysis once, to the model it was made on (or a copy of it), right after analyse(); "
            "the model was left unchanged"
        )


def _checked_plan(an: Analysis, plan: Plan) -> dict[str, LayerPlan]:
    """Name → layer plan, each checked against its analysed layer (a plan may be edited by hand:
    its ``to_dict``/``from_dict`` are public), with ``params``/``flops`` recomputed from the kept
    directions and form. ValueError, before anything changes, for a missing layer, an unknown
    form, or kept indices that are empty, repeated, unsorted or out of range."""
    plans = {lp.name: lp for lp in plan.layers}
    out = {}
    for w in an.layers:
        lp = plans.get(w.name)
        if lp is None:
            raise ValueError(f"apply: the plan has no entry for layer {w.name!r} of the analysis")
        if not lp.changed:
            out[w.name] = _unchanged(w)
            continue
        if lp.form not in FORMS:
            raise ValueError(f"apply: layer {w.name!r}: unknown form {lp.form!r} (one of {FORMS})")
        d_out, _, d_in = w.state.core.shape
        for side, kept, n in (("kept_in", lp.kept_in, d_in), ("kept_out", lp.kept_out, d_out)):
            if not kept or list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= n:
                raise ValueError(
                    f"apply: layer {w.name!r}: {side} must be ascending, distinct indices in "
                    f"[0, {n}), at least one; got {list(kept)}"
                )
        cost = form_cost(w.geo, lp.form, len(lp.kept_in), len(lp.kept_out), bias=w.bias)
        out[w.name] = dataclasses.replace(lp, params=cost.params, flops=cost.flops)
    return out


def apply(
    model: nn.Module,
    analysis: Analysis,
    plan: Plan,
    options: PruneOptions,
    *,
    changes: dict[str, LayerChange] | None = None,
    distributed: bool = False,
    process_group: Any = None,
) -> PruneReport:
    """Rebuild the layers ``plan`` changes, install them all at once, calibrate, and report.

    ``model`` must be the analysed model, or a copy of it, as it was analysed: a layer that is
    missing, of another type or shape, or whose weights changed since (an analysis applied twice,
    or to another network) is a ValueError before anything changes.

    A rebuilt layer whose weights are not all finite is never installed (the layer stays as it
    is, with the reason in the report). New stages take the train/eval mode of the layer they
    replace. ``changes``, if given, is filled with one :class:`LayerChange` per rebuilt layer.
    Then, on the analysis' calibration batches: ``options.reconstruct`` re-fits the rebuilt layers
    against a copy of the model taken before the surgery (:func:`~.calibration.reconstruct`), and
    ``options.recalibrate_bn`` re-estimates the BatchNorm layers downstream of them. A failure or
    interrupt at any point after the swap (report, reconstruction, re-estimation) swaps the
    original layers back and restores the buffers, so the model is as it was.
    """
    report, _ = _apply(
        model, analysis, plan, options, changes=changes, distributed=distributed, process_group=process_group
    )
    return report


def _apply(
    model: nn.Module,
    analysis: Analysis,
    plan: Plan,
    options: PruneOptions,
    *,
    changes: dict[str, LayerChange] | None,
    distributed: bool,
    process_group: Any,
) -> tuple[PruneReport, Callable[[], None]]:
    """:func:`apply`, also returning a function that undoes it (for a multi-shot :func:`prune`
    that fails in a later shot)."""
    an, opts = analysis, _eigenbasis_options(options, "apply")
    if not isinstance(plan, Plan):
        raise TypeError(f"apply() takes the Plan that decide() returned, got {type(plan).__name__}")
    if plan.target != opts.target:
        raise ValueError(
            f"the plan was decided for target={plan.target!r}, the options say target={opts.target!r}: "
            "apply it with the options it was decided with"
        )
    _check_analysis_fits(model, an)
    dense = copy.deepcopy(model) if opts.reconstruct and an.calibration is not None else None
    plans = _checked_plan(an, plan)
    final: dict[str, LayerPlan] = {}
    replacements = {}
    for w in an.layers:
        lp = plans[w.name]
        if lp.changed:
            new = build_layer(
                w.state,
                w.q_a,
                w.q_g,
                list(lp.kept_in),
                list(lp.kept_out),
                lp.form,
                train_rotations=opts.train_rotations,
            )
            if not _all_finite(new):
                w.cand.skipped = "its new stages had non-finite weights"
                lp = _unchanged(w)
            else:
                new.train(w.cand.unit.training)  # the mode of the layer it replaces
                replacements[w.name] = new
        final[w.name] = lp
    originals = {name: model.get_submodule(name) for name in replacements}  # this model's own
    for name, new in replacements.items():  # a layer that lost channels stays marked as such
        carry_mark(originals[name], new)
    with torch.no_grad():
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}  # BatchNorm statistics…
    swap_modules(model, replacements)

    def undo() -> None:
        swap_modules(model, originals)
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers and b.shape == buffers[n].shape:
                    b.copy_(buffers[n])
        if changes is not None:
            for name in replacements:
                changes.pop(name, None)

    try:
        if changes is not None:
            for w in an.layers:
                lp = final[w.name]
                if w.name in replacements:
                    changes[w.name] = LayerChange(
                        originals[w.name],
                        replacements[w.name],
                        w.q_a,
                        w.q_g,
                        list(lp.kept_in),
                        list(lp.kept_out),
                        lp.form,
                    )
        report = _report(model, an, plan, final, opts)
        _calibrate(model, dense, an, report, opts, distributed=distributed, process_group=process_group)
    except BaseException:
        undo()
        raise
    return report, undo


def _report(
    model: nn.Module, an: Analysis, plan: Plan, final: dict[str, LayerPlan], opts: PruneOptions
) -> PruneReport:
    total = sum(w.s_out.numel() + w.s_in.numel() for w in an.layers)
    removed = 0
    layer_reports = {}
    for w in an.layers:
        lp = final[w.name]
        d_out, _, d_in = w.state.core.shape
        rem_in, rem_out = d_in - len(lp.kept_in), d_out - len(lp.kept_out)
        removed += rem_in + rem_out
        layer_reports[w.name] = LayerReport(
            name=w.name,
            kind=w.cand.kind,
            in_features=w.state.c_in,
            out_features=w.state.c_out,
            kept_in=len(lp.kept_in) if lp.form in ("bottleneck", "fold_out") else w.state.c_in,
            kept_out=len(lp.kept_out) if lp.form in ("bottleneck", "fold_in") else w.state.c_out,
            form=lp.form,
            removed_in=rem_in,
            removed_out=rem_out,
            params_before=w.current.params,
            params_after=lp.params,
            flops_before=w.current.flops,
            flops_after=lp.flops,
            skipped=w.cand.skipped,
        )
    reports = []
    for c in an.candidates:
        if c.name in layer_reports:
            reports.append(layer_reports[c.name])
            continue
        c_in, c_out = c.widths
        u = c.unit
        pruned = hasattr(u, "rank_in")  # a KFELayer from an earlier call
        reports.append(
            LayerReport(
                name=c.name,
                kind=c.kind,
                in_features=c_in,
                out_features=c_out,
                kept_in=u.rank_in if pruned else c_in,
                kept_out=u.rank_out if pruned else c_out,
                form=u.form if pruned else "dense",
                skipped=c.skipped,
            )
        )
    params_after = count_params(model)
    flops_after = count_flops(model, an.example, opts.forward_fn) if an.example is not None else 0
    realised = removed / total if total else 0.0
    ratio, target = plan.ratio, plan.target
    if target == "directions":
        reached, reached_ok, limited = realised, True, None
    else:
        before = an.totals[target]
        after = params_after if target == "params" else flops_after
        reached = 1.0 - after / before if before else 0.0
        reached_ok = reached >= ratio - TARGET_TOLERANCE
        limited = None
        if not reached_ok:
            limited = _what_limits(an, opts)
            warn_user(
                f"prune: target not reached: asked to remove {ratio:.1%} of the {target}, removed "
                f"{reached:.1%} (÷{1 / max(1e-12, 1 - reached):.2f} instead of "
                f"÷{1 / max(1e-12, 1 - ratio):.2f}); limited by {limited}",
                TargetNotReachedWarning,
            )
    return PruneReport(
        params_before=an.totals["params"],
        params_after=params_after,
        flops_before=an.totals["flops"],
        flops_after=flops_after,
        ratio=ratio,
        target=target,
        realised_fraction=realised,
        threshold=plan.threshold,
        quantile=plan.quantile,
        batches=an.batches,
        skipped_batches=an.skipped_batches,
        method=opts.method,
        fisher=opts.fisher,
        layers=reports,
        target_reached=reached_ok,
        reached=reached,
        limited_by=limited,
    )


def _what_limits(an: Analysis, opts: PruneOptions) -> str:
    """Why a params/flops target is out of reach, in words (for the warning and the report)."""
    target = opts.target
    before = an.totals[target]
    prunable = sum(getattr(w.current, target) for w in an.layers)
    top = _plan_at(an.layers, global_marks(an.pooled, 1.0 - 1e-9), opts, opts.form)
    floor_share = sum(getattr(p, target) for p in top) / before if before else 0.0
    parts = [
        f"the {len(an.layers)} pruned layers hold {prunable / before:.1%} of the {target} and keep at "
        f"least {floor_share:.1%} with layer_cap={opts.layer_cap:g}, min_rank={opts.min_rank}"
        + (f", round_to={opts.round_to}" if opts.round_to > 1 else "")
    ]
    skipped = [c for c in an.candidates if c.skipped is not None]
    if skipped:
        names = ", ".join(f"{c.name} ({c.skipped})" for c in skipped[:6])
        more = f" and {len(skipped) - 6} more" if len(skipped) > 6 else ""
        parts.append(f"{len(skipped)} layer(s) are not pruned: {names}{more}")
    if prunable < before:
        parts.append(f"{1 - prunable / before:.1%} of the {target} lie outside the pruned layers")
    if opts.form in ("fold_in", "fold_out", "dense"):
        whole = {"fold_in": "input side", "fold_out": "output side", "dense": "both sides"}[opts.form]
        parts.append(f"form={opts.form!r} keeps the {whole} of every pruned layer at full width")
    if opts.form_by == "latency":
        parts.append("form_by='latency' leaves layers whole where their reduced forms run slower")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# prune()
# ---------------------------------------------------------------------------------------------


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
    layer_cap: float = 0.75,
    min_rank: int = 1,
    form: str = "auto",
    train_rotations: bool = True,
    likelihood: str = "categorical",
    class_dim: int = -1,
    max_batches: int | None = None,
    max_factor_dim: int | None = 16384,
    seed: int = 0,
    form_by: str = "cost",
    latency_batch: int = 64,
    latency_format: str = "model",
    latency_mode: str = "inference",
    round_to: int = 1,
    rank_by: str = "damage_per_cost",
    shots: int = 1,
    recalibrate_bn: bool = True,
    reconstruct: bool = False,
    reconstruct_damping: float = 1e-4,
    progress: bool = False,
    distributed: bool = False,
    process_group: Any = None,
    captured: CaptureResult | None = None,
    changes: dict[str, LayerChange] | None = None,
    options: PruneOptions | None = None,
) -> PruneReport:
    """Prune ``model`` in place with EigenDamage and return a :class:`PruneReport`.

    Each prunable Conv2d/Conv1d/Linear is rewritten in its Kronecker-factored eigenbasis and the
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
            used as threshold (``ceil(ratio·(n−1))`` of the ``n`` pooled scores are marked, so the
            realised fraction is at most ``ratio + 1/n``: see the report); with
            ``"params"``/``"flops"`` the fraction of the model's parameters/FLOPs to remove (the
            threshold is found by bisection). FLOPs are counted per example on the first row of
            the first batch's input, so examples must lie on dim 0 (``batch_first=True`` for
            transformer layers; for sequence-first inputs pass a ``forward_fn`` that transposes).
        method: the scoring criterion, by name in the registry (``"eigendamage"``; others are
            added with :func:`~lightning_eigendamage.register_criterion`).
        fisher: ``"true"`` (targets sampled from the model, seeded by ``seed``) or
            ``"empirical"`` (``loss_fn(output, target)``, default cross-entropy; it must return
            the mean over the batch's examples; ``target`` is ``batch[1]`` of a tuple batch and
            the whole batch of a dict batch, for ``loss_fn`` to read the labels from).
        exclude: module instances, module types, glob patterns on names, or compiled regexes
            (``fullmatch`` on whole names) of layers to leave alone; an entry that matches a
            container leaves every layer inside it alone, one that matches nothing warns.
            ``exempt_last`` also exempts the last layer to run (the classifier).
        layer_cap: at most this fraction of one layer's input (and of its output) directions is
            removed in one call. ``min_rank``: directions always kept per side.
        form: ``"auto"`` (cheapest form) or a form forced on every pruned layer (for testing;
            forced forms may cost more than the original layer).
        train_rotations: if False, rotation stages are frozen (``requires_grad=False``).
        likelihood: ``"categorical"`` (classes on ``class_dim``; a single logit there is an error),
            ``"bernoulli"`` (every output an independent sigmoid logit: binary or multi-label
            classifiers) or ``"gaussian"`` (regression, unit variance).
        max_batches: use at most this many batches.
        max_factor_dim: a layer whose input or output width exceeds this is left whole (with the
            reason in the report) before anything is captured: its ``d × d`` factor takes
            ``4·d²`` bytes, several times that while it is eigendecomposed, and ``O(d³)`` time
            (VGG's ``Linear(25088, 4096)``: 2.3 GiB per copy). None: no limit.
        form_by: ``"cost"`` picks each layer's form by FLOPs (then parameters); ``"latency"``
            times the eligible forms (and the layer as it is) on the model's device with
            ``latency_batch`` random inputs and picks the fastest, so a layer whose cheaper forms
            run slower is left whole. A ``params``/``flops`` target is then met with the chosen
            forms: the threshold is raised until the cut reaches ``ratio`` again (or nothing more
            can be removed). Timed once, on rank 0 when ``distributed``.
        latency_format: the memory format 4-d inputs and convolutions are timed in:
            ``"model"`` (the model's at the call: ``channels_last`` if any of its convolution
            weights is stored so; the new stages keep each layer's format),
            ``"channels_last"`` or ``"contiguous"`` (for a model converted after pruning; the
            model itself is not converted).
        latency_mode: ``"inference"`` times an eval forward; ``"training"`` the forward and the
            backward to the layer's input and trainable parameters, for a network whose cost that
            matters is its training step (set ``latency_batch`` to the training batch size).
            With ``structure="channels"``, ``latency_batch``, ``latency_format`` and
            ``latency_mode`` set how the layers are timed for ``rank_by="relative_per_latency"``
            or ``"damage_per_latency"`` (see :func:`~lightning_eigendamage.prune_channels`).
        round_to: round the kept directions of each pruned side up to a multiple of this (e.g. 8
            for vector-unit and tensor-core friendly widths; the widths' full size is the cap).
        rank_by: ``"damage"`` ranks directions by their loss increase (the paper);
            ``"damage_per_cost"`` by loss increase per unit of cost the removal saves (FLOPs, or
            parameters with ``target="params"``), so cheap directions are not cut first.
        shots: remove the share in this many equal steps (``1 − (1 − ratio)^(1/shots)`` each),
            re-capturing the factors on the partly pruned network before each (no training in
            between); ``batches`` are iterated once per shot.
        recalibrate_bn: after the surgery, re-estimate the running statistics of the BatchNorm
            layers downstream of the rebuilt layers on ``batches`` (nothing else is touched;
            :func:`~lightning_eigendamage.calibration.recalibrate_batchnorm`).
        reconstruct: after the surgery, re-fit each rebuilt layer's core and bias by damped least
            squares (damping ``reconstruct_damping`` relative to the mean diagonal) so that its
            outputs on ``batches`` match the dense layer's, in forward order
            (:func:`~lightning_eigendamage.calibration.reconstruct`; keeps one copy of the model
            while it runs).
        progress: print a line per phase (analysis, decision, surgery) with its time to stderr,
            and (channels) a bar over the groups' scores; rank 0 only under a process group.
        distributed: call on every process of an initialised ``torch.distributed`` group (e.g.
            each DDP rank, with its own shard of ``batches``): factors are summed over processes
            (weighted by rows), the eigendecompositions are split among them and broadcast, and
            rank 0's decisions are broadcast, so every process applies the same surgery.
        process_group: the group for ``distributed`` (default: the world).
        captured: factors already accumulated for this model's layers (used by the callback).
        changes: if a dict is given, it is filled with one :class:`LayerChange` per rebuilt layer
            (bases and kept directions), e.g. to carry optimizer state over (used by the callback).
        options: a :class:`~lightning_eigendamage.options.PruneOptions` already built (and
            validated), used instead of the individual option arguments (the callback passes its
            own); an option argument also given with another value than its default is a
            ValueError (it would be ignored).

    Raises:
        ValueError: bad arguments, empty ``batches``, no prunable layer, ``distributed`` without
            an initialised process group.
        RuntimeError: every batch gave non-finite curvature (the model is left unchanged).
    """
    ratio = check_ratio(ratio)
    check_process_group(distributed)
    if options is None:
        options = PruneOptions.from_arguments(locals())
    else:
        _check_options_alone(options, locals())
    dist_kw = {"distributed": distributed, "process_group": process_group}
    shots = options.shots if captured is None else 1
    if shots > 1 and changes is not None:
        raise ValueError(
            "changes (what each rebuilt layer became, for carrying optimizer state over) describes "
            "one surgery; with shots > 1 there are several: pass shots=1, or call prune() once per shot"
        )
    step = ratio if shots == 1 else 1.0 - (1.0 - ratio) ** (1.0 / shots)
    # With several shots the reconstruction runs once, after the last, against the model as it
    # was before the first (the dense target, not a partly pruned one).
    dense = copy.deepcopy(model) if shots > 1 and options.reconstruct else None
    per_shot = dataclasses.replace(options, reconstruct=False) if dense is not None else options
    first: PruneReport | None = None
    kept = 1.0  # share of the directions the shots so far kept
    undos: list[Callable[[], None]] = []
    try:  # a failure or interrupt in any shot undoes the earlier ones: the model is as it was
        for _ in range(shots):
            with warnings.catch_warnings():
                if shots > 1:  # one warning for the whole call (below), not one per shot's share
                    warnings.simplefilter("ignore", TargetNotReachedWarning)
                progress = progress_of(per_shot)
                with progress.phase("eigenbasis: analysis (curvature capture, eigendecompositions, scores)"):
                    an = analyse(model, batches, per_shot, captured=captured, **dist_kw)
                with progress.phase("eigenbasis: decision (what to remove)"):
                    plan = decide(an, step, per_shot, **dist_kw)
                with progress.phase("eigenbasis: surgery"):
                    report, undo = _apply(model, an, plan, per_shot, changes=changes, **dist_kw)
                undos.append(undo)
            # (an iterator, by protocol, is its own iter(); a DataLoader is not asked again: a
            # shuffling one would draw its next seed from the global generator)
            one_shot_iterator = isinstance(batches, Iterator)
            if an.calibration is not None and one_shot_iterator:
                batches = an.calibration  # later shots reuse what it gave
            first = report if first is None else first
            kept *= 1.0 - report.realised_fraction
        if shots > 1:
            report = _overall(first, report, ratio, options, an, realised=1.0 - kept)
        if dense is not None:
            rebuilt = [n for n, m in model.named_modules() if isinstance(m, KFELayer)]
            _calibrate(model, dense, an, report, options, rebuilt=rebuilt, **dist_kw)
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise
    return report


def _check_options_alone(options: Any, arguments: dict[str, Any]) -> None:
    """``options=`` replaces the individual option arguments: refuse a non-PruneOptions, and any
    option argument also given with a value other than its default (it would be ignored)."""
    if not isinstance(options, PruneOptions):
        raise TypeError(
            f"options must be a PruneOptions (or None), got {type(options).__name__}; build one with "
            "PruneOptions(**your_dict), or pass the options as keyword arguments"
        )
    defaults = inspect.signature(prune).parameters
    names = {f.name for f in dataclasses.fields(PruneOptions)}
    given = []
    for name in sorted(names & arguments.keys()):
        value, default = arguments[name], defaults[name].default
        try:
            same = value is default or (type(value) is type(default) and bool(value == default))
        except Exception:  # a value whose == is not a plain truth value
            same = False
        if not same:
            given.append(name)
    if given:
        raise ValueError(
            f"options= is used instead of the individual option arguments, and {', '.join(given)} "
            "was also given: pass them inside the PruneOptions (dataclasses.replace(options, ...)) "
            "or leave options out"
        )


def _forward(opts: PruneOptions, device: torch.device) -> Callable[[nn.Module, Any], Any]:
    """``(model, batch) → output`` as every forward of a call runs it (batch moved to ``device``)."""
    if opts.forward_fn is not None:
        return lambda m, b: opts.forward_fn(m, to_device(b, device))
    return lambda m, b: m(to_device(split_batch(b, opts.input_fn)[0], device))


def _calibration_batches(an: Analysis, opts: PruneOptions) -> list[Any]:
    """The batches the curvature was measured on again (as many as the capture used). A
    re-iterable loader is iterated with the random states of the capture's pass, so a shuffling
    ``DataLoader`` gives the same batches (randomness from other sources, e.g. Python's or
    NumPy's generators in a dataset's transforms, is not replayed)."""
    limit = an.batches + an.skipped_batches
    if opts.max_batches is not None:
        limit = min(limit, opts.max_batches)
    with _replaying(an.replay):
        return list(itertools.islice(an.calibration or (), limit))


def _calibrate(
    model: nn.Module,
    dense: nn.Module | None,
    an: Analysis,
    report: PruneReport,
    opts: PruneOptions,
    *,
    rebuilt: list[str] | None = None,
    distributed: bool = False,
    process_group: Any = None,
) -> None:
    """Reconstruction (if asked) and BatchNorm re-estimation after the surgery of the ``rebuilt``
    layers (default: those the report says lost directions); recorded in ``report``."""
    if rebuilt is None:
        rebuilt = [r.name for r in report.layers if r.skipped is None and (r.removed_in or r.removed_out)]
    if not rebuilt or not (opts.recalibrate_bn or dense is not None):
        return
    batches = _calibration_batches(an, opts)
    if not batches:
        return
    forward = _forward(opts, an.device)
    if dense is not None:
        order = [n for n in an.fire_order if n in rebuilt]
        report.reconstruction_error = reconstruct(
            model, dense, order, batches, forward, damping=opts.reconstruct_damping
        )
    if opts.recalibrate_bn:
        bns = downstream_batchnorms(model, [model.get_submodule(n) for n in rebuilt], batches[0], forward)
        if recalibrate_batchnorm(
            model, bns, batches, forward, distributed=distributed, process_group=process_group
        ):
            names = {id(m): n for n, m in model.named_modules()}
            report.recalibrated_bn = [names[id(m)] for m in bns]


def _overall(
    first: PruneReport, last: PruneReport, ratio: float, opts: PruneOptions, an: Analysis, *, realised: float
) -> PruneReport:
    """The report of a multi-shot call: the last shot's layers, totals against the model before
    the first shot, the target judged on the whole call (one warning if it was missed, with what
    limits the last shot, ``an``), and ``realised_fraction`` the share of the directions the whole
    call removed: ``1 − Π_k (1 − r_k)`` over the shots' own fractions ``r_k`` (each shot's
    directions are those the previous one kept)."""
    out = dataclasses.replace(
        last,
        params_before=first.params_before,
        flops_before=first.flops_before,
        ratio=ratio,
        shots=opts.shots,
        realised_fraction=realised,
    )
    if opts.target == "directions":
        out.reached = realised
    else:
        before = out.params_before if opts.target == "params" else out.flops_before
        after = out.params_after if opts.target == "params" else out.flops_after
        out.reached = 1.0 - after / before if before else 0.0
        out.target_reached = out.reached >= ratio - TARGET_TOLERANCE
        out.limited_by = None
        if not out.target_reached:
            out.limited_by = last.limited_by or _what_limits(an, opts)
            warn_user(
                f"prune: target not reached: asked to remove {ratio:.1%} of the {opts.target} in "
                f"{opts.shots} shots, removed {out.reached:.1%} (÷{1 / max(1e-12, 1 - out.reached):.2f} "
                f"instead of ÷{1 / max(1e-12, 1 - ratio):.2f}); limited by {out.limited_by}",
                TargetNotReachedWarning,
            )
    return out


class EigenbasisEngine(PruningEngine):
    """The eigenbasis engine (``structure="eigenbasis"``): :func:`analyse`, :func:`decide` and
    :func:`apply` of this module behind the engine protocol; its change is one
    :class:`~lightning_eigendamage.plan.LayerChange` per rebuilt layer."""

    name = "eigenbasis"
    a_form = "channel"
    # Every example: the eigenvalue ranking loses accuracy on fewer (benchmarks/fisher_examples.py)
    capture_examples = None
    defaults = {"layer_cap": 0.75, "rank_by": "damage_per_cost"}
    choices = {"rank_by": ("damage", "damage_per_cost"), "target": ("directions", "params", "flops")}
    unused = ("damping", "greedy_steps")

    def candidates(self, model: nn.Module, options: PruneOptions) -> list[Candidate]:
        return find_layers(model, options.exclude, max_factor_dim=options.max_factor_dim)

    def analyse(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        options: PruneOptions,
        *,
        captured: CaptureResult | None = None,
        distributed: bool = False,
        prepared: Any = None,  # the eigenbasis has no check: nothing to reuse
    ) -> Analysis:
        return analyse(model, batches, options, captured=captured, distributed=distributed)

    def decide(
        self, analysis: Analysis, ratio: float, options: PruneOptions, *, distributed: bool = False
    ) -> Plan:
        return decide(analysis, ratio, options, distributed=distributed)

    def apply(
        self,
        model: nn.Module,
        analysis: Analysis,
        plan: Plan,
        options: PruneOptions,
        *,
        distributed: bool = False,
    ) -> tuple[PruneReport, dict[str, LayerChange]]:
        changes: dict[str, LayerChange] = {}
        report = apply(model, analysis, plan, options, changes=changes, distributed=distributed)
        return report, changes

    def replaced_parameters(
        self, change: dict[str, LayerChange]
    ) -> list[tuple[str, list[nn.Parameter], list[nn.Parameter]]]:
        return [
            (name, list(stage_parameters(c.old).values()), list(stage_parameters(c.new).values()))
            for name, c in change.items()
        ]

    def carry_optimizer_state(
        self,
        model: nn.Module,
        old_optimizers: Sequence[Optimizer],
        new_optimizers: Sequence[Optimizer],
        change: dict[str, LayerChange],
    ) -> TransplantReport:
        return carry_optimizer_state(model, old_optimizers, new_optimizers, change)

    def marked_layers(self, analysis: Analysis, plan: Plan, param_names: dict[int, str]) -> list[MarkedLayer]:
        return marked_layers(analysis, plan, param_names)


register_engine(EigenbasisEngine())
