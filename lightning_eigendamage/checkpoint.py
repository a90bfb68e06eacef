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
    old = reshape_to_records(model, records_in(state_dict))
    try:
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
    checkpoints, and, with ``strategy="ddp_spawn"``, to let the main process take rank 0's pruned
    weights after fit. The hook is a module-level function, so the model stays picklable
    (``ddp_spawn`` pickles it). Returns the hook handle (``handle.remove()`` undoes it).
    """
    return model.register_load_state_dict_pre_hook(_reshape_before_load)


def _reshape_before_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    local = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    reshape_to_records(module, records_in(local))
