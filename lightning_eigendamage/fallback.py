"""``structure="auto"`` on a model whose channel graph covers only part of it (``prune()`` and
the callback's rounds).

Torch-Pruning traces a model part by part when the whole graph fails
(:mod:`lightning_eigendamage.channels.parts`); a layer in no part it could trace cannot lose
channels (:meth:`~lightning_eigendamage.engine.PruningEngine.unreachable` lists them with the
reason). Under ``structure="auto"`` those layers are pruned in their eigenbasis instead, and the
rest loses channels, so that the model as a whole meets the target:

1. the eigenbasis engine prunes the unreachable layers alone (every other module excluded), asked
   for their share of the target: with ``X`` the model's FLOPs (or parameters) and ``X_u`` the
   unreachable layers', it removes ``ratio · X_u`` (``ratio · X_u / X`` of the model). For a
   ``"channels"`` target it removes ``ratio`` of their eigen-directions. BatchNorm is not
   re-estimated here (the channel step does it once, at the end);
2. the channel engine prunes the rest (the rewritten layers excluded) for what is left:
   ``(ratio · X − E) / X₁`` of the model as it now is (``E`` removed by step 1, ``X₁`` what
   remains), so a layer the eigenbasis could not shrink (the last layer, under ``exempt_last``)
   is made up for by channels, as when it was left whole;
3. where the channel step could not remove its part (every group at its cap), ``prune()`` prunes
   the unreachable layers again in their eigenbasis for what the target still lacks (factors
   captured anew; not in the callback, whose factors are those from before the round);
4. one report: the channel step's, counted from the original model, with the rewritten layers'
   entries from the eigenbasis step and :attr:`~lightning_eigendamage.PruneReport.eigenbasis_layers`
   saying which layers were rewritten and why.

The callback runs both steps on the factors it captured during the epoch (the unreachable
layers' among them, in the channel engine's patch form; :func:`~.curvature.channel_form` gives
the eigenbasis its channel form, exactly) and carries the optimizer state across both
(:class:`MixedChange`, :func:`carry_optimizer_state`).

All or nothing: if the channel step fails, the rewritten layers are put back (the original
modules, untouched by step 1) and the error propagates, so that ``prune`` can fall back to the
eigenbasis for the whole model as it does when channels fail. If step 1 fails or has nothing to
prune, the layers stay whole, with a warning, and the channel step runs as if it had not been tried.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from .costs import count_flops, count_layer_flops
from .curvature import CaptureResult, channel_form, split_batch, to_device
from .eigenbasis.layers import KFELayer
from .engine import PruningEngine, get_engine
from .options import PruneOptions
from .report import TARGET_TOLERANCE, PruneReport, PruningWarning, TargetNotReachedWarning, warn_user

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from .optim import TransplantReport


@dataclass
class MixedChange:
    """What a round of :func:`channels_with_eigenbasis` changed: the eigenbasis engine's change
    of the rewritten layers (None if none was) and the channel engine's change of the rest."""

    eigen: Any
    channels: Any


def channels_with_eigenbasis(
    model: nn.Module,
    batches: list[Any],
    ratio: float,
    options: PruneOptions,
    engine: PruningEngine,
    *,
    distributed: bool = False,
    prepared: Any = None,
    captured: CaptureResult | None = None,
) -> tuple[PruneReport, MixedChange]:
    """``engine.prune`` (the channel engine, ``options`` resolved for it), with the layers it
    cannot reach (``engine.unreachable(model, prepared)``) pruned in their eigenbasis first
    (see the module docstring). ``captured``: factors already accumulated (the callback's, in
    the channel engine's form, the unreachable layers' among them), used by both steps; else
    each step captures its own on ``batches``. Without such layers, ``engine.prune`` alone."""
    unreachable = unreachable_layers(engine, model, prepared)
    names = sorted(unreachable)
    if captured is not None:  # the layers whose factors were captured
        names = [n for n in names if n in captured.layers and captured.layers[n].unusable() is None]
    originals = {name: model.get_submodule(name) for name in names}
    first = _eigenbasis_step(model, batches, ratio, options, names, distributed, captured) if names else None
    if first is None:  # nothing to rewrite, or nothing rewritten: the channel step alone
        report, change = engine.prune(
            model,
            batches,
            ratio=ratio,
            options=options,
            captured=captured,
            distributed=distributed,
            prepared=prepared,
        )
        return report, MixedChange(None, change)
    eigen, eigen_change = first
    rewritten = [n for n in names if model.get_submodule(n) is not originals[n]]
    kept = [model.get_submodule(n) for n in rewritten]
    channel_options = dataclasses.replace(
        options, exclude=(*options.exclude, *(m for layer in kept for m in layer.modules()))
    )
    rest = _channel_ratio(ratio, options.target, eigen)
    if captured is not None:  # the rewritten layers' factors are not the channel step's
        captured = dataclasses.replace(
            captured, layers={k: v for k, v in captured.layers.items() if k not in rewritten}
        )
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report, change = engine.prune(
                model,
                batches,
                ratio=rest,
                options=channel_options,
                captured=captured,
                distributed=distributed,
            )
    except BaseException:
        _replay(caught)
        for name in rewritten:  # the channel engine put back what it changed; this puts back ours
            model.set_submodule(name, originals[name])
        raise
    _replay(caught)  # (its target is a part of the whole one: said below if the whole is missed)
    merged = _merged(report, eigen, ratio, {n: unreachable[n] for n in rewritten})
    if captured is None and not merged.target_reached and merged.target in ("flops", "params"):
        merged = _topped_up(model, batches, options, names, distributed, merged, unreachable)
    if not merged.target_reached:
        warn_user(
            f"removed {merged.reached:.3f} of the {merged.target} for a ratio of {ratio:.3f} "
            f"(channels, and {len(merged.eigenbasis_layers)} layer(s) in their eigenbasis): "
            f"{merged.limited_by or 'the channel groups and the eigenbasis layers are exhausted'}",
            TargetNotReachedWarning,
        )
    return merged, MixedChange(eigen_change, change)


