"""Full-ranking metrics as small pure functions.

Ranking rule (conservative, as RecBole and most full-ranking evaluators use): a target's rank
is 1 + the number of OTHER candidates whose score is >= the target's score. Ties count against
the target, so a model that scores every candidate alike (collapsed or untrained) ranks each
target last among its equals instead of first, and cannot win best-epoch selection.

Non-finite scores (NaN, +inf, -inf) rank last:

- a candidate with a non-finite score never outranks a target with a finite score (the
  evaluator sets the padding column to -inf for exactly this reason);
- a target whose own score is non-finite gets the worst rank, the number of candidates, so a
  diverged epoch scores 0 on every top-k metric.

Classification uses the same rule: a prediction is correct iff the label's rank is 1, i.e. its
score is finite and strictly greater than every other finite class score.

All metrics are means over the given rows.
"""

from __future__ import annotations

import math

import torch


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's target among all candidates: ``scores`` [N, C], ``targets`` [N].

    See the module docstring for ties and non-finite scores. Only one [N, C] bool temporary is
    alive at a time: full-ranking evaluation over the whole item vocabulary is memory-bound.
    """
    target_scores = scores.gather(1, targets[:, None])
    # For a finite target, ``>=`` is already false for NaN and -inf candidates and true for the
    # target itself (the "1 +"); only +inf candidates must be taken back out.
    at_least = (scores >= target_scores).sum(dim=1)
    at_least -= (scores == math.inf).sum(dim=1)
    worst = torch.full_like(at_least, scores.shape[1])
    return torch.where(torch.isfinite(target_scores[:, 0]), at_least, worst)


def top1_correct(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row bool: the label alone holds the top rank (ties and non-finite scores are wrong)."""
    return target_ranks(scores, labels) == 1


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
    return float(top1_correct(logits, labels).double().mean())
