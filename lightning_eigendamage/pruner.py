"""Moved to :mod:`lightning_eigendamage.eigenbasis.pruner`; this path keeps working for one release."""

import sys
import warnings

from . import eigenbasis as _pkg  # noqa: F401
from .eigenbasis.pruner import *  # noqa: F401,F403

warnings.warn(
    "lightning_eigendamage.pruner moved to lightning_eigendamage.eigenbasis.pruner; "
    "the old path will be removed",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = sys.modules["lightning_eigendamage.eigenbasis.pruner"]
