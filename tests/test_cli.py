"""``EigenDamagePruning`` configured from a LightningCLI YAML file (``trainer.callbacks``).

Each fit: a tiny CNN on random 8×8 images, 2 epochs of 4 batches, on CPU (a few seconds). The
schedule is spelled three ways (``{epoch: fraction}``, ``class_path: PruningSchedule``, a plain
dict of ``PruningSchedule`` fields); the checks are on the callback instance the CLI built, its
reports and the pruned model. Bad values must fail with the library's own message.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures]")
from lightning.pytorch.cli import LightningCLI  # noqa: E402

from lightning_eigendamage import EigenDamagePruning, KFELayer, PruningSchedule  # noqa: E402
from lightning_eigendamage.costs import count_flops, count_params  # noqa: E402


class TinyModel(pl.LightningModule):
    """Two convs and two linears; ``net.0`` is excluded in the configs, ``net.8`` is the classifier."""

    def __init__(self, width: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, 2 * width),
            nn.ReLU(),
            nn.Linear(2 * width, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TinyData(pl.LightningDataModule):
    """``n`` random 3×8×8 images with random labels (fixed seed)."""

    def __init__(self, n: int = 64, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.n, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (self.n,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


def first_input(batch: Any) -> torch.Tensor:
    """The ``input_fn`` of the configs: the images of an ``(images, labels)`` batch."""
    return batch[0]


CONFIG = """\
seed_everything: 0
model:
  width: 16
data:
  n: 64
  batch_size: 16
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 2
  limit_train_batches: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
  callbacks:
    - class_path: lightning_eigendamage.EigenDamagePruning
      init_args:
{init_args}
"""

OPTIONS = """\
structure: eigenbasis  # these tests check the eigenbasis's layers
fisher: "{fisher}"  # quoted: YAML reads a bare true as a boolean
input_fn: test_cli.first_input  # a callable by import path (tests/ is on sys.path)
exclude: [net.0]
layer_cap: 0.9
seed: 7
verbose: false
"""

# (YAML of `schedule:`, the PruningSchedule it must become, fisher, rounds expected)
SPELLINGS = {
    "mapping": (
        "schedule: {0: 0.5}",
        PruningSchedule(epochs={0: 0.5}),
        "true",
        ["epoch:0"],
    ),
    "class_path": (
        """\
schedule:
  class_path: lightning_eigendamage.PruningSchedule
  init_args:
    epochs: {0: 0.5}
    fisher_batches: 2
    target: flops""",
        PruningSchedule(epochs={0: 0.5}, fisher_batches=2, target="flops"),
        "empirical",
        ["epoch:0"],
    ),
    "fields": (
        """\
