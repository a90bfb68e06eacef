"""``PruneReport.summary()``: the table, the reasons grouped once each with counts, the totals and
the target, for both structures, checked against the pruned model itself; the callback's console
and the zoo tables word the reasons the same way."""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter

import pytest
import torch
from lit_models import LitClassifier, image_data, loader, small_cnn, trainer
from models import ConvNet, conv_batches, warm_up_bn
from torch import nn

from lightning_eigendamage import EigenDamagePruning, KFELayer, PruneReport, prune
from lightning_eigendamage.report import TARGET_TOLERANCE, group_reasons, reason_lines


def _widths(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, KFELayer):
        return m.rank_in, m.rank_out
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    return m.in_features, m.out_features


def _table(text: str) -> dict[str, list[str]]:
    """The table's rows by layer name (the lines between the header and the first other line)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    rows = {}
    for line in lines[start + 1 :]:
        cells = line.split()
        if len(cells) < 3 or "→" not in cells[1]:
            break
        rows[cells[0]] = cells[1:]
    return rows


def _reason_section(text: str) -> list[str]:
    lines = text.split("\nleft whole: ")[1].splitlines()[1:]
    return [line for line in lines if line.startswith("  ")]


def _numbers(line: str) -> list[int]:
    return [int(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?=\s|$| \()", line)]


@pytest.mark.parametrize("structure", ["eigenbasis", "channels"])
def test_summary_table_reasons_totals_and_target_match_the_model(structure: str) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    batches = conv_batches(2, n=8, size=16)
    warm_up_bn(model, batches)
    dense = copy.deepcopy(model)
    excluded = ["features.0", "features.2"]
    report = prune(model, batches, ratio=0.4, target="flops", structure=structure, exclude=excluded)
    text = report.summary()
    modules, dense_modules = dict(model.named_modules()), dict(dense.named_modules())

    # the table: one row per layer left to the pruner, its widths before and after read off the
    # dense and the pruned model
    left = {r.name for r in report.layers if r.skipped}
    rows = _table(text)
    assert set(rows) == {r.name for r in report.layers} - left and rows
    for name, cells in rows.items():
        c_in, c_out = _widths(dense_modules[name])
        assert cells[0] == f"{c_in}→{c_out}"
        unit = modules[name]
        if structure == "eigenbasis" and not isinstance(unit, KFELayer):
            assert cells[1] == f"{c_in}→{c_out}" and cells[2] == "dense"
        else:
            k_in, k_out = _widths(unit)
            assert cells[1] == f"{k_in}→{k_out}"
            if structure == "eigenbasis":
                assert cells[2] == unit.form
    assert any(a != b for a, b, *_ in rows.values())  # something was pruned

    # the layers left whole: one line per reason, with the count of the names that gave it
    section = _reason_section(text)
    whole = {**report.skipped, **{r.name: r.skipped for r in report.layers if r.skipped}}
    counts = Counter(why.split(";")[0] for name, why in whole.items() if not name.startswith("group of"))
    assert counts["excluded by user"] == 2
    for why, n in counts.items():
        (line,) = [x for x in section if f"× {why}" in x]
        assert line.startswith(f"  {n}× {why}")
    assert len(section) == len(group_reasons(whole))
    assert "  2× excluded by user: features.0, features.2" in section

    # the totals, counted here, and the target
    params = [sum(p.numel() for p in m.parameters()) for m in (dense, model)]
    (params_line,) = [x for x in text.splitlines() if x.startswith("params ")]
    assert _numbers(params_line)[:2] == params
    assert f"(÷{params[0] / params[1]:.2f})" in params_line
    (flops_line,) = [x for x in text.splitlines() if x.startswith("FLOPs ")]
    flops = _numbers(flops_line)[:2]
    assert flops == [report.flops_before, report.flops_after]
    removed = 1 - flops[1] / flops[0]
    (target_line,) = [x for x in text.splitlines() if x.startswith("target ")]
    assert target_line.startswith("target    remove 40.0% of the FLOPs (÷1.67): ")
    reached = removed >= 0.4 - TARGET_TOLERANCE
    assert (": reached, " in target_line) == reached and ("NOT reached" in target_line) == (not reached)
    assert f"removed {removed:.1%}" in target_line


def test_summary_says_when_and_why_the_target_was_not_reached() -> None:
    report = PruneReport(
        params_before=1000,
        params_after=900,
        flops_before=4000,
        flops_after=3000,
        ratio=0.5,
        target="flops",
        reached=0.25,
        target_reached=False,
        limited_by="the 2 pruned layers hold 40% of the FLOPs",
    )
    lines = report.summary().splitlines()
    assert lines[-2] == "target    remove 50.0% of the FLOPs (÷2.00): NOT reached, removed 25.0% (÷1.33)"
    assert lines[-1].strip() == "limited by the 2 pruned layers hold 40% of the FLOPs"
    assert "params    1,000 → 900 (÷1.11)" in lines
    assert "FLOPs     4,000 → 3,000 per example (÷1.33)" in lines
    # a report with no layers left whole has no such section
    assert "left whole" not in report.summary()
    # a report read back from plain data (a checkpoint) says the same
    assert PruneReport.from_dict(report.to_dict()).summary() == report.summary()


def test_reason_lines_count_truncate_and_give_shared_advice_once() -> None:
    skipped = {f"b{i}.dw": "depthwise convolution" for i in range(30)}
    skipped |= {
        "x": "its K-FAC factor is too wide; raise max_factor_dim",
        "y": "its K-FAC factor is too wide; raise max_factor_dim",
        "p": "has hooks; remove them",
        "q": "has hooks; or exclude it",
    }
    lines = reason_lines(skipped)
    assert lines == [
        "30× depthwise convolution: b0.dw, b1.dw, b2.dw, … (27 more)",
        "2× has hooks: p, q",  # two different pieces of advice: neither is shown
        "2× its K-FAC factor is too wide (raise max_factor_dim): x, y",
    ]
    assert reason_lines(skipped, names=0, advice=False) == [
        "30× depthwise convolution",
        "2× has hooks",
        "2× its K-FAC factor is too wide",
    ]
    assert reason_lines({}) == []


def test_zoo_tables_word_the_reasons_as_the_summary_does() -> None:
    from benchmarks.zoo import table

    skipped = {f"features.{i}.conv.1": "depthwise convolution" for i in range(30)}
    skipped["classifier.1"] = "last layer (exempt_last=True)"
    record = {
        "model": "efficientnet_v2_s",
        "size": 64,
        "flops_x": 1.67,
        "flops_reached_x": 1.67,
        "params_before": 10,
        "params_after": 5,
        "pruned_layers": 1,
        "layers": 2,
        "skipped": skipped,
        "warnings": [],
        "reload_max_abs": 0.0,
        "trains": True,
        "prune_s": 1.0,
        "ok": True,
        "command": "",
    }
    (row,) = [line for line in table([record], "prune", "zoo.jsonl").splitlines() if "efficientnet" in line]
    cell = row.split(" | ")[7]
    assert cell == "30× depthwise convolution<br>1× last layer (exempt_last=True)"
    summary = PruneReport(1, 1, 1, 1, 0.5, "flops", skipped=skipped).summary()
    for part in cell.split("<br>"):  # the summary's line for the same reason starts the same way
        assert sum(line.startswith(f"  {part}:") for line in summary.splitlines()) == 1


def test_the_callbacks_round_log_is_the_reports_summary(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
            torch.manual_seed(0)
            model = LitClassifier(small_cnn())
            cb = EigenDamagePruning(schedule={0: 0.5, 1: 0.5}, structure="eigenbasis", exclude=["net.0"])
            trainer(callbacks=[cb], max_epochs=3, limit_train_batches=3).fit(model, loader(image_data(48)))
    finally:
        log.removeHandler(caplog.handler)
    text = caplog.text
    assert len(cb.reports) == 2
    for report in cb.reports:
        assert report.summary() in text  # the same formatter, not a copy of it
    # after the second round, the totals against the dense model
    dense = cb.reports[0]
    now = cb.reports[1]
    assert (
        f"dense     params {dense.params_before:,} → {now.params_after:,} "
        f"(÷{dense.params_before / now.params_after:.2f}), FLOPs {dense.flops_before:,} → "
        f"{now.flops_after:,}" in text
    )
    # the layers that will not be pruned, at the start of fit: one line per reason
    assert "  1× excluded by user: net.0\n" in text
    assert "  1× last layer (exempt_last=True): net.12\n" in text


def test_layers_too_wide_for_their_factor_share_one_reason_line() -> None:
    from lightning_eigendamage.discovery import _too_large
    from lightning_eigendamage.report import reason_lines

    skipped = {n: _too_large((d, 30), 64) for n, d in (("a", 100), ("b", 200), ("c", 300))}
    assert reason_lines(skipped) == ["3× a K-FAC factor wider than max_factor_dim=64: a, b, c"]


def test_a_group_reason_names_its_member_only_where_it_starts_with_one():
    from lightning_eigendamage.report import reason_lines

    lines = reason_lines(
        {
            "group of a": "left whole: conv1 is excluded by user",
            "group of b": "left whole: bn (GroupNorm) needs its channel count to stay a multiple",
            "group of c": "left whole: round_to=8: no narrower width of its 12 channels",
            "group of d": "left whole: cutting one of its channels changes what the model computes",
        },
        names=3,
    )
    assert sorted(lines) == [
        "1× group left whole: a member (GroupNorm) needs its channel count to stay a multiple: b",
        "1× group left whole: a member is excluded by user: a",
        "1× group left whole: cutting one of its channels changes what the model computes: d",
        "1× group left whole: round_to=8: no narrower width of its 12 channels: c",
    ]
