"""Restoring pruned architectures from plain-data checkpoints.

Every pruned layer (:class:`~lightning_eigendamage.layers.KFELayer`) stores a small architecture
record (strings and integers) as its ``_extra_state``; a state_dict therefore describes the pruned
architecture by itself and loads with ``torch.load(..., weights_only=True)``.

Loading is all or nothing: the incoming state_dict is checked in full against the architecture
its records describe (every key and shape, and under ``strict`` the missing and unexpected keys,
as ``nn.Module.load_state_dict`` would) before any module is swapped or any tensor copied, so a
load that fails leaves the model's structure and every parameter and buffer as they were.
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .attention import PrunedHeadsAttention, head_block, head_count, heads_attribute, set_head_count
from .eigenbasis.layers import KFELayer, architecture_record, is_record, same_architecture
from .eigenbasis.surgery import layers_for_records, records_in, swap_modules

_EXTRA_STATE = "_extra_state"
NARROWED = "lightning_eigendamage"  # key of a narrowed module's state_dict metadata


class NarrowedMark:
    """A ``state_dict`` post-hook on a layer whose channels were removed: it writes
    ``{"structure": "channels"}`` under ``"lightning_eigendamage"`` in the layer's state_dict
    metadata (``state_dict._metadata``, kept by ``torch.save`` and loaded with
    ``weights_only=True``), so that a loading hook narrows exactly the layers that were narrowed,
    from their tensors' shapes (:func:`narrowed_modules`). An attention module whose heads were
    removed also records its head count as ``num_heads`` (MaxViT's attention holds it as
    ``n_heads``), and every mark the shapes the layer's tensors had before its first narrowing
    as ``dense`` (tensor name → shape), so that a checkpoint is not loaded into a model built
    with other widths. A class, so the module stays picklable."""

    def __init__(self, dense: dict[str, tuple[int, ...]] | None = None) -> None:
        self.dense = dense

    def __call__(self, module: nn.Module, state_dict: Any, prefix: str, local_metadata: dict) -> None:
        meta: dict[str, Any] = {"structure": "channels"}
        heads = head_count(module)
        if heads is not None:
            meta["num_heads"] = heads
        dense = getattr(self, "dense", None)  # (marks pickled before it was recorded have none)
        if dense:
            meta["dense"] = {k: list(v) for k, v in dense.items()}
        local_metadata[NARROWED] = meta


def mark_narrowed(module: nn.Module, dense: Mapping[str, Any] | None = None) -> None:
    """Register :class:`NarrowedMark` on ``module`` (once: a later narrowing keeps the first
    mark, whose ``dense`` shapes are the layer's before any). ``dense``: its tensors' shapes
    before this narrowing (name → shape), if known."""
    if not _is_narrowed(module):
        shapes = None if dense is None else {k: tuple(int(d) for d in v) for k, v in dense.items()}
        module.register_state_dict_post_hook(NarrowedMark(shapes))


def carry_mark(old: nn.Module, new: nn.Module) -> None:
    """``new``, built to replace the narrowed layer ``old`` (its eigenbasis rewrite), keeps
    ``old``'s :class:`NarrowedMark` (with its ``dense`` shapes): the state_dict still says the
    model lost channels, so a fresh model accepts records narrower than its own layers."""
    mark = _mark_of(old)
    if mark is not None and not _is_narrowed(new):
        new.register_state_dict_post_hook(NarrowedMark(getattr(mark, "dense", None)))


def _mark_of(module: nn.Module) -> NarrowedMark | None:
    """``module``'s :class:`NarrowedMark`, or None."""
    hooks = getattr(module, "_state_dict_hooks", {})
    return next((m for h in hooks.values() if isinstance(m := getattr(h, "hook", h), NarrowedMark)), None)


def _is_narrowed(module: nn.Module) -> bool:
    """Whether ``module`` carries a :class:`NarrowedMark` (it lost channels in this process, or
    was narrowed to a checkpoint's widths)."""
    return _mark_of(module) is not None


def state_dict_of(checkpoint: str | os.PathLike | IO[bytes] | dict[str, Any]) -> dict[str, Any]:
    """The state_dict in ``checkpoint``: a path or binary file object (``torch.load`` with
    ``weights_only=True``), a state_dict, or a Lightning checkpoint dict (its ``"state_dict"``)."""
    if isinstance(checkpoint, (str, os.PathLike)) or (
        hasattr(checkpoint, "read") and hasattr(checkpoint, "seek")
    ):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise TypeError(
            f"checkpoint must be a path, a binary file object, a state_dict or a Lightning "
            f"checkpoint dict, got {type(checkpoint).__name__}"
        )
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        return checkpoint["state_dict"]
    return checkpoint


def restore_pruned(
    model: nn.Module,
    checkpoint: str | os.PathLike | IO[bytes] | dict[str, Any],
    *,
    strict: bool = True,
) -> nn.Module:
    """Reshape a freshly built ``model`` to the pruned architecture in ``checkpoint`` and load it.

    Both structures: eigenbasis layers are rebuilt from their records, and layers whose channels
    were removed (marked in the state_dict's metadata, :class:`NarrowedMark`) from their tensors'
    shapes (:func:`narrowed_modules`). A channel-pruned state_dict that lost its metadata (copied
    key by key) needs :func:`~lightning_eigendamage.restore_channels` and example inputs.

    Args:
        model: the model as constructed (unpruned), or already pruned to the same architecture.
        checkpoint: a path or a binary file object with ``read`` and ``seek`` (e.g.
            ``io.BytesIO``; loaded with ``torch.load(weights_only=True)``), a plain state_dict,
            or a Lightning checkpoint dict (its ``"state_dict"`` is used). Keys must be relative
            to ``model`` (for a Lightning checkpoint: pass the LightningModule).
        strict: passed to ``load_state_dict``.

    Returns:
        ``model`` itself, pruned and loaded.

    All or nothing: the records are checked against the model, and the whole state_dict against
    the model as the records reshape it (:func:`check_loadable`), before the model is touched. If
    anything fails, ``model`` is left as it was: the same module objects, every parameter and
    buffer bitwise unchanged. (Only modules that load by rules of their own, which the check
    leaves to torch, can still fail mid-load; the structure is then put back, but tensors torch
    already copied stay copied.)

    Raises:
        ValueError: the checkpoint's pruned-layer records do not fit this model.
        RuntimeError: the state_dict does not fit the model as its records reshape it (size
            mismatches, non-tensor values, a record its layer would refuse, and with ``strict``
            missing or unexpected keys); the message names each key, with both shapes.
    """
    state_dict = state_dict_of(checkpoint)
    replacements = _replacements(model, state_dict, records_in(state_dict))
    check_loadable(model, state_dict, strict=strict, replacements=replacements)
    old = {name: model.get_submodule(name) for name in replacements}
    swap_modules(model, replacements)
    try:
        model.load_state_dict(state_dict, strict=strict)
    except BaseException:
        swap_modules(model, old)
        raise
    return model


def _replacements(
    model: nn.Module, state_dict: Mapping[str, Any], records: Mapping[str, Any], prefix: str = ""
) -> dict[str, nn.Module]:
    """The modules that reshape ``model`` to ``state_dict`` (keys under ``prefix``): layers rebuilt
    from their eigenbasis ``records`` and layers narrowed to the tensors' shapes, those inside a
    narrowed module put into its copy (a projection rewritten in its eigenbasis inside an
    attention module whose heads were removed), so that swapping installs both and ``model``'s own
    modules are never changed."""
    replacements = layers_for_records(model, records, narrower=channel_pruned(state_dict))
    replacements.update(narrowed_modules(model, state_dict, prefix=prefix, skip=records))
    return _nested(replacements)


def enable_pruned_loading(model: nn.Module) -> Any:
    """Let ``model.load_state_dict`` accept pruned state_dicts directly.

    Registers a ``load_state_dict`` pre-hook on ``model`` that, before any child loads, reshapes
    the layers named in the incoming state_dict's pruned-layer records and narrows the layers it
    marks as channel-pruned (either structure; see :func:`restore_pruned`). Call it in a
    LightningModule's ``__init__`` to make
    ``Model.load_from_checkpoint(path)`` and ``Trainer.fit(..., ckpt_path=...)`` work with pruned
    checkpoints, and (with ``strategy="ddp_spawn"``) to let the main process take the pruned,
    trained weights back after ``fit``. The hook is picklable, so the model can still be sent to
    spawned processes. Returns the hook handle (``handle.remove()`` undoes it).

    With the hook, ``model.load_state_dict`` is all or nothing: a state_dict that does not fit
    (see :class:`PrunedLoadingHook`) raises before any module is swapped or tensor copied.

    The hook keeps ``model``'s architecture as it is at this call (:func:`meta_skeleton`, on the
    meta device): a checkpoint from before a later round (``trainer.test(ckpt_path="best")``)
    then loads into the model pruned further, its changed layers put back to that form first.
    Call it once the layers exist (at the end of ``__init__``).
    """
    return model.register_load_state_dict_pre_hook(PrunedLoadingHook(skeleton=meta_skeleton(model)))


class PrunedLoadingHook:
    """The ``load_state_dict`` pre-hook of :func:`enable_pruned_loading` (a class, not a closure,
    so that a module holding it can be pickled, e.g. by ``ddp_spawn``).

    It runs on the module it is registered on before that module or any child loads, and checks
    the whole incoming state_dict against the module as the records reshape it
    (:func:`check_loadable`): on a record mismatch (a layer the model lacks, other widths, a
    corrupted record), a tensor whose shape does not fit, a non-tensor value, or (when the load
    is strict) a missing or unexpected key it raises before anything is swapped or copied, so
    the model stays as it was. Only then does it swap in the recorded layers.

    torch calls load pre-hooks with ``strict=True`` whatever ``load_state_dict`` was given; the
    hook reads the real ``strict`` from the ``load_state_dict`` call it runs in. Called outside
    one, it checks everything but missing and unexpected keys.

    Args:
        rotations_require_grad: if not None, the rotation stages of every recorded layer get this
            ``requires_grad`` (the callback passes its ``train_rotations``); None keeps what each
            record says (frozen if the layer was pruned with ``train_rotations=False``).
    """

    def __init__(
        self, rotations_require_grad: bool | None = None, skeleton: dict[str, nn.Module] | None = None
    ) -> None:
        self.rotations_require_grad = rotations_require_grad
        self.skeleton = skeleton

    def __call__(
        self,
        module: nn.Module,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        try:
            self._reshape(module, state_dict, prefix, local_metadata)
        except (ValueError, RuntimeError) as err:
            resets = None if getattr(self, "skeleton", None) is None else dense_resets(module, self.skeleton)
            if not resets:
                raise
            # pruned further than the checkpoint (a "best" checkpoint from before the last round):
            # the changed modules go back to their dense form, then the checkpoint reshapes them
            old = {name: module.get_submodule(name) for name in resets}
            swap_modules(module, resets)
            try:
                self._reshape(module, state_dict, prefix, local_metadata)
            except BaseException:
                swap_modules(module, old)
                raise err from None

    def _reshape(
        self,
        module: nn.Module,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any] | None,
    ) -> None:
        local = {
            k[len(prefix) :]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(prefix)
        }
        records = records_in(local)
        replacements = _replacements(module, state_dict, records, prefix)
        assign = bool((local_metadata or {}).get("assign_to_params_buffers", False))
        check_loadable(
            module,
            state_dict,
            strict=_strict_of_running_load(),
            prefix=prefix,
            replacements=replacements,
            assign=assign,
        )
        swap_modules(module, replacements)
        if self.rotations_require_grad is not None:
            for name in records:
                layer = module.get_submodule(name)
                for stage in (layer.rotate_in, layer.rotate_out):
                    if stage is not None:
                        stage.weight.requires_grad_(self.rotations_require_grad)


def meta_skeleton(model: nn.Module) -> dict[str, nn.Module] | None:
    """The architecture of ``model`` as it is now, for :func:`dense_resets`: ``{name: a copy of
    the module on the meta device (no memory)}`` for every module that pruning can change (one
    with parameters or buffers of its own, or a head count), children included. None if a
    module cannot be copied (its other attributes are copied too, and may refuse)."""
    out: dict[str, nn.Module] = {}
    try:
        for name, m in model.named_modules():
            own = any(True for _ in itertools.chain(m._parameters.values(), m._buffers.values()))
            if not name or not (own or head_count(m) is not None):
                continue
            memo: dict[int, Any] = {}
            for sub in m.modules():
                for p in sub._parameters.values():
                    if p is not None and id(p) not in memo:
                        memo[id(p)] = nn.Parameter(
                            torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                        )
                for b in sub._buffers.values():
                    if b is not None and id(b) not in memo:
                        memo[id(b)] = torch.empty_like(b, device="meta")
            out[name] = copy.deepcopy(m, memo)
    except Exception:  # noqa: BLE001 — no fallback, then: a load that does not fit fails as before
        return None
    return out


def attach_skeleton(model: nn.Module, skeleton: dict[str, nn.Module] | None) -> None:
    """Give every :class:`PrunedLoadingHook` on ``model`` without one (the user's
    :func:`enable_pruned_loading`) the ``skeleton`` to fall back on (:func:`dense_resets`)."""
    for h in getattr(model, "_load_state_dict_pre_hooks", {}).values():
        hook = getattr(h, "hook", h)
        if isinstance(hook, PrunedLoadingHook) and getattr(hook, "skeleton", None) is None:
            hook.skeleton = skeleton


def _own_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        k: tuple(t.shape) for k, t in [*module._parameters.items(), *module._buffers.items()] if t is not None
    }


