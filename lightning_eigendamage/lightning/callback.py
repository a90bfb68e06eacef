"""``EigenDamagePruning``: EigenDamage as a PyTorch Lightning callback.

During ``fit`` the callback accumulates K-FAC factors of every prunable Conv2d/Linear on the
batches of each prune point's window, and at the prune point calls
:func:`~lightning_eigendamage.prune` with them: the layers are rewritten in their Kronecker-factored
eigenbasis, the least important eigen-directions are removed under one global threshold, and the
model comes out physically smaller. Then the optimizers are rebuilt through
``configure_optimizers``; LR schedulers and param-group hyperparameters continue where they were,
and optimizer state is carried over (:mod:`lightning_eigendamage.optim`).

Fisher types (docs/method.md §1.5):

- ``fisher="true"`` (default, the paper's): on each capture batch the callback runs its own
  forward of ``pl_module(input)`` in eval mode (BatchNorm statistics and dropout untouched, full
  precision) and back-propagates the loss of labels sampled from the model's own prediction
  (``ŷ ~ softmax(logits)``, classes on ``class_dim``) with :func:`torch.autograd.grad`, so
  parameter ``.grad``, the optimizer and the user's loss are never touched. Sampling uses the
  callback's own ``torch.Generator`` (seeded by ``seed``; its state is in the callback's
  ``state_dict``), never the global RNG. Cost: one extra forward and backward per capture batch.
- ``fisher="empirical"``: the factors are taken from the user's own training forward and backward
  (no extra pass). The gradient reaching a layer is ``∂(ℓ̄ · s / k)/∂y`` for a loss ``ℓ̄``
  averaged over the batch's ``N`` examples, Lightning's division by ``k =
  accumulate_grad_batches`` and a gradient scaler's scale ``s``; the callback sets
  ``grad_scale = N·k/s`` so that ``G`` is the per-example factor whatever the precision or
  accumulation. Non-finite batches (fp16 overflow) are skipped and counted. Needs automatic
  optimization.

Several processes (DDP: ``strategy="ddp"``, ``"ddp_spawn"``, any number of devices and nodes):
every rank captures on its own shard of the data at the same batches. At the prune point the
factors are summed over the ranks weighted by the rows each accumulated, the eigendecompositions
are split among the ranks and broadcast, and rank 0's decisions are broadcast
(``prune(distributed=True)``), so every rank applies the same surgery and ends with
bitwise-identical parameters and optimizer state. The DDP wrapper is then rebuilt around the
pruned module, and the optimizers after it. The true-Fisher generator is seeded alike on every
rank: each rank samples the labels of its own examples from the same stream (each label still
follows the model's prediction for its example, so the factors stay unbiased; the draws are
correlated across ranks), and the generator advances alike on ranks whose batches have the same
sizes (as ``DistributedSampler``'s do), so rank 0's checkpointed state fits every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
    XLAStrategy,
)
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from ..attention import functional_owners
from ..checkpoint import PrunedLoadingHook, attach_skeleton, has_pruned_loading, meta_skeleton
from ..curvature import (
    KFACapture,
    capture_batch,
    check_categorical,
    compiled_code_sees_hooks,
    split_batch,
    target_of,
)
from ..discovery import Candidate, dynamic_skips, find_layers, no_prunable_message
from ..distributed import is_distributed, rank_zero_input
from ..engine import PruningEngine, auto_reason, engine_names, get_engine, prepare
from ..fallback import MixedChange, channels_with_eigenbasis, unreachable_layers
from ..fallback import carry_optimizer_state as carry_mixed_state
from ..fallback import replaced_parameters as mixed_replaced
from ..gradual import (
    GradualRemoval,
    GradualWindow,
    bases_fit,
    check_windows,
    marked_mask,
    penalty_grad,
)
from ..optim import TransplantReport, group_map, group_origins, remap_group_lists
from ..options import PruneOptions
from ..report import PruneReport, PruningWarning, reason_lines
from .schedule import LoopState, PrunePoint, PruningSchedule

_STATE_VERSION = 3
DEFAULT_STRUCTURE = "auto"  # channels where the dependency graph builds (see the README)


class EigenDamagePruning(Callback):
    """Prune a LightningModule with EigenDamage during ``Trainer.fit``.

    Args:
        schedule: ``{epoch: fraction}`` (at the end of that 0-based epoch remove ``fraction`` of
            the remaining prunable eigen-directions: the global quantile of their scores, as
            ``prune(ratio=...)``), or a :class:`~lightning_eigendamage.PruningSchedule` for step
            points, one-shot pruning at the start of ``fit``, the number of capture batches
            (``fisher_batches``) and parameter/FLOP targets.
        structure: what a round removes: ``"channels"`` (whole channels; the layers stay plain
            and narrower; needs Torch-Pruning's dependency graph, built from the first training
            batch before any step), ``"eigenbasis"`` (the paper's eigen-directions, rotation
            stages, any architecture, ``gradual`` available) or ``"auto"`` (default: channels
            where the graph builds, the eigenbasis otherwise; decided once before training,
            logged, kept in the checkpoint). See the user guide's "Choosing a structure".
        method: ``"eigendamage"``.
        fisher: ``"true"`` (default) or ``"empirical"`` (see the module docstring).
        input_fn: ``batch → model input``, the argument of ``pl_module(...)`` whose output are the
            logits. Default: ``batch[0]`` for tuple/list batches, the batch itself for a tensor;
            a dict batch needs it.
        forward_fn: ``(pl_module, batch) → logits``, for modules whose ``forward`` takes more than
            the input (e.g. ``lambda m, b: m(*b)`` for ``forward(inputs, target)``); used for the
            probe at the start of fit, every capture forward and the FLOP counts, instead of
            ``pl_module(input_fn(batch))``.
        loss_fn: ``(output, target) → mean loss``; only used by ``fisher="empirical"`` for the
            eval-mode captures, where there is no training step to read the Fisher from:
            ``at_start`` rounds and the plans of gradual removal (default: cross-entropy).
        exclude: as in :func:`~lightning_eigendamage.prune`.
        exempt_last: as in :func:`~lightning_eigendamage.prune`.
        layer_cap: as in :func:`~lightning_eigendamage.prune`.
        min_rank: as in :func:`~lightning_eigendamage.prune`.
        form: as in :func:`~lightning_eigendamage.prune`.
        train_rotations: as in :func:`~lightning_eigendamage.prune`.
        likelihood: as in :func:`~lightning_eigendamage.prune`.
        class_dim: as in :func:`~lightning_eigendamage.prune`.
        max_factor_dim: as in :func:`~lightning_eigendamage.prune`.
        form_by: as in :func:`~lightning_eigendamage.prune`.
        latency_batch: as in :func:`~lightning_eigendamage.prune`.
        latency_format: as in :func:`~lightning_eigendamage.prune`.
        latency_mode: as in :func:`~lightning_eigendamage.prune`.
        round_to: as in :func:`~lightning_eigendamage.prune`.
        rank_by: as in :func:`~lightning_eigendamage.prune`.
        recalibrate_bn: after each round, re-estimate the running statistics of the BatchNorm
            layers downstream of the pruned layers on the round's last captured training batch
            (default True; as ``prune(recalibrate_bn=True)``, on that one batch, averaged over the
            processes under DDP), so an evaluation or checkpoint right after a round does not use
            the dense network's statistics. Training then updates them with each layer's own
            momentum. Skipped (with a message) when the batch is the one-row example a checkpoint
            keeps (a round resumed inside its capture window).
        seed: seed of the generator used to sample labels for the true Fisher.
        verbose: print a per-layer table after each round (rank zero).
        progress: each round also prints its phases as they start and end, with their times
            (analysis, decision, surgery), and a bar over the channel engine's group scores, on
            stderr (rank zero), as ``prune(progress=True)`` does (default False).
        gradual: a :class:`~lightning_eigendamage.GradualRemoval` (``steps``, ``penalty``) for
            gradual removal in the eigenbasis before every epoch and step point (default None:
            off). See "Gradual removal" below.

    Gradual removal (``gradual=GradualRemoval(steps, penalty)``, docs/method.md §5.1): for the
    ``steps`` optimizer steps before each prune point, the coordinates of ``W* = Q_Gᵀ W Q_A``
    that the point's plan would remove are pulled towards zero by a growing penalty
    ``λ_t/2·‖M ⊙ W*‖²``, ``λ_t = penalty·t/steps`` at the window's ``t``-th step
    (:mod:`lightning_eigendamage.gradual`), so the network moves its function off them before
    they are cut.

    - *Timing.* A step point ``S`` prunes after optimizer step ``S``; an epoch point ``e`` after
      step ``(e+1)·ceil(num_training_batches / accumulate_grad_batches)`` (so epoch points need a
      training dataloader with a length: ValueError in ``on_train_start`` otherwise; step points
      work with any loader). The window covers steps ``S − steps + 1 … S``. Windows must fit:
      ``steps`` below the first point's step and below the gap between consecutive points
      (ValueError, in the constructor for step points, in ``on_train_start`` for epoch points).
      An ``at_start`` round has no steps before it and prunes without a window (a warning); a
      schedule with only an ``at_start`` point is refused.
    - *Plan.* Factors are captured (true Fisher, or with ``fisher="empirical"`` the eval-mode
      empirical Fisher of ``loss_fn`` as for ``at_start`` points) on up to ``fisher_batches``
      training batches of the ``ceil(fisher_batches / accumulate_grad_batches)`` optimizer steps
      before the window, after the previous round. At the window's first batch the plan is made
      with :func:`~lightning_eigendamage.analyse` and :func:`~lightning_eigendamage.decide`
      (not applied) and its removed directions are marked. If no finite factors exist yet (e.g.
      after resuming just before the window), capture goes on and the window starts at the first
      batch that has them, with ``λ_t`` still counted from the nominal start.
    - *Penalty.* In ``on_before_optimizer_step`` (after the backward and DDP's gradient
      all-reduce, after AMP's unscaling, before gradient clipping and the step) the penalty's
      gradient ``λ_t·Q_G (M ⊙ W*) Q_Aᵀ`` is added to the ``.grad`` of each marked layer's (core)
      weight held by the stepping optimizer. The optimizers, their param groups and the LR
      schedulers are the user's, untouched. A round still waiting for factors past ``S`` keeps
      ``λ = penalty`` until it runs; every round ends its window. The round itself is the usual
      one, on freshly captured factors.
    - *DDP.* The window's factors are all-reduced, the eigendecompositions split and broadcast,
      and rank 0's plan broadcast, as in a round: every rank holds bitwise-identical bases and
      masks and adds the same penalty to the same (all-reduced) gradients.
    - *Checkpoints.* An active window (point, steps, per layer the parameter name, ``Q_A``,
      ``Q_G`` and the removed directions; float64, ``d_in² + d_out²`` numbers per layer) is saved
      in :meth:`state_dict` under ``"gradual"`` and resumes exactly; the factors of a window's
      capture that has not finished are not saved (the capture restarts on resume).

    Logged after each round through ``pl_module.log``: ``pruning/params``, ``pruning/flops``
    (per example), ``pruning/compression`` (FLOPs of the model before the first round / now),
    ``pruning/param_compression``, ``pruning/realised_fraction`` (directions removed in the round),
    ``pruning/target_reached`` (1 when a params/flops round met its fraction, else 0; a round that
    cannot meet it also warns on rank zero, saying what limits it),
    ``pruning/round`` and the round's timings ``pruning/time_capture_s`` (the callback's own
    capture passes), ``pruning/time_prune_s`` (eigendecomposition, scoring, surgery) and
    ``pruning/time_optim_s`` (optimizer rebuild and state transplant). ``reports`` keeps one
    :class:`~lightning_eigendamage.PruneReport` per round, ``transplants`` what happened to the
    optimizer state.

    Checkpoints: ``Trainer.fit(model, ckpt_path=...)`` resumes with a freshly built model. In
    ``setup`` the callback registers a ``load_state_dict`` pre-hook on the LightningModule
    (:class:`~lightning_eigendamage.checkpoint.PrunedLoadingHook`, removed again at teardown) that
    rebuilds the pruned layers from the checkpoint's records before any weight loads; the
    callback's own state (:meth:`state_dict`) brings back the rounds done, the reports, the
    sampling generator and the factors of an unfinished capture window.

    Raises (before training starts): ``ValueError``/``TypeError`` for bad options or schedule, a
    schedule beyond ``max_epochs``/``max_steps``, a model with no prunable layer, a batch whose
    input cannot be found, a spawning strategy (``ddp_spawn``) on a LightningModule that does not
    call :func:`~lightning_eigendamage.enable_pruned_loading` in ``__init__`` (the main process
    could not take the pruned model back); ``NotImplementedError`` for strategies other than
    single-device and DDP (FSDP, DeepSpeed, model parallel, multi-device XLA).
    """

    # The options, read-only: they live in ``self.options`` (validated once, frozen).
    method = property(lambda self: self.options.method)
    fisher = property(lambda self: self.options.fisher)
    input_fn = property(lambda self: self.options.input_fn)
    forward_fn = property(lambda self: self.options.forward_fn)
    loss_fn = property(lambda self: self.options.loss_fn)
    exclude = property(lambda self: list(self.options.exclude))
    exempt_last = property(lambda self: self.options.exempt_last)
    layer_cap = property(lambda self: self.options.layer_cap)
    min_rank = property(lambda self: self.options.min_rank)
    form = property(lambda self: self.options.form)
    train_rotations = property(lambda self: self.options.train_rotations)
    likelihood = property(lambda self: self.options.likelihood)
    class_dim = property(lambda self: self.options.class_dim)
    max_factor_dim = property(lambda self: self.options.max_factor_dim)
    form_by = property(lambda self: self.options.form_by)
    latency_batch = property(lambda self: self.options.latency_batch)
    latency_format = property(lambda self: self.options.latency_format)
    latency_mode = property(lambda self: self.options.latency_mode)
    round_to = property(lambda self: self.options.round_to)
    rank_by = property(lambda self: self.options.rank_by)
    damping = property(lambda self: self.options.damping)
    greedy_steps = property(lambda self: self.options.greedy_steps)
    recalibrate_bn = property(lambda self: self.options.recalibrate_bn)
    seed = property(lambda self: self.options.seed)
    progress = property(lambda self: self.options.progress)

    def __init__(
        self,
        schedule: PruningSchedule | Mapping[Any, Any],
        *,
        structure: str = DEFAULT_STRUCTURE,
        method: str = "eigendamage",
        fisher: str = "true",
        input_fn: Callable[[Any], Any] | None = None,
        forward_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        exclude: Any = None,
        exempt_last: bool = True,
        layer_cap: float | None = None,
        min_rank: int = 1,
        form: str = "auto",
        train_rotations: bool = True,
        likelihood: str = "categorical",
        class_dim: int = -1,
        max_factor_dim: int | None = 16384,
        form_by: str = "cost",
        latency_batch: int = 64,
        latency_format: str = "model",
        latency_mode: str = "inference",
        round_to: int = 1,
        rank_by: str | None = None,
        damping: float = 1e-3,
        greedy_steps: int | None = 32,
        recalibrate_bn: bool = True,
        seed: int = 0,
        verbose: bool = True,
        progress: bool = False,
        gradual: GradualRemoval | None = None,
    ) -> None:
        super().__init__()
        self.schedule = PruningSchedule.from_any(schedule)
        if gradual is not None:
            if not isinstance(gradual, GradualRemoval):
                raise TypeError(
                    "gradual must be a lightning_eigendamage.GradualRemoval(steps=..., penalty=...) "
                    f"or None, got {type(gradual).__name__} {gradual!r}"
                )
            if not self.schedule.epochs and not self.schedule.steps:
                raise ValueError(
                    "gradual removal runs in the optimizer steps before a prune point, but the schedule "
                    "has only an at_start point (pruned before any step); add epoch or step points, or "
                    "pass gradual=None"
                )
            names = engine_names() if structure == "auto" else (structure,)
            for name in names:
                if (
                    name in engine_names()
                    and type(get_engine(name)).marked_layers is PruningEngine.marked_layers
                ):
                    raise ValueError(
                        f"structure={name!r} has no gradual removal (its engine defines no penalty); "
                        "pass gradual=None or another structure"
                    )
            check_windows({f"step:{s}": s for s in self.schedule.steps}, gradual.steps)
        # Every option is validated here, once, before training (PruneOptions raises).
        # The callback's rounds run on factors captured during training: one shot, no
        # reconstruction; BatchNorm is re-estimated on the round's example batch.
        self.options = PruneOptions.from_arguments(locals(), target=self.schedule.target, reconstruct=False)
        if not isinstance(verbose, bool):  # "no" or 0.5 would silently count as True
            raise TypeError(f"verbose must be True or False, got {verbose!r}")
        self.verbose = verbose
        self.gradual = gradual
        self._load_hook: Any = None
        # (the model's class, its meta-device copy when first set up): what a checkpoint from
        # before a later round is loaded into (PrunedLoadingHook's skeleton)
        self._skeleton: tuple[type, dict[str, nn.Module] | None] | None = None
        # While fitting a model that holds torch.compile'd modules: their compiled code calls the
        # hooks of every capture and check (compiled_code_sees_hooks), undone at teardown
        self._compiled_hooks: contextlib.ExitStack | None = None
        self._fitted: weakref.ref | None = None  # the module of the last fit (see setup)
        self._reset_run_state()

    @property
    def structure(self) -> str:
        """What the rounds remove: ``"eigenbasis"`` or ``"channels"`` (``"auto"`` until the
        start of the first fit has decided)."""
        return self._structure or self.options.structure

    @property
    def engine(self) -> PruningEngine:
        """The engine the rounds run (:mod:`lightning_eigendamage.engine`)."""
        if self._structure is None:
            raise RuntimeError("structure='auto' is decided at the start of fit, from a training batch")
        return get_engine(self._structure)

    def _round_options(self) -> PruneOptions:
        return self.options.resolved(self.engine.name)

    def __getstate__(self) -> dict[str, Any]:
        # Spawning launchers pickle the callback; the weak reference to the last fit's module
        # cannot be pickled, and a copy in another process has no earlier fit anyway; nor has
        # it the traced graph of this process's model.
        return {**self.__dict__, "_fitted": None, "_prepared": None}

    def _reset_run_state(self) -> None:
        """Everything one fit accumulates (rounds done, reports, captures, windows)."""
        self.reports: list[PruneReport] = []
        # The engine's name; None while structure="auto" is undecided (decided once, at the first
        # probe, and kept in the checkpoint so that a resumed run never switches).
        self._structure: str | None = None if self.options.structure == "auto" else self.options.structure
        self.transplants: list[dict[str, Any]] = []
        self.timings: list[dict[str, float]] = []
        self.skipped_rounds: list[str] = []
        self._done: set[str] = set()
        self._dense: tuple[int, int] | None = None
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        self._cap: KFACapture | None = None
        self._cap_time = 0.0
        self._prepared: Any = None  # what the engine's check built at the probe (channels: the graph)
        self._structure_reason: str | None = None  # why "auto" chose the structure
        self._example: Any = None
        self._example_saved = False  # whether _example is the one-row example of a checkpoint
        self._epoch_captured = 0
        self._step_at_batch_start = 0
        self._emp_active = False
        self._emp_backward = False
        self._saved_capture: dict[str, Any] | None = None
        self._last_batch: list[Any] | None = None  # [epoch, last batch of it?] (state_dict)
        self._resumed_at: list[Any] | None = None  # the loaded "last_batch"
        self._saved_window_capture: dict[str, Any] | None = None  # the gradual window's, likewise
        # Gradual removal: the step after which each epoch/step point prunes, the active window,
        # the capture its plan is made from, and the window's live tensors (resolved lazily).
        self._gradual_ends: dict[str, int] = {}
        self._window: GradualWindow | None = None
        self._gcap: KFACapture | None = None
        self._gexample: Any = None
        self._targets: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    # ------------------------------------------------------------------------------------------
    # Set-up: everything knowable before training is checked here
    # ------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_spawn(trainer, pl_module)
            # One instance used again for another model starts over (a resumed fit then loads
            # its state from the checkpoint, after this); the same model fitted again goes on.
            previous = self._fitted() if self._fitted is not None else None
            if self._fitted is not None and previous is not pl_module:
                if self._done:
                    rank_zero_info(
                        "EigenDamagePruning: fitting another model than the last fit's: its rounds "
                        f"({', '.join(sorted(self._done))}) and reports start over"
                    )
                self._reset_run_state()
            self._fitted = weakref.ref(pl_module)
        # Checkpoints of a pruned model (resume, ``trainer.test(ckpt_path="best")``) load into
        # this model: a pre-hook on the root reshapes the pruned layers before any child loads.
        self._install_loading_hook(pl_module)
        if stage != "fit":
            return
        self._release_compiled_hooks()
        self._compiled_hooks = contextlib.ExitStack()
        self._compiled_hooks.enter_context(compiled_code_sees_hooks(pl_module))
        _check_strategy(trainer.strategy)
        _check_other_callbacks(trainer)
        for msg in self.schedule.validate_for(trainer.max_epochs, trainer.max_steps):
            rank_zero_warn(f"EigenDamagePruning: {msg}")
        if self.fisher == "empirical" and not pl_module.automatic_optimization:
            raise ValueError(
                "fisher='empirical' reads the curvature from Lightning's own backward and needs "
                "automatic optimization; with manual optimization use fisher='true'"
            )
        cands = self._candidates(pl_module)
        if not any(c.skipped is None for c in cands):
            raise ValueError(f"EigenDamagePruning: {no_prunable_message(cands, pl_module)}")
        self._log_skips([(c.name, c.skipped) for c in cands if c.skipped is not None], "")

    def _check_spawn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``ddp_spawn`` and the other launchers that start processes from this one copy rank 0's
        weights back into the main process's model with ``load_state_dict(strict=False)``, and no
        callback hook runs there: only a pre-hook already on the model can reshape it."""
        try:
            from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
        except ImportError:  # pragma: no cover - a Lightning without this (private) launcher
            return
        launcher = getattr(trainer.strategy, "launcher", None)
        if isinstance(launcher, _MultiProcessingLauncher) and not has_pruned_loading(
            pl_module, ignore=self._load_hook
        ):
            raise ValueError(
                f"with a spawning strategy ({type(trainer.strategy).__name__}, start method "
                f"{getattr(launcher, '_start_method', '?')!r}) Lightning copies rank 0's weights back "
                "into the main process's model with load_state_dict(strict=False), which would "
                "silently skip every pruned layer (the main process would keep unpruned, untrained "
                "layers). Call lightning_eigendamage.enable_pruned_loading(self) in your "
                "LightningModule's __init__, or use strategy='ddp'"
            )

    def _install_loading_hook(self, pl_module: pl.LightningModule) -> None:
        self._remove_loading_hook()
        # the model as first given; kept for another instance of its class (a copy under
        # ddp_spawn, a fresh model fitted again): only the architecture is read from it
        skeleton = getattr(self, "_skeleton", None)  # (an instance pickled by an older version has none)
        if skeleton is None or skeleton[0] is not type(pl_module):
            self._skeleton = (type(pl_module), meta_skeleton(pl_module))
        attach_skeleton(pl_module, self._skeleton[1])  # (an enable_pruned_loading hook runs first)
        self._load_hook = pl_module.register_load_state_dict_pre_hook(
            PrunedLoadingHook(rotations_require_grad=self.train_rotations, skeleton=self._skeleton[1])
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        if self._generator_state is not None:
            try:
                self._generator.set_state(self._generator_state)
            except (RuntimeError, ValueError):
                rank_zero_warn("EigenDamagePruning: saved sampling-generator state does not fit this device")
            self._generator_state = None
        saved, self._saved_capture = self._saved_capture, None
        window_saved, self._saved_window_capture = self._saved_window_capture, None
        # Under DDP every rank loads rank 0's checkpoint: only rank 0 takes the saved factors back
        # (they are rank 0's); the other ranks restart their share of the window.
        for saved_factors, release, ensure in (
            (saved, self._release_capture, self._ensure_capture),
            (window_saved, self._release_window_capture, self._ensure_window_capture),
        ):
            if saved_factors is None or trainer.global_rank != 0:
                continue
            try:  # (no capture is open here: load_state_dict released both)
                ensure(pl_module).load_state_dict(saved_factors)
            except (ValueError, KeyError, TypeError) as err:
                release()
                rank_zero_warn(
                    f"EigenDamagePruning: the factors saved in the checkpoint do not fit this model "
                    f"({err}); the capture window restarts"
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._gcap is not None and self._gexample is None:  # as below, for a gradual window
            with _preserve_rng(pl_module.device, trainer.train_dataloader):
                self._gexample = next(self._train_batches(trainer, pl_module, 1), None)
        if self._cap is not None and self._example is None:
            # Resumed inside a capture window whose example batch could not be saved: any training
            # batch serves (the example only gives the input shape for FLOP counts).
            with _preserve_rng(pl_module.device, trainer.train_dataloader):
                self._example = next(self._train_batches(trainer, pl_module, 1), None)
                self._example_saved = False
        self._check_run_length(trainer)
        self._check_coinciding_points(trainer)
        self._check_gradual(trainer)
        self._probe(trainer, pl_module)
        for p in self._pending():
            if p.due_at_fit_start():
                self._prune_at_start(trainer, pl_module, p)
        self._missed_epoch_ends(trainer, pl_module)

    def _missed_epoch_ends(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On a resume from a checkpoint written on an epoch's last optimizer step (a step
        checkpoint), before the end of that epoch: Lightning goes on with the next epoch and never
        ends that one, so its epoch point's round (due at that end) runs here, from the factors
        the checkpoint holds, before any further step; a warning where it holds none."""
        saved, self._resumed_at = self._resumed_at, None
        if saved is not None:  # where the checkpoint's last batch stood: world-size independent
            ended = int(saved[0]) + 1 if saved[1] else int(saved[0])
        else:  # (a checkpoint from before that was saved: counted from the steps)
            per_epoch = _steps_per_epoch(trainer)
            if trainer.global_step == 0 or not per_epoch:
                return
            ended = trainer.global_step // per_epoch
        for p in self._pending():
            if p.kind != "epoch" or p.at >= ended:
                continue
            if self._has_factors_for(trainer, p):
                rank_zero_info(
                    f"EigenDamagePruning: the run resumes after the last step of epoch {p.at}, whose "
                    "end Lightning does not run again: its round runs now"
                )
                self._run_round(trainer, pl_module, p, on_step=False)
            else:
                rank_zero_warn(
                    f"EigenDamagePruning: the round of epoch {p.at} is skipped: the run resumes after "
                    "the epoch's last step from a checkpoint that holds no factors for it"
                )

    def _check_run_length(self, trainer: pl.Trainer) -> None:
        """Step points against the run's total optimizer steps, once the data is loaded.

        ``trainer.estimated_stepping_batches`` (``max_steps`` or epochs × batches / accumulation)
        is known here without side effects: Lightning has set up the training data before
        ``on_train_start``.
        """
        if not self.schedule.steps:
            return
        if _manual(trainer):
            pending = [s for s in self.schedule.steps if f"step:{s}" not in self._done]
            if pending and trainer.max_steps in (-1, None):
                rank_zero_warn(
                    "EigenDamagePruning: under manual optimization trainer.global_step counts every "
                    "optimizer.step() the training step makes, which no count of batches predicts: "
                    f"step points {pending} are not checked against the run's length (a point the "
                    "run never reaches does not prune; the end of training says so)"
                )
            return
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # any failure means the length is unknown
            total = float("inf")
        if total < 0:  # Lightning returns max_steps (-1) for an iterable without a length
            total = float("inf")
        for msg in self.schedule.validate_steps(total, done=self._done):
            rank_zero_warn(f"EigenDamagePruning: {msg}")

    def _check_coinciding_points(self, trainer: pl.Trainer) -> None:
        """ValueError (before any training) if an epoch point is never reached (``max_steps``
        ends the run in an earlier epoch: Lightning ends the epoch in which it stops, so epoch
        ``e`` is reached if ``e·steps_per_epoch < max_steps``), or if a step point falls on the
        optimizer step that ends an epoch point's epoch (``(e+1)·steps_per_epoch``, or
        ``max_steps`` for the epoch it cuts short): both rounds would be due at once, on the same
        factors, and the second would find none and be skipped."""
        per_epoch = _steps_per_epoch(trainer)
        if not per_epoch:
            return  # (no length: the epochs' ends are not known before training)
        last = trainer.max_steps if trainer.max_steps not in (-1, None) else None
        if last is not None:
            never = sorted(p.at for p in self._pending() if p.kind == "epoch" and p.at * per_epoch >= last)
            if never:
                raise ValueError(
                    f"EigenDamagePruning: the epoch point(s) {never} are never reached: max_steps={last} "
                    f"ends training in epoch {(last - 1) // per_epoch} ({per_epoch} optimizer steps per "
                    "epoch). Move them, or raise max_steps"
                )
        ends = {
            (p.at + 1) * per_epoch if last is None else min((p.at + 1) * per_epoch, last): p
            for p in self._pending()
            if p.kind == "epoch"
        }
        for p in self._pending():
            if p.kind == "step" and p.at in ends:
                raise ValueError(
                    f"EigenDamagePruning: the step point {p.at} and the epoch point {ends[p.at].at} "
                    f"fall on the same optimizer step ({per_epoch} steps per epoch): the second round "
                    "would find no factors captured for it. Merge them into one point, or move one"
                )

    def _check_gradual(self, trainer: pl.Trainer) -> None:
        """The step after which each epoch and step point prunes, and whether the windows fit.

        An epoch point ``e`` prunes after step ``(e+1)·ceil(num_training_batches / accumulate)``
        (Lightning steps on the last batch of an epoch even when the accumulation is incomplete).
        """
        if self.gradual is None:
            return
        ends = {f"step:{s}": s for s in self.schedule.steps}
        if self.schedule.epochs:
            per_epoch = _steps_per_epoch(trainer)
            if per_epoch is None:
                why = (
                    "under manual optimization the training step decides how many optimizer steps "
                    "an epoch takes"
                    if _manual(trainer)
                    else "a GradientAccumulationScheduler changes them from epoch to epoch"
                    if _varying_accumulation(trainer)
                    else "the training dataloader has no length"
                )
                raise ValueError(
                    "gradual removal before epoch points needs to know at which optimizer step each "
                    f"epoch ends, but {why}; use step points (PruningSchedule(steps={{...}}))"
                    + (
                        ""
                        if _manual(trainer) or _varying_accumulation(trainer)
                        else " or a dataloader with a length"
                    )
                )
            ends.update({f"epoch:{e}": (e + 1) * per_epoch for e in self.schedule.epochs})
        check_windows(ends, self.gradual.steps)
        self._gradual_ends = ends
        if self.schedule.at_start is not None and "start" not in self._done:
            rank_zero_warn(
                "EigenDamagePruning: the at_start round has no optimizer steps before it: it prunes "
                "without gradual removal (the other rounds get their windows)"
            )

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One no-grad forward on a training batch: finds the input, the layers that run, the
        last layer, so that a model with nothing left to prune fails before training."""
        with _preserve_rng(pl_module.device, trainer.train_dataloader):
            batch = next(self._train_batches(trainer, pl_module, 1), None)
        self._decide_structure(pl_module, batch)
        if batch is None:
            return
        cands = self._candidates(pl_module)
        cap = KFACapture(
            {c.name: c.hook_module for c in cands}, factors_for=[], routes=_routes(pl_module, cands)
        )
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with cap, torch.no_grad():
                cap.begin_batch()
                out = self._forward(pl_module, batch)
                cap.end_batch(0)
        finally:
            for m, mode in modes.items():
                m.training = mode
        if self.options.fisher == "true" and self.options.likelihood == "categorical":
            try:  # before any training: every capture would fail on it
                check_categorical(out, self.options.class_dim)
            except ValueError as err:
                raise ValueError(f"EigenDamagePruning: {err}") from None
        skips = dynamic_skips(cands, cap.layers, cap.fire_order, self.exempt_last, backward=False)
        if not any(c.skipped is None for c in cands):
            raise ValueError(f"EigenDamagePruning: {no_prunable_message(cands, pl_module)}")
        self._log_skips(skips, " after a forward pass")

    def _round_prepared(self) -> Any:
        """What the engine's check built (the channel graph), with the latency table of an
        earlier round (kept in the reports, so also after a resume): a table is measured once."""
        prepared = self._prepared
        if prepared is not None and getattr(prepared, "latency", False) is None:
            prepared.latency = next(
                (r.latency_table for r in reversed(self.reports) if r.latency_table), None
            )
        return prepared

    def _decide_structure(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """Before any training: ask the engine whether it can prune ``pl_module``
        (:meth:`~lightning_eigendamage.engine.PruningEngine.check`; the channel engine traces its
        dependency graph on the probe batch's input). With ``structure="auto"`` choose channels
        if they can, the eigenbasis otherwise, and say why; with an explicit structure raise if
        its engine cannot."""
        target = self._structure or "channels"
        engine = get_engine(target)
        if type(engine).check is PruningEngine.check:  # nothing to check (the eigenbasis)
            return
        example = None if batch is None else self._input_of(batch)
        if _is_distributed(pl_module.trainer):  # every rank checks rank 0's input: the check runs
            # the model (the channel engine's trial cut), so every rank must decide alike
            example = rank_zero_input(example, pl_module.device)
        if example is None:
            reason: str | None = "the training data gave no batch to trace the model with"
        else:
            with _preserve_rng(pl_module.device):
                prepared, reason = prepare(target, pl_module, example, self._check_options(target))
            self._prepared = prepared  # the traced graph, reused by every round (re-traced if stale)
        if self._structure is not None:
            if reason is not None:
                raise RuntimeError(
                    f"EigenDamagePruning(structure={target!r}) cannot prune this model: {reason}. "
                    "Use structure='eigenbasis' (no dependency graph needed) or structure='auto'"
                )
            return
        self._structure = "channels" if reason is None else "eigenbasis"
        self._structure_reason = auto_reason(reason, self._prepared if example is not None else None)
        try:  # the options must fit the structure chosen (PruneOptions took them for some structure)
            self.options.resolved(self._structure)
        except ValueError as err:
            raise ValueError(
                f"EigenDamagePruning: structure='auto' chose {self._structure} for this model "
                f"({self._structure_reason}), and {err}; pass the structure explicitly, or options "
                "it takes"
            ) from None
        rank_zero_info(
            f"EigenDamagePruning: structure='auto' prunes {self._structure} ({self._structure_reason})"
        )

    def _check_options(self, structure: str) -> PruneOptions:
        """The options the engine ``structure``'s check runs with: ours resolved for it, or, under
        ``"auto"`` with options only the other structure takes, those the check reads (the input
        and forward functions) alone: which structure it is, is what the check decides."""
        try:
            return self.options.resolved(structure)
        except ValueError:
            if self.options.structure != "auto":
                raise
            return PruneOptions(
                structure=structure, input_fn=self.options.input_fn, forward_fn=self.options.forward_fn
            )

    def _candidates(self, pl_module: pl.LightningModule) -> list[Candidate]:
        """Every candidate layer of ``pl_module`` for the engine (the eigenbasis engine's before
        ``structure="auto"`` is decided: any layer either engine could prune), with the reason
        for those that will not be pruned."""
        if self._structure is None:
            return find_layers(pl_module, self.options.exclude, max_factor_dim=self.options.max_factor_dim)
        return self.engine.candidates(pl_module, self._round_options())

    def _log_skips(self, skips: list[tuple[str, str | None]], when: str) -> None:
        """Say which layers will not be pruned, one line per reason (as the reports word them);
        not those that follow a pruned layer (the channel engine's depthwise convs)."""
        follow = self.engine.followers if self._structure is not None else ()
        skips = [(name, why) for name, why in skips if why not in follow]
        if skips:
            reasons = reason_lines({name: why or "" for name, why in skips}, names=6)
            lines = "\n".join(f"  {line}" for line in reasons)
            rank_zero_info(f"EigenDamagePruning: {len(skips)} layer(s) will not be pruned{when}:\n{lines}")

    # ------------------------------------------------------------------------------------------
    # Capture
    # ------------------------------------------------------------------------------------------

    def _pending(self) -> list[PrunePoint]:
        return [p for p in self.schedule.points() if p.key not in self._done]

    def _loop_state(self, trainer: pl.Trainer, batch_idx: int = -1) -> LoopState:
        """The loop's position as the prune points read it; one snapshot per hook, taken before
        that hook's capture."""
        cap = self._cap
        return LoopState(
            epoch=trainer.current_epoch,
            batch_idx=batch_idx,
            batches_per_epoch=trainer.num_training_batches,
            step_at_batch_start=self._step_at_batch_start,
            global_step=trainer.global_step,
            accumulate=trainer.accumulate_grad_batches,
            captured_in_window=0 if cap is None else cap.batches + cap.skipped_batches,
            captured_this_epoch=self._epoch_captured,
            fisher_batches=self.schedule.fisher_batches,
        )

    def _wants_capture(self, state: LoopState) -> bool:
        return any(p.wants_capture(state) for p in self._pending())

    def _has_factors_for(self, trainer: pl.Trainer, point: PrunePoint) -> bool:
        """False when ``point`` waits for factors and none were captured yet (summed over the
        ranks, so every rank agrees); the point is then asked again at its next due moment."""
        return not point.waits_for_factors or self._captured_batches(trainer) > 0

    def _ensure_capture(self, pl_module: pl.LightningModule) -> KFACapture:
        if self._cap is None:
            self._cap = self._open_capture(pl_module)
            self._cap_time = 0.0
        return self._cap

    def _open_capture(self, pl_module: pl.LightningModule) -> KFACapture:
        """A K-FAC capture in the engine's form of ``A``, its hooks installed on every candidate
        layer (factors for those not skipped); the caller closes it with ``remove()``."""
        cands = self._candidates(pl_module)
        if self._structure is None:
            factors_for = [c.name for c in cands if c.skipped is None]
        else:  # the channel engine reads the factors of the readers of changeable groups only
            options, prepared = self._round_options(), self._round_prepared()
            factors_for = self.engine.factor_layers(pl_module, cands, options, prepared)
            if self._mixed():  # the layers channels cannot reach go to the eigenbasis: their factors too
                hooked = {c.name for c in cands}
                more = unreachable_layers(self.engine, pl_module, prepared)
                factors_for += [n for n in more if n in hooked and n not in factors_for]
        return KFACapture(
            {c.name: c.hook_module for c in cands},
            factors_for=factors_for,
            a_form=self.engine.a_form,
            routes=_routes(pl_module, cands),
            max_examples=self._fisher_examples(),
            a_columns=self._fisher_columns(),
        ).__enter__()

    def _examples_text(self) -> str:
        m = self._fisher_examples()
        text = "" if m is None else f", at most {m} examples of each (fisher_examples)"
        s = self._fisher_columns()
        return text + (f", each conv's A from 1 column in {s} of its map" if s > 1 else "")

    def _fisher_columns(self) -> int:
        """The capture's ``a_columns``: the engine's ``capture_columns`` under
        ``fisher_examples="auto"``, else every column."""
        return self.engine.capture_columns if self.schedule.fisher_examples == "auto" else 1

    def _fisher_examples(self) -> int | None:
        """The capture's ``max_examples``: the schedule's ``fisher_examples``, or the engine's
        ``capture_examples`` for ``"auto"``."""
        fe = self.schedule.fisher_examples
        return self.engine.capture_examples if fe == "auto" else fe

    def _captured_batches(self, trainer: pl.Trainer) -> int:
        """Finite batches captured so far for the next round, summed over DDP ranks.

        Whether a round runs or is skipped must be decided alike on every rank: the round's
        collectives are entered by all of them or by none.
        """
        local = 0 if self._cap is None else self._cap.batches
        if not _is_distributed(trainer):
            return local
        total = torch.tensor(float(local), dtype=torch.float64, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(total, reduce_op="sum").item())

    def _release_capture(self) -> None:
        if self._cap is not None:
            self._cap.remove()
        self._cap = None

    def _forward(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        """The probe's forward: ``forward_fn(pl_module, batch)`` or ``pl_module(input_fn(batch))``,
        with an error that says which option to pass when it fails."""
        if self.forward_fn is not None:
            call, how = (lambda: self.forward_fn(pl_module, batch)), "forward_fn(pl_module, batch)"
        else:
            inp = self._input_of(batch)
            call, how = (lambda: pl_module(inp)), "pl_module(input)"
        try:
            return call()
        except Exception as err:
            raise RuntimeError(
                f"EigenDamagePruning could not run the model on a training batch: {how} raised "
                f"{type(err).__name__}: {err}. The callback runs extra forwards to measure curvature: "
                "if your forward takes more than the input, pass EigenDamagePruning(..., "
                "forward_fn=lambda module, batch: module(*batch)) returning the logits; if the input "
                "is elsewhere in the batch, pass input_fn=lambda batch: ... returning what "
                "pl_module(...) takes"
            ) from err

    def _input_of(self, batch: Any) -> Any:
        try:
            return split_batch(batch, self.input_fn)[0]
        except TypeError as err:
            raise TypeError(
                f"EigenDamagePruning cannot find the model input in a {type(batch).__name__} batch: "
                "pass EigenDamagePruning(..., input_fn=lambda batch: batch['x']) returning what "
                "pl_module(...) takes (its output must be the logits)"
            ) from err

    def _capture_sampled(self, pl_module: pl.LightningModule, batch: Any, fisher: str) -> None:
        """One extra forward/backward in eval mode feeding the capture (true or empirical)."""
        cap = self._ensure_capture(pl_module)
        t0 = time.perf_counter()
        self._capture_into(pl_module, cap, batch, fisher)
        self._cap_time += time.perf_counter() - t0
        self._example, self._example_saved = batch, False

    def _capture_into(self, pl_module: pl.LightningModule, cap: KFACapture, batch: Any, fisher: str) -> None:
        """One forward/backward of ``pl_module`` in eval mode on ``batch`` feeding ``cap``."""
        if self.forward_fn is not None:
            inp, target = batch, target_of(batch)
        else:
            inp = self._input_of(batch)
            target = split_batch(batch, self.input_fn)[1] if fisher == "empirical" else None
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            capture_batch(
                pl_module,
                cap,
                inp,
                target,
                fisher=fisher,
                loss_fn=self.loss_fn,
                likelihood=self.likelihood,
                class_dim=self.class_dim,
                generator=self._generator,
                forward_fn=self.forward_fn,
            )
        finally:
            for m, mode in modes.items():
                m.training = mode

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_captured = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step
        if self.gradual is not None:
            self._maybe_start_window(trainer, pl_module)
        if self.fisher == "empirical" and self._wants_capture(self._loop_state(trainer, batch_idx)):
            self._ensure_capture(pl_module).begin_batch()
            self._emp_active, self._emp_backward = True, False

    @override
    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        if not self._emp_active or self._cap is None:
            return
        # G hooks fire during this backward: undo the batch mean, Lightning's division by
        # accumulate_grad_batches and the gradient scaler's loss scale.
        n = self._cap.pending_examples or 1
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self._cap.grad_scale = n * max(1, trainer.accumulate_grad_batches) / scale
        self._emp_backward = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        state = self._loop_state(trainer, batch_idx)
        if self._emp_active:
            self._emp_active = False
            cap = self._cap
            if cap is not None and self._emp_backward:
                n = cap.pending_examples
                cap.end_batch(n)
                self._epoch_captured += 1
                self._example, self._example_saved = batch, False
            elif cap is not None:
                cap.abort_batch()
        elif self.fisher == "true" and self._wants_capture(state):
            self._capture_sampled(pl_module, batch, "true")
            self._epoch_captured += 1
        if self.gradual is not None and self._wants_window_capture(trainer):
            self._capture_into(pl_module, self._ensure_window_capture(pl_module), batch, self.fisher)
            self._gexample = batch
        for p in self._pending():
            # A due point that waits for factors and has none (e.g. right after another round)
            # is asked again at the next batch end.
            if p.due_at_batch_end(state) and self._has_factors_for(trainer, p):
                self._run_round(trainer, pl_module, p, on_step=True)
        # where a checkpoint written now stands: on an epoch's last batch, that epoch's end is
        # still to come (and a resume from it never runs it: _missed_epoch_ends)
        last = bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))
        self._last_batch = [int(trainer.current_epoch), last]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = self._loop_state(trainer)
        for p in self._pending():
            if p.due_at_epoch_end(state) and self._has_factors_for(trainer, p):
                self._run_round(trainer, pl_module, p, on_step=False)
        self._last_batch = [int(trainer.current_epoch), True]  # (as on its last batch: ended)

    # ------------------------------------------------------------------------------------------
    # Gradual removal (docs/method.md §5.1, lightning_eigendamage.gradual)
    # ------------------------------------------------------------------------------------------

    @property
    def gradual_window(self) -> GradualWindow | None:
        """The active window of gradual removal (prune point, steps, marked layers with their
        bases and removed directions), or None outside a window."""
        return self._window

    def _next_window(self) -> tuple[PrunePoint, int] | None:
        """The first pending epoch/step point (by the step after which it prunes) and that step.

        Only the first one: a later point's window waits until every earlier round has run, so
        its plan is made on the network that round leaves."""
        pending = [(self._gradual_ends[p.key], p) for p in self._pending() if p.key in self._gradual_ends]
        if not pending:
            return None
        end, point = min(pending, key=lambda ep: (ep[0], ep[1].key))
        return point, end

    def _wants_window_capture(self, trainer: pl.Trainer) -> bool:
        """Whether the current batch feeds the next window's factors: up to ``fisher_batches``
        batches of the ``ceil(fisher_batches / accumulate)`` optimizer steps before the window
        (every batch since the previous round if ``fisher_batches`` is None), and every batch
        from the window's start while no finite factors exist."""
        if self._window is not None:
            return False
        nxt = self._next_window()
        if nxt is None:
            return False
        start = nxt[1] - self.gradual.steps
        step = self._step_at_batch_start  # this batch contributes to step `step + 1`
        cap = self._gcap
        if step >= start:
            return cap is None or cap.batches == 0
        k = self.schedule.fisher_batches
        if k is None:
            return True
        seen = 0 if cap is None else cap.batches + cap.skipped_batches
        return step >= start - math.ceil(k / max(1, trainer.accumulate_grad_batches)) and seen < k

    def _ensure_window_capture(self, pl_module: pl.LightningModule) -> KFACapture:
        if self._gcap is None:
            self._gcap = self._open_capture(pl_module)
        return self._gcap

    def _release_window_capture(self) -> None:
        if self._gcap is not None:
            self._gcap.remove()
        self._gcap = None
        self._gexample = None

    def _window_batches(self, trainer: pl.Trainer) -> int:
        """Finite batches captured for the next window, summed over DDP ranks."""
        local = 0 if self._gcap is None else self._gcap.batches
        if not _is_distributed(trainer):
            return local
        total = torch.tensor(float(local), dtype=torch.float64, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(total, reduce_op="sum").item())

    def _maybe_start_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At the first batch of the next window (or later, once factors exist): plan, mark."""
        if self._window is not None:
            if self._window.point in self._done:  # e.g. restored with a round that already ran
                self._end_window()
            return
        nxt = self._next_window()
        if nxt is None:
            return
        point, end = nxt
        start = end - self.gradual.steps
        if trainer.global_step < start or self._window_batches(trainer) == 0:
            return  # the same answer on every rank: the planning collectives run on all or none
        captured, example = self._ensure_window_capture(pl_module).result(), self._gexample
        self._release_window_capture()
        distributed = _is_distributed(trainer)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PruningWarning)
            engine, options = self.engine, self._round_options()
            an, plan = engine.plan(
                pl_module,
                [example],
                point.fraction,
                options,
                captured=captured,
                distributed=distributed,
                prepared=self._round_prepared(),
            )
        for w in caught:
            if issubclass(w.category, PruningWarning):
                rank_zero_warn(
                    f"EigenDamagePruning gradual window before {point.key}: {w.message}", category=w.category
                )
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._window = GradualWindow(point.key, start, end, engine.marked_layers(an, plan, names))
        self._targets = None
        if self.verbose:
            marked = sum(len(m.removed_in) + len(m.removed_out) for m in self._window.layers)
            rank_zero_info(
                f"EigenDamagePruning: gradual removal before {point.describe()}: {marked} "
                f"{'eigen-direction(s)' if engine.name == 'eigenbasis' else 'input column(s)'} of "
                f"{len(self._window.layers)} layer(s) marked (factors from "
                f"{captured.batches} batch(es)); penalty up to {self.gradual.penalty:g} over optimizer "
                f"steps {start + 1}..{end}"
            )

    def _end_window(self) -> None:
        self._window = None
        self._targets = None

    def _window_targets(
        self, pl_module: pl.LightningModule
    ) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The window's layers as live tensors: (parameter, Q_A, Q_G, M) on the parameter's device,
        in float64 for a float64 parameter and float32 otherwise."""
        if self._targets is None:
            params = dict(pl_module.named_parameters())
            out, missing = [], []
            for m in self._window.layers:
                p = params.get(m.param)
                if p is None or not bases_fit(p, m.q_a, m.q_g):
                    missing.append(m.param)
                    continue
                work = torch.float64 if p.dtype == torch.float64 else torch.float32
                q_a = m.q_a.to(p.device, work)
                q_g = m.q_g.to(p.device, work)
                mask = marked_mask(
                    q_a.shape[0], q_g.shape[0], m.removed_in, m.removed_out, device=p.device, dtype=work
                )
                out.append((p, q_a, q_g, mask))
            if missing:
                rank_zero_warn(
                    f"EigenDamagePruning: the gradual window before {self._window.point} names "
                    f"parameters this model does not have (or of other shapes): {missing}; they are "
                    "not penalised"
                )
            self._targets = out
        return self._targets

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Add the gradual-removal penalty's gradient to the marked weights this optimizer holds."""
        win = self._window
        if win is None:
            return
        if win.point in self._done:
            self._end_window()
            return
        lam = self.gradual.strength(trainer.global_step + 1 - win.start)
        if lam <= 0.0:
            return
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for p, q_a, q_g, mask in self._window_targets(pl_module):
            if id(p) not in held or not p.requires_grad:
                continue
            grad = penalty_grad(p.detach(), q_a, q_g, mask, lam).to(p.dtype)
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)

    def _train_batches(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, limit: int | None
    ) -> Iterator:
        loader = trainer.train_dataloader
        if loader is None:
            return
        if isinstance(loader, (Mapping, list, tuple)):
            raise TypeError(
                "EigenDamagePruning reads training batches at the start of fit and supports a single "
                f"training DataLoader (or iterable), got a {type(loader).__name__} of them"
            )
        n = trainer.num_training_batches
        if math.isfinite(n):
            limit = int(n) if limit is None else min(limit, int(n))
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                return
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    def _prune_at_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: PrunePoint) -> None:
        with _preserve_rng(pl_module.device, trainer.train_dataloader):
            for batch in self._train_batches(trainer, pl_module, self.schedule.fisher_batches):
                self._capture_sampled(pl_module, batch, self.fisher)
        self._run_round(trainer, pl_module, point, on_step=False)

    # ------------------------------------------------------------------------------------------
    # A pruning round
    # ------------------------------------------------------------------------------------------

    def prune_model(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, captured: Any, fraction: float, example: Any
    ) -> tuple[PruneReport, Any]:
        """Prune ``pl_module`` in place with the accumulated factors (override to customise).

        Returns the report and the engine's change, used to carry optimizer state over: for the
        eigenbasis, per rebuilt layer its :class:`~lightning_eigendamage.plan.LayerChange`; for
        channels a :class:`~lightning_eigendamage.channels.ChannelChange`; under
        ``structure="auto"`` with channels, where layers channels cannot reach (untraced, Conv1d)
        were pruned in their eigenbasis (from the same captured factors, as
        :func:`~lightning_eigendamage.prune` does), a
        :class:`~lightning_eigendamage.fallback.MixedChange` of both.
        """
        options = self._round_options()
        if options.recalibrate_bn and self._example_saved:
            options = dataclasses.replace(options, recalibrate_bn=False)
            rank_zero_info(
                "EigenDamagePruning: BatchNorm statistics are not re-estimated in this round: it "
                "resumed inside its capture window, and the checkpoint keeps one example, not a batch"
            )
        if self._mixed():  # layers in no traced part of the channel graph: in their eigenbasis
            report, change = channels_with_eigenbasis(
                pl_module,
                [example],
                fraction,
                options,
                self.engine,
                distributed=_is_distributed(trainer),
                prepared=self._round_prepared(),
                captured=captured,
            )
            return report, (change if change.eigen else change.channels)  # channels alone: their own
        return self.engine.prune(
            pl_module,
            [example],
            ratio=fraction,
            options=options,
            captured=captured,
            distributed=_is_distributed(trainer),
            prepared=self._round_prepared(),
        )

    def _mixed(self) -> bool:
        """Whether rounds prune in both structures: ``structure="auto"`` chose channels, and the
        layers channels cannot reach (untraced, Conv1d) go to the eigenbasis."""
        return self.options.structure == "auto" and self._structure == "channels"

    def on_after_surgery(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        report: PruneReport,
        changes: Any,
    ) -> None:
        """Called after each round's surgery, before the DDP wrapper and the optimizers are rebuilt.

        Override to inspect or log the freshly pruned module. Under DDP it runs on every rank:
        this is the last point where the ranks' own parameters can be compared (the new DDP
        wrapper broadcasts rank 0's). ``changes`` is the engine's change (see :meth:`prune_model`).
        """

    def _run_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: PrunePoint, *, on_step: bool
    ) -> None:
        cap = self._cap
        self._done.add(point.key)
        if self._window is not None or self._gcap is not None:
            self._end_window()  # every round ends its window; factors from before it are stale
            self._release_window_capture()
        if self._captured_batches(trainer) == 0:  # the same answer on every rank
            skipped = 0 if cap is None else cap.skipped_batches
            self._release_capture()
            self.skipped_rounds.append(point.key)
            rank_zero_warn(
                f"EigenDamagePruning: round {point.key} skipped: no curvature was captured for it "
                f"({skipped} non-finite batch(es)); the model was left as it is"
            )
            return
        if cap is None:  # a rank other than 0 on a resume (rank 0 alone took the saved factors)
            cap = self._ensure_capture(pl_module)
        captured = cap.result()  # under DDP a rank whose batches were all non-finite brings zeros
        t_capture = self._cap_time
        self._release_capture()

        t0 = time.perf_counter()
        if self.verbose:  # the scores can take a while on a large network: say where it is
            rank_zero_info(
                f"EigenDamagePruning round {point.key}: curvature of {captured.batches} batch(es) "
                f"captured{' on rank 0' if _is_distributed(trainer) else ''} ({t_capture:.1f} s); "
                f"scoring and removing ({self._structure}) …"
            )
        old_optimizers = list(trainer.optimizers)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PruningWarning)
            report, changes = self.prune_model(trainer, pl_module, captured, point.fraction, self._example)
        for w in caught:  # every rank runs prune(): say its warnings once, on rank zero
            if issubclass(w.category, PruningWarning):
                rank_zero_warn(f"EigenDamagePruning round {point.key}: {w.message}", category=w.category)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        t_prune = time.perf_counter() - t0
        self.on_after_surgery(trainer, pl_module, report, changes)
        self._example = None

        t0 = time.perf_counter()
        transplant = self._rebuild_optimizers(trainer, pl_module, old_optimizers, changes)
        t_optim = time.perf_counter() - t0

        if self._dense is None:
            self._dense = (report.params_before, report.flops_before)
        timing = {"capture_s": t_capture, "prune_s": t_prune, "optim_s": t_optim}
        report.structure_reason = self._structure_reason
        self.reports.append(report)
        self.transplants.append(transplant.to_dict())
        self.timings.append(timing)
        self._log_round(pl_module, report, timing, on_step)
        if self.verbose:
            rank_zero_info(
                self._round_text(point, report, captured, timing, transplant, _is_distributed(trainer))
            )

    def _round_text(
        self,
        point: PrunePoint,
        report: PruneReport,
        captured: Any,
        timing: dict[str, float],
        transplant: TransplantReport,
        distributed: bool = False,
    ) -> str:
        """The console text of one round: where and how it ran, the report's own
        :meth:`~lightning_eigendamage.PruneReport.summary` (the same table ``prune()`` gives), the
        totals against the dense model once more than one round ran, and the optimizer state."""
        lines = [
            f"EigenDamagePruning round {len(self.reports)} ({point.describe()}, fraction "
            f"{point.fraction:g} of {report.target}, {report.structure}): factors from "
            f"{captured.batches} batch(es){' over all ranks' if distributed else ''}"
            f"{self._examples_text()} ({captured.skipped_batches} "
            "non-finite skipped); "
            f"capture {timing['capture_s']:.2f} s, prune {timing['prune_s']:.2f} s, "
            f"optimizer {timing['optim_s']:.2f} s",
            report.summary(),
        ]
        if len(self.reports) > 1 and self._dense is not None:
            params, flops = self._dense
            lines.append(
                f"{'dense':<9} params {params:,} → {report.params_after:,} "
                f"(÷{params / max(report.params_after, 1):.2f}), FLOPs {flops:,} → "
                f"{report.flops_after:,} (÷{flops / max(report.flops_after, 1):.2f}) over "
                f"{len(self.reports)} rounds"
            )
        lines.append(transplant.summary())
        return "\n".join(lines)

    def _log_round(
        self, pl_module: pl.LightningModule, report: PruneReport, timing: dict[str, float], on_step: bool
    ) -> None:
        dense_params, dense_flops = self._dense
        metrics = {
            "pruning/params": float(report.params_after),
            "pruning/flops": float(report.flops_after),
            "pruning/compression": dense_flops / max(report.flops_after, 1),
            "pruning/param_compression": dense_params / max(report.params_after, 1),
            "pruning/realised_fraction": float(report.realised_fraction),
            "pruning/target_reached": float(report.target_reached),
            "pruning/round": float(len(self.reports)),
            "pruning/time_capture_s": timing["capture_s"],
            "pruning/time_prune_s": timing["prune_s"],
            "pruning/time_optim_s": timing["optim_s"],
        }
        # Under DDP every rank logs the same values, except timings: those are averaged.
        sync = _is_distributed(pl_module.trainer)
        pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step, batch_size=1, sync_dist=sync)

    # ------------------------------------------------------------------------------------------
    # Optimizers
    # ------------------------------------------------------------------------------------------

    def _rebuild_optimizers(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        old_optimizers: list[torch.optim.Optimizer],
        changes: Any,
    ) -> TransplantReport:
        """Rebuild optimizers through ``configure_optimizers``; restore LR schedulers and
        param-group hyperparameters; carry optimizer state over."""
        strategy = trainer.strategy
        sched_states = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
        sched_opts = [
            _index(old_optimizers, getattr(cfg.scheduler, "optimizer", None))
            for cfg in trainer.lr_scheduler_configs
        ]
        hparams = [
            [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in old_optimizers
        ]
        if isinstance(strategy, DDPStrategy) and strategy.model is not pl_module:
            # The DDP wrapper's reducer knows the old parameters: wrap the pruned module anew.
            strategy.model = pl_module
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)
        new_optimizers = list(trainer.optimizers)
        replaced = (
            mixed_replaced(self.engine, changes)
            if isinstance(changes, MixedChange)
            else self.engine.replaced_parameters(changes)
        )
        # each rebuilt param group continues the old group its parameters come from (by position
        # where the counts agree and no parameter says otherwise)
        maps: list[list[int] | None] = [None] * len(new_optimizers)
        if len(new_optimizers) == len(old_optimizers):
            maps = [
                group_map(o, n, replaced)
                or (list(range(len(o.param_groups))) if len(o.param_groups) == len(n.param_groups) else None)
                for o, n in zip(old_optimizers, new_optimizers)
            ]
        configs = trainer.lr_scheduler_configs
        if len(configs) == len(sched_states):
            for cfg, state, i in zip(configs, sched_states, sched_opts):
                if i is not None and maps[i] is not None:
                    state = remap_group_lists(state, maps[i], len(old_optimizers[i].param_groups))
                cfg.scheduler.load_state_dict(state)
        elif sched_states:
            rank_zero_warn(
                f"EigenDamagePruning: configure_optimizers returned {len(configs)} LR scheduler(s) "
                f"after pruning, {len(sched_states)} before; their state was not restored"
            )
        if len(new_optimizers) == len(old_optimizers):
            _warn_merged_groups(old_optimizers, new_optimizers, replaced)
        if len(new_optimizers) == len(hparams) and all(m is not None for m in maps):
            for opt, groups, mapping in zip(new_optimizers, hparams, maps):
                for group, j in zip(opt.param_groups, mapping):
                    group.update({k: v for k, v in groups[j].items() if not isinstance(v, str)})
        else:
            rank_zero_warn(
                "EigenDamagePruning: the rebuilt optimizers' param groups do not correspond to the "
                "old ones (a group holds no parameter of an old group); learning rates and other "
                "group hyperparameters were not restored"
            )
        if isinstance(changes, MixedChange):
            report = carry_mixed_state(self.engine, pl_module, old_optimizers, new_optimizers, changes)
        else:
            report = self.engine.carry_optimizer_state(pl_module, old_optimizers, new_optimizers, changes)
        self._check_coverage(pl_module, old_optimizers, new_optimizers, replaced)
        return report

    @staticmethod
    def _check_coverage(
        pl_module: nn.Module,
        old_optimizers: list[torch.optim.Optimizer],
        new_optimizers: list[torch.optim.Optimizer],
        replaced: list[tuple[str, list[nn.Parameter], list[nn.Parameter]]],
    ) -> None:
        in_model = {id(p) for p in pl_module.parameters()}
        held = {id(p) for o in new_optimizers for g in o.param_groups for p in g["params"]}
        held_before = {id(p) for o in old_optimizers for g in o.param_groups for p in g["params"]}
        if held - in_model:
            raise RuntimeError(
                "after pruning, configure_optimizers returned parameters that are no longer in the "
                "model: build the optimizer from self.parameters() inside configure_optimizers, not "
                "from a list made earlier"
            )
        names = {id(p): n for n, p in pl_module.named_parameters()}
        missing = []
        for name, old, new in replaced:
            was_trained = any(id(p) in held_before for p in old)
            for p in new:
                if was_trained and p.requires_grad and id(p) not in held:
                    missing.append(names.get(id(p), name))
        if missing:
            raise RuntimeError(
                f"after pruning, the rebuilt optimizers do not hold the new parameters of {missing}; "
                "build the optimizer from self.parameters() (or named_parameters()) inside "
                "configure_optimizers"
            )

    # ------------------------------------------------------------------------------------------
    # End of fit and state
    # ------------------------------------------------------------------------------------------

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release_capture()
        self._release_window_capture()
        missed = [p.key for p in self._pending()]
        if missed and not trainer.interrupted:
            rank_zero_warn(
                f"EigenDamagePruning: training ended (epoch {trainer.current_epoch}, global step "
                f"{trainer.global_step}) before the round(s) {', '.join(missed)} ran: the model was "
                "pruned less than scheduled. An early stop (EarlyStopping, should_stop), a step "
                "point beyond the run's optimizer steps (under manual optimization global_step "
                "counts every optimizer.step()), or limit_train_batches can cause this"
            )

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release_capture()
        self._release_window_capture()
        self._remove_loading_hook()  # Lightning calls no teardown after an exception
        self._release_compiled_hooks()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release_capture()
        self._release_window_capture()
        self._remove_loading_hook()
        if stage == "fit":
            self._release_compiled_hooks()

    def _release_compiled_hooks(self) -> None:
        if self._compiled_hooks is not None:
            self._compiled_hooks.close()
            self._compiled_hooks = None

    def _remove_loading_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain data (loads with ``torch.load(weights_only=True)``): rounds done, reports,
        optimizer-state summaries, timings, the sampling generator's state and, when the
        checkpoint falls inside a capture window, the factors accumulated so far (float64 sums,
        ``C_in² + C_out²`` numbers per prunable layer) with the window's batch counts and one
        example (the first row of the last captured batch, if it is made of tensors). With
        ``gradual`` set, also ``"gradual"``: the active window's plain data
        (:meth:`~lightning_eigendamage.gradual.GradualWindow.to_dict`) or None, and
        ``"window_capture"`` / ``"window_example"``: the factors captured so far for the next
        window and its example, when the checkpoint falls among the batches they come from."""
        gen = self._generator_state
        if gen is None and self._generator is not None:
            gen = self._generator.get_state()
        state = {
            "version": _STATE_VERSION,
            "structure": self._structure,
            "structure_reason": self._structure_reason,
            "done": sorted(self._done),
            "skipped_rounds": list(self.skipped_rounds),
            "reports": [r.to_dict() for r in self.reports],
            "transplants": list(self.transplants),
            "timings": list(self.timings),
            "dense": list(self._dense) if self._dense is not None else None,
            "generator": gen,
            "capture": self._cap.state_dict() if self._cap is not None else self._saved_capture,
            "capture_time": self._cap_time,
            "epoch_captured": self._epoch_captured,
            "example": _plain_example(self._example) if self._cap is not None else None,
            # [epoch, whether it was that epoch's last batch] of the last training batch (also
            # [epoch, True] after the epoch's end); None before the first batch
            "last_batch": getattr(self, "_last_batch", None),
        }
        if self.gradual is not None:
            state["gradual"] = self._window.to_dict() if self._window is not None else None
            # the next window's factors, when the checkpoint falls among the batches they come from
            gcap = self._gcap
            state["window_capture"] = gcap.state_dict() if gcap is not None else self._saved_window_capture
            state["window_example"] = _plain_example(self._gexample) if gcap is not None else None
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version", 1)
        if not isinstance(version, int) or version > _STATE_VERSION:
            raise ValueError(
                f"EigenDamagePruning state version {version!r} is newer than this library's "
                f"({_STATE_VERSION}); upgrade lightning-eigendamage to resume from this checkpoint"
            )
        # Checkpoints before version 3 come from eigenbasis runs; an undecided "auto" is None.
        saved = state_dict.get("structure", "eigenbasis" if version < 3 else None)
        if saved is not None and self.options.structure not in ("auto", saved):
            raise ValueError(
                f"this checkpoint was made by EigenDamagePruning(structure={saved!r}); resuming it with "
                f"structure={self.options.structure!r} would mix two structures in one model: pass "
                f"structure={saved!r} (or 'auto')"
            )
        self._structure = saved if saved is not None else self._structure
        self._structure_reason = state_dict.get("structure_reason")
        self._done = set(state_dict.get("done", []))
        self.skipped_rounds = list(state_dict.get("skipped_rounds", []))
        self.reports = [PruneReport.from_dict(r) for r in state_dict.get("reports", [])]
        self.transplants = list(state_dict.get("transplants", []))
        self.timings = list(state_dict.get("timings", []))
        dense = state_dict.get("dense")
        self._dense = (int(dense[0]), int(dense[1])) if dense is not None else None
        # Applied in on_fit_start, which (re)creates the generator on the module's device.
        self._generator_state = state_dict.get("generator")
        # Factors of an unfinished capture window: hooked up again in on_fit_start.
        self._release_capture()
        self._saved_capture = state_dict.get("capture")
        self._resumed_at = state_dict.get("last_batch")
        self._cap_time = float(state_dict.get("capture_time", 0.0))
        self._epoch_captured = int(state_dict.get("epoch_captured", 0))
        self._example = state_dict.get("example")
        self._example_saved = self._example is not None  # one row: too few for BatchNorm statistics
        # The active window of gradual removal, if any, and the factors of the next one captured
        # so far (hooked up again in on_fit_start, as the round's).
        self._release_window_capture()
        self._saved_window_capture = state_dict.get("window_capture")
        self._gexample = state_dict.get("window_example")
        window = state_dict.get("gradual")
        self._window = (
            GradualWindow.from_dict(window) if window is not None and self.gradual is not None else None
        )
        self._targets = None


def _check_other_callbacks(trainer: pl.Trainer) -> None:
    """Refuse, before training, callbacks that keep their own copy of the model's weights: a
    pruning round changes the shapes, and the copy then no longer fits (Lightning's
    ``StochasticWeightAveraging`` copies the module at the start of fit and fails at its first
    update after a round)."""
    from lightning.pytorch import callbacks

    # Lightning ≥ 2.6 also has WeightAveraging (EMAWeightAveraging and user subclasses)
    names = ("StochasticWeightAveraging", "WeightAveraging")
    copies = tuple(getattr(callbacks, n) for n in names if hasattr(callbacks, n))
    for cb in trainer.callbacks:
        if isinstance(cb, copies):
            name = type(cb).__name__
            raise ValueError(
                f"EigenDamagePruning cannot run beside {name}: it averages into a copy of the "
                "model taken at the start of fit, and pruning changes the layers' shapes. Prune "
                f"in one fit, then start a second fit with {name} on the pruned model"
            )


def _plain_example(batch: Any) -> Any:
    """The first example of ``batch`` as plain data (CPU tensors in tuples, lists and dicts with
    string keys), or None if the batch holds anything else."""
    if torch.is_tensor(batch):
        return batch.detach()[:1].to("cpu", copy=True) if batch.dim() > 0 else batch.detach().cpu()
    if type(batch) in (tuple, list):
        items = [_plain_example(b) for b in batch]
        return None if any(i is None for i in items) else type(batch)(items)
    if type(batch) is dict and all(isinstance(k, str) for k in batch):
        items = {k: _plain_example(v) for k, v in batch.items()}
        return None if any(v is None for v in items.values()) else items
    return None


def _check_strategy(strategy: Strategy) -> None:
    """Refuse strategies whose parameters are sharded or wrapped in ways surgery cannot follow."""
    unsupported = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, XLAStrategy)
    if isinstance(strategy, SingleDeviceStrategy) or (
        isinstance(strategy, DDPStrategy) and not isinstance(strategy, unsupported)
    ):
        return
    raise NotImplementedError(
        f"EigenDamagePruning does not support {type(strategy).__name__} yet. Supported: "
        "SingleDeviceStrategy (one device, strategy='auto') and DDPStrategy (strategy='ddp', "
        "'ddp_spawn', 'ddp_fork' or 'ddp_notebook'; any number of devices and num_nodes). "
        "FSDP, DeepSpeed, model-parallel and multi-device XLA strategies shard or wrap the "
        "parameters in ways the layer surgery cannot follow."
    )


def _warn_merged_groups(old: list[Any], new: list[Any], replaced: Any) -> None:
    """Warn where a rebuilt param group holds the parameters of several old groups whose learning
    rates differ (a group a callback added during training, as ``BackboneFinetuning`` does, which
    ``configure_optimizers`` does not return): the group continues the first one's."""
    for i, (o, n) in enumerate(zip(old, new)):
        for g, origins in enumerate(group_origins(o, n, replaced)):
            lrs = [o.param_groups[j].get("lr") for j in origins]
            if len(set(lrs)) > 1:
                rank_zero_warn(
                    f"EigenDamagePruning: param group {g} of the rebuilt optimizer {i} holds parameters "
                    f"of {len(origins)} param groups of the old one, with learning rates {lrs} (a group "
                    "added during training, e.g. by BackboneFinetuning, is not returned by "
                    f"configure_optimizers): it continues with the first's ({lrs[0]}). Return those "
                    "groups from configure_optimizers, or prune before the unfreeze"
                )


