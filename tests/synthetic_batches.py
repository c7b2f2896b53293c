"""Tiny in-memory tasks with planted structure, for tests of the core (no files, no Ray)."""

from __future__ import annotations

import torch

from conure_dist.config import ModelConfig, TaskPlan, TaskSpec, TrainConfig
from conure_dist.train.runner import TaskData

NUM_ITEMS, SEQ_LEN, CLUSTERS = 40, 8, 4


def _batches(seq: torch.Tensor, labels: torch.Tensor | None, batch_size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, seq.shape[0], batch_size):
        b = {"user": torch.arange(i, min(i + batch_size, seq.shape[0])), "seq": seq[i:i + batch_size]}
        if labels is not None:
            b["label"] = labels[i:i + batch_size]
        out.append(b)
    return out


def make_data(num_users: int = 96, seed: int = 0, batch_size: int = 16) -> dict[str, TaskData]:
    """T1 sequences walk through the user's cluster of items; T2 labels and T3 classes follow
    the cluster, so all three tasks are learnable from the sequence."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, CLUSTERS, (num_users,), generator=g)
    per = NUM_ITEMS // CLUSTERS
    start = torch.randint(0, per, (num_users,), generator=g)
    steps = torch.arange(SEQ_LEN)
    seq = 1 + cluster[:, None] * per + (start[:, None] + steps[None, :]) % per
    lengths = torch.randint(3, SEQ_LEN + 1, (num_users,), generator=g)
    seq = torch.where(steps[None, :] >= SEQ_LEN - lengths[:, None], seq, torch.zeros_like(seq))  # left padding
    item_label = (cluster * 3 + torch.randint(0, 3, (num_users,), generator=g)) % 12
    class_label = cluster % 3
    split = torch.arange(num_users) % 8
    data = {}
    for name, labels in (("t1", None), ("clicks", item_label), ("age", class_label)):
        parts = {}
        for part, sel in (("train", split < 6), ("validation", split == 6), ("test", split == 7)):
            parts[part] = _batches(seq[sel], None if labels is None else labels[sel], batch_size)
        data[name] = TaskData(**parts)
    return data


def model_config(backbone: str = "nextitnet") -> ModelConfig:
    return ModelConfig(num_items=NUM_ITEMS, embed_dim=16, dilations=(1, 2, 1, 2), backbone=backbone, max_seq_len=SEQ_LEN)


def task_plans(epochs: int = 2, optimizer: str = "adam", weight_decay: float = 0.01, ratios=(0.7, 0.8, 0.7)) -> list[TaskPlan]:
    train = TrainConfig(lr=1e-2, optimizer=optimizer, weight_decay=weight_decay, l2=1e-4, batch_size=16,
                        epochs=epochs, retrain_epochs=1, patience=5, sample_ratio=0.5)
    return [
        TaskPlan(TaskSpec("t1", "sequence", prune_ratio=ratios[0]), train),
        TaskPlan(TaskSpec("clicks", "item", num_labels=12, prune_ratio=ratios[1]), train),
        TaskPlan(TaskSpec("age", "class", num_labels=3, prune_ratio=ratios[2]), train),
    ]


@torch.no_grad()
def task_outputs(model, weights, owners, task: str, seq: torch.Tensor) -> torch.Tensor:
    """Raw scores of ``task``'s head (every label or item, padding included) for ``seq``, served
    from ``weights`` in the owner map's SERVE view: what the bit-identity checks compare."""
    from conure_dist.model import Stage

    model.load_weights(weights)
    model.set_view(owners, task, Stage.SERVE)
    model.eval()
    return model.heads[task](model.user_representation(seq))