def dense_resets(model: nn.Module, skeleton: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Empty modules, built from ``skeleton`` (:func:`meta_skeleton` of ``model`` before it was
    pruned), for the outermost modules of ``model`` that pruning changed (another type, other
    tensor shapes or another head count), on their device: swapped in, they give back the
    architecture the checkpoint loaders start from. Their values are left to the load."""
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not name or any(name.startswith(r + ".") for r in out):
            continue
        s = skeleton.get(name)
        if s is None:
            continue
        if type(m) is type(s) and _own_shapes(m) == _own_shapes(s) and head_count(m) == head_count(s):
            continue
        like = next(itertools.chain(m.parameters(), m.buffers()), None)
        new = copy.deepcopy(s).to_empty(device=like.device if like is not None else "cpu")
        new.train(m.training)
        out[name] = new
    return out


def _strict_of_running_load() -> bool | None:
    """``strict`` of the innermost ``nn.Module.load_state_dict`` call on the stack (None if none).

    ``load_state_dict`` hands every ``_load_from_state_dict`` (and so every pre-hook)
    ``strict=True`` and applies its own ``strict`` only at the end, when reporting.
    """
    code = nn.Module.load_state_dict.__code__
    frame = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_code is code:
                return bool(frame.f_locals.get("strict", True))
            frame = frame.f_back
        return None
    finally:
        del frame


def has_pruned_loading(model: nn.Module, *, ignore: Any = None) -> bool:
    """Whether :func:`enable_pruned_loading` (or an equivalent hook) is registered on ``model``.

    ``ignore``: a hook handle not to count (e.g. one the caller registered itself).
    """
    skip = getattr(ignore, "id", None)
    hooks = getattr(model, "_load_state_dict_pre_hooks", {})
    return any(
        isinstance(getattr(h, "hook", h), PrunedLoadingHook) for key, h in hooks.items() if key != skip
    )


def _loads_by_torch_rules(module: nn.Module) -> bool:
    """Whether ``module`` loads its own keys by ``nn.Module``'s rules (BatchNorm's included), so
    that :func:`check_loadable` can predict the outcome. A module with its own
    ``_load_from_state_dict`` or other load pre-hooks may rename or consume keys: it (and what
    is under it) is left to torch."""
    own = type(module)._load_from_state_dict
    if own is not nn.Module._load_from_state_dict and own is not _NormBase._load_from_state_dict:
        return False
    return all(
        isinstance(getattr(h, "hook", h), PrunedLoadingHook)
        for h in module._load_state_dict_pre_hooks.values()
    )


def check_loadable(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool | None = True,
    prefix: str = "",
    replacements: dict[str, nn.Module] | None = None,
    assign: bool = False,
) -> None:
    """Raise if ``model.load_state_dict(state_dict, strict=strict)`` would fail; change nothing.

    Walks the module tree as ``nn.Module.load_state_dict`` does, with the modules in
    ``replacements`` (qualified name → module, e.g. from
    :func:`~lightning_eigendamage.surgery.layers_for_records`) standing in for the model's own, and
    applies torch's rules: every parameter and persistent buffer present in ``state_dict`` must be
    a tensor of the model's shape; a pruned layer's ``_extra_state`` must be its own record; with
    ``strict`` every expected key must be present (BatchNorm's ``num_batches_tracked`` may be
    absent from a state_dict without version metadata, as torch fills it in) and no key may be
    unexpected. ``strict=None`` (unknown) checks all but missing and unexpected keys. Only keys
    under ``prefix`` are considered, relative to which ``model``'s keys are named. Modules that
    load by rules of their own (a custom ``_load_from_state_dict`` or load pre-hook, e.g. lazy or
    quantized modules) are not checked, nor is anything under them.

    Raises:
        RuntimeError: listing every problem, each with its key (and both shapes for a size
            mismatch).
    """
    replacements = replacements or {}
    metadata = getattr(state_dict, "_metadata", None)
    missing: list[str] = []
    unexpected: list[str] = []
    errors: list[str] = []
    odd = [k for k in state_dict if not isinstance(k, str)]
    if odd:
        errors.append(f"keys must be strings, got {', '.join(repr(k) for k in odd[:5])}")

    def visit(module: nn.Module, name: str, pre: str, keys: list[str], recorded: bool) -> None:
        if not _loads_by_torch_rules(module):
            return
        recorded = recorded or (
            isinstance(module, KFELayer) and is_record(state_dict.get(pre + _EXTRA_STATE))
        )
        persistent = {k: v for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set}
        local = {
            k: v for k, v in itertools.chain(module._parameters.items(), persistent.items()) if v is not None
        }
        version = (metadata.get(pre[:-1], {}) if metadata is not None else {}).get("version")
        fills_batches = (
            isinstance(module, _NormBase) and module.track_running_stats and (version is None or version < 2)
        )
        for pname, param in local.items():
            key = pre + pname
            if key not in state_dict:
                if strict and not (fills_batches and pname == "num_batches_tracked"):
                    missing.append(key)
                continue
            value = state_dict[key]
            if not torch.overrides.is_tensor_like(value):
                errors.append(f"{key}: expected a tensor, the checkpoint has a {type(value).__name__}")
                continue
            if torch.nn.parameter.is_lazy(param):
                continue
            shape = value.shape
            if len(param.shape) == 0 and len(shape) == 1 and shape[0] == 1:
                shape = torch.Size([])  # torch loads a 1-element vector into a scalar
            if shape != param.shape:
                hint = " (shaped by the checkpoint's own pruned-layer record: corrupted checkpoint?)"
                errors.append(
                    f"size mismatch for {key}: the checkpoint has shape {tuple(value.shape)}, the "
                    f"model {tuple(param.shape)}{hint if recorded else ''}"
                )
            elif getattr(value, "is_meta", False) and not param.is_meta and not assign:
                errors.append(f"{key}: the checkpoint's tensor is on the meta device (it holds no data)")
        extra_key = pre + _EXTRA_STATE
        if type(module).set_extra_state is not nn.Module.set_extra_state:
            if extra_key in state_dict:
                if isinstance(module, KFELayer):
                    mine, theirs = architecture_record(module), state_dict[extra_key]
                    if not same_architecture(theirs, mine):
                        errors.append(
                            f"{extra_key}: the checkpoint's pruned-layer record {theirs!r} does not "
                            f"match the layer's architecture {mine!r}"
                        )
            elif strict:
                missing.append(extra_key)
        elif strict and extra_key in state_dict:
            unexpected.append(extra_key)
        if strict:
            for key in keys:
                if key == extra_key:
                    continue
                head, dot, _ = key[len(pre) :].partition(".")
                if (head not in module._modules) if dot else (head not in local):
                    unexpected.append(key)
        for cname, child in module._modules.items():
            if child is None:
                continue
            qualified = f"{name}.{cname}" if name else cname
            child_pre = f"{pre}{cname}."
            visit(
                replacements.get(qualified, child),
                qualified,
                child_pre,
                [k for k in keys if k.startswith(child_pre)],
                recorded,
            )

    keys = [k for k in state_dict if isinstance(k, str) and k.startswith(prefix)]
    visit(model, "", prefix, keys, False)
    problems = []
    if missing:
        problems.append(f"Missing key(s) in state_dict: {', '.join(repr(k) for k in missing)}")
    if unexpected:
        problems.append(f"Unexpected key(s) in state_dict: {', '.join(repr(k) for k in unexpected)}")
    problems += errors
    if problems:
        raise RuntimeError(
            f"cannot load the state_dict into {type(model).__name__} (nothing was changed):\n\t"
            + "\n\t".join(problems)
        )


def channel_pruned(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` marks some module as narrowed (:class:`NarrowedMark`): a checkpoint
    of a model that lost channels, whose eigenbasis records may then be narrower than the layers
    of a freshly built model."""
    return bool(_marked(state_dict))