def _index(items: list[Any], item: Any) -> int | None:
    """The position of ``item`` (by identity) in ``items``, or None."""
    return next((i for i, x in enumerate(items) if x is item), None)


def _manual(trainer: pl.Trainer) -> bool:
    """Whether the LightningModule steps its optimizers itself (``automatic_optimization=False``):
    then ``trainer.global_step`` counts every ``optimizer.step()`` it makes (two per batch with two
    optimizers, fewer where it accumulates), which no count of batches predicts."""
    module = trainer.lightning_module
    return module is not None and not module.automatic_optimization


def _varying_accumulation(trainer: pl.Trainer) -> bool:
    """Whether a ``GradientAccumulationScheduler`` sets ``accumulate_grad_batches`` per epoch."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    return any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks)


def _steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps in one epoch, ``ceil(num_training_batches / accumulate_grad_batches)``
    (Lightning steps on an epoch's last batch even when the accumulation is incomplete); None
    while the training data has no length, under manual optimization (:func:`_manual`) and
    while a ``GradientAccumulationScheduler`` changes the accumulation between epochs."""
    if _manual(trainer) or _varying_accumulation(trainer):
        return None
    batches = trainer.num_training_batches
    if not isinstance(batches, (int, float)) or not math.isfinite(batches):
        return None
    return math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches))


