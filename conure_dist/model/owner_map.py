"""The owner map: which task owns each prunable weight.

Every prunable tensor ``W`` has a companion ``owner`` tensor of the same shape, dtype uint8:
``0`` = free, ``k`` = owned by task ``k`` (tasks are numbered 1, 2, ... in the order they are
learned). One byte per prunable weight, however many tasks are added. Everything else —
which weights a stage may use in the forward pass, which it may change, capacity — is a view
derived from it (DESIGN.md, "Mask algebra"):

=====================  ==================================  ======================
stage                  weights used in forward             weights that may change
=====================  ==================================  ======================
train t                ``owner == 0`` or ``owner < t``     ``owner == 0``
retrain t / serve t    ``1 <= owner <= t``                 retrain: ``owner == t``
prune t                —                                   sets ``owner = t`` on kept free weights
=====================  ==================================  ======================

This is the only module that builds or edits masks. Example::

    owners = OwnerMap.for_shapes({"conv.weight": (256, 256, 3)})
    owners = owners.prune({"conv.weight": w}, task=1, ratio=0.7)   # T1 keeps 30 %
    owners.used("conv.weight", task=2, stage=Stage.TRAIN)          # bool mask
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping

import torch

MAX_TASKS = 255  # uint8 owner ids; 0 means free


class Stage(str, enum.Enum):
    """What a forward pass is for; decides the owner-map view."""

    TRAIN = "train"
    RETRAIN = "retrain"
    SERVE = "serve"


def _check_task(task: int) -> None:
    if not isinstance(task, int) or isinstance(task, bool):
        raise TypeError(f"task must be an int task number, got {task!r}")
    if not 1 <= task <= MAX_TASKS:
        raise ValueError(
            f"task number {task} is outside 1..{MAX_TASKS}: the owner map stores one uint8 per "
            f"weight, so at most {MAX_TASKS} tasks can own weights"
        )


def used_mask(owner: torch.Tensor, task: int, stage: Stage) -> torch.Tensor:
    """Bool mask of the entries that take part in the forward pass of (task, stage)."""
    _check_task(task)
    if Stage(stage) is Stage.TRAIN:
        return owner < task  # free (0) or owned by an earlier task
    return (owner >= 1) & (owner <= task)


def trainable_mask(owner: torch.Tensor, task: int, stage: Stage) -> torch.Tensor:
    """Bool mask of the entries that the optimizer may change in (task, stage)."""
    _check_task(task)
    stage = Stage(stage)
    if stage is Stage.TRAIN:
        return owner == 0
    if stage is Stage.RETRAIN:
        return owner == task
    return torch.zeros_like(owner, dtype=torch.bool)


def kept_count(n_free: int, ratio: float) -> int:
    """Entries a prune with ``ratio`` gives its task out of ``n_free`` free ones.

    It depends on the count only, never on the weights' values, so the capacity of a whole
    plan is known before any training (:mod:`conure_dist.train.capacity`)."""
    return int(round((1.0 - float(ratio)) * n_free))


def prune_free_weights(
    weight: torch.Tensor, owner: torch.Tensor, task: int, ratio: float
) -> torch.Tensor:
    """Give task ``task`` the ``1 - ratio`` fraction of the free weights with the largest |w|.

    Pure function: returns a new owner tensor. ``ratio`` is the share of the *free* capacity
    that is released again (paper: 0.7 for T1, 0.8 for T2, ...). Ties in |w| are broken by
    flat index (lower index wins), so the result is deterministic. The number kept is
    ``round((1 - ratio) * n_free)``; a prune that would leave the task no weight is refused.
    """
    _check_task(task)
    if not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"prune ratio must lie strictly between 0 and 1, got {ratio}")
    if weight.shape != owner.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} != owner shape {tuple(owner.shape)}")
    if bool((owner > task).any()) or bool((owner == task).any()):
        raise ValueError(f"task {task} (or a later task) already owns weights: prune each task once")
    flat_owner = owner.reshape(-1)
    free_idx = torch.nonzero(flat_owner == 0, as_tuple=False).reshape(-1)
    n_keep = kept_count(free_idx.numel(), ratio)
    if n_keep == 0:
        raise ValueError(
            f"pruning {free_idx.numel()} free weights with ratio {ratio} would leave task {task} "
            "no weight at all: lower the ratio or add capacity"
        )
    # |w| in the weight's own precision (exact); bf16/fp16 widened to fp32 (also exact).
    magnitude = weight.detach().reshape(-1)[free_idx].abs()
    if magnitude.dtype not in (torch.float32, torch.float64):
        magnitude = magnitude.float()
    if not bool(torch.isfinite(magnitude.max())):  # max propagates NaN; one pass, unlike isfinite()
        raise ValueError(f"task {task}: non-finite weights cannot be pruned by magnitude")
    # The n_keep largest by selection, not a sort: every entry above the n_keep-th largest
    # magnitude, then the entries equal to it with the lowest flat indices (nonzero() lists
    # them in ascending order), the same set a stable sort of -|w| would pick.
    threshold = torch.kthvalue(magnitude, free_idx.numel() - n_keep + 1).values
    keep = magnitude > threshold
    ties = torch.nonzero(magnitude == threshold, as_tuple=False).reshape(-1)
    keep[ties[: n_keep - int(keep.sum())]] = True
    new_owner = flat_owner.clone()
    new_owner[free_idx[keep]] = task
    return new_owner.reshape(owner.shape)


@dataclass(frozen=True)
class Capacity:
    """Share of a tensor's (or all tensors') entries owned by each task, and the free share."""

    total: int
    owned: dict[int, int]  # task -> entries

    @property
    def free(self) -> int:
        return self.total - sum(self.owned.values())

    def fraction(self, task: int) -> float:
        return self.owned.get(task, 0) / self.total

    @property
    def free_fraction(self) -> float:
        return self.free / self.total


class OwnerMap:
    """One uint8 owner tensor per prunable tensor, keyed by the weight's parameter name.

    Immutable in use: :meth:`prune` returns a new map, so a coordinator can keep the map of
    each committed version side by side.
    """

    def __init__(self, owners: Mapping[str, torch.Tensor]):
        for name, owner in owners.items():
            if owner.dtype != torch.uint8:
                raise TypeError(f"owner tensor {name!r} must be uint8, got {owner.dtype}")
        self._owners = {name: owner.detach().cpu() for name, owner in owners.items()}

    @classmethod
    def for_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> "OwnerMap":
        """An all-free map for the given prunable tensors."""
        return cls({name: torch.zeros(shape, dtype=torch.uint8) for name, shape in shapes.items()})

    # -- views -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._owners)

    def owner(self, name: str) -> torch.Tensor:
        return self._owners[name]

    def used(self, name: str, task: int, stage: Stage) -> torch.Tensor:
        return used_mask(self._owners[name], task, stage)

    def trainable(self, name: str, task: int, stage: Stage) -> torch.Tensor:
        return trainable_mask(self._owners[name], task, stage)

    @property
    def max_task(self) -> int:
        """Highest task number that owns any weight (0 when all weights are free)."""
        return max((int(o.max()) for o in self._owners.values() if o.numel()), default=0)

    # -- updates -----------------------------------------------------------------------
    def prune(
        self,
        weights: Mapping[str, torch.Tensor],
        task: int,
        ratio: float | Mapping[str, float],
    ) -> "OwnerMap":
        """New map where ``task`` owns the largest ``1 - ratio`` of each tensor's free weights.

        ``ratio`` is one ratio for every tensor, or a ratio per tensor name (the embedding
        table is pruned with its own ratio, paper Table 5).
        """
        missing = [n for n in self._owners if n not in weights]
        if missing:
            raise KeyError(f"prune needs the weights of every prunable tensor; missing {missing}")
        ratios = ratio if isinstance(ratio, Mapping) else {n: ratio for n in self._owners}
        return OwnerMap(
            {n: prune_free_weights(weights[n], o, task, ratios[n]) for n, o in self._owners.items()}
        )

    def release_unowned(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Zero the free entries of each prunable weight (the paper sets pruned weights to 0)."""
        return {
            n: torch.where(o == 0, torch.zeros((), dtype=weights[n].dtype), weights[n])
            for n, o in self._owners.items()
        }

    # -- statistics --------------------------------------------------------------------
    def capacity(self, name: str | None = None) -> Capacity:
        """Capacity of one tensor, or of all prunable tensors together when ``name`` is None."""
        owners = [self._owners[name]] if name is not None else list(self._owners.values())
        total = sum(o.numel() for o in owners)
        counts: dict[int, int] = {}
        for o in owners:
            binc = torch.bincount(o.reshape(-1).to(torch.int64), minlength=MAX_TASKS + 1)
            for task in torch.nonzero(binc[1:]).reshape(-1).tolist():
                counts[task + 1] = counts.get(task + 1, 0) + int(binc[task + 1])
        return Capacity(total=total, owned=dict(sorted(counts.items())))

    def capacity_table(self, task_names: Mapping[int, str] | None = None) -> str:
        """Human-readable table: per prunable tensor, share owned by each task and free share."""
        tasks = sorted({t for n in self._owners for t in self.capacity(n).owned})
        label = (lambda t: task_names.get(t, f"T{t}")) if task_names else (lambda t: f"T{t}")
        header = ["tensor", *(label(t) for t in tasks), "free"]
        rows = []
        for name in [*self._owners, None]:
            cap = self.capacity(name)
            rows.append(
                [name or "ALL", *(f"{100 * cap.fraction(t):.1f}%" for t in tasks),
                 f"{100 * cap.free_fraction:.1f}%"]
            )
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
        return "\n".join([fmt(header), *(fmt(r) for r in rows)])

    # -- persistence -------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: owner.clone() for name, owner in self._owners.items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "OwnerMap":
        return cls(state)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, OwnerMap)
            and self._owners.keys() == other._owners.keys()
            and all(torch.equal(o, other._owners[n]) for n, o in self._owners.items())
        )

    def __repr__(self) -> str:
        return f"OwnerMap({len(self._owners)} tensors, max task {self.max_task})"
