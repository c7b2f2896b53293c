import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conure_dist.model.heads import ItemScorer
from conure_dist.train.losses import full_softmax_loss, sampled_softmax_loss
from conure_dist.train.samplers import lambdafm_sampler, log_uniform_sampler, uniform_sampler


def test_sampled_softmax_with_whole_vocabulary_equals_full_softmax():
    torch.manual_seed(0)
    scorer = ItemScorer(6, 21)  # ids 0..20, 0 = padding
    h, targets = torch.randn(9, 6), torch.randint(1, 21, (9,))
    everything = torch.arange(1, 21)
    zeros = torch.zeros(20)
    sampled = sampled_softmax_loss(h, targets, scorer, everything, zeros, torch.zeros(9))
    assert sampled.item() == pytest.approx(full_softmax_loss(h, targets, scorer).item(), rel=1e-6)
    # A constant log-Q (uniform sampling of the whole vocabulary) cancels out too.
    const = torch.full((20,), math.log(3.0))
    assert sampled_softmax_loss(h, targets, scorer, everything, const, torch.full((9,), math.log(3.0))).item() == pytest.approx(sampled.item(), rel=1e-6)


def test_log_q_correction_on_a_hand_case():
    scorer = ItemScorer(1, 4)
    with torch.no_grad():
        scorer.weight.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
        scorer.bias.zero_()
    h, target = torch.tensor([[1.0]]), torch.tensor([1])
    sampled = torch.tensor([2, 3, 1])  # id 1 is an accidental hit and must be removed
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.1]))
    loss = sampled_softmax_loss(h, target, scorer, sampled, log_q, torch.log(torch.tensor([0.1])))
    # logits: true 1 - log 0.1; negatives 2 - log 0.5, 3 - log 0.25
    logits = torch.tensor([1 - math.log(0.1), 2 - math.log(0.5), 3 - math.log(0.25)])
    assert loss.item() == pytest.approx(-F.log_softmax(logits, 0)[0].item(), rel=1e-6)


def test_samplers_follow_their_distributions():
    g = torch.Generator().manual_seed(0)
    uni = uniform_sampler(11, exclude=(0,))
    draws = uni.sample(50_000, g)
    assert draws.min() >= 1 and draws.max() <= 10
    assert np.allclose(np.bincount(draws.numpy(), minlength=11)[1:] / 50_000, 0.1, atol=0.01)
    assert uni.log_expected_count(torch.tensor([3]), 20).item() == pytest.approx(math.log(20 * 0.1))
    pop = np.array([0, 5, 50, 1, 20])  # rank: id2, id4, id1, id3
    lu = log_uniform_sampler(pop, exclude=(0,))
    expected = [(math.log(r + 2) - math.log(r + 1)) / math.log(5) for r in range(4)]
    assert lu.probs[[2, 4, 1, 3]].tolist() == pytest.approx(expected)
    assert lu.probs[0] == 0
    lf = lambdafm_sampler(np.array([10, 30, 20]), rho=0.3)
    w = [math.exp(-(r + 1) / (0.3 * 3)) for r in range(3)]
    assert lf.probs[[1, 2, 0]].tolist() == pytest.approx([x / sum(w) for x in w])
