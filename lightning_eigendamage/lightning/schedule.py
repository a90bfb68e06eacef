"""When the :class:`~lightning_eigendamage.EigenDamagePruning` callback prunes, and by how much.

A schedule is a list of *prune points*. Each point removes ``fraction`` of what remains, measured
in ``target`` units:

- ``"directions"``: ``fraction`` is the global quantile of the pooled eigen-direction scores (as
  ``prune(ratio=...)``); the realised fraction of removed directions is at most
  ``fraction + 1/n`` for ``n`` pooled directions.
- ``"params"`` / ``"flops"``: ``fraction`` of the model's current parameters / FLOPs is removed
  (the global threshold that meets it is found by bisection).
- ``"channels"`` (``structure="channels"`` only, where it is what ``"directions"`` counts):
  ``fraction`` of the prunable channels is removed.

Fractions compose multiplicatively: ``{2: 0.5, 4: 0.5}`` with ``target="flops"`` keeps
``(1 − 0.5)·(1 − 0.5) = 25 %`` of the FLOPs.

Points are epoch ends (0-based ``current_epoch``), optimizer steps (``global_step``), or the start
of ``fit`` (one-shot pruning of an already trained model): :class:`EpochPoint`, :class:`StepPoint`
and :class:`StartPoint`. Each point knows its own timing: given a :class:`LoopState` (a plain-data
snapshot of the training loop) it answers whether the current batch feeds its capture and whether
its round is due, so the callback loops over the points without knowing their kinds. This module
is plain Python: it never imports Lightning, and the schedule is validated completely before
training starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..values import as_int, as_real

TARGETS = ("directions", "params", "flops", "channels")
_OBJECT_KEYS = ("epochs", "steps", "at_start", "fisher_batches", "fisher_examples", "target")
_EXAMPLE = "e.g. schedule={1: 0.5} (prune 50 % at the end of epoch 1) or PruningSchedule(epochs={1: 0.5})"


@dataclass(frozen=True)
class LoopState:
    """Where the training loop stands, as prune points read it: plain data, no Lightning.

    The callback builds one snapshot at the start of each hook, before that hook's own capture
    (so ``captured_*`` count the batches before the current one).

    Attributes:
        epoch: ``trainer.current_epoch`` (0-based).
        batch_idx: index of the current batch in its epoch (-1 outside a batch, e.g. at epoch end).
        batches_per_epoch: ``trainer.num_training_batches``; ``inf`` for a loader without a length.
        step_at_batch_start: ``trainer.global_step`` when the current batch started; the batch
            contributes to optimizer step ``step_at_batch_start + 1``.
        global_step: ``trainer.global_step`` now (after the batch's optimizer step, at batch end).
        accumulate: ``trainer.accumulate_grad_batches`` (values below 1 count as 1).
        captured_in_window: batches captured for the next round so far on this process, finite and
            non-finite (skipped) ones alike.
        captured_this_epoch: batches captured in the current epoch on this process.
        fisher_batches: the schedule's capture budget per round (``None``: every batch).
    """

    epoch: int = 0
    batch_idx: int = -1
    batches_per_epoch: float = math.inf
    step_at_batch_start: int = 0
    global_step: int = 0
    accumulate: int = 1
    captured_in_window: int = 0
    captured_this_epoch: int = 0
    fisher_batches: int | None = 16

    @property
    def stepped(self) -> bool:
        """True when the optimizer stepped during the current batch."""
        return self.global_step > self.step_at_batch_start


_KINDS: dict[str, type[PrunePoint]] = {}


class _PointMeta(type):
    """Keeps the base class's old constructor: ``PrunePoint("epoch", 3, 0.5)`` builds an
    :class:`EpochPoint` (through the ``kind`` registry); subclasses construct as usual."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is PrunePoint:
            return _point_of_kind(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def _point_of_kind(kind: str, at: int, fraction: float) -> PrunePoint:
    try:
        point_class = _KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown prune point kind {kind!r}; known kinds: {sorted(_KINDS)}") from None
    return point_class(at, fraction)


@dataclass(frozen=True)
class PrunePoint(metaclass=_PointMeta):
    """One scheduled pruning round: removes ``fraction`` of what remains at ``at``.

    Subclasses (one per ``kind``: :class:`StartPoint`, :class:`EpochPoint`, :class:`StepPoint`)
    answer, from a :class:`LoopState`, when they capture curvature and when they are due; the
    callback only asks. The base answers *never* to every question. ``PrunePoint(kind, at,
    fraction)`` builds the subclass registered for ``kind``.

    Attributes:
        at: the epoch or step of the point (0 for the start of fit).
        fraction: share of what remains that the round removes.
        kind: ``"start"``, ``"epoch"`` or ``"step"`` (a class attribute).
        waits_for_factors: when due with no factors captured (summed over the processes), the
            point waits for its next due moment instead of being skipped (a class attribute).
    """

    at: int
    fraction: float
    kind: ClassVar[str] = ""
    waits_for_factors: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind:  # a subclass that names a kind registers it for PrunePoint(kind, at, fraction)
            known = _KINDS.get(kind)
            if known is not None and (known.__module__, known.__qualname__) != (
                cls.__module__,
                cls.__qualname__,
            ):
                raise ValueError(f"prune point kind {kind!r} is already taken by {known.__qualname__}")
            _KINDS[kind] = cls

    @property
    def key(self) -> str:
        """Stable plain-data id of the round (``"epoch:3"``, ``"step:500"``, ``"start"``), as
        checkpoints store it."""
        return f"{self.kind}:{self.at}"

    def describe(self) -> str:
        """Where the round happens, for logs (``"end of epoch 3"``)."""
        return self.key

    def wants_capture(self, state: LoopState) -> bool:
        """Whether the current training batch feeds this point's curvature factors."""
        return False

    def due_at_batch_end(self, state: LoopState) -> bool:
        """Whether the round runs at the end of the current training batch."""
        return False

    def due_at_epoch_end(self, state: LoopState) -> bool:
        """Whether the round runs at the end of the current training epoch."""
        return False

    def due_at_fit_start(self) -> bool:
        """Whether the round runs at the start of ``fit``, on factors from its own pass over the
        first ``fisher_batches`` training batches."""
        return False


@dataclass(frozen=True)
class StartPoint(PrunePoint):
    """One-shot pruning at the start of ``fit`` (``at`` is 0)."""

    kind: ClassVar[str] = "start"

    @property
    def key(self) -> str:
        """``"start"``."""
        return "start"

    def describe(self) -> str:
        """``"start of fit"``."""
        return "start of fit"

    def due_at_fit_start(self) -> bool:
        """Always: the start point prunes before the first training batch."""
        return True


@dataclass(frozen=True)
class EpochPoint(PrunePoint):
    """Pruning at the end of (0-based) epoch ``at``, with factors from that epoch."""

    kind: ClassVar[str] = "epoch"

    def describe(self) -> str:
        """``"end of epoch 3"``."""
        return f"end of epoch {self.at}"

    def wants_capture(self, state: LoopState) -> bool:
        """In epoch ``at`` only: the last ``fisher_batches`` batches of the epoch, or the first
        ones when the loader has no length; every batch when ``fisher_batches`` is None."""
        if state.epoch != self.at:
            return False
        k = state.fisher_batches
        if k is None:
            return True
        n = state.batches_per_epoch
        if math.isfinite(n):
            return state.batch_idx >= n - k
        return state.captured_this_epoch < k

    def due_at_epoch_end(self, state: LoopState) -> bool:
        """At the end of epoch ``at``."""
        return state.epoch == self.at


@dataclass(frozen=True)
class StepPoint(PrunePoint):
    """Pruning after ``at`` optimizer steps, with factors captured since the previous round."""

    kind: ClassVar[str] = "step"
    waits_for_factors: ClassVar[bool] = True

    def describe(self) -> str:
        """``"step 500"``."""
        return f"step {self.at}"

    def wants_capture(self, state: LoopState) -> bool:
        """Up to ``fisher_batches`` batches (counted over the window) of the last
        ``ceil(fisher_batches / accumulate)`` optimizer steps before ``at``, and every batch once
        step ``at`` is reached and the point still waits; every batch when ``fisher_batches``
        is None."""
        step = state.step_at_batch_start  # this batch contributes to step `step + 1`
        k = state.fisher_batches
        if step >= self.at or k is None:
            return True
        per_step = max(1, state.accumulate)
        return step >= self.at - math.ceil(k / per_step) and state.captured_in_window < k

    def due_at_batch_end(self, state: LoopState) -> bool:
        """At the first batch end with ``global_step ≥ at`` where the optimizer stepped (the
        callback then waits further while no factors were captured: ``waits_for_factors``)."""
        return state.stepped and state.global_step >= self.at


def _check_fraction(value: Any, where: str) -> float:
    number = as_real(value)
    if number is None or not math.isfinite(number) or not 0.0 <= number < 1.0:
        raise ValueError(
            f"schedule fraction {where} must be a number in [0, 1), got {value!r}; it is the share of "
            "what remains that is removed (0.5 removes half), so 1 or more would remove everything"
        )
    return number


class _Points(dict):
    """``{point: fraction}``, checked once and read-only after (a frozen schedule whose points
    could still be changed would prune by values it never checked); hashable, picklable."""

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "a PruningSchedule's points are read-only once checked; build a new schedule "
            "(dataclasses.replace(schedule, epochs={...}))"
        )

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]
    __ior__ = _read_only  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))

    def __reduce__(self) -> Any:
        return (_Points, (dict(self),))

    def __copy__(self) -> _Points:
        return self

    def __deepcopy__(self, memo: dict) -> _Points:
        return self


