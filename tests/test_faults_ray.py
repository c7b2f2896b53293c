"""Faults on the real path (Ray Data -> Ray Train -> DeepSpeed): a training worker killed by
SIGKILL in the middle of a stage (no exception, no cleanup, as the OOM killer does it).

Ray Train restarts the worker group from the stage's last checkpoint; the steps lost are at
most the checkpoint interval, and the run's results are bit for bit those of the same run
without the fault.
"""

import dataclasses
import os
import time

import pytest

from conure_dist.config import ClusterConfig, ExperimentConfig, ModelConfig, TaskPlan, TaskSpec, TrainConfig
from conure_dist.data.synthetic import SyntheticConfig, prepare_synthetic
from conure_dist.train.invariants import check_run_invariants, same_bits
from conure_dist.train.rundir import RunDir

pytestmark = pytest.mark.slow
TINY = SyntheticConfig(num_users=400, num_items=60, seq_len=10, min_seq_len=3, num_topics=4, click_labels=20,
                       like_labels=12, rows_per_shard=120)
CHECKPOINT_EVERY = 3
KILL_AT = 8  # click/train: 6 steps an epoch (372 rows, global batch 64), so inside the second epoch


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_synthetic(TINY, path, seed=3)
    return path


def experiment(dataset):
    from conure_dist.data.format import load_dataset_info

    info = load_dataset_info(dataset)
    train = TrainConfig(lr=5e-3, optimizer="adam", batch_size=64, epochs=2, retrain_epochs=1, patience=2, sample_ratio=0.5)
    plans = (TaskPlan(TaskSpec("pretrain", "sequence", prune_ratio=0.7), dataclasses.replace(train, epochs=1)),
             TaskPlan(TaskSpec("click", "item", num_labels=info.task("click").num_labels, prune_ratio=0.8), train))
    return ExperimentConfig(dataset=dataset, model=ModelConfig(num_items=info.num_items, embed_dim=16, dilations=(1, 2)),
                            tasks=plans, seq_len=10,
                            cluster=ClusterConfig(num_workers=2, checkpoint_every_steps=CHECKPOINT_EVERY, max_failures=1,
                                                  log_every_steps=50))


def test_a_worker_killed_mid_stage_resumes_from_its_checkpoint_and_changes_nothing(dataset, ray_cluster, tmp_path):
    """Two tasks; rank 0 is killed inside click/train, after pretrain was committed. (Run once
    against the same run without the kill, every state file and metric came out bit for bit
    equal; that second run doubles this test's time, so the test checks the committed task and
    the steps lost, and the resumed stage's equality with an uninterrupted one is
    test_distributed's test_a_stage_resumed_inside_an_epoch_equals_the_uninterrupted_stage.)"""
    from conure_dist.train.coordinator import run_experiment

    exp = experiment(dataset)
    run_dir = str(tmp_path / "run")
    started = time.time()
    run_experiment(exp, run_dir, kill_once_at_step={"click-train": KILL_AT})
    seconds = round(time.time() - started, 1)
    rundir = RunDir(run_dir)
    manifest = rundir.read_json("manifest.json")
    assert manifest["ledger"] == {"pretrain": "commit", "click": "commit"}
    for key, stage in manifest["stages"].items():
        assert stage["status"] == "done" and stage["completions"] == 1 and stage["attempts"] == 1, (key, stage)
    # The kill happened, and Ray Train's second attempt resumed from the last checkpoint before it.
    progress = manifest["stages"]["click/train"]["progress"]
    assert progress["resumed_at"], "click/train never resumed: the worker was not killed"
    (resumed,) = progress["resumed_at"]
    lost = KILL_AT - resumed
    assert 0 <= lost <= CHECKPOINT_EVERY, progress
    assert progress["step"] == 12 and progress["epoch"] == 2  # every step of the stage was taken
    for key in ("pretrain/train", "pretrain/retrain", "click/retrain"):
        assert not manifest["stages"][key]["progress"]["resumed_at"], key
    # Ray Train keeps the session's latest two checkpoints (click/train's and click/retrain's final
    # ones here): a stage's record names its checkpoint only while that is kept.
    named = {key: stage["checkpoint"] for key, stage in manifest["stages"].items() if "checkpoint" in stage}
    assert "click/retrain" in named and not {"pretrain/train", "pretrain/retrain"} & set(named), named
    assert all(os.path.isfile(os.path.join(path, "result.json")) for path in named.values()), named
    # pretrain, committed before the kill: what serves it is bit for bit what it was at its commit
    # (and the owner map only gained click's entries, capacity as configured, checksums match).
    assert check_run_invariants(run_dir) == []
    committed = rundir.read_tensors("state/weights-pretrain-commit.safetensors")
    final = rundir.read_tensors(manifest["state"]["weights"])
    assert all(same_bits(committed[k], final[k]) for k in committed if k.startswith("heads.pretrain."))
    pretrain = [r for r in manifest["accuracy"] if r["task"] == "pretrain"]
    at_commit = {r["metric"]: r["value"] for r in pretrain if r["after_task"] == "pretrain"}
    assert at_commit == {r["metric"]: r["value"] for r in pretrain if r["after_task"] == "click"}
    print(f"\nworker SIGKILL at click/train step {KILL_AT}: resumed at step {resumed}, {lost} step(s) lost; "
          f"run {seconds} s")