def _topped_up(
    model: nn.Module,
    batches: list[Any],
    options: PruneOptions,
    names: list[str],
    distributed: bool,
    report: PruneReport,
    unreachable: dict[str, str],
) -> PruneReport:
    """Where the channel step could not remove its part (its groups exhausted), the unreachable
    layers ``names`` pruned again in their eigenbasis for what the target still lacks (factors
    captured anew on ``batches``); ``report`` brought up to date. Not in the callback, whose
    factors are those of the layers before the round."""
    before, after = _totals(report, report.target)
    lacking = report.ratio * before - (before - after)
    if lacking <= 0 or after <= 0:
        return report
    step = _eigenbasis_step(
        model, batches, report.ratio, options, names, distributed, None, share=lacking / after
    )
    if step is None:
        return report
    more, _ = step
    again = {r.name for r in more.layers if r.name in names and r.skipped is None}
    report.layers = [r for r in report.layers if r.name not in again] + [
        r for r in more.layers if r.name in again
    ]
    report.eigenbasis_layers = {**report.eigenbasis_layers, **{n: unreachable[n] for n in again}}
    report.skipped = {k: v for k, v in report.skipped.items() if k not in again}
    report.params_after, report.flops_after = more.params_after, more.flops_after
    return _recounted(report)


def carry_optimizer_state(
    engine: PruningEngine,
    model: nn.Module,
    old_optimizers: Sequence[Optimizer],
    new_optimizers: Sequence[Optimizer],
    change: MixedChange,
) -> TransplantReport:
    """The optimizers' state carried across both steps of ``change``: the channel engine's carry
    (every parameter it sliced or kept), then the eigenbasis engine's for the rewritten layers
    (their new parameters from the old layer's state)."""
    report = engine.carry_optimizer_state(model, old_optimizers, new_optimizers, change.channels)
    if change.eigen:
        eigen = get_engine("eigenbasis").carry_optimizer_state(
            model, old_optimizers, new_optimizers, change.eigen
        )
        report.carried += eigen.carried  # (its ``kept`` counts the untouched parameters again)
        report.reset.update(eigen.reset)
    return report


def replaced_parameters(
    engine: PruningEngine, change: MixedChange
) -> list[tuple[str, list[nn.Parameter], list[nn.Parameter]]]:
    """Per changed layer or parameter of either step: its name, its old and its new parameters."""
    out = list(engine.replaced_parameters(change.channels))
    if change.eigen:
        out += get_engine("eigenbasis").replaced_parameters(change.eigen)
    return out


def unreachable_layers(engine: PruningEngine, model: nn.Module, prepared: Any) -> dict[str, str]:
    """``engine.unreachable(model, prepared)`` but the stages of layers already rewritten in their
    eigenbasis (such a layer is pruned again as a whole, by the eigenbasis engine's own rounds):
    the layers this module prunes in their eigenbasis, with the reason."""
    return {n: why for n, why in engine.unreachable(model, prepared).items() if _plain(model, n)}


def _plain(model: nn.Module, name: str) -> bool:
    """Whether the layer ``name`` is in no eigenbasis layer (a rewritten layer's stages are
    pruned again as that layer, not one by one)."""
    parts = name.split(".")
    return not any(
        isinstance(model.get_submodule(".".join(parts[:i])), KFELayer) for i in range(1, len(parts))
    )


