"""Real channel removal, scored and compensated with K-FAC on the layers that read each channel.

EigenDamage (:func:`~lightning_eigendamage.prune`) keeps every layer's input and output widths and
adds rotation stages; on small layers those extra stages cost more time per training step than
their FLOPs say. :func:`prune_channels` removes whole channels instead, so the network becomes a
plain narrower one (as with Torch-Pruning), and uses second-order information to choose and to
compensate:

- A channel is scored where it is *read*: for every Conv2d/Linear ``j`` that takes it as input,
  the input-side Kron-OBS damage ``½·T_j·tr(W_jcᵀ G_j W_jc ([A_j⁻¹]_cc)⁻¹)``
  (:func:`~lightning_eigendamage.baselines.input_obs_scores`), summed over the readers of the
  channel's dependency group (residual adds couple several layers' channels).
- The removed channels' columns are folded into each reader's kept columns,
  ``W_K += W_R A_RK A_KK⁻¹`` (:func:`~lightning_eigendamage.baselines.input_obs_update`): the
  damped least-squares fit of the reader's outputs on the calibration inputs.
- Scores are *sequential* by default (``greedy_steps=32``): a single channel's damage assumes
  every other channel stays to absorb it, so two channels that carry the same feature both score
  about zero and a ranking by them drops both. Each group's channels are instead removed greedily,
  step by step, the readers moved to their compensated state after every step, and a channel
  scores the loss increase of removing it *after* those before it
  (:func:`~lightning_eigendamage.baselines.greedy_input_obs_scores`). On the converged
  ResNet-20 at ÷4 FLOPs (seed 0) this keeps 88 % right after pruning instead of 38 %.
- ``rank_by="relative"`` (default) ranks each channel by the square root of its score over the
  mean of that in its group. The damage is quadratic in the weights; its square root spreads like
  a norm, so a group with a few large scores keeps the rest (on the converged VGG at ÷4 FLOPs with
  single-channel scores: 88 % right after pruning, against 69 % with the damage itself,
  ``"relative_damage"``). The ranking is global.
- The BatchNorm layers downstream of the compensated readers are then re-estimated on the batches.

Dependency groups come from Torch-Pruning's :class:`~torch_pruning.DependencyGraph` (optional
dependency: ``pip install "lightning-eigendamage[channels]"``). :func:`remove_channels` is the
engine under both this module and the benchmarks' baselines: it takes per-channel scores (or a
Torch-Pruning importance), selects channels globally under a per-group cap until a channel or
FLOPs target, applies weight updates and removes the channels.

FLOPs are per example, 2 per multiply-add, counted by ``torch.utils.flop_counter`` in eval mode
(:func:`~lightning_eigendamage.costs.count_flops`); the search uses an exact analytic count of the
Conv2d/Linear FLOPs and treats every other op's FLOPs as fixed.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..adapters import DEPTHWISE, ConvAdapter, adapter_for
from ..attention import (
    HeadBlock,
    find_head_blocks,
    head_block,
    head_cost,
    record_calls,
    remove_heads,
)
from ..calibration import downstream_batchnorms, recalibrate_batchnorm
from ..checkpoint import mark_narrowed, state_dict_of
from ..costs import count_flops, count_params, module_path
from ..curvature import (
    CaptureOptions,
    CaptureResult,
    capture_factors,
    first_batches,
    split_batch,
    to_device,
)
from ..discovery import (
    FASTPATH,
    FUNCTIONAL,
    Candidate,
    check_usable_parameters,
    excluded_modules,
    find_layers,
    unpruned_layers_note,
)
from ..distributed import all_reduce_capture, broadcast_object, is_distributed, rank_zero_input
from ..engine import PruningEngine, get_engine, register_engine
from ..gradual import MarkedLayer
from ..nested import map_tensors, tensors_in
from ..optim import TransplantReport, carry_sliced_state
from ..options import PruneOptions
from ..progress import Progress, progress_of
from ..report import (
    TARGET_TOLERANCE,
    LayerReport,
    PruneReport,
    PruningWarning,
    TargetNotReachedWarning,
    reason_lines,
    warn_user,
)
from ..values import as_int, as_real
from .baselines import (
    DEFAULT_DAMPING,
    GREEDY_STEPS,
    GroupedInputObsUpdate,
    InputObsUpdate,
    Reader,
    damped,
    damped_inverse,
    greedy_input_obs_scores,
    input_obs_scores,
    weight_matrix,
)
from .hidden import first_producers, train_only_readers
from .latency import input_shapes, measure
from .latency import seconds as latency_seconds
from .parts import PartsGraph, UntraceableError, split_graph

if TYPE_CHECKING:
    from typing_extensions import Unpack

TARGETS = ("channels", "flops")
RANKS = ("score", "per_flop", "relative", "relative_per_flop", "relative_median")
RANK_BY = {
    "relative": "relative",  # of √damage
    "relative_damage": "relative",
    "damage": "score",
    "damage_per_cost": "per_flop",
    "relative_per_latency": "relative_per_latency",  # over the measured time a channel saves
    "damage_per_latency": "per_latency",
}

Scores = dict[nn.Module, torch.Tensor]
Update = Callable[[Sequence[int]], tuple[torch.Tensor, torch.Tensor | None]]
_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)
_LAYERS = (nn.Conv2d, nn.Linear)


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - the test environment has it
        raise ImportError(
            "channel removal needs Torch-Pruning's dependency graph: pip install "
            '"lightning-eigendamage[channels]" (or torch-pruning>=1.6.1)'
        ) from err
    return torch_pruning


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


# The report of a channel call is the library's one report type, with ``structure="channels"``.
ChannelPruneReport = PruneReport


def _widths(module: nn.Module) -> tuple[int, int]:
    """``(input, output)`` width of a Conv2d or Linear."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    return module.in_features, module.out_features


def layer_reports(
    before: dict[str, tuple[int, int]], model: nn.Module, skipped: dict[str, str] | None = None
) -> list[LayerReport]:
    """One :class:`~lightning_eigendamage.report.LayerReport` per Conv2d/Linear named in
    ``before`` (its ``(in, out)`` widths before the call): widths now as ``kept_in``/``kept_out``,
    form ``"channels"``, and the reason it was left whole from ``skipped`` if it kept its widths."""
    modules = dict(model.named_modules())
    out = []
    for name, (c_in, c_out) in before.items():
        module = modules.get(name)
        now_in, now_out = _widths(module) if module is not None else (c_in, c_out)
        changed = (now_in, now_out) != (c_in, c_out)
        out.append(
            LayerReport(
                name=name,
                kind=type(module).__name__,
                in_features=c_in,
                out_features=c_out,
                kept_in=now_in,
                kept_out=now_out,
                form="channels",
                skipped=None if changed else (skipped or {}).get(name),
                removed_in=c_in - now_in,
                removed_out=c_out - now_out,
            )
        )
    return out


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
        # one example runs: every output row is its (a model may fold tokens or frames into dim 0)
        if isinstance(module, nn.Conv2d):
            t = output.numel() // module.out_channels
            k2 = module.kernel_size[0] * module.kernel_size[1]
            c_in, c_out, groups = module.in_channels, module.out_channels, module.groups
        else:
            t = output.numel() // module.out_features
            k2, c_in, c_out, groups = 1, module.in_features, module.out_features, 1
        if module not in costs:
            depthwise = groups > 1 and groups == c_in == c_out
            costs[module] = _LayerCost(0, c_in, c_out, groups, depthwise)
            order.append(module)
        costs[module].coef += 2 * t * k2

    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in mods]
    try:
        _run(model, _head(example, 1))
    finally:
        for h in handles:
            h.remove()
    return costs, order


def _head(example: Any, k: int) -> Any:
    """The first ``k`` examples of ``example`` (tensors, tuples, lists, dicts of them)."""
    return map_tensors(lambda t: t[:k] if t.dim() else t, example)


def _run(model: nn.Module, example: Any, train: bool = False) -> Any:
    """``model(example)`` under no_grad in eval mode, or in train mode; modes, buffers (BatchNorm
    statistics) and random streams are put back afterwards. The model gets a copy of the tensors
    in ``example``: a model that changes its input in place (``x.mul_(2)``) would otherwise
    change the calibration batch on every run (and each check would see another input)."""
    with _untouched(model, buffers=train), torch.no_grad(), module_path():
        model.train(train)
        return model(_cloned(example))


def _cloned(example: Any) -> Any:
    """``example`` with every tensor in it (tuples, lists, dicts of them) copied."""
    return map_tensors(torch.Tensor.clone, example)


@contextlib.contextmanager
def _untouched(model: nn.Module, *, buffers: bool = True) -> Iterator[None]:
    """Put back, on exit, every module's train/eval mode, the values of every buffer (if
    ``buffers``), the CPU random stream and those of the model's CUDA devices."""
    modes = {m: m.training for m in model.modules()}
    kept = [(b, b.detach().clone()) for b in model.buffers()] if buffers else []
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for b, v in kept:
                b.copy_(v)
        for m, mode in modes.items():
            m.training = mode


def _output_shapes(out: Any) -> list[tuple[int, ...]]:
    """The shapes of every tensor in a model's output (tuples, lists, dicts, dataclasses), in a
    fixed order."""
    return [tuple(t.shape) for t in tensors_in(out)]


def _forward(model: nn.Module, example: Any) -> Any:
    return model(_cloned(example))  # (a copy: see _run)


def _frozen(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every parameter that does not require grad."""
    return [
        (m, k)
        for m in model.modules()
        for k, p in m._parameters.items()
        if p is not None and not p.requires_grad
    ]


def _refreeze(frozen: list[tuple[nn.Module, str]]) -> None:
    """Torch-Pruning's new Parameters require grad: freeze those that replaced frozen ones."""
    for module, name in frozen:
        param = module._parameters.get(name)
        if param is not None:
            param.requires_grad_(False)


def _plain_state(value: Any) -> bool:
    """Whether ``value`` is plain data a Torch-Pruning operation node keeps (sizes, offsets)."""
    if isinstance(value, list):
        return all(isinstance(v, (int, type(None))) for v in value)
    return isinstance(value, (bool, int, float, str, type(None)))


class _Snapshot:
    """What channel removal changes, to put back on failure: per module its Parameter and buffer
    objects (the same objects go back, so optimizers and references stay valid), a copy of their
    values, its plain attributes (``in_channels``, ``num_features``…) and the keys of its
    state_dict hooks (a cut marks the narrowed layers: :func:`cut_channels`) and its class (a
    head-pruned ``nn.MultiheadAttention`` changes class). Other hooks and
    attributes are never touched. Memory: one copy of the parameters and buffers.

    With ``graph`` (Torch-Pruning's, or a :class:`~.parts.PartsGraph`), also the plain state of
    its operation nodes: a cut updates the sizes a concatenation or split keeps
    (``concat_sizes``, ``split_sizes``, ``offsets``), which a model put back must find as they were."""

    _PLAIN = (bool, int, float, str, tuple, type(None))

    def __init__(self, model: nn.Module, graph: Any = None) -> None:
        own = set(model.modules())
        self.ops = [
            (op, {k: list(v) if isinstance(v, list) else v for k, v in vars(op).items() if _plain_state(v)})
            for op in getattr(graph, "module2node", {})
            if isinstance(op, nn.Module) and op not in own
        ]
        self.items = []
        with torch.no_grad():
            for m in model.modules():
                params, bufs = dict(m._parameters), dict(m._buffers)
                values = {("p", k): t.detach().clone() for k, t in params.items() if t is not None}
                values |= {("b", k): t.detach().clone() for k, t in bufs.items() if t is not None}
                attrs = {k: v for k, v in vars(m).items() if isinstance(v, self._PLAIN)}
                self.items.append((m, params, bufs, values, attrs, set(m._state_dict_hooks), type(m)))

    def restore(self) -> None:
        for op, state in self.ops:
            op.__dict__.update({k: list(v) if isinstance(v, list) else v for k, v in state.items()})
        with torch.no_grad():
            for m, params, bufs, values, attrs, hooks, cls in self.items:
                if type(m) is not cls:  # a head-pruned MultiheadAttention changes class
                    m.__class__ = cls
                for key in [k for k in m._state_dict_hooks if k not in hooks]:
                    del m._state_dict_hooks[key]
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(bufs)
                for (kind, k), v in values.items():
                    t = params[k] if kind == "p" else bufs[k]
                    if t.shape == v.shape and t.dtype == v.dtype:
                        t.copy_(v)
                    else:
                        t.data = v
                for k in [k for k, v in vars(m).items() if isinstance(v, self._PLAIN) and k not in attrs]:
                    del m.__dict__[k]
                m.__dict__.update(attrs)


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
    units: list[list[int]] = field(default_factory=list)  # root channels removed together
    # attention heads: the FLOPs each unit (a head) saves, fixed (no Torch-Pruning members)
    unit_flops: list[int] | None = None
    head_dim: int = 0

    def __post_init__(self) -> None:
        if not self.units:
            self.units = [[c] for c in range(self.n)]


def _units(group: Any, dg: Any) -> list[list[int]] | None | str:
    """The root channels of a Torch-Pruning ``group`` that can only go together, or None when
    each can go alone, or the reason the group must stay whole.

    A grouped conv among the members (on either side) keeps equal widths per conv group: with
    ``w`` channels per conv group on that side, its channels ``{j·w + p : every conv group j}``
    (position ``p``) go together, so the root channels mapped to them form one unit. Every root
    channel must map to exactly one such position, each unit holding one channel of every conv
    group, and two grouped members must agree on the units."""
    units: list[list[int]] | None = None
    n = len(group[0].idxs)
    for item in group:
        module = item.dep.target.module
        if not _grouped(module):
            continue
        out_side = dg.is_out_channel_pruning_fn(item.dep.handler)
        per = (module.out_channels if out_side else module.in_channels) // module.groups
        by_pos: dict[int, list[int]] = {}
        for i, r in zip(item.idxs, item.root_idxs):
            if r is None:
                return f"a grouped convolution (groups={module.groups}) reads channels its group does not map"
            by_pos.setdefault(int(i) % per, []).append(int(r))
        mine = sorted(sorted(u) for u in by_pos.values())
        if sum(len(u) for u in mine) != n or any(len(u) != module.groups for u in mine):
            return (
                f"the channels of a grouped convolution (groups={module.groups}) do not map one "
                "to one onto the group's"
            )
        if units is not None and units != mine:
            return "two grouped convolutions tie the group's channels differently"
        units = mine
    tied = _tied_roots(group, dg)
    if tied is None or isinstance(tied, str):
        return units if tied is None else tied
    if units is not None:
        return "a grouped convolution and an operation that ties its channels in one group"
    return tied


def _tied_roots(group: Any, dg: Any) -> list[list[int]] | None | str:
    """The root channels of ``group`` that Torch-Pruning removes together although its listing
    gives each its own root (a gate ``u * σ(v)`` on the two halves of one conv's output: removing
    ``u_i`` removes the product's channel ``i``, so ``v_i`` goes too), or None where each goes
    alone, or the reason the group must stay whole (ties of unequal sizes).

    Only a group in which some member sees a part of the root channels (a split) can tie them;
    there, the group of one root channel is built (the middle one, the first, the last): where
    each removes only itself there are no ties, otherwise every channel is probed and the sets of
    the root's own channels each removes are the units. Cached on the group."""
    cached = getattr(group, "_led_tied_roots", False)
    if cached is not False:
        return cached
    n = len(group[0].idxs)
    everything = set(range(n))
    tied: list[list[int]] | None | str = None
    if any({int(r) for r in it.root_idxs if r is not None} != everything for it in group):
        root, fn = group[0].dep.target.module, group[0].dep.handler

        def removes(c: int) -> list[int]:
            probe = dg.get_pruning_group(root, fn, [c])
            return sorted(
                {
                    int(i)
                    for it in probe
                    if it.dep.target.module is root and dg.is_out_channel_pruning_fn(it.dep.handler)
                    for i in it.idxs
                }
            )

        if any(removes(c) != [c] for c in {n // 2, 0, n - 1}):
            units, seen = [], set()
            for c in range(n):
                if c in seen:
                    continue
                unit = removes(c)
                if c not in unit or seen & set(unit):
                    tied = "an operation ties the group's channels in overlapping sets"
                    break
                units.append(unit)
                seen |= set(unit)
            else:
                sizes = {len(u) for u in units}
                tied = (
                    units
                    if len(sizes) == 1
                    else "an operation ties the group's channels in sets of unequal sizes"
                )
    try:
        group._led_tied_roots = tied
    except AttributeError:  # a group that takes no attributes is probed again next time
        pass
    return tied


def _group_score(group: Any, dg: Any, n: int, scores: Scores | None, importance: Any, in_scores: Scores):
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
    dg: Any,
    ignored: list[nn.Module],
    costs: dict[nn.Module, _LayerCost],
    scores: Scores | None,
    importance: Any,
    names: dict[nn.Module, str],
    in_scores: Scores,
    allowed: Callable[[nn.Module], str | None] | None = None,
    left: dict[str, str] | None = None,
    progress: Progress | None = None,
    found: list[Any] | None = None,
) -> list[_Group]:
    """The prunable groups, scored. ``allowed(module)`` gives the reason a member forbids its
    group (the group is left whole, the reason put in ``left`` under "group of <root>"), or None.
    ``found``: ``dg``'s groups with ``ignored`` (:func:`_all_groups`), if already listed."""
    groups = []
    if found is None:
        found = _all_groups(dg, ignored)
    for group in (progress or Progress(False)).bar(found, len(found), "scoring the channel groups"):
        root_item = group[0]
        root = root_item.dep.target.module
        n = len(root_item.idxs)
        why = None
        if allowed is not None:
            why = next((r for r in (allowed(it.dep.target.module) for it in group) if r), None)
        if why is None:
            try:  # a group whose index mapping is broken is never cut (left whole, said why)
                _check_group(dg, group, root, names)
            except UntraceableError as err:
                why = "its index mapping is broken; " + str(err).removesuffix(_UNTRACEABLE)
        if why is not None:
            if left is not None:
                left[f"group of {names.get(root, '?')}"] = f"left whole: {why}"
            continue
        units = _units(group, dg)
        if isinstance(units, str):
            if left is not None:
                left[f"group of {names.get(root, '?')}"] = f"left whole: {units}"
            continue
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
        groups.append(_Group(root, root_item.dep.handler, n, s, effects, rows, cols, units or []))
    return groups


def _all_groups(dg: Any, ignored: list[nn.Module]) -> list[Any]:
    """Every Torch-Pruning dependency group of ``dg`` rooted at a Conv2d/Linear, ``ignored``
    layers' outputs kept."""
    return list(dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)))


