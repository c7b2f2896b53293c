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
    h.requires_grad_(True)
    sampled = sampled_softmax_loss(h, targets, scorer, everything, zeros, torch.zeros(9))
    full = full_softmax_loss(h, targets, scorer)
    assert sampled.item() == pytest.approx(full.item(), rel=1e-6)
    # And the gradients (the hits set to -inf in place must not leak into them).
    for got, want in zip(torch.autograd.grad(sampled, (h, scorer.weight, scorer.bias), retain_graph=True),
                         torch.autograd.grad(full, (h, scorer.weight, scorer.bias), retain_graph=True)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
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


# --- L2 scope and the T1 sampler -----------------------------------------------------------

from conure_dist.config import ConfigError, ModelConfig, TaskSpec, TrainConfig  # noqa: E402
from conure_dist.model import ConureModel, Stage  # noqa: E402
from conure_dist.train.losses import l2_parameters, l2_penalty, make_loss  # noqa: E402

TASKS = [TaskSpec("t1", "sequence"), TaskSpec("clicks", "item", num_labels=12), TaskSpec("age", "class", num_labels=3)]


def _model(backbone="nextitnet"):
    torch.manual_seed(0)
    model = ConureModel(ModelConfig(num_items=40, embed_dim=8, dilations=(1, 2), backbone=backbone, max_seq_len=8), TASKS)
    with torch.no_grad():  # LayerNorm gains at 1 and zero biases would hide a wrong scope
        for p in model.parameters():
            p.add_(0.5)
    return model


def _after_t1(model, task):
    owners = model.new_owner_map().prune(model.weights(), 1, 0.6)
    model.set_view(owners, task, Stage.TRAIN)
    return owners


def _sum_sq(*tensors):
    return sum(t.detach().float().pow(2).sum().item() for t in tensors)


def _penalty(model, l2, **kw):
    return l2_penalty(model, l2, **kw).detach().item()


def test_default_l2_scope_is_the_task_head_and_t1_has_none():
    model = _model()
    model.set_view(model.new_owner_map(), "t1", Stage.TRAIN)
    assert TrainConfig().l2_scope == "head"
    assert l2_penalty(model, 0.02) is None  # no L2 in T1, LayerNorms and all
    _after_t1(model, "clicks")
    assert _penalty(model, 0.02) == pytest.approx(0.5 * 0.02 * _sum_sq(model.heads["clicks"].weight), rel=1e-5)
    model.set_view(model.new_owner_map().prune(model.weights(), 1, 0.6), "age", Stage.RETRAIN)
    assert _penalty(model, 0.02) == pytest.approx(0.5 * 0.02 * _sum_sq(model.heads["age"].linear.weight), rel=1e-5)
    assert l2_penalty(model, 0.02, scope="none") is None and l2_penalty(model, 0.0) is None


@pytest.mark.parametrize("backbone", ["nextitnet", "transformer"])
def test_trainable_scope_leaves_out_norms_biases_and_tables(backbone):
    model = _model(backbone)
    names = {n for n, _ in l2_parameters(model, "trainable")}
    assert names and all(n.endswith("weight") for n in names)
    modules = dict(model.named_modules())
    for n in names:
        owner = modules[n.rsplit(".", 1)[0]]
        assert not isinstance(owner, torch.nn.LayerNorm), n
    assert not {"backbone.embedding.weight", "backbone.position", "heads.t1.weight"} & names
    assert {"heads.clicks.weight", "heads.age.linear.weight"} <= names
    model.set_view(model.new_owner_map(), "t1", Stage.TRAIN)
    prunable = [p for n, p in model.named_parameters() if n in model.prunable_shapes()]
    assert _penalty(model, 0.1, scope="trainable") == pytest.approx(0.5 * 0.1 * _sum_sq(*prunable), rel=1e-5)
    # A later task: only its free backbone entries and its own head.
    owners = _after_t1(model, "clicks")
    free = [p[owners.owner(n) == 0] for n, p in model.named_parameters() if n in owners.names]
    expected = 0.5 * 0.1 * _sum_sq(*free, model.heads["clicks"].weight)
    assert _penalty(model, 0.1, scope="trainable") == pytest.approx(expected, rel=1e-5)


def test_l2_scope_is_validated():
    for scope in ("head", "trainable", "none"):
        assert TrainConfig(l2_scope=scope).l2_scope == scope
    with pytest.raises(ConfigError, match="train.l2_scope"):
        TrainConfig(l2_scope="all")
    with pytest.raises(ValueError, match="L2 scope"):
        l2_penalty(_model(), 0.1, scope="everything")


def test_sequence_task_samples_log_uniformly_by_default():
    assert TrainConfig().sampler == "log_uniform"
    popularity = np.r_[0, np.arange(40, 0, -1)]  # item 1 the most popular
    loss = make_loss(TASKS[0], TrainConfig(), 40, popularity)
    probs = loss.sampler.probs
    assert probs[0] == 0 and probs[1] > 10 * probs[40]
    assert probs.tolist() == pytest.approx(log_uniform_sampler(popularity, exclude=(0,)).probs.tolist())
    uniform = make_loss(TASKS[0], TrainConfig(sampler="uniform"), 40, None).sampler.probs
    assert uniform[1:].tolist() == pytest.approx([1 / 40] * 40)
    with pytest.raises(ValueError, match="popularity"):
        make_loss(TASKS[0], TrainConfig(), 40, None)


def test_distinct_draws_give_the_softmax_of_every_draw():
    """Scoring each distinct draw once with + log(count) is the loss (and gradient) of one column
    per draw: checked against the per-draw form on the same draws."""
    import numpy as np

    from conure_dist.config import ModelConfig, TaskSpec, TrainConfig
    from conure_dist.model import ConureModel, Stage
    from conure_dist.train.losses import make_loss, next_item_pairs

    torch.manual_seed(0)
    model = ConureModel(ModelConfig(num_items=60, embed_dim=8, dilations=(1, 2)), [TaskSpec("t1", "sequence")])
    model.set_view(None, "t1", Stage.TRAIN)
    popularity = np.concatenate([[0], np.arange(60, 0, -1)])
    loss = make_loss(TaskSpec("t1", "sequence"), TrainConfig(sample_ratio=0.5), 60, popularity)
    batch = {"seq": torch.randint(1, 61, (6, 9))}
    now = loss(model, batch, torch.Generator().manual_seed(1))
    grad_now = torch.autograd.grad(now, model.heads["t1"].weight)[0]
    draws = loss.sampler.sample(loss.num_sampled, torch.Generator().manual_seed(1))
    assert torch.unique(draws).numel() < draws.numel()  # the case that matters: repeated draws
    h, targets = next_item_pairs(model, batch["seq"])
    every = sampled_softmax_loss(h, targets, model.heads["t1"], draws, loss.sampler.log_expected_count(draws, 30),
                                 loss.sampler.log_expected_count(targets, 30))
    grad_every = torch.autograd.grad(every, model.heads["t1"].weight)[0]
    assert now.item() == pytest.approx(every.item(), rel=1e-5)
    torch.testing.assert_close(grad_now, grad_every, rtol=1e-4, atol=1e-6)


def test_accidental_hits_are_every_matching_pair_repeats_included():
    from conure_dist.train.losses import accidental_hits

    sampled = torch.tensor([7, 3, 9, 3, 1, 7, 7])
    targets = torch.tensor([3, 5, 7, 1, 3])
    rows, cols = accidental_hits(sampled, targets)
    got = sorted(zip(rows.tolist(), cols.tolist()))
    want = sorted((r, c) for r in range(5) for c in range(7) if sampled[c] == targets[r])
    assert got == want and len(want) == 8
    empty = accidental_hits(torch.tensor([2, 4]), torch.tensor([1, 3]))
    assert empty[0].numel() == 0 and empty[1].numel() == 0


@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16 module"])
def test_score_shared_adds_the_shift_in_fp32_in_every_precision(mode):
    torch.manual_seed(0)
    scorer, h = ItemScorer(8, 50), torch.randn(6, 8)
    labels, shift = torch.tensor([3, 7, 1, 40]), torch.randn(4) * 5
    want = h @ scorer.weight[labels].T + scorer.bias[labels] + shift
    if mode == "bf16 module":
        scorer, h = scorer.to(torch.bfloat16), h.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        got = scorer.score_shared(h, labels, shift=shift)
        unshifted = scorer.score_shared(h, labels)
    assert got.dtype == torch.float32 and got.shape == (6, 4)
    torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-5 if mode == "fp32" else 0.15)
    torch.testing.assert_close(unshifted.float() + shift, got, rtol=0, atol=1e-5)