def _is_distributed(trainer: pl.Trainer) -> bool:
    """True under a DDP strategy with more than one process and an initialised process group."""
    return trainer.world_size > 1 and isinstance(trainer.strategy, DDPStrategy) and is_distributed()


def _routes(model: nn.Module, cands: list[Candidate]) -> dict[nn.Module, nn.Module]:
    """The candidates to capture that their module calls functionally (an
    ``nn.MultiheadAttention``'s ``out_proj``, scored per head), each mapped to that module."""
    owners = functional_owners(model)
    return {
        c.hook_module: owners[c.hook_module] for c in cands if c.skipped is None and c.hook_module in owners
    }


@contextlib.contextmanager
def _preserve_rng(device: torch.device, loader: Any = None) -> Iterator[None]:
    """Restore torch (CPU and ``device``), Python and NumPy global RNG states on exit, and the
    states of the ``torch.Generator`` objects of ``loader`` (its own, its sampler's and its batch
    sampler's).

    Iterating a DataLoader draws its base seed (and a shuffling sampler's permutation) from its
    own generator, or from the global RNG without one; the callback's own passes over the
    training data must not shift the user's run.
    """
    gens = _generators_of(loader)
    states = [g.get_state() for g in gens]
    try:
        with _preserve_global_rng(device):
            yield
    finally:
        for g, state in zip(gens, states):
            g.set_state(state)


def _generators_of(loader: Any) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects a DataLoader draws from."""
    found: list[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and not any(g is f for f in found):
            found.append(g)
    return found


@contextlib.contextmanager
def _preserve_global_rng(device: torch.device) -> Iterator[None]:
    """Restore torch (CPU and ``device``), Python and NumPy global RNG states on exit."""
    devices = [device.index or 0] if device.type == "cuda" else []
    py_state = random.getstate()
    np_state = None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        np = None
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)