def _factor_modules(found: list[Any], dg: Any, allowed: Callable[[Any], str | None]) -> set[nn.Module]:
    """The layers whose factors the scores of ``found`` read: the readers (in-side members) of
    every group that ``allowed`` (with every scorable layer taken as scored) and its units do not
    leave whole in any case. A group's producers and the readers of a group left whole (e.g. the
    LayerNorm-coupled width of a transformer's residual stream) need none."""
    need: set[nn.Module] = set()
    for group in found:
        members = [it.dep.target.module for it in group]
        if any(allowed(m) for m in members) or isinstance(_units(group, dg), str):
            continue
        need.update(it.dep.target.module for it in group if dg.is_in_channel_pruning_fn(it.dep.handler))
    return need


# ---------------------------------------------------------------------------------------------
# Global selection
# ---------------------------------------------------------------------------------------------


def _seconds_per_flop(
    costs: dict[nn.Module, _LayerCost], latency: dict[nn.Module, list[float]] | None
) -> float:
    """The mean seconds per FLOP of the layers ``latency`` times, at their widths in ``costs``."""
    timed = [
        (latency_seconds(latency[m], c.c_in, c.c_out, c.groups, c.depthwise), c.flops())
        for m, c in costs.items()
        if latency and m in latency
    ]
    total = sum(f for _, f in timed)
    return sum(t for t, _ in timed) / total if total else 0.0


def _caps(groups: list[_Group], max_group_ratio: float, min_channels: int) -> list[int]:
    """Per group the most root channels it may lose: ``min(⌊max_group_ratio·n⌋, n − min_channels)``."""
    return [max(0, min(math.floor(max_group_ratio * g.n + 1e-9), g.n - min_channels)) for g in groups]


def _round_removals(group: _Group, cap: int, round_to: int) -> list[int]:
    """The numbers of units ``group`` may lose when its kept width must be a multiple of
    ``round_to``, ascending: 0 (the group stays whole, whatever its width) and every ``r`` with
    ``cap ≥ r·w`` (``w`` channels per unit) that keeps ``(U − r)·w ≡ 0 (mod round_to)`` channels,
    ``U`` units, at least one kept. The kept units step by ``s = round_to / gcd(round_to, w)``
    (kept width ``lcm(w, round_to)·m``, ``m ≥ 1``): plain channels (``w = 1``) by ``round_to``,
    the units of a grouped conv (one channel per conv group) and attention heads (``w = d``) by
    what makes their width in channels a multiple (1 head when ``d`` is already one). A group of
    ``n ≤ lcm(w, round_to)`` channels, or whose caps forbid the widest multiple below ``n``, is
    left whole. Units of unequal widths (never built) are not rounded: every count up to the cap."""
    n_units = len(group.units)
    widths = {len(u) for u in group.units}
    if len(widths) != 1:
        return [r for r in range(n_units + 1) if sum(len(u) for u in group.units[:r]) <= cap]
    (w,) = widths
    step = round_to // math.gcd(round_to, w)
    out = [0]
    for kept in range(((n_units - 1) // step) * step, 0, -step):
        if (n_units - kept) * w > cap:
            break
        out.append(n_units - kept)
    return out


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
    latency: dict[nn.Module, list[float]] | None = None,
    round_to: int = 1,
) -> tuple[list[list[int]], int]:
    """Root channels removed per group (lowest scores first under the caps, until the target), and
    the analytic FLOPs after removal. ``rank_by="per_flop"`` ranks by score per FLOP that the
    channel's removal saves from the unpruned network, ``"relative"`` by score over the mean
    score of its group (Torch-Pruning's normaliser: the removal spreads about evenly), and
    ``"relative_per_flop"`` by that over the FLOPs the channel's removal saves (channels of
    FLOP-heavy layers go first), ``"relative_median"`` by score over the group's median (a few
    large scores do not make the rest look cheap), ``"per_latency"`` / ``"relative_per_latency"``
    like the ``per_flop`` ones over the seconds the removal saves by ``latency`` (module → the
    coefficients of its fitted time, :mod:`~lightning_eigendamage.channels.latency`; a layer
    without them, and an attention head, count their FLOPs at the table's mean seconds per FLOP).

    ``round_to = m > 1``: every group keeps a width (root channels) that is a multiple of ``m``,
    or its full width (:func:`_round_removals`). After the selection above, each group's count of
    removed units ``k`` is rounded *down* to the nearest allowed count (its kept width rounded up:
    the group's highest-ranked removed units come back), the group then losing exactly its ``k'``
    lowest-ranked units. If the target is no longer met, whole *blocks* are taken: a group's
    block is the units between its allowed count and the next (``m`` channels for a plain group),
    its next-lowest-ranked ones, and blocks go in order of their mean rank ``(1/|B|)·Σ_{u∈B}
    rank(u)`` until the target is met, under the same caps and FLOPs tolerance (a block that
    would land below ``(1 − flops_tolerance)·goal`` is passed over, and taken only if the goal
    cannot be met otherwise). The FLOPs are recounted from the dense widths with the same
    per-unit bookkeeping, so they stay exact. ``round_to = 1`` selects exactly as without it."""
    caps = _caps(groups, max_group_ratio, min_channels)
    dense = {m: _LayerCost(c.coef, c.c_in, c.c_out, c.groups, c.depthwise) for m, c in costs.items()}
    state = dict(dense)
    flops = other_flops + sum(c.flops() for c in state.values())
    goal_channels = _channels_goal(ratio, sum(g.n for g in groups))
    goal_flops = (1.0 - ratio) * flops_before
    chosen: list[list[int]] = [[] for _ in groups]
    n_removed = 0

    def done() -> bool:
        return n_removed >= goal_channels if target == "channels" else flops <= goal_flops

    per_flop_s = _seconds_per_flop(state, latency)

    def seconds(module: nn.Module, c: _LayerCost) -> float:
        coef = (latency or {}).get(module)
        if coef is None:
            return c.flops() * per_flop_s
        return latency_seconds(coef, c.c_in, c.c_out, c.groups, c.depthwise)

    def change(gi: int, u: int, dry: bool) -> tuple[int, float]:
        """FLOPs and seconds change of removing unit ``u`` (root channels) of group ``gi``
        (applied unless ``dry``)."""
        unit = groups[gi].units[u]
        if groups[gi].unit_flops is not None:
            return -groups[gi].unit_flops[u], -groups[gi].unit_flops[u] * per_flop_s
        delta, dt = 0, 0.0
        for module, side, counter in groups[gi].effects:
            k = sum(counter.get(c, 0) for c in unit)
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
            if latency is not None:
                dt += seconds(module, new) - seconds(module, st)
            if not dry:
                state[module] = new
        return delta, dt

    def apply(gi: int, u: int, dry: bool) -> int:
        return change(gi, u, dry)[0]

    # a unit's score: the sum of its channels' (one channel per unit, except around grouped convs)
    unit_scores = [
        torch.stack([g.scores[unit].sum() for unit in g.units]) if g.units else g.scores for g in groups
    ]
    # the relative ranks' normaliser, once per group: its mean score (its median for "relative_median")
    middle = (lambda s: s.median()) if rank_by == "relative_median" else (lambda s: s.mean())
    norm = [max(float(middle(us)), 1e-300) if us.numel() else 1.0 for us in unit_scores]

    def rank(gi: int, u: int) -> float:
        score = float(unit_scores[gi][u])
        if rank_by.startswith("relative"):
            score /= norm[gi]
        if rank_by.endswith("per_flop"):
            return score / max(-apply(gi, u, dry=True), 1)
        if rank_by.endswith("per_latency"):
            return score / max(-change(gi, u, dry=True)[1], 1e-12)
        return score

    pool = sorted(
        ((rank(gi, u), gi, u) for gi, g in enumerate(groups) for u in range(len(g.units))),
        key=lambda x: (x[0], x[1], x[2]),
    )
    # With a FLOPs target, a channel whose removal would land more than `flops_tolerance` below
    # the goal is passed over for the next ones in the ranking (a thin, cheap channel elsewhere);
    # only if the goal cannot be met otherwise are passed-over channels taken, in ranking order.
    floor = (1.0 - flops_tolerance) * goal_flops
    passed: list[tuple[int, int]] = []

    taken: list[list[int]] = [[] for _ in groups]  # the units removed, per group

    def take(gi: int, u: int) -> None:
        nonlocal n_removed, flops
        chosen[gi].extend(groups[gi].units[u])
        taken[gi].append(u)
        n_removed += len(groups[gi].units[u])
        flops += apply(gi, u, dry=False)

    for _, gi, u in pool:
        if done():
            break
        if len(chosen[gi]) + len(groups[gi].units[u]) > caps[gi]:
            continue
        if target == "flops" and flops + apply(gi, u, dry=True) < floor:
            passed.append((gi, u))
            continue
        take(gi, u)
    for gi, u in passed:
        if done():
            break
        if len(chosen[gi]) + len(groups[gi].units[u]) > caps[gi]:
            continue
        take(gi, u)
    if round_to == 1:
        return [sorted(c) for c in chosen], flops

    # Rounding: each group's units in ranking order, the counts it may lose, the selection's
    # count rounded down to one of them (kept width up), then whole blocks until the target.
    order: list[list[int]] = [[] for _ in groups]
    ranks: list[list[float]] = [[] for _ in groups]
    for r, gi, u in pool:
        order[gi].append(u)
        ranks[gi].append(r)
    allowed = [_round_removals(g, caps[gi], round_to) for gi, g in enumerate(groups)]
    level = [max(i for i, a in enumerate(allowed[gi]) if a <= len(taken[gi])) for gi in range(len(groups))]
    state.clear()
    state.update(dense)  # the bookkeeping starts again from the dense widths
    flops = other_flops + sum(c.flops() for c in state.values())
    n_removed = 0
    for gi in range(len(groups)):
        chosen[gi].clear()
        taken[gi].clear()
        for u in order[gi][: allowed[gi][level[gi]]]:
            take(gi, u)

    def block(gi: int) -> tuple[float, int] | None:
        """``(mean rank, group)`` of group ``gi``'s next block, or None when it has none."""
        if level[gi] + 1 >= len(allowed[gi]):
            return None
        lo, hi = allowed[gi][level[gi]], allowed[gi][level[gi] + 1]
        return sum(ranks[gi][lo:hi]) / (hi - lo), gi

    def take_block(gi: int) -> None:
        lo, hi = allowed[gi][level[gi]], allowed[gi][level[gi] + 1]
        for u in order[gi][lo:hi]:
            take(gi, u)
        level[gi] += 1
        nxt = block(gi)
        if nxt is not None:
            heapq.heappush(heap, nxt)

    heap = [b for b in map(block, range(len(groups))) if b is not None]
    heapq.heapify(heap)
    passed_blocks: list[tuple[float, int]] = []
    while heap and not done():
        key, gi = heapq.heappop(heap)
        lo, hi = allowed[gi][level[gi]], allowed[gi][level[gi] + 1]
        # the block's change, as the sum of its units' changes from the current widths: exact
        # where each layer's FLOPs are linear in the group's channels (a layer that both reads
        # and writes the group is bilinear, and the sum slightly overstates the saving); only
        # the tolerance test below uses it, the bookkeeping takes the units one by one
        delta = sum(apply(gi, u, dry=True) for u in order[gi][lo:hi])
        if target == "flops" and flops + delta < floor:
            passed_blocks.append((key, gi))
            continue
        take_block(gi)
    heap = passed_blocks
    heapq.heapify(heap)
    while heap and not done():
        _, gi = heapq.heappop(heap)
        take_block(gi)
    return [sorted(c) for c in chosen], flops


# ---------------------------------------------------------------------------------------------
# prune_channels
# ---------------------------------------------------------------------------------------------


def _check(
    ratio: Any, target: str, max_group_ratio: Any, min_channels: Any, flops_tolerance: Any
) -> tuple[float, float, int, float]:
    """The engine's options, checked and as Python numbers (NumPy scalars and one-element
    tensors accepted)."""
    r, cap, k, tol = as_real(ratio), as_real(max_group_ratio), as_int(min_channels), as_real(flops_tolerance)
    if r is None or not 0.0 <= r < 1.0:
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not isinstance(target, str) or target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if cap is None or not 0.0 < cap <= 1.0:
        raise ValueError(f"max_group_ratio must be in (0, 1], got {max_group_ratio!r}")
    if k is None or k < 1:
        raise ValueError(f"min_channels must be an integer ≥ 1, got {min_channels!r}")
    if tol is None or not 0.0 <= tol <= 1.0:  # 1: never pass a channel over
        raise ValueError(f"flops_tolerance must be a number in [0, 1], got {flops_tolerance!r}")
    return r, cap, k, tol


def _check_scores(table: Scores | None, side: str) -> None:
    """ValueError unless ``table`` maps modules to one finite score per output (``side="out"``)
    or input (``"in"``) channel."""
    for module, s in (table or {}).items():
        if not isinstance(module, nn.Module):
            raise ValueError(f"scores are keyed by module instances, got a key {module!r}")
        if isinstance(module, nn.Conv2d):
            n = module.out_channels if side == "out" else module.in_channels
        elif isinstance(module, nn.Linear):
            n = module.out_features if side == "out" else module.in_features
        elif isinstance(module, _BATCHNORMS) and side == "out":
            n = module.num_features
        else:
            raise ValueError(
                f"{side}-channel scores for a {type(module).__name__}: only Conv2d, Linear (and "
                "BatchNorm, output side) have them"
            )
        if not torch.is_tensor(s) or s.numel() != n or not bool(torch.isfinite(s).all()):
            raise ValueError(f"the scores of {type(module).__name__} {module} must be {n} finite numbers")


def _channels_goal(ratio: float, total: int) -> int:
    """The whole channels a ``"channels"`` target asks for, ``⌊ratio · total⌋``: the selection
    stops there."""
    return math.floor(ratio * total + 1e-9)


def _target_met(target: str, ratio: float, reached: float, n_removed: int, total: int) -> bool:
    """A ``"flops"`` target within :data:`TARGET_TOLERANCE`; a ``"channels"`` target once its
    whole channels (:func:`_channels_goal`) are gone (0.4 of 64 channels is 25 of them)."""
    if target == "channels":
        return n_removed >= _channels_goal(ratio, total)
    return reached >= ratio - TARGET_TOLERANCE


_LIMITED = "the groups that may be narrowed are exhausted (per-group caps, groups left whole: see skipped)"

_UNTRACEABLE = (
    "; nothing was removed. prune() (EigenDamage) keeps every layer's widths and needs no dependency graph"
)


def dependency_graph(model: nn.Module, example_inputs: Any, ignored: Iterable[nn.Module] = ()) -> Any:
    """Torch-Pruning's dependency graph of ``model`` (traced by Torch-Pruning in eval mode on
    ``example_inputs``, under autograd even inside ``no_grad``; modes, buffers and random streams
    are put back), checked before any group is built.

    Raises:
        RuntimeError: tracing fails (torchvision's ShuffleNet V2); Torch-Pruning's shape
            inference gives up on a reshape ("Maximum recursive depth reached": torchvision's
            Swin, whose groups then grow until memory runs out); or one channel of a root that
            is not in ``ignored`` maps outside a member's width (:func:`_check_index_mappings`).
    """
    tp = _torch_pruning()
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "called inside torch.inference_mode(): Torch-Pruning traces the channel dependencies "
            "on the autograd graph; call it outside (torch.no_grad() around the call is fine)"
        )
    names = {m: n for n, m in model.named_modules()}
    # Torch-Pruning calls model(*example_inputs) first: a batch tensor must not be unpacked.
    example_inputs = _cloned(example_inputs)  # (the trace runs the model several times: see _run)
    traced = (example_inputs,) if isinstance(example_inputs, (torch.Tensor, dict)) else example_inputs
    with _untouched(model), torch.enable_grad():  # Torch-Pruning traces in eval mode
        dg = _traced_graph(tp, model, traced)
    _check_index_mappings(dg, list(ignored), names)
    return dg


