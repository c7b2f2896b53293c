"""A stage stopped inside an epoch and resumed from its checkpoint takes exactly the steps an
uninterrupted stage takes; a non-finite loss stops the stage with the task, stage and step."""

import copy

import pytest
import torch

from conure_dist.config import TaskSpec, TrainConfig
from conure_dist.eval.evaluate import evaluate_task
from conure_dist.model import ConureModel, Stage
from conure_dist.train.loop import NonFiniteLoss, StageProgress, TorchStepper, run_stage
from conure_dist.train.losses import make_loss
from synthetic_batches import NUM_ITEMS, make_data, model_config

TASKS = [TaskSpec("t1", "sequence"), TaskSpec("clicks", "item", num_labels=12)]
CFG = TrainConfig(lr=1e-2, batch_size=16, sample_ratio=0.5, sampler="uniform", l2=1e-3, l2_scope="trainable")


class Stop(Exception):
    pass


def fresh_model():
    torch.manual_seed(0)
    model = ConureModel(model_config(), TASKS)
    model.set_view(None, "t1", Stage.TRAIN)
    return model


def order_of(data):
    """A different, reproducible batch order per epoch (what the data pipeline guarantees)."""
    def batches(epoch):
        perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(100 + epoch))
        return (data.train[i] for i in perm.tolist())
    return batches


def run(model, stepper, data, *, progress=None, best=None, on_step=None, max_steps=0):
    return run_stage(model=model, stepper=stepper, loss_fn=make_loss(TASKS[0], CFG, NUM_ITEMS, None),
                     train_batches=order_of(data), validate=lambda: evaluate_task(model, TASKS[0], data.validation),
                     metric="mrr@5", epochs=3, patience=5, l2=CFG.l2, l2_scope=CFG.l2_scope, seed=11,
                     progress=progress, best=best, on_step=on_step, name="task t1, train stage", max_steps=max_steps)


def test_resuming_inside_an_epoch_equals_the_uninterrupted_stage():
    data = make_data()["t1"]
    steps_per_epoch = len(data.train)
    model = fresh_model()
    stepper = TorchStepper(model.trainable_parameters(), CFG)
    whole, whole_best = run(model, stepper, data)
    reference = model.weights()

    # Checkpoint at a step inside the second epoch, fail a few steps later.
    checkpoint_at, fail_at = steps_per_epoch + 2, steps_per_epoch + 4
    saved = {}
    model = fresh_model()
    stepper = TorchStepper(model.trainable_parameters(), CFG)

    def on_step(p, loss):
        if p.step == checkpoint_at:
            saved.update(model=copy.deepcopy(model.state_dict()), opt=copy.deepcopy(stepper.optimizer.state_dict()),
                         progress=copy.deepcopy(p))
        if p.step == fail_at:
            raise Stop

    with pytest.raises(Stop):
        run(model, stepper, data, on_step=on_step)
    assert saved["progress"].epoch == 1 and saved["progress"].epoch_step == 2

    # A new process: model and optimizer from the checkpoint, the stage continues.
    model = fresh_model()
    model.load_state_dict(saved["model"])
    stepper = TorchStepper(model.trainable_parameters(), CFG)
    stepper.optimizer.load_state_dict(saved["opt"])
    progress = StageProgress.from_dict(saved["progress"].to_dict())
    # The best weights so far were those of epoch 1 (the only one validated before the checkpoint).
    resumed, resumed_best = run(model, stepper, data, progress=progress, best=None)
    assert resumed.step == whole.step == 3 * steps_per_epoch
    final = model.weights()
    assert all(torch.equal(final[k], reference[k]) for k in reference), "resumed stage differs from the uninterrupted one"
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert resumed.best_epoch == whole.best_epoch


def test_each_epoch_sees_its_own_sampler_draws_and_a_rerun_step_the_same():
    from conure_dist.train.loop import step_seed

    assert step_seed(1, 0, 5) != step_seed(1, 1, 5) != step_seed(1, 0, 6)
    assert step_seed(1, 2, 3) == step_seed(1, 2, 3)


def test_a_non_finite_loss_stops_the_stage_naming_task_stage_and_step():
    data = make_data()["t1"]
    model = fresh_model()
    stepper = TorchStepper(model.trainable_parameters(), CFG)
    calls = {"n": 0}
    real = make_loss(TASKS[0], CFG, NUM_ITEMS, None)

    def diverging(model, batch, generator):
        calls["n"] += 1
        loss = real(model, batch, generator)
        return loss * float("nan") if calls["n"] == 3 else loss

    with pytest.raises(NonFiniteLoss, match=r"task t1, train stage: the loss became nan at step 3 \(epoch 1"):
        run_stage(model=model, stepper=stepper, loss_fn=diverging, train_batches=order_of(data), validate=None,
                  metric="mrr@5", epochs=1, patience=1, name="task t1, train stage")


def test_max_steps_ends_the_stage_inside_an_epoch_validated_and_a_resume_keeps_the_limit():
    data = make_data()["t1"]
    steps_per_epoch = len(data.train)
    limit = steps_per_epoch + 2  # inside the second epoch
    model = fresh_model()
    progress, _ = run(model, TorchStepper(model.trainable_parameters(), CFG), data, max_steps=limit)
    assert progress.step == limit and progress.step_limited and progress.finished(3)
    assert progress.epoch == 2 and len(progress.history) == 2  # the cut epoch was validated and counted
    assert "val_mrr@5" in progress.history[-1]
    for h in progress.history:  # the time spent waiting for batches is part of the steps' time
        assert 0 <= h["data_wait_s"] <= h["train_s"] <= h["seconds"]
    limited = model.weights()

    # Stopped at a step before the limit and resumed: the same steps, then the same stop.
    saved = {}
    model = fresh_model()
    stepper = TorchStepper(model.trainable_parameters(), CFG)

    def on_step(p, loss):
        if p.step == steps_per_epoch + 1:  # inside the epoch the limit cuts
            saved.update(model=copy.deepcopy(model.state_dict()), opt=copy.deepcopy(stepper.optimizer.state_dict()),
                         progress=copy.deepcopy(p))
            raise Stop

    with pytest.raises(Stop):
        run(model, stepper, data, on_step=on_step, max_steps=limit)
    model = fresh_model()
    model.load_state_dict(saved["model"])
    stepper = TorchStepper(model.trainable_parameters(), CFG)
    stepper.optimizer.load_state_dict(saved["opt"])
    resumed, _ = run(model, stepper, data, progress=StageProgress.from_dict(saved["progress"].to_dict()), max_steps=limit)
    assert resumed.step == limit and resumed.step_limited
    final = model.weights()
    assert all(torch.equal(final[k], limited[k]) for k in limited)
    # A finished, step-limited stage has nothing left to run.
    again, _ = run(model, stepper, data, progress=StageProgress.from_dict(resumed.to_dict()), max_steps=limit)
    assert again.step == limit and len(again.history) == 2