def _eigenbasis_step(
    model: nn.Module,
    batches: list[Any],
    ratio: float,
    options: PruneOptions,
    names: list[str],
    distributed: bool,
    captured: CaptureResult | None,
    *,
    share: float | None = None,
) -> tuple[PruneReport, Any] | None:
    """The unreachable layers ``names`` pruned in their eigenbasis for their share of the target
    (``share`` of the model, if given): its report and change, or None (a warning says why where
    that failed) if nothing changed."""
    target = "directions" if options.target == "channels" else options.target
    if share is None and target not in ("flops", "params"):
        share = ratio
    elif share is None:
        example = to_device(split_batch(batches[0], options.input_fn)[0], next(model.parameters()).device)
        if target == "flops":
            total = count_flops(model, example, options.forward_fn)
            part = sum(count_layer_flops(model, example, names, options.forward_fn).values())
        else:
            total = sum(p.numel() for p in model.parameters())
            part = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
        share = ratio * part / max(total, 1)
    if share <= 0.0:
        return None
    inside = {m for n in names for m in model.get_submodule(n).modules()}
    outside = [
        m
        for name, m in model.named_modules()
        if name and m not in inside and not any(_encloses(name, n) for n in names)
    ]
    eigen = get_engine("eigenbasis")
    reset = {name: None for name in eigen.defaults}  # the eigenbasis' own defaults (caps, ranking)
    reset.update({f.name: f.default for f in dataclasses.fields(PruneOptions) if f.name in eigen.unused})
    eigen_options = dataclasses.replace(
        options,
        **reset,
        structure="eigenbasis",
        target=target,
        exclude=(*options.exclude, *outside),
        recalibrate_bn=False,
    )
    if captured is not None:  # the callback's factors, in the eigenbasis' form of A
        captured = channel_form(captured, names, {n: model.get_submodule(n) for n in names})
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report, change = eigen.prune(
                model, batches, ratio=share, options=eigen_options, captured=captured, distributed=distributed
            )
    except (RuntimeError, ValueError) as err:
        _replay(caught)
        if str(err).startswith("no prunable layer"):  # e.g. the last layer, under exempt_last
            return None
        warnings.warn(
            f"prune(structure='auto'): {len(names)} layer(s) the channel graph cannot cover are left "
            f"whole: pruning them in their eigenbasis failed ({err})",
            PruningWarning,
            stacklevel=4,
        )
        return None
    _replay(caught)
    if not any(r.name in names and r.skipped is None for r in report.layers):
        return None
    return report, change


def _encloses(outer: str, inner: str) -> bool:
    """Whether module ``outer`` holds module ``inner`` (qualified names)."""
    return inner.startswith(outer + ".")


def _replay(caught: list[warnings.WarningMessage]) -> None:
    """Emit again what a step warned, but about its own target (a part of the whole one, whose
    outcome :func:`channels_with_eigenbasis` says)."""
    for w in caught:
        if not issubclass(w.category, TargetNotReachedWarning):
            warnings.warn(w.message, w.category, stacklevel=5)


def _channel_ratio(ratio: float, target: str, eigen: PruneReport) -> float:
    """What the channel step must remove, as a fraction of the model after the eigenbasis step."""
    if target not in ("flops", "params"):
        return ratio
    before, after = _totals(eigen, target)
    left = ratio * before - (before - after)  # what the whole target still needs removed
    return min(max(left / max(after, 1), 0.0), 0.999)


def _merged(report: PruneReport, eigen: PruneReport, ratio: float, why: dict[str, str]) -> PruneReport:
    """The channel step's report counted from the original model (the eigenbasis step's
    ``*_before``), with the rewritten layers ``why`` reported by the eigenbasis step."""

    def within(name: str) -> bool:
        bare = name.removeprefix("group of ").removeprefix("heads of ")
        return any(bare == n or _encloses(n, bare) for n in why)

    report.params_before, report.flops_before = eigen.params_before, eigen.flops_before
    report.ratio = ratio
    report.layers = [r for r in report.layers if not within(r.name)] + [
        r for r in eigen.layers if r.name in why
    ]
    report.skipped = {k: v for k, v in report.skipped.items() if not within(k)}
    report.eigenbasis_layers = dict(why)
    return _recounted(report)


def _totals(report: PruneReport, target: str) -> tuple[int, int]:
    """``(before, after)`` of ``report`` in the unit of a ``"flops"``/``"params"`` target."""
    if target == "flops":
        return report.flops_before, report.flops_after
    return report.params_before, report.params_after


def _recounted(report: PruneReport) -> PruneReport:
    """``report`` with ``reached`` and ``target_reached`` (and ``limited_by``, once reached)
    counted again from its totals, for a ``"flops"``/``"params"`` target (a ``"channels"``
    target's are the channel step's)."""
    if report.target in ("flops", "params"):
        before, after = _totals(report, report.target)
        report.reached = 1.0 - after / max(before, 1)
        report.target_reached = report.reached >= report.ratio - TARGET_TOLERANCE
        if report.target_reached:
            report.limited_by = None
    return report
