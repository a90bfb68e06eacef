"""Restoring pruned architectures from plain-data checkpoints.

Every pruned layer (:class:`~lightning_eigendamage.layers.KFELayer`) stores a small architecture
record (strings and integers) as its ``_extra_state``; a state_dict therefore describes the pruned
architecture by itself and loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .surgery import records_in, reshape_to_records, swap_modules


def _state_dict_of(checkpoint: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise TypeError(
            f"checkpoint must be a path, a state_dict or a Lightning checkpoint dict, got "
            f"{type(checkpoint).__name__}"
        )
    if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], dict):
        return checkpoint["state_dict"]
    return checkpoint


def restore_pruned(
    model: nn.Module, checkpoint: str | os.PathLike | dict[str, Any], *, strict: bool = True
) -> nn.Module:
    """Reshape a freshly built ``model`` to the pruned architecture in ``checkpoint`` and load it.

    Args:
        model: the model as constructed (unpruned), or already pruned to the same architecture.
        checkpoint: a path (loaded with ``torch.load(weights_only=True)``), a plain state_dict,
            or a Lightning checkpoint dict (its ``"state_dict"`` is used). Keys must be relative
            to ``model`` (for a Lightning checkpoint: pass the LightningModule).
        strict: passed to ``load_state_dict``.

    Returns:
        ``model`` itself, pruned and loaded. If anything fails, ``model`` is left as it was.

    Raises:
        ValueError: the checkpoint's pruned-layer records do not fit this model.
    """
    state_dict = _state_dict_of(checkpoint)
    records = records_in(state_dict)
    old = reshape_to_records(model, records)
    try:
        check_record_shapes(model, state_dict, records)
        model.load_state_dict(state_dict, strict=strict)
    except Exception:
        swap_modules(model, old)
        raise
    return model


def enable_pruned_loading(model: nn.Module) -> Any:
    """Let ``model.load_state_dict`` accept pruned state_dicts directly.

    Registers a ``load_state_dict`` pre-hook on ``model`` that, before any child loads, reshapes
    the layers named in the incoming state_dict's pruned-layer records (see
    :func:`restore_pruned`). Call it in a LightningModule's ``__init__`` to make
    ``Model.load_from_checkpoint(path)`` and ``Trainer.fit(..., ckpt_path=...)`` work with pruned
    checkpoints, and (with ``strategy="ddp_spawn"``) to let the main process take the pruned,
    trained weights back after ``fit``. The hook is picklable, so the model can still be sent to
    spawned processes. Returns the hook handle (``handle.remove()`` undoes it).
    """
    return model.register_load_state_dict_pre_hook(PrunedLoadingHook())


class PrunedLoadingHook:
    """The ``load_state_dict`` pre-hook of :func:`enable_pruned_loading` (a class, not a closure,
    so that a module holding it can be pickled, e.g. by ``ddp_spawn``).

    On a record mismatch (a layer the model lacks, other widths, a corrupted record) or weights
    that do not fit the recorded shapes it raises before anything is loaded and leaves the model
    as it was.

    Args:
        rotations_require_grad: if not None, the rotation stages of every recorded layer get this
            ``requires_grad`` (records do not store it; the callback passes its
            ``train_rotations``).
    """

    def __init__(self, rotations_require_grad: bool | None = None) -> None:
        self.rotations_require_grad = rotations_require_grad

    def __call__(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        local = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        records = records_in(local)
        if not records:
            return
        old = reshape_to_records(module, records)
        try:
            check_record_shapes(module, local, records)
        except Exception:
            swap_modules(module, old)
            raise
        if self.rotations_require_grad is not None:
            for name in records:
                layer = module.get_submodule(name)
                for stage in (layer.rotate_in, layer.rotate_out):
                    if stage is not None:
                        stage.weight.requires_grad_(self.rotations_require_grad)


def has_pruned_loading(model: nn.Module, *, ignore: Any = None) -> bool:
    """Whether :func:`enable_pruned_loading` (or an equivalent hook) is registered on ``model``.

    ``ignore``: a hook handle not to count (e.g. one the caller registered itself).
    """
    skip = getattr(ignore, "id", None)
    hooks = getattr(model, "_load_state_dict_pre_hooks", {})
    return any(
        isinstance(getattr(h, "hook", h), PrunedLoadingHook) for key, h in hooks.items() if key != skip
    )


def check_record_shapes(model: nn.Module, state_dict: dict[str, Any], records: dict[str, dict]) -> None:
    """Raise if a recorded layer's tensors in ``state_dict`` do not fit the model's (reshaped) layer.

    Run after :func:`~lightning_eigendamage.surgery.reshape_to_records` and before loading, so a
    record that disagrees with its own weights fails before any tensor is copied.

    Raises:
        RuntimeError: ``size mismatch`` for each tensor whose shape differs.
    """
    bad = []
    for name in records:
        for key, tensor in model.get_submodule(name).state_dict().items():
            full = f"{name}.{key}"
            incoming = state_dict.get(full)
            if torch.is_tensor(tensor) and torch.is_tensor(incoming) and incoming.shape != tensor.shape:
                bad.append(f"{full}: checkpoint {tuple(incoming.shape)}, record {tuple(tensor.shape)}")
    if bad:
        raise RuntimeError(
            "size mismatch between the checkpoint's pruned-layer records and its weights (corrupted "
            f"checkpoint?); nothing was loaded: {'; '.join(bad)}"
        )
