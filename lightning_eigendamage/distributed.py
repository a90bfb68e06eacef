"""Combining curvature across processes and making one pruning decision for all of them.

Plain ``torch.distributed`` collectives (NCCL on GPU, gloo on CPU) on the default or a given
process group; Lightning's strategies set the group up. Nothing here is called unless a
distributed run asks for it (``prune(..., distributed=True)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .curvature import CaptureResult, LayerFactors, to_device


def is_distributed(group: Any = None) -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def check_process_group(distributed: bool) -> None:
    """TypeError unless ``distributed`` is a bool; ValueError if it is asked for without an
    initialised process group."""
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group (run under "
            "torchrun, or call dist.init_process_group first); in a single process pass "
            "distributed=False"
        )


def all_reduce_capture(
    result: CaptureResult,
    widths: dict[str, tuple[int, int]],
    device: torch.device,
    group: Any = None,
    flags_for: Iterable[str] = (),
) -> CaptureResult:
    """Sum factor sums and row counts over all processes, in place, in sorted layer order.

    Factors are stored as sums with their row counts, so summing both weights every process by
    the number of rows it accumulated: the averages equal those of one process that saw all the
    data. A layer with no rows on some process contributes zeros there. Flags (fired, reached,
    most calls per forward) are combined with max; batch counts are summed.

    Args:
        widths: layer name → ``(d_in, d_out)``, the factor sizes (needed where a process has none).
        flags_for: more layers (hooked without factors) whose flags are combined.
    """
    if not is_distributed(group):
        return result
    names = sorted(widths)
    flagged = sorted(set(names).union(flags_for))
    for name in names:
        lf = result.layers.setdefault(name, LayerFactors())
        d_in, d_out = widths[name]
        a = lf.a_sum if lf.a_sum is not None else torch.zeros(d_in, d_in, dtype=torch.float64, device=device)
        g = (
            lf.g_sum
            if lf.g_sum is not None
            else torch.zeros(d_out, d_out, dtype=torch.float64, device=device)
        )
        a, g = a.to(device), g.to(device)
        dist.all_reduce(a, group=group)
        dist.all_reduce(g, group=group)
        lf.a_sum, lf.g_sum = a, g
    counts = torch.tensor(
        [[result.layers[n].a_rows, result.layers[n].g_rows, result.layers[n].examples] for n in names]
        + [[result.batches, result.skipped_batches, 0]],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(counts, group=group)
    for name in flagged:
        result.layers.setdefault(name, LayerFactors())
    flags = torch.tensor(
        [[result.layers[n].fired, result.layers[n].reached, result.layers[n].max_calls] for n in flagged],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    for i, name in enumerate(names):
        lf = result.layers[name]
        rows_a, rows_g, lf.examples = counts[i].tolist()
        lf.a_rows, lf.g_rows = int(rows_a), int(rows_g)
    for i, name in enumerate(flagged):
        lf = result.layers[name]
        lf.fired, lf.reached = bool(flags[i, 0]), bool(flags[i, 1])
        lf.max_calls = int(flags[i, 2])
    result.batches, result.skipped_batches = int(counts[-1, 0]), int(counts[-1, 1])
    # Geometry and firing order are properties of the model; take rank 0's.
    meta = [
        {n: (result.layers[n].geometry, result.layers[n].input_shape) for n in names},
        result.fire_order,
    ]
    dist.broadcast_object_list(meta, src=_global_rank(0, group), group=group)
    for name, (geo, shape) in meta[0].items():
        result.layers[name].geometry = geo
        result.layers[name].input_shape = shape
    result.fire_order = list(meta[1])
    return result


def split_eigh(
    factors: list[torch.Tensor], eigh_many: Any, group: Any = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Eigendecompose ``factors`` with the work split over processes, results broadcast.

    Factor ``i`` is decomposed by rank ``i mod world_size`` (``eigh_many`` on each rank's share,
    a list of factors to a list of ``(evals, evecs)``) and broadcast from there, so every process
    ends with bitwise-identical eigenvalues and eigenvectors.
    """
    if not is_distributed(group):
        return eigh_many(factors)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = dict(zip(range(rank, len(factors), world), eigh_many(factors[rank::world])))
    out = []
    for i, f in enumerate(factors):
        owner = i % world
        if owner == rank:
            evals, evecs = (t.contiguous() for t in mine[i])
        else:
            n = f.shape[0]
            evals = torch.empty(n, dtype=torch.float64, device=f.device)
            evecs = torch.empty(n, n, dtype=torch.float64, device=f.device)
        dist.broadcast(evals, src=_global_rank(owner, group), group=group)
        dist.broadcast(evecs, src=_global_rank(owner, group), group=group)
        out.append((evals, evecs))
    return out


def broadcast_object(obj: Any, group: Any = None) -> Any:
    """Rank 0's ``obj`` on every process (identity when not distributed)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=_global_rank(0, group), group=group)
    return box[0]


def rank_zero_input(example: Any, device: torch.device, group: Any = None) -> Any:
    """Rank 0's ``example`` (a model input: tensors, or tuples, lists, dicts of them; or None) on
    every process, on ``device``; identity when not distributed. Call it on every process. For
    checks that run the model, so that every process checks the same input and decides alike."""
    if not is_distributed(group):
        return example
    on_cpu = to_device(example, torch.device("cpu"))
    if device.type == "cuda":  # the copies to the host are non-blocking
        torch.cuda.synchronize(device)
    return to_device(broadcast_object(on_cpu, group), device)


def _global_rank(group_rank: int, group: Any) -> int:
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)
