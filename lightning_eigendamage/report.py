"""What a pruning call did, in plain data: :class:`PruneReport` with one :class:`LayerReport` per
layer considered, and the warnings a call emits."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """One layer considered by a pruning call: a prunable-type layer (Conv2d, Conv1d, Linear) or,
    marked as not pruned with the reason, an embedding or recurrent layer.

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

    ``shots``: in how many steps the call removed its share (``prune(shots=...)``);
    ``recalibrated_bn``: the BatchNorm layers whose running statistics were re-estimated;
    ``reconstruction_error``: per re-fitted layer, the relative output error against the dense
    layer on the calibration batches after the fit (``prune(reconstruct=True)``).

    ``structure``: ``"eigenbasis"`` (layers rewritten in their eigenbasis; ``layers`` give the
    kept directions and forms) or ``"channels"`` (real channels removed; ``layers`` give each
    Conv2d/Linear's widths after the call as ``kept_in``/``kept_out`` with form ``"channels"``;
    ``channels_total``/``channels_removed`` count the prunable groups' channels, ``groups`` has
    one entry per group: ``root`` (module name), ``channels`` (before), ``removed`` (root channel
    indices); ``skipped``: layer or group → why it was left whole; ``flops_planned``: the
    analytic count the channel search stopped at; ``latency_table``: with
    ``rank_by="*_per_latency"``, the measured per-layer times it ranked by, ``{"setting": {device,
    batch, memory_format, mode}, "layers": {name: [a, b, c, d]}}``, see
    :mod:`~lightning_eigendamage.channels.latency`). ``structure_reason``: with
    ``structure="auto"``, why this structure was chosen (the reason channels were not possible,
    when the eigenbasis was); None when the structure was named. ``eigenbasis_layers``: with
    ``structure="auto"``, the layers of a channel-pruned model that channels cannot reach (no
    traced part of its channel graph covers them, or they are of a type whose channels are never
    removed, ``nn.Conv1d``), pruned in their eigenbasis instead (their ``layers`` entries are the
    eigenbasis'), with the reason.
    """

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    ratio: float
    target: str
    realised_fraction: float = 0.0
    threshold: float = 0.0
    quantile: float = 0.0
    batches: int = 0
    skipped_batches: int = 0
    method: str = "eigendamage"
    fisher: str = "true"
    layers: list[LayerReport] = field(default_factory=list)
    target_reached: bool = True
    reached: float = 0.0
    limited_by: str | None = None
    shots: int = 1
    recalibrated_bn: list[str] = field(default_factory=list)
    reconstruction_error: dict[str, float] = field(default_factory=dict)
    structure: str = "eigenbasis"
    channels_total: int = 0
    channels_removed: int = 0
    flops_planned: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    structure_reason: str | None = None
    latency_table: dict[str, Any] | None = None
    eigenbasis_layers: dict[str, str] = field(default_factory=dict)

    @property
    def flops_fraction_removed(self) -> float:
        return 1.0 - self.flops_after / max(self.flops_before, 1)

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

    @property
    def left_whole(self) -> dict[str, str]:
        """Every layer or channel group left whole, with the reason: ``skipped`` (groups as
        ``"group of <root>"``) and the layers whose :class:`LayerReport` has ``skipped`` set."""
        out = dict(self.skipped)
        for r in self.layers:
            if r.skipped is not None:
                out.setdefault(r.name, r.skipped)
        return out

    def summary(self) -> str:
        """The call in plain words: a table of the layers it could change (widths before and
        after; for the eigenbasis the kept eigen-directions and the form), the layers and groups
        left whole grouped by reason (one line per reason, with a count), the totals and whether
        the target was reached. The callback prints the same text after each round."""
        eigen = self.structure == "eigenbasis"
        rows = [r for r in self.layers if r.skipped is None]
        lines = [_structure_line(self)]
        if rows:
            heads = ("layer", "before in→out", "kept in→out" if eigen else "after in→out")
            cells = [(r.name, f"{r.in_features}→{r.out_features}", f"{r.kept_in}→{r.kept_out}") for r in rows]
            w = [max(len(c[i]) for c in [heads, *cells]) for i in range(3)]
            mixed = bool(self.eigenbasis_layers)  # channels, some layers in their eigenbasis
            for i, c in enumerate([heads, *cells]):
                form = ("form" if i == 0 else rows[i - 1].form) if eigen else ""
                if mixed and i > 0 and rows[i - 1].name in self.eigenbasis_layers:
                    form = f"eigenbasis ({rows[i - 1].form}; kept: eigen-directions)"
                lines.append(f"{c[0]:<{w[0]}}  {c[1]:>{w[1]}}  {c[2]:>{w[2]}}  {form}".rstrip())
        heads = [g for g in self.groups or [] if g.get("head_dim")]
        if heads:  # attention blocks (channel engine): heads before → after
            cells = [
                f"{g['root']} {g['channels'] // g['head_dim']}→"
                f"{(g['channels'] - len(g['removed'])) // g['head_dim']}"
                for g in heads
            ]
            more = f", … ({len(cells) - 6} more)" if len(cells) > 6 else ""
            lines.append(f"{'heads':<9} {', '.join(cells[:6])}{more}")
        if self.eigenbasis_layers:
            lines.append(
                f"eigenbasis: {_plural(len(self.eigenbasis_layers), 'layer', 'layers')} channels cannot "
                "reach, rewritten in their eigenbasis instead"
            )
            lines += ["  " + line for line in reason_lines(self.eigenbasis_layers, names=3)]
        left = self.left_whole
        if left:
            groups = sum(1 for name in left if name.startswith("group of "))
            what = [_plural(len(left) - groups, "layer", "layers")] if len(left) > groups else []
            what += [_plural(groups, "channel group", "channel groups")] if groups else []
            n = len(group_reasons(left))
            lines.append(f"left whole: {' and '.join(what)}, {_plural(n, 'reason', 'reasons')}")
            lines += ["  " + line for line in reason_lines(left, names=3)]
        lines.append(
            f"{'params':<9} {self.params_before:,} → {self.params_after:,} "
            f"({_times(self.params_before, self.params_after)})"
        )
        lines.append(
            f"{'FLOPs':<9} {self.flops_before:,} → {self.flops_after:,} per example "
            f"({_times(self.flops_before, self.flops_after)})"
        )
        if self.target not in ("directions", "channels"):
            if eigen:
                lines.append(f"{'removed':<9} {self.realised_fraction:.1%} of the eigen-directions")
            else:
                lines.append(
                    f"{'removed':<9} {self.channels_removed:,} of {self.channels_total:,} prunable "
                    f"channels ({self.realised_fraction:.1%})"
                )
        lines.append(_target_line(self))
        return "\n".join(lines)


def group_reasons(skipped: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The reasons in ``skipped`` (layer or ``"group of <root>"`` → reason), each once, with the
    names that gave it, most frequent first. A layer's reason is kept up to its first ``;`` (the
    advice after it is the same for all); a group's ``"left whole: <member> <why>"`` becomes
    ``"group left whole: a member <why>"``, so that one reason of many groups is one line."""
    out: dict[str, list[str]] = {}
    for name, why in skipped.items():
        reason, shown, _ = _reason_of(name, why)
        out.setdefault(reason, []).append(shown)
    return sorted(out.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def reason_lines(skipped: dict[str, str], names: int = 3, advice: bool = True) -> list[str]:
    """One line per distinct reason in ``skipped`` (grouped as by :func:`group_reasons`), most
    frequent first: ``"17× depthwise convolution: a, b, c, … (14 more)"``.

    Args:
        skipped: layer or ``"group of <root>"`` → why it was left whole.
        names: how many names to show per reason (0: none, only the count and the reason).
        advice: add the advice that follows a reason's first ``;`` (e.g. "raise max_factor_dim
            ... to prune this layer") once, in brackets, where every name of that reason gives
            the same advice.

    :meth:`PruneReport.summary`, the callback's console and the zoo tables all word the
    reasons through this function.
    """
    tips: dict[str, set[str]] = {}
    for name, why in skipped.items():
        reason, _, tip = _reason_of(name, why)
        tips.setdefault(reason, set()).add(tip)
    lines = []
    for reason, who in group_reasons(skipped):
        line = f"{len(who)}× {reason}"
        tip = tips[reason]
        if advice and len(tip) == 1 and (only := next(iter(tip))):
            line += f" ({only})"
        if names > 0:
            rest = len(who) - names
            line += ": " + ", ".join(who[:names]) + (f", … ({rest} more)" if rest > 0 else "")
        lines.append(line)
    return lines


def _reason_of(name: str, why: str) -> tuple[str, str, str]:
    """``(reason, name shown, advice)`` of one entry of a ``skipped`` mapping."""
    why, _, tip = why.partition(";")
    if name.startswith("group of ") and why.startswith("left whole: "):
        rest = why.removeprefix("left whole: ")
        _member, _, tail = rest.partition(" ")  # "<member> is excluded…", "<member> (GroupNorm) …"
        named = tail.startswith(("is ", "("))
        why = f"group left whole: a member {tail}" if named else f"group left whole: {rest}"
    return why, name.removeprefix("group of "), tip.strip()


def _plural(n: int, noun: str, nouns: str) -> str:
    return f"{n} {noun if n == 1 else nouns}"


def _times(before: int, after: int) -> str:
    """``"÷2.02"``: how many times smaller ``after`` is than ``before`` (the zoo tables' wording)."""
    return f"÷{before / max(after, 1):.2f}"


def _structure_line(report: PruneReport) -> str:
    if report.structure == "eigenbasis":
        what = "eigenbasis (layers rewritten in their eigenbasis; kept: the core's eigen-directions)"
    else:
        what = f"{report.structure} (whole channels removed; after: the layer's widths now)"
    why = f"; chosen by structure='auto': {report.structure_reason}" if report.structure_reason else ""
    return f"structure {what}{why}"


def _target_line(report: PruneReport) -> str:
    """The target and whether it was reached, in words."""
    if report.target == "directions":
        return (
            f"target    directions, ratio {report.ratio:g} (a score quantile, no totals target): "
            f"removed {report.realised_fraction:.1%} of the eigen-directions"
        )
    unit = {"flops": "FLOPs", "params": "params", "channels": "prunable channels"}.get(
        report.target, report.target
    )
    asked = f"remove {report.ratio:.1%} of the {unit}"
    got = f"removed {report.reached:.1%}"
    if report.target in ("flops", "params"):
        asked += f" (÷{1 / max(1e-12, 1 - report.ratio):.2f})"
        got += f" (÷{1 / max(1e-12, 1 - report.reached):.2f})"
    elif report.target == "channels":
        got = f"removed {report.channels_removed:,} of {report.channels_total:,} ({report.reached:.1%})"
    if report.target_reached:
        return f"target    {asked}: reached, {got}"
    limit = f"\n{'':<9} limited by {report.limited_by}" if report.limited_by else ""
    return f"target    {asked}: NOT reached, {got}{limit}"


# A params/flops target counts as reached within this fraction of the model (0.5 percentage points):
# the bisection meets the target with whole directions, and FlopCounterMode's count of the whole
# model can differ slightly from the per-layer costs the bisection adds up.
TARGET_TOLERANCE = 0.005


class PruningWarning(UserWarning):
    """Base class of the warnings :func:`prune` emits (the callback re-emits them on rank zero)."""


class TargetNotReachedWarning(PruningWarning):
    """A ``"params"``/``"flops"`` target could not be met (caps, ``min_rank``, skipped layers)."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside this package
    (the user's call of ``prune`` or of the engine, or Lightning's of the callback), however deep
    in the package it is raised: a fixed ``stacklevel`` points inside the package when the same
    step is reached through another front (``structure="auto"``'s fallback, say)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class ZeroCurvatureWarning(PruningWarning):
    """Layers whose curvature is exactly zero: their directions all score 0 (arbitrary order)."""
