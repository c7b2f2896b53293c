"""End to end through the real path: Parquet -> Ray Data -> Ray Train -> DeepSpeed -> coordinator.

Small sizes, real components. One TorchTrainer.fit() (the session) with two workers runs every stage.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from conftest import RAY_ENV
from synthetic_batches import task_outputs

from conure_dist.config import (
    ClusterConfig,
    ExperimentConfig,
    ModelConfig,
    TaskPlan,
    TaskSpec,
    TrainConfig,
)
from conure_dist.data.synthetic import SyntheticConfig, prepare_synthetic
from conure_dist.model import ConureModel, OwnerMap
from conure_dist.train.rundir import RunDir

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = SyntheticConfig(num_users=400, num_items=60, seq_len=10, min_seq_len=3, num_topics=4, click_labels=20,
                       like_labels=12, rows_per_shard=120)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_synthetic(TINY, path, seed=3)
    return path


def experiment(dataset, tasks=("pretrain", "click", "age")):
    from conure_dist.data.format import load_dataset_info

    info = load_dataset_info(dataset)
    train = TrainConfig(lr=5e-3, optimizer="adamw", weight_decay=0.01, l2=1e-4, batch_size=64, epochs=2,
                        retrain_epochs=1, patience=2, sample_ratio=0.5)
    ratios = {"pretrain": 0.7, "click": 0.8, "age": 0.6, "like": 0.8}
    plans = tuple(TaskPlan(TaskSpec(n, info.task(n).kind, num_labels=info.task(n).num_labels if n != "pretrain" else 0,
                                    prune_ratio=ratios[n]), train) for n in tasks)
    return ExperimentConfig(dataset=dataset, model=ModelConfig(num_items=info.num_items, embed_dim=16, dilations=(1, 2, 1, 2)),
                            tasks=plans, seq_len=10, cluster=ClusterConfig(num_workers=2, checkpoint_every_steps=2, log_every_steps=5))


def serve(exp, rundir, weights_file, task, seq):
    model = ConureModel(exp.model, [t.spec for t in exp.tasks])
    manifest = rundir.read_json("manifest.json")
    owners = OwnerMap.from_state_dict(rundir.read_tensors(manifest["state"]["owners"]))
    return task_outputs(model, rundir.read_tensors(weights_file), owners, task, seq)


def test_three_tasks_two_workers_no_forgetting_and_worker_retry(dataset, ray_cluster, tmp_path):
    from conure_dist.train.coordinator import run_experiment

    exp = experiment(dataset)
    run = run_experiment(exp, str(tmp_path / "run"), fail_once_at_step={"click-train": 3})
    rundir = RunDir(str(tmp_path / "run"))
    manifest = rundir.read_json("manifest.json")
    # Manifest complete: every step of every task done exactly once, in the plan's order.
    assert manifest["ledger"] == {"pretrain": "commit", "click": "commit", "age": "commit"}
    for task in ("pretrain", "click", "age"):
        for step in ("train", "prune", "retrain", "commit"):
            s = manifest["stages"][f"{task}/{step}"]
            assert s["status"] == "done" and s["completions"] == 1 and s["attempts"] == 1, (task, step, s)
    # The injected failure happened, and Ray Train retried the worker from its checkpoint.
    assert manifest["stages"]["click/train"]["progress"]["epoch"] == 2
    # Each stage records every worker's peak memory and the driver's.
    for key in ("pretrain/train", "age/retrain"):
        s = manifest["stages"][key]
        assert len(s["peak_rss_bytes"]) == 2 and all(100 * 2**20 < b < 64 * 2**30 for b in s["peak_rss_bytes"]), s
        assert s["driver_peak_rss_bytes"] > 100 * 2**20
        marks = s["memory_milestones"]  # how rank 0's peak built up: never falling, ending at its peak
        order = ["model", "engine", "first_step", "stage_end"]
        assert sorted(marks) == sorted(order), marks
        peaks = [marks[k]["peak_rss_bytes"] for k in order]
        assert peaks == sorted(peaks) and peaks[-1] <= s["peak_rss_bytes"][0] + 16 * 2**20  # the kernel's peak lags a little
        assert all(100 * 2**20 < m["rss_bytes"] <= m["peak_rss_bytes"] for m in marks.values()), marks
    # An epoch's examples are those of both workers: the whole (padded) train split.
    from conure_dist.data.format import load_dataset_info

    rows = load_dataset_info(exp.dataset).task("pretrain").counts["train"]
    first = manifest["stages"]["pretrain/train"]["history"][0]
    assert abs(first["examples_per_s"] * first["seconds"] - rows) <= 2, (first, rows)
    # Capacity as configured: 30 %, then 0.2 * 70 % = 14 %, then 0.4 * 56 % = 22.4 %.
    cap = run.state.owners.capacity()
    assert cap.fraction(1) == pytest.approx(0.30, abs=2e-3)
    assert cap.fraction(2) == pytest.approx(0.14, abs=2e-3)
    assert cap.fraction(3) == pytest.approx(0.224, abs=2e-3)
    # Each earlier task's test metrics after the last task equal their values at commit, exactly.
    rows = run.state.accuracy
    for task in ("pretrain", "click"):
        at_commit = {r["metric"]: r["value"] for r in rows if r["after_task"] == task and r["task"] == task}
        at_end = {r["metric"]: r["value"] for r in rows if r["after_task"] == "age" and r["task"] == task}
        assert at_commit and at_commit == at_end
    # And serving outputs are bit for bit those of the weights committed with each task.
    seq = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10]])
    final = manifest["state"]["weights"]
    for task in ("pretrain", "click"):
        committed = serve(exp, rundir, f"state/weights-{task}-commit.safetensors", task, seq)
        assert torch.equal(committed, serve(exp, rundir, final, task, seq))
    csv = rundir.read_bytes("reports/accuracy_matrix.csv").decode().splitlines()
    assert csv[0] == "after_task,task,metric,value,status" and len(csv) == 1 + len(rows)
    assert os.listdir(rundir.path("tensorboard", "pretrain-train"))


def test_killed_driver_resumes_without_repeating_completed_stages_then_a_task_is_added(dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(REPO, "jobs", "ttl.py"), "--data", dataset, "--run-dir", run_dir,
           "--tasks", "pretrain,click", "--epochs", "3", "--retrain-epochs", "1", "--embed-dim", "16", "--seq-len", "10",
           "--workers", "2", "--log-every", "5",
           # click/train long enough to be killed inside it (the workers start once, so stages take seconds)
           "--set", "tasks.click.epochs=20", "--set", "tasks.click.patience=20"]
    # Ray's socket paths must stay under 108 bytes: a short scratch directory for its session.
    env = {**os.environ, **RAY_ENV, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    manifest_path = os.path.join(run_dir, "manifest.json")
    deadline = time.time() + 900
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {open(tmp_path / 'first.log').read()[-3000:]}")
            if os.path.exists(manifest_path):
                stage = json.load(open(manifest_path))["stages"].get("click/train", {})
                if stage.get("status") == "running":
                    time.sleep(3)  # well inside the stage: 20 epochs of about 0.5 s
                    break
            time.sleep(0.5)
        else:
            pytest.fail("click/train never started")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    first = json.load(open(manifest_path))
    assert first["ledger"]["click"] is None  # it really was killed inside click/train
    # Resume on a smaller cluster: completed stages are kept, the interrupted one starts over.
    one_worker = [*cmd[:cmd.index("--workers") + 1], "1", *cmd[cmd.index("--workers") + 2:]]
    second = subprocess.run(one_worker, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "cluster.num_workers 2 -> 1" in second.stdout
    manifest = json.load(open(manifest_path))
    assert manifest["ledger"] == {"pretrain": "commit", "click": "commit"}
    for key, stage in manifest["stages"].items():
        assert stage["status"] == "done" and stage["completions"] == 1, key
        expected_attempts = 2 if key == "click/train" else 1
        assert stage["attempts"] == expected_attempts, (key, stage["attempts"])
    # Completed stages kept their finish times: nothing before click/train ran again.
    for key in ("pretrain/train", "pretrain/prune", "pretrain/retrain", "pretrain/commit"):
        assert manifest["stages"][key]["finished"] == first["stages"][key]["finished"]
    # The continual setting: extend the committed run with one more task; only it is trained.
    third = subprocess.run([*cmd[:cmd.index("--tasks") + 1], "pretrain,click,age", *cmd[cmd.index("--tasks") + 2:],
                            "--add-task"], env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    extended = json.load(open(manifest_path))
    assert extended["ledger"] == {"pretrain": "commit", "click": "commit", "age": "commit"}
    def kept(stage):  # a stage's record less the checkpoint path, dropped once Ray Train deletes it
        return {k: v for k, v in stage.items() if k != "checkpoint"}

    for key, stage in manifest["stages"].items():
        assert kept(extended["stages"][key]) == kept(stage), key  # untouched
        assert extended["stages"][key].get("checkpoint") in (None, stage.get("checkpoint")), key
    assert extended["stages"]["age/train"]["attempts"] == 1
    rows = [r for r in extended["accuracy"] if r["after_task"] == "age"]
    assert {r["task"] for r in rows} == {"pretrain", "click", "age"}
    for r in rows:
        if r["task"] != "age":
            assert r["value"] == next(x["value"] for x in extended["accuracy"]
                                      if x["after_task"] == r["task"] and x["task"] == r["task"] and x["metric"] == r["metric"])


@pytest.mark.parametrize("train_shuffle,workers", [("permute", 2), ("buffer", 1)])
def test_a_stage_resumed_inside_an_epoch_equals_the_uninterrupted_stage(dataset, ray_cluster, tmp_path, train_shuffle,
                                                                         workers):
    """A failure between two mid-epoch checkpoints; Ray Train restarts the workers, which skip
    the batches already consumed: the stage's weights equal an uninterrupted run's. Each rank's
    part permuted whole (two workers, 325 rows in three files: a padding row, parts cut across
    blocks), and one worker's streaming split through a shuffle buffer."""
    import dataclasses

    from conure_dist.model import Stage
    from conure_dist.train.coordinator import open_run
    from conure_dist.train.executor import RayExecutor

    exp = experiment(dataset, tasks=("pretrain",))
    train = dataclasses.replace(exp.tasks[0].train, batch_size=32, epochs=1, optimizer="adam", weight_decay=0.0)
    exp = dataclasses.replace(exp, tasks=(dataclasses.replace(exp.tasks[0], train=train),),
                              cluster=dataclasses.replace(exp.cluster, num_workers=workers, checkpoint_every_steps=2,
                                                          train_shuffle=train_shuffle))
    results = {}
    for name, fail in (("whole", None), ("resumed", {"pretrain-train": 7})):
        run = open_run(exp, str(tmp_path / name))
        with RayExecutor(exp, run.rundir, run.manifest, fail_once_at_step=fail) as executor:
            results[name] = executor.train(exp.tasks[0], 1, Stage.TRAIN, run.state.weights, run.state.owners)
        results[name + "-manifest"] = run.manifest.data["stages"]["pretrain/train"]
    steps = -(-TINY.num_users * 8 // 10 // 32)  # about 10 steps in the one epoch
    assert results["resumed-manifest"]["progress"]["step"] == results["whole-manifest"]["progress"]["step"] >= 8, steps
    assert results["whole"].keys() == results["resumed"].keys()
    differing = [k for k in results["whole"] if not torch.equal(results["whole"][k], results["resumed"][k])]
    assert not differing, f"resumed stage differs in {differing}"


def test_new_run_starts_over_and_never_reuses_the_old_runs_checkpoints(dataset, ray_cluster, tmp_path):
    """Ray Train resumes any fit with the same name: a new run must not pick up the old run's
    stage (for T1 nothing is frozen, so no merge check would notice)."""
    import dataclasses

    from conure_dist.model import Stage
    from conure_dist.train.coordinator import open_run
    from conure_dist.train.executor import RayExecutor

    exp = experiment(dataset, tasks=("pretrain",))
    train = dataclasses.replace(exp.tasks[0].train, epochs=1)
    exp = dataclasses.replace(exp, tasks=(dataclasses.replace(exp.tasks[0], train=train),))
    trained = []
    for seed, new_run in ((0, False), (5, True)):
        run = open_run(dataclasses.replace(exp, seed=seed), str(tmp_path / "run"), new_run=new_run)
        with RayExecutor(run.exp, run.rundir, run.manifest) as executor:  # its workers stop at the end
            trained.append(executor.train(run.exp.tasks[0], 1, Stage.TRAIN, run.state.weights, run.state.owners))
    assert not torch.equal(trained[0]["backbone.embedding.weight"], trained[1]["backbone.embedding.weight"])
    assert RunDir(str(tmp_path / "run")).read_json("manifest.json")["config"]["seed"] == 5


@pytest.mark.parametrize("method", ["fineall", "peterrec"])
def test_baselines_run_through_ray_train_and_resume(dataset, ray_cluster, tmp_path, method):
    """A one-backbone-per-task method keeps each task's weight set in the run directory and
    serves each task from it; PeterRec trains only its patches and head (T1 unchanged)."""
    from dataclasses import replace

    from conure_dist.train.coordinator import run_experiment

    exp = replace(experiment(dataset, ("pretrain", "click")), method=method)
    run_dir = str(tmp_path / "run")
    run = run_experiment(exp, run_dir)
    manifest = json.load(open(os.path.join(run_dir, "manifest.json")))
    t1 = {r["after_task"]: r["value"] for r in run.state.accuracy if r["task"] == "pretrain" and r["metric"] == "mrr@5"}
    assert t1["pretrain"] == t1["click"], t1  # neither method changes what serves T1
    if method == "fineall":
        sets = manifest["state"]["sets"]
        assert set(sets) == {"pretrain", "click"}
        stored = {t: RunDir(run_dir).read_tensors(f) for t, f in sets.items()}
        conv = "backbone.blocks.0.conv1.weight"
        assert not torch.equal(stored["pretrain"][conv], stored["click"][conv])
    else:
        assert "sets" not in manifest["state"]
        weights = RunDir(run_dir).read_tensors(manifest["state"]["weights"])
        assert any(k.startswith("patches.click.") and ".up." in k and weights[k].abs().sum() > 0 for k in weights)
    again = run_experiment(exp, run_dir)  # resume: nothing left to run, the same results
    assert again.state.accuracy == run.state.accuracy
    assert set(again.state.sets) == set(run.state.sets)
