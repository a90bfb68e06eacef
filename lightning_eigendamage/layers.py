"""Moved to :mod:`lightning_eigendamage.eigenbasis.layers`; this path keeps working for one release."""

import sys
import warnings

from . import eigenbasis as _pkg  # noqa: F401
from .eigenbasis.layers import *  # noqa: F401,F403

warnings.warn(
    "lightning_eigendamage.layers moved to lightning_eigendamage.eigenbasis.layers; "
    "the old path will be removed",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = sys.modules["lightning_eigendamage.eigenbasis.layers"]
