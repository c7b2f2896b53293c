"""The run directory's lifecycle without Ray: resume settings, --new-run, the driver lock."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conure_dist.config import ClusterConfig, ExperimentConfig, ModelConfig, TaskPlan, TaskSpec, TrainConfig
from conure_dist.data.synthetic import SyntheticConfig, prepare_synthetic
from conure_dist.train.coordinator import open_run
from conure_dist.train.lock import LOCK_FILE, RunLock
from conure_dist.train.manifest import Manifest
from conure_dist.train.rundir import RunDir, RunDirError

TINY = SyntheticConfig(num_users=120, num_items=40, seq_len=8, min_seq_len=3, num_topics=4, click_labels=10,
                       like_labels=6, rows_per_shard=100)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_synthetic(TINY, path, seed=1)
    return path


def experiment(dataset, tasks=("pretrain", "click"), **overrides):
    from conure_dist.data.format import load_dataset_info

    info = load_dataset_info(dataset)
    train = TrainConfig(lr=1e-3, batch_size=16, epochs=1, retrain_epochs=1)
    plans = tuple(TaskPlan(TaskSpec(n, info.task(n).kind, num_labels=info.task(n).num_labels, prune_ratio=0.7), train)
                  for n in tasks)
    exp = ExperimentConfig(dataset=dataset, model=ModelConfig(num_items=info.num_items, embed_dim=8, dilations=(1, 2)),
                           tasks=plans, seq_len=8, cluster=ClusterConfig(num_workers=2))
    return dataclasses.replace(exp, **overrides)


def with_task_train(exp, name, **changes):
    tasks = tuple(dataclasses.replace(t, train=dataclasses.replace(t.train, **changes)) if t.spec.name == name else t
                  for t in exp.tasks)
    return dataclasses.replace(exp, tasks=tasks)


@pytest.mark.parametrize("change, setting, old, new", [
    (lambda e: with_task_train(e, "click", lr=5e-4), "tasks.click.train.lr", "0.001", "0.0005"),
    (lambda e: with_task_train(e, "pretrain", epochs=3), "tasks.pretrain.train.epochs", "1", "3"),
    (lambda e: with_task_train(e, "click", batch_size=64), "tasks.click.train.batch_size", "16", "64"),
    (lambda e: dataclasses.replace(e, tasks=(e.tasks[0], dataclasses.replace(
        e.tasks[1], spec=dataclasses.replace(e.tasks[1].spec, prune_ratio=0.5)))), "tasks.click.spec.prune_ratio", "0.7", "0.5"),
    (lambda e: dataclasses.replace(e, seed=4), "seed", "0", "4"),
    (lambda e: dataclasses.replace(e, shuffle_buffer_rows=10), "shuffle_buffer_rows", "100000", "10"),
    (lambda e: dataclasses.replace(e, max_eval_rows=10), "max_eval_rows", "0", "10"),
    (lambda e: with_task_train(e, "pretrain", max_steps=5), "tasks.pretrain.train.max_steps", "0", "5"),
    (lambda e: dataclasses.replace(e, cluster=dataclasses.replace(e.cluster, zero_stage=2)), "cluster.zero_stage", "0", "2"),
])
def test_a_resume_with_a_setting_that_changes_results_is_refused_naming_it(dataset, tmp_path, change, setting, old, new):
    exp = experiment(dataset)
    open_run(exp, str(tmp_path / "run"))
    with pytest.raises(RunDirError) as info:
        open_run(change(exp), str(tmp_path / "run"))
    message = str(info.value)
    line = next(line for line in message.splitlines() if line.strip().startswith(setting + " "))
    assert line.split()[1:] == [old, new], message
    assert "--new-run" in message


def test_settings_that_do_not_change_results_may_change_on_resume(dataset, tmp_path):
    exp = experiment(dataset)
    first = open_run(exp, str(tmp_path / "run"))
    # The same dataset reached by another path, other workers, logging and checkpoint intervals.
    moved = str(tmp_path / "elsewhere")
    shutil.copytree(dataset, moved)
    cluster = dataclasses.replace(exp.cluster, num_workers=5, log_every_steps=7, checkpoint_every_steps=3, max_failures=4)
    again = open_run(dataclasses.replace(exp, dataset=moved, cluster=cluster), str(tmp_path / "run"))
    assert again.manifest.data["run_id"] == first.manifest.data["run_id"]
    assert again.manifest.data["config"]["cluster"]["num_workers"] == 5
    changed = again.manifest.data["resumes"][-1]["changed"]
    assert changed["cluster.num_workers"] == [2, 5] and changed["cluster.log_every_steps"] == [50, 7]


def test_a_dataset_with_other_content_is_refused(dataset, tmp_path):
    exp = experiment(dataset)
    open_run(exp, str(tmp_path / "run"))
    other = str(tmp_path / "other")
    prepare_synthetic(TINY, other, seed=2)  # same shape, other rows
    with pytest.raises(RunDirError, match="dataset.content"):
        open_run(dataclasses.replace(exp, dataset=other), str(tmp_path / "run"))


def test_only_new_tasks_may_be_added_and_old_task_settings_stay(dataset, tmp_path):
    exp = experiment(dataset)
    open_run(exp, str(tmp_path / "run"))
    longer = experiment(dataset, tasks=("pretrain", "click", "age"))
    with pytest.raises(RunDirError, match="--add-task"):
        open_run(longer, str(tmp_path / "run"))
    with pytest.raises(RunDirError, match="tasks.click.train.lr"):
        open_run(with_task_train(longer, "click", lr=0.1), str(tmp_path / "run"), add_task=True)
    extended = open_run(with_task_train(longer, "age", lr=0.1), str(tmp_path / "run"), add_task=True)
    assert extended.manifest.data["tasks"] == ["pretrain", "click", "age"]
    assert "heads.age.linear.weight" in extended.state.weights


def test_new_run_moves_the_old_run_aside_and_gets_a_new_run_id(dataset, tmp_path):
    exp = experiment(dataset)
    rundir = RunDir(str(tmp_path / "run"))
    first = open_run(exp, rundir.uri)
    # What an interrupted stage leaves behind: Ray Train storage and stage inputs.
    rundir.write_text(f"ray/{first.manifest.data['run_id']}/pretrain-train/checkpoint", "old")
    rundir.write_text("stages/pretrain-train/weights.safetensors", "old")
    rundir.write_text("data/dataset.json", "{}")  # a --demo dataset inside the run directory stays
    second = open_run(dataclasses.replace(exp, seed=9), rundir.uri, new_run=True)
    assert second.manifest.data["run_id"] != first.manifest.data["run_id"]
    assert not rundir.exists("ray") and not rundir.exists("stages")
    assert rundir.exists("data", "dataset.json")
    (replaced,) = os.listdir(rundir.path("replaced"))
    old = RunDir(rundir.path("replaced", replaced))
    assert old.read_json("manifest.json")["run_id"] == first.manifest.data["run_id"]
    assert old.exists("ray", first.manifest.data["run_id"], "pretrain-train", "checkpoint")


def test_a_relative_run_directory_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rundir = RunDir("runs/x")
    assert rundir.uri == str(tmp_path / "runs" / "x") and os.path.isabs(rundir.storage_uri("ray"))


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    with RunLock(rundir):
        held = rundir.read_json(LOCK_FILE)
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
        with pytest.raises(RunDirError, match=f"in use by another driver .*pid {os.getpid()}"):
            RunLock(rundir).acquire()
    assert not rundir.exists(LOCK_FILE)  # released
    RunLock(rundir).acquire().release()


def test_a_stale_lock_is_taken_over(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(ended.stdout)
    rundir.write_json(LOCK_FILE, {"host": socket.gethostname(), "pid": dead_pid, "token": "x", "heartbeat": time.time()})
    lock = RunLock(rundir).acquire()
    assert rundir.read_json(LOCK_FILE)["pid"] == os.getpid()
    lock.release()
    # Another host: only the heartbeat can tell.
    rundir.write_json(LOCK_FILE, {"host": "elsewhere", "pid": 1, "token": "y", "heartbeat": time.time()})
    with pytest.raises(RunDirError, match="host elsewhere"):
        RunLock(rundir).acquire()
    rundir.write_json(LOCK_FILE, {"host": "elsewhere", "pid": 1, "token": "y", "heartbeat": time.time() - 3600})
    RunLock(rundir, stale_after_s=600).acquire().release()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    lock = RunLock(rundir, heartbeat_s=0.05).acquire()
    first = rundir.read_json(LOCK_FILE)["heartbeat"]
    time.sleep(0.3)
    assert rundir.read_json(LOCK_FILE)["heartbeat"] > first
    lock.release()
    assert json.dumps(rundir.entries()) == "[]"


def test_job_paths_are_resolved_in_the_driver_and_uris_stay(tmp_path, monkeypatch):
    from conure_dist.jobs.ttl import get_args
    from conure_dist.launch import resolve_config

    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(get_args(["--run-dir", "runs/demo", "--data", "s3://bucket/data", "--raw", "../ttl"]), "ttl")
    assert cfg.run_dir == str(tmp_path / "runs" / "demo")
    assert cfg.data == "s3://bucket/data"
    assert cfg.source.raw == os.path.normpath(str(tmp_path / ".." / "ttl"))


def test_a_failed_stage_ends_the_job_with_one_line_and_status_1(capsys):
    from conure_dist.launch import main_guard
    from conure_dist.train.loop import NonFiniteLoss

    def job(argv):
        raise NonFiniteLoss("task click, train stage: the loss became nan at step 3 (epoch 1, batch 3)")

    assert main_guard(job) == 1
    assert capsys.readouterr().err == "error: task click, train stage: the loss became nan at step 3 (epoch 1, batch 3)\n"


def test_smoke_test_settings_are_named_in_the_reports_and_the_log(tmp_path, capsys):
    from conure_dist.jobs.ttl import main as ttl_main

    run_dir = tmp_path / "run"
    assert ttl_main(["--demo", "--in-process", "--tasks", "pretrain,age", "--epochs", "3", "--retrain-epochs", "1",
                     "--embed-dim", "8", "--max-steps", "2", "--max-eval-rows", "15", "--run-dir", str(run_dir)]) == 0
    notice = (run_dir / "reports" / "SMOKE_TEST.txt").read_text()
    assert "max_eval_rows=15" in notice and "pretrain: 2, age: 2" in notice
    assert "NOTE: smoke-test settings cut this run short" in capsys.readouterr().out
    assert json.loads((run_dir / "manifest.json").read_text())["settings"]["max_eval_rows"] == 15


def test_a_run_written_before_the_smoke_test_settings_resumes_with_their_defaults(dataset, tmp_path):
    exp = experiment(dataset)
    first = open_run(exp, str(tmp_path / "run"))
    rundir = RunDir(str(tmp_path / "run"))
    manifest = rundir.read_json("manifest.json")
    old = {k: v for k, v in manifest["settings"].items() if k != "max_eval_rows" and not k.endswith(".max_steps")}
    assert len(old) < len(manifest["settings"])
    manifest["settings"] = old
    rundir.write_json("manifest.json", manifest)
    again = open_run(exp, str(tmp_path / "run"))  # the defaults: what the older run had in effect
    assert again.manifest.data["run_id"] == first.manifest.data["run_id"]
    with pytest.raises(RunDirError, match="max_eval_rows"):
        open_run(dataclasses.replace(exp, max_eval_rows=10), str(tmp_path / "run"))


def test_a_new_run_reads_files_whole_and_a_resumed_run_keeps_the_reader_it_was_made_with(dataset, tmp_path):
    exp, run_dir = experiment(dataset), str(tmp_path / "run")
    assert exp.cluster.reader == "auto"
    first = open_run(exp, run_dir)
    assert first.exp.cluster.reader == "files" and first.manifest.data["settings"]["cluster.reader"] == "files"
    assert first.manifest.data["config"]["cluster"]["reader"] == "files"
    assert open_run(exp, run_dir).exp.cluster.reader == "files"
    rundir = RunDir(run_dir)  # a run made before the setting: ray.data.read_parquet
    manifest = rundir.read_json("manifest.json")
    del manifest["settings"]["cluster.reader"]
    rundir.write_json("manifest.json", manifest)
    from conure_dist.train.executor import RayExecutor

    assert RayExecutor(exp, rundir, Manifest(rundir, manifest)).exp.cluster.reader == "parquet"  # from the manifest
    keeps_its_own(exp, run_dir, first, "reader", "parquet", "files")


def keeps_its_own(exp, run_dir, first, key, kept, other):
    """The run in ``run_dir`` (opened first as ``first``) resumes with ``cluster.<key>`` ``kept``
    under auto, refuses ``other`` (open_run and the executor), and a new run takes ``other``."""
    from conure_dist.train.executor import RayExecutor

    again = open_run(exp, run_dir)
    assert getattr(again.exp.cluster, key) == kept and again.manifest.data["settings"][f"cluster.{key}"] == kept
    assert again.manifest.data["run_id"] == first.manifest.data["run_id"]
    assert getattr(RayExecutor(exp, RunDir(run_dir), again.manifest).exp.cluster, key) == kept
    named = dataclasses.replace(exp, cluster=dataclasses.replace(exp.cluster, **{key: other}))
    with pytest.raises(RunDirError, match=f"made with cluster.{key} {kept}; got {other}"):
        RayExecutor(named, RunDir(run_dir), again.manifest)
    with pytest.raises(RunDirError, match=rf"cluster\.{key} +\"{kept}\" +\"{other}\""):
        open_run(named, run_dir)
    assert getattr(open_run(exp, run_dir, new_run=True).exp.cluster, key) == other


def test_a_new_run_permutes_train_parts_and_a_resumed_run_keeps_the_shuffle_it_was_made_with(dataset, tmp_path):
    """cluster.train_shuffle auto: permute for a new run, which makes cache_splits_below_bytes part
    of its data order (it decides which train splits are permuted whole); a run made before the
    setting keeps buffer, and may still change cache_splits_below_bytes."""
    from conure_dist.train.executor import RayExecutor

    exp, run_dir = experiment(dataset), str(tmp_path / "run")
    assert exp.cluster.train_shuffle == "auto"
    first = open_run(exp, run_dir)
    settings = first.manifest.data["settings"]
    assert first.exp.cluster.train_shuffle == "permute" and settings["cluster.train_shuffle"] == "permute"
    assert settings["cluster.cache_splits_below_bytes"] == exp.cluster.cache_splits_below_bytes
    rundir = RunDir(run_dir)
    assert RayExecutor(exp, rundir, first.manifest).exp.cluster.train_shuffle == "permute"
    smaller = dataclasses.replace(exp, cluster=dataclasses.replace(exp.cluster, cache_splits_below_bytes=1000))
    with pytest.raises(RunDirError, match=r"cluster\.cache_splits_below_bytes +268435456 +1000"):
        open_run(smaller, run_dir)
    with pytest.raises(RunDirError, match="made with cluster.cache_splits_below_bytes 268435456; got 1000"):
        RayExecutor(smaller, rundir, first.manifest)
    # the in-process engine reads no Ray Data splits: the threshold changes nothing there
    assert "cluster.cache_splits_below_bytes" not in open_run(exp, str(tmp_path / "local"), engine="in-process").manifest.data["settings"]
    manifest = rundir.read_json("manifest.json")  # a run made before the setting: streaming splits, a buffer
    del manifest["settings"]["cluster.train_shuffle"], manifest["settings"]["cluster.cache_splits_below_bytes"]
    rundir.write_json("manifest.json", manifest)
    again = open_run(smaller, run_dir)  # the threshold is free again: it does not decide its data order
    assert again.exp.cluster.train_shuffle == "buffer" and "cluster.cache_splits_below_bytes" not in again.manifest.data["settings"]
    keeps_its_own(exp, run_dir, first, "train_shuffle", "buffer", "permute")


def test_the_reports_of_an_unfinished_run_say_so_and_mark_the_missing_cells(dataset, tmp_path):
    from conure_dist.train.coordinator import run_experiment, write_reports

    run_dir = str(tmp_path / "run")
    run_experiment(experiment(dataset, tasks=("pretrain",)), run_dir, in_process=True)
    reports = tmp_path / "run" / "reports"
    assert (reports / "STATUS.txt").read_text() == "complete: all 1 tasks committed (pretrain)\n"
    matrix = (reports / "accuracy_matrix.csv").read_text().splitlines()
    assert matrix[0] == "after_task,task,metric,value,status" and matrix[1].startswith("pretrain,pretrain,")
    assert all(r.endswith(",measured") for r in matrix[1:])
    # The same run with a task added, stopped before that task was committed.
    run = open_run(experiment(dataset, tasks=("pretrain", "age")), run_dir, add_task=True, engine="in-process")
    write_reports(run)
    status = (reports / "STATUS.txt").read_text()
    assert status.startswith("incomplete: 1 of 2 tasks committed (pretrain); not yet: age. Rerun the same command")
    pending = [r for r in (reports / "accuracy_matrix.csv").read_text().splitlines() if r.endswith(",pending")]
    assert pending == ["age,pretrain,mrr@5,,pending", "age,age,accuracy,,pending"]


def test_a_retrain_of_zero_epochs_starts_no_fit(dataset, tmp_path, monkeypatch, caplog):
    from conure_dist.model import Stage
    from conure_dist.train import runner
    from conure_dist.train.coordinator import run_experiment
    from conure_dist.train.invariants import check_run_invariants

    fits, train = [], runner.InProcessExecutor.train

    def recording(self, task, number, stage, *args, **kwargs):
        fits.append((task.spec.name, stage))
        return train(self, task, number, stage, *args, **kwargs)

    monkeypatch.setattr(runner.InProcessExecutor, "train", recording)
    exp = experiment(dataset)
    exp = with_task_train(with_task_train(exp, "pretrain", retrain_epochs=0), "click", retrain_epochs=0)
    with caplog.at_level("INFO", logger="conure_dist"):
        run = run_experiment(exp, str(tmp_path / "run"), in_process=True)
    assert fits == [("pretrain", Stage.TRAIN), ("click", Stage.TRAIN)]
    assert "pretrain/retrain  skipped: 0 retrain epochs, the pruned weights stand" in caplog.messages
    stages = run.manifest.data["stages"]
    assert stages["pretrain/retrain"]["status"] == "done" and stages["pretrain/retrain"]["completions"] == 1
    assert run.state.ledger.committed("click") and check_run_invariants(str(tmp_path / "run")) == []
