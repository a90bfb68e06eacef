"""``ddp_spawn``: the main process ends up with the pruned, trained model after ``fit``.

Lightning copies rank 0's final weights back into the main process's model with
``load_state_dict(strict=False)``, and no callback hook runs in the main process, so only a pre-hook
already on the model (``enable_pruned_loading`` in ``__init__``) can reshape it.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lit_models import LitClassifier, image_data, loader, small_cnn, trainer

from lightning_eigendamage import EigenDamagePruning, KFELayer, enable_pruned_loading


class SpawnLit(LitClassifier):
    def __init__(self) -> None:
        super().__init__(small_cnn(), lr=0.05)
        enable_pruned_loading(self)


class SaveRankZero(pl.Callback):
    """Saves rank 0's final state_dict (in the worker) for comparison in the main process."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), self.path)


def _spawn_trainer(**kw) -> pl.Trainer:
    # Both ranks see the same batches (no distributed sampler), so they capture the same factors
    # and take the same pruning decisions.
    return trainer(strategy="ddp_spawn", devices=2, use_distributed_sampler=False, **kw)


def test_main_process_gets_rank_zero_pruned_trained_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SpawnLit()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    dump = tmp_path / "rank0.pt"
    cb = EigenDamagePruning(schedule={0: 0.5}, verbose=False, structure="eigenbasis")
    _spawn_trainer(callbacks=[cb, SaveRankZero(str(dump))], max_epochs=2).fit(
        model, loader(image_data(32), 16)
    )

    rank0 = torch.load(dump, weights_only=True)
    assert any(isinstance(m, KFELayer) for m in model.modules())
    state = model.state_dict()
    assert state.keys() == rank0.keys()
    for k, v in rank0.items():
        if torch.is_tensor(v):
            assert torch.equal(state[k], v), k
        else:
            assert state[k] == v, k  # the pruned-layer records
    # Trained after the prune: the layers that were never rebuilt moved too.
    assert not torch.equal(state["net.12.weight"], initial["net.12.weight"])


def test_spawn_without_pruned_loading_is_refused_before_training() -> None:
    t = _spawn_trainer(max_epochs=2)
    cb = EigenDamagePruning(schedule={0: 0.5}, verbose=False, structure="eigenbasis")
    with pytest.raises(ValueError, match=r"enable_pruned_loading\(self\) in your LightningModule's __init__"):
        cb.setup(t, LitClassifier(small_cnn()), "fit")
    model = SpawnLit()
    cb.setup(t, model, "fit")  # with the pre-hook on the model: accepted
    cb.teardown(t, model, "fit")
