"""Serve any committed task from one set of weights and the owner map."""

from __future__ import annotations

import torch

from conure_dist.model import ConureModel, OwnerMap, Stage, Weights


@torch.no_grad()
def task_outputs(
    model: ConureModel, weights: Weights, owners: OwnerMap | None, task: str, seq: torch.Tensor
) -> torch.Tensor:
    """Scores of ``task`` for each sequence: item scores (T1: next item after the sequence),
    label scores (item tasks) or class logits (class tasks)."""
    model.load_weights(weights)
    model.set_view(owners, task, Stage.SERVE)
    model.eval()
    return model.heads[task](model.user_representation(seq))
