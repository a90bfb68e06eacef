"""``prune()``: one function for every structure, for plain PyTorch users.

A thin front over the engines (:mod:`lightning_eigendamage.engine`): ``structure="eigenbasis"``
runs :func:`lightning_eigendamage.pruner.prune` (every option of it, ``shots`` and
``reconstruct`` included), ``"channels"`` the channel engine, ``"auto"`` channels where the
model's channel dependency graph can be built and the eigenbasis otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from torch import nn

from .channels import engine as _channels_engine  # noqa: F401  (registers the channel engine)
from .curvature import compiled_code_sees_hooks, first_batches, split_batch, to_device
from .discovery import unpruned_layers_note
from .distributed import check_process_group, rank_zero_input
from .eigenbasis import pruner
from .engine import auto_reason, get_engine, prepare
from .fallback import channels_with_eigenbasis
from .options import PruneOptions
from .report import PruneReport, PruningWarning, warn_user

_OPTION_FIELDS = {f.name for f in dataclasses.fields(PruneOptions)}


def prune(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    ratio: float,
    structure: str = "eigenbasis",
    options: PruneOptions | None = None,
    distributed: bool = False,
    **kwargs: Any,
) -> PruneReport:
    """Prune ``model`` in place and return a :class:`~lightning_eigendamage.PruneReport`.

    Args:
        model: the model, pruned in place (as for :func:`lightning_eigendamage.pruner.prune`,
            the eigenbasis engine, whose docstring describes every option).
        batches: calibration batches, as for :func:`lightning_eigendamage.pruner.prune`.
        ratio: the fraction to remove, as for :func:`lightning_eigendamage.pruner.prune`.
        structure: ``"eigenbasis"`` (default: every Conv2d/Linear rewritten in its eigenbasis,
            widths kept), ``"channels"`` (whole channels removed, layers stay plain and narrower;
            needs ``torch-pruning``) or ``"auto"`` (channels if the model's channel dependency
            graph can be built from the first batch and some group of it can change width, the
            eigenbasis otherwise, and also where channel pruning raises a ``RuntimeError`` (the
            model is put back first; not with ``distributed=True``); a
            :class:`~lightning_eigendamage.PruningWarning` says why when it falls back. Where
            the graph can be traced only part by part, the layers no traced part covers are
            pruned in their eigenbasis and the rest loses channels, the model as a whole meeting
            the target (``report.eigenbasis_layers`` lists them; :mod:`~lightning_eigendamage.fallback`).
        options: a :class:`~lightning_eigendamage.PruneOptions` instead of keyword options (its
            ``structure`` wins).
        distributed: call on every process of an initialised process group (see the engines).
        kwargs: the options (:class:`~lightning_eigendamage.PruneOptions` fields; for the
            eigenbasis also ``process_group``, ``captured`` and ``changes``). An option the
            structure does not use is a ValueError (e.g. ``form`` with channels).

    Returns:
        The report; ``report.structure`` says which structure was pruned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with compiled_code_sees_hooks(model):  # a torch.compile'd submodule calls the capture's hooks
        return _prune(model, batches, ratio, structure, options, distributed, kwargs)


def _prune(
    model: nn.Module,
    batches: Iterable[Any],
    ratio: float,
    structure: str,
    options: PruneOptions | None,
    distributed: bool,
    kwargs: dict[str, Any],
) -> PruneReport:
    """:func:`prune`'s body."""
    ratio = pruner.check_ratio(ratio)  # before anything runs, whichever structure takes it
    check_process_group(distributed)
    if options is not None:
        if not isinstance(options, PruneOptions):
            raise TypeError(f"options must be a PruneOptions or None, got {type(options).__name__}")
        structure = options.structure
    prepared, why = None, None  # the channel graph "auto" traced (reused), and why it chose
    auto, given = structure == "auto", options  # ("auto": channels that fail fall back)
    if auto:  # at most max_batches (a stream is never drawn further: it may not end)
        limit = options.max_batches if options is not None else kwargs.get("max_batches")
        batches = list(first_batches(batches, limit))
        structure, prepared, why = _auto(
            model, batches, options.resolved("channels") if options else None, kwargs, distributed
        )
        if options is not None:
            options = options.resolved(structure)
        elif structure == "eigenbasis":  # the options the chosen structure refuses: said as such
            _chosen(structure, why, lambda: PruneOptions(structure=structure, **_fields(kwargs)))
    if structure == "eigenbasis":
        return _eigenbasis(model, batches, ratio, options, distributed, kwargs, why)
    engine = get_engine(structure)
    if options is None:
        make = lambda: PruneOptions(structure=structure, **kwargs)  # noqa: E731
        options = _chosen(structure, why, make) if auto else make()
    elif kwargs:
        raise ValueError(f"pass the options either in options= or as keywords, not both ({sorted(kwargs)})")
    try:
        if auto:  # layers channels cannot reach (untraced, or a Conv1d): in their eigenbasis
            report, _ = channels_with_eigenbasis(
                model, batches, ratio, options, engine, distributed=distributed, prepared=prepared
            )
        else:
            report, _ = engine.prune(
                model, batches, ratio=ratio, options=options, distributed=distributed, prepared=prepared
            )
    except RuntimeError as err:  # the engine put the model back as it was
        if not auto or distributed:  # (distributed: every rank must take the same way)
            raise
        warn_user(
            f"prune(structure='auto') prunes the eigenbasis: channels failed on this model ({err})",
            PruningWarning,
        )
        why = auto_reason(f"they failed: {err}")
        fallback = (
            _chosen("eigenbasis", why, lambda: given.resolved("eigenbasis")) if given is not None else None
        )
        return _eigenbasis(model, batches, ratio, fallback, distributed, kwargs, why)
    report.structure_reason = why
    return report


def _fields(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that are :class:`PruneOptions` fields (not the eigenbasis' extras)."""
    return {k: v for k, v in kwargs.items() if k in _OPTION_FIELDS}


def _chosen(structure: str, why: str | None, make: Any) -> PruneOptions:
    """``make()`` (the options for the structure ``"auto"`` chose), a ValueError it raises saying
    which structure was chosen and why."""
    try:
        return make()
    except ValueError as err:
        raise ValueError(
            f"{err} (structure='auto' chose {structure!r} for this model: {why}; pass the structure "
            "explicitly, or options it accepts)"
        ) from None


def _eigenbasis(
    model: nn.Module,
    batches: Any,
    ratio: float,
    options: PruneOptions | None,
    distributed: bool,
    kwargs: dict[str, Any],
    why: str | None,
) -> PruneReport:
    """The eigenbasis engine's prune, its report saying why it was chosen (``why``)."""
    try:
        if options is None:  # an option of another structure (damping=): a ValueError, as documented
            PruneOptions(structure="eigenbasis", **_fields(kwargs))
        report = pruner.prune(model, batches, ratio=ratio, options=options, distributed=distributed, **kwargs)
    except ValueError as err:
        if not str(err).startswith("no prunable layer"):
            if why is None:
                raise
            raise ValueError(  # an option the eigenbasis refuses, say: which structure and why
                f"{err} (structure='auto' chose 'eigenbasis' for this model: {why}; pass the structure "
                "explicitly, or options it accepts)"
            ) from None
        text, note = str(err), unpruned_layers_note(model)
        if why is not None:  # "auto" came here because channels could not prune it either
            text = text.replace(note, "") if note and note in why else text  # said once
            raise ValueError(f"{text}; structure='auto' tried channels first: {why}") from None
        if text.startswith("no prunable layer: the model has no"):  # nor has it what channels prune
            raise ValueError(text) from None
        raise ValueError(
            f"{err}. structure='channels' (or 'auto') may prune it: it also removes the channels "
            "of depthwise and grouped convolutions, the feed-forward widths of Transformer "
            "layers and whole attention heads, which the eigenbasis leaves alone"
        ) from None
    report.structure_reason = why
    return report


def _auto(
    model: nn.Module,
    batches: list[Any],
    options: PruneOptions | None,
    kwargs: dict[str, Any],
    distributed: bool = False,
) -> tuple[str, Any, str]:
    """``("channels", graph, why)`` if the channel engine can prune ``model`` (its graph builds on
    the first batch), else ``("eigenbasis", None, why)`` with a warning that says why."""
    if not batches:
        raise ValueError("batches is empty: pruning needs at least one batch")
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters: nothing to prune")
    if options is None:
        options = PruneOptions(
            structure="channels", input_fn=kwargs.get("input_fn"), forward_fn=kwargs.get("forward_fn")
        )
    example = None  # with a forward_fn the check does not run: no input to find in the batch
    if options.forward_fn is None:
        example = to_device(split_batch(batches[0], options.input_fn)[0], params[0].device)
        if distributed:  # the check runs the model: every process checks rank 0's input
            example = rank_zero_input(example, params[0].device)
    prepared, reason = prepare("channels", model, example, options)
    if reason is None:
        return "channels", prepared, auto_reason(None, prepared)
    warn_user(
        f"prune(structure='auto') prunes the eigenbasis: channels are not possible here ({reason})",
        PruningWarning,
    )
    return "eigenbasis", None, auto_reason(reason)