def test_the_fused_log_sum_exp_equals_autograds_and_survives_a_row_of_hits_only():
    """:class:`SharedLogSumExp` (fp32, one buffer) against the same function written with
    autograd's addmm, index_put_ and logsumexp: values and every gradient."""
    from conure_dist.train.losses import SharedLogSumExp

    torch.manual_seed(0)
    h, w, b = torch.randn(5, 8, requires_grad=True), torch.randn(7, 8, requires_grad=True), torch.randn(7, requires_grad=True)
    rows, cols = torch.tensor([0, 0, 2] + [4] * 7), torch.tensor([1, 5, 3, 0, 1, 2, 3, 4, 5, 6])  # row 4: every column
    upstream = torch.randn(5)

    fused = SharedLogSumExp.apply(h, w, b, rows, cols)
    logits = torch.addmm(b, h, w.t())
    logits = logits.index_put((rows, cols), torch.tensor(float("-inf")))
    want = torch.logsumexp(logits, dim=1)
    torch.testing.assert_close(fused[:4], want[:4], rtol=1e-6, atol=1e-6)
    assert fused[4].item() == float("-inf") == want[4].item()
    got = torch.autograd.grad((fused[:4] * upstream[:4]).sum(), (h, w, b))
    expected = torch.autograd.grad((want[:4] * upstream[:4]).sum(), (h, w, b))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)

    # A row of hits only (lse -inf) gives no NaN: its loss term is 0 and so is its gradient.
    again = SharedLogSumExp.apply(h, w, b, rows, cols)
    true = torch.zeros(5)
    loss = (torch.logaddexp(true, again) - true).sum()
    assert torch.isfinite(loss)
    grads = torch.autograd.grad(loss, (h, w, b), retain_graph=True)
    assert all(torch.isfinite(g).all() for g in grads) and grads[0][4].abs().sum() == 0
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        torch.autograd.grad(loss, (h, w, b))


