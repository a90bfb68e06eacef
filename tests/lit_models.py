"""Small LightningModules, data and helpers shared by the callback tests (CPU, seconds per fit)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


class LitClassifier(pl.LightningModule):
    """Wraps any classifier ``net``; SGD (or ``opt``) and an optional LR scheduler factory."""

    def __init__(
        self,
        net: nn.Module,
        *,
        lr: float = 0.05,
        momentum: float = 0.9,
        opt: str = "sgd",
        scheduler: Any = None,
        interval: str = "epoch",
    ) -> None:
        super().__init__()
        self.net = net
        self.lr, self.momentum, self.opt = lr, momentum, opt
        self.scheduler, self.interval = scheduler, interval
        self.steps_run = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        if self.opt == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.scheduler is None:
            return opt
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": self.interval},
        }


def small_cnn(n_classes: int = 10, bn: bool = True, dropout: float = 0.0) -> nn.Module:
    norm = nn.BatchNorm2d(16) if bn else nn.Identity()
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=not bn),  # a bias before BN gets no gradient
        norm,
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(32, n_classes),
    )


def resnet18(n_classes: int = 10) -> nn.Module:
    return torchvision.models.resnet18(num_classes=n_classes)


def image_data(n: int = 64, size: int = 12, n_classes: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return TensorDataset(x, torch.randint(0, n_classes, (n,), generator=g))


def loader(ds: Dataset, batch_size: int = 16) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def trainer(**kw: Any) -> pl.Trainer:
    args = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    args.update(kw)
    return pl.Trainer(**args)


class MemoryLogger(Logger):
    """Keeps every logged metrics dict in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]


class Snapshot(pl.Callback):
    """Records parameters, buffers and optimizer state at the end of the given epochs."""

    def __init__(self, epochs: tuple[int, ...]) -> None:
        self.epochs = epochs
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.optim: dict[int, dict[str, dict[str, Any]]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        e = trainer.current_epoch
        if e not in self.epochs:
            return
        self.states[e] = {
            k: v.detach().clone() for k, v in pl_module.state_dict().items() if torch.is_tensor(v)
        }
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.optim[e] = {
            names[id(p)]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
            for g in opt.param_groups
            for p in g["params"]
            if p in opt.state and opt.state[p]
        }
