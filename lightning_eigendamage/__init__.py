"""Second-order structured pruning (EigenDamage) for PyTorch and PyTorch Lightning."""

from .adapters import LayerAdapter, register
from .channels.engine import ChannelPruneReport, prune_channels, restore_channels
from .checkpoint import enable_pruned_loading, restore_pruned
from .eigenbasis.criteria import register_criterion
from .eigenbasis.layers import KFELayer
from .eigenbasis.plan import LayerChange, LayerPlan, Plan
from .eigenbasis.pruner import Analysis, analyse, apply, decide, find_layers
from .engine import PruningEngine, engine_names, get_engine, register_engine
from .front import prune
from .gradual import GradualRemoval
from .lightning.callback import EigenDamagePruning
from .lightning.schedule import PruningSchedule
from .options import PruneOptions
from .report import (
    LayerReport,
    PruneReport,
    PruningWarning,
    TargetNotReachedWarning,
    ZeroCurvatureWarning,
)

__all__ = [
    "Analysis",
    "ChannelPruneReport",
    "EigenDamagePruning",
    "GradualRemoval",
    "KFELayer",
    "LayerAdapter",
    "LayerChange",
    "LayerPlan",
    "LayerReport",
    "Plan",
    "PruneOptions",
    "PruneReport",
    "PruningEngine",
    "PruningSchedule",
    "PruningWarning",
    "TargetNotReachedWarning",
    "ZeroCurvatureWarning",
    "analyse",
    "apply",
    "decide",
    "enable_pruned_loading",
    "engine_names",
    "find_layers",
    "get_engine",
    "prune",
    "prune_channels",
    "register",
    "register_criterion",
    "register_engine",
    "restore_channels",
    "restore_pruned",
]
__version__ = "0.1.0"
