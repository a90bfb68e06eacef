"""Which layers of a model can be pruned, and why the others cannot.

:func:`find_layers` lists every module of a registered type (:mod:`~lightning_eigendamage.adapters`)
or already pruned :class:`~lightning_eigendamage.KFELayer`, with the reasons known before running
the model (sharing, grouping, frozen weights, fused fast paths, user exclusions);
:func:`dynamic_skips` adds those known only after a forward pass (never called, called twice,
the classifier, no gradient); :func:`weights_read_outside` finds, during one forward pass, the
layers whose parameters the model also uses outside their own call.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .adapters import LayerAdapter, adapter_for, registered_base, registered_names
from .attention import reads_weights_itself
from .curvature.hooks import is_capture_hook
from .eigenbasis.layers import KFELayer
from .options import normalise_exclude
from .report import PruningWarning


@dataclass
class Candidate:
    """A layer that might be pruned: ``unit`` (a plain layer or :class:`KFELayer`) at ``name``."""

    name: str
    unit: nn.Module
    hook_module: nn.Module  # the module whose input/output define the factors (a KFELayer's core)
    skipped: str | None = None

    @property
    def adapter(self) -> LayerAdapter | None:
        return adapter_for(self.hook_module)

    @property
    def kind(self) -> str:
        a = self.adapter
        return a.kind if a is not None else type(self.hook_module).__name__.lower()

    @property
    def widths(self) -> tuple[int, int]:
        """``(C_in, C_out)`` of the whole unit (a KFELayer's original widths)."""
        u = self.unit
        if isinstance(u, KFELayer):
            return u.in_features, u.out_features
        adapter = self.adapter or adapter_for(u, exact=False)  # a subclass: its base type's widths
        if adapter is not None:
            return adapter.widths(u)
        return _unsupported_widths(u)


# Layer types with weights that EigenDamage does not prune, listed in reports with the reason.
_UNSUPPORTED: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Embedding, "embedding lookup (not a product with its input): not pruned"),
    (nn.EmbeddingBag, "embedding lookup (not a product with its input): not pruned"),
    (nn.RNNBase, "recurrent layer (weights reused at every time step): not pruned"),
)


def _unsupported_reason(module: nn.Module) -> str | None:
    return next((why for t, why in _UNSUPPORTED if isinstance(module, t)), None)


def _unsupported_widths(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.RNNBase):
        return module.input_size, module.hidden_size
    return 0, 0


def _matches(name: str, module: nn.Module, exclude: Iterable[Any]) -> bool:
    for e in exclude:
        if isinstance(e, str):
            if fnmatch.fnmatchcase(name, e):
                return True
        elif isinstance(e, re.Pattern):
            if e.fullmatch(name):
                return True
        elif isinstance(e, type):
            if isinstance(module, e):
                return True
        elif e is module:
            return True
    return False


def excluded_modules(model: nn.Module, exclude: Any = None) -> set[nn.Module]:
    """Every module of ``model`` that ``exclude`` names (instance, type, glob or regex on its
    name), or that sits inside one that it names."""
    exclude = normalise_exclude(exclude)
    out: set[nn.Module] = set()
    for name, module in model.named_modules():
        if module in out or _matches(name, module, exclude):
            out.update(module.modules())
    return out


