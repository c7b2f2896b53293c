"""Full-ranking metrics as small pure functions.

A target's rank is 1 + the number of candidates scored strictly higher (ties count in the
target's favour, deterministically). All metrics are means over the given rows.
"""

from __future__ import annotations

import math

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's target among all candidates: ``scores`` [N, C], ``targets`` [N]."""
    target_scores = scores.gather(1, targets[:, None])
    return (scores > target_scores).sum(dim=1) + 1


def reciprocal_rank_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row 1/rank if the target is in the top k, else 0."""
    return torch.where(ranks <= k, 1.0 / ranks.double(), torch.zeros((), dtype=torch.float64))


def hit_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    return (ranks <= k).double()


def ndcg_at_k(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row DCG of one relevant item: 1 / log2(rank + 1) within the top k (ideal DCG = 1)."""
    return torch.where(ranks <= k, math.log(2) / torch.log(ranks.double() + 1), torch.zeros((), dtype=torch.float64))


def mrr_at_k(ranks: torch.Tensor, k: int) -> float:
    return float(reciprocal_rank_at_k(ranks, k).mean())


def hr_at_k(ranks: torch.Tensor, k: int) -> float:
    return float(hit_at_k(ranks, k).mean())


def mean_ndcg_at_k(ranks: torch.Tensor, k: int) -> float:
    return float(ndcg_at_k(ranks, k).mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean())