schedule:
  at_start: 0.3
  epochs: {0: 0.4}
  fisher_batches: 3
  target: params""",
        PruningSchedule(at_start=0.3, epochs={0: 0.4}, fisher_batches=3, target="params"),
        "true",
        ["start", "epoch:0"],
    ),
}


def write_config(tmp_path: Path, schedule: str, fisher: str = "true") -> Path:
    init_args = textwrap.indent(schedule + "\n" + OPTIONS.format(fisher=fisher), " " * 8)
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.format(root=tmp_path / "root", init_args=init_args.rstrip()))
    return path


def run_cli(args: list[str]) -> LightningCLI:
    return LightningCLI(
        TinyModel,
        TinyData,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def the_callback(trainer: pl.Trainer) -> EigenDamagePruning:
    found = [c for c in trainer.callbacks if isinstance(c, EigenDamagePruning)]
    assert len(found) == 1, trainer.callbacks
    return found[0]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when both ``args`` and pytest's own command line are present.
    monkeypatch.setattr(sys, "argv", ["test_cli"])


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_fit_from_yaml_prunes(tmp_path: Path, spelling: str) -> None:
    schedule_yaml, expected, fisher, rounds = SPELLINGS[spelling]
    config = write_config(tmp_path, schedule_yaml, fisher)
    dense = TinyModel()
    example = torch.randn(1, 3, 8, 8)
    dense_flops, dense_params = count_flops(dense, example), count_params(dense)

    cli = run_cli(["fit", "--config", str(config)])

    cb = the_callback(cli.trainer)
    # The options are those of the YAML file.
    assert cb.schedule == expected
    assert cb.fisher == fisher
    assert cb.exclude == ["net.0"]
    assert cb.input_fn.__module__ == "test_cli" and cb.input_fn.__qualname__ == "first_input"
    assert cb.layer_cap == 0.9 and cb.seed == 7 and cb.verbose is False
    # The fit ran to the end, with one report per scheduled round.
    assert cli.trainer.state.finished and cli.trainer.current_epoch == 2
    assert [r.key for r in expected.points()] == rounds
    assert len(cb.reports) == len(rounds)
    assert cb.reports[0].flops_before == dense_flops and cb.reports[0].params_before == dense_params
    fisher_batches = expected.fisher_batches or 4
    for report, point in zip(cb.reports, expected.points()):
        assert report.flops_after < report.flops_before
        assert report.params_after < report.params_before
        assert report.target == expected.target and report.fisher == fisher
        assert report.batches == min(fisher_batches, 4)  # 4 training batches per epoch
        if expected.target == "flops":
            assert report.flops_after <= (1 - point.fraction) * report.flops_before
        elif expected.target == "params":
            assert report.params_after <= (1 - point.fraction) * report.params_before
        else:
            assert 0 < report.realised_fraction <= point.fraction
    # The trained model is the pruned one: KFE layers, excluded and last layer untouched.
    model = cli.model
    kfe = sorted(name for name, m in model.named_modules() if isinstance(m, KFELayer))
    assert kfe and set(kfe) <= {"net.2", "net.6"}
    assert type(model.net[0]) is nn.Conv2d and type(model.net[8]) is nn.Linear
    assert count_flops(model, example) == cb.reports[-1].flops_after < dense_flops
    assert count_params(model) == cb.reports[-1].params_after < dense_params

    # Lightning's saved config (default_root_dir/config.yaml) reproduces the run.
    saved = tmp_path / "root" / "config.yaml"
    assert saved.is_file()
    again = run_cli(["fit", "--config", str(saved), "--trainer.default_root_dir", str(tmp_path / "again")])
    cb2 = the_callback(again.trainer)
    assert cb2 is not cb and cb2.schedule == expected and cb2.exclude == ["net.0"]
    assert cb2.fisher == fisher and cb2.seed == 7
    sizes = [(r.flops_after, r.params_after, [(x.kept_in, x.kept_out) for x in r.layers]) for r in cb.reports]
    assert sizes == [
        (r.flops_after, r.params_after, [(x.kept_in, x.kept_out) for x in r.layers]) for r in cb2.reports
    ]


@pytest.mark.parametrize(
    ("schedule_yaml", "message"),
    [
        ("schedule: {0: 1.5}", r"schedule fraction for epoch 0 must be a number in \[0, 1\), got 1.5"),
        # A quoted key is a string: neither an epoch number nor a PruningSchedule field.
        ('schedule: {"0": 0.5}', r"unknown schedule key\(s\) \['0'\]"),
        (
            "schedule:\n  class_path: lightning_eigendamage.PruningSchedule\n"
            "  init_args: {epochs: {0: 0.5}, target: flop}",
            r"target must be one of \('directions', 'params', 'flops', 'channels'\), got 'flop'",
        ),
        ("schedule: {epochs: {0: 0.5}, fisher_batches: 0}", "fisher_batches must be an integer ≥ 1"),
        # Beyond max_epochs=2: checked against the Trainer in setup, before training.
        ("schedule: {epochs: {3: 0.5}}", r"prunes at the end of epoch\(s\) \[3\].*max_epochs=2"),
    ],
    ids=["fraction", "quoted-key", "target", "fisher-batches", "late-epoch"],
)
def test_bad_schedule_rejected(tmp_path: Path, schedule_yaml: str, message: str) -> None:
    config = write_config(tmp_path, schedule_yaml)
    with pytest.raises(ValueError, match=message):
        run_cli(["fit", "--config", str(config)])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("fishr: empirical", "Option 'fishr' is not accepted"),
        # The option is the string "true"; YAML reads a bare `true` as a boolean.
        ("fisher: true", "Parser key \"fisher\":\n +Expected a <class 'str'>. Got value: True"),
    ],
    ids=["unknown-option", "bare-true"],
)
def test_bad_option_rejected_by_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, message: str
) -> None:
    config = write_config(tmp_path, "schedule: {0: 0.5}")
    text = config.read_text().replace('fisher: "true"', extra)
    assert extra in text
    config.write_text(text)
    with pytest.raises(SystemExit) as exc:
        run_cli(["fit", "--config", str(config)])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
