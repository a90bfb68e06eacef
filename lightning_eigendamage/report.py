"""What a pruning call did, in plain data: :class:`PruneReport` with one :class:`LayerReport` per
layer considered, and the warnings a call emits."""

from __future__ import annotations

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
    analytic count the channel search stopped at). ``structure_reason``: with
    ``structure="auto"``, why this structure was chosen (the reason channels were not possible,
    when the eigenbasis was); None when the structure was named.
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

    def summary(self) -> str:
        """A per-layer table (widths before → kept directions, form) with totals."""
        w = max([len(r.name) for r in self.layers] + [5])
        kept = "kept in→out" if self.structure == "eigenbasis" else "now in→out"
        lines = [f"{'layer':<{w}}  {'in→out':>11}  {kept:>11}  {'form':<10}  note"]
        for r in self.layers:
            note = r.skipped or ""
            lines.append(
                f"{r.name:<{w}}  {f'{r.in_features}→{r.out_features}':>11}  "
                f"{f'{r.kept_in}→{r.kept_out}':>11}  {r.form:<10}  {note}"
            )
        lines.append(
            f"params {self.params_before:,} → {self.params_after:,} "
            f"({self.param_compression:.2f}×), FLOPs/example {self.flops_before:,} → "
            f"{self.flops_after:,} ({self.flops_compression:.2f}×), "
            f"{'directions' if self.structure == 'eigenbasis' else 'channels'} removed "
            f"{self.realised_fraction:.1%} (target {self.target} {self.ratio:g}"
            f"{'' if self.target_reached else ', not reached: ' + str(self.limited_by)})"
        )
        if self.skipped:
            lines.append("left whole, by reason:")
            for why, names in group_reasons(self.skipped):
                shown = ", ".join(names[:3]) + (f", … ({len(names) - 3} more)" if len(names) > 3 else "")
                lines.append(f"  {len(names)}× {why}: {shown}")
        return "\n".join(lines)


def group_reasons(skipped: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The reasons in ``skipped`` (layer or ``"group of <root>"`` → reason), each once, with the
    names that gave it, most frequent first. A layer's reason is kept up to its first ``;`` (the
    advice after it is the same for all); a group's ``"left whole: <member> <why>"`` becomes
    ``"group left whole: a member <why>"``, so that one reason of many groups is one line."""
    out: dict[str, list[str]] = {}
    for name, why in skipped.items():
        why = why.split(";")[0]
        if name.startswith("group of ") and why.startswith("left whole: "):
            rest = why.removeprefix("left whole: ")
            member, _, tail = rest.partition(" ")
            why = f"group left whole: a member {tail}" if tail else f"group left whole: {rest}"
        out.setdefault(why, []).append(name.removeprefix("group of "))
    return sorted(out.items(), key=lambda kv: (-len(kv[1]), kv[0]))


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
