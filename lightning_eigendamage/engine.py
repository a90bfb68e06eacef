"""What a pruning engine is, and the registry of engines.

The library prunes in two structures, each an *engine*: ``"eigenbasis"`` (every Conv2d/Linear
rewritten in its Kronecker-factored eigenbasis, eigen-directions removed:
:mod:`lightning_eigendamage.pruner`) and ``"channels"`` (whole channels removed, scored and
compensated with input-side Kron-OBS: :mod:`lightning_eigendamage.channels`). The callback,
:func:`~lightning_eigendamage.prune` and :func:`~lightning_eigendamage.prune_channels` drive
either through the steps below, so none of them knows which engine it runs:

1. ``candidates`` and ``a_form``: which layers to capture K-FAC factors on, and the form of
   ``A`` the engine's scores need (``"channel"``: ``C_in × C_in``; ``"patch"``:
   ``C_in·k² × C_in·k²``); ``factor_layers``: those whose factors the scores read (the channel
   engine's: the readers of the groups that can change width), the others only seen to run;
   ``capture_examples`` and ``capture_columns``: how many examples of each training batch, and
   every how many output columns of a conv's map in the patch form of ``A``, the callback's
   capture reads by default (``PruningSchedule(fisher_examples="auto")``).
2. ``check``: before training, whether the engine can prune this model at all (the channel
   engine needs a dependency graph); raises with the reason. What it built (the channel
   engine's traced graph) is returned, and ``analyse`` reuses it while it still describes the
   model, so the callback traces once, on its probe batch, not at every round.
3. ``analyse``: factors (captured here if not given, all-reduced over processes when
   ``distributed``) → scores and whatever ``apply`` will need.
4. ``decide``: the plan, frozen plain data (``to_dict``/``from_dict``); under ``distributed``
   rank 0's plan is broadcast so every process applies the same one.
5. ``apply``: the plan applied in place, all or nothing (a failure anywhere leaves the model as it
   was), BatchNorm re-estimated; returns the one report type
   (:class:`~lightning_eigendamage.PruneReport`) and a *change* object that says where every new
   parameter came from.
6. ``carry_optimizer_state``: the old optimizers' state moved onto the new parameters through
   that change (rotated and sliced for the eigenbasis, sliced for channels).
7. ``marked_layers`` (optional): what a plan would remove, for the training-time penalty of
   gradual removal before a round (eigen-coordinates for the eigenbasis, the readers' input
   columns of the removed channels for channels).

Checkpoints of either engine load through the same hook
(:func:`~lightning_eigendamage.enable_pruned_loading`): eigenbasis layers carry a record of
their architecture, narrowed layers are described by their tensors' shapes.

Adding an engine: subclass :class:`PruningEngine` in the engine's own module and call
:func:`register_engine` there; the package's ``__init__`` imports that module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from .progress import progress_of
from .values import as_real

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from .curvature import CaptureResult
    from .discovery import Candidate
    from .gradual import MarkedLayer
    from .optim import TransplantReport
    from .options import PruneOptions
    from .report import PruneReport


class PruningEngine(ABC):
    """One structure of pruning, driven step by step (see the module docstring)."""

    name: ClassVar[str]
    a_form: ClassVar[str]
    # At most this many examples of each captured training batch feed the callback's factors
    # under PruningSchedule(fisher_examples="auto") (None: every example).
    capture_examples: ClassVar[int | None] = None
    # ... and a conv's patch-form A reads every capture_columns-th column of its output map
    # (KFACapture(a_columns=...)); 1: every column.
    capture_columns: ClassVar[int] = 1
    # Options (fields of PruneOptions): the engine's values for those left at None, the values it
    # accepts, and those it does not use (they must keep their defaults).
    defaults: ClassVar[dict[str, Any]] = {}
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    unused: ClassVar[tuple[str, ...]] = ()
    # Reasons (``Candidate.skipped``) of layers that are not scored themselves but change with
    # the layers they follow (the channel engine's depthwise convs): never reported as left alone.
    followers: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def candidates(self, model: nn.Module, options: PruneOptions) -> list[Candidate]:
        """Every layer whose factors may be captured, with the reason for each one that will
        not be pruned (``Candidate.skipped``); ``hook_module`` is where the hooks go."""

    def factor_layers(
        self, model: nn.Module, candidates: Sequence[Candidate], options: PruneOptions, prepared: Any = None
    ) -> list[str]:
        """The names of the ``candidates`` whose K-FAC factors :meth:`analyse` reads: a capture
        computes factors for these and only sees the others run. ``prepared``: what
        :meth:`check` returned. The default: every candidate that is not skipped."""
        return [c.name for c in candidates if c.skipped is None]

    def check(self, model: nn.Module, example: Any, options: PruneOptions) -> Any:
        """Raise (RuntimeError, with the reason) if this engine cannot prune ``model`` at all;
        ``example`` is one input batch on the model's device. Nothing is changed. Returns what
        the check built that :meth:`analyse` can reuse (its ``prepared`` argument), or None. The
        default accepts every model and returns None."""
        return None

    def unreachable(self, model: nn.Module, prepared: Any) -> dict[str, str]:
        """``{layer name: reason}``: the layers this engine cannot prune because it cannot analyse
        the part of ``model`` that holds them (``prepared``: what :meth:`check` returned), for
        ``prune(structure="auto")`` to prune them with the eigenbasis engine instead. The
        default: none."""
        return {}

    @abstractmethod
    def analyse(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        options: PruneOptions,
        *,
        captured: CaptureResult | None = None,
        distributed: bool = False,
        prepared: Any = None,
    ) -> Any:
        """Scores from the factors (captured on ``batches`` unless ``captured`` is given).
        ``prepared``: what :meth:`check` returned for this model, reused if it still describes
        the model (rebuilt otherwise)."""

    @abstractmethod
    def decide(self, analysis: Any, ratio: float, options: PruneOptions, *, distributed: bool = False) -> Any:
        """The plan: frozen plain data with ``to_dict()``; rank 0's under ``distributed``."""

    @abstractmethod
    def apply(
        self, model: nn.Module, analysis: Any, plan: Any, options: PruneOptions, *, distributed: bool = False
    ) -> tuple[PruneReport, Any]:
        """Apply ``plan`` in place, all or nothing; return the report and the change."""

    @abstractmethod
    def replaced_parameters(self, change: Any) -> list[tuple[str, list[nn.Parameter], list[nn.Parameter]]]:
        """Per changed layer (or parameter): its name, the parameters it had and those it has now."""

    @abstractmethod
    def carry_optimizer_state(
        self,
        model: nn.Module,
        old_optimizers: Sequence[Optimizer],
        new_optimizers: Sequence[Optimizer],
        change: Any,
    ) -> TransplantReport:
        """Fill the rebuilt optimizers' state from the old ones across ``change``."""

    def marked_layers(self, analysis: Any, plan: Any, param_names: dict[int, str]) -> list[MarkedLayer]:
        """The optional training-time penalty (``gradual=``): what ``plan`` would remove, as
        :class:`~lightning_eigendamage.gradual.MarkedLayer` (a parameter, the bases its penalty is
        taken in, the removed input and output directions), so that the callback can pull it
        towards zero before the round. ``param_names``: ``id(parameter) → qualified name``.
        The default: this engine has no penalty (NotImplementedError)."""
        raise NotImplementedError(f"structure={self.name!r} has no gradual removal")

    def prune(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        *,
        ratio: float,
        options: PruneOptions,
        captured: CaptureResult | None = None,
        distributed: bool = False,
        prepared: Any = None,
    ) -> tuple[PruneReport, Any]:
        """``analyse → decide → apply`` in one call (one round of the callback); ``ratio`` is
        checked before anything runs."""
        r = as_real(ratio)
        if r is None or not 0.0 <= r < 1.0:
            raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
        analysis, plan = self.plan(
            model, batches, ratio, options, captured=captured, distributed=distributed, prepared=prepared
        )
        with progress_of(options).phase(f"{self.name}: surgery"):
            return self.apply(model, analysis, plan, options, distributed=distributed)

    def plan(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        ratio: float,
        options: PruneOptions,
        *,
        captured: CaptureResult | None = None,
        distributed: bool = False,
        prepared: Any = None,
    ) -> tuple[Any, Any]:
        """``analyse → decide``: the analysis and the plan, nothing applied (a round's first half,
        and what the callback's gradual window marks)."""
        # an engine without a check need not take ``prepared``
        extra = {} if prepared is None else {"prepared": prepared}
        progress = progress_of(options)
        with progress.phase(f"{self.name}: analysis (curvature capture and scores)"):
            analysis = self.analyse(
                model, batches, options, captured=captured, distributed=distributed, **extra
            )
        with progress.phase(f"{self.name}: decision (what to remove)"):
            return analysis, self.decide(analysis, ratio, options, distributed=distributed)