def find_layers(
    model: nn.Module, exclude: Any = None, *, unsupported: bool = False, max_factor_dim: int | None = None
) -> list[Candidate]:
    """Every layer of a registered type (or already pruned :class:`KFELayer`) in ``model``, with
    skip reasons known before running it.

    ``unsupported=True`` also lists embeddings and recurrent layers, always skipped with the
    reason (for reports); they are never hooked. ``max_factor_dim``: a layer whose input or
    output width (the side of its ``d × d`` K-FAC factor) exceeds it is skipped, with the reason,
    before any factor is allocated.
    """
    exclude = normalise_exclude(exclude)
    # Modules or parameters reachable under several names are shared: never rebuilt.
    names_of: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        names_of[id(m)] = names_of.get(id(m), 0) + 1
    owners: dict[int, set[int]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))

    found: list[Candidate] = []
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module, excluded: bool) -> None:
        """``excluded``: an enclosing module matched ``exclude`` (every layer inside is left)."""
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, KFELayer) or registered_base(child) is not None:
                if id(child) in seen:
                    continue
                seen.add(id(child))
                hook = child.core if isinstance(child, KFELayer) else child
                cand = Candidate(name, child, hook)
                cand.skipped = _static_reason(child, hook, module, child_name, names_of, owners)
                if cand.skipped is None and (excluded or _matches(name, child, exclude)):
                    cand.skipped = "excluded by user"
                if cand.skipped is None and max_factor_dim is not None:
                    cand.skipped = _too_large(cand.adapter.widths(hook), max_factor_dim)
                found.append(cand)
            elif unsupported and _unsupported_reason(child) is not None:
                if id(child) not in seen:
                    seen.add(id(child))
                    found.append(Candidate(name, child, child, _unsupported_reason(child)))
            else:
                visit(f"{name}.", child, excluded or _matches(name, child, exclude))

    visit("", model, _matches("", model, exclude))
    _warn_unmatched(model, exclude)
    return found


def _warn_unmatched(model: nn.Module, exclude: Iterable[Any]) -> None:
    """Warn about name patterns and module instances in ``exclude`` that match nothing in
    ``model`` (a typo, or a regex that does not match whole names, would otherwise prune the
    layers it was meant to protect)."""
    names = list(model.named_modules())
    for e in exclude:
        if isinstance(e, type):
            continue
        if not any(_matches(n, m, [e]) for n, m in names):
            what = (
                "a module that is not part of the model"
                if isinstance(e, nn.Module)
                else "no module name (patterns and regexes must match the whole name, e.g. 'net.fc*')"
            )
            shown = f"a {type(e).__name__}" if isinstance(e, nn.Module) else repr(e)
            warnings.warn(f"exclude entry {shown} matches {what}", PruningWarning, stacklevel=4)


def _too_large(widths: tuple[int, int], limit: int) -> str | None:
    d = max(widths)
    if d <= limit:
        return None
    # the reason first (the same words for every such layer, so reports group them), then its size
    return (
        f"a K-FAC factor wider than max_factor_dim={limit}; {d}×{d} here ({d * d * 4 / 2**30:.1f} GiB "
        "in float32, several times that while it is eigendecomposed): raise max_factor_dim (or "
        "set it to None) to prune this layer"
    )


# Why the eigenbasis engine leaves an encoder layer's feed-forward Linear alone: the fused fast
# path reads its ``.weight`` (an eigenbasis stage has none). A narrower Linear keeps working there,
# so the channel engine prunes it.
FASTPATH = "read as .weight by PyTorch's fused Transformer fast path"


def _fastpath_reads_weights(layer: nn.Module) -> bool:
    """Whether PyTorch's fused encoder fast path may read ``layer.linear1/2.weight`` directly.

    Only ``nn.TransformerEncoderLayer`` has such a path (``torch._transformer_encoder_layer_fwd``,
    also entered through ``nn.TransformerEncoder``); decoder layers always call their linears as
    modules. The path is taken in eval mode only when these static conditions hold (checked as
    in ``TransformerEncoderLayer.forward``): if one fails, the linears always run as modules.
    """
    if not isinstance(layer, nn.TransformerEncoderLayer):
        return False
    attn = layer.self_attn
    return bool(
        attn.batch_first
        and attn.in_proj_bias is not None
        and attn._qkv_same_embed_dim
        and getattr(layer, "activation_relu_or_gelu", False)
        and layer.norm1.eps == layer.norm2.eps
        and attn.num_heads % 2 == 0
    )


# Why an nn.MultiheadAttention's out_proj is not pruned as a layer: the attention calls it
# functionally. The channel engine scores its input columns per head (through a routed capture).
FUNCTIONAL = "applied through its weights by its attention module (its hooks never fire)"


