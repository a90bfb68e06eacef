"""Numbers as users pass them: Python ints and floats, NumPy scalars (``np.float32(0.5)``,
``np.int64(3)``, as a config or a sweep produces them) and one-element tensors, read as plain
Python numbers. ``bool`` is never a number here (``True`` as a ratio is a mistake, not 1)."""

from __future__ import annotations

import numbers
from typing import Any

import torch


def as_real(value: Any) -> float | None:
    """``value`` as a Python float if it is a real number (not a bool), else None."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
            return None
        return float(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        return None
    return float(value)


def as_int(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (not a bool), else None."""
    if torch.is_tensor(value):
        dtype = value.dtype
        if value.numel() != 1 or dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
            return None
        return int(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Integral):
        return None
    return int(value)