def _marked(state_dict: Mapping[str, Any]) -> set[str]:
    """The module prefixes ``state_dict``'s metadata marks as narrowed (:class:`NarrowedMark`)."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    return {k for k, v in metadata.items() if isinstance(v, Mapping) and isinstance(v.get(NARROWED), Mapping)}


def narrowed_modules(
    model: nn.Module, state_dict: Mapping[str, Any], *, prefix: str = "", skip: Any = ()
) -> dict[str, nn.Module]:
    """Plain layers narrowed to a channel-pruned ``state_dict``'s shapes; ``model`` is not changed.

    A checkpoint of a channel-pruned model describes its widths by its tensors' shapes, and marks
    each narrowed layer in its metadata (:class:`NarrowedMark`): for each marked module whose
    parameters or persistent buffers in ``state_dict`` (keys under ``prefix``) are smaller in
    some dimension than the module's own (same number of dimensions, no dimension larger), an
    empty module of the same type with those shapes is built (marked too), its width attributes
    (``in_channels``/``out_channels``/``groups`` of a depthwise conv, ``in_features``/
    ``out_features``, ``num_features``, ``normalized_shape``, ``num_channels``) set from them.
    Modules in :class:`~lightning_eigendamage.layers.KFELayer` and under the names in ``skip``
    (layers restored from their records) are left to those; a module that loads by rules of its
    own (its own ``_load_from_state_dict``) is not narrowed itself, but its children are. A
    tensor of another shape (larger, or another rank) is left for the loading checks to report.

    Raises:
        ValueError: narrower tensors for a module whose widths cannot be read from its shapes
            (any type but Conv1d/2d/3d, ConvTranspose, Linear, BatchNorm/InstanceNorm,
            LayerNorm, GroupNorm), or shapes that do not agree with each other.
    """
    out: dict[str, nn.Module] = {}
    metadata = getattr(state_dict, "_metadata", None) or {}
    marked = _marked(state_dict)
    if not marked:
        return out
    skip = tuple(skip)
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, KFELayer) or any(name == s or name.startswith(s + ".") for s in skip):
            inside.update(id(m) for m in module.modules())
            continue
        if not _loads_by_torch_rules(module):
            # its own keys are left to torch (it may rename them), but its children still load
            # by torch's recursion: those marked narrowed are narrowed (torchvision's MLPBlock)
            continue
        pre = prefix + (f"{name}." if name else "")
        if pre[:-1] not in marked:
            continue
        persistent = {k: v for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set}
        shapes = {}
        for key, t in itertools.chain(module._parameters.items(), persistent.items()):
            value = state_dict.get(pre + key)
            if t is None or not torch.is_tensor(value) or value.shape == t.shape or value.dim() != t.dim():
                continue
            if any(a > b for a, b in zip(value.shape, t.shape)):
                continue
            shapes[key] = tuple(value.shape)
        dense = metadata[pre[:-1]][NARROWED].get("dense")
        if shapes and isinstance(dense, Mapping) and not _is_narrowed(module):
            _check_dense(module, dense, name or type(module).__name__)
        heads = metadata[pre[:-1]][NARROWED].get("num_heads")
        now = head_count(module)
        heads = heads if isinstance(heads, int) and now is not None and heads != now else None
        if shapes or heads is not None:
            out[name] = _narrowed(module, shapes, name or type(module).__name__, heads)
    return _nested(out)


def _check_dense(module: nn.Module, dense: Mapping[str, Any], name: str) -> None:
    """ValueError unless the never-narrowed ``module`` has the shapes the checkpoint's layer had
    before it lost channels (``dense``): a model built with other widths would take the pruned
    widths and load without complaint."""
    for key, shape in dense.items():
        t = module._parameters.get(key)
        if t is None:
            t = module._buffers.get(key)
        if t is None or not isinstance(shape, (list, tuple)):
            continue
        if tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"the checkpoint was pruned from a model whose {name}.{key} had shape {tuple(shape)}; "
                f"this model's has {tuple(t.shape)}: build the model as it was before pruning"
            )


def _nested(out: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each replacement whose parent is replaced too into the parent's copy (an attention
    module and its projections), so that swapping the outer ones installs both."""
    for name in sorted(out, key=lambda n: -n.count(".")):
        parent, _, child = name.rpartition(".")
        if name and parent in out and child in out[parent]._modules:
            out[parent]._modules[child] = out.pop(name)
        elif name and not parent and "" in out and child in out[""]._modules:
            out[""]._modules[child] = out.pop(name)
    return out