_ENGINES: dict[str, PruningEngine] = {}


def auto_reason(reason: str | None, prepared: Any = None) -> str:
    """What ``structure="auto"`` reports (``PruneReport.structure_reason``) given why the channel
    engine cannot prune the model (None: it can; ``prepared``: what its check built, whose
    ``how`` says how, if it has one)."""
    if reason is None:
        how = getattr(prepared, "how", None)
        return "the channel dependency graph of this model was built" + (f" {how}" if how else "")
    return f"channels are not possible here: {reason}"


def register_engine(engine: PruningEngine) -> PruningEngine:
    """Make ``engine`` available as ``structure=engine.name``; returns it."""
    if not isinstance(engine, PruningEngine):
        raise TypeError(f"engines are PruningEngine instances, got {type(engine).__name__}")
    if not isinstance(getattr(engine, "name", None), str) or engine.name in ("auto", ""):
        raise ValueError(f"an engine needs a name other than 'auto', got {getattr(engine, 'name', None)!r}")
    if engine.a_form not in ("channel", "patch"):
        raise ValueError(f"a_form must be 'channel' or 'patch', got {engine.a_form!r}")
    old = _ENGINES.get(engine.name)
    if old is not None and type(old).__module__.startswith(_BUILT_IN) and old is not engine:
        raise ValueError(
            f"structure={engine.name!r} is built in (prune() and the callback run it directly); "
            "register your engine under another name"
        )
    _ENGINES[engine.name] = engine
    return engine


