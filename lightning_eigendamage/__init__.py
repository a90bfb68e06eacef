"""Second-order structured pruning (EigenDamage) for PyTorch and PyTorch Lightning."""

from .callback import EigenDamagePruning
from .checkpoint import restore_pruned
from .layers import KFELayer
from .pruner import LayerReport, PruneReport, find_layers, prune
from .schedule import PruningSchedule

__all__ = [
    "EigenDamagePruning",
    "KFELayer",
    "LayerReport",
    "PruneReport",
    "PruningSchedule",
    "find_layers",
    "prune",
    "restore_pruned",
]
__version__ = "0.1.0"
