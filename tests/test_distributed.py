"""prune(distributed=True) over 2 CPU processes (gloo): reduced factors and one decision."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import ConvNet, conv_batches, warm_up_bn

from lightning_eigendamage import prune
from lightning_eigendamage.curvature import capture_factors
from lightning_eigendamage.eigenbasis.pruner import find_layers


def _setup():
    torch.manual_seed(0)
    model = ConvNet()
    ((x, y),) = conv_batches(1, n=16, size=16)
    warm_up_bn(model, [(x, y)])
    return model, x, y


def _capture(model, batches, **kw):
    cands = [c for c in find_layers(model)]
    return capture_factors(
        model,
        {c.name: c.hook_module for c in cands},
        batches,
        factors_for=[c.name for c in cands if c.skipped is None],
        fisher="empirical",
        **kw,
    )


@contextlib.contextmanager
def _group(rank: int, world: int, init_file: str) -> Iterator[None]:
    """One gloo process group for a spawned test worker (one thread), torn down on exit."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _save_result(out_dir: str, name: str, model, report, **extra) -> None:
    plan = [(r.name, r.kept_in, r.kept_out, r.form) for r in report.layers]
    torch.save({"state": model.state_dict(), "plan": plan, **extra}, os.path.join(out_dir, name))


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with _group(rank, world, init_file):
        model, x, y = _setup()
        half = slice(rank * 8, (rank + 1) * 8)  # each rank sees its own half of the batch
        captured = _capture(model, [(x[half], y[half])])
        report = prune(
            model, [(x[half], y[half])], ratio=0.5, fisher="empirical", distributed=True, captured=captured
        )
        factors = {n: (lf.a(), lf.g()) for n, lf in captured.layers.items() if lf.a_sum is not None}
        _save_result(out_dir, f"rank{rank}.pt", model, report, factors=factors)


