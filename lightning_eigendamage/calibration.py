"""After the surgery: BatchNorm re-estimation and label-free reconstruction of pruned layers.

Both work on calibration batches (the ones the curvature was measured on) and touch only what
they must:

- :func:`downstream_batchnorms` finds the BatchNorm layers whose input depends on a pruned layer
  (a walk of the autograd graph of one forward), and :func:`recalibrate_batchnorm` re-estimates
  exactly their running statistics (cumulative average over the batches); every other buffer,
  parameter and mode is left as it was.
- :func:`reconstruct` re-fits each pruned layer's core (and the bias on its last stage) by damped
  least squares so that its outputs on the calibration inputs match the dense layer's, in
  forward order, with inputs from the already re-fitted upstream (errors do not compound).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .adapters import adapter_for
from .eigenbasis.layers import KFELayer
from .report import PruningWarning

Forward = Callable[[nn.Module, Any], Any]  # (model, batch) → output, batch already on the device

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needed has been seen."""


def _reaches(t: torch.Tensor, targets: set) -> bool:
    """Whether the autograd graph of ``t`` leads to one of the ``targets`` nodes."""
    stack, seen = [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node in targets:
            return True
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False


def downstream_batchnorms(
    model: nn.Module, pruned: Iterable[nn.Module], batch: Any, forward: Forward
) -> list[nn.Module]:
    """The BatchNorm layers (tracking running statistics) whose input depends on the output of a
    module in ``pruned``, found on one forward of ``batch`` in eval mode (modes restored).

    A BatchNorm that runs but does not depend on a pruned layer (another branch, a stem before
    every pruned layer) is not returned.
    """
    pruned = list(pruned)
    nodes: set = set()
    found: list[nn.Module] = []
    handles = []

    def mark(module: nn.Module, inputs: tuple, output: Any) -> None:
        if torch.is_tensor(output) and output.grad_fn is not None:
            nodes.add(output.grad_fn)

    def check(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0] if inputs else None
        if torch.is_tensor(x) and x.grad_fn is not None and module not in found and _reaches(x, nodes):
            found.append(module)

    tracked = [
        m
        for m in model.modules()
        if isinstance(m, _BATCHNORMS) and m.track_running_stats and m.running_mean is not None
    ]
    if not tracked or not pruned:  # nothing to find: no forward (a transformer has no BatchNorm)
        return found
    for m in pruned:
        handles.append(m.register_forward_hook(mark))
    for m in tracked:
        handles.append(m.register_forward_pre_hook(check))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.enable_grad():
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return found


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    bns: list[nn.Module],
    batches: Iterable[Any],
    forward: Forward,
    *,
    process_group: Any = None,
    distributed: bool = False,
) -> int:
    """Re-estimate the running mean and variance of ``bns`` as the average over ``batches``.

    Only ``bns`` run in train mode (their statistics are reset, then accumulated with
    ``momentum=None``, a cumulative average); every other module runs in eval mode, so no other
    buffer changes, and dropout is off. Modes and momenta are restored. With ``distributed`` the
    statistics are averaged over the processes, so every process ends with the same buffers.
    A batch that gives some BatchNorm one value per channel (a last batch of one example before
    a ``BatchNorm1d``) is left out, with a :class:`~.report.PruningWarning`. Returns the number
    of batches used (0: nothing was changed).
    """
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns}
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = single = 0
    non_finite: list[int] = []
    try:
        for i, batch in enumerate(batches):
            before = [
                (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns
            ]
            try:
                forward(model, batch)
            except ValueError as err:  # BatchNorm in train mode on one value per channel
                if "Expected more than 1 value per channel" not in str(err):
                    raise
                for m, (mean, var, n) in zip(bns, before):  # the batch is left out entirely
                    m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)
                single += 1
                continue
            if not all(
                bool(torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all())
                for m in bns
            ):
                for m, (mean, var, n) in zip(bns, before):  # NaN/Inf in this batch: left out
                    m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)
                non_finite.append(i)
                continue
            seen += 1
    except BaseException:
        for m, (mean, var, n) in saved.items():
            m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)
        raise
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    if single:
        warnings.warn(
            f"{single} calibration batch(es) gave a BatchNorm one value per channel (a batch of one "
            "example?) and were left out of the BatchNorm re-estimation",
            PruningWarning,
            stacklevel=3,
        )
    if non_finite:
        warnings.warn(
            f"calibration batch(es) {non_finite} (0-based) gave non-finite BatchNorm statistics (NaN or "
            "Inf in the data?) and were left out of the BatchNorm re-estimation",
            PruningWarning,
            stacklevel=3,
        )
    if seen == 0:
        for m, (mean, var, n) in saved.items():
            m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)
        return 0
    if distributed and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(process_group)
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf, group=process_group)
                buf.div_(world)
    return seen


def _stages(unit: nn.Module) -> tuple[nn.Module | None, nn.Module, nn.Module | None]:
    if isinstance(unit, KFELayer):
        return unit.rotate_in, unit.core, unit.rotate_out
    return None, unit, None


