"""The product's promise: a committed task's outputs never change (and naive fine-tuning breaks it)."""

import pytest
import torch
from synthetic_batches import make_data, model_config, task_outputs, task_plans

from conure_dist.model import ConureModel
from conure_dist.train.plan import Step
from conure_dist.train.runner import run_in_process

PROBE = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15, 16, 17, 18], [0, 0, 0, 0, 0, 31, 32, 33]])


def run_and_record(method, backbone="nextitnet", optimizer="adam"):
    """Run t1 -> clicks -> age; record each task's outputs on PROBE at its commit."""
    cfg, plans = model_config(backbone), task_plans(optimizer=optimizer, weight_decay=0.05)
    torch.manual_seed(0)
    model = ConureModel(cfg, [p.spec for p in plans])
    at_commit = {}

    def record(planned, state):
        if planned.step is Step.COMMIT:
            owners = state.owners if method == "conure" else None
            at_commit[planned.task] = task_outputs(model, state.weights, owners, planned.task, PROBE)

    run = run_in_process(cfg, plans, make_data(), method=method, on_step_done=record, model=model)
    owners = run.state.owners if method == "conure" else None
    at_end = {t: task_outputs(model, run.state.weights, owners, t, PROBE) for t in at_commit}
    return run, at_commit, at_end


@pytest.mark.parametrize("backbone,optimizer", [("nextitnet", "adam"), ("nextitnet", "adamw"), ("transformer", "adamw")])
def test_conure_serves_committed_tasks_bit_for_bit(backbone, optimizer):
    run, at_commit, at_end = run_and_record("conure", backbone, optimizer)
    assert set(at_commit) == {"t1", "clicks", "age"}
    for task in ("t1", "clicks"):
        assert torch.equal(at_commit[task], at_end[task]), f"{task} outputs changed after later tasks"
    # The accuracy matrix repeats each earlier task's metric exactly after every later commit.
    rows = run.state.accuracy
    for task in ("t1", "clicks"):
        values = {r["after_task"]: r["value"] for r in rows if r["task"] == task and r["metric"] in ("mrr@5",)}
        assert len(set(values.values())) == 1, values
    # Every stage took steps under the frozen guard, which fails a stage on any moved frozen entry.
    assert len(run.executor.progress) == 6 and all(p.step > 0 for p in run.executor.progress.values())
    # Later tasks really trained: they own capacity and the backbone changed.
    cap = run.state.owners.capacity()
    assert cap.fraction(2) > 0 and cap.fraction(3) > 0


def test_naive_sequential_finetuning_forgets():
    """SinMoAll (no masks) changes T1's outputs: the test above can fail."""
    _, at_commit, at_end = run_and_record("sinmoall")
    assert not torch.equal(at_commit["t1"], at_end["t1"])
    assert not torch.equal(at_commit["clicks"], at_end["clicks"])


def test_tasks_learn_something():
    run = run_in_process(model_config(), task_plans(epochs=6), make_data(num_users=200))
    final = {(r["task"], r["metric"]): r["value"] for r in run.state.accuracy if r["after_task"] == "age"}
    # Chance levels: MRR@5 over 40 items ~ 0.06, over 12 labels ~ 0.19, accuracy over 3 classes ~ 0.33.
    assert final[("t1", "mrr@5")] > 0.5
    assert final[("clicks", "mrr@5")] > 0.25
    assert final[("age", "accuracy")] > 0.6
