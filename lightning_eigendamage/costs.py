"""Parameter and FLOP accounting.

Model totals are counted with :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per
multiply-add, biases and element-wise ops ignored), per example, in eval mode (no backward is run).
Per-layer costs of candidate forms are analytic (same convention) so that forms can be compared
before any module is built.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .nested import map_tensors


@dataclass(frozen=True)
class Geometry:
    """Where a layer runs, per example.

    ``loc_in`` is the number of input locations (``H_in·W_in`` for a conv, tokens for a Linear on
    sequences, 1 for a plain Linear); ``loc_out`` likewise for the output; ``k2`` the number of
    kernel offsets (``kh·kw``, 1 for Linear).
    """

    c_in: int
    c_out: int
    loc_in: int
    loc_out: int
    k2: int


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int

    def fits_in(self, other: Cost) -> bool:
        return self.params <= other.params and self.flops <= other.flops


def form_cost(geo: Geometry, form: str, r_in: int, r_out: int, *, bias: bool) -> Cost:
    """Parameters and FLOPs (2·MACs, per example) of one layer in ``form`` with core ``r_in→r_out``.

    MACs: ``rotate_in`` ``loc_in·C_in·r_in``; core ``loc_out·k²·a·b``; ``rotate_out``
    ``loc_out·r_out·C_out``, where the core's widths ``a``/``b`` are ``C_in``/``C_out`` when the
    adjoining rotation is folded into it. The bias (``C_out`` parameters) is counted once.
    """
    has_in = form in ("bottleneck", "fold_out")
    has_out = form in ("bottleneck", "fold_in")
    a = r_in if has_in else geo.c_in
    b = r_out if has_out else geo.c_out
    params = geo.k2 * a * b
    macs = geo.loc_out * geo.k2 * a * b
    if has_in:
        params += geo.c_in * a
        macs += geo.loc_in * geo.c_in * a
    if has_out:
        params += b * geo.c_out
        macs += geo.loc_out * b * geo.c_out
    if bias:
        params += geo.c_out
    return Cost(params=params, flops=2 * macs)


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not), each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def count_flops(
    model: nn.Module,
    example: torch.Tensor | tuple | list | dict,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> int:
    """FLOPs of one forward pass per example (FlopCounterMode: 2 per multiply-add), eval mode.

    ``example`` is a model input with a leading batch dimension, run as ``model(example)`` (a
    dict or tuple is one argument, as everywhere else; a model that takes keywords needs a
    ``forward_fn``), or, with ``forward_fn``, a whole batch, run as ``forward_fn(model, example)``;
    its first example is used. The model's training flags are restored afterwards.
    """
    return int(_counted(model, example, forward_fn).get_total_flops())


def count_layer_flops(
    model: nn.Module,
    example: torch.Tensor | tuple | list | dict,
    names: Iterable[str],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, int]:
    """``{name: FLOPs}``: what the submodules ``names`` of ``model`` compute in one forward pass
    per example, counted as :func:`count_flops` counts the model (every call of a module run
    twice is counted; 0 for a module that does not run or is called functionally)."""
    counts = _counted(model, example, forward_fn).get_flop_counts()
    root = type(model).__name__
    return {name: int(sum(counts.get(f"{root}.{name}", {}).values())) for name in names}


def _fused_rnn_flops(input_shape: Any, weight_shapes: Any) -> int:
    """``2 · rows · Σ |W|`` for a fused recurrent op: every input row (time step × example, or
    a packed row) meets every 2-d weight once (the gates' input and hidden products, a
    projection), as the decomposed path's matrix products would count it."""
    rows = math.prod(input_shape[:-1]) if len(input_shape) > 1 else input_shape[0]
    return 2 * rows * sum(math.prod(w) for w in weight_shapes if w is not None and len(w) == 2)


def _mkldnn_rnn_layer_flops(
    input: Any, weight0: Any, weight1: Any, *args: Any, out_val: Any = None, **kwargs: Any
) -> int:
    """``aten.mkldnn_rnn_layer`` (CPU LSTM: one layer, one direction; weights ``w_ih``, ``w_hh``)."""
    return _fused_rnn_flops(input, [weight0, weight1])


