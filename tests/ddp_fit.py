"""A small multi-process fit with EigenDamagePruning that records what every rank holds.

Used by ``tests/test_ddp.py`` in two ways: imported, for ``strategy="ddp_spawn"`` inside pytest's
process, and run as a script in a subprocess for ``strategy="ddp"`` (Lightning re-launches the
script's own command line as rank 1; under pytest it would re-launch pytest itself):

    python tests/ddp_fit.py --config rounds --strategy ddp --out DIR

Each rank writes ``DIR/rank{r}.pt`` (plain data, ``weights_only=True``) at the end of fit: per
round the plan, the parameters right after the surgery (before the DDP re-wrap, whose broadcast
would hide a difference), the factors the decision used, the momentum buffers after the optimizer
rebuild, this rank's own factors before the reduction; and the rank's training losses per epoch.

Configurations:

- ``rounds``: two prune rounds (ends of epochs 0 and 1, true Fisher) and three more epochs.
- ``start_step``: empirical Fisher; one round at the start of fit (captured in eval mode, on
  BatchNorm running statistics, on every batch of each rank's half of the data), then one after
  optimizer step 3 (captured in the training steps), then two more steps.
- ``channels``: as ``rounds`` with ``structure="channels"`` (40 % of the channels each round).
- ``gradual``: true Fisher, gradual removal (``GradualRemoval(steps=4, penalty=10)``) over optimizer
  steps 4..7 before a round after step 7, then two more steps. :class:`GradualRecorder` also writes
  the window (bases, masks), this rank's window factors before their reduction, and the parameters
  at the window's first penalised step and at the prune.
"""

from __future__ import annotations

import argparse
import os
import sys
import weakref
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lit_models, when run as a script
from lit_models import LitClassifier, small_cnn  # noqa: E402

import lightning_eigendamage  # noqa: E402
from lightning_eigendamage import (  # noqa: E402
    EigenDamagePruning,
    GradualRemoval,
    PruningSchedule,
    enable_pruned_loading,
)
from lightning_eigendamage.channels.engine import ChannelChange  # noqa: E402
from lightning_eigendamage.eigenbasis.pruner import LayerChange, PruneReport  # noqa: E402

N_EXAMPLES = 64  # even: DistributedSampler pads nothing with 2 ranks
BATCH = 4
CLASSES = 4
SIZE = 8


def dataset(seed: int = 0) -> TensorDataset:
    """Noise images shifted by a per-class colour (learnable in a few epochs)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (N_EXAMPLES,), generator=g)
    colours = torch.randn(CLASSES, 3, generator=g)
    x = torch.randn(N_EXAMPLES, 3, SIZE, SIZE, generator=g) + colours[y][:, :, None, None]
    return TensorDataset(x, y)


class ConvAttention(nn.Module):
    """Two conv-BN-ReLU stages, the 4×4 feature map as 16 tokens through a 4-head
    ``nn.MultiheadAttention`` with a residual, mean-pool, Linear: channels and heads to prune."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x).flatten(2).transpose(1, 2)  # (N, 16, 32)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.fc(h.mean(1))


def build_model(seed: int = 0, structure: str = "eigenbasis") -> LossLog:
    """The same initial weights in every process that calls it (``structure="heads"``: the
    channel structure on :class:`ConvAttention`)."""
    torch.manual_seed(seed)
    if structure == "heads":
        return LossLog(ConvAttention())
    layers = list(small_cnn(n_classes=CLASSES))
    layers.insert(4, nn.BatchNorm2d(32))  # after a pruned conv: re-estimated after each round
    if structure == "channels":  # after a compensated reader (of the conv before the first BN)
        layers.insert(7, nn.BatchNorm2d(32))
    return LossLog(nn.Sequential(*layers))


