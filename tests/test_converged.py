"""benchmarks/converged.py: the crop, the calibration batches and the grids (the runs themselves
are benchmarks, not tests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import converged, tables  # noqa: E402
from lightning_eigendamage.costs import count_flops  # noqa: E402


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    g = torch.Generator().manual_seed(0)
    out = converged.random_crop(x, 2, g)
    assert out.shape == x.shape
    g = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (2,), generator=g)
    dx = torch.randint(0, 5, (2,), generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        want = padded[i, :, dy[i] : dy[i] + 5, dx[i] : dx[i] + 6]
        assert torch.equal(out[i], want)


def test_calibration_batches_are_fixed_by_the_seed() -> None:
    data = SimpleNamespace(x_train=torch.randn(3000, 1, 4, 4), y_train=torch.randint(0, 10, (3000,)))
    a, b, c = (converged.calibration(data, s) for s in (0, 0, 1))
    assert len(a) == converged.CALIB_BATCHES and a[0][0].shape[0] == converged.CALIB_SIZE
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])


GRIDS = (
    "after-pruning",
    "plain-user",
    "finetune",
    "finetune-seed1",
    "finetune-all",
    "second-order",
    "iterative",
    "finetune-more",
    "finetune10",
    "finetune-complete",
    "latency",
    "latency-finetune",
    "latency-forms",
    "latency-forms-finetune",
    "baselines-cap",
)


def _key(args) -> str:
    rec = {
        "model": args.model,
        "method": args.method,
        "variant": args.variant if args.method in converged.OURS else converged.channel_variant(args),
        "flops_x": None if args.latency_x is not None else args.flops_x,
        "seed": args.seed,
        "finetune": args.finetune,
        "protocol_bn": not args.no_protocol_bn,
        "latency_x": args.latency_x,
        "memory_format": args.memory_format,
    }
    return converged.row_key(rec)


def test_grid_rows_parse_and_have_distinct_keys() -> None:
    every = set()
    for name in GRIDS:
        keys = {_key(converged.parse_args(["row", *argv])) for argv in converged.grid_rows(name)}
        assert len(keys) == len(converged.grid_rows(name)), name
        every |= keys
    # latency rows differ from FLOPs rows and from each other by target and memory format
    lat = [converged.parse_args(["row", *a]) for a in converged.grid_rows("latency")]
    assert {a.memory_format for a in lat} == {"nchw", "channels_last"}
    assert all(a.flops_x is None and a.latency_x for a in lat)
    # the after-pruning ablation holds no timed variant (its rows would need a quiet machine) and
    # no variant that only changes the fine-tune (its after-pruning row would repeat the defaults)
    ablation = {converged.parse_args(["row", *a]).variant for a in converged.grid_rows("after-pruning")}
    for v in ablation:
        opts = converged.VARIANTS[v]
        assert opts.get("form_by") != "latency" and "train_rotations" not in opts, v


def test_old_records_keep_their_keys() -> None:
    """Records written before the latency fields existed are still found (resuming skips them)."""
    rec = dict(model="m", method="l2", variant="-", flops_x=4.0, seed=0, finetune=3, protocol_bn=True)
    assert converged.row_key(rec) == "m|l2|-|4.0|0|3|True"
    lat = rec | {"flops_x": None, "latency_x": 2.0, "memory_format": "nchw"}
    assert converged.row_key(lat) == "m|l2|-|None|0|3|True|2.0|nchw"


def _args(**kw):
    base = ["row", "--model", "vgg-narrow", "--method", kw.pop("method", "eigendamage")]
    base += ["--latency-x", str(kw.pop("latency_x"))] if "latency_x" in kw else ["--flops-x", "4"]
    args = converged.parse_args(base)
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def _fake_latency(monkeypatch, pruned_rel, fail_above: float | None = None) -> None:
    """Networks are stand-ins carrying their ratio; latency is a known function of it."""

    def pruner(args, dense, data, calib):
        def at(ratio):
            if fail_above is not None and ratio > fail_above:
                raise RuntimeError("cannot prune that far")
            return SimpleNamespace(ratio=ratio), {}

        return at

    monkeypatch.setattr(converged, "ratio_pruner", pruner)
    monkeypatch.setattr(
        converged,
        "interleaved_latency",
        lambda dense, net, x, repeats, fmt: (2.0, 2.0 * pruned_rel(net.ratio)),
    )


def test_match_latency_bisects_to_the_target(monkeypatch) -> None:
    _fake_latency(monkeypatch, lambda r: 1.0 - 0.9 * r)
    data = SimpleNamespace(x_test=torch.zeros(64, 1, 2, 2))
    net, info = converged.match_latency(_args(latency_x=2.0), None, data, [])
    want = (1 - 0.5) / 0.9  # the ratio whose latency is half the dense one
    assert info["latency_matched"] and abs(info["latency_rel"] / 0.5 - 1) <= 0.02
    assert net.ratio == pytest.approx(info["ratio_found"], abs=1e-4)
    assert abs(info["ratio_found"] - want) < 0.02
    assert info["probes"][0]["ratio"] == converged.MAX_RATIO  # the end point is tried first
    assert (
        len(info["probes"])
        <= 1
        + converged.parse_args(
            ["row", "--model", "vgg-narrow", "--method", "l2", "--flops-x", "2"]
        ).bisect_steps
    )


def test_an_unreachable_latency_is_recorded_as_not_matched(monkeypatch) -> None:
    _fake_latency(monkeypatch, lambda r: 1.0 - 0.5 * r)  # at most ÷1.94 faster
    data = SimpleNamespace(x_test=torch.zeros(64, 1, 2, 2))
    net, info = converged.match_latency(_args(latency_x=4.0), None, data, [])
    assert not info["latency_matched"] and net.ratio == converged.MAX_RATIO
    assert info["latency_rel"] == pytest.approx(1.0 - 0.5 * converged.MAX_RATIO)


def test_failed_probes_count_as_too_far(monkeypatch) -> None:
    _fake_latency(monkeypatch, lambda r: 1.0 - 0.9 * r, fail_above=0.6)
    data = SimpleNamespace(x_test=torch.zeros(64, 1, 2, 2))
    net, info = converged.match_latency(_args(latency_x=2.0), None, data, [])
    assert "error" in info["probes"][0] and info["latency_matched"]
    assert net.ratio <= 0.6


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
    )


def _tiny_data(n: int = 300):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    return SimpleNamespace(x_train=x, y_train=y, x_test=x[:64], y_test=y[:64])


def test_ratio_pruner_equals_a_fresh_prune_call() -> None:
    """One analysis reused for every probe gives exactly what prune() gives at that ratio."""
    data, dense = _tiny_data(), _tiny_net().eval()
    calib = [(data.x_train[i * 32 : (i + 1) * 32], data.y_train[i * 32 : (i + 1) * 32]) for i in range(3)]
    args = _args(latency_x=2.0)
    at = converged.ratio_pruner(args, dense, data, calib)
    x = data.x_test
    kept = []
    for ratio in (0.3, 0.6, 0.3):
        a, _ = at(ratio)
        b, _ = converged.prune_copy(args, dense, data, calib, ratio)
        assert count_flops(a, x[:1]) == count_flops(b, x[:1]) < count_flops(dense, x[:1])
        assert torch.equal(a.eval()(x), b.eval()(x))
        kept.append((a, a(x).detach(), count_flops(a, x[:1])))
    # a later probe leaves the networks of earlier probes as they were
    assert all(torch.equal(n(x), out) and count_flops(n, x[:1]) == f for n, out, f in kept)
    assert len({id(n) for n, _, _ in kept}) == 3
    assert [m.out_channels for m in dense.modules() if isinstance(m, nn.Conv2d)] == [8, 12]  # untouched


def test_iterative_rounds_compound_to_the_target_and_training_goes_on() -> None:
    data, dense = _tiny_data(), _tiny_net().eval()
    calib = [(data.x_train[i * 32 : (i + 1) * 32], data.y_train[i * 32 : (i + 1) * 32]) for i in range(3)]
    args = _args(method="eigendamage-iter", finetune=1)  # 300 images → 3 steps → rounds at 0, 1, 2
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    net, info = converged.iterative_prune_and_finetune(args, dense, data, calib)
    assert [r["step"] for r in info["rounds"]] == [0, 1, 2]
    assert info["round_fraction"] == pytest.approx(1 - 4 ** (-1 / 3))
    x = data.x_test[:1]
    # Each round removes at least its fraction (a coarse tiny net overshoots a little).
    assert all(r["target_reached"] for r in info["rounds"])
    assert 4.0 <= count_flops(dense, x) / count_flops(net, x) < 4.0 * 1.2
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # dense untouched
    assert torch.isfinite(net(data.x_test)).all()


def _write(folder: Path, rows: list[dict]) -> None:
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for m in tables.CONVERGED_MODELS:
        (folder / f"dense-{m}.json").write_text(json.dumps({"test_accuracy": 92.0, "params": 1000}))


def test_converged_report_computes_the_gaps_and_flags_unmatched_latency(tmp_path) -> None:
    base = dict(
        model="vgg-narrow", seed=0, protocol_bn=True, flops_reached_x=4.0, param_ratio=0.3, prune_s=1.0
    )
    rows = [
        # a capped channel row: its own table, never the default method's "best other"
        base
        | dict(
            method="c-obd",
            variant="cap0.75",
            flops_x=4.0,
            finetune=3,
            acc_after_quick=89.0,
            acc_finetuned=95.0,
            widths={"a": 7, "b": 4},
        ),
        base | dict(method="eigendamage", variant="defaults", flops_x=4.0, finetune=0, acc_after_quick=80.0),
        base
        | dict(
            method="eigendamage", variant="defaults", flops_x=4.0, finetune=0, acc_after_quick=84.0, seed=1
        ),
        base | dict(method="l2", variant="-", flops_x=4.0, finetune=0, acc_after_quick=70.0),
        base | dict(method="c-obd", variant="-", flops_x=4.0, finetune=0, acc_after_quick=75.0),
        base
        | dict(
            method="eigendamage",
            variant="defaults",
            flops_x=4.0,
            finetune=3,
            acc_after_quick=80.0,
            acc_finetuned=91.0,
        ),
        base
        | dict(
            method="taylor", variant="-", flops_x=4.0, finetune=3, acc_after_quick=10.0, acc_finetuned=91.5
        ),
        base
        | dict(
            method="l2",
            variant="-",
            flops_x=None,
            finetune=0,
            acc_after_quick=60.0,
            latency_x=2.0,
            memory_format="nchw",
            latency_rel=0.62,
            latency_matched=False,
        ),
    ]
    _write(tmp_path, rows)
    text = tables.converged_report(tmp_path, plots=True)
    line = next(x for x in text.splitlines() if x.startswith("| vgg-narrow | ÷4 |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2] == "82.00"  # mean of the two seeds
    assert cells[4].startswith("70.00 (TP L2") and cells[5] == "12.00"
    assert cells[6].startswith("75.00 (C-OBD")  # the best of every other method
    assert cells[9] == "-0.50"  # 91.0 against Taylor's 91.5
    cap = next(x for x in text.splitlines() if x.startswith("| vgg-narrow | ÷4 | C-OBD | 0.75 |"))
    # after pruning, fine-tuned, narrowest layer; the default-cap row after pruning (no fine-tune)
    assert [c.strip() for c in cap.split("|")[5:-1]] == ["89.00", "95.00", "4", "75.00", "–"]
    lat = next(x for x in text.splitlines() if "| TP L2 | ×0.620 |" in x)
    assert "**no**" in lat
    assert (tmp_path / "vgg-narrow.png").stat().st_size > 1000
    assert (tmp_path / "tables.md").read_text() == text


def test_group_cap_reaches_the_baseline_and_the_record_key(monkeypatch) -> None:
    import benchmarks.baselines_tp as btp

    seen = {}

    def fake(net, calib, method, **kw):
        seen.update(kw)
        return SimpleNamespace(skipped={})

    monkeypatch.setattr(btp, "prune_baseline", fake)
    args = _args(method="c-obs", group_cap=0.75)
    net, info = converged.prune_copy(args, torch.nn.Sequential(torch.nn.Linear(3, 2)), None, [], 0.5)
    assert seen["max_group_ratio"] == 0.75 and info["widths"] == {"0": 2}
    assert converged.channel_variant(args) == "cap0.75"
    assert "--group-cap 0.75" in converged.single_command(args)
    default = _args(method="c-obs")
    seen.clear()
    converged.prune_copy(default, torch.nn.Sequential(torch.nn.Linear(3, 2)), None, [], 0.5)
    assert "max_group_ratio" not in seen and converged.channel_variant(default) == "-"
    with pytest.raises(SystemExit, match="group-cap"):
        converged.run_row(_args(method="eigendamage", group_cap=0.75))


def test_gradual_removal_moves_the_weights_off_the_marked_coordinates() -> None:
    data, dense = _tiny_data(), _tiny_net().eval()
    calib = [(data.x_train[i * 32 : (i + 1) * 32], data.y_train[i * 32 : (i + 1) * 32]) for i in range(3)]
    args = _args(method="eigendamage-gradual", gradual_epochs=2, gradual_penalty=60.0)
    net, info = converged.gradual_prune(args, dense, data, calib)
    assert info["gradual"]["steps"] == 6  # 300 images, batch 128, 2 epochs
    assert info["marked_norm_after"] < 0.5 * info["marked_norm_before"]
    assert 4.0 <= count_flops(dense, data.x_test[:1]) / count_flops(net, data.x_test[:1]) < 4.8
    # without the penalty the same epochs leave the marked coordinates where they were (roughly)
    args.gradual_penalty = 1e-9
    _, plain = converged.gradual_prune(args, dense, data, calib)
    assert plain["marked_norm_after"] > 0.8 * plain["marked_norm_before"]


def test_a_latency_matched_network_chosen_by_timing_is_continued_not_rebuilt(tmp_path) -> None:
    """Forms chosen by timing cannot be rebuilt from the ratio: the fine-tuned row continues the
    very network the after-pruning row saved, with that row's latency figures."""
    from lightning_eigendamage import prune

    argv = ["--model", "vgg-narrow", "--method", "eigendamage", "--variant", "latency-forms"]
    argv += ["--latency-x", "1.22", "--cache", str(tmp_path)]
    after = converged.parse_args(["row", *argv])
    tuned = converged.parse_args(["row", *argv, "--finetune", "3"])
    assert not converged.reproducible(after) and converged.matched_net_path(
        after
    ) == converged.matched_net_path(tuned)
    other = converged.parse_args(["row", *argv[:-2], "--cache", str(tmp_path), "--seed", "1"])
    assert converged.matched_net_path(other) != converged.matched_net_path(after)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 24 * 24, 10)
    )
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
    prune(net, batches, ratio=0.5)
    torch.save(net, converged.matched_net_path(after))
    before = {"command": "python benchmarks/converged.py row ...", "ratio_found": 0.5, "latency_rel": 0.81}
    before |= {"latency_matched": True, "probes": [{"ratio": 0.5, "latency_rel": 0.81}], "unrelated": 1}
    before |= {"latency_ms": {"dense": 10.0, "pruned": 8.1}, "latency_target_rel": 0.82}
    before |= {"latency_batch": 64, "latency_threads": 2, "forms": {"fold_out": 3}}
    got, info = converged.continue_matched(tuned, before)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(got(x), net(x), rtol=0, atol=0)
    assert info == {k: v for k, v in before.items() if k not in ("command", "unrelated")} | {
        "latency_from": before["command"]
    }