def _cudnn_rnn_flops(input: Any, weight: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``aten._cudnn_rnn`` (every layer and direction at once; ``weight`` lists their tensors)."""
    return _fused_rnn_flops(input, weight)


# FlopCounterMode has no rule for the fused recurrent kernels (an nn.LSTM on CPU, any nn.RNN on
# cuDNN): without these, a recurrent model's FLOPs would leave its recurrent layers out
_RNN_FLOPS = {
    getattr(torch.ops.aten, op): fn
    for op, fn in (("mkldnn_rnn_layer", _mkldnn_rnn_layer_flops), ("_cudnn_rnn", _cudnn_rnn_flops))
    if hasattr(torch.ops.aten, op)
}


def _counted(
    model: nn.Module, example: Any, forward_fn: Callable[[nn.Module, Any], Any] | None
) -> FlopCounterMode:
    """The FlopCounterMode of one forward pass of the first example of ``example`` (eval mode,
    the modules' own path; training flags put back). Nothing is backpropagated."""
    x = _first_example(example)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        # under autograd: inside no_grad a view of a parameter (``p.expand(N, -1)`` fed to a
        # submodule) requires grad without a grad_fn, which FlopCounterMode's module tracker rejects
        with (
            torch.enable_grad(),
            module_path(),
            FlopCounterMode(display=False, custom_mapping=_RNN_FLOPS) as counter,
        ):
            if forward_fn is not None:
                forward_fn(model, x)
            else:  # as the capture and the checks run it: a dict input is one argument
                model(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return counter


@contextlib.contextmanager
def module_path() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` through their modules,
    not PyTorch's fused inference fast path (``torch.backends.mha.set_fastpath_enabled``), for
    the duration: the fused kernel hides its products from ``FlopCounterMode`` and its Linear
    layers from forward hooks. The outputs are the same; the previous setting is put back."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _first_example(example):
    """The first example of ``example``, copied (a model that changes its input in place must
    not change the caller's batch)."""
    return map_tensors(lambda t: t[:1].clone(), example)


def time_modules(
    modules: dict[str, nn.Module],
    example: torch.Tensor,
    repeats: int = 7,
    *,
    backward: bool = False,
    train_mode: bool = False,
) -> dict[str, float]:
    """Median seconds of one eval forward of each module on ``example``, calls interleaved.

    With ``backward``, the time of a training step's share instead: the forward plus the backward
    to the input and to every trainable parameter (``torch.autograd.grad`` with an output
    gradient of ones, so no ``.grad`` is written). With ``train_mode`` the modules run in training
    mode (BatchNorm on the batch's statistics, as in a training step), else in eval mode. Used to
    pick the fastest equivalent form of a layer, and to time a layer at several widths
    (:mod:`~lightning_eigendamage.channels.latency`), for a declared setting (the device and batch
    size of ``example``). Modes are restored afterwards.
    """
    modes = {m: m.training for mod in modules.values() for m in mod.modules()}
    sync = torch.cuda.synchronize if example.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in modules}
    grads: dict[str, torch.Tensor] = {}

    def run(k: str, mod: nn.Module) -> None:
        if not backward:
            mod(example)
            return
        x = example.detach().requires_grad_(True)
        out = mod(x)
        if k not in grads:
            grads[k] = torch.ones_like(out)  # values do not change the time; no global RNG
        wrt = [x, *(p for p in mod.parameters() if p.requires_grad)]
        torch.autograd.grad(out, wrt, grad_outputs=grads[k])

    try:
        with torch.set_grad_enabled(backward):
            for k, mod in modules.items():
                run(k, mod.train(train_mode))  # warm-up
            for _ in range(repeats):
                for k, mod in modules.items():
                    sync()
                    t = time.perf_counter()
                    run(k, mod)
                    sync()
                    times[k].append(time.perf_counter() - t)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {k: statistics.median(v) for k, v in times.items()}