def _check_points(points: Any, unit: str, minimum: int) -> dict[int, float]:
    if not isinstance(points, Mapping):
        raise TypeError(
            f"PruningSchedule({unit}s=...) takes a dict {{{unit}: fraction}}, got {type(points).__name__}"
        )
    out = {}
    for key, fraction in points.items():
        at = as_int(key)
        if at is None:
            raise TypeError(
                f"schedule keys are {unit} numbers (int ≥ {minimum}), got {key!r} "
                f"({type(key).__name__}); {_EXAMPLE}"
            )
        if at < minimum:
            raise ValueError(f"schedule {unit} must be an integer ≥ {minimum}, got {at}; {_EXAMPLE}")
        out[at] = _check_fraction(fraction, f"for {unit} {at}")
    return _Points(sorted(out.items()))


@dataclass(frozen=True)
class PruningSchedule:
    """Prune points, the curvature budget and the unit of the fractions.

    Args:
        epochs: ``{epoch: fraction}``: at the end of that (0-based) epoch, prune with factors
            accumulated during that epoch.
        steps: ``{global_step: fraction}``: after that many optimizer steps (at the first batch end
            where ``trainer.global_step ≥ step``), prune with factors accumulated since the
            previous round (or the start of training).
        at_start: one-shot pruning at the start of ``fit`` (for an already trained model), with
            factors from the first ``fisher_batches`` batches of the training data (all if None).
        fisher_batches: accumulate factors on at most this many training batches per round (per
            process under DDP): the last ones before an epoch-end or step point (the first ones of
            the epoch when the dataloader has no length), so a pruning epoch pays the capture on
            only a few batches. The default, 16, keeps the overhead of a 391-batch CIFAR epoch
            under 5 % (``benchmarks/speed.py``); ``None``: every batch of the window (the paper's
            one pass over the training set).
        fisher_examples: of each captured batch, at most this many examples feed the factors
            (every ``s``-th, ``s = ⌈N / fisher_examples⌉``): the sampled pass of the true Fisher
            runs on those examples alone, and the factor products of the empirical Fisher (in
            your own training step) read only their rows. ``"auto"`` (default): the engine's
            choice, 32 for ``"channels"`` (its choices stay as good, ``benchmarks/
            fisher_examples.py``, and the capture costs a quarter), each conv's patch-form ``A``
            then read from every other column of its output map (as good again, ``benchmarks/
            fisher_columns.py``; ``KFACapture(a_columns=2)``), and every example for
            ``"eigenbasis"`` (its eigenvalue ranking loses accuracy on fewer); ``None``: every
            example (and column); an integer: that many examples, every column.
        target: ``"directions"`` (default), ``"params"``, ``"flops"`` or ``"channels"`` (the
            channel engine's own count, which ``"directions"`` means there): what ``fraction``
            counts. The structure must accept it (checked by the callback at construction).

    Raises:
        ValueError: at construction, for any bad value (see :meth:`validate_for` for the checks
            against the Trainer).
        TypeError: at construction, for a value of the wrong type.
    """

    epochs: Mapping[int, float] = field(default_factory=dict)
    steps: Mapping[int, float] = field(default_factory=dict)
    at_start: float | None = None
    fisher_batches: int | None = 16
    fisher_examples: int | str | None = "auto"
    target: str = "directions"

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", _check_points(self.epochs, "epoch", 0))
        object.__setattr__(self, "steps", _check_points(self.steps, "step", 1))
        if self.at_start is not None:
            object.__setattr__(self, "at_start", _check_fraction(self.at_start, "at_start"))
        fb = self.fisher_batches
        if fb is not None:
            n = as_int(fb)
            if n is None or n < 1:
                raise ValueError(f"fisher_batches must be an integer ≥ 1 or None (every batch), got {fb!r}")
            object.__setattr__(self, "fisher_batches", n)
        fe = self.fisher_examples
        if fe is not None and fe != "auto":
            n = as_int(fe)
            if n is None or n < 1:
                raise ValueError(
                    f"fisher_examples must be an integer ≥ 1, 'auto' or None (every example), got {fe!r}"
                )
            object.__setattr__(self, "fisher_examples", n)
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if not self.epochs and not self.steps and self.at_start is None:
            raise ValueError(f"the pruning schedule is empty: give at least one prune point; {_EXAMPLE}")

    @classmethod
    def from_any(cls, schedule: Any) -> PruningSchedule:
        """A schedule from a :class:`PruningSchedule`, ``{epoch: fraction}``, or a dict of this
        class's fields (``{"steps": {...}, "fisher_batches": 32}``)."""
        if isinstance(schedule, PruningSchedule):
            return schedule
        if not isinstance(schedule, Mapping):
            raise TypeError(
                f"schedule must be a dict {{epoch: fraction}} or a PruningSchedule, got "
                f"{type(schedule).__name__}; {_EXAMPLE}"
            )
        if not schedule:
            raise ValueError(f"the pruning schedule is empty: give at least one prune point; {_EXAMPLE}")
        str_keys = [k for k in schedule if isinstance(k, str)]
        if str_keys:
            unknown = [k for k in str_keys if k not in _OBJECT_KEYS]
            if unknown or len(str_keys) != len(schedule):
                bad = unknown or [k for k in schedule if not isinstance(k, str)]
                raise ValueError(
                    f"unknown schedule key(s) {bad!r}: a schedule dict is either {{epoch: fraction}} "
                    f"with integer epochs, or uses only the keys {list(_OBJECT_KEYS)}; {_EXAMPLE}"
                )
            return cls(**schedule)
        return cls(epochs=schedule)

    def points(self) -> list[PrunePoint]:
        """All rounds, as :class:`PrunePoint` objects: the start point first, then epoch and step
        points in their own (sorted) order."""
        pts: list[PrunePoint] = [StartPoint(0, self.at_start)] if self.at_start is not None else []
        pts += [EpochPoint(e, f) for e, f in self.epochs.items()]
        pts += [StepPoint(s, f) for s, f in self.steps.items()]
        return pts

    def validate_for(self, max_epochs: int | None, max_steps: int | None) -> list[str]:
        """Check the points against the Trainer's limits; returns warnings (raises on errors).

        Args:
            max_epochs: ``trainer.max_epochs`` (None or -1: unlimited).
            max_steps: ``trainer.max_steps`` (None or -1: unlimited).

        Raises:
            ValueError: an epoch point at or beyond ``max_epochs``, or a step point beyond
                ``max_steps``: that round would never run.
        """
        warnings = []
        if max_epochs is not None and max_epochs >= 0:
            late = [e for e in self.epochs if e >= max_epochs]
            if late:
                raise ValueError(
                    f"the schedule prunes at the end of epoch(s) {late}, but Trainer(max_epochs="
                    f"{max_epochs}) only runs epochs 0..{max_epochs - 1} (epochs are 0-based); pass "
                    f"epochs below {max_epochs} or raise max_epochs"
                )
            if max_epochs - 1 in self.epochs:
                warnings.append(
                    f"the schedule prunes at the end of the last epoch ({max_epochs - 1}): the "
                    "pruned model gets no fine-tuning in this fit"
                )
        if max_steps is not None and max_steps >= 0:
            late = [s for s in self.steps if s > max_steps]
            if late:
                raise ValueError(
                    f"the schedule prunes at step(s) {late}, but Trainer(max_steps={max_steps}) stops "
                    f"before; pass steps up to {max_steps} or raise max_steps"
                )
        return warnings

    def validate_steps(self, total_steps: float, done: Any = ()) -> list[str]:
        """Check step points against the run's total optimizer steps; returns warnings.

        Args:
            total_steps: optimizer steps the run will take (``inf`` or NaN when unknown, e.g. an
                iterable dataset without a length and no ``max_steps``).
            done: keys of rounds already done (resumed runs), not checked.

        Raises:
            ValueError: a step point beyond ``total_steps``: that round would never run.
        """
        pending = [s for s in self.steps if f"step:{s}" not in set(done)]
        if not pending:
            return []
        if not math.isfinite(total_steps):
            return [
                f"the run's length is unknown (no max_steps and a training dataloader without a "
                f"length), so step points {pending} cannot be checked against it: a point the run "
                "never reaches does not prune"
            ]
        late = [s for s in pending if s > total_steps]
        if late:
            raise ValueError(
                f"the schedule prunes at step(s) {late}, but this run takes only {int(total_steps)} "
                "optimizer step(s) (max_epochs × batches per epoch / accumulate_grad_batches, or "
                f"max_steps): those rounds would never run; pass steps up to {int(total_steps)} or "
                "train longer"
            )
        return []