@pytest.fixture(scope="module")
def one_stage(dataset):
    """pretrain/train alone, one worker, about 10 steps, a checkpoint every 2."""
    exp = experiment(dataset)
    pretrain = dataclasses.replace(exp.tasks[0], train=dataclasses.replace(exp.tasks[0].train, batch_size=32, epochs=1))
    return dataclasses.replace(exp, tasks=(pretrain,), cluster=dataclasses.replace(
        exp.cluster, num_workers=1, checkpoint_every_steps=2, max_failures=0))


@pytest.fixture(scope="module")
def uninterrupted(one_stage, ray_cluster, tmp_path_factory):
    from conure_dist.model import Stage
    from conure_dist.train.coordinator import open_run
    from conure_dist.train.executor import RayExecutor

    run = open_run(one_stage, str(tmp_path_factory.mktemp("whole") / "run"))
    with RayExecutor(one_stage, run.rundir, run.manifest) as executor:
        best = executor.train(one_stage.tasks[0], 1, Stage.TRAIN, run.state.weights, run.state.owners)
    return best, run.manifest.data["stages"]["pretrain/train"]["progress"]


@pytest.mark.parametrize("damaged, resumed_at", [(1, 4), (2, 0)], ids=["latest", "every"])
def test_a_damaged_stage_checkpoint_is_passed_over_for_an_earlier_intact_one(one_stage, uninterrupted, ray_cluster, tmp_path,
                                                                            damaged, resumed_at):
    """The stage fails at step 7 (no retries left); Ray Train kept its checkpoints of steps 4
    and 6. With the latest truncated, the rerun resumes from step 4; with both, it starts again
    from its input weights. Either way it ends bit for bit as the stage never interrupted."""
    from conure_dist.model import Stage
    from conure_dist.train.coordinator import open_run
    from conure_dist.train.executor import RayExecutor, StageFailed

    exp, task = one_stage, one_stage.tasks[0]
    run = open_run(exp, str(tmp_path / "run"))
    with pytest.raises(StageFailed, match="injected failure at step 7"), \
            RayExecutor(exp, run.rundir, run.manifest, fail_once_at_step={"pretrain-train": 7}) as executor:
        executor.train(task, 1, Stage.TRAIN, run.state.weights, run.state.owners)
    # Every stage's checkpoints sit in the session's directory; their names end with the stage key.
    stage_dir = run.rundir.path("ray", run.manifest.data["run_id"], "session")
    kept = sorted(d for d in os.listdir(stage_dir) if d.startswith("step-") and d.endswith("-pretrain-train"))
    assert [d.split("-")[1] for d in kept] == ["000000004", "000000006"], kept
    for name in kept[-damaged:]:
        checkpoint = os.path.join(stage_dir, name)
        assert os.path.exists(os.path.join(checkpoint, "checksums-rank0.json"))
        largest = max((os.path.join(root, f) for root, _, files in os.walk(checkpoint) for f in files), key=os.path.getsize)
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)

    run = open_run(exp, str(tmp_path / "run"))  # the same command again
    with RayExecutor(exp, run.rundir, run.manifest) as executor:
        best = executor.train(task, 1, Stage.TRAIN, run.state.weights, run.state.owners)
    progress = run.manifest.data["stages"]["pretrain/train"]["progress"]
    assert progress["resumed_at"] == [resumed_at], progress
    whole, whole_progress = uninterrupted
    assert progress["step"] == whole_progress["step"]
    differing = [k for k in whole if not same_bits(whole[k], best[k])]
    assert not differing, f"the resumed stage differs from the uninterrupted one in {differing}"
    print(f"\n{damaged} damaged checkpoint(s): resumed at step {resumed_at}, {7 - resumed_at} of the 7 steps taken "
          "before the failure taken again")
