"""PruningSchedule: parsing and validation (pure Python, no training)."""

from __future__ import annotations

import math

import pytest

from lightning_eigendamage import PruningSchedule
from lightning_eigendamage.schedule import PrunePoint


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
    with pytest.raises(ValueError, match=r"target must be one of \('directions', 'params', 'flops'\)"):
        PruningSchedule(epochs={0: 0.5}, target="latency")


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