def _run_until(model: nn.Module, module: nn.Module, batch: Any, forward: Forward, pre: bool) -> Any:
    """The input (``pre``) or ``(input, output)`` of ``module`` on ``batch``, stopping the forward there."""
    box: dict[str, Any] = {}
    if pre:

        def hook(m: nn.Module, inputs: tuple) -> None:
            box["v"] = inputs[0].detach()
            raise _Stop

        h = module.register_forward_pre_hook(hook)
    else:

        def hook(m: nn.Module, inputs: tuple, output: Any) -> None:  # type: ignore[misc]
            box["v"] = output.detach()
            raise _Stop

        h = module.register_forward_hook(hook)
    try:
        forward(model, batch)
    except _Stop:
        pass
    finally:
        h.remove()
    if "v" not in box:
        raise RuntimeError("the layer did not run on a calibration batch")
    return box["v"]


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    dense: nn.Module,
    names: list[str],
    batches: list[Any],
    forward: Forward,
    *,
    damping: float = 1e-4,
) -> dict[str, float]:
    """Re-fit the core (and last-stage bias) of each pruned layer in ``names`` (forward order).

    For a layer ``x ↦ R_out · (C ∗ (R_in x)) + b`` (stages as present) the rotations stay fixed
    and, with ``p`` the core's input patches ``(rows, r_in·k²)`` on the *pruned* network's input
    (upstream layers already re-fitted) and ``t`` the *dense* network's output of the same layer
    ``(rows, C_out)``, it solves the damped normal equations

        (Σ p̃ p̃ᵀ + λ I) [C | c]ᵀ = Σ p̃ zᵀ,   z = R_out⁺ t,   p̃ = [p; 1],
        λ = damping · mean(diag Σ p̃ p̃ᵀ)

    and sets ``b = R_out c + (I − R_out R_out⁺) t̄`` (``t̄``: the mean target row), the joint
    least-squares optimum of core and bias (no constant column when the layer has no bias).

    Memory: one ``(r_in·k² + 1)²`` and one ``(r_in·k² + 1) × r_out`` float64 matrix per layer at a
    time (never the activations: they are reduced batch by batch), plus the dense copy of the
    model the caller keeps. Time: two forward passes per layer and batch, each stopped at the
    layer, one solve per layer, and two more passes on the first batch for the reported error.
    Modes are restored; the models run in eval mode.

    Returns, per layer, the relative output error ``‖y − t‖ / ‖t‖`` after the fit, on the first
    batch.
    """
    modes = {m: m.training for m in (*model.modules(), *dense.modules())}
    model.eval(), dense.eval()
    errors: dict[str, float] = {}
    skipped_batches: set[int] = set()
    try:
        for name in names:
            unit, ref = model.get_submodule(name), dense.get_submodule(name)
            rin, core, rout = _stages(unit)
            adapter = adapter_for(core, exact=False)
            bias_owner = rout if rout is not None else core
            has_bias = bias_owner.bias is not None
            r_out_m = (
                None if rout is None else rout.weight.detach().reshape(rout.weight.shape[0], -1).double()
            )
            pinv = None if r_out_m is None else torch.linalg.pinv(r_out_m)  # (r_out, C_out)
            h = b = t_sum = None
            rows_total = 0
            for i, batch in enumerate(batches):
                x_p = _run_until(model, unit, batch, forward, pre=True)
                t = adapter.output_rows(_run_until(dense, ref, batch, forward, pre=False)).double()
                u = rin(x_p) if rin is not None else x_p
                p = adapter.patches(core, u).double()
                if has_bias:
                    p = torch.cat([p, torch.ones(p.shape[0], 1, dtype=p.dtype, device=p.device)], 1)
                z = t if pinv is None else t @ pinv.T
                if not (bool(torch.isfinite(p).all()) and bool(torch.isfinite(z).all())):
                    skipped_batches.add(i)  # NaN/Inf inputs: never folded into a weight
                    continue
                h = p.T @ p if h is None else h + p.T @ p
                b = p.T @ z if b is None else b + p.T @ z
                t_sum = t.sum(0) if t_sum is None else t_sum + t.sum(0)
                rows_total += t.shape[0]
            if h is None:
                continue
            lam = damping * float(torch.diagonal(h).mean()) + 1e-12
            sol = torch.linalg.solve(h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device), b)
            w = sol[:-1] if has_bias else sol  # (r_in·k², r_out)
            core.weight.copy_(w.T.reshape(core.weight.shape).to(core.weight.dtype))
            if has_bias:
                c = sol[-1]  # (r_out,)
                t_mean = t_sum / rows_total
                if r_out_m is None:
                    new_b = c
                else:
                    new_b = r_out_m @ c + t_mean - r_out_m @ (pinv @ t_mean)
                bias_owner.bias.copy_(new_b.to(bias_owner.bias.dtype))
            num = den = 0.0
            first = [b for i, b in enumerate(batches) if i not in skipped_batches][:1]
            for batch in first:  # the error is a report, measured on the first finite batch
                y = adapter.output_rows(_run_until(model, unit, batch, forward, pre=False)).double()
                t = adapter.output_rows(_run_until(dense, ref, batch, forward, pre=False)).double()
                num += float(((y - t) ** 2).sum())
                den += float((t**2).sum())
            errors[name] = (num / max(den, 1e-300)) ** 0.5
    finally:
        for m, mode in modes.items():
            m.training = mode
    if skipped_batches:
        warnings.warn(
            f"calibration batch(es) {sorted(skipped_batches)} (0-based) have non-finite values (NaN or "
            "Inf) and were left out of the reconstruction",
            PruningWarning,
            stacklevel=3,
        )
    return errors
