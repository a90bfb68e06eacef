"""Layers that read channels where the channel trace cannot see them.

Torch-Pruning traces the model once, in eval mode. A layer that runs only in training mode
(GoogLeNet's and Inception's auxiliary classifiers, any ``if self.training:`` branch) is not in
its graph, so the channels it reads could be narrowed under it and the next training step would
fail on the widths. :func:`train_only_readers` runs the model once in training mode and finds,
for each such layer, the modules whose outputs reach its input (walking the autograd graph back
from the input to the nearest output of a module with parameters): the groups holding those
modules' output channels must stay whole. Layers that run in neither mode (a branch behind a
flag) cannot be resolved; they are returned by name, to be reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..nested import tensors_in


def train_only_readers(
    model: nn.Module, unseen: dict[str, nn.Module], run: Callable[[], Any]
) -> tuple[dict[nn.Module, set[str]], list[str]]:
    """Who feeds the layers the eval-mode trace never called.

    Args:
        model: the model.
        unseen: ``{name: layer}``, the layers that did not run in the eval-mode trace.
        run: runs ``model`` once in training mode under autograd (its floating inputs requiring
            grad, so every operation on them is recorded), putting its state back afterwards.

    Returns:
        ``(producers, never)``: ``producers`` maps each module with parameters whose output reaches
        the input of an unseen layer that ran (the first such module on every path back from that
        input, through any operations) to the names of those layers; ``never`` lists the unseen
        layers that did not run in training mode either, or whose inputs carry no autograd
        history to walk back.
    """
    made: dict[Any, nn.Module] = {}
    inputs: dict[str, list[Any]] = {}
    names = {m: n for n, m in unseen.items()}

    def mark(module: nn.Module, args: tuple, out: Any) -> None:
        for t in tensors_in(out):
            if t.grad_fn is not None:
                made.setdefault(t.grad_fn, module)

    def read(module: nn.Module, args: tuple) -> None:
        name = names[module]
        fns = [t.grad_fn for t in tensors_in(args) if t.grad_fn is not None]
        inputs.setdefault(name, []).extend(fns)
        if not fns:
            inputs[name].append(None)  # ran, but with nothing to walk back from

    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(mark) for m in owners]
    handles += [m.register_forward_pre_hook(read) for m in unseen.values()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    producers: dict[nn.Module, set[str]] = {}
    never = [n for n in unseen if not inputs.get(n) or all(f is None for f in inputs[n])]
    for name, fns in inputs.items():
        for module in first_producers([f for f in fns if f is not None], made):
            producers.setdefault(module, set()).add(name)
    return producers, never


def first_producers(fns: list[Any], made: dict[Any, nn.Module]) -> list[nn.Module]:
    """The modules of ``made`` (autograd node → the module whose output it made) first met on
    every path back from the autograd nodes ``fns`` (None entries are skipped), in the order
    found, each once: the layers whose outputs reach those tensors without passing through
    another of them."""
    found: list[nn.Module] = []
    stack, seen = list(fns), set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        module = made.get(fn)
        if module is not None:
            if module not in found:
                found.append(module)
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return found
