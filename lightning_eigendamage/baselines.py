"""Moved to :mod:`lightning_eigendamage.channels.baselines`; this path keeps working for one release."""

import sys
import warnings

from . import channels as _pkg  # noqa: F401
from .channels.baselines import *  # noqa: F401,F403

warnings.warn(
    "lightning_eigendamage.baselines moved to lightning_eigendamage.channels.baselines; "
    "the old path will be removed",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = sys.modules["lightning_eigendamage.channels.baselines"]