def channel_graph(model: nn.Module, example: Any, ignored: Iterable[nn.Module] = ()) -> Any:
    """The channel dependency graph of ``model`` on ``model(example)``: Torch-Pruning's graph of
    the whole model (:func:`dependency_graph`) or, where that cannot be built, a
    :class:`~.parts.PartsGraph` of the parts it can build (:func:`~.parts.split_graph`: each
    child traced alone, the untraceable ones split further or left whole).

    Raises:
        RuntimeError: the model fails on ``example``, or not even one part can be traced
            (:class:`~.parts.UntraceableError`, with the whole graph's reason).
    """
    try:
        return dependency_graph(model, example, ignored)
    except UntraceableError as err:
        graph = split_graph(
            model,
            (example,),
            {},
            err,
            build=dependency_graph,
            outputs=lambda m, a: _output_layers(m, a, lambda mm, x: mm(*x)),
            untouched=_untouched,
        )
    # the reasons name what failed, not what the whole model's error advises
    graph.error = graph.error.removesuffix(_UNTRACEABLE)
    graph.untraced = {k: v.removesuffix(_UNTRACEABLE) for k, v in graph.untraced.items()}
    return graph


def untraced_layers(graph: Any) -> dict[str, str]:
    """``{layer name: reason}`` for the Conv2d/Linear layers the graph does not cover (none for a
    whole graph; see :meth:`~.parts.PartsGraph.uncovered`)."""
    return graph.uncovered() if isinstance(graph, PartsGraph) else {}


def _traced_graph(tp: Any, model: nn.Module, traced: Any) -> Any:
    """Torch-Pruning's trace, all or nothing: the hooks it registers are removed whatever happens
    (a failed trace leaves its own on every layer), a ``KeyboardInterrupt`` (or any other
    non-``Exception``) raised inside the model's call (its forward or its hooks) stays what it is
    (Torch-Pruning retries a failed forward with other arguments, which would hide it), and the
    error names the model's own failure rather than that of the retry."""
    hook_tables = [
        (table, set(table))
        for m in model.modules()
        for attr, table in vars(m).items()
        if attr.endswith(("hooks", "hooks_with_kwargs", "hooks_always_called")) and isinstance(table, dict)
    ]
    raised: list[BaseException] = []
    # the whole call is watched, not only ``forward``: a ``KeyboardInterrupt`` raised in one of
    # the model's forward hooks must not be swallowed by the retry either
    own = model.__dict__.get("_call_impl")
    call = model._call_impl

    def recording(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except BaseException as err:
            raised.append(err)
            raise

    model.__dict__["_call_impl"] = recording
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=traced, verbose=False, output_transform=_output_tensors
                )
            except BaseException as err:
                first = next((e for e in raised if not isinstance(e, Exception)), None)
                if first is not None:
                    raise first from None
                if not isinstance(err, Exception):
                    raise
                cause = raised[0] if raised else err
                kind = RuntimeError if raised else UntraceableError
                raise kind(
                    "Torch-Pruning could not build the channel dependencies of this model: "
                    + (
                        f"the model fails on the example inputs ({type(cause).__name__}: {cause}); pass a "
                        "batch the model accepts"
                        if raised
                        else f"{type(err).__name__}: {err}"
                    )
                    + _UNTRACEABLE
                ) from cause
    finally:
        if own is None:
            model.__dict__.pop("_call_impl", None)
        else:
            model.__dict__["_call_impl"] = own
        for table, before in hook_tables:
            for key in [k for k in table if k not in before]:
                del table[key]
    for w in caught:
        if "maximum recursive depth" in str(w.message).lower():
            raise UntraceableError(
                "Torch-Pruning could not infer the shapes through this model's reshapes (its "
                "shape inference reached its recursion limit), so its channel groups would be "
                "wrong or grow without bound" + _UNTRACEABLE
            )
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return dg


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output for Torch-Pruning's trace (which walks tuples, lists and
    dicts itself, but not a dataclass)."""
    return list(tensors_in(out))


def _check_index_mappings(dg: Any, ignored: list[nn.Module], names: dict[nn.Module, str]) -> None:
    """Probe every root Torch-Pruning's ``get_all_groups`` would start from with one channel:
    if that channel maps to an index outside a member's width, the graph's index mapping is
    broken (torchvision's MaxViT: one channel of ``to_qkv`` maps to 18,432 indices of a
    1,536-wide layer), and the full group would exhaust memory. Raises RuntimeError then, and
    where Torch-Pruning cannot build the group at all (a Linear feeding an ``nn.GRU``: its index
    mapping raises IndexError)."""
    skip = set(ignored) | set(getattr(dg, "IGNORED_LAYERS_IN_TRACING", []))
    # one channel maps to at most a feature map's worth of indices (a flatten before a Linear):
    # far more than 64 times the widest dimension of any parameter is a mapping that keeps growing
    widest = max((max(p.shape) for m in names for p in m.parameters(recurse=False) if p.dim()), default=1)
    widest *= _INDEX_GROWTH
    for module in list(dg.module2node):
        if module in skip or not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        pruner = dg.get_pruner_of_module(module)
        if pruner is None or not pruner.get_out_channels(module):
            continue
        try:
            with _bounded_index_mappings(widest, names.get(module, "?")):
                group = dg.get_pruning_group(module, pruner.prune_out_channels, [0])
        except UntraceableError:
            raise
        except Exception as err:  # noqa: BLE001 — Torch-Pruning's own failure (a layer feeding an nn.GRU)
            raise UntraceableError(
                f"Torch-Pruning could not build the channel group of {names.get(module, '?')} "
                f"({type(err).__name__}: {err})" + _UNTRACEABLE
            ) from err
        _check_group(dg, group, module, names)


_INDEX_GROWTH = 64  # see _check_index_mappings


@contextlib.contextmanager
def _bounded_index_mappings(limit: int, root: str) -> Iterator[None]:
    """While building one channel's group: every Torch-Pruning index mapping (flatten, concat,
    slice, split…) that maps it to more than ``limit`` indices raises UntraceableError. Through
    some reshapes (torchvision's Swin V2) the mapped index lists grow on every step around the
    graph's cycles, and the group would take all memory before any index could be checked. The
    mapping classes are put back as they were on exit."""
    from torch_pruning.dependency import index_mapping

    classes = [
        c
        for c in vars(index_mapping).values()
        if isinstance(c, type) and c.__module__ == index_mapping.__name__ and "__call__" in vars(c)
    ]
    calls = {c: vars(c)["__call__"] for c in classes}

    def bounded(call: Callable[..., Any]) -> Callable[..., Any]:
        def mapped(self: Any, idxs: Any) -> Any:
            out = call(self, idxs)
            if len(out) > limit:
                raise UntraceableError(
                    f"Torch-Pruning maps one channel of {root} to {len(out)} indices, more than "
                    f"{limit} ({_INDEX_GROWTH}× any dimension of the model): its index mapping "
                    "through this model's reshapes grows without bound" + _UNTRACEABLE
                )
            return out

        return mapped

    for c, call in calls.items():
        c.__call__ = bounded(call)
    try:
        yield
    finally:
        for c, call in calls.items():
            c.__call__ = call


def _check_group(dg: Any, group: Any, root: nn.Module, names: dict[nn.Module, str]) -> None:
    """RuntimeError if an index of ``group`` lies outside its member's width (an operation the
    graph maps wrongly: a window reshape, ``pixel_shuffle``…)."""
    for item in group:
        member, handler = item.dep.target.module, item.dep.handler
        if dg.is_out_channel_pruning_fn(handler):
            width = dg.get_out_channels(member)
        elif dg.is_in_channel_pruning_fn(handler):
            width = dg.get_in_channels(member)
        else:
            continue
        if width is None or not item.idxs:
            continue
        top = max(int(i) for i in item.idxs)
        if top >= width:
            raise UntraceableError(
                f"Torch-Pruning maps the channels of {names.get(root, '?')} to "
                f"{len(item.idxs)} indices (up to {top}) of "
                f"{names.get(member, type(member).__name__)} (width {width}): its index mapping "
                "through this model's reshapes is broken" + _UNTRACEABLE
            )


def last_layer(model: nn.Module, example_inputs: Any) -> nn.Module | None:
    """The last Conv2d/Linear to run on ``example_inputs`` (the classifier, usually)."""
    _, order = _layer_costs(model, example_inputs)
    return order[-1] if order else None


def remove_channels(
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
    allowed: Callable[[nn.Module], str | None] | None = None,
    atomic: bool = True,
    graph: Any = None,
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
        rank_by: ``"score"``, ``"per_flop"``, ``"relative"``, ``"relative_per_flop"`` or
            ``"relative_median"`` (see :func:`_select`).
        ignored_layers: modules whose output channels are never removed; with ``exempt_last`` the
            last Conv2d/Linear to run is added.
        max_group_ratio: at most this fraction of one group's channels is removed;
            ``min_channels``: channels always kept per group (the best ones).
        flops_tolerance: with ``target="flops"``, a channel whose removal would leave fewer than
            ``(1 − flops_tolerance)`` of the goal's FLOPs is passed over for the next ones in the
            ranking (when the cheap channels are capped, one wide early channel can cost several
            % of the goal), so that matched-FLOPs comparisons land within the tolerance.
        allowed: ``module → reason or None``: a group with a member that has a reason is left
            whole (listed in the report's ``skipped`` as "group of <root name>").
        atomic: on any failure put the model back as it was (the same Parameter and buffer
            objects, with their values; one copy of them is kept while it runs). False: the
            caller keeps its own copy (:func:`prune_channels` does, around the re-estimation).
        graph: Torch-Pruning's graph of ``model`` as it is now, from :func:`dependency_graph`
            with the same ignored layers (:func:`prune_channels` builds it once, before its
            capture); None: built here.

        latency_batch: with a ``*_per_latency`` ranking, the batch size the layers are timed
            at (the training batch for training speed, 1 or 64 for inference).
        latency_format: the memory format they are timed in (as for
            :func:`~lightning_eigendamage.prune`).
        latency_mode: ``"inference"`` (an eval forward) or ``"training"`` (forward and backward).
        progress: print a line per phase with its time to stderr, and a bar over the groups'
            scores (the long step on large networks).

    Returns:
        A :class:`ChannelPruneReport`.
    """
    _torch_pruning()
    ratio, max_group_ratio, min_channels, flops_tolerance = _check(
        ratio, target, max_group_ratio, min_channels, flops_tolerance
    )
    _check_scores(scores, "out")
    _check_scores(in_scores, "in")
    if not isinstance(rank_by, str) or rank_by not in RANKS:
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
    flops_before = count_flops(model, example_inputs, _forward)
    shapes_before = _output_shapes(_run(model, example_inputs))
    costs, _ = _layer_costs(model, example_inputs)
    other = flops_before - sum(c.flops() for c in costs.values())
    widths_before = {names[m]: _widths(m) for m in costs if m in names}

    dg = graph if graph is not None else dependency_graph(model, example_inputs, ignored)
    snapshot, frozen = (_Snapshot(model, dg) if atomic else None), _frozen(model)
    model.eval()
    try:
        left: dict[str, str] = {}
        groups = _collect_groups(
            dg, ignored, costs, scores, importance, names, in_scores or {}, allowed, left
        )
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
        plan = [
            {"root": names.get(g.root, "?"), "channels": g.n, "removed": s} for g, s in zip(groups, chosen)
        ]
        cut_channels(model, plan, dg, updates=updates, in_updates=in_updates)
        _refreeze(frozen)
        _check_pruned(model, example_inputs, shapes_before, any(modes.values()))
    except BaseException:
        if snapshot is not None:
            snapshot.restore()
        raise
    finally:
        for m, mode in modes.items():
            m.training = mode
    total, n_removed = sum(g.n for g in groups), sum(len(s) for s in chosen)
    flops_after = count_flops(model, example_inputs, _forward)
    reached = 1.0 - flops_after / max(flops_before, 1) if target == "flops" else n_removed / max(total, 1)
    return PruneReport(
        params_before=params_before,
        params_after=count_params(model),
        flops_before=flops_before,
        flops_after=flops_after,
        ratio=float(ratio),
        target=target,
        realised_fraction=n_removed / max(total, 1),
        method=method,
        fisher="",
        layers=layer_reports(widths_before, model, left),
        target_reached=_target_met(target, ratio, reached, n_removed, total),
        reached=reached,
        limited_by=None if _target_met(target, ratio, reached, n_removed, total) else _LIMITED,
        structure="channels",
        channels_total=total,
        channels_removed=n_removed,
        flops_planned=planned,
        groups=plan,
        skipped=left,
    )


@dataclass
class ParamSlice:
    """One parameter narrowed by a channel cut: ``new.flatten() == old.flatten()[index]``
    (before any compensation was added to ``old``'s values, ``index`` is exact for every tensor
    shaped like ``old``: optimizer moments, gradients)."""

    old: nn.Parameter
    new: nn.Parameter
    index: torch.Tensor  # (new.numel(),) int64, flat positions in old


@dataclass
class ChannelChange:
    """What :func:`cut_channels` did to the parameters: qualified parameter name → its
    :class:`ParamSlice` (only parameters whose shape changed)."""

    params: dict[str, ParamSlice] = field(default_factory=dict)


