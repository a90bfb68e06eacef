"""``progress=True``: a line per phase of a pruning call on stderr (both structures), a bar over
the channel groups' scores, and nothing at all when it is off."""

from __future__ import annotations

import pytest
from models import TinyResNet, conv_batches, warm_up_bn

from lightning_eigendamage import prune
from lightning_eigendamage.progress import Progress


@pytest.mark.parametrize("structure", ["channels", "eigenbasis"])
def test_a_line_per_phase_when_asked_and_silence_otherwise(structure: str, capsys) -> None:
    batches = conv_batches(2, n=16, size=16)
    for progress in (False, True):
        model = TinyResNet()
        warm_up_bn(model, batches)
        capsys.readouterr()
        prune(model, batches, ratio=0.5, target="flops", structure=structure, progress=progress)
        err = capsys.readouterr().err
        if not progress:
            assert "prune:" not in err
            continue
        lines = [ln for ln in err.splitlines() if ln.startswith("prune: ") and "done in" in ln]
        phases = [ln.split(": ")[2] for ln in lines]
        assert [p.split(" (")[0].split(":")[0] for p in phases] == ["analysis", "decision", "surgery"]
        assert all(ln.startswith(f"prune: {structure}: ") for ln in lines)
        if structure == "channels":  # (stderr is no terminal here: lines, not a redrawn bar)
            assert "scoring the channel groups" in err and "\r" not in err
            assert any(ln.startswith("prune: scoring the channel groups: ") for ln in err.splitlines())


def test_the_plain_bar_says_every_tenth(capsys) -> None:
    items = list(Progress(True)._lines(range(20), 20, "groups"))
    assert items == list(range(20))
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"prune: groups: {i}/20" for i in range(2, 21, 2)]
    assert list(Progress(False).bar(range(3), 3, "x")) == [0, 1, 2] and not capsys.readouterr().err
