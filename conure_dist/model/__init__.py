"""Backbones, masked layers, the owner map and task heads. Only this package touches masks."""

from conure_dist.model.freeze import FrozenGuard, FrozenWeightsChanged, merge_stage_weights, stage_trainable
from conure_dist.model.network import ConureModel, Weights, validate_tasks
from conure_dist.model.owner_map import Capacity, OwnerMap, Stage, prune_free_weights

__all__ = [
    "Capacity", "ConureModel", "FrozenGuard", "FrozenWeightsChanged", "OwnerMap", "Stage", "Weights",
    "merge_stage_weights", "prune_free_weights", "stage_trainable", "validate_tasks",
]