def _root_pruner(graph: Any, root: nn.Module, name: str) -> Any:
    pruner = graph.get_pruner_of_module(root)
    if pruner is None or pruner.get_out_channels(root) is None:
        raise ValueError(f"the plan names {name!r} as a group root, but its channels cannot be removed")
    return pruner


def _plan_entries(
    model: nn.Module, plan: Sequence[dict[str, Any]], graph: Any
) -> list[tuple[str, nn.Module, list[int]]]:
    """``(root name, root module, sorted removed root channels)`` of every plan entry that removes
    something, checked against ``model`` (ValueError for a plan made for another model)."""
    modules = dict(model.named_modules())
    entries = []
    for entry in plan:
        removed = sorted(int(c) for c in entry.get("removed", []))
        if not removed or entry.get("head_dim"):  # attention heads: not a Torch-Pruning group
            continue
        name = entry["root"]
        root = modules.get(name)
        if root is None:
            raise ValueError(f"the plan names a group root {name!r} that the model does not have")
        width = _root_pruner(graph, root, name).get_out_channels(root)
        if width != entry.get("channels", width) or removed[-1] >= width or removed[0] < 0:
            raise ValueError(
                f"the plan removes channels {removed[:3]}… of {name!r} ({entry.get('channels')} wide), "
                f"but it has {width}: the plan was made for another model"
            )
        entries.append((name, root, removed))
    return entries


def _removed_indices(
    graph: Any, entries: list[tuple[str, nn.Module, list[int]]]
) -> tuple[dict[nn.Module, list[int]], dict[nn.Module, list[int]], list[nn.Module]]:
    """Before any cut: per member module the output rows and input columns the entries remove
    (in the member's own indices), and every module of their groups, in order."""
    removed_rows: dict[nn.Module, list[int]] = {}
    removed_cols: dict[nn.Module, list[int]] = {}
    touched: dict[nn.Module, None] = {}
    for name, root, removed in entries:
        group = graph.get_pruning_group(root, _root_pruner(graph, root, name).prune_out_channels, removed)
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if isinstance(module, nn.Module):
                touched.setdefault(module, None)
            if graph.is_out_channel_pruning_fn(handler):
                removed_rows.setdefault(module, []).extend(int(i) for i in item.idxs)
            elif graph.is_in_channel_pruning_fn(handler):
                removed_cols.setdefault(module, []).extend(int(i) for i in item.idxs)
    return removed_rows, removed_cols, list(touched)


def cut_channels(
    model: nn.Module,
    plan: Sequence[dict[str, Any]],
    graph: Any,
    *,
    updates: dict[nn.Module, Update] | None = None,
    in_updates: dict[nn.Module, Callable[[list[int]], torch.Tensor]] | None = None,
) -> ChannelChange:
    """Apply a channel plan to ``model`` in place: weight updates first, then the cut.

    Args:
        plan: one entry per group, ``{"root": module name, "channels": n, "removed": [root
            channel indices]}`` (plain data, as :func:`remove_channels` reports it).
        graph: Torch-Pruning's graph of ``model`` as it is now (:func:`dependency_graph`).
        updates, in_updates: as for :func:`remove_channels` (output-side OBS updates of the
            producers, input-side compensation of the readers), applied to the full-size weights.

    Returns:
        A :class:`ChannelChange`: for every narrowed parameter, the flat positions its elements
        come from. They are found by cutting stand-in parameters that hold the flat positions
        (float32 up to 2²⁴ elements, float64 beyond: exact), so every Torch-Pruning handler is followed
        exactly, whatever dimension it cuts; the values, gradients and memory formats are then put
        back from those positions.

    Not atomic by itself: callers hold a snapshot (:func:`remove_channels`, the channel engine).
    """
    names = {p: n for n, p in model.named_parameters(remove_duplicate=False)}
    entries = _plan_entries(model, plan, graph)
    # The updates see the full-size weights: rows and columns removed by every group first.
    removed_rows, removed_cols, touched = _removed_indices(graph, entries)
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
    return _cut(model, entries, graph, touched, names)


def _cut(
    model: nn.Module,
    entries: list[tuple[str, nn.Module, list[int]]],
    graph: Any,
    touched: Iterable[nn.Module],
    names: dict[nn.Parameter, str],
) -> ChannelChange:
    """:func:`cut_channels`' cut of ``entries`` (``(root name, root, removed root channels)``),
    ``touched`` every module of their groups, ``names`` the model's parameters' names."""
    shapes = {
        m: {k: t.shape for k, t in [*m._parameters.items(), *m._buffers.items()] if t is not None}
        for m in touched
    }
    # Stand-ins hold the codes: the model's own Parameters are never given other data (a change
    # of dtype would reset their gradient accumulators, and with them DDP's hooks).
    held = []
    with torch.no_grad():
        for module in touched:
            for key, p in list(module._parameters.items()):
                if p is None:
                    continue
                held.append((module, key, p))
                exact = torch.float32 if p.numel() <= 2**24 else torch.float64  # integers stay exact
                codes = torch.arange(p.numel(), dtype=exact, device=p.device).reshape(p.shape)
                module._parameters[key] = nn.Parameter(codes, requires_grad=p.requires_grad)
    change = ChannelChange()
    try:
        for name, root, removed in entries:
            # built afresh after the previous groups' cuts, whose index mappings they update
            group = graph.get_pruning_group(root, _root_pruner(graph, root, name).prune_out_channels, removed)
            if not graph.check_pruning_group(group):
                raise RuntimeError(
                    f"removing {len(removed)} channels of {name} would empty a layer of its "
                    "Torch-Pruning group (an operation on channels its graph does not model, e.g. "
                    "chunk or split gating); exclude the layers around it. The model was left as it was"
                )
            group.prune()
    finally:
        with torch.no_grad():
            for module, key, old in held:
                new = module._parameters.get(key)
                if new is None:
                    continue
                data, grad = old.data, old.grad
                if new.shape == data.shape:  # not cut: the model's own Parameter, untouched
                    module._parameters[key] = old
                    continue
                codes = new.data.reshape(-1)
                index = codes.to(torch.int64)
                if not bool((index.to(codes.dtype) == codes).all()) or (
                    index.numel() and (int(index.min()) < 0 or int(index.max()) >= data.numel())
                ):
                    raise RuntimeError(
                        f"Torch-Pruning changed the values of {names.get(old, key)}, not only its shape"
                    )
                value = data.reshape(-1)[index].reshape(new.shape)
                if (
                    data.dim() == 4
                    and not data.is_contiguous()
                    and data.is_contiguous(memory_format=torch.channels_last)
                ):
                    value = value.contiguous(memory_format=torch.channels_last)
                new.data = value
                new.grad = None if grad is None else grad.reshape(-1)[index].reshape(new.shape)
                change.params[names.get(old, key)] = ParamSlice(old, new, index)
    for module, before in shapes.items():  # checkpoints name the narrowed layers (NarrowedMark)
        now = {
            k: t.shape for k, t in [*module._parameters.items(), *module._buffers.items()] if t is not None
        }
        if now != before:
            mark_narrowed(module, before)
    return change


def _check_pruned(model: nn.Module, example: Any, shapes_before: list[tuple[int, ...]], train: bool) -> None:
    """RuntimeError unless the narrowed model runs on ``example`` (in eval mode, and in train mode
    too if ``train``: the model was in train mode) and returns tensors of the shapes it returned
    before (an op Torch-Pruning does not model, e.g. a view that splits channels, or a returned
    tensor without autograd history that a pruned group produces)."""
    try:
        out = _run(model, example)
        if train:  # a branch that runs only in training must fit too
            _run(model, example, train=True)
    except Exception as err:
        raise RuntimeError(
            f"the narrowed model fails on the example inputs ({type(err).__name__}: {err}): an "
            "operation on its channels that Torch-Pruning's graph does not model (a channel "
            "split, shuffle or view), or a layer that runs only in training mode (the graph is "
            "traced in eval mode); exclude the layers around it. The model was left as it was"
        ) from err
    after = _output_shapes(out)
    if after != shapes_before:
        raise RuntimeError(
            f"the narrowed model's outputs have shapes {after}, not {shapes_before}: a returned "
            "tensor comes from a narrowed group without autograd history to show it (detached, "
            "or an integer result); exclude the layer that produces it. The model was left as it was"
        )


# ---------------------------------------------------------------------------------------------
# The trial cut: does narrowing a group remove its channels and nothing else?
# ---------------------------------------------------------------------------------------------

# a removed channel's readers see zeros where the cut model has no channel: both outputs agree to
# this relative tolerance (of the output's largest magnitude), or the dtype's 64 ulps if coarser
_TRIAL_RTOL = 1e-4  # 60× the largest float32 difference seen on the 20 zoo models (1.6e-6)
_CHECK_ROWS = 2  # examples the narrowed model is run on after the cut (two: BatchNorm in train mode)
_TRIAL_ROWS = 1  # examples of the traced batch the trial forwards (all, if the model needs more)


def _outputs_differ(ref: Any, out: Any) -> str | None:
    """Why two outputs of the model (tensors or nested tuples, lists, dicts of them) differ, or
    None: equal shapes, and floating values within ``max(_TRIAL_RTOL, 64·eps)`` of the reference's
    largest magnitude (exact for other dtypes)."""
    if torch.is_tensor(ref) != torch.is_tensor(out):
        return "the output's structure changed"
    if torch.is_tensor(ref):
        if ref.shape != out.shape:
            return f"an output of shape {tuple(ref.shape)} became {tuple(out.shape)}"
        if not ref.is_floating_point():
            return None if torch.equal(ref, out) else "an integer output changed"
        a, b = ref.detach().double(), out.detach().double()
        scale = float(a.abs().max()) if a.numel() else 0.0
        tol = max(_TRIAL_RTOL, 64 * torch.finfo(ref.dtype).eps) * scale + 1e-30
        worst = float((a - b).abs().max()) if a.numel() else 0.0
        if not worst <= tol:
            return f"an output moved by {worst:.3g} (largest magnitude {scale:.3g})"
        return None
    if isinstance(ref, dict):
        if not isinstance(out, dict) or list(ref) != list(out):
            return "the output's structure changed"
        return next((w for k in ref if (w := _outputs_differ(ref[k], out[k]))), None)
    if isinstance(ref, (tuple, list)):
        if not isinstance(out, (tuple, list)) or len(ref) != len(out):
            return "the output's structure changed"
        return next((w for r, o in zip(ref, out) if (w := _outputs_differ(r, o))), None)
    return None


def _masking(columns: dict[nn.Module, list[int]]) -> list[Any]:
    """Forward pre-hooks that zero, in each Conv2d/Linear reader's input, the channels in
    ``columns`` (dimension 1 of a conv's input, the last of a Linear's): what the reader computes
    once those channels are removed from its input. Returns the handles."""
    handles = []
    for module, cols in columns.items():
        if not isinstance(module, _LAYERS) or not cols:
            continue
        index = torch.tensor(sorted(set(cols)), dtype=torch.long)
        dim = 1 if isinstance(module, nn.Conv2d) else -1

        def zero(mod: nn.Module, args: tuple, index: torch.Tensor = index, dim: int = dim) -> tuple:
            x = args[0].clone()
            x.index_fill_(dim, index.to(x.device), 0)
            return (x, *args[1:])

        handles.append(module.register_forward_pre_hook(zero))
    return handles


def _trial(model: nn.Module, graph: Any, cuts: list[tuple[str, Any, list[int]]], example: Any) -> str | None:
    """Cut ``cuts`` (``(root name, its full Torch-Pruning group, removed root channels)``) from
    ``model`` and put it back: None if the narrowed model computes on ``example`` (eval mode)
    what the model computes with the removed channels zeroed in every Conv2d/Linear that reads
    them, else why not."""
    columns: dict[nn.Module, list[int]] = {}
    touched: dict[nn.Module, None] = {}
    for _, group, removed in cuts:  # the columns each reader loses, from the full group's mapping
        gone = set(removed)
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.Module):
                touched.setdefault(module, None)
            if graph.is_in_channel_pruning_fn(item.dep.handler):
                cols = [int(i) for i, r in zip(item.idxs, item.root_idxs) if r in gone]
                columns.setdefault(module, []).extend(cols)
    handles = _masking(columns)
    few = _head(example, _TRIAL_ROWS)
    try:
        ref, example = _run(model, few), few
    except Exception:  # noqa: BLE001 — a model that needs the whole batch gets it
        ref = _run(model, example)
    finally:
        for h in handles:
            h.remove()
    if not _finite(ref):  # every cut would "differ": say what is really wrong
        raise RuntimeError(
            "the model's output on the first calibration batch is not finite (NaN or Inf): check "
            "the batches and the weights; nothing was removed"
        )
    snapshot = _Snapshot(model, graph)
    entries = [(name, group[0].dep.target.module, removed) for name, group, removed in cuts]
    names = {p: n for n, p in model.named_parameters(remove_duplicate=False)}
    try:
        _cut(model, entries, graph, touched, names)
        out = _run(model, example)
    except Exception as err:  # noqa: BLE001 — the reason is reported, the model put back
        return f"the narrowed model fails ({type(err).__name__}: {err})"
    finally:
        snapshot.restore()
    return _outputs_differ(ref, out)


def _finite(out: Any) -> bool:
    """Whether every floating tensor in ``out`` (nested in tuples, lists and dicts) is finite."""
    if torch.is_tensor(out):
        return not out.is_floating_point() or bool(torch.isfinite(out).all())
    if isinstance(out, dict):
        return all(_finite(v) for v in out.values())
    if isinstance(out, (tuple, list)):
        return all(_finite(v) for v in out)
    return True


def _why_whole(group: Any, graph: Any, allowed: Callable[[Any], str | None]) -> str | None:
    """Why ``group`` cannot change width whatever its scores (a member ``allowed`` refuses, units
    that tie badly, a single unit), or None."""
    reason = next((r for r in (allowed(it.dep.target.module) for it in group) if r), None)
    if reason is not None:
        return reason
    units = _units(group, graph)
    if isinstance(units, str):
        return units
    return "a group of one channel" if len(units or group[0].idxs) < 2 else None


