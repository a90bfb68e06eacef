"""EigenDamagePruning under Lightning's DDP strategies: 2 CPU processes on gloo (NCCL with 2 GPUs).

The fits live in ``tests/ddp_fit.py``: ``ddp_spawn`` runs inside pytest's process, ``ddp`` runs
that file as a script in a subprocess (under pytest, ``ddp`` would re-launch pytest itself as
rank 1). Every rank writes what it held after each round; the checks below compare the ranks.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ddp_fit
import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    XLAStrategy,
)
from lit_models import LitClassifier, image_data, loader, small_cnn

import lightning_eigendamage
from lightning_eigendamage import EigenDamagePruning
from lightning_eigendamage.curvature import capture_factors
from lightning_eigendamage.eigenbasis.pruner import find_layers

ROOT = Path(__file__).resolve().parents[1]
_GPUS = torch.cuda.device_count()
DEVICES = [
    "cpu",
    pytest.param(
        "gpu",
        marks=pytest.mark.skipif(
            _GPUS < 2, reason=f"the NCCL variant needs 2 CUDA devices; this machine has {_GPUS}"
        ),
    ),
]


def _ranks(out: Path, world: int = 2) -> list[dict[str, Any]]:
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for r, rec in enumerate(ranks):
        assert rec["rank"] == r and rec["world_size"] == world
        # The workers ran this checkout's package, not another installed copy.
        assert rec["package"] == os.path.abspath(lightning_eigendamage.__file__)
    return ranks


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.equal(a[name], b[name]), f"{what}: {name} differs between ranks"


def _check_one_decision(
    ranks: list[dict[str, Any]], i: int, *, stepped: bool = True, needs_bn: bool = True
) -> None:
    """After round ``i`` every rank holds rank 0's plan, parameters and optimizer state
    (``stepped``: the optimizer has momentum buffers by then)."""
    round0 = ranks[0]["rounds"][i]
    assert round0["realised_fraction"] > 0 and round0["kept"], "the round pruned nothing"
    for other in ranks[1:]:
        round1 = other["rounds"][i]
        # The ranks captured on different halves of the data ...
        assert any(
            not torch.equal(round0["local_factors"][n][0], round1["local_factors"][n][0])
            for n in round0["local_factors"]
        ), "the ranks saw the same curvature: the test could not tell a reduction from none"
        # ... yet decided alike: same plan, the same kept directions and forms per layer,
        assert round0["plan"] == round1["plan"]
        assert round0["kept"] == round1["kept"]
        # bitwise-identical parameters before the new DDP wrapper broadcasts rank 0's,
        _assert_same_tensors(round0["params"], round1["params"], f"round {i} parameters")
        # BatchNorm downstream of the pruned layers re-estimated on the ranks' own example batches
        # and averaged: the same running statistics everywhere (a rank's own would differ).
        assert round0["recalibrated_bn"] == round1["recalibrated_bn"]
        recal = {k: v for k, v in round0["bn"].items() if k.rsplit(".", 1)[0] in round0["recalibrated_bn"]}
        assert recal or not needs_bn, "no BatchNorm was re-estimated: nothing to compare"
        _assert_same_tensors(recal, {k: round1["bn"][k] for k in recal}, f"round {i} BatchNorm statistics")
        # and the same optimizer state (DDP never synchronises momentum buffers).
        _assert_same_tensors(round0["momentum"], round1["momentum"], f"round {i} momentum")
    assert bool(round0["momentum"]) == stepped, "no momentum buffer to compare"
    assert all(r["rounds"][i]["rewrapped"] for r in ranks), "the DDP wrapper was not rebuilt"


def _check_two_rounds(
    ranks: list[dict[str, Any]], backend: str, start_method: str, needs_bn: bool = True, learns: bool = True
) -> None:
    """One decision on every rank after each round; training goes on afterwards."""
    r0 = ranks[0]
    assert r0["backend"] == backend and r0["strategy"] == "DDPStrategy"
    assert r0["start_method"] == start_method
    assert [r["epoch"] for r in r0["rounds"]] == [0, 1]
    for i in range(2):  # (a round that only removes heads re-estimates no BatchNorm)
        _check_one_decision(ranks, i, needs_bn=needs_bn)
    # Training went on: finite, and lower at the end than in the first epoch after round 2.
    epochs = sorted(r0["losses"])
    assert epochs == [0, 1, 2, 3, 4]
    mean = {
        e: sum(sum(r["losses"][e]) for r in ranks) / sum(len(r["losses"][e]) for r in ranks) for e in epochs
    }
    assert all(math.isfinite(v) for v in mean.values()), mean
    # (the attention model of "heads" is not tuned to learn at this learning rate: finite is enough)
    assert mean[4] < mean[2] or not learns, mean
    for other in ranks[1:]:
        _assert_same_tensors(r0["final"], other["final"], "final parameters")
        # Label sampling advanced alike: rank 0's checkpointed generator state fits every rank.
        assert torch.equal(r0["generator"], other["generator"])


@pytest.mark.parametrize("config", ["rounds", "channels", "heads"])
@pytest.mark.parametrize("accelerator", DEVICES)
def test_ddp_spawn_two_rounds_decide_once_for_all_ranks(
    tmp_path: Path, accelerator: str, config: str
) -> None:
    model = ddp_fit.run(config, str(tmp_path), strategy="ddp_spawn", accelerator=accelerator, devices=2)
    ranks = _ranks(tmp_path)
    _check_two_rounds(
        ranks,
        "gloo" if accelerator == "cpu" else "nccl",
        "spawn",
        needs_bn=config != "heads",
        learns=config != "heads",
    )
    if config == "heads":  # every rank removed the same heads (rank 0's plan), and the main process
        # took rank 0's weights through the loading hook, the pruned attention included
        heads = [[[g for g in r["rounds"][i]["groups"] if g.get("head_dim")] for i in (0, 1)] for r in ranks]
        assert heads[0] == heads[1] and any(g["removed"] for rnd in heads[0] for g in rnd), heads
        attn = model.net.attn
        assert attn.num_heads < 4 and attn.out_proj.in_features == 8 * attn.num_heads
    # The main process ran no callback hook; with enable_pruned_loading in the module's __init__,
    # Lightning's non-strict reload of rank 0's weights reshapes the pruned layers first.
    main = {n: p.detach().cpu() for n, p in model.named_parameters()}
    _assert_same_tensors(main, ranks[0]["final"], "main process after ddp_spawn")


@pytest.mark.parametrize("config", ["rounds", "channels"])
@pytest.mark.parametrize("accelerator", DEVICES)
def test_ddp_script_in_a_subprocess_gives_the_same_result(
    tmp_path: Path, accelerator: str, config: str
) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, str(ROOT / "tests" / "ddp_fit.py"), "--config", config, "--out", str(tmp_path)]
    cmd += ["--strategy", "ddp", "--accelerator", accelerator, "--devices", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    _check_two_rounds(_ranks(tmp_path), "gloo" if accelerator == "cpu" else "nccl", "popen")


def test_factors_reduced_over_two_ranks_equal_one_process_on_all_the_data(tmp_path: Path) -> None:
    """Empirical Fisher in eval mode (the ``at_start`` capture), each rank on its half of an even
    dataset (DistributedSampler, no shuffle, no padding): the factors the decision used equal
    those of one process on every batch. The fit goes on to a step-point round, which must also
    decide once for all ranks."""
    ddp_fit.run("start_step", str(tmp_path), strategy="ddp_spawn", accelerator="cpu", devices=2)
    ranks = _ranks(tmp_path)
    model = ddp_fit.build_model().eval()
    cands = find_layers(model)
    single = capture_factors(
        model,
        {c.name: c.hook_module for c in cands},
        torch.utils.data.DataLoader(ddp_fit.dataset(), batch_size=16),
        factors_for=[c.name for c in cands if c.skipped is None],
        fisher="empirical",
    )
    assert single.batches == ddp_fit.N_EXAMPLES // 16
    for rec in ranks:
        assert len(rec["rounds"]) == 2
        reduced, local = rec["rounds"][0]["factors"], rec["rounds"][0]["local_factors"]
        assert reduced.keys() == {n for n, lf in single.layers.items() if lf.a_sum is not None}
        for name, (a, g) in reduced.items():
            ref_a, ref_g = single.layers[name].a(), single.layers[name].g()
            assert _rel_err(a, ref_a) < 1e-6 and _rel_err(g, ref_g) < 1e-6, name
            # Each half alone gives other factors (by 2 % or more here): the comparison can fail.
            assert _rel_err(local[name][0], ref_a) > 1e-2 and _rel_err(local[name][1], ref_g) > 1e-2, name
    _check_one_decision(ranks, 0, stepped=False)  # at the start of fit: no momentum yet
    _check_one_decision(ranks, 1)  # the step point, on factors from the training steps


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest deviation relative to the largest entry (G at initialisation is ~1e-8 in size)."""
    return float((x - ref).abs().max() / ref.abs().max())


