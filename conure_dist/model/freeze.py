"""The frozen guarantee: what a stage must not change, checked twice.

1. Inside a stage, :class:`FrozenGuard` snapshots every tensor the stage must not change
   (frozen parameters, and the frozen values and masks of prunable weights) and, after each
   optimizer step, verifies them bit for bit; a changed entry is restored and counted.
2. Between stages, :func:`merge_stage_weights` takes from a stage's output only the entries
   that the stage was allowed to train; every other entry comes from the committed weights.
   It also verifies that the stage reported the frozen entries unchanged (in the precision the
   stage ran in) and refuses the result otherwise.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from conure_dist.model.owner_map import OwnerMap, Stage

Weights = dict[str, torch.Tensor]


class FrozenWeightsChanged(RuntimeError):
    """A stage's output differs from the committed weights where it had to be unchanged."""


class FrozenGuard:
    """Snapshot of every tensor a stage must not change; :meth:`check` after each step."""

    def __init__(self, model: nn.Module):
        from conure_dist.model.masked import PrunableWeight

        watched: dict[str, torch.Tensor] = {
            name: p for name, p in model.named_parameters() if not p.requires_grad
        }
        for name, module in model.named_modules():
            if isinstance(module, PrunableWeight) and module.masked:
                watched[f"{name}.weight_frozen"] = module.weight_frozen
                watched[f"{name}.weight_trainable"] = module.weight_trainable
        self._watched = watched
        self._snapshot = {name: t.detach().clone() for name, t in watched.items()}
        self.restored_entries = 0

    def check(self) -> int:
        """Restore any changed frozen entry; return how many entries were restored now."""
        restored = 0
        with torch.no_grad():
            for name, tensor in self._watched.items():
                snap = self._snapshot[name]
                if not torch.equal(tensor, snap):
                    changed = tensor.ne(snap) & ~(tensor.isnan() & snap.isnan()) if tensor.is_floating_point() else tensor.ne(snap)
                    restored += int(changed.sum())
                    tensor.copy_(snap)
        self.restored_entries += restored
        return restored


def stage_trainable(
    name: str, owners: OwnerMap | None, task: str, number: int, stage: Stage
) -> bool | torch.Tensor:
    """Which entries of parameter ``name`` task ``task`` (number ``number``) may change.

    A bool for whole tensors, a bool tensor for prunable ones. ``owners=None`` means no masks
    (naive fine-tuning): the whole backbone trains in every task.
    """
    stage = Stage(stage)
    if owners is not None and name in owners.names:
        return owners.trainable(name, number, stage)
    training = stage is not Stage.SERVE
    if name.startswith("heads."):
        return training and name.split(".")[1] == task
    return training and (number == 1 or owners is None)


def merge_stage_weights(
    committed: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    owners: OwnerMap | None,
    task: str,
    number: int,
    stage: Stage,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> Weights:
    """Committed weights with the entries the stage trained replaced by the stage's values.

    ``compute_dtype`` is the precision the stage ran in (bf16 stages hold frozen values in
    bf16): frozen entries must come back equal to the committed ones in that precision.
    """
    merged: Weights = {}
    problems: list[str] = []
    for name in sorted(set(committed) | set(trained)):
        if name not in trained:
            merged[name] = committed[name]
            continue
        new = trained[name].detach().float().cpu()
        trainable = stage_trainable(name, owners, task, number, stage)
        if name not in committed:
            if trainable is not True:
                problems.append(f"{name}: reported by the stage but neither trainable nor committed")
            merged[name] = new
            continue
        old = committed[name]
        if trainable is True:
            merged[name] = new
            continue
        if trainable is False:
            frozen = torch.ones_like(old, dtype=torch.bool)
        else:
            frozen = owners.used(name, number, stage) & ~trainable  # type: ignore[union-attr]
        expected = old.to(compute_dtype).float()
        bad = int((frozen & new.ne(expected)).sum())
        if bad:
            problems.append(f"{name}: {bad} frozen entries changed")
        merged[name] = old.clone() if trainable is False else torch.where(trainable, new, old)
    if problems:
        raise FrozenWeightsChanged(
            f"stage {stage.value} of task {task!r} changed frozen weights: " + "; ".join(problems[:10])
        )
    return merged
