"""Evaluate one task of a model on batches, by full ranking (no sampled candidates).

Results are kept as integer counts (:class:`MetricSums`) so that data-parallel workers can
add theirs up exactly before dividing. Ranks and class accuracy follow the conservative rule of
:mod:`conure_dist.eval.metrics` (ties and non-finite scores count against the target).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from conure_dist.config import TaskSpec
from conure_dist.eval.metrics import target_ranks, top1_correct
from conure_dist.model import ConureModel


def metric_names(task: TaskSpec, k: int = 5) -> tuple[str, ...]:
    return ("accuracy",) if task.kind == "class" else (f"mrr@{k}", f"hr@{k}", f"ndcg@{k}")


def main_metric(task: TaskSpec, k: int = 5) -> str:
    """The metric used to select the best epoch and reported in the accuracy matrix first."""
    return metric_names(task, k)[0]


@dataclass
class MetricSums:
    """Integer counts from which every metric follows: how many targets ranked 1, 2, ..., k
    (ranking tasks) or were classified correctly (class tasks), out of ``count`` rows.

    Counts add up exactly, so the metrics do not depend on how rows were spread over workers
    or batches, nor on the order in which workers' results are added.
    """

    kind: str  # "ranking" | "class"
    k: int
    hits: list[int] = field(default_factory=list)  # ranking: hits[r - 1] = targets at rank r <= k; class: [correct]
    count: int = 0

    def __post_init__(self) -> None:
        if not self.hits:
            self.hits = [0] * (self.k if self.kind == "ranking" else 1)

    def add_ranks(self, ranks: torch.Tensor) -> None:
        counts = torch.bincount(ranks[ranks <= self.k].long(), minlength=self.k + 1)[1:]
        self.hits = [h + int(c) for h, c in zip(self.hits, counts)]
        self.count += ranks.numel()

    def add_correct(self, correct: torch.Tensor) -> None:
        self.hits[0] += int(correct.sum())
        self.count += correct.numel()

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([*self.hits, self.count], dtype=torch.int64)

    def from_tensor(self, t: torch.Tensor) -> "MetricSums":
        return MetricSums(self.kind, self.k, [int(x) for x in t[:-1]], int(t[-1]))

    def result(self) -> dict[str, float]:
        n = self.count
        if self.kind == "class":
            out = {"accuracy": self.hits[0] / n if n else 0.0}
        else:
            ranks = range(1, self.k + 1)
            out = {
                f"mrr@{self.k}": sum(h / r for h, r in zip(self.hits, ranks)) / n if n else 0.0,
                f"hr@{self.k}": sum(self.hits) / n if n else 0.0,
                f"ndcg@{self.k}": sum(h / math.log2(r + 1) for h, r in zip(self.hits, ranks)) / n if n else 0.0,
            }
        out["count"] = float(n)
        return out


@torch.no_grad()
def score_batch(model: ConureModel, task: TaskSpec, batch: Mapping[str, torch.Tensor], sums: MetricSums) -> None:
    """Add one batch to ``sums`` (padding rows dropped)."""
    seq = batch["seq"]
    head = model.heads[task.name]
    if task.kind == "sequence":
        inputs, targets = seq[:, :-1], seq[:, -1]
        valid = targets != 0
        h = model.hidden(inputs[valid])[:, -1]
        scores = head(h).float()
        scores[:, 0] = float("-inf")  # padding is not an item; -inf never outranks a finite target
        sums.add_ranks(target_ranks(scores, targets[valid]))
        return
    valid = batch["label"] >= 0
    labels = batch["label"][valid]
    scores = head(model.user_representation(seq[valid])).float()
    if task.kind == "class":
        # argmax would call a tie, or a NaN row, right whenever the label comes first
        sums.add_correct(top1_correct(scores, labels))
    else:
        sums.add_ranks(target_ranks(scores, labels))


def evaluate_sums(
    model: ConureModel, task: TaskSpec, batches: Iterable[Mapping[str, torch.Tensor]], k: int = 5,
    device: torch.device | str | None = None,
) -> MetricSums:
    sums = MetricSums("class" if task.kind == "class" else "ranking", k)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if device is not None:
                batch = {key: v.to(device) for key, v in batch.items()}
            score_batch(model, task, batch, sums)
    finally:
        model.train(was_training)
    return sums


def evaluate_task(
    model: ConureModel, task: TaskSpec, batches: Iterable[Mapping[str, torch.Tensor]], k: int = 5,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Metrics of ``task`` over ``batches`` (set the model's view for the task first)."""
    return evaluate_sums(model, task, batches, k, device).result()
