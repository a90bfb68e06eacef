"""Measured layer latency as a function of widths, for ranking channels by the time they save.

FLOPs are a poor proxy for time: a layer pays a fixed cost per call, its normalisation and
activation and its memory traffic grow with its widths, and small layers run far from the
device's peak. For each Conv2d/Linear of a model this module times a standalone copy of the layer
(a conv with a BatchNorm and a ReLU after it, as in most networks) at a few widths, on the model's
device, at the batch size, memory format and mode (inference or a training step) the user names,
and fits

    t(c_in, c_out) = a + b·(c_in / groups)·c_out + c·c_out + d·c_in      (seconds per batch)

(a depthwise conv: ``t(c) = a + b·c``) with non-negative coefficients. The fit is kept as a small
table, layer name → ``[a, b, c, d]``, in the report and in the callback's state, so a resumed run
never measures again. The channel engine ranks with it under ``rank_by="relative_per_latency"``
or ``"damage_per_latency"``: a channel's score over the time its removal saves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..costs import time_modules

# (c_in, c_out) fractions of a layer's widths at which it is timed (a depthwise conv: the first
# of each pair); six points for four coefficients
GRID = ((1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (0.5, 0.5), (0.25, 0.25), (0.75, 0.75))


def input_shapes(model: nn.Module, run: Callable[[], Any], layers: dict[str, nn.Module]) -> dict[str, tuple]:
    """The shape of each layer's input (without the batch dimension) while ``run()`` runs."""
    shapes: dict[str, tuple] = {}
    handles = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple) -> None:
            if name not in shapes and inputs and torch.is_tensor(inputs[0]):
                shapes[name] = tuple(inputs[0].shape[1:])

        return record

    try:
        for name, m in layers.items():
            handles.append(m.register_forward_pre_hook(hook(name)))
        run()
    finally:
        for h in handles:
            h.remove()
    return shapes


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels


def _width(c: int, f: float, step: int) -> int:
    return max(step, round(c * f / step) * step)


def _copy_at(m: nn.Module, c_in: int, c_out: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A fresh layer like ``m`` with widths ``c_in``/``c_out`` (a conv followed by BatchNorm and ReLU)."""
    if isinstance(m, nn.Conv2d):
        groups = c_in if _depthwise(m) else m.groups
        conv = nn.Conv2d(
            c_in,
            c_out,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            groups=groups,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
        )
        layer: nn.Module = nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU())
    else:
        layer = nn.Linear(c_in, c_out, bias=m.bias is not None)
    return layer.to(device=device, dtype=dtype)


def _fit(features: list[list[float]], times: list[float]) -> list[float]:
    """Least squares with non-negative coefficients (a feature whose coefficient comes out
    negative is dropped and the rest refitted)."""
    active = list(range(len(features[0])))
    x_all = torch.tensor(features, dtype=torch.float64)
    y = torch.tensor(times, dtype=torch.float64)
    coef = torch.zeros(x_all.shape[1], dtype=torch.float64)
    while active:
        x = x_all[:, active]
        scale = x.abs().amax(0).clamp_min(1e-30)
        sol = torch.linalg.lstsq(x / scale, y[:, None]).solution[:, 0] / scale
        if bool((sol >= 0).all()):
            coef[active] = sol
            break
        active = [a for a, s in zip(active, sol.tolist()) if s >= 0] or []
    return coef.tolist()


def measure(
    layers: dict[str, nn.Module],
    shapes: dict[str, tuple],
    *,
    batch: int,
    memory_format: str,
    mode: str,
    repeats: int = 5,
) -> dict[str, list[float]]:
    """The latency table: per layer of ``layers`` with a recorded input shape, the coefficients
    ``[a, b, c, d]`` of its fitted time (see the module docstring), measured on its device and
    dtype at ``batch`` inputs, ``memory_format`` (``"model"``: the layer's own, ``"channels_last"``
    or ``"contiguous"``) and ``mode`` (``"inference"`` or ``"training"``)."""
    table: dict[str, list[float]] = {}
    for name, m in layers.items():
        if name not in shapes or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w = m.weight
        cl = memory_format == "channels_last" or (
            memory_format == "model"
            and w.dim() == 4
            and not w.is_contiguous()
            and w.is_contiguous(memory_format=torch.channels_last)
        )
        c_in, c_out = (
            (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
        )
        step = 1 if _depthwise(m) or not isinstance(m, nn.Conv2d) else m.groups
        feats, times = [], []
        seen = set()
        for f_in, f_out in GRID:
            if _depthwise(m):
                a = b = _width(c_in, f_in, 1)
            else:
                a, b = _width(c_in, f_in, step), _width(c_out, f_out, step)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            layer = _copy_at(m, a, b, w.device, w.dtype)
            x = torch.randn((batch, *_with_width(shapes[name], m, a)), device=w.device, dtype=w.dtype)
            if cl and x.dim() == 4:
                layer = layer.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            train = mode == "training"
            times.append(time_modules({name: layer}, x, repeats, backward=train, train_mode=train)[name])
            groups = a if _depthwise(m) else (m.groups if isinstance(m, nn.Conv2d) else 1)
            feats.append([1.0, a / groups * b, b, a] if not _depthwise(m) else [1.0, float(a)])
        coef = _fit(feats, times)
        table[name] = coef if not _depthwise(m) else [coef[0], coef[1], 0.0, 0.0]
    return table


def _with_width(shape: tuple, m: nn.Module, c_in: int) -> tuple:
    """``shape`` (one input, no batch dimension) with its channel/feature dimension set to ``c_in``."""
    if isinstance(m, nn.Conv2d):
        return (c_in, *shape[1:])
    return (*shape[:-1], c_in)


def seconds(coef: list[float], c_in: int, c_out: int, groups: int, depthwise: bool) -> float:
    """The fitted time of a layer at widths ``c_in``/``c_out`` (see the module docstring)."""
    a, b, c, d = coef
    if depthwise:
        return a + b * c_out
    return a + b * (c_in / groups) * c_out + c * c_out + d * c_in
