"""Channel dependencies part by part, for models whose whole graph Torch-Pruning cannot build.

Torch-Pruning traces a model once and maps every channel through every operation. A single
operation it cannot map (ShuffleNet V2's channel shuffle, Swin's window reshapes, MaxViT's grid
partition) makes the whole graph fail, although most of the model (the convolutions of each
branch, the feed-forward layers of each block) is plain. :func:`split_graph` then traces the
model's *parts* instead: each child module, called once in the forward, is traced alone on the
inputs it received (recorded in one forward of its parent); a child that fails is split in turn,
down to ``max_depth``; what still fails is *untraced* (left whole, with the reason). A module
whose own forward fails (all its children trace) marks its class: another module that holds one
of that class is split without tracing it first (MaxViT's 40 attention layers cost one failed
trace each, not one per level above them).

A part's channels may go only where nothing outside the part sees them:

- the part's outputs keep their widths: the Conv2d/Linear layers whose output channels reach the
  part's output without passing another Conv2d/Linear (``outputs``) root no group, and a group
  that contains one of them stays whole (Torch-Pruning's ``ignored_layers``);
- the part's inputs keep theirs: a group that narrows the input side of a layer that reads the
  part's input without passing another Conv2d/Linear (an *input reader*, found on the autograd
  graph of one forward) stays whole. This covers a residual add of the part's input inside the
  part, which Torch-Pruning, seeing no producer for the input, would otherwise narrow.

A failing module's own layers (those in no child of two layers or more: ShuffleNet's last conv
and classifier) are one more part, traced with its children's outputs cut off (detached copies
that require grad, so the trace stops there and they count as the part's inputs).

:class:`PartsGraph` presents the parts' graphs as one Torch-Pruning graph to the channel engine
(the methods it uses: ``get_all_groups``, ``get_pruning_group``, ``get_pruner_of_module``, the
width queries and ``module2node``), so groups, scores, cuts and reloads are the same code as for a
whole graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_LAYERS = (nn.Conv2d, nn.Linear)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class UntraceableError(RuntimeError):
    """Torch-Pruning cannot build (or cannot trust) the channel graph of a module, although the
    module runs on its inputs: :func:`split_graph` may trace its parts instead."""


class _Call(nn.Module):
    """``part(*args, **kwargs)`` as a module of its own, so that Torch-Pruning traces the part on
    the inputs its parent gave it (the positional ones are passed at trace time)."""

    def __init__(self, part: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.part = part
        self._kwargs = kwargs

    def forward(self, *args: Any) -> Any:
        return self.part(*args, **self._kwargs)


@dataclass
class Part:
    """One traced part: its qualified name, the module, Torch-Pruning's graph of it (built on a
    :class:`_Call` around it), the layers whose outputs are the part's and the layers that read
    its inputs."""

    name: str
    module: nn.Module
    graph: Any
    outputs: list[nn.Module]
    readers: set[nn.Module]
    layers: set[nn.Module] = field(default_factory=set)  # its modules (default: all of module's)

    def __post_init__(self) -> None:
        self.layers = self.layers or set(self.module.modules())


class PartsGraph:
    """The graphs of a model's parts, presented as one Torch-Pruning ``DependencyGraph`` (the
    methods the channel engine uses). ``untraced``: ``{part name: reason}`` for the parts no
    graph covers; ``error``: why the whole model's graph failed. The channels of layers outside
    every part are never removed (:meth:`uncovered`)."""

    def __init__(self, model: nn.Module, parts: list[Part], untraced: dict[str, str], error: str) -> None:
        self.model = model
        self.parts = parts
        self.untraced = untraced
        self.error = error
        self.module2node = {k: v for p in parts for k, v in p.graph.module2node.items()}
        self._first = parts[0].graph
        # which part answers for a module: the part it belongs to, else (Torch-Pruning's own
        # nodes: its stand-ins for ops, bare parameters) the first graph that holds it
        self._owner: dict[Any, Part] = {}
        for p in parts:
            for m in p.graph.module2node:
                if m in p.layers:
                    self._owner.setdefault(m, p)
        for p in parts:
            for m in p.graph.module2node:
                self._owner.setdefault(m, p)

    def uncovered(self) -> dict[str, str]:
        """``{name: reason}`` for the model's Conv2d/Linear layers in no traced part: the reason
        of the innermost untraced part that holds the layer, or the whole model's."""
        covered = set().union(*(p.layers for p in self.parts))
        out = {}
        for name, m in self.model.named_modules():
            if not isinstance(m, _LAYERS) or m in covered:
                continue
            holders = [k for k in self.untraced if name == k or name.startswith(k + ".")]
            part = max(holders, key=len, default="")
            why = self.untraced[part] if part else self.error
            out[name] = (
                "in a part whose channel dependencies Torch-Pruning cannot build; "
                f"{part or 'the whole model'}: {why}"
            )
        return out

    def _part_of(self, module: Any) -> Part:
        part = self._owner.get(module)
        if part is None:
            raise KeyError(f"{type(module).__name__} is in no traced part of the model")
        return part

    def get_all_groups(self, ignored_layers: Sequence[Any] = (), **kwargs: Any) -> Iterator[Any]:
        """Every part's groups (its output layers ignored as well), without those that narrow a
        reader of the part's input."""
        for p in self.parts:
            for group in p.graph.get_all_groups(ignored_layers=[*ignored_layers, *p.outputs], **kwargs):
                if not any(_reads_input(p, it) for it in group):
                    yield group

    def get_pruning_group(self, module: Any, fn: Callable, idxs: Sequence[int]) -> Any:
        return self._part_of(module).graph.get_pruning_group(module, fn, idxs)

    def get_pruner_of_module(self, module: Any) -> Any:
        return self._part_of(module).graph.get_pruner_of_module(module)

    def check_pruning_group(self, group: Any) -> bool:
        return self._part_of(group[0].dep.target.module).graph.check_pruning_group(group)

    def get_out_channels(self, module: Any) -> int | None:
        return self._part_of(module).graph.get_out_channels(module)

    def get_in_channels(self, module: Any) -> int | None:
        return self._part_of(module).graph.get_in_channels(module)

    def is_out_channel_pruning_fn(self, fn: Any) -> bool:
        return self._first.is_out_channel_pruning_fn(fn)

    def is_in_channel_pruning_fn(self, fn: Any) -> bool:
        return self._first.is_in_channel_pruning_fn(fn)

    @property
    def IGNORED_LAYERS_IN_TRACING(self) -> list[Any]:  # noqa: N802  (Torch-Pruning's name)
        return [m for p in self.parts for m in getattr(p.graph, "IGNORED_LAYERS_IN_TRACING", [])]