class LossLog(LitClassifier):
    """:class:`LitClassifier` that keeps this rank's training losses, per epoch.

    It calls :func:`~lightning_eigendamage.enable_pruned_loading`, as the README asks of
    ``ddp_spawn`` users: the main process loads rank 0's pruned weights after fit.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net, lr=0.05, momentum=0.9)
        self.losses: dict[int, list[float]] = {}
        enable_pruned_loading(self)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.setdefault(self.current_epoch, []).append(float(loss.detach()))
        return loss


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _kept(changes: Any) -> dict[str, Any]:
    """What a round kept, as plain data: per rebuilt layer its kept directions and form
    (eigenbasis), or per narrowed parameter the flat positions it kept (channels)."""
    if isinstance(changes, ChannelChange):
        return {n: s.index.tolist() for n, s in changes.params.items()}
    return {n: [list(c.kept_in), list(c.kept_out), c.form] for n, c in changes.items()}


class RankRecorder(EigenDamagePruning):
    """EigenDamagePruning that writes, per rank, what each round left (see the module docstring)."""

    def __init__(self, out_dir: str, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("verbose", False)
        super().__init__(*args, **kwargs)
        self.out_dir = out_dir
        self.rounds: list[dict[str, Any]] = []
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._local: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._wrapper_before: weakref.ref | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        torch.set_num_threads(1)  # 2 processes on 2 shared cores
        super().setup(trainer, pl_module, stage)

    def prune_model(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, captured: Any, fraction: float, example: Any
    ) -> tuple[PruneReport, dict[str, LayerChange]]:
        self._wrapper_before = weakref.ref(trainer.strategy.model)  # ids of freed objects get reused
        self._local = {
            n: (_cpu(lf.a()), _cpu(lf.g())) for n, lf in captured.layers.items() if lf.a_sum is not None
        }
        report, changes = super().prune_model(trainer, pl_module, captured, fraction, example)
        # Under DDP prune() reduced `captured` in place: these are the factors the decision used.
        self._factors = {
            n: (_cpu(lf.a()), _cpu(lf.g())) for n, lf in captured.layers.items() if lf.a_sum is not None
        }
        return report, changes

    def on_after_surgery(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        report: PruneReport,
        changes: dict[str, LayerChange],
    ) -> None:
        self.rounds.append(
            {
                "epoch": trainer.current_epoch,
                "plan": [[r.name, r.kept_in, r.kept_out, r.form] for r in report.layers],
                "groups": [dict(g) for g in report.groups],
                "kept": _kept(changes),
                "realised_fraction": report.realised_fraction,
                "params_after": report.params_after,
                "params": {n: _cpu(p) for n, p in pl_module.named_parameters()},
                "recalibrated_bn": list(report.recalibrated_bn),
                "bn": {n: _cpu(b) for n, b in pl_module.named_buffers() if "running_" in n},
                "factors": self._factors,
                "local_factors": self._local,
            }
        )

    def _after_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rounds_before: int) -> None:
        if len(self.reports) == rounds_before:
            return
        names = {id(p): n for n, p in pl_module.named_parameters()}
        momentum = {}
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
                    if buf is not None:
                        momentum[names[id(p)]] = _cpu(buf)
        wrapper = trainer.strategy.model
        self.rounds[-1]["momentum"] = momentum
        self.rounds[-1]["rewrapped"] = (
            isinstance(wrapper, nn.parallel.DistributedDataParallel)
            and wrapper.module is pl_module
            and self._wrapper_before is not None
            and self._wrapper_before() is not wrapper
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = len(self.reports)
        super().on_train_start(trainer, pl_module)
        self._after_round(trainer, pl_module, n)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = len(self.reports)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._after_round(trainer, pl_module, n)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = len(self.reports)
        super().on_train_epoch_end(trainer, pl_module)
        self._after_round(trainer, pl_module, n)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "start_method": getattr(trainer.strategy, "_start_method", None),
                "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else "",
                "package": os.path.abspath(lightning_eigendamage.__file__),
                "rounds": self.rounds,
                "losses": {int(e): list(v) for e, v in getattr(pl_module, "losses", {}).items()},
                "final": {n: _cpu(p) for n, p in pl_module.named_parameters()},
                "generator": self._generator.get_state() if self._generator is not None else None,
                **self._extra(),
            },
            os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"),
        )

    def _extra(self) -> dict[str, Any]:
        """More to write per rank (subclasses)."""
        return {}


class GradualRecorder(RankRecorder):
    """RankRecorder that also writes what a gradual-removal window held on this rank."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.windows: list[dict[str, Any]] = []
        self.window_local: dict[str, torch.Tensor] = {}
        self.window_start: dict[str, torch.Tensor] = {}
        self.window_end: dict[str, torch.Tensor] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        cap = self._gcap
        if cap is not None and self.gradual_window is None:  # the window's factors, before the reduction
            self.window_local = {n: _cpu(lf.a()) for n, lf in cap.layers.items() if lf.a_sum is not None}
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        window = self.gradual_window
        if window is not None and not any(w["point"] == window.point for w in self.windows):
            self.windows.append(window.to_dict())
            self.window_start = {n: _cpu(p) for n, p in pl_module.named_parameters()}
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def prune_model(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, captured: Any, fraction: float, example: Any
    ) -> tuple[PruneReport, dict[str, LayerChange]]:
        self.window_end = {n: _cpu(p) for n, p in pl_module.named_parameters()}
        return super().prune_model(trainer, pl_module, captured, fraction, example)

    def _extra(self) -> dict[str, Any]:
        return {
            "windows": self.windows,
            "window_local": self.window_local,
            "window_start": self.window_start,
            "window_end": self.window_end,
        }


