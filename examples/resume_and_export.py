"""Resume a pruning run from its checkpoint, load the pruned model for inference, and export it.

    python examples/resume_and_export.py           # about 15 s on a CPU
    python examples/resume_and_export.py --tiny    # fewer batches (or EIGENDAMAGE_EXAMPLES_TINY=1)

1. *Interrupted run.* The ``EigenDamagePruning`` callback prunes at the end of epochs 0 and 2;
   the run stops after epoch 1 (as a job that was killed would), leaving ``last.ckpt``.
2. *Resume.* A freshly built (dense) model and a new Trainer resume from ``last.ckpt``: the
   checkpoint reshapes the model to its pruned widths before the weights load, the round of
   epoch 0 is not done again, the round of epoch 2 is.
3. *Load for inference.* ``Classifier.load_from_checkpoint`` (the LightningModule calls
   ``enable_pruned_loading(self)``), and ``restore_pruned`` into a plain ``nn.Module`` from its
   ``state_dict`` (``torch.load(weights_only=True)``: no pickled code).
4. *Export.* ``torch.export`` to ``pruned.pt2`` and, where ``onnx`` is installed, ONNX to
   ``pruned.onnx`` (checked with onnxruntime). The pruned layers are plain ``Conv2d``/``Linear``
   modules (or, for the eigenbasis, a few of them in a row), so both need nothing of this library.

Everything lands in ``<out>/``; ``example_input.pt`` and ``expected_output.pt`` hold an input and
the pruned model's output on it, for checking the exported files elsewhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eigendamage import EigenDamagePruning, PruningSchedule, enable_pruned_loading, restore_pruned

TINY_ENV = "EIGENDAMAGE_EXAMPLES_TINY"
SCHEDULE = PruningSchedule(epochs={0: 0.3, 2: 0.3}, target="flops")  # ÷1.43 twice: about ÷2 in all


def make_net(n_classes: int = 10, width: int = 32) -> nn.Sequential:
    """A plain CNN: conv-BN-ReLU blocks, global pooling, a classifier."""

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, width, 1),
        *block(width, 2 * width, 2),
        *block(2 * width, 2 * width, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, n_classes),
    )


class Classifier(pl.LightningModule):
    """``make_net()`` trained with SGD; loads pruned checkpoints into a freshly built model."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net()
        enable_pruned_loading(self)  # load_from_checkpoint and load_state_dict accept pruned weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class StopAfter(pl.Callback):
    """Ends the fit after the given epoch, as an interrupted job would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def make_data(n: int, size: int = 16, n_classes: int = 10) -> TensorDataset:
    """Noisy copies of one random template per class."""
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(n_classes, 3, size, size, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return TensorDataset(templates[y] + 1.5 * torch.randn(n, 3, size, size, generator=g), y)


def trainer_for(out: Path, callbacks: list[pl.Callback], tiny: bool) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=4,
        callbacks=callbacks,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=not tiny,
        enable_model_summary=False,
        default_root_dir=out,
    )


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the four steps; returns the numbers it printed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help=f"3 batches per epoch (or {TINY_ENV}=1)")
    p.add_argument("--out", type=Path, default=Path("out/examples/resume_and_export"))
    args = p.parse_args(argv)
    tiny = args.tiny or os.environ.get(TINY_ENV, "") not in ("", "0")
    out: Path = args.out
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a rerun starts over
    data = DataLoader(make_data(96 if tiny else 2048), batch_size=32, shuffle=True)
    pl.seed_everything(0, verbose=False)

    # 1. An interrupted run: pruned at the end of epoch 0, stopped after epoch 1.
    model = Classifier()
    dense_params = n_params(model)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)
    pruning = EigenDamagePruning(schedule=SCHEDULE, verbose=False)
    trainer_for(out, [pruning, ckpt, StopAfter(epoch=1)], tiny).fit(model, data)
    last = out / "checkpoints" / "last.ckpt"
    print(
        f"1. stopped after epoch 1: {len(pruning.reports)} round done, params {dense_params:,} → "
        f"{n_params(model):,}; checkpoint {last}"
    )

    # 2. Resume with a freshly built model: the checkpoint makes it pruned again before it loads.
    model = Classifier()
    pruning = EigenDamagePruning(schedule=SCHEDULE, verbose=False)
    trainer_for(out, [pruning, ckpt], tiny).fit(model, data, ckpt_path=last)
    print(f"2. resumed and finished: {len(pruning.reports)} rounds in all, params now {n_params(model):,}")
    print(pruning.reports[-1].summary())
    model.eval()

    # 3. Load for inference, two ways; both give the trained model's outputs exactly.
    x = make_data(8)[:][0]
    with torch.no_grad():
        expected = model(x)
        loaded = Classifier.load_from_checkpoint(last, weights_only=True).eval()
        same_loaded = torch.equal(loaded(x), expected)
        torch.save(model.net.state_dict(), out / "pruned_net.pt")
        net = restore_pruned(make_net(), out / "pruned_net.pt").eval()  # a plain nn.Module
        same_restored = torch.equal(net(x), expected)
    print(f"3. same outputs: load_from_checkpoint {same_loaded}, restore_pruned {same_restored}")
    torch.save(x, out / "example_input.pt")
    torch.save(expected, out / "expected_output.pt")

    # 4. Export the plain pruned network.
    exported = torch.export.export(net, (x,))
    torch.export.save(exported, out / "pruned.pt2")
    with torch.no_grad():
        err = (torch.export.load(out / "pruned.pt2").module()(x) - expected).abs().max().item()
    print(f"4. torch.export: {out / 'pruned.pt2'} (largest difference {err:.1e})")
    result = {"dense_params": dense_params, "params": n_params(model), "rounds": len(pruning.reports)}
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        import onnxruntime

        torch.onnx.export(net, (x,), str(out / "pruned.onnx"), dynamo=True, verbose=False)
        session = onnxruntime.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        onnx_err = (torch.from_numpy(y) - expected).abs().max().item()
        print(f"   ONNX: {out / 'pruned.onnx'} (onnxruntime, largest difference {onnx_err:.1e})")
    else:
        print("   ONNX: skipped (pip install -e '.[onnx]')")
    return result


if __name__ == "__main__":
    main()