def _static_reason(unit, core, parent, child_name, names_of, owners) -> str | None:
    if reads_weights_itself(parent):
        return FUNCTIONAL
    if child_name in ("linear1", "linear2") and _fastpath_reads_weights(parent):
        return FASTPATH
    adapter = adapter_for(core)
    if adapter is None:
        base = registered_base(core)
        return f"{type(core).__name__} subclasses {base.__name__ if base else '?'}; its forward may differ"
    if isinstance(core.weight, nn.parameter.UninitializedParameter):
        return "uninitialised lazy module"
    reason = adapter.skip_reason(core)
    if reason is not None:
        return reason
    hooked = _user_hooks(unit)
    if hooked:
        return (
            f"has {' and '.join(hooked)} (e.g. torch.nn.utils.prune, spectral_norm or your own), which "
            "pruning would not carry over (prune() rebuilds the layer without them; a hook that "
            "recomputes the weight does not fit a narrowed one); remove them to prune it"
        )
    if names_of.get(id(unit), 0) > 1:
        return "module is shared (registered under several names)"
    stage_params = list(unit.parameters())
    if any(len(owners.get(id(p), ())) > 1 for p in stage_params):
        return "tied or shared parameters"
    if not core.weight.requires_grad:
        return "frozen parameters"
    return None


_HOOK_DICTS = (
    ("_forward_pre_hooks", "forward pre-hooks"),
    ("_forward_hooks", "forward hooks"),
    ("_backward_pre_hooks", "backward pre-hooks"),
    ("_backward_hooks", "backward hooks"),
)


def _user_hooks(unit: nn.Module) -> list[str]:
    """The kinds of module hooks on ``unit`` or its stages that this package did not install."""
    return [
        label
        for attr, label in _HOOK_DICTS
        if any(not is_capture_hook(h) for m in unit.modules() for h in getattr(m, attr, {}).values())
    ]


def hookable(cands: list[Candidate]) -> dict[str, nn.Module]:
    """Name → module to hook, for every candidate of a registered type (skipped or not)."""
    return {c.name: c.hook_module for c in cands if c.adapter is not None}


def dynamic_skips(
    cands: list[Candidate],
    layers: dict[str, Any],
    fire_order: list[str],
    exempt_last: bool,
    *,
    backward: bool,
) -> list[tuple[str, str]]:
    """Add the skip reasons only known after running the model; returns the ``(name, reason)`` added.

    Args:
        layers: name → per-layer capture record with ``fired``, ``max_calls`` and (when
            ``backward``) ``reached``, ``a_rows``, ``g_rows`` (e.g. ``CaptureResult.layers``).
        fire_order: layer names in the order they first ran.
        backward: whether the pass had a backward (then "no gradient reached" is known too).
    """
    last = fire_order[-1] if fire_order else None
    added = []
    for c in cands:
        if c.skipped is not None:
            continue
        lf = layers.get(c.name)
        if lf is None or not lf.fired:
            c.skipped = "never called in the forward pass (called functionally, or unused)"
        elif lf.max_calls > 1:
            c.skipped = f"called {lf.max_calls} times per forward pass"
        elif exempt_last and c.name == last:
            c.skipped = "last layer (exempt_last=True)"
        elif backward and (not lf.reached or lf.a_rows == 0 or lf.g_rows == 0):
            c.skipped = "no gradient reached its output"
        if c.skipped is not None:
            added.append((c.name, c.skipped))
    return added


class _ReadsOutside(TorchFunctionMode):
    """Records the operations that take a watched parameter while its owner is not the module
    being called (see :func:`weights_read_outside`)."""

    def __init__(self, owners: dict[int, Candidate], calling: list[nn.Module], found: dict[str, str]) -> None:
        super().__init__()
        self.owners, self.calling, self.found = owners, calling, found

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name == "__get__":  # a property (w.T, w.dtype): the read of ``layer.weight`` fails too
            name = "." + getattr(getattr(func, "__self__", None), "__name__", "?")
        for t in (*args, *kwargs.values()):
            c = self.owners.get(id(t)) if isinstance(t, torch.Tensor) else None
            if c is not None and (not self.calling or self.calling[-1] is not c.hook_module):
                self.found.setdefault(
                    c.name,
                    f"its parameters are also used outside its own call ({name}): it cannot be "
                    "replaced by its eigenbasis stages",
                )
        return func(*args, **kwargs)