def _narrowed(
    module: nn.Module, shapes: dict[str, tuple[int, ...]], name: str, heads: int | None = None
) -> nn.Module:
    """An empty copy of ``module`` with the tensors of ``shapes`` and the widths they imply
    (``heads``: its head count as recorded, for an attention module whose heads were removed)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    for attr, value in vars(module).items():  # its own hook tables, not the original's
        if attr.endswith(("hooks", "hooks_with_kwargs", "hooks_always_called")) and isinstance(value, dict):
            setattr(new, attr, type(value)(value))
    mark_narrowed(
        new, {k: t.shape for k, t in [*module._parameters.items(), *module._buffers.items()] if t is not None}
    )
    for key, shape in shapes.items():
        old = module._parameters.get(key)
        if old is None:
            old = module._buffers[key]
        fmt = (
            torch.channels_last
            if old.dim() == 4
            and not old.is_contiguous()
            and old.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        t = torch.empty(shape, dtype=old.dtype, device=old.device, memory_format=fmt)
        if key in module._parameters:
            new._parameters[key] = nn.Parameter(t, requires_grad=old.requires_grad)
        else:
            new._buffers[key] = t

    def size(key: str, dim: int = 0) -> int | None:
        t = new._parameters.get(key)
        t = t if t is not None else new._buffers.get(key)
        return None if t is None else int(t.shape[dim])

    block = head_block("", module) if heads is not None else None
    window = block if block is not None and block.kind == "window" else None
    if isinstance(module, nn.MultiheadAttention):
        d = module.head_dim
        rows = size("in_proj_weight")
        if rows is None or rows % (3 * d) or (heads is not None and heads * 3 * d != rows):
            raise ValueError(
                f"{name}: an in_proj_weight of {rows} rows is not 3·num_heads·head_dim "
                f"(head_dim {d}{f', num_heads {heads}' if heads is not None else ''})"
            )
        new.num_heads = rows // (3 * d)
        if new.num_heads * d != module.embed_dim:
            new.__class__ = PrunedHeadsAttention
            new._qkv_same_embed_dim = False
        widths = {"in_proj_bias": rows}
    elif heads is not None and (not shapes or window is not None):
        # an attention module: its projections are its children (Swin's and MaxViT's window
        # attentions also hold one relative-position bias column per head, narrowed above)
        if window is not None:
            from .window_attention import as_pruned

            as_pruned(new, window.head_dim)
        if block is not None:  # with what its forward reads beside the count (timm's attn_dim)
            set_head_count(new, heads, block.head_dim)
        else:
            setattr(new, heads_attribute(module), heads)
        widths = {}
    elif isinstance(module, nn.modules.conv._ConvNd):
        g = module.groups
        if module.transposed:
            new.in_channels, new.out_channels = size("weight"), size("weight", 1) * g
        else:
            new.out_channels = size("weight")
            if g > 1 and g == module.in_channels == module.out_channels and size("weight", 1) == 1:
                new.groups = new.in_channels = new.out_channels  # depthwise: one filter a channel
            else:
                new.in_channels = size("weight", 1) * g
            if new.out_channels % new.groups:
                raise ValueError(
                    f"{name}: {new.out_channels} output channels do not split into {new.groups} groups"
                )
        widths = {"bias": new.out_channels}
    elif isinstance(module, nn.Linear):
        new.out_features, new.in_features = size("weight"), size("weight", 1)
        widths = {"bias": new.out_features}
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        n = next(size(k) for k in ("weight", "running_mean", "bias", "running_var") if size(k) is not None)
        new.num_features = n
        widths = {k: n for k in ("weight", "bias", "running_mean", "running_var")}
    elif isinstance(module, nn.LayerNorm):
        new.normalized_shape = tuple(new.weight.shape)
        widths = {"bias": new.normalized_shape[0] if new.normalized_shape else None}
    elif isinstance(module, nn.GroupNorm):
        new.num_channels = size("weight")
        if new.num_channels % module.num_groups:
            raise ValueError(
                f"{name}: {new.num_channels} channels do not split into {module.num_groups} groups"
            )
        widths = {"bias": new.num_channels}
    else:
        raise ValueError(
            f"the checkpoint has narrower tensors for {name} ({type(module).__name__}: "
            f"{', '.join(f'{k} {tuple(v)}' for k, v in shapes.items())}), whose widths cannot be read from "
            "its tensors' shapes; load it with lightning_eigendamage.restore_channels(model, checkpoint, "
            "example_inputs)"
        )
    for key, width in widths.items():
        if width is not None and size(key) not in (None, width):
            raise ValueError(
                f"the checkpoint's {name}.{key} has {size(key)} entries where its other tensors give {width}"
            )
    return new
