"""The Conure network: one backbone, one head per task, and the owner-map view of a stage.

Parameters fall in three roles:

- **prunable**: backbone weights in the owner map (conv kernels, or the Transformer's
  projections; the item embedding too when ``prune_embedding``). Shared by all tasks, each
  entry owned by at most one task.
- **shared**: everything else in the backbone (embedding unless pruned, LayerNorms, biases,
  positions). Trained in T1 (train and retrain), frozen afterwards (paper section 4.1).
- **head**: ``heads.<task>.*``; trained in that task's stages, frozen afterwards.
- **patch** (PeterRec only, ``patched`` tasks): ``patches.<task>.*``, small residual
  bottlenecks inside the backbone's blocks, used and trained only by their task.

Example::

    model = ConureModel(ModelConfig(num_items=1000, embed_dim=64), tasks)
    model.set_view(owners, "clicks", Stage.TRAIN)     # T2 train: free weights trainable
    hidden = model.hidden(seq)                         # [batch, length, dim]
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from conure_dist.config import ModelConfig, TaskSpec
from conure_dist.model.backbones import BlockPatch, build_backbone
from conure_dist.model.freeze import stage_trainable
from conure_dist.model.heads import ClassHead, ItemScorer
from conure_dist.model.masked import PrunableWeight
from conure_dist.model.owner_map import MAX_TASKS, OwnerMap, Stage

Weights = dict[str, torch.Tensor]


def validate_tasks(tasks: Sequence[TaskSpec]) -> None:
    """The task order rules: T1 is the only sequence task; names unique; at most 255 tasks."""
    if not tasks:
        raise ValueError("at least one task is needed")
    if tasks[0].kind != "sequence":
        raise ValueError(f"the first task must be the sequence task (T1), got {tasks[0].name!r} of kind {tasks[0].kind!r}")
    later = [t.name for t in tasks[1:] if t.kind == "sequence"]
    if later:
        raise ValueError(f"only the first task may be a sequence task; also got {later}")
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate task names: {dupes}")
    if len(tasks) > MAX_TASKS:
        raise ValueError(f"{len(tasks)} tasks: the owner map holds at most {MAX_TASKS}")


class ConureModel(nn.Module):
    def __init__(self, config: ModelConfig, tasks: Sequence[TaskSpec], patched: Sequence[str] = ()):
        super().__init__()
        validate_tasks(tasks)
        self.config, self.tasks = config, tuple(tasks)
        self.backbone = build_backbone(config)
        heads: dict[str, nn.Module] = {}
        for task in tasks:
            if task.kind == "sequence":
                heads[task.name] = ItemScorer(config.embed_dim, config.num_items + 1)
            elif task.kind == "item":
                heads[task.name] = ItemScorer(config.embed_dim, task.num_labels)
            else:
                heads[task.name] = ClassHead(config.embed_dim, task.num_labels)
        self.heads = nn.ModuleDict(heads)
        unknown = sorted(set(patched) - {t.name for t in tasks})
        if unknown:
            raise ValueError(f"patches for unknown tasks: {unknown}")
        if patched and not len(self.backbone.blocks):
            raise ValueError(f"the {config.backbone} backbone has no blocks to patch")
        # Built after the heads, so a model with patches draws the same backbone and heads.
        self.patches = nn.ModuleDict({
            name: nn.ModuleList(BlockPatch(config.embed_dim) for _ in self.backbone.blocks) for name in patched
        })
        self._active_patches: nn.ModuleList | None = None

    # -- forward -------------------------------------------------------------------------
    def hidden(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden state per position, ``[batch, length, dim]`` (with the viewed task's patches)."""
        return self.backbone(seq, self._active_patches)

    def user_representation(self, seq: torch.Tensor) -> torch.Tensor:
        """The last position's hidden vector: the input of every task after T1.

        Item tasks hold one row per (user, item): the backbone runs once per distinct sequence
        of the batch, and the rows take their user's vector."""
        unique, inverse = torch.unique(seq, dim=0, return_inverse=True)
        if unique.shape[0] == seq.shape[0]:
            return self.hidden(seq)[:, -1]
        return self.hidden(unique)[:, -1][inverse]

    # -- structure -----------------------------------------------------------------------
    def task_number(self, name: str) -> int:
        for i, task in enumerate(self.tasks):
            if task.name == name:
                return i + 1
        raise KeyError(f"unknown task {name!r}; known: {[t.name for t in self.tasks]}")

    def _prunable_modules(self) -> dict[str, PrunableWeight]:
        found = {}
        for name, module in self.backbone.named_modules():
            if isinstance(module, PrunableWeight):
                if name == "embedding" and not self.config.prune_embedding:
                    continue
                found[f"backbone.{name}.weight"] = module
        return found

    def prunable_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(m.weight.shape) for n, m in self._prunable_modules().items()}

    def new_owner_map(self) -> OwnerMap:
        return OwnerMap.for_shapes(self.prunable_shapes())

    @staticmethod
    def head_task(param_name: str) -> str | None:
        """The task a parameter's head belongs to, or None for backbone parameters."""
        return param_name.split(".")[1] if param_name.startswith("heads.") else None

    # -- the view of a stage ---------------------------------------------------------------
    def set_view(self, owners: OwnerMap | None, task: str, stage: Stage, scope: str = "all") -> None:
        """Set which weights (task, stage) uses and may change.

        ``owners=None`` turns masking off (naive sequential fine-tuning): the whole backbone is
        trainable in every stage but SERVE. ``scope`` narrows or widens what a task after T1
        trains (:data:`~conure_dist.model.freeze.SCOPES`). Frozen values are taken from the
        current weights, so load the committed weights first.
        """
        stage = Stage(stage)
        number = self.task_number(task)
        prunable = self._prunable_modules()
        frozen_backbone = number > 1 and scope in ("head", "patches")
        for name, module in prunable.items():
            if owners is None:
                module.set_mask(None, None)
            else:
                trainable = owners.trainable(name, number, stage)
                module.set_mask(owners.used(name, number, stage), trainable & False if frozen_backbone else trainable)
        first = self.tasks[0].name
        for name, param in self.named_parameters():
            trainable = stage_trainable(name, owners, task, number, stage, scope, first)
            param.requires_grad_(bool(trainable) if isinstance(trainable, bool) else bool(trainable.any()))
        self._active_patches = self.patches[task] if task in self.patches else None
        self.view = (task, stage, owners is not None)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def masked_modules(self) -> Iterable[tuple[str, PrunableWeight]]:
        return ((n, m) for n, m in self._prunable_modules().items() if m.masked)

    # -- weights ---------------------------------------------------------------------------
    def weights(self) -> Weights:
        """The effective value of every parameter (masked view applied), fp32, on the CPU."""
        out = {name: p.detach().float().cpu().clone() for name, p in self.named_parameters()}
        for name, module in self.masked_modules():
            out[name] = module.effective_weight().detach().float().cpu().clone()
        return out

    def load_weights(self, weights: Mapping[str, torch.Tensor], *, allow_missing_heads: bool = True) -> None:
        """Copy weights into the parameters. Heads of tasks not trained yet may be missing."""
        params = dict(self.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise KeyError(f"weights for unknown parameters: {unknown[:5]}")
        missing = [n for n in params if n not in weights and not (allow_missing_heads and self.head_task(n))]
        if missing:
            raise KeyError(f"weights missing for parameters: {missing[:5]}")
        with torch.no_grad():
            for name, value in weights.items():
                param = params[name]
                if param.shape != value.shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != model's {tuple(param.shape)}")
                param.copy_(value.to(param.dtype))
