"""Moved to :mod:`lightning_eigendamage.lightning.callback`; this path keeps working for one release."""

import sys
import warnings

from . import lightning as _pkg  # noqa: F401
from .lightning.callback import *  # noqa: F401,F403

warnings.warn(
    "lightning_eigendamage.callback moved to lightning_eigendamage.lightning.callback; "
    "the old path will be removed",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = sys.modules["lightning_eigendamage.lightning.callback"]
