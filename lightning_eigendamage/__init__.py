"""Second-order structured pruning (EigenDamage) for PyTorch and PyTorch Lightning."""

from .checkpoint import enable_pruned_loading, restore_pruned
from .layers import KFELayer
from .pruner import LayerReport, PruneReport, find_layers, prune

__all__ = [
    "enable_pruned_loading",
    "KFELayer",
    "LayerReport",
    "PruneReport",
    "find_layers",
    "prune",
    "restore_pruned",
]
__version__ = "0.1.0"
