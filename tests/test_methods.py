"""Every method of the comparison runs through the same stage machine; each keeps the weights it
promises to keep and serves each task from the weights it claims."""

import pytest
import torch
from synthetic_batches import make_data, model_config, task_outputs, task_plans

from conure_dist.model import Stage
from conure_dist.model.freeze import stage_trainable
from conure_dist.train.plan import METHODS, Step, get_method
from conure_dist.train.runner import build_model, run_in_process

PROBE = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15, 16, 17, 18]])


def run_method(name, **kw):
    cfg, plans = model_config(), task_plans(**kw)
    at_commit = {}
    holder = {}

    def record(planned, state):
        if planned.step is Step.COMMIT:
            at_commit[planned.task] = _outputs(holder["model"], state, name, planned.task)

    method = get_method(name)
    model = build_model(cfg, [p.spec for p in plans], method, 0)
    holder["model"] = model
    run = run_in_process(cfg, plans, make_data(), method=name, on_step_done=record, model=model)
    return run, at_commit


def _outputs(model, state, name, task):
    owners = state.owners if get_method(name).masking else None
    return task_outputs(model, state.serving(task), owners, task, PROBE)


def test_every_method_trains_every_task():
    for name in METHODS:
        run, at_commit = run_method(name, epochs=1)
        assert set(at_commit) == {"t1", "clicks", "age"}, name
        after_last = {r["task"] for r in run.state.accuracy if r["after_task"] == "age"}
        assert after_last == {"t1", "clicks", "age"}, name


@pytest.mark.parametrize("name", ["sinmo", "fineall", "mtl", "dnn"])
def test_per_task_methods_serve_each_task_from_its_own_weights(name):
    run, at_commit = run_method(name, epochs=2)
    sets = run.state.sets
    assert set(sets) == {"t1", "clicks", "age"}
    # Three different backbones, and every task's outputs at the end are those at its commit.
    conv = [k for k in sets["t1"] if k.startswith("backbone.") and k.endswith(".weight")][0]
    assert not torch.equal(sets["t1"][conv], sets["clicks"][conv])
    assert not torch.equal(sets["clicks"][conv], sets["age"][conv])
    for task, out in at_commit.items():
        assert torch.equal(out, _outputs(run.model, run.state, name, task)), task
    if name == "fineall":  # later tasks start from T1's committed weights, not from the previous task's
        assert run.executor.progress["age/train"].step > 0
    if name == "dnn":
        assert type(run.model.backbone).__name__ == "BagOfItems"


@pytest.mark.parametrize("name", ["finesmax", "peterrec"])
def test_frozen_backbone_methods_keep_t1_bit_for_bit(name):
    run, at_commit = run_method(name, epochs=2)
    assert run.state.sets == {}
    for task, out in at_commit.items():  # one shared weight set, and no task changed an earlier one
        assert torch.equal(out, _outputs(run.model, run.state, name, task)), task
    if name == "peterrec":
        patches = [k for k in run.state.weights if k.startswith("patches.clicks.")]
        assert patches and all(k.split(".")[1] in ("clicks", "age") for k in run.state.weights if k.startswith("patches."))
        up = [k for k in patches if ".up.weight" in k]
        assert any(run.state.weights[k].abs().sum() > 0 for k in up), "the patches did not train"


def test_sinmoall_forgets_and_conure_measures_before_pruning():
    run, at_commit = run_method("sinmoall", epochs=2)
    assert not torch.equal(at_commit["t1"], _outputs(run.model, run.state, "sinmoall", "t1"))
    cfg, plans = model_config(), task_plans(epochs=2)
    conure = run_in_process(cfg, plans, make_data(), method="conure", measure_before_prune=True)
    assert {r["task"] for r in conure.state.before_prune} == {"t1", "clicks", "age"}


def test_scopes_of_later_tasks():
    cfg, plans = model_config(), task_plans()
    model = build_model(cfg, [p.spec for p in plans], get_method("peterrec"), 0)
    conv = next(n for n, _ in model.named_parameters() if n.startswith("backbone.blocks.0.conv1.weight"))
    assert stage_trainable(conv, None, "clicks", 2, Stage.TRAIN, "all") is True
    assert stage_trainable(conv, None, "clicks", 2, Stage.TRAIN, "head") is False
    assert stage_trainable(conv, None, "clicks", 2, Stage.TRAIN, "patches") is False
    assert stage_trainable(conv, None, "t1", 1, Stage.TRAIN, "all") is True
    assert stage_trainable("heads.t1.bias", None, "clicks", 2, Stage.TRAIN, "joint", "t1") is True
    assert stage_trainable("heads.t1.bias", None, "clicks", 2, Stage.TRAIN, "all", "t1") is False
    assert stage_trainable("patches.clicks.0.first.up.weight", None, "clicks", 2, Stage.TRAIN, "patches") is True
    assert stage_trainable("patches.clicks.0.first.up.weight", None, "age", 3, Stage.TRAIN, "patches") is False
    model.set_view(None, "clicks", Stage.TRAIN, "patches")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("patches.clicks.", "heads.clicks.")) for n in trainable)


def test_mtl_is_refused_on_ray_before_anything_starts(tmp_path, capsys):
    from conure_dist.jobs import ttl
    from conure_dist.launch import main_guard

    code = main_guard(ttl.main, ["--demo", "--method", "mtl", "--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert "mtl" in capsys.readouterr().err and not (tmp_path / "run").exists()
