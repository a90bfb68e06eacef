"""The options of a pruning call, validated once.

:class:`PruneOptions` is the one place where every option of :func:`~lightning_eigendamage.prune`
and of the :class:`~lightning_eigendamage.EigenDamagePruning` callback is checked: both build one
(the callback in its constructor, before training) and pass it down, so nothing is validated twice
and no module repeats the checks. Frozen: the callback's options cannot drift during a fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn

from .curvature import FISHER_TYPES, LIKELIHOODS
from .eigenbasis.criteria import criterion_names
from .eigenbasis.layers import FORMS
from .engine import engine_names, get_engine
from .values import as_int, as_real

TARGETS = ("directions", "params", "flops", "channels")
FORM_CHOICES = ("auto",) + FORMS
FORM_BY = ("cost", "latency")
LATENCY_FORMATS = ("model", "channels_last", "contiguous")
LATENCY_MODES = ("inference", "training")
RANK_BY = (
    "damage",
    "damage_per_cost",
    "relative",
    "relative_damage",
    "relative_per_latency",
    "damage_per_latency",
)
DEFAULT_STRUCTURE = "eigenbasis"  # of prune(); the callback's is its own


def normalise_exclude(exclude: Any) -> tuple[Any, ...]:
    """``exclude`` as a tuple of module instances, module types, glob strings and compiled regexes.

    Raises:
        TypeError: anything else, with what to pass instead.
    """
    if exclude is None:
        return ()
    if isinstance(exclude, (str, re.Pattern, type, nn.Module)):
        return (exclude,)
    try:
        items = tuple(exclude)
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


def _positive_int(name: str, value: Any) -> int:
    n = as_int(value)
    if n is None or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class PruneOptions:
    """Everything about *how* to prune, apart from *how much* (``ratio``) and the data.

    The meaning of each field is documented on :func:`~lightning_eigendamage.prune`. ``exclude``
    is stored normalised (a tuple); ``method`` names a criterion of the registry in
    :mod:`~lightning_eigendamage.criteria`.

    ``structure`` names the engine (:mod:`~lightning_eigendamage.engine`): ``"eigenbasis"``,
    ``"channels"`` or ``"auto"`` (decided with a model in hand: :meth:`resolved`). Options left
    at None (``layer_cap``, ``rank_by``) take the engine's default; values an engine does not
    accept (a form for channels, a ``rank_by`` of the other engine) are a ValueError here; for
    ``"auto"`` here only if no engine accepts them, else in :meth:`resolved` once the model has
    decided the structure (``prune`` and the callback then say which structure was chosen, and
    why, before anything is pruned or trained).

    Raises:
        ValueError / TypeError: at construction, for any bad value, saying what to pass.
    """

    method: str = "eigendamage"
    fisher: str = "true"
    target: str = "directions"
    loss_fn: Callable[[Any, Any], Any] | None = None
    input_fn: Callable[[Any], Any] | None = None
    forward_fn: Callable[[Any, Any], Any] | None = None
    exclude: Any = None
    exempt_last: bool = True
    layer_cap: float | None = None
    min_rank: int = 1
    form: str = "auto"
    train_rotations: bool = True
    likelihood: str = "categorical"
    class_dim: int = -1
    max_batches: int | None = None
    max_factor_dim: int | None = 16384
    seed: int = 0
    form_by: str = "cost"
    latency_batch: int = 64
    latency_format: str = "model"
    latency_mode: str = "inference"
    round_to: int = 1
    rank_by: str | None = None
    shots: int = 1
    recalibrate_bn: bool = True
    reconstruct: bool = False
    reconstruct_damping: float = 1e-4
    structure: str = DEFAULT_STRUCTURE
    damping: float = 1e-3
    greedy_steps: int | None = 32
    progress: bool = False

    def __post_init__(self) -> None:
        _one_of("method", self.method, criterion_names())
        _one_of("fisher", self.fisher, FISHER_TYPES)
        _one_of("likelihood", self.likelihood, LIKELIHOODS)
        _one_of("target", self.target, TARGETS)
        _one_of("form", self.form, FORM_CHOICES)
        _one_of("form_by", self.form_by, FORM_BY)
        _one_of("latency_format", self.latency_format, LATENCY_FORMATS)
        _one_of("latency_mode", self.latency_mode, LATENCY_MODES)
        _one_of("structure", self.structure, engine_names() + ("auto",))
        if self.loss_fn is not None and self.fisher != "empirical":
            raise ValueError(
                f"loss_fn is used only by fisher='empirical'; with fisher={self.fisher!r} the targets "
                "are sampled from the model's outputs (likelihood=...) and loss_fn would be ignored: "
                "pass fisher='empirical' with it, or leave it out"
            )
        if self.rank_by is not None:
            _one_of("rank_by", self.rank_by, RANK_BY)
        set_ = object.__setattr__  # frozen: numbers are stored as Python ints and floats
        damping = as_real(self.damping)
        if damping is None or not 0 < damping < float("inf"):
            raise ValueError(f"damping must be a finite number > 0, got {self.damping!r}")
        set_(self, "damping", damping)
        if self.greedy_steps is not None:
            set_(self, "greedy_steps", _positive_int("greedy_steps", self.greedy_steps))
        set_(self, "shots", _positive_int("shots", self.shots))
        d = as_real(self.reconstruct_damping)
        if d is None or not 0 <= d < float("inf"):
            raise ValueError(
                f"reconstruct_damping must be a finite number ≥ 0, got {self.reconstruct_damping!r}"
            )
        set_(self, "reconstruct_damping", d)
        if self.layer_cap is not None:
            cap = as_real(self.layer_cap)
            if cap is None or not 0.0 < cap <= 1.0:
                raise ValueError(f"layer_cap must be in (0, 1], got {self.layer_cap!r}")
            set_(self, "layer_cap", cap)
        min_rank = as_int(self.min_rank)
        if min_rank is None or min_rank < 1:
            raise ValueError(f"min_rank must be an integer ≥ 1, got {self.min_rank!r}")
        set_(self, "min_rank", min_rank)
        set_(self, "latency_batch", _positive_int("latency_batch", self.latency_batch))
        set_(self, "round_to", _positive_int("round_to", self.round_to))
        for name in ("max_batches", "max_factor_dim"):
            if getattr(self, name) is not None:
                set_(self, name, _positive_int(name, getattr(self, name)))
        for name in ("input_fn", "forward_fn", "loss_fn"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable or None, got {type(fn).__name__}")
        for name in ("seed", "class_dim"):
            value = as_int(getattr(self, name))
            if value is None:
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
            set_(self, name, value)
        if not 0 <= self.seed < 2**64:  # what torch.Generator.manual_seed takes, non-negative
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        object.__setattr__(self, "exclude", normalise_exclude(self.exclude))
        for name in ("exempt_last", "train_rotations", "recalibrate_bn", "reconstruct", "progress"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # "no" or 0.5 would silently count as True
                raise TypeError(f"{name} must be True or False, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.structure != "auto":
            self._resolve_in_place()
        else:  # some engine "auto" may choose must accept the options (which one: by the model)
            refusals = []
            for name in engine_names():
                try:
                    replace(self, structure=name)
                except ValueError as err:
                    refusals.append(str(err))
                else:
                    break
            else:
                raise ValueError("no structure takes these options: " + "; ".join(refusals))

    def _resolve_in_place(self) -> None:
        """Fill the engine's defaults and check the options it does not accept."""
        engine = get_engine(self.structure)
        for name, value in engine.defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name, allowed in engine.choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"{name}={value!r} does not apply to structure={self.structure!r}: "
                    f"it takes one of {allowed}"
                )
        defaults = {f.name: f.default for f in fields(self)}
        for name in engine.unused:
            if getattr(self, name) != defaults[name]:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} applies to other structures than "
                    f"{self.structure!r} and would be ignored: leave it at its default ({defaults[name]!r})"
                )

    def resolved(self, structure: str) -> PruneOptions:
        """These options for ``structure`` (an engine name; the one they name if not ``"auto"``)."""
        if self.structure not in ("auto", structure):
            raise ValueError(f"options for structure={self.structure!r} cannot be used for {structure!r}")
        return replace(self, structure=structure)

    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any], **overrides: Any) -> PruneOptions:
        """The options among ``arguments`` (e.g. a function's ``locals()``: other names are
        ignored), with ``overrides`` applied; fields absent from both keep their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in arguments.items() if k in names}, **overrides)