@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16 module"])
def test_the_sampled_loss_fuses_its_log_sum_exp_in_fp32_only(mode, monkeypatch):
    """fp32 takes :class:`SharedLogSumExp`; autocast and bf16 modules keep autograd's
    log-sum-exp, and give the fp32 loss within bf16's precision."""
    from conure_dist.train import losses

    calls = []
    fused = losses.SharedLogSumExp.apply
    monkeypatch.setattr(losses.SharedLogSumExp, "apply", lambda *a: calls.append(1) or fused(*a))
    torch.manual_seed(0)
    scorer, h = ItemScorer(8, 50), torch.randn(6, 8)
    targets, sampled = torch.tensor([3, 7, 1, 40, 2, 9]), torch.tensor([1, 5, 7, 11])
    log_q, log_q_targets = torch.randn(4), torch.randn(6)
    reference = losses.sampled_softmax_loss(h, targets, scorer, sampled, log_q, log_q_targets)
    assert calls == [1]
    calls.clear()
    if mode == "bf16 module":
        scorer, h = scorer.to(torch.bfloat16), h.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        loss = losses.sampled_softmax_loss(h, targets, scorer, sampled, log_q, log_q_targets)
    assert calls == ([1] if mode == "fp32" else [])
    assert loss.item() == pytest.approx(reference.item(), rel=0 if mode == "fp32" else 0.05)
