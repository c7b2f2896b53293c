import math

import pytest
import torch

from conure_dist.eval.metrics import accuracy, hr_at_k, mean_ndcg_at_k, mrr_at_k, target_ranks, top1_correct

NAN, INF = math.nan, math.inf


def test_ranks_and_topk_metrics_against_hand_values():
    scores = torch.tensor([
        [0.1, 0.9, 0.3, 0.2],   # target 2: one higher (0.9) -> rank 2
        [0.5, 0.4, 0.3, 0.2],   # target 0 -> rank 1
        [0.1, 0.2, 0.3, 0.4],   # target 0 -> rank 4
        [0.3, 0.3, 0.3, 0.1],   # target 1: two others tie with it and count against it -> rank 3
    ])
    targets = torch.tensor([2, 0, 0, 1])
    ranks = target_ranks(scores, targets)
    assert ranks.tolist() == [2, 1, 4, 3]
    assert mrr_at_k(ranks, 3) == pytest.approx((1 / 2 + 1 + 0 + 1 / 3) / 4)
    assert mrr_at_k(ranks, 5) == pytest.approx((1 / 2 + 1 + 1 / 4 + 1 / 3) / 4)
    assert hr_at_k(ranks, 1) == pytest.approx(0.25)
    assert mean_ndcg_at_k(ranks, 3) == pytest.approx((1 / math.log2(3) + 1 + 0 + 1 / 2) / 4)


def test_all_equal_scores_rank_every_target_last():
    scores = torch.full((3, 5), 0.7)
    ranks = target_ranks(scores, torch.tensor([0, 2, 4]))
    assert ranks.tolist() == [5, 5, 5]
    assert mrr_at_k(ranks, 5) == pytest.approx(1 / 5)
    assert mrr_at_k(ranks, 4) == 0.0


def test_all_nan_scores_rank_every_target_last():
    ranks = target_ranks(torch.full((2, 6), NAN), torch.tensor([0, 3]))
    assert ranks.tolist() == [6, 6]
    assert mrr_at_k(ranks, 5) == 0.0 and hr_at_k(ranks, 5) == 0.0 and mean_ndcg_at_k(ranks, 5) == 0.0


def test_non_finite_target_gets_the_worst_rank_whatever_the_others():
    scores = torch.tensor([
        [0.1, NAN, 0.3, 0.2],     # NaN target among finite others
        [0.1, INF, 0.3, 0.2],     # +inf target
        [-INF, -INF, -INF, 0.2],  # -inf target tied with -inf others
    ])
    assert target_ranks(scores, torch.tensor([1, 1, 1])).tolist() == [4, 4, 4]


def test_non_finite_others_never_outrank_a_finite_target():
    scores = torch.tensor([
        [INF, 0.5, NAN, 0.9, -INF],   # only 0.9 is above target 1 -> rank 2
        [INF, INF, 0.1, NAN, 0.1],    # target 2 ties the other 0.1 -> rank 2
        [0.2, INF, NAN, -INF, 0.0],   # target 0: nothing finite above it -> rank 1
    ])
    assert target_ranks(scores, torch.tensor([1, 2, 0])).tolist() == [2, 2, 1]


def test_minus_inf_padding_column_does_not_count_against_the_target():
    # as evaluate.score_batch builds them: column 0 is padding, set to -inf
    scores = torch.tensor([[0.4, 0.4, 0.1, 0.4], [0.0, 0.0, 0.0, 0.0]])
    scores[:, 0] = -INF
    # row 0: target 1 ties item 3 -> rank 2; row 1: target 2 ties items 1 and 3 -> rank 3
    assert target_ranks(scores, torch.tensor([1, 2])).tolist() == [2, 3]


def test_bf16_ties_count_against_the_target():
    # 1.0 and 1.001 differ in fp32 but are the same bf16 number (spacing 2**-7 near 1)
    fp32 = torch.tensor([[1.001, 1.0, 0.5]])
    assert target_ranks(fp32, torch.tensor([0])).tolist() == [1]
    bf16 = fp32.bfloat16()
    assert bf16[0, 0] == bf16[0, 1]
    assert target_ranks(bf16, torch.tensor([0])).tolist() == [2]
    assert target_ranks(bf16, torch.tensor([1])).tolist() == [2]
    assert target_ranks(bf16.float(), torch.tensor([0])).tolist() == [2]  # what score_batch ranks


def test_accuracy():
    logits = torch.tensor([[0.1, 0.9], [2.0, 1.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)


def test_class_accuracy_counts_ties_and_nan_as_wrong():
    logits = torch.tensor([
        [0.5, 0.5, 0.1],     # label 0 ties class 1: wrong
        [NAN, NAN, NAN],     # diverged: wrong
        [NAN, 0.2, 0.1],     # NaN label score: wrong
        [0.3, NAN, 0.1],     # finite label above every finite other: right
        [0.3, 0.1, 0.2],     # plain win: right
    ])
    labels = torch.zeros(5, dtype=torch.long)
    assert top1_correct(logits, labels).tolist() == [False, False, False, True, True]
    assert accuracy(logits, labels) == pytest.approx(2 / 5)


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


# -- through evaluate: a collapsed or diverged model must not win best-epoch selection -------

def _model_and_batches():
    from conure_dist.config import ModelConfig, TaskSpec
    from conure_dist.model import ConureModel

    torch.manual_seed(0)
    tasks = [TaskSpec("t1", "sequence"), TaskSpec("age", "class", num_labels=3)]
    model = ConureModel(ModelConfig(num_items=30, embed_dim=8, dilations=(1, 2), max_seq_len=6), tasks)
    seq = torch.randint(1, 31, (4, 6))
    batch = {"seq": seq, "label": torch.zeros(4, dtype=torch.long)}  # argmax picks class 0 on ties/NaN
    return model, tasks, batch


@pytest.mark.parametrize("fill", [0.0, NAN], ids=["constant", "nan"])
def test_collapsed_or_diverged_model_scores_zero(fill):
    from conure_dist.eval.evaluate import evaluate_task

    model, (t1, age), batch = _model_and_batches()
    with torch.no_grad():
        for p in [*model.heads["t1"].parameters(), *model.heads["age"].parameters()]:
            p.fill_(fill)
    seq_metrics = evaluate_task(model, t1, [batch])
    assert seq_metrics["count"] == 4
    assert seq_metrics["mrr@5"] == 0.0 and seq_metrics["hr@5"] == 0.0 and seq_metrics["ndcg@5"] == 0.0
    assert evaluate_task(model, age, [batch])["accuracy"] == 0.0


def test_constant_model_ranks_target_behind_every_real_item_but_not_padding():
    from conure_dist.eval.evaluate import MetricSums, score_batch

    model, (t1, _), batch = _model_and_batches()
    with torch.no_grad():
        for p in model.heads["t1"].parameters():
            p.zero_()
    sums = MetricSums("ranking", 30)
    score_batch(model.eval(), t1, batch, sums)
    # 31 columns: padding (-inf) never counts, the 29 other items tie -> rank 30 for every row
    assert sums.hits == [0] * 29 + [4] and sums.count == 4
