"""A stage run through a real DeepSpeed engine (one process, no Ray) keeps frozen entries exact."""

import os
import socket

import pytest
import torch

from conure_dist.config import TaskSpec, TrainConfig
from conure_dist.model import ConureModel, Stage, merge_stage_weights
from conure_dist.train.engine import DeepSpeedStepper, EngineSettings
from conure_dist.train.loop import run_stage
from conure_dist.train.losses import make_loss
from synthetic_batches import make_data, model_config


def free_port() -> int:
    with socket.socket() as s:  # a fixed port collides with any other run of this suite on the machine
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def single_process_group():
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "DS_ACCELERATOR": "cpu"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deepspeed_stage_leaves_frozen_entries_bit_for_bit(zero_stage, precision):
    torch.manual_seed(0)
    tasks = [TaskSpec("t1", "sequence"), TaskSpec("clicks", "item", num_labels=12)]
    model = ConureModel(model_config(), tasks)
    committed = model.weights()
    owners = model.new_owner_map().prune(committed, 1, 0.6)
    committed = {**committed, **owners.release_unowned(committed)}
    model.load_weights(committed)
    model.set_view(owners, "clicks", Stage.TRAIN)
    cfg = TrainConfig(lr=5e-2, optimizer="adamw", weight_decay=0.1, l2=1e-3, batch_size=16)
    stepper = DeepSpeedStepper(model, cfg, EngineSettings(zero_stage, precision, 16))
    data = make_data()["clicks"]
    progress, best = run_stage(
        model=model, stepper=stepper, loss_fn=make_loss(tasks[1], cfg, 40, None),
        train_batches=lambda epoch: data.train, validate=None, metric="mrr@5", epochs=2, patience=2,
        l2=cfg.l2, snapshot=stepper.fp32_weights,
    )
    assert progress.step == 2 * len(data.train)  # and the guard, which raises on a moved entry, stayed quiet
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    merged = merge_stage_weights(committed, best, owners, "clicks", 2, Stage.TRAIN, compute_dtype=dtype)
    changed = 0
    for name in owners.names:
        t1 = owners.owner(name) == 1
        assert torch.equal(merged[name][t1], committed[name][t1])  # exact fp32 committed values
        changed += int((merged[name][~t1] != committed[name][~t1]).sum())
    assert changed > 0  # the free weights did train
    assert torch.equal(merged["heads.t1.weight"], committed["heads.t1.weight"])
    assert not torch.equal(merged["heads.clicks.weight"], committed["heads.clicks.weight"])
    if precision == "bf16":  # trained entries come from the fp32 master copy, not the bf16 weights
        name = owners.names[0]
        free = owners.owner(name) == 0
        assert not torch.equal(merged[name][free], merged[name][free].bfloat16().float())


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_a_closed_stepper_releases_its_engine_for_the_next_stage_in_the_same_worker(zero_stage):
    """Session workers run stage after stage in one process: ZeRO-1/2's gradient hooks keep an
    engine (optimizer state, partitions, model) alive after the stage unless it is destroyed."""
    import gc
    import weakref

    model = ConureModel(model_config(), [TaskSpec("t1", "sequence")])
    stepper = DeepSpeedStepper(model, TrainConfig(batch_size=8), EngineSettings(zero_stage, "fp32", 8))
    engine, optimizer = weakref.ref(stepper.engine), weakref.ref(stepper.engine.optimizer)
    stepper.close()
    del stepper, model
    gc.collect()
    assert engine() is None and optimizer() is None


def test_memory_milestones_never_report_a_peak_below_an_earlier_one(monkeypatch):
    """The kernel's resident counters are approximate: its peak can read under an earlier
    milestone's. A milestone's "peak so far" must still never fall within a stage."""
    from conure_dist.train import worker

    readings = iter([(552_148_992, 552_148_992), (552_000_000, 552_046_592), (553_000_000, 553_100_000)])
    now = {}
    monkeypatch.setattr(worker, "rss_bytes", lambda: now["rss"])
    monkeypatch.setattr(worker, "peak_rss_bytes", lambda: now["peak"])
    timing = {}
    for name in ("model", "engine", "first_step"):
        now["rss"], now["peak"] = next(readings)
        worker._milestone(timing, name)
    peaks = [timing["memory_milestones"][k]["peak_rss_bytes"] for k in ("model", "engine", "first_step")]
    assert peaks == [552_148_992, 552_148_992, 553_100_000]
    assert timing["memory_milestones"]["engine"]["rss_bytes"] == 552_000_000  # the reading itself is kept
