"""The in-process runner's data: a fresh, seeded grouping of rows every epoch, and popularity
counted on the train batches when none is given."""

import numpy as np
import pytest
import torch

import conure_dist.train.runner as runner
from conure_dist.model import ConureModel, Stage
from conure_dist.train.loop import StageProgress
from conure_dist.train.samplers import lambdafm_sampler, log_uniform_sampler
from synthetic_batches import NUM_ITEMS, make_data, model_config, task_plans


def captured_stage(monkeypatch, task: str, stage=Stage.TRAIN, data=None):
    """Run ``InProcessExecutor.train`` for one task with run_stage replaced by a recorder."""
    plans = task_plans()
    plan = next(p for p in plans if p.spec.name == task)
    model = ConureModel(model_config(), [p.spec for p in plans])
    seen = {}

    def fake_run_stage(**kwargs):
        seen.update(kwargs)
        return StageProgress(), model.weights()

    monkeypatch.setattr(runner, "run_stage", fake_run_stage)
    executor = runner.InProcessExecutor(model, data or make_data())
    number = model.task_number(task)
    owners = None if number == 1 else model.new_owner_map().prune(model.weights(), 1, 0.6)
    executor.train(plan, number, stage, model.weights(), owners)
    return plan, seen


def compositions(batches):
    return [frozenset(b["user"].tolist()) for b in batches]


def test_every_epoch_regroups_the_rows_and_the_seed_reproduces_it(monkeypatch):
    plan, seen = captured_stage(monkeypatch, "clicks")
    epoch0, epoch1 = list(seen["train_batches"](0)), list(seen["train_batches"](1))
    train = make_data()["clicks"].train
    all_users = sorted(torch.cat([b["user"] for b in train]).tolist())
    for epoch in (epoch0, epoch1):
        assert sorted(torch.cat([b["user"] for b in epoch]).tolist()) == all_users  # every row once
        assert all(b["seq"].shape[0] <= plan.train.batch_size for b in epoch)
        assert len(epoch) == -(-len(all_users) // plan.train.batch_size)
    assert set(compositions(epoch0)) != set(compositions(epoch1))  # other rows share a batch
    assert set(compositions(epoch0)) != set(compositions(train))
    # Rows keep their own sequence and label.
    by_user = {int(u): (s, l) for b in train for u, s, l in zip(b["user"], b["seq"], b["label"])}
    for b in epoch1:
        for u, s, l in zip(b["user"], b["seq"], b["label"]):
            assert torch.equal(by_user[int(u)][0], s) and int(by_user[int(u)][1]) == int(l)
    # The same seed, task, stage and epoch: the same batches; another stage: another order.
    _, again = captured_stage(monkeypatch, "clicks")
    for a, b in zip(epoch1, again["train_batches"](1)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    _, retrain = captured_stage(monkeypatch, "clicks", Stage.RETRAIN)
    assert compositions(retrain["train_batches"](1)) != compositions(epoch1)


def test_batches_follow_the_task_batch_size_and_drop_padding_rows():
    rows = runner.concat_batches([
        {"user": torch.tensor([0, 1]), "seq": torch.tensor([[1, 2, 3], [0, 4, 5]])},
        {"user": torch.tensor([2, -1]), "seq": torch.tensor([[6, 7], [0, 0]])},  # narrower, one padding row
    ])
    assert rows["user"].tolist() == [0, 1, 2]
    assert rows["seq"].tolist() == [[1, 2, 3], [0, 4, 5], [0, 6, 7]]
    sizes = [b["user"].numel() for b in runner.epoch_batches(rows, 2, seed=5)]
    assert sizes == [2, 1]
    seeds = {runner.shuffle_seed(0, n, s, e) for n in (1, 2) for s in (Stage.TRAIN, Stage.RETRAIN) for e in (0, 1)}
    assert len(seeds) == 8


def test_popularity_is_counted_on_the_train_batches_when_not_given(monkeypatch):
    _, seen = captured_stage(monkeypatch, "t1")
    train = make_data()["t1"].train
    counts = np.bincount(torch.cat([b["seq"].reshape(-1) for b in train]).numpy(), minlength=NUM_ITEMS + 1)
    counts[0] = 0
    # The default T1 sampler is log-uniform by popularity rank, not uniform.
    expected = log_uniform_sampler(counts, exclude=(0,)).probs
    assert seen["loss_fn"].sampler.probs.tolist() == pytest.approx(expected.tolist())
    _, seen = captured_stage(monkeypatch, "clicks")
    labels = np.bincount(torch.cat([b["label"] for b in make_data()["clicks"].train]).numpy(), minlength=12)
    assert seen["loss_fn"].sampler.probs.tolist() == pytest.approx(lambdafm_sampler(labels, 0.3).probs.tolist())
    assert seen["l2_scope"] == "head"
    # Given counts are used as they are.
    data = make_data()
    data["t1"].popularity = np.r_[0, np.arange(1, NUM_ITEMS + 1)]
    _, seen = captured_stage(monkeypatch, "t1", data=data)
    assert seen["loss_fn"].sampler.probs[NUM_ITEMS] > seen["loss_fn"].sampler.probs[1]