def wrong_groups(
    model: nn.Module,
    graph: Any,
    ignored: list[nn.Module],
    example: Any,
    allowed: Callable[[Any], str | None],
    names: dict[nn.Module, str] | None = None,
    found: list[Any] | None = None,
) -> dict[str, tuple[list[nn.Module], str]]:
    """The dependency groups of ``graph`` whose removal is not what the graph says.

    Torch-Pruning maps channels through the operations it knows; one it does not model (a channel
    shuffle written with ``view``/``transpose``, a split by hand, a reduction over channels) can
    leave the graph buildable while a cut misroutes the channels after it, silently or with a shape
    error. Each group that may change width (``allowed`` admits every member, its conv-group units
    tie, at least two units) loses one unit (the middle one), all groups at once, on the model
    itself, which is then put back: the narrowed model must compute on the first examples of
    ``example`` (eval mode) what the full model computes with those channels zeroed in every
    Conv2d/Linear that reads them (:func:`_outputs_differ`). If it does not, the groups are
    halved until each failing one is found (``2·k·log₂ G`` trials for ``k`` of ``G`` groups).
    ``found``: ``graph``'s groups with ``ignored`` (:func:`_all_groups`), if already listed.

    Returns:
        ``{root name: (the group's producers, reason)}``: the producers are for Torch-Pruning's
        ``ignored_layers`` (the group is then never listed), the reason for the report (``"<what
        failed>; <details>"``: the first part is the same for every group that failed alike).
    """
    names = names if names is not None else {m: n for n, m in model.named_modules()}
    candidates: list[tuple[str, Any, list[int], list[nn.Module]]] = []
    wrong: dict[str, tuple[list[nn.Module], str]] = {}
    for group in _all_groups(graph, ignored) if found is None else found:
        root = group[0].dep.target.module
        if _why_whole(group, graph, allowed) is not None:
            continue
        producers = [
            it.dep.target.module
            for it in group
            if graph.is_out_channel_pruning_fn(it.dep.handler) and isinstance(it.dep.target.module, _LAYERS)
        ]
        try:  # an index outside a member's width: the mapping itself is broken, no trial needed
            _check_group(graph, group, root, names)
        except UntraceableError as err:
            detail = str(err).removesuffix(_UNTRACEABLE)
            wrong[names.get(root, "?")] = (producers, f"its index mapping is broken; {detail}")
            continue
        units = _units(group, graph) or [[c] for c in range(len(group[0].idxs))]
        candidates.append((names.get(root, "?"), group, sorted(units[len(units) // 2]), producers))
    if not candidates:
        return wrong

    def search(items: list[tuple[str, Any, list[int], list[nn.Module]]]) -> bool:
        why = _trial(model, graph, [(n, g, rm) for n, g, rm, _ in items], example)
        if why is None:
            return False
        why = f"cutting one of its channels changes what the model computes beyond removing it; {why}"
        if len(items) == 1:
            wrong[items[0][0]] = (items[0][3], why)
            return True
        half = len(items) // 2
        found = search(items[:half])
        found = search(items[half:]) or found
        if not found:  # only together: none alone (a rare interaction), so all of them
            for name, _, _, producers in items:
                wrong[name] = (producers, why + ", with other groups cut at once")
        return True

    search(candidates)
    return wrong


# ---------------------------------------------------------------------------------------------
# prune_channels: the K-FAC input-side method
# ---------------------------------------------------------------------------------------------


def _output_layers(
    model: nn.Module, example: Any, forward: Callable[[nn.Module, Any], Any]
) -> list[nn.Module]:
    """The Conv2d/Linear layers whose output channels reach the model's output without passing
    through another Conv2d/Linear (found on the autograd graph of one forward): their output
    widths are the model's, so they are never narrowed."""
    made: dict[Any, nn.Module] = {}

    def mark(module: nn.Module, inputs: tuple, output: Any) -> None:
        if torch.is_tensor(output) and output.grad_fn is not None:
            made[output.grad_fn] = module

    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(mark) for m in mods]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.enable_grad():
            out = forward(model, example)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return first_producers([t.grad_fn for t in tensors_in(out)], made)


def _grouped(module: nn.Module) -> bool:
    """A grouped Conv2d that is not depthwise-like (``1 < groups``, ``groups ≠ C_in``)."""
    return isinstance(module, nn.Conv2d) and 1 < module.groups != module.in_channels


def _a_width(module: nn.Module) -> int:
    """The width of a Conv2d/Linear's patch-form ``A``: ``C_in·k²`` (all conv groups), or ``C_in``."""
    return adapter_for(module, exact=False).a_width(module, "patch")


_FOLLOWS = f"{DEPTHWISE}: not scored itself, it follows the channels of its group"


def _depthwise_reason(module: nn.Module) -> str:
    """Why the channel engine does not score the depthwise conv ``module``. With one ``k×k``
    filter per channel (``groups == in_channels == out_channels``) channel ``c`` of its input
    feeds only channel ``c`` of its output, so removing its group's channel ``c`` removes that
    filter whole: the conv *follows* its group (:data:`_FOLLOWS`). The channel's damage and
    compensation are taken where the depthwise output is read (an inverted residual's projection
    conv, as for any reader), and its FLOPs and parameters count in what the removal saves.
    With a channel multiplier (``m`` filters per input channel) its group stays whole."""
    if module.out_channels == module.in_channels:
        return _FOLLOWS
    m = module.out_channels // max(module.in_channels, 1)
    return f"{DEPTHWISE} with {m} filters per channel (channel multiplier {m}): its group is left whole"


def scorable_layers(
    model: nn.Module, exclude: Any = None, max_factor_dim: int | None = 16384
) -> tuple[list[Candidate], dict[str, nn.Module], dict[str, str]]:
    """The layers whose input channels can be scored: every candidate of
    :func:`~lightning_eigendamage.discovery.find_layers` (the capture hooks them all), the
    Conv2d/Linear among them that are scored (name → module), and why each other one is not
    (excluded, shared, another layer type, a patch-form factor wider than ``max_factor_dim``:
    ``A`` takes ``8·d²`` bytes while it accumulates and as many again for its inverse)."""
    cands = find_layers(model, exclude)
    readers = {b.reader for b in find_head_blocks(model)}
    for c in cands:
        if c.skipped == FUNCTIONAL and c.unit in readers:
            c.skipped = None  # its input columns are scored per head (a routed capture if needed)
        if c.skipped is None and not isinstance(c.unit, (nn.Conv2d, nn.Linear)):
            c.skipped = f"{type(c.unit).__name__}: only Conv2d and Linear layers lose channels"
        if c.skipped is not None and _grouped(c.unit) and c.skipped == ConvAdapter().skip_reason(c.unit):
            c.skipped = None  # scored per conv group (block-diagonal factors), channels tied in units
        if c.skipped is None and max_factor_dim is not None:
            d = max(_a_width(c.unit), c.unit.weight.shape[0])
            if d > max_factor_dim:
                c.skipped = f"a K-FAC factor wider than max_factor_dim={max_factor_dim}; {d}×{d} here"
        if c.skipped == DEPTHWISE:
            c.skipped = _depthwise_reason(c.unit)
        if c.skipped == FASTPATH:  # a narrower Linear still runs in the fused path
            c.skipped = None
    layers = {c.name: c.unit for c in cands if c.skipped is None}
    return cands, layers, {c.name: c.skipped for c in cands if c.skipped is not None}


def scores_from_factors(
    layers: dict[str, nn.Module], captured: CaptureResult, damping: float, skipped: dict[str, str]
) -> tuple[Scores, dict[nn.Module, InputObsUpdate]]:
    """Per scored layer of ``layers``, from its patch-form factors in ``captured``: the damage of
    removing each input channel (:func:`~lightning_eigendamage.baselines.input_obs_scores`,
    ``(C_in,)`` for a Conv2d, ``(in_features,)`` for a Linear) and its compensation
    (:class:`~lightning_eigendamage.baselines.InputObsUpdate`), ``A`` damped by ``damping``. A
    layer whose factors are unusable (never ran, no gradient, non-finite) goes to ``skipped``."""
    scores: Scores = {}
    updates: dict[nn.Module, InputObsUpdate] = {}
    for name, module in layers.items():
        lf = captured.layers.get(name)
        why = "no factors were captured" if lf is None else lf.unusable()
        if why is not None:
            skipped[name] = why
            continue
        w = weight_matrix(module)
        a = lf.a().to(w.device)
        g = lf.g().to(w.device)
        if not (
            bool(torch.isfinite(a).all()) and bool(torch.isfinite(g).all()) and bool(torch.isfinite(w).all())
        ):
            skipped[name] = "non-finite factors or weights"
            continue
        if _grouped(module):
            scores[module], updates[module] = _grouped_scores(module, w, a, g, damping, float(lf.locations))
            continue
        a_inv = _spd_inverse(a, damping, module.weight.dtype)
        block = w.shape[1] // (module.in_channels if isinstance(module, nn.Conv2d) else module.in_features)
        scores[module] = input_obs_scores(w, a_inv, g, block, lf.locations)
        updates[module] = InputObsUpdate(w, a_inv, block, g.to(torch.float64), float(lf.locations))
    return scores, updates


def _ran_once(
    layers: dict[str, nn.Module], captured: CaptureResult, skipped: dict[str, str]
) -> set[nn.Module]:
    """The layers of ``layers`` (hooked without factors) that ran at most once per forward pass
    of the capture; why each other one cannot change width goes to ``skipped``."""
    out = set()
    for name, module in layers.items():
        lf = captured.layers.get(name)
        why = "no capture hook saw it" if lf is None else lf.unusable(factors=False)
        if why is None:
            out.add(module)
        else:
            skipped[name] = why
    return out


def _grouped_scores(
    module: nn.Conv2d, w: torch.Tensor, a: torch.Tensor, g: torch.Tensor, damping: float, t: float
) -> tuple[torch.Tensor, GroupedInputObsUpdate]:
    """Input-side Kron-OBS of a grouped conv, conv group by conv group: group ``j`` reads input
    channels ``[j·s, (j+1)·s)`` into outputs ``[j·o, (j+1)·o)``, so its damage and compensation
    use ``W_j = W[j·o:(j+1)·o]`` ``(o, s·k²)``, the diagonal block ``A_j`` of the patch-form ``A``
    (``C_in·k²`` wide, all groups) and ``G_j`` of ``G``. Returns the ``(C_in,)`` scores and the
    per-group compensation."""
    groups, k2 = module.groups, module.kernel_size[0] * module.kernel_size[1]
    s_in, o = module.in_channels // groups, module.out_channels // groups
    d = s_in * k2
    scores, parts = [], []
    for j in range(groups):
        a_j = a[j * d : (j + 1) * d, j * d : (j + 1) * d]
        g_j = g[j * o : (j + 1) * o, j * o : (j + 1) * o].to(torch.float64)
        w_j = w[j * o : (j + 1) * o]
        a_inv = _spd_inverse(a_j, damping, module.weight.dtype)
        scores.append(input_obs_scores(w_j, a_inv, g_j, k2, t))
        parts.append(InputObsUpdate(w_j, a_inv, k2, g_j, t))
    return torch.cat(scores), GroupedInputObsUpdate(parts, s_in)


def input_side_scores(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    exclude: Any = None,
    damping: float = DEFAULT_DAMPING,
    seed: int = 0,
    max_factor_dim: int | None = 16384,
    **capture: Unpack[CaptureOptions],
) -> tuple[Scores, dict[nn.Module, InputObsUpdate], dict[str, str]]:
    """Input-side Kron-OBS of every Conv2d/Linear of ``model`` that can be scored.

    One patch-form K-FAC capture over ``batches`` (eval mode; the true Fisher's labels drawn
    with a generator seeded by ``seed``; ``capture``: the options of
    :func:`~lightning_eigendamage.curvature.capture_factors`), then
    :func:`scores_from_factors`; the layers are those of :func:`scorable_layers`.

    Returns:
        ``(scores, updates, skipped)``: module → scores; module → update; layer name → the reason
        it was not scored (excluded, shared, grouped, another layer type, run twice, no gradient).
    """
    _, layers, skipped = scorable_layers(model, exclude, max_factor_dim)
    if not layers:
        return {}, {}, skipped
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    res = capture_factors(
        model, layers, batches, factors_for=list(layers), a_form="patch", generator=gen, **capture
    )
    scores, updates = scores_from_factors(layers, res, damping, skipped)
    return scores, updates, skipped


def sequential_group_scores(
    graph: Any, updates: dict[nn.Module, InputObsUpdate], max_steps: int = GREEDY_STEPS, root: bool = True
) -> Callable[[Any], torch.Tensor | None]:
    """A group scorer for :func:`remove_channels`' ``importance=``: each Torch-Pruning group's
    channels scored by :func:`~lightning_eigendamage.baselines.greedy_input_obs_scores` over
    the group's readers that have an update in ``updates`` (each needs its ``G``, set by
    :func:`input_side_scores`; one without is a ValueError), ``√`` of the damage when ``root``.
    A group none of whose readers has an update scores None (left alone)."""

    def score(group: Any) -> torch.Tensor | None:
        n = len(group[0].idxs)
        units = _units(group, graph)
        if isinstance(units, str):
            return None
        readers: dict[tuple[nn.Module, int], Reader] = {}
        for item in group:
            module = item.dep.target.module
            if module not in updates or not graph.is_in_channel_pruning_fn(item.dep.handler):
                continue
            u = updates[module]
            for i, c in zip(item.idxs, item.root_idxs):
                if c is None:
                    continue
                j, i = (
                    (int(i) // u.in_per_group, int(i) % u.in_per_group)
                    if isinstance(u, GroupedInputObsUpdate)
                    else (0, int(i))
                )
                part = u.parts[j] if isinstance(u, GroupedInputObsUpdate) else u
                r = readers.setdefault((module, j), Reader(part, [], []))
                r.channels.append(int(c))
                r.columns.append([i * part.block + k for k in range(part.block)])
        if not readers:
            return None
        s = greedy_input_obs_scores(list(readers.values()), n, max_steps, units)
        return s.sqrt() if root else s

    return score


# The dtype of the readers' ``A⁻¹`` Cholesky factorisation and inverse (the result is returned in
# ``A``'s dtype): float32 takes less than half the time of float64 (the round's largest cost on
# ViT-B/16, its 3072-wide MLP inputs). At ÷2 and ÷4 FLOPs on the converged networks it chose the
# same channels on ResNet-20 and VGG, and 7 and 9 channels of 803 and 1286 differed on the
# MobileNet, at +0.07 points after the cut (benchmarks/greedy_precision.py). A float64 model keeps
# float64 throughout, and a factor float32 cannot factorise falls back to float64 (eigh).
INVERSE_DTYPE = torch.float32


def _spd_inverse(a: torch.Tensor, damping: float, weight_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(A + γ·(tr A / n)·I)⁻¹`` by Cholesky in :data:`INVERSE_DTYPE` (float64 for a layer whose
    ``weight_dtype`` is float64), several times faster than the ``eigh`` of
    :func:`~lightning_eigendamage.baselines.damped_inverse`, which it falls back to; in ``A``'s
    dtype."""
    dtype = torch.float64 if weight_dtype == torch.float64 else INVERSE_DTYPE
    try:  # contiguous: cholesky_inverse returns a transposed layout, which every gather would copy
        low = torch.linalg.cholesky(damped(a, damping).to(dtype))
        return torch.cholesky_inverse(low).to(a.dtype).contiguous()
    except torch.linalg.LinAlgError:
        return damped_inverse(a, damping)


def prune_channels(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    ratio: float,
    target: str = "channels",
    rank_by: str = "relative",
    layer_cap: float = 0.95,
    min_channels: int = 1,
    exclude: Any = None,
    fisher: str = "true",
    likelihood: str = "categorical",
    class_dim: int = -1,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int | None = None,
    damping: float = DEFAULT_DAMPING,
    recalibrate_bn: bool = True,
    seed: int = 0,
    max_factor_dim: int | None = 16384,
    greedy_steps: int | None = GREEDY_STEPS,
    latency_batch: int = 64,
    latency_format: str = "model",
    latency_mode: str = "inference",
    round_to: int = 1,
    progress: bool = False,
) -> ChannelPruneReport:
    """Remove whole channels of ``model`` in place, chosen and compensated with K-FAC curvature.

    Every Conv2d/Linear keeps its type and becomes narrower; a channel's dependency group (a
    conv's output channel, its BatchNorm, the layers that read it, and every layer tied to it by a
    residual add) goes as one. Scores, compensation and ranking are described in the module
    docstring; the pruned network is an ordinary one (no extra stages), so it trains and runs as
    fast as any channel-pruned network of its widths.

    Args:
        model: any ``nn.Module`` Torch-Pruning can trace; it stays on its device and dtype and
            keeps its train/eval modes.
        batches: calibration batches (tensors, ``(input, target, ...)`` tuples, or anything
            ``input_fn`` understands), iterated twice (curvature, BatchNorm re-estimation) and
            kept in memory; the first one's input is traced.
        ratio: in ``[0, 1)``: the fraction of the prunable channels (``target="channels"``) or
            of the model's FLOPs (``target="flops"``) to remove.
        rank_by: ``"relative"`` (each channel's √damage over the mean of that in its group: a
            norm-like, about even spread over the layers),
            ``"relative_damage"`` (the same with the damage itself: groups with a few large
            scores lose the rest), ``"damage"`` (the predicted loss increase; cheap deep layers
            go first), ``"damage_per_cost"`` (loss increase per FLOP saved), or
            ``"relative_per_latency"`` / ``"damage_per_latency"`` (``"relative"`` / ``"damage"``
            over the seconds the removal saves, by each layer's time measured at a few widths on
            the model's device: :mod:`~lightning_eigendamage.channels.latency`; the table is in
            ``report.latency_table``).
        layer_cap: at most this fraction of one group's channels is removed.
        min_channels: channels always kept per group.
        exclude: module instances, types, glob patterns or regexes (as for
            :func:`~lightning_eigendamage.prune`): an excluded module (any kind: a conv, a
            BatchNorm, a container and everything in it) keeps its widths, so every group it
            belongs to is left whole.
        fisher: the Fisher of the curvature, as for :func:`~lightning_eigendamage.prune`
            (``"true"`` by default: labels sampled with a generator seeded by ``seed``).
        likelihood: as for :func:`~lightning_eigendamage.prune`.
        class_dim: as for :func:`~lightning_eigendamage.prune`.
        loss_fn: as for :func:`~lightning_eigendamage.prune`.
        input_fn: as for :func:`~lightning_eigendamage.prune`.
        max_batches: as for :func:`~lightning_eigendamage.prune`.
        seed: the seed of the true Fisher's label sampling.
        forward_fn: ``(model, batch) → logits`` for the curvature capture, for a model whose
            output is not one tensor of logits (several heads: pick the one to keep accurate). The
            model itself must still run as ``model(input_fn(batch))``: that forward is traced, and
            every tensor it returns keeps its shape.
        damping: relative damping of ``A`` before it is inverted (``γ·mean eigenvalue``).
        recalibrate_bn: re-estimate the running statistics of the BatchNorm layers downstream
            of the compensated layers on ``batches``.
        max_factor_dim: a layer whose patch-form factor (``C_in·k²``, or ``C_out``) is wider is
            not scored, so its groups stay whole (VGG's ``Linear(25088, 4096)`` would need 5 GB
            for ``A`` alone). None: no limit.
        greedy_steps: score each group's channels by a greedy sequential removal in at most
            this many steps (``⌈n / greedy_steps⌉`` of its ``n`` channels a step; a reader pays
            ``O(C_out²·d)`` once and ``O(d·r·(d + C_out))`` a step, ``d`` its columns fed by the
            group, ``r`` of them removed). None: each channel's damage alone, summed over its
            readers (faster, but channels that duplicate each other all score low).
        round_to: every narrowed group keeps a multiple of this many channels (its
            lowest-ranked ones go; a group no narrower multiple fits stays whole, and
            ``skipped`` says so). 1: any width. On the converged MobileNet-V2-style network at
            ÷4 FLOPs, 8 made it run 1.63× instead of 1.33× as fast as dense at batch 64 on one
            CPU thread, and its 3-epoch fine-tune end 0.09 points lower (91.53 % against
            91.62 %, seeds 0 and 1; ``benchmarks/results/round_to.md``, ``train_step.jsonl``).

    Returns:
        A :class:`ChannelPruneReport` (``method="kron-obs-in"``); ``skipped`` names the layers
        that could not be scored and the groups left whole, with the reasons.

    Raises:
        ValueError / TypeError: bad arguments or batches; ImportError without torch-pruning.
        RuntimeError: nothing can be scored, or no part of the model can be traced by
            Torch-Pruning (where the whole model's graph fails, e.g. torchvision's ShuffleNet V2,
            Swin-T and MaxViT-T, its modules are traced one by one: :func:`channel_graph`),
            checked before the capture. On any error the model is left as it was.

    Memory: one copy of the parameters and buffers while it runs (to restore them on failure),
    and per reader of a group that can change width the patch-form ``A`` (``(C_in·k²)²``
    floats) and its inverse; the greedy scores copy one group's readers' ``W`` and ``A⁻¹`` at a
    time.
    """
    options = PruneOptions(
        structure="channels",
        target=target,
        rank_by=rank_by,
        layer_cap=layer_cap,
        min_rank=_min_channels(min_channels),
        exclude=exclude,
        fisher=fisher,
        likelihood=likelihood,
        class_dim=class_dim,
        loss_fn=loss_fn,
        input_fn=input_fn,
        forward_fn=forward_fn,
        max_batches=max_batches,
        damping=damping,
        recalibrate_bn=recalibrate_bn,
        seed=seed,
        max_factor_dim=max_factor_dim,
        greedy_steps=greedy_steps,
        latency_batch=latency_batch,
        latency_format=latency_format,
        latency_mode=latency_mode,
        round_to=round_to,
        progress=progress,
    )
    report, _ = get_engine("channels").prune(model, batches, ratio=ratio, options=options)
    return report


def _min_channels(value: Any) -> int:
    k = as_int(value)
    if k is None or k < 1:
        raise ValueError(f"min_channels must be an integer ≥ 1, got {value!r}")
    return k


# ---------------------------------------------------------------------------------------------
# The channel engine
# ---------------------------------------------------------------------------------------------


def _widths_key(model: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Every parameter's name and shape: the widths a listing of dependency groups is valid for."""
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def _module_signature(model: nn.Module) -> tuple[tuple[str, int], ...]:
    return tuple((n, id(m)) for n, m in model.named_modules())


@dataclass
class ChannelGraph:
    """What :meth:`ChannelEngine.check` builds and :meth:`ChannelEngine.analyse` reuses: the
    model's Torch-Pruning graph and its output layers, traced once (the callback traces on its
    probe batch, before training). Torch-Pruning recomputes the graph's index mappings from the
    layers' widths whenever a group is built, so the graph stays valid across rounds of channel
    removal; it is re-traced only if the model's modules were replaced or a parameter it tracks
    is no longer the model's (:meth:`describes`)."""

    graph: Any
    ignored: list[nn.Module]
    signature: tuple[tuple[str, int], ...]  # (qualified name, id) of every module when traced
    # the measured latency table (``rank_by="*_per_latency"``), kept for the next rounds:
    # {"setting": {...}, "layers": {name: [a, b, c, d]}} (see :mod:`.latency`)
    latency: dict[str, Any] | None = None
    # groups left whole because cutting them misroutes channels (:func:`wrong_groups`):
    # {"group of <root>": reason}; their producers are among ``ignored``
    left: dict[str, str] = field(default_factory=dict)
    # the dependency groups listed at the model's current widths: (widths key, groups), see groups()
    _groups: tuple[Any, list[Any]] | None = field(default=None, repr=False)

    def groups(self, model: nn.Module) -> list[Any]:
        """The graph's dependency groups rooted at a Conv2d/Linear, with the output layers and the
        attention internals (the head blocks' producers) kept; listed once per set of widths
        (Torch-Pruning builds a group's indices from the layers' widths, so a round that narrows
        the model lists them again)."""
        key = _widths_key(model)
        if self._groups is None or self._groups[0] != key:
            inside = [p for b in find_head_blocks(model) for p in b.producers]
            self._groups = (key, _all_groups(self.graph, self.ignored + inside))
        return self._groups[1]

    def factor_layers(
        self, model: nn.Module, layers: dict[str, nn.Module], exclude: Any, skipped: dict[str, str]
    ) -> list[str]:
        """The names of ``layers`` (the scorable ones) whose K-FAC factors the scores read: the
        readers of the groups that can change width (:func:`_factor_modules`) and the attention
        blocks' output projections."""
        allowed = _allowed_in(model, exclude, set(layers.values()), dict(skipped))
        need = _factor_modules(self.groups(model), self.graph, allowed)
        need.update(b.reader for b in find_head_blocks(model))
        return [n for n, m in layers.items() if m in need]

    @property
    def how(self) -> str | None:
        """How the graph was built, where not whole (for ``structure="auto"``'s reason)."""
        if not isinstance(self.graph, PartsGraph):
            return None
        n, left = len(self.graph.parts), len(self.graph.uncovered())
        return (
            f"part by part ({n} parts traced alone, {left} layers outside them; the "
            f"whole model's graph: {self.graph.error})"
        )

    def describes(self, model: nn.Module) -> bool:
        """Whether the graph is still ``model``'s: the same model, the same module objects under
        the same names, and every bare parameter it tracks still one of the model's."""
        if getattr(self.graph, "model", None) is not model or _module_signature(model) != self.signature:
            return False
        params = {id(p) for p in model.parameters()}
        return all(id(k) in params for k in self.graph.module2node if isinstance(k, nn.Parameter))


@dataclass
class ChannelAnalysis:
    """What :meth:`ChannelEngine.analyse` found: the graph and the readers' scores and
    compensations, for :meth:`~ChannelEngine.decide` and :meth:`~ChannelEngine.apply` on the same
    model as it was analysed."""

    model: nn.Module
    graph: Any
    ignored: list[nn.Module]  # layers whose output widths are the model's
    example: Any  # one input batch on the model's device (traced, FLOPs on its first row)
    in_scores: Scores
    updates: dict[nn.Module, InputObsUpdate]
    skipped: dict[str, str]
    allowed: Callable[[Any], str | None]
    batches: int
    skipped_batches: int
    calibration: list[Any]  # model inputs for the BatchNorm re-estimation
    device: torch.device
    # attention blocks whose heads may go, with the FLOPs one head costs (per example batch)
    heads: list[tuple[HeadBlock, int]] = field(default_factory=list)
    # the latency table the ranking uses (``rank_by="*_per_latency"``), or None
    latency: dict[str, Any] | None = None
    # the graph's dependency groups at the analysed widths (:meth:`ChannelGraph.groups`)
    found: list[Any] | None = None


@dataclass(frozen=True)
class ChannelPlan:
    """Which channels go: plain data, the same on every process.

    ``groups``: one entry per prunable dependency group, ``{"root": module name, "channels": its
    width, "removed": [root channel indices]}``, and per attention block whose heads may go
    ``{"root": its name, "channels": H·d, "removed": [the removed heads' channels], "head_dim":
    d}`` (channel ``c`` is dimension ``c mod d`` of head ``c // d``); ``left``: groups left
    whole, with the reason; ``flops_planned``: the analytic FLOPs per example after the cut.
    """

    groups: tuple[dict[str, Any], ...]
    target: str
    ratio: float
    flops_planned: int
    left: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [dict(g, removed=list(g["removed"])) for g in self.groups],
            "target": self.target,
            "ratio": self.ratio,
            "flops_planned": self.flops_planned,
            "left": dict(self.left),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelPlan:
        groups = tuple(
            {
                "root": str(g["root"]),
                "channels": int(g["channels"]),
                "removed": [int(c) for c in g["removed"]],
                **({"head_dim": int(g["head_dim"])} if g.get("head_dim") else {}),
            }
            for g in d["groups"]
        )
        return cls(
            groups, str(d["target"]), float(d["ratio"]), int(d["flops_planned"]), dict(d.get("left", {}))
        )


def _allowed_in(
    model: nn.Module, exclude: Any, scored: Scores | set[nn.Module], skipped: dict[str, str]
) -> Callable[[Any], str | None]:
    """``member → reason`` a dependency group must stay whole, or None (see :func:`prune_channels`).
    ``scored``: the Conv2d/Linear layers whose channels may change (scored, or seen to run once per
    forward pass where the scores need no factors of theirs)."""
    by_module = {m: n for n, m in model.named_modules()}
    excluded = excluded_modules(model, exclude)

    def allowed(module: Any) -> str | None:
        if not isinstance(module, nn.Module):  # Torch-Pruning's node for a bare nn.Parameter
            shape = tuple(getattr(module, "shape", ()))
            return f"a parameter of shape {shape} used directly in forward has an effect that is not scored"
        name, kind = by_module.get(module, "?"), type(module).__name__
        if module in excluded:
            return f"{name} is excluded by user"
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if module in scored:
                return None
            why = skipped.get(name, "not a prunable layer")
            if why == _FOLLOWS:  # depthwise and nothing else: it follows its group
                return None
            return f"{name} is not scored ({why})"
        if isinstance(module, nn.GroupNorm):
            return f"{name} (GroupNorm) needs its channel count to stay a multiple of its groups"
        if isinstance(module, _BATCHNORMS):
            return None
        if any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            return f"{name} ({kind}) has parameters or buffers whose effect is not scored"
        return None

    return allowed


def _untraced_skips(model: nn.Module, graph: Any) -> dict[str, str]:
    """The layers no traced part covers, with the reason (:func:`untraced_layers`), but for an
    attention block's projections: they lose heads whether or not a part covers them (where
    heads cannot go, "heads of <block>" says why)."""
    projections = {m for b in find_head_blocks(model) for m in (b.reader, *b.producers)}
    in_heads = {n for n, m in model.named_modules() if m in projections}
    return {name: why for name, why in untraced_layers(graph).items() if name not in in_heads}


def _calls(model: nn.Module, example: Any, layers: dict[str, nn.Module]) -> dict[str, int]:
    """How many times each of ``layers`` runs in one forward pass (eval mode, the first example;
    the whole ``example`` if the model needs more)."""
    counts = dict.fromkeys(layers, 0)
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: counts.__setitem__(name, counts[name] + 1))
        for name, m in layers.items()
    ]
    try:
        try:
            _run(model, _head(example, _TRIAL_ROWS))
        except Exception:  # noqa: BLE001 — a model that needs the whole batch gets it
            counts.update(dict.fromkeys(layers, 0))
            _run(model, example)
    finally:
        for h in handles:
            h.remove()
    return counts


def _called_as_input(err: Exception, example: Any) -> Exception:
    """``err``, raised by ``model(input)``, as an error of its kind that says that the channel
    engine calls the model with the batch's input alone (the graph is traced from that call; a
    ``forward_fn`` changes only what the capture computes)."""
    what = f"a {type(example).__name__}" + (
        f" of shape {tuple(example.shape)}" if torch.is_tensor(example) else ""
    )
    msg = (
        f"channel pruning calls the model as model(input), input = {what} (the batch's first "
        f"element, or input_fn(batch)), and traces that call; it failed: {type(err).__name__}: {err}. "
        "A model whose forward needs more than that input cannot be channel-pruned (forward_fn "
        "changes only the curvature capture); pass input_fn to pick the input, or use "
        "structure='eigenbasis' with a forward_fn"
    )
    return type(err)(msg) if type(err) in (TypeError, ValueError, RuntimeError) else RuntimeError(msg)


def _checked_graph(model: nn.Module, example: Any, options: PruneOptions) -> ChannelGraph:
    """The model's :class:`ChannelGraph` on ``example``: its output layers kept, and the groups
    whose trial cut misroutes channels (:func:`wrong_groups`, over the groups that could change
    width with every scorable layer scored) kept whole, with the reason."""
    try:
        ignored = _output_layers(model, example, _forward)
    except Exception as err:  # the first call of model(input): say what the engine called
        raise _called_as_input(err, example) from err
    graph = channel_graph(model, example, ignored)
    _, layers, skipped = scorable_layers(model, options.exclude, options.max_factor_dim)
    for name, why in _untraced_skips(model, graph).items():
        skipped.setdefault(name, why)
    counts = _calls(model, example, layers)
    for name, n in counts.items():  # as the capture will find them
        if n > 1:
            skipped.setdefault(name, f"called {n} times per forward pass")
    scored = {m for name, m in layers.items() if name not in skipped}
    allowed = _allowed_in(model, options.exclude, scored, skipped)
    inside = [p for b in find_head_blocks(model) for p in b.producers]  # attention internals
    found = _all_groups(graph, ignored + inside)
    hidden = _train_only_groups(
        model, example, graph, found, {n: layers[n] for n, c in counts.items() if not c}
    )
    if hidden:  # their producers' outputs kept, as the output layers'
        ignored = ignored + [p for producers, _ in hidden.values() for p in producers if p not in ignored]
        found = _all_groups(graph, ignored + inside)
    wrong = wrong_groups(model, graph, ignored + inside, example, allowed, found=found)
    left = {f"group of {root}": why for root, (_, why) in hidden.items()}
    left |= {
        f"group of {root}": (
            f"left whole: {kind} (an operation on its channels that Torch-Pruning's graph does not "
            "model: a channel shuffle, split or view written by hand, or a module it does not "
            f"know); {detail}"
        )
        for root, (_, why) in wrong.items()
        for kind, _, detail in [why.partition("; ")]
    }
    _check_changeable(model, graph, found, allowed, left, wrong)
    ignored = ignored + [p for producers, _ in wrong.values() for p in producers if p not in ignored]
    checked = ChannelGraph(graph, ignored, _module_signature(model), left=left)
    if not wrong:  # the groups just listed are the graph's at these widths (see groups())
        checked._groups = (_widths_key(model), found)
    return checked


def _train_only_groups(
    model: nn.Module, example: Any, graph: Any, found: list[Any], unseen: dict[str, nn.Module]
) -> dict[str, tuple[list[nn.Module], str]]:
    """``{root name: (the group's producers, reason)}`` for every group of ``found`` whose output
    channels a layer of ``unseen`` (never called in the eval-mode trace) reads when the model
    runs in training mode (:func:`~.hidden.train_only_readers`). Unseen layers that run in
    neither mode are named in a :class:`~lightning_eigendamage.report.PruningWarning`."""
    if not unseen:
        return {}

    def run() -> None:
        def leaf(t: torch.Tensor) -> torch.Tensor:
            return t.clone().requires_grad_() if t.is_floating_point() else t.clone()

        with _untouched(model), torch.enable_grad(), module_path():
            model.train()
            try:
                model(map_tensors(leaf, _head(example, _CHECK_ROWS)))
            except Exception:  # noqa: BLE001 — a model that needs the whole batch gets it
                model(map_tensors(leaf, example))

    readers, never = train_only_readers(model, unseen, run)
    if never:
        shown = ", ".join(never[:5]) + (f", … ({len(never) - 5} more)" if len(never) > 5 else "")
        warn_user(
            f"channels: {len(never)} layer(s) never ran on the calibration input, in eval or in "
            f"training mode ({shown}): the channels they read cannot be traced, so if they run "
            "later (a branch behind a flag) on channels that were removed, they fail. Exclude "
            "the layers that feed them, or prune with structure='eigenbasis'",
            PruningWarning,
        )
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, tuple[list[nn.Module], str]] = {}
    for group in found:
        outs = [it for it in group if graph.is_out_channel_pruning_fn(it.dep.handler)]
        by = sorted({r for it in outs for r in readers.get(it.dep.target.module, ())})
        if by:
            root = names.get(group[0].dep.target.module, "?")
            producers = [
                it.dep.target.module
                for it in outs
                if isinstance(it.dep.target.module, (nn.Conv2d, nn.Linear))
            ]
            out[root] = (
                producers,
                f"left whole: its channels are also read by {', '.join(by[:3])}, which runs only "
                "in training mode (the channel graph is traced in eval mode)",
            )
    return out


def _check_changeable(
    model: nn.Module,
    graph: Any,
    found: list[Any],
    allowed: Callable[[Any], str | None],
    left: dict[str, str],
    wrong: dict[str, Any],
) -> None:
    """RuntimeError, with the reasons, if no group of ``found`` can change width (every one has a
    member ``allowed`` refuses, units that tie badly, a single unit, or a cut the trial refused)
    and the model has no attention heads to remove: then channels can prune nothing
    (``structure="auto"`` prunes the eigenbasis instead)."""
    if find_head_blocks(model):
        return
    names = {m: n for n, m in model.named_modules()}
    why = dict(left)
    for group in found:
        root = names.get(group[0].dep.target.module, "?")
        if root in wrong:
            continue
        reason = _why_whole(group, graph, allowed)
        if reason is None:
            return
        why[f"group of {root}"] = f"left whole: {reason}"
    if not why:
        raise RuntimeError(
            "no dependency group of this model can change width: Torch-Pruning's graph has no "
            "group rooted at a Conv2d/Linear layer whose outputs are not the model's"
            + unpruned_layers_note(model)
        )
    raise RuntimeError(
        "no dependency group of this model can change width: " + "; ".join(reason_lines(why, names=3))
    )


def latency_setting(options: PruneOptions, device: torch.device) -> dict[str, Any]:
    """What a latency table was measured for: device, batch, memory format, mode."""
    return {
        "device": str(device),
        "batch": options.latency_batch,
        "memory_format": options.latency_format,
        "mode": options.latency_mode,
    }


def _latency_table(
    model: nn.Module, example: Any, options: PruneOptions, reuse: dict[str, Any] | None
) -> dict[str, Any]:
    """``{"setting": ..., "layers": {name: [a, b, c, d]}}`` for every Conv2d/Linear of ``model``:
    ``reuse`` if it was measured for the same setting and has every layer that runs now (a later
    round, or a resumed fit), else measured (:func:`~lightning_eigendamage.channels.latency.measure`)."""
    device = next(model.parameters()).device
    setting = latency_setting(options, device)
    names = {m: n for n, m in model.named_modules()}
    costs, _ = _layer_costs(model, example)
    layers = {names[m]: m for m in costs if m in names}
    if reuse is not None and reuse.get("setting") == setting and set(layers) <= set(reuse.get("layers", {})):
        return reuse
    shapes = input_shapes(model, lambda: _run(model, _head(example, 1)), layers)
    table = measure(
        layers,
        shapes,
        batch=options.latency_batch,
        memory_format=options.latency_format,
        mode=options.latency_mode,
    )
    return {"setting": setting, "layers": table}


def _latency_by_module(
    model: nn.Module, latency: dict[str, Any] | None
) -> dict[nn.Module, list[float]] | None:
    if latency is None:
        return None
    modules = dict(model.named_modules())
    return {modules[n]: list(c) for n, c in latency["layers"].items() if n in modules}


def _usable_heads(
    model: nn.Module,
    example: Any,
    exclude: Any,
    updates: dict[nn.Module, InputObsUpdate],
    skipped: dict[str, str],
) -> list[tuple[HeadBlock, int]]:
    """The attention blocks of ``model`` whose heads can be removed, each with the FLOPs one head
    costs on the first example of ``example``; every other block's reason goes to ``skipped`` under
    ``"heads of <name>"``. A block needs its output projection scored (``updates``), trainable
    projections that nobody excluded, a call in the forward pass, and a forward that still runs
    with a head fewer (:func:`~lightning_eigendamage.attention.head_cost`)."""
    blocks = find_head_blocks(model)
    if not blocks:
        return []
    excluded = excluded_modules(model, exclude)
    calls = record_calls(blocks, lambda: _run(model, _head(example, 1)))  # per example, as the FLOPs
    out = []
    for b in blocks:
        members = [b.module, b.reader, *b.producers]
        params = [p for m in members for p in m.parameters(recurse=False)]
        cost, why = 0, None
        if b.num_heads < 2:
            why = "a single head"
        elif any(m in excluded for m in members):
            why = "excluded by user"
        elif not all(p.requires_grad for p in params):
            why = "frozen parameters"
        elif b.reader not in updates:
            why = f"its output projection is not scored ({skipped.get(b.reader_name, 'no factors')})"
        elif b.module not in calls:
            why = "never called in the forward pass"
        else:
            cost, why = head_cost(b, calls[b.module])
        if why is None:
            out.append((b, cost))
        else:
            skipped[f"heads of {b.name or type(b.module).__name__}"] = f"left whole: {why}"
    return out


def _head_group(
    block: HeadBlock, cost: int, update: InputObsUpdate, greedy_steps: int | None, root: bool
) -> _Group:
    """An attention block as a group of ``H·d`` channels in ``H`` units (its heads), each unit
    saving ``cost`` FLOPs. A head's damage is the input-side Kron-OBS of its ``d`` columns of the
    output projection, removed together (greedy over heads, as for a group's channels); each of
    its channels scores ``damage / d`` (``√damage / d`` when ``root``), so a unit sums to it."""
    h, d = block.num_heads, block.head_dim
    heads = [block.columns([i]) for i in range(h)]
    reader = Reader(update, list(range(h)), heads)
    s = greedy_input_obs_scores([reader], h, greedy_steps or 1)
    if root:
        s = s.sqrt()
    return _Group(block.module, None, h * d, (s / d).repeat_interleave(d), [], [], [], heads, [cost] * h, d)


def _head_entries(model: nn.Module, plan: Sequence[dict[str, Any]]) -> list[tuple[HeadBlock, list[int]]]:
    """``(block, removed heads)`` of every head entry of ``plan`` that removes something, checked
    against ``model`` (ValueError for a plan made for another model)."""
    out = []
    for entry in plan:
        if not entry.get("head_dim") or not entry.get("removed"):
            continue
        name, d = entry["root"], int(entry["head_dim"])
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        block = None if module is None else head_block(name, module)
        if block is None or block.head_dim != d or block.num_heads * d != int(entry["channels"]):
            raise ValueError(
                f"the plan removes heads of {name!r} ({entry['channels']} channels in heads of {d}), "
                "which the model does not have: the plan was made for another model"
            )
        removed = sorted(int(c) for c in entry["removed"])
        heads = sorted({c // d for c in removed})
        if removed != block.columns(heads):
            raise ValueError(f"the plan removes parts of heads of {name!r}: only whole heads can go")
        out.append((block, heads))
    return out


class ChannelEngine(PruningEngine):
    """The channel engine (``structure="channels"``): input-side Kron-OBS from a patch-form
    capture, greedy sequential scores per dependency group, one global ranking under per-group
    caps, the readers compensated, the channels cut (see the module docstring). Its change is a
    :class:`ChannelChange` (each narrowed parameter's flat source positions).

    ``round_to = m > 1`` (:class:`~lightning_eigendamage.PruneOptions`): every dependency group
    that loses channels keeps a multiple of ``m`` of them, its lowest-ranked ones removed (kept
    widths rounded up after the global selection, then whole blocks of ``m`` taken, lowest mean
    rank first, until the target: :func:`_select`). A group of at most ``m`` channels, or whose
    caps allow no narrower multiple, stays whole (``report.skipped`` says so). A grouped conv's
    units (one channel per conv group, ``w`` wide) and an attention block's heads (``d`` wide)
    go whole: the kept width ``k·w`` is a multiple of ``m``, so ``k`` steps by
    ``m / gcd(m, w)`` (heads whose ``d`` is a multiple of ``m`` are not constrained)."""

    name = "channels"
    a_form = "patch"
    # The channel scores keep their choices on factors from 32 examples of each batch (the
    # converged networks, benchmarks/fisher_examples.py); the capture then costs a quarter.
    capture_examples = 32
    # ... and on a patch-form A from every other column of each conv's output map
    # (benchmarks/fisher_columns.py): the dearest product of a capture batch costs half.
    capture_columns = 2
    defaults = {"layer_cap": 0.95, "rank_by": "relative"}
    followers = (_FOLLOWS,)
    choices = {
        "rank_by": tuple(RANK_BY),
        "target": ("directions", "channels", "flops"),
        "method": ("eigendamage",),
    }
    unused = (
        "form",
        "train_rotations",
        "form_by",
        "shots",
        "reconstruct",
        "reconstruct_damping",
    )

    def candidates(self, model: nn.Module, options: PruneOptions) -> list[Candidate]:
        return scorable_layers(model, options.exclude, options.max_factor_dim)[0]

    def factor_layers(
        self, model: nn.Module, candidates: Sequence[Candidate], options: PruneOptions, prepared: Any = None
    ) -> list[str]:
        """The readers of the groups that can change width and the attention blocks' output
        projections (:meth:`ChannelGraph.factor_layers`); every scorable layer without a graph
        that describes ``model``."""
        names = super().factor_layers(model, candidates, options, prepared)
        if not isinstance(prepared, ChannelGraph) or not prepared.describes(model):
            return names
        layers = {c.name: c.unit for c in candidates if c.skipped is None}
        skipped = {c.name: c.skipped for c in candidates if c.skipped is not None}
        return prepared.factor_layers(model, layers, options.exclude, skipped)

    def check(self, model: nn.Module, example: Any, options: PruneOptions) -> ChannelGraph:
        """The model's dependency graph (RuntimeError if it cannot be built), for :meth:`analyse`,
        with the groups whose cut is not what the graph says left out (:func:`wrong_groups`)."""
        _torch_pruning()
        return _checked_graph(model, example, options)

    def unreachable(self, model: nn.Module, prepared: ChannelGraph | None) -> dict[str, str]:
        """The Conv2d/Linear layers in no part of the model Torch-Pruning could trace (none for a
        whole graph; attention projections are not among them: their heads may still go), and
        the layers of the other types the eigenbasis prunes (``nn.Conv1d``), whose channels this
        engine never removes, with the reason."""
        out = {} if prepared is None else _untraced_skips(model, prepared.graph)
        for c in find_layers(model):
            if c.skipped is None and not isinstance(c.unit, _LAYERS) and c.name not in out:
                out[c.name] = f"{type(c.unit).__name__}: only Conv2d and Linear layers lose channels"
        return out

    def analyse(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        options: PruneOptions,
        *,
        captured: CaptureResult | None = None,
        distributed: bool = False,
        prepared: ChannelGraph | None = None,
    ) -> ChannelAnalysis:
        _torch_pruning()
        if isinstance(batches, (torch.Tensor, dict)):
            raise TypeError(
                f"batches must be an iterable of batches, got a single {type(batches).__name__}: "
                "iterating it would give single examples (or keys); wrap one batch in a list"
            )
        # at most max_batches of them, for the capture and the BatchNorm re-estimation alike
        batches = list(first_batches(batches, options.max_batches))
        if not batches:
            raise ValueError("batches is empty: channel pruning needs at least one calibration batch")
        params = list(model.parameters())
        if not params:
            raise ValueError("the model has no parameters: nothing to prune")
        check_usable_parameters(model, "channel pruning")
        device = params[0].device
        example = to_device(split_batch(batches[0], options.input_fn)[0], device)
        if prepared is None or not prepared.describes(model):  # an ungroupable model fails here
            prepared = _checked_graph(
                model, rank_zero_input(example, device) if distributed else example, options
            )
        graph, ignored = prepared.graph, prepared.ignored
        _, layers, skipped = scorable_layers(model, options.exclude, options.max_factor_dim)
        skipped.update(prepared.left)
        for name, why in _untraced_skips(model, graph).items():
            skipped.setdefault(name, why)
        # factors only where the scores read them; the other layers are hooked to see them run
        factor_names = prepared.factor_layers(model, layers, options.exclude, skipped)
        if captured is None and layers:
            captured = capture_factors(
                model,
                layers,
                batches,
                factors_for=factor_names,
                a_form="patch",
                generator=torch.Generator(device=device).manual_seed(options.seed),
                fisher=options.fisher,
                loss_fn=options.loss_fn,
                input_fn=options.input_fn,
                likelihood=options.likelihood,
                class_dim=options.class_dim,
                max_batches=options.max_batches,
                forward_fn=options.forward_fn,
            )
        if captured is None:
            raise RuntimeError("no Conv2d/Linear layer can be scored: " + _reasons(skipped))
        if distributed:
            widths = {n: (_a_width(layers[n]), layers[n].weight.shape[0]) for n in factor_names}
            all_reduce_capture(captured, widths, device, flags_for=layers)
        if captured.batches == 0:
            raise RuntimeError(
                f"all {captured.skipped_batches} batches gave non-finite curvature (NaN/Inf in "
                "activations or gradients); the model was left unchanged"
            )
        readers = {n: layers[n] for n in factor_names}
        in_scores, updates = scores_from_factors(readers, captured, options.damping, skipped)
        if readers and not in_scores:  # (no readers: no group can change width, and says why)
            raise RuntimeError("no Conv2d/Linear layer can be scored: " + _reasons(skipped))
        others = {n: m for n, m in layers.items() if n not in readers}
        changeable = set(in_scores) | _ran_once(others, captured, skipped)
        heads = _usable_heads(model, example, options.exclude, updates, skipped)
        latency = None
        if RANK_BY[options.rank_by].endswith("per_latency"):
            reuse = prepared.latency if prepared is not None else None
            latency = _latency_table(model, example, options, reuse)
            if prepared is not None:
                prepared.latency = latency
        calibration = [to_device(split_batch(b, options.input_fn)[0], device) for b in batches]
        return ChannelAnalysis(
            model,
            graph,
            ignored,
            example,
            in_scores,
            updates,
            skipped,
            _allowed_in(model, options.exclude, changeable, skipped),
            captured.batches,
            captured.skipped_batches,
            calibration,
            device,
            heads,
            latency,
            prepared.groups(model),
        )

    def decide(
        self, analysis: ChannelAnalysis, ratio: float, options: PruneOptions, *, distributed: bool = False
    ) -> ChannelPlan:
        r = as_real(ratio)
        if r is None or not 0.0 <= r < 1.0:
            raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
        target = "flops" if options.target == "flops" else "channels"
        payload = None
        if not (distributed and is_distributed()) or torch.distributed.get_rank() == 0:
            payload = self._plan(analysis, r, target, options).to_dict()
        if distributed:
            payload = broadcast_object(payload)
        return ChannelPlan.from_dict(payload)

    @staticmethod
    def _plan(an: ChannelAnalysis, ratio: float, target: str, options: PruneOptions) -> ChannelPlan:
        model = an.model
        names = {m: n for n, m in model.named_modules()}
        costs, _ = _layer_costs(model, an.example)
        flops_before = count_flops(model, an.example, _forward)
        relative = options.rank_by == "relative"
        if options.greedy_steps is None:
            how: dict[str, Any] = {
                "in_scores": {m: s.clamp_min(0).sqrt() for m, s in an.in_scores.items()}
                if relative
                else an.in_scores,
                "importance": None,
            }
        else:
            how = {
                "in_scores": {},
                "importance": sequential_group_scores(an.graph, an.updates, options.greedy_steps, relative),
            }
        left: dict[str, str] = {}
        inside = [p for b in find_head_blocks(model) for p in b.producers]  # attention internals
        groups = _collect_groups(
            an.graph,
            an.ignored + inside,
            costs,
            None,
            how["importance"],
            names,
            how["in_scores"],
            an.allowed,
            left,
            progress_of(options),
            an.found,
        )
        steps = options.greedy_steps
        groups += [_head_group(b, cost, an.updates[b.reader], steps, relative) for b, cost in an.heads]
        chosen, planned = _select(
            groups,
            costs,
            ratio=ratio,
            target=target,
            max_group_ratio=options.layer_cap,
            min_channels=options.min_rank,
            other_flops=flops_before - sum(c.flops() for c in costs.values()),
            flops_before=flops_before,
            rank_by=RANK_BY[options.rank_by],
            latency=_latency_by_module(model, an.latency),
            round_to=options.round_to,
        )
        if options.round_to > 1:  # the groups no multiple of round_to can narrow, and why
            caps = _caps(groups, options.layer_cap, options.min_rank)
            for g, cap in zip(groups, caps):
                if cap and _round_removals(g, cap, options.round_to) == [0]:
                    kind = "heads" if g.head_dim else "group"
                    left[f"{kind} of {names.get(g.root, '?')}"] = (
                        f"left whole: round_to={options.round_to}: no narrower width of its {g.n} "
                        f"channels (units of {len(g.units[0])}) is a multiple of it within the caps "
                        f"(at most {cap} removed)"
                    )
        return ChannelPlan(
            tuple(
                {
                    "root": names.get(g.root, "?"),
                    "channels": g.n,
                    "removed": s,
                    **({"head_dim": g.head_dim} if g.head_dim else {}),
                }
                for g, s in zip(groups, chosen)
            ),
            target,
            ratio,
            planned,
            left,
        )

    def apply(
        self,
        model: nn.Module,
        analysis: ChannelAnalysis,
        plan: ChannelPlan,
        options: PruneOptions,
        *,
        distributed: bool = False,
    ) -> tuple[PruneReport, ChannelChange]:
        if model is not analysis.model:
            raise ValueError("apply() takes the model the analysis was made on")
        an = analysis
        names = {m: n for n, m in model.named_modules()}
        modes = {m: m.training for m in model.modules()}
        costs, _ = _layer_costs(model, an.example)
        before = {names[m]: _widths(m) for m in costs if m in names}
        params_before, flops_before = count_params(model), count_flops(model, an.example, _forward)
        probe = _head(an.example, _CHECK_ROWS)  # the examples the narrowed model is checked on
        shapes_before = _output_shapes(_run(model, probe))
        widths = {m: m.weight[0].numel() for m in an.updates}
        snapshot, frozen = _Snapshot(model, an.graph), _frozen(model)
        recalibrated: list[str] = []
        try:
            model.eval()
            heads = _head_entries(model, plan.groups)
            with torch.no_grad():  # each head's output projection absorbs what its removal loses
                for block, gone in heads:
                    w = block.reader.weight
                    w.add_(an.updates[block.reader](block.columns(gone)).reshape(w.shape).to(w))
            change = cut_channels(model, plan.groups, an.graph, in_updates=an.updates)
            for block, gone in heads:
                _cut_heads(model, block, gone, change)
            _refreeze(frozen)
            for m, mode in modes.items():
                m.training = mode
            _check_pruned(model, probe, shapes_before, any(modes.values()))
            if options.recalibrate_bn:
                touched = [m for m, w in widths.items() if m.weight[0].numel() < w]
                bns = downstream_batchnorms(model, touched, an.example, _forward)
                if recalibrate_batchnorm(
                    model, bns, an.calibration, _on(an.device), distributed=distributed and is_distributed()
                ):
                    recalibrated = [names.get(b, "?") for b in bns]
            if not all(
                bool(torch.isfinite(t).all()) for t in model.state_dict().values() if torch.is_tensor(t)
            ):
                raise RuntimeError(
                    "the pruned model has non-finite parameters or buffers; the model was left as it was"
                )
            total = sum(int(g["channels"]) for g in plan.groups)
            n_removed = sum(len(g["removed"]) for g in plan.groups)
            flops_after = count_flops(model, an.example, _forward)
            reached = (
                1.0 - flops_after / max(flops_before, 1)
                if plan.target == "flops"
                else n_removed / max(total, 1)
            )
            ok = _target_met(plan.target, plan.ratio, reached, n_removed, total)
            # what was left alone: not the layers that lost channels, nor the depthwise convs
            # (not scored, they follow their group: where it stays whole, the group says why)
            narrowed = {r.name for r in layer_reports(before, model) if (r.removed_in or r.removed_out)}
            # an attention's q/k/v producers lose rows with its heads ("heads of …" says why not)
            narrowed |= {names.get(p, "?") for block, _ in an.heads for p in block.producers}
            skipped = {
                k: v for k, v in {**an.skipped, **plan.left}.items() if k not in narrowed and v != _FOLLOWS
            }
            report = PruneReport(
                params_before=params_before,
                params_after=count_params(model),
                flops_before=flops_before,
                flops_after=flops_after,
                ratio=plan.ratio,
                target=plan.target,
                realised_fraction=n_removed / max(total, 1),
                batches=an.batches,
                skipped_batches=an.skipped_batches,
                method="kron-obs-in",
                fisher=options.fisher,
                layers=layer_reports(before, model, skipped),
                target_reached=ok,
                reached=reached,
                limited_by=None if ok else _LIMITED,
                recalibrated_bn=recalibrated,
                structure="channels",
                channels_total=total,
                channels_removed=n_removed,
                flops_planned=plan.flops_planned,
                groups=[dict(g, removed=list(g["removed"])) for g in plan.groups],
                skipped=skipped,
                latency_table=an.latency,
            )
        except BaseException:
            snapshot.restore()
            raise
        finally:
            for m, mode in modes.items():
                m.training = mode
        if not ok:
            warn_user(
                f"removed {reached:.3f} of the {plan.target} for a ratio of {plan.ratio:.3f}: {_LIMITED}",
                TargetNotReachedWarning,
            )
        return report, change

    def replaced_parameters(
        self, change: ChannelChange
    ) -> list[tuple[str, list[nn.Parameter], list[nn.Parameter]]]:
        return [(name, [s.old], [s.new]) for name, s in change.params.items()]

    def marked_layers(
        self, analysis: ChannelAnalysis, plan: ChannelPlan, param_names: dict[int, str]
    ) -> list[MarkedLayer]:
        """Each scored reader's weight with the input columns of the channels ``plan`` removes
        (identity bases: the penalty ``λ/2·‖W[:, removed]‖²`` pulls the reader off those channels,
        GReg's growing penalty on the input side, where the channels are scored and compensated).
        Grouped convs are not marked (their weight holds each conv group's own columns); the
        channels they read are still pulled off in every other reader."""
        out = []
        for module, cols in _reader_columns(analysis, plan).items():
            if _grouped(module):  # its weight is (C_out, C_in/groups, k, k): no channel columns to mark
                continue
            w = module.weight
            d_out, d_in = w.shape[0], w.shape[1] * (module.groups if isinstance(module, nn.Conv2d) else 1)
            eye_in = torch.eye(d_in, dtype=torch.float64)
            eye_out = torch.eye(d_out, dtype=torch.float64)
            out.append(MarkedLayer(param_names[id(w)], eye_in, eye_out, tuple(cols), ()))
        return out

    def carry_optimizer_state(
        self,
        model: nn.Module,
        old_optimizers: Sequence[Optimizer],
        new_optimizers: Sequence[Optimizer],
        change: ChannelChange,
    ) -> TransplantReport:
        return carry_sliced_state(
            model,
            old_optimizers,
            new_optimizers,
            {name: (s.old, s.new, s.index) for name, s in change.params.items()},
        )


def _reader_columns(an: ChannelAnalysis, plan: ChannelPlan) -> dict[nn.Module, list[int]]:
    """Per scored reader, the input columns (channel indices) the plan removes from it (an
    attention block's output projection: the columns of its removed heads)."""
    _, cols, _ = _removed_indices(an.graph, _plan_entries(an.model, plan.groups, an.graph))
    for block, gone in _head_entries(an.model, plan.groups):
        cols.setdefault(block.reader, []).extend(block.columns(gone))
    return {m: sorted(set(c)) for m, c in cols.items() if m in an.updates}


def _cut_heads(model: nn.Module, block: HeadBlock, heads: list[int], change: ChannelChange) -> None:
    """Remove ``heads`` of ``block`` (:func:`~lightning_eigendamage.attention.remove_heads`), mark
    its narrowed modules for checkpoints, and add its parameters to ``change`` (composed with a
    slice :func:`cut_channels` already made of the same parameter)."""
    members = (block.module, block.reader, *block.producers)
    before = {
        m: {k: t.shape for k, t in [*m._parameters.items(), *m._buffers.items()] if t is not None}
        for m in members
    }
    for rel, old, new, index in remove_heads(block, heads):
        name = f"{block.name}.{rel}" if block.name else rel
        prior = change.params.get(name)
        if prior is not None and prior.new is old:
            change.params[name] = ParamSlice(prior.old, new, prior.index[index.to(prior.index.device)])
        else:
            change.params[name] = ParamSlice(old, new, index)
    for m in members:
        mark_narrowed(m, before[m])


def _reasons(skipped: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "the model has no Conv2d/Linear layer"


register_engine(ChannelEngine())


def restore_channels(
    model: nn.Module,
    checkpoint: str | os.PathLike | IO[bytes] | dict[str, Any],
    example_inputs: Any,
    *,
    strict: bool = True,
) -> nn.Module:
    """Narrow a freshly built ``model`` to the widths of a channel-pruned ``checkpoint`` and load it.

    A state_dict saved after :func:`prune_channels` (or any channel removal Torch-Pruning can
    group) describes its widths by its tensors' shapes: for each dependency group of ``model``
    the kept width is the first dimension of its root layer's ``weight`` in the checkpoint, and for
    each attention block (:mod:`~lightning_eigendamage.attention`) the kept heads are the input
    columns of its output projection over the head width. The group is narrowed to that width
    (which channels go does not matter: every tensor is then loaded), and the state_dict loaded.
    Use it to load a channel-pruned model from a plain
    state_dict or a Lightning checkpoint, e.g. before ``Trainer.fit(..., ckpt_path=...)``.

    Args:
        model: the model as constructed (unpruned), or already narrowed to the same widths.
        checkpoint: a path or binary file object (loaded with ``torch.load(weights_only=True)``),
            a state_dict, or a Lightning checkpoint dict (its ``"state_dict"``); keys relative to
            ``model``.
        example_inputs: a batch ``model`` accepts, on the model's device, traced once by
            Torch-Pruning.
        strict: passed to ``load_state_dict``.

    Returns:
        ``model`` itself, narrowed and loaded.

    All or nothing: on any error ``model`` is left as it was (the same Parameter and buffer
    objects, with their values; hooks and other attributes are never touched). Parameters that
    did not require grad still do not. Memory: one copy of the parameters and buffers.

    Raises:
        TypeError: ``checkpoint`` is none of the accepted kinds (``torch.load``'s own errors pass
            through).
        ValueError: a group's width in the checkpoint is not between 1 and the model's width, or
            it narrows a layer whose outputs are the model's (``prune_channels`` never does).
        RuntimeError: the state_dict does not fit the narrowed model (load_state_dict's message),
            or Torch-Pruning cannot group the model's channels (as in :func:`prune_channels`).
    """
    state_dict = state_dict_of(checkpoint)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError(
            "restore_channels: the model is on the meta device, where load_state_dict copies nothing; "
            "build it on a real device (or model.to_empty(device=...)) first"
        )
    names = {m: n for n, m in model.named_modules()}
    dg = channel_graph(model, example_inputs)
    outputs = set(_output_layers(model, example_inputs, _forward))
    heads = []  # attention blocks: the heads a narrower output projection leaves (the last go)
    blocks = find_head_blocks(model)
    for b in blocks:
        w = state_dict.get(f"{b.reader_name}.weight")
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] < b.reader.in_features:
            if w.shape[1] % b.head_dim or w.shape[1] == 0:
                raise ValueError(
                    f"{b.reader_name}.weight has {w.shape[1]} input columns in the checkpoint: not a "
                    f"whole number of {b.name}'s heads of {b.head_dim}"
                )
            heads.append((b, list(range(w.shape[1] // b.head_dim, b.num_heads))))
    inside = [p for b in blocks for p in b.producers]
    cuts = []
    for group in dg.get_all_groups(ignored_layers=inside, root_module_types=(nn.Conv2d, nn.Linear)):
        root, fn, n = group[0].dep.target.module, group[0].dep.handler, len(group[0].idxs)
        weight = state_dict.get(f"{names[root]}.weight" if names[root] else "weight")
        if not isinstance(weight, torch.Tensor) or weight.dim() == 0:
            continue  # not in the checkpoint: load_state_dict names it (strict) or leaves it
        width = int(weight.shape[0])
        if not 1 <= width <= n:
            raise ValueError(
                f"{names[root]}.weight has {width} output channels in the checkpoint; the model's "
                f"group rooted there has {n}: this checkpoint is not a channel-pruned copy of it"
            )
        if width < n:
            narrowed = [it.dep.target.module for it in group if dg.is_out_channel_pruning_fn(it.dep.handler)]
            hit = next((m for m in narrowed if m in outputs), None)
            if hit is not None:
                raise ValueError(
                    f"the checkpoint narrows {names.get(hit, '?')}, whose outputs are the model's "
                    f"({n} → {width}): this checkpoint is not a channel-pruned copy of this model"
                )
            units = _units(group, dg)  # channels that go together (grouped convs, gates) go so
            size = len(units[0]) if isinstance(units, list) and units else 1
            if (n - width) % size:
                raise ValueError(
                    f"{names[root]}.weight has {width} output channels in the checkpoint; the model's "
                    f"group rooted there has {n} in units of {size} that go together: this "
                    "checkpoint is not a channel-pruned copy of it"
                )
            gone = (
                sorted(c for u in units[len(units) - (n - width) // size :] for c in u)
                if size > 1
                else list(range(width, n))
            )
            cuts.append((root, fn, gone))
    snapshot, frozen = _Snapshot(model, dg), _frozen(model)
    try:
        for root, fn, idxs in cuts:
            dg.get_pruning_group(root, fn, idxs).prune()
        for block, gone in heads:
            remove_heads(block, gone)
        _refreeze(frozen)
        model.load_state_dict(state_dict, strict=strict)
    except BaseException:
        snapshot.restore()
        raise
    return model


def _on(device: torch.device) -> Callable[[nn.Module, Any], Any]:
    return lambda m, x: m(to_device(x, device))
