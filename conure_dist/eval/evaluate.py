"""Evaluate one task of a model on batches, by full ranking (no sampled candidates).

Results are kept as sums and counts (:class:`MetricSums`) so that data-parallel workers can
add theirs up before dividing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from conure_dist.config import TaskSpec
from conure_dist.eval.metrics import hit_at_k, ndcg_at_k, reciprocal_rank_at_k, target_ranks
from conure_dist.model import ConureModel


def metric_names(task: TaskSpec, k: int = 5) -> tuple[str, ...]:
    return ("accuracy",) if task.kind == "class" else (f"mrr@{k}", f"hr@{k}", f"ndcg@{k}")


def main_metric(task: TaskSpec, k: int = 5) -> str:
    """The metric used to select the best epoch and reported in the accuracy matrix first."""
    return metric_names(task, k)[0]


@dataclass
class MetricSums:
    """Per-metric sums over rows, and the row count."""

    names: tuple[str, ...]
    sums: list[float] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        if not self.sums:
            self.sums = [0.0] * len(self.names)

    def add(self, values: Iterable[torch.Tensor]) -> None:
        for i, v in enumerate(values):
            self.sums[i] += float(v.sum())
            if i == 0:
                self.count += v.numel()

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([*self.sums, float(self.count)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, names: tuple[str, ...], t: torch.Tensor) -> "MetricSums":
        return cls(names, [float(x) for x in t[:-1]], int(t[-1]))

    def result(self) -> dict[str, float]:
        out = {n: (s / self.count if self.count else 0.0) for n, s in zip(self.names, self.sums)}
        out["count"] = float(self.count)
        return out


@torch.no_grad()
def score_batch(model: ConureModel, task: TaskSpec, batch: Mapping[str, torch.Tensor], k: int) -> list[torch.Tensor]:
    """Per-row metric values of one batch (padding rows dropped)."""
    seq = batch["seq"]
    head = model.heads[task.name]
    if task.kind == "sequence":
        inputs, targets = seq[:, :-1], seq[:, -1]
        valid = targets != 0
        h = model.hidden(inputs[valid])[:, -1]
        scores = head(h).float()
        scores[:, 0] = float("-inf")  # padding is not an item
        ranks = target_ranks(scores, targets[valid])
    else:
        valid = batch["label"] >= 0
        labels = batch["label"][valid]
        scores = head(model.user_representation(seq[valid])).float()
        if task.kind == "class":
            return [(scores.argmax(dim=1) == labels).double()]
        ranks = target_ranks(scores, labels)
    return [reciprocal_rank_at_k(ranks, k), hit_at_k(ranks, k), ndcg_at_k(ranks, k)]


def evaluate_sums(
    model: ConureModel, task: TaskSpec, batches: Iterable[Mapping[str, torch.Tensor]], k: int = 5,
    device: torch.device | str | None = None,
) -> MetricSums:
    sums = MetricSums(metric_names(task, k))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if device is not None:
                batch = {key: v.to(device) for key, v in batch.items()}
            sums.add(score_batch(model, task, batch, k))
    finally:
        model.train(was_training)
    return sums


def evaluate_task(
    model: ConureModel, task: TaskSpec, batches: Iterable[Mapping[str, torch.Tensor]], k: int = 5,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Metrics of ``task`` over ``batches`` (set the model's view for the task first)."""
    return evaluate_sums(model, task, batches, k, device).result()
