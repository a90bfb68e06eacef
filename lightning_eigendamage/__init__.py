"""Second-order structured pruning (EigenDamage) for PyTorch and PyTorch Lightning."""

from .callback import EigenDamagePruning
from .checkpoint import enable_pruned_loading, restore_pruned
from .layers import KFELayer
from .pruner import (
    LayerReport,
    PruneReport,
    PruningWarning,
    TargetNotReachedWarning,
    ZeroCurvatureWarning,
    find_layers,
    prune,
)
from .schedule import PruningSchedule

__all__ = [
    "EigenDamagePruning",
    "KFELayer",
    "LayerReport",
    "PruneReport",
    "PruningSchedule",
    "PruningWarning",
    "TargetNotReachedWarning",
    "ZeroCurvatureWarning",
    "enable_pruned_loading",
    "find_layers",
    "prune",
    "restore_pruned",
]
__version__ = "0.1.0"