_BUILT_IN = __name__.rpartition(".")[0] + "."  # the package's own engines cannot be replaced


def get_engine(name: str) -> PruningEngine:
    """The registered engine called ``name`` (ValueError listing the registered ones otherwise)."""
    try:
        return _ENGINES[name]
    except (KeyError, TypeError):
        raise ValueError(f"structure must be one of {engine_names() + ('auto',)}, got {name!r}") from None


def engine_names() -> tuple[str, ...]:
    """The names of the registered engines, in registration order."""
    return tuple(_ENGINES)


def prepare(name: str, model: nn.Module, example: Any, options: PruneOptions) -> tuple[Any, str | None]:
    """The engine ``name``'s :meth:`~PruningEngine.check` on ``example`` (one input batch on the
    model's device): ``(prepared, None)`` if it can prune ``model`` (``prepared`` is for
    :meth:`~PruningEngine.analyse`), ``(None, reason)`` if not. The check traces the model as
    ``model(example)``, so a ``forward_fn`` in ``options`` is a reason too. Engines without a
    check accept every model. Used to decide ``structure="auto"`` and to fail before training."""
    engine = get_engine(name)
    if type(engine).check is PruningEngine.check:
        return None, None
    if options.forward_fn is not None:
        return None, "forward_fn is given: the model is not called as model(input), which is traced"
    try:
        return engine.check(model, example, options), None
    except (RuntimeError, ImportError, TypeError, ValueError) as err:
        return None, str(err)


def cannot_prune(name: str, model: nn.Module, example: Any, options: PruneOptions) -> str | None:
    """Why the engine ``name`` cannot prune ``model``, or None if it can (:func:`prepare`'s reason)."""
    return prepare(name, model, example, options)[1]
