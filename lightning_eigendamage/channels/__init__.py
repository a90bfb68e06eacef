"""The channel engine (``structure="channels"``): whole channels removed, scored and compensated
with input-side Kron-OBS on the layers that read them.

Modules: ``engine`` (:class:`~.engine.ChannelEngine`, ``prune_channels``, ``remove_channels``,
``cut_channels``, ``restore_channels``, Torch-Pruning's dependency graph) and ``baselines`` (the
paper's channel criteria and the input-side Kron-OBS maths). The public names of the former module
``lightning_eigendamage.channels`` (now ``.engine``) are re-exported here.
"""

from .engine import (
    RANK_BY,
    RANKS,
    TARGETS,
    ChannelAnalysis,
    ChannelChange,
    ChannelEngine,
    ChannelPlan,
    ChannelPruneReport,
    ParamSlice,
    Scores,
    Update,
    cut_channels,
    dependency_graph,
    input_side_scores,
    last_layer,
    layer_reports,
    prune_channels,
    remove_channels,
    restore_channels,
    scorable_layers,
    scores_from_factors,
    sequential_group_scores,
)

__all__ = [
    "ChannelAnalysis",
    "ChannelChange",
    "ChannelEngine",
    "ChannelPlan",
    "ChannelPruneReport",
    "ParamSlice",
    "RANKS",
    "RANK_BY",
    "Scores",
    "TARGETS",
    "Update",
    "cut_channels",
    "dependency_graph",
    "input_side_scores",
    "last_layer",
    "layer_reports",
    "prune_channels",
    "remove_channels",
    "restore_channels",
    "scorable_layers",
    "scores_from_factors",
    "sequential_group_scores",
]
