"""PruningSchedule: parsing and validation (pure Python, no training)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest

from lightning_eigendamage import PruningSchedule
from lightning_eigendamage.lightning.schedule import EpochPoint, LoopState, PrunePoint, StartPoint, StepPoint


def test_dict_of_epochs_becomes_sorted_epoch_points() -> None:
    s = PruningSchedule.from_any({3: 0.5, 1: 0.25})
    assert s.points() == [PrunePoint("epoch", 1, 0.25), PrunePoint("epoch", 3, 0.5)]
    assert [p.key for p in s.points()] == ["epoch:1", "epoch:3"]
    assert s.target == "directions" and s.fisher_batches == 16  # the default cap


def test_object_form_and_dict_of_fields_agree() -> None:
    a = PruningSchedule(steps={100: 0.5}, at_start=0.3, fisher_batches=8, target="flops")
    b = PruningSchedule.from_any(
        {"steps": {100: 0.5}, "at_start": 0.3, "fisher_batches": 8, "target": "flops"}
    )
    assert a == b
    assert [p.key for p in a.points()] == ["start", "step:100"]
    assert PruningSchedule.from_any(a) is a


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, math.nan, math.inf, True, "0.5", None])
def test_fraction_outside_unit_interval_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match=r"must be a number in \[0, 1\).*0.5 removes half"):
        PruningSchedule.from_any({2: bad})
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        PruningSchedule(steps={10: bad})
    if bad is not None:
        with pytest.raises(ValueError, match=r"at_start must be a number in \[0, 1\)"):
            PruningSchedule(at_start=bad)


def test_zero_fraction_is_allowed() -> None:
    assert PruningSchedule.from_any({0: 0.0}).points()[0].fraction == 0.0


@pytest.mark.parametrize(
    "make",
    [lambda: PruningSchedule.from_any({}), PruningSchedule, lambda: PruningSchedule(epochs={}, steps={})],
)
def test_empty_schedule_is_rejected(make) -> None:
    with pytest.raises(ValueError, match=r"schedule is empty.*e\.g\. schedule=\{1: 0\.5\}"):
        make()


@pytest.mark.parametrize(
    "schedule, match",
    [
        ({"epoch": {1: 0.5}}, r"unknown schedule key\(s\) \['epoch'\].*only the keys \['epochs', 'steps'"),
        ({"epochs": {1: 0.5}, "fisher_batch": 4}, r"unknown schedule key\(s\) \['fisher_batch'\]"),
        ({"epochs": {1: 0.5}, 3: 0.5}, r"unknown schedule key\(s\) \[3\].*integer epochs"),
    ],
)
def test_unknown_keys_are_rejected(schedule: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruningSchedule.from_any(schedule)


@pytest.mark.parametrize("key", [1.5, True])
def test_non_integer_epoch_is_rejected(key: object) -> None:
    with pytest.raises(TypeError, match=r"schedule keys are epoch numbers \(int ≥ 0\)"):
        PruningSchedule.from_any({key: 0.5})


def test_negative_epoch_and_step_zero_are_rejected() -> None:
    with pytest.raises(ValueError, match="epoch must be an integer ≥ 0"):
        PruningSchedule.from_any({-1: 0.5})
    with pytest.raises(ValueError, match="step must be an integer ≥ 1"):
        PruningSchedule(steps={0: 0.5})


def test_wrong_types_are_rejected() -> None:
    with pytest.raises(TypeError, match=r"dict \{epoch: fraction\} or a PruningSchedule"):
        PruningSchedule.from_any([0.5])
    with pytest.raises(TypeError, match=r"steps=\.\.\.\) takes a dict"):
        PruningSchedule(steps=[100])


@pytest.mark.parametrize("fb", [0, -3, 2.5, True])
def test_bad_fisher_batches(fb: object) -> None:
    with pytest.raises(ValueError, match=r"fisher_batches must be an integer ≥ 1 or None"):
        PruningSchedule(epochs={0: 0.5}, fisher_batches=fb)


def test_bad_target() -> None:
    want = r"target must be one of \('directions', 'params', 'flops', 'channels'\)"
    with pytest.raises(ValueError, match=want):
        PruningSchedule(epochs={0: 0.5}, target="latency")
    assert PruningSchedule.from_any({"epochs": {0: 0.5}, "target": "channels"}).target == "channels"


def test_validate_against_trainer_limits() -> None:
    s = PruningSchedule(epochs={1: 0.5, 4: 0.5}, steps={50: 0.5})
    assert s.validate_for(max_epochs=10, max_steps=-1) == []
    assert s.validate_for(max_epochs=-1, max_steps=None) == []
    with pytest.raises(
        ValueError, match=r"epoch\(s\) \[4\].*max_epochs=4\) only runs epochs 0\.\.3.*pass epochs"
    ):
        s.validate_for(max_epochs=4, max_steps=-1)
    with pytest.raises(ValueError, match=r"step\(s\) \[50\].*max_steps=49.*pass steps up to 49"):
        s.validate_for(max_epochs=10, max_steps=49)
    (warning,) = s.validate_for(max_epochs=5, max_steps=-1)
    assert "last epoch (4)" in warning and "no fine-tuning" in warning


# ----------------------------------------------------------------------------------------------
# Prune points in isolation: each point answers from a LoopState, without a Trainer
# ----------------------------------------------------------------------------------------------


def _walk(
    point: PrunePoint,
    *,
    epochs: int,
    batches: int,
    fisher_batches: int | None,
    accumulate: int = 1,
    known_length: bool = True,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int]]:
    """Walk a plain training loop as the callback does with the true Fisher: one snapshot at each
    batch end (after the optimizer step, before the capture), one at each epoch end.

    Returns the (epoch, batch) pairs captured, the (epoch, batch) pairs where the point is due at
    batch end, and the epochs where it is due at epoch end. Like Lightning, the optimizer steps
    every ``accumulate`` batches and at the last batch of an epoch.
    """
    step, in_window = 0, 0
    captured, due_batch, due_epoch = [], [], []
    for epoch in range(epochs):
        this_epoch = 0
        for b in range(batches):
            start = step
            if (b + 1) % accumulate == 0 or b + 1 == batches:
                step += 1
            state = LoopState(
                epoch=epoch,
                batch_idx=b,
                batches_per_epoch=batches if known_length else math.inf,
                step_at_batch_start=start,
                global_step=step,
                accumulate=accumulate,
                captured_in_window=in_window,
                captured_this_epoch=this_epoch,
                fisher_batches=fisher_batches,
            )
            if point.wants_capture(state):
                captured.append((epoch, b))
                in_window += 1
                this_epoch += 1
            if point.due_at_batch_end(state):
                due_batch.append((epoch, b))
        if point.due_at_epoch_end(LoopState(epoch=epoch, global_step=step, fisher_batches=fisher_batches)):
            due_epoch.append(epoch)
    return captured, due_batch, due_epoch


def test_points_of_a_schedule_are_typed_and_keep_their_plain_attributes() -> None:
    s = PruningSchedule(epochs={3: 0.5}, steps={500: 0.25}, at_start=0.1)
    start, epoch, step = s.points()
    assert (type(start), type(epoch), type(step)) == (StartPoint, EpochPoint, StepPoint)
    assert [(p.kind, p.at, p.fraction) for p in s.points()] == [
        ("start", 0, 0.1),
        ("epoch", 3, 0.5),
        ("step", 500, 0.25),
    ]
    assert [p.key for p in s.points()] == ["start", "epoch:3", "step:500"]
    assert [p.describe() for p in s.points()] == ["start of fit", "end of epoch 3", "step 500"]
    assert all(isinstance(p, PrunePoint) for p in s.points())
    assert [p.waits_for_factors for p in s.points()] == [False, False, True]


def test_legacy_constructor_equality_and_hash() -> None:
    assert PrunePoint("epoch", 3, 0.5) == EpochPoint(3, 0.5)
    assert type(PrunePoint(kind="step", at=7, fraction=0.2)) is StepPoint
    assert PrunePoint("start", 0, 0.3) == StartPoint(0, 0.3)
    assert EpochPoint(3, 0.5) != StepPoint(3, 0.5)  # same numbers, different kinds
    assert len({EpochPoint(3, 0.5), EpochPoint(3, 0.5), StepPoint(3, 0.5)}) == 2
    with pytest.raises(ValueError, match=r"unknown prune point kind 'batch'.*\['epoch', 'start', 'step'\]"):
        PrunePoint("batch", 1, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        EpochPoint(3, 0.5).at = 4  # type: ignore[misc]


def test_a_kind_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="kind 'epoch' is already taken by EpochPoint"):

        class Again(PrunePoint):
            kind: ClassVar[str] = "epoch"


def test_loop_state_stepped() -> None:
    assert LoopState(step_at_batch_start=4, global_step=5).stepped
    assert not LoopState(step_at_batch_start=5, global_step=5).stepped


def test_epoch_point_captures_the_last_fisher_batches_of_its_epoch_only() -> None:
    captured, due_batch, due_epoch = _walk(EpochPoint(2, 0.5), epochs=4, batches=10, fisher_batches=3)
    assert captured == [(2, 7), (2, 8), (2, 9)]
    assert due_batch == [] and due_epoch == [2]
    # A budget above the epoch's length: every batch of the epoch.
    captured, _, _ = _walk(EpochPoint(0, 0.5), epochs=2, batches=4, fisher_batches=16)
    assert captured == [(0, b) for b in range(4)]


def test_epoch_point_without_loader_length_captures_the_first_fisher_batches() -> None:
    captured, _, due_epoch = _walk(
        EpochPoint(1, 0.5), epochs=3, batches=10, fisher_batches=3, known_length=False
    )
    assert captured == [(1, 0), (1, 1), (1, 2)]
    assert due_epoch == [1]


def test_epoch_point_with_unlimited_budget_captures_its_whole_epoch() -> None:
    for known_length in (True, False):
        captured, _, _ = _walk(
            EpochPoint(1, 0.5), epochs=3, batches=5, fisher_batches=None, known_length=known_length
        )
        assert captured == [(1, b) for b in range(5)]


def test_step_point_with_accumulation_captures_the_last_steps_before_it() -> None:
    # ceil(5 / 2) = 3 optimizer steps before step 10: steps 7, 8, 9 are batches 14..19, of which
    # the first 5 are captured; once step 10 is reached every batch is (the point is waiting).
    point = StepPoint(10, 0.5)
    captured, due_batch, due_epoch = _walk(point, epochs=1, batches=30, fisher_batches=5, accumulate=2)
    assert captured == [(0, b) for b in range(14, 19)] + [(0, b) for b in range(20, 30)]
    # Due at every batch end that stepped to global_step >= 10 (the callback marks it done at the
    # first one that has factors): batch 19 steps 9 -> 10; batch 20 does not step.
    assert due_batch[0] == (0, 19) and (0, 20) not in due_batch
    assert due_batch == [(0, b) for b in range(19, 30, 2)]
    assert due_epoch == []


def test_step_point_without_accumulation_and_unlimited_budget() -> None:
    captured, due_batch, _ = _walk(StepPoint(6, 0.5), epochs=1, batches=10, fisher_batches=3)
    assert captured[:3] == [(0, 3), (0, 4), (0, 5)]  # steps 3, 4, 5 lead to step 6
    assert due_batch[0] == (0, 5)  # batch 5 steps 5 -> 6
    captured, _, _ = _walk(StepPoint(6, 0.5), epochs=1, batches=10, fisher_batches=None)
    assert captured == [(0, b) for b in range(10)]


def test_step_point_window_counts_captures_across_epochs() -> None:
    # 4 batches per epoch, point at step 6, budget 3: steps 3..5 are batches 3 (epoch 0), 0, 1
    # (epoch 1); the budget counts the whole window, not the epoch.
    captured, due_batch, _ = _walk(StepPoint(6, 0.5), epochs=2, batches=4, fisher_batches=3)
    assert captured[:3] == [(0, 3), (1, 0), (1, 1)]
    assert due_batch[0] == (1, 1)


def test_start_point_is_due_at_fit_start_only() -> None:
    point = StartPoint(0, 0.5)
    assert point.due_at_fit_start()
    captured, due_batch, due_epoch = _walk(point, epochs=2, batches=4, fisher_batches=None)
    assert captured == due_batch == due_epoch == []
    assert not EpochPoint(0, 0.5).due_at_fit_start() and not StepPoint(1, 0.5).due_at_fit_start()


def test_a_checked_schedule_cannot_be_changed_afterwards() -> None:
    """The dataclass is frozen, but its point dicts were not: ``s.epochs[1] = 1.5`` was taken, and
    a fit failed at that point after the earlier rounds had pruned."""
    import copy
    import pickle

    s = PruningSchedule(epochs={1: 0.5, 0: 0.2}, steps={5: 0.1})
    with pytest.raises(TypeError, match="read-only"):
        s.epochs[1] = 1.5
    with pytest.raises(TypeError, match="read-only"):
        s.steps.update({6: 0.2})
    assert s.epochs == {0: 0.2, 1: 0.5} and list(s.epochs) == [0, 1]
    assert pickle.loads(pickle.dumps(s)) == s and copy.deepcopy(s) == s and hash(s) == hash(copy.copy(s))
