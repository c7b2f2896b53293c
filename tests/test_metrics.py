import math

import pytest
import torch

from conure_dist.eval.metrics import accuracy, hr_at_k, mean_ndcg_at_k, mrr_at_k, target_ranks


def test_ranks_and_topk_metrics_against_hand_values():
    scores = torch.tensor([
        [0.1, 0.9, 0.3, 0.2],   # target 2: one higher (0.9) -> rank 2
        [0.5, 0.4, 0.3, 0.2],   # target 0 -> rank 1
        [0.1, 0.2, 0.3, 0.4],   # target 0 -> rank 4
        [0.3, 0.3, 0.3, 0.1],   # target 1: ties do not count against it -> rank 1
    ])
    targets = torch.tensor([2, 0, 0, 1])
    ranks = target_ranks(scores, targets)
    assert ranks.tolist() == [2, 1, 4, 1]
    assert mrr_at_k(ranks, 3) == pytest.approx((1 / 2 + 1 + 0 + 1) / 4)
    assert mrr_at_k(ranks, 5) == pytest.approx((1 / 2 + 1 + 1 / 4 + 1) / 4)
    assert hr_at_k(ranks, 1) == pytest.approx(0.5)
    assert mean_ndcg_at_k(ranks, 3) == pytest.approx((1 / math.log2(3) + 1 + 0 + 1) / 4)


def test_accuracy():
    logits = torch.tensor([[0.1, 0.9], [2.0, 1.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)


def test_metric_counts_add_up_exactly_whatever_the_split():
    from conure_dist.eval.evaluate import MetricSums

    ranks = torch.tensor([2, 1, 4, 1, 7, 3])
    whole = MetricSums("ranking", 5)
    whole.add_ranks(ranks)
    a, b = MetricSums("ranking", 5), MetricSums("ranking", 5)
    a.add_ranks(ranks[:2])
    b.add_ranks(ranks[2:])
    merged = a.from_tensor(a.as_tensor() + b.as_tensor())
    assert merged.result() == whole.result()
    assert whole.result()["mrr@5"] == pytest.approx(mrr_at_k(ranks, 5))
    assert whole.result()["hr@5"] == pytest.approx(hr_at_k(ranks, 5))
    assert whole.result()["ndcg@5"] == pytest.approx(mean_ndcg_at_k(ranks, 5))