START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn"}  # as in DDPStrategy.register_strategies
CONFIGS: dict[str, dict[str, Any]] = {
    "rounds": {"schedule": {0: 0.5, 1: 0.5}, "fisher": "true", "trainer": {"max_epochs": 5}},
    "channels": {
        "schedule": {0: 0.4, 1: 0.4},
        "fisher": "true",
        "trainer": {"max_epochs": 5},
        "structure": "channels",
    },
    "heads": {  # channels and attention heads (the model: ConvAttention)
        "schedule": {0: 0.3, 1: 0.3},
        "fisher": "true",
        "trainer": {"max_epochs": 5},
        "structure": "heads",
    },
    "start_step": {
        "schedule": PruningSchedule(at_start=0.5, steps={3: 0.5}),
        "fisher": "empirical",
        "trainer": {"max_epochs": 1, "max_steps": 5},
    },
    "gradual": {
        "schedule": PruningSchedule(steps={7: 0.5}, fisher_batches=2),
        "fisher": "true",
        "trainer": {"max_epochs": 2, "max_steps": 9},
        "gradual": GradualRemoval(steps=4, penalty=10.0),
    },
}


def run(config: str, out_dir: str, *, strategy: str, accelerator: str = "cpu", devices: int = 2) -> LossLog:
    """Fit ``build_model()`` on ``dataset()`` with ``RankRecorder``; return this process's model.

    ``strategy`` (``"ddp"`` or ``"ddp_spawn"``) is built as Lightning's registry builds it,
    ``DDPStrategy(start_method=...)``, plus a short collective timeout, so that ranks that fall
    out of step fail the test instead of hanging it for Lightning's default 30 minutes.
    """
    cfg = CONFIGS[config]
    if "gradual" in cfg:
        callback = GradualRecorder(
            out_dir, cfg["schedule"], fisher=cfg["fisher"], gradual=cfg["gradual"], structure="eigenbasis"
        )
    else:
        structure = cfg.get("structure", "eigenbasis")
        callback = RankRecorder(
            out_dir,
            cfg["schedule"],
            fisher=cfg["fisher"],
            structure="channels" if structure == "heads" else structure,
        )
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=DDPStrategy(start_method=START_METHODS[strategy], timeout=timedelta(seconds=120)),
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **cfg["trainer"],
    )
    model = build_model(structure=cfg.get("structure", "eigenbasis"))
    trainer.fit(model, DataLoader(dataset(), batch_size=BATCH, shuffle=False))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=sorted(START_METHODS), default="ddp")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.config, args.out, strategy=args.strategy, accelerator=args.accelerator, devices=args.devices)


if __name__ == "__main__":
    main()