@contextlib.contextmanager
def weights_read_outside(cands: Iterable[Candidate]) -> Iterator[dict[str, str]]:
    """While inside, every operation that takes the parameters of one of ``cands`` (its weight
    read by ``F.conv2d(x, layer.weight)`` in the model's forward, or a weight tied to another
    layer) outside that layer's own call is recorded: yields ``{layer name: reason}``, filled
    as the model runs. Such a layer cannot become a :class:`~lightning_eigendamage.KFELayer`
    (which has no ``weight``)."""
    cands = [c for c in cands if c.skipped is None]
    owners = {id(p): c for c in cands for p in c.hook_module.parameters(recurse=False)}
    calling: list[nn.Module] = []
    found: dict[str, str] = {}

    def enter(module: nn.Module, args: tuple) -> None:
        calling.append(module)

    def leave(module: nn.Module, args: tuple, out: Any) -> None:
        calling.pop()

    handles = []
    for c in cands:
        handles.append(c.hook_module.register_forward_pre_hook(enter, prepend=True))
        handles.append(c.hook_module.register_forward_hook(leave, always_call=True))
    try:
        with _ReadsOutside(owners, calling, found):
            yield found
    finally:
        for h in handles:
            h.remove()


# Layers with weights that no structure prunes (said in the messages of a model left with none)
_UNPRUNED_TYPES = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear)


def unpruned_layers_note(model: nn.Module | None) -> str:
    """``" (its nn.Conv3d ×2 are of a type no structure prunes)"``: the layers of ``model`` of
    the types no structure prunes, counted by type; ``""`` if none (or no model)."""
    if model is None:
        return ""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, _UNPRUNED_TYPES) and registered_base(m) is None:
            name = f"nn.{type(m).__name__}" if type(m).__module__.startswith("torch.") else type(m).__name__
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return ""
    listed = ", ".join(f"{name} ×{n}" for name, n in counts.items())
    return f" (its {listed} are of a type no structure prunes)"


def no_prunable_message(cands: list[Candidate], model: nn.Module | None = None) -> str:
    """The error text for a model with nothing left to prune, with each layer's reason (and
    ``model``'s layers of types no structure prunes, if given)."""
    if not cands:
        return f"no prunable layer: the model has no {registered_names()}{unpruned_layers_note(model)}"
    reasons = "; ".join(f"{c.name}: {c.skipped}" for c in cands[:12])
    more = f" (and {len(cands) - 12} more)" if len(cands) > 12 else ""
    return (
        f"no prunable layer: every candidate layer is skipped ({reasons}{more}){unpruned_layers_note(model)}"
    )


def check_usable_parameters(model: nn.Module, what: str) -> None:
    """Raise before anything runs if ``model``'s parameters cannot be pruned or loaded into:
    on the meta device (no data), or not finite (NaN/Inf weights give NaN curvature everywhere).

    Raises:
        ValueError: naming the parameters and what to do.
    """
    named = list(model.named_parameters())
    lazy = [n for n, p in named if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"{what}: the model has lazy parameters that are not initialised yet ({', '.join(lazy[:5])}"
            f"{', …' if len(lazy) > 5 else ''}); run the model once on a batch (model(x)) before "
            "pruning it, so that they get their shapes"
        )
    meta = [n for n, p in named if p.is_meta]
    if meta:
        raise ValueError(
            f"{what}: the model's parameters are on the meta device and hold no data ({', '.join(meta[:5])}"
            f"{', …' if len(meta) > 5 else ''}); build the model on a real device, or materialise it "
            "(model.to_empty(device=...)) and load its weights first"
        )
    bad = [n for n, p in named if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(
            f"{what}: the model has NaN or Inf weights in {', '.join(bad[:5])}"
            f"{', …' if len(bad) > 5 else ''}; "
            "every capture on it would be non-finite. Reload finite weights (e.g. from the last good "
            "checkpoint) before pruning; nothing was changed"
        )