def test_two_ranks_on_halves_equal_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # Factor reduction: equal to single-process factors on the whole batch.
    model, x, y = _setup()
    single = _capture(copy.deepcopy(model), [(x, y)])
    assert r0["factors"].keys() == {n for n, lf in single.layers.items() if lf.a_sum is not None}
    for name, (a, g) in r0["factors"].items():
        torch.testing.assert_close(a, single.layers[name].a(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(g, single.layers[name].g(), rtol=1e-6, atol=1e-9)
    # One decision: same plan, bitwise-identical parameters on both ranks.
    assert r0["plan"] == r1["plan"]
    assert r0["state"].keys() == r1["state"].keys()
    for k, v in r0["state"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, r1["state"][k]), k
    # ...and the same plan a single process makes from the whole batch.
    report = prune(model, [(x, y)], ratio=0.5, fisher="empirical")
    assert r0["plan"] == [(r.name, r.kept_in, r.kept_out, r.form) for r in report.layers]


def _thinned_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from lightning_eigendamage.distributed import all_reduce_capture

    with _group(rank, world, init_file):
        model, x, y = _setup()
        half = slice(rank * 8, (rank + 1) * 8)
        # every 2nd example of each rank's half, through the hooks (a forward_fn runs whole)
        captured = _capture(model, [(x[half], y[half])], max_examples=4, forward_fn=lambda m, b: m(b[0]))
        widths = {
            n: (lf.a_sum.shape[0], lf.g_sum.shape[0])
            for n, lf in captured.layers.items()
            if lf.a_sum is not None
        }
        all_reduce_capture(captured, widths, torch.device("cpu"))
        out = {
            n: (captured.layers[n].a(), captured.layers[n].g(), captured.layers[n].locations) for n in widths
        }
        torch.save(out, os.path.join(out_dir, f"thinned{rank}.pt"))


def test_thinned_factors_reduce_over_ranks_to_those_of_the_kept_examples(tmp_path):
    """Each rank keeps every 2nd example of its half (``max_examples=4`` of 8): the reduced
    factors and ``T`` are those of one process on every 2nd example of the whole batch."""
    mp.spawn(_thinned_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "thinned0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "thinned1.pt", weights_only=True)
    model, x, y = _setup()
    single = _capture(copy.deepcopy(model), [(x[::2], y[::2])])
    for name, (a, g, t) in r0.items():
        lf = single.layers[name]
        torch.testing.assert_close(a, lf.a(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(g, lf.g(), rtol=1e-5, atol=1e-9)
        assert t == lf.locations == r1[name][2]
        torch.testing.assert_close(r1[name][0], a, rtol=0, atol=0)


def _latency_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import lightning_eigendamage.eigenbasis.pruner as pruner_mod

    calls = []

    # ranks disagree: rank 1 would keep every layer whole
    def timing(mods, example, repeats=7, *, backward=False):
        calls.append(sorted(mods))
        best = "unchanged" if rank == 1 else ("bottleneck" if "bottleneck" in mods else "unchanged")
        return {k: (0.0 if k == best else 1.0) for k in mods}

    pruner_mod.time_modules = timing
    with _group(rank, world, init_file):
        model, x, y = _setup()
        half = slice(rank * 8, (rank + 1) * 8)
        report = prune(
            model, [(x[half], y[half])], ratio=0.5, target="flops", form_by="latency", distributed=True
        )
        _save_result(out_dir, f"lat{rank}.pt", model, report, calls=len(calls))


def test_latency_forms_are_timed_on_rank_0_only_and_shared(tmp_path):
    mp.spawn(_latency_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "lat0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "lat1.pt", weights_only=True)
    assert r0["calls"] > 0 and r1["calls"] == 0
    assert r0["plan"] == r1["plan"] and any(form == "bottleneck" for *_, form in r0["plan"])
    for k, v in r0["state"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, r1["state"][k]), k


def _input_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from lightning_eigendamage.distributed import rank_zero_input

    with _group(rank, world, init_file):
        mine = {"x": torch.full((2, 3), float(rank)), "mask": (torch.ones(2) * rank, [torch.tensor(rank)])}
        got = rank_zero_input(mine, torch.device("cpu"))
        none = rank_zero_input(None if rank == 0 else torch.ones(1), torch.device("cpu"))
        torch.save({"got": got, "none": none}, os.path.join(out_dir, f"input{rank}.pt"))


def test_rank_zero_input_gives_every_rank_rank_0s_input(tmp_path):
    mp.spawn(_input_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"input{rank}.pt", weights_only=False)
        assert torch.equal(r["got"]["x"], torch.zeros(2, 3))
        assert torch.equal(r["got"]["mask"][0], torch.zeros(2)) and r["got"]["mask"][1][0].item() == 0
        assert r["none"] is None  # rank 0 had no input: none on every rank


def _mixed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from test_channel_parts import ShuffleNet, _batches

    with _group(rank, world, init_file):
        torch.manual_seed(0)
        model = ShuffleNet().eval()
        (x, y), _ = _batches()
        half = slice(rank * 8, (rank + 1) * 8)
        report = prune(
            model, [(x[half], y[half])], ratio=0.3, target="flops", structure="auto", distributed=True
        )
        _save_result(out_dir, f"mixed{rank}.pt", model, report, eigen=sorted(report.eigenbasis_layers))


def test_auto_prunes_the_uncovered_layers_alike_on_every_rank(tmp_path):
    """``prune(structure="auto", distributed=True)`` on a model traced part by part: the
    eigenbasis step and the channel step take one decision over both ranks (the layer no part
    covers rewritten alike, bitwise-equal parameters)."""
    mp.spawn(_mixed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "mixed0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "mixed1.pt", weights_only=True)
    assert r0["eigen"] == r1["eigen"] == ["stem.0"]
    assert r0["plan"] == r1["plan"] and r0["state"].keys() == r1["state"].keys()
    for k, v in r0["state"].items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, r1["state"][k]), k
