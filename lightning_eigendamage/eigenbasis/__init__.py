"""The eigenbasis engine (``structure="eigenbasis"``): EigenDamage as in the paper.

Modules: ``pruner`` (analyse, decide, apply, ``prune``, :class:`~.pruner.EigenbasisEngine`),
``basis`` (checked eigendecompositions, rotation into the eigenbasis), ``criteria`` (direction
scores), ``plan`` (the plan as plain data), ``surgery`` (building and swapping the new stages),
``layers`` (:class:`~.layers.KFELayer`), ``gradual`` (gradual removal before a round).

The names of the former module ``lightning_eigendamage.eigenbasis`` (now ``.basis``) are
re-exported here, so code importing them from the old path keeps working.
"""

from .basis import EighError, eigh_factor, eigh_factors, eigh_is_sound, to_kfe, weight_as_3d, weight_from_3d

__all__ = [
    "EighError",
    "eigh_factor",
    "eigh_factors",
    "eigh_is_sound",
    "to_kfe",
    "weight_as_3d",
    "weight_from_3d",
]