# ---------------------------------------------------------------------------------------------
# Strategies not supported yet
# ---------------------------------------------------------------------------------------------

_SUPPORTED = (
    r"Supported: SingleDeviceStrategy \(one device, strategy='auto'\) and DDPStrategy \(strategy='ddp'"
)


def test_model_parallel_strategy_is_refused_at_setup_of_a_real_fit() -> None:
    """End to end on CPU: ``Trainer(strategy=ModelParallelStrategy())`` fails in the callback's
    ``setup``, before training, with a message naming what is supported."""
    env = dict(os.environ)
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(),
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[EigenDamagePruning({0: 0.5}, verbose=False, structure="eigenbasis")],
    )
    model = LitClassifier(small_cnn())
    try:
        with pytest.raises(
            NotImplementedError, match=rf"not support ModelParallelStrategy yet\. {_SUPPORTED}"
        ):
            trainer.fit(model, loader(image_data(32)))
        assert model.steps_run == 0
    finally:  # the strategy set up a one-process group and its environment in this process
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


@pytest.mark.parametrize(
    "make",
    [
        FSDPStrategy,
        lambda: DeepSpeedStrategy.__new__(DeepSpeedStrategy),
        lambda: XLAStrategy.__new__(XLAStrategy),
    ],
    ids=["FSDPStrategy", "DeepSpeedStrategy", "XLAStrategy"],
)
def test_sharding_strategies_are_refused_by_setup(make) -> None:
    """What this covers: the callback's ``setup`` on a stand-in trainer holding the strategy object.
    A real fit cannot start here (Lightning's FSDP needs CUDA, DeepSpeed and XLA need their
    packages, so those two objects are built without ``__init__``). DeepSpeed and XLA subclass
    ``DDPStrategy``: an ``isinstance`` check alone would let them through."""
    strategy = make()
    with pytest.raises(
        NotImplementedError, match=rf"not support {type(strategy).__name__} yet\. {_SUPPORTED}"
    ):
        EigenDamagePruning({0: 0.5}, structure="eigenbasis").setup(
            SimpleNamespace(strategy=strategy), LitClassifier(small_cnn()), "fit"
        )


@pytest.mark.parametrize("strategy", [DDPStrategy(), SingleDeviceStrategy("cpu")], ids=["ddp", "single"])
def test_supported_strategies_pass_setup(strategy) -> None:
    stand_in = SimpleNamespace(strategy=strategy, max_epochs=2, max_steps=-1, callbacks=[])
    EigenDamagePruning({0: 0.5}, structure="eigenbasis").setup(stand_in, LitClassifier(small_cnn()), "fit")


def test_a_model_with_pruned_loading_enabled_pickles() -> None:
    """``ddp_spawn`` pickles the LightningModule: the ``load_state_dict`` pre-hook must survive it."""
    model = ddp_fit.build_model()  # calls enable_pruned_loading(self)
    copy = pickle.loads(pickle.dumps(model))
    assert len(copy._load_state_dict_pre_hooks) == len(model._load_state_dict_pre_hooks) == 1