def _reads_input(part: Part, item: Any) -> bool:
    """Whether a group's ``item`` narrows the input side of a reader of the part's input
    (Torch-Pruning lists a depthwise conv's input side beside its output side)."""
    return item.dep.target.module in part.readers and part.graph.is_in_channel_pruning_fn(item.dep.handler)


def _mapped(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (tuples, lists, dicts)."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_mapped(v, fn) for v in value)
    if isinstance(value, list):
        return [_mapped(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _mapped(v, fn) for k, v in value.items()}
    return value


def _leaves(value: Any) -> Any:
    """``value`` with every floating tensor replaced by a detached copy that requires grad."""
    return _mapped(value, lambda t: t.detach().clone().requires_grad_(t.is_floating_point()))


def _copied(value: Any) -> Any:
    """``value`` with every tensor replaced by a detached copy."""
    return _mapped(value, lambda t: t.detach().clone())


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@contextlib.contextmanager
def _cut(modules: Sequence[nn.Module], leaves: list[torch.Tensor] | None = None) -> Iterator[None]:
    """While inside, each of ``modules`` hands on a detached copy of its output that requires
    grad (appended to ``leaves``): the autograd graph, and so Torch-Pruning's trace, stops there."""

    def hook(module: nn.Module, args: tuple, out: Any) -> Any:
        new = _leaves(out)
        if leaves is not None:
            leaves.extend(t for t in _tensors(new) if t.requires_grad)
        return new

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_readers(call: nn.Module, args: tuple, cut: Sequence[nn.Module] = ()) -> set[nn.Module]:
    """The Conv2d/Linear layers of ``call`` whose input reaches one of ``args``' tensors (or an
    output of a module of ``cut``) on the autograd graph of ``call(*args)`` (eval mode) without
    passing another Conv2d/Linear."""
    leaves = _leaves(args)
    cut_leaves: list[torch.Tensor] = []
    made: set[Any] = set()
    read: list[tuple[nn.Module, Any]] = []

    def hook(module: nn.Module, ins: tuple, out: Any) -> None:
        if torch.is_tensor(out) and out.grad_fn is not None:
            made.add(out.grad_fn)
        for t in _tensors(ins):
            read.append((module, t.grad_fn if t.grad_fn is not None else t))

    handles = [m.register_forward_hook(hook) for m in call.modules() if isinstance(m, _LAYERS)]
    try:
        with torch.enable_grad(), _cut(cut, cut_leaves):
            call(*leaves)
    finally:
        for h in handles:
            h.remove()
    inputs = {id(t) for t in (*_tensors(leaves), *cut_leaves) if t.requires_grad}
    found: set[nn.Module] = set()
    for module, start in read:
        if module in found:
            continue
        if torch.is_tensor(start):  # the input itself
            if id(start) in inputs:
                found.add(module)
            continue
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen or node in made:
                continue
            seen.add(node)
            var = getattr(node, "variable", None)
            if var is not None and id(var) in inputs:
                found.add(module)
                break
            stack.extend(n for n, _ in node.next_functions)
    return found


def _child_calls(call: nn.Module, args: tuple, children: list[nn.Module]) -> dict[nn.Module, list]:
    """``{child: [(args, kwargs), …]}``: the inputs each of ``children`` received in one forward
    of ``call(*args)`` (tensors copied: a later in-place op must not change them)."""
    calls: dict[nn.Module, list] = {c: [] for c in children}

    def pre(module: nn.Module, a: tuple, kw: dict) -> None:
        calls[module].append((_copied(a), _copied(kw)))

    handles = [c.register_forward_pre_hook(pre, with_kwargs=True) for c in children]
    try:
        with torch.no_grad():
            call(*args)
    finally:
        for h in handles:
            h.remove()
    return calls


def split_graph(
    model: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    error: UntraceableError,
    build: Callable[[nn.Module, tuple, list[nn.Module]], Any],
    outputs: Callable[[nn.Module, tuple], list[nn.Module]],
    untouched: Callable[[nn.Module], Any],
    *,
    max_depth: int = 6,
) -> PartsGraph:
    """The graphs of ``model``'s parts (see the module docstring), after its whole graph failed
    with ``error``.

    Args:
        model: the model, called as ``model(*args, **kwargs)``.
        build: ``(module, args, ignored) → graph``; raises :class:`UntraceableError` where the
            graph cannot be built (any other exception passes through).
        outputs: ``(module, args) → layers whose outputs are the module's``.
        untouched: a context manager that puts back the modes, buffers and random streams of a
            module.
        max_depth: how many levels of children are tried below ``model``.

    Raises:
        UntraceableError: ``error``, when no part of the model could be traced.
    """
    parts: list[Part] = []
    untraced: dict[str, str] = {}
    owners: dict[nn.Module, int] = {}
    for m in model.modules():
        owners[m] = owners.get(m, 0) + 1
    names = {m: n for n, m in model.named_modules()}

    def has_layers(module: nn.Module) -> bool:  # a part of one layer has no channel of its own
        return sum(isinstance(m, _LAYERS) for m in module.modules()) >= 2

    # classes whose own forward Torch-Pruning cannot trace (every child of theirs traced or was
    # too small): a module that holds one is split without another failing trace
    culprits: dict[type, str] = {}

    def split(name: str, call: nn.Module, a: tuple, depth: int, err: Exception) -> bool:
        """Trace ``call``'s children (or split them); True if one of them failed to trace."""
        module = call.part if isinstance(call, _Call) else call
        children = [c for c in module.children() if has_layers(c)]
        if depth >= max_depth or not children:
            if name:
                untraced[name] = str(err)
            return False
        calls: dict[nn.Module, list] = {}
        while children:  # containers never called (ModuleList…): their children instead
            with untouched(call):
                call.eval()
                found = _child_calls(call, a, children)
            calls.update(found)
            children = [g for c in children if not found[c] for g in c.children() if has_layers(g)]
        failed = False
        for child in calls:
            cname = names.get(child, "?")
            seen = calls[child]
            if not seen and any(has_layers(g) for g in child.children()):
                continue  # a container: its children were tried
            if len(seen) != 1 or any(owners.get(m, 0) > 1 for m in child.modules()):
                why = (
                    "not called as a module (its parent applies its weights itself)"
                    if not seen
                    else f"called {len(seen)} times in one forward"
                    if len(seen) > 1
                    else "shares modules with other parts"
                )
                untraced[cname] = why
                continue
            ca, ckw = seen[0]
            sub = _Call(child, ckw)
            known = next((culprits[type(m)] for m in child.modules() if type(m) in culprits), None)
            try:
                if known is not None:
                    raise UntraceableError(known)
                with untouched(sub):
                    sub.eval()
                    out_layers = outputs(sub, ca)
                    readers = input_readers(sub, ca)
                graph = build(sub, ca, out_layers)
            except UntraceableError as e:
                failed = True
                # its own forward is the trouble if all its children traced: remember its class
                # (not a container's, which only chains its children: theirs is the trouble)
                if not split(cname, sub, ca, depth + 1, e) and not isinstance(child, _CONTAINERS):
                    culprits.setdefault(type(child), str(e))
                continue
            except Exception as e:  # the part alone fails otherwise: left whole, with the reason
                untraced[cname] = f"{type(e).__name__}: {e}"
                continue
            parts.append(Part(cname, child, graph, out_layers, readers))
        own(name, call, a, [c for c in calls if calls[c] and has_layers(c)])
        return failed

    def own(name: str, call: nn.Module, a: tuple, cut: list[nn.Module]) -> None:
        """The failing module's own layers (those in no child of two layers or more), traced with
        the outputs of those children cut off: ShuffleNet's last conv and classifier."""
        module = call.part if isinstance(call, _Call) else call
        inside = {m for c in cut for m in c.modules()}
        mine = [m for m in module.modules() if isinstance(m, _LAYERS) and m not in inside]
        if len(mine) < 2 or not cut:  # nothing cut off: the module itself, which failed
            return
        try:
            with untouched(call), _cut(cut):
                call.eval()
                out_layers = outputs(call, a)
                graph = build(call, a, out_layers)
            with untouched(call):
                call.eval()
                readers = input_readers(call, a, cut)
        except Exception:  # its own forward is what fails: its layers stay whole
            return
        layers = {m for m in module.modules() if m not in inside and m in graph.module2node}
        readers &= set(module.modules()) - inside
        parts.append(
            Part(f"{name or 'the model'} (its own layers)", module, graph, out_layers, readers, layers)
        )

    split("", _Call(model, kwargs), args, 0, error)
    if not parts:
        raise error
    return PartsGraph(model, parts, untraced, str(error))
