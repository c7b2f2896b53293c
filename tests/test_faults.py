"""Faults injected into the run directory and the driver, on the in-process engine (no Ray).

Each test injects one fault, then checks that the run stops with a clear error or resumes to
completion, that no stage is completed twice, and that every committed task's files are bit
for bit unchanged (:func:`~conure_dist.train.invariants.check_run_invariants`).
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conure_dist.config import ConfigError, ExperimentConfig, ModelConfig, TaskPlan, TaskSpec, TrainConfig
from conure_dist.data.synthetic import SyntheticConfig, prepare_synthetic
from conure_dist.train.coordinator import open_run, run_experiment
from conure_dist.train.invariants import check_run_invariants
from conure_dist.train.rundir import RunDir, RunDirError, digest

TINY = SyntheticConfig(num_users=120, num_items=40, seq_len=8, min_seq_len=3, num_topics=4, click_labels=10,
                       like_labels=6, rows_per_shard=100)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data") / "tiny")
    prepare_synthetic(TINY, path, seed=1)
    return path


def experiment(dataset, tasks=("pretrain", "click"), ratios=None, method="conure", embed_dim=8) -> ExperimentConfig:
    from conure_dist.data.format import load_dataset_info

    info = load_dataset_info(dataset)
    ratios = ratios or {}
    train = TrainConfig(lr=1e-3, batch_size=16, epochs=1, retrain_epochs=1)
    plans = tuple(TaskPlan(TaskSpec(n, info.task(n).kind, num_labels=info.task(n).num_labels,
                                    prune_ratio=ratios.get(n, 0.7)), train) for n in tasks)
    return ExperimentConfig(dataset=dataset, model=ModelConfig(num_items=info.num_items, embed_dim=embed_dim, dilations=(1, 2)),
                            tasks=plans, seq_len=8, method=method)


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):
    """Complete two-task runs, conure (shared weights, owner map) and fineall (per-task sets)."""
    out = {}
    for method in ("conure", "fineall"):
        run_dir = str(tmp_path_factory.mktemp(method) / "run")
        run_experiment(experiment(dataset, method=method), run_dir, in_process=True)
        out[method] = run_dir
    return out


def copy_run(src: str, tmp_path) -> RunDir:
    dst = str(tmp_path / "run")
    shutil.copytree(src, dst)
    return RunDir(dst)


def manifest_of(rundir: RunDir) -> dict:
    return rundir.read_json("manifest.json")


def file_bytes(rundir: RunDir) -> dict[str, bytes]:
    return {name: rundir.read_bytes(f"state/{name}") for name in sorted(os.listdir(rundir.path("state")))}


# -- checksums ---------------------------------------------------------------------------

def test_every_state_file_the_manifest_keeps_has_its_checksum(finished):
    for method, run_dir in finished.items():
        rundir = RunDir(run_dir)
        manifest = manifest_of(rundir)
        sums = manifest["state_checksums"]
        expected = {"state/owners-v0.safetensors", "state/weights-pretrain-commit.safetensors",
                    "state/weights-click-commit.safetensors", manifest["state"]["weights"], manifest["state"]["owners"],
                    *manifest["state"].get("sets", {}).values()}
        assert expected <= set(sums), (method, sorted(sums))
        assert set(sums) == {f"state/{n}" for n in os.listdir(rundir.path("state"))}  # replaced files dropped too
        for rel, recorded in sums.items():
            assert recorded == digest(rundir.read_bytes(rel)), rel
        assert manifest["format_version"] == 2
        assert check_run_invariants(run_dir) == []


def _truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _flip_last_byte(path: str) -> None:
    """One bit of the tensor data (the end of the file), the header intact: safetensors still
    loads it, only the checksum can tell."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x01]))


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte], ids=["truncated", "one-bit"])
@pytest.mark.parametrize("method, which", [("conure", "weights"), ("conure", "owners"), ("fineall", "set")])
def test_a_damaged_state_file_is_refused_at_resume_naming_it(finished, dataset, tmp_path, method, which, damage):
    rundir = copy_run(finished[method], tmp_path)
    state = manifest_of(rundir)["state"]
    rel = state["sets"]["pretrain"] if which == "set" else state[which]
    before = rundir.read_bytes("manifest.json")
    damage(rundir.path(rel))
    for resume in (lambda: open_run(experiment(dataset, method=method), rundir.uri, engine="in-process"),
                   lambda: run_experiment(experiment(dataset, method=method), rundir.uri, in_process=True)):
        with pytest.raises(RunDirError) as info:
            resume()
        message = str(info.value)
        assert rundir.path(rel) in message and "is damaged" in message and "--new-run" in message, message
        reason = "checksum" if damage is _flip_last_byte else "(checksum|safetensors)"
        assert re.search(reason, message), message
    assert rundir.read_bytes("manifest.json") == before  # the refused resume wrote nothing
    assert any(rel in p for p in check_run_invariants(rundir.uri))


@pytest.mark.parametrize("content, reason", [(None, "not valid JSON"), (b"", "not valid JSON"), (b"{}", "it lacks"),
                                             (b"[1, 2]", "not a JSON object")])
def test_a_damaged_manifest_is_refused_with_what_to_do(finished, dataset, tmp_path, content, reason):
    rundir = copy_run(finished["conure"], tmp_path)
    path = rundir.path("manifest.json")
    if content is None:
        _truncate(path)
    else:
        open(path, "wb").write(content)
    with pytest.raises(RunDirError) as info:
        run_experiment(experiment(dataset), rundir.uri, in_process=True)
    message = str(info.value)
    assert f"{path} is damaged" in message and reason in message and "--new-run" in message, message
    # --new-run moves the damaged run aside and starts over.
    run = open_run(experiment(dataset), rundir.uri, new_run=True, engine="in-process")
    assert run.manifest.data["ledger"] == {"pretrain": None, "click": None}
    assert len(os.listdir(rundir.path("replaced"))) == 1


def test_a_run_written_before_the_checksums_resumes_and_gains_them(dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    run_experiment(experiment(dataset, tasks=("pretrain",)), run_dir, in_process=True)
    rundir = RunDir(run_dir)
    manifest = manifest_of(rundir)
    del manifest["state_checksums"]
    rundir.write_json("manifest.json", manifest)
    committed = rundir.read_bytes("state/weights-pretrain-commit.safetensors")
    # A damaged file is still found when it cannot be read (no checksum to compare with).
    saved = rundir.read_bytes(manifest["state"]["owners"])
    _truncate(rundir.path(manifest["state"]["owners"]))
    with pytest.raises(RunDirError, match="not a readable safetensors file"):
        open_run(experiment(dataset, tasks=("pretrain", "click")), run_dir, add_task=True, engine="in-process")
    rundir.write_bytes(manifest["state"]["owners"], saved)
    run_experiment(experiment(dataset, tasks=("pretrain", "click")), run_dir, add_task=True, in_process=True)
    sums = manifest_of(rundir)["state_checksums"]
    assert "state/owners-v1.safetensors" in sums and "state/weights-click-commit.safetensors" in sums
    assert rundir.read_bytes("state/weights-pretrain-commit.safetensors") == committed
    assert check_run_invariants(run_dir) == []


# -- the invariants ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["conure", "fineall"])
def test_every_invariant_holds_after_every_step(dataset, tmp_path, monkeypatch, method):
    from conure_dist.train.manifest import Manifest

    checked = []
    step_done = Manifest.step_done

    def checking(self, key, **info):
        step_done(self, key, **info)
        checked.append((key, check_run_invariants(self.rundir.uri)))

    monkeypatch.setattr(Manifest, "step_done", checking)
    run_experiment(experiment(dataset, tasks=("pretrain", "click", "age"), method=method), str(tmp_path / "run"),
                   in_process=True)
    steps = ("train", "prune", "retrain", "commit") if method == "conure" else ("train", "commit")
    assert [key for key, _ in checked] == [f"{t}/{s}" for t in ("pretrain", "click", "age") for s in steps]
    assert all(problems == [] for _, problems in checked), [c for c in checked if c[1]]


def _rewrite(rundir: RunDir, rel: str, tensors) -> None:
    """Replace a state file and its checksum: a change only the other invariants can see."""
    manifest = manifest_of(rundir)
    manifest["state_checksums"][rel] = rundir.write_tensors(rel, tensors)
    rundir.write_json("manifest.json", manifest)


def test_the_invariant_checker_finds_each_broken_invariant(finished, tmp_path):
    src = finished["conure"]
    conv = "backbone.blocks.0.conv1.weight"
    cases = {}

    rundir = copy_run(src, tmp_path / "frozen")
    rel = manifest_of(rundir)["state"]["weights"]
    weights, owners = rundir.read_tensors(rel), rundir.read_tensors("state/owners-v2.safetensors")
    pretrain_entry = (owners[conv] == 1).nonzero()[0].tolist()
    weights[conv][tuple(pretrain_entry)] += 1e-6  # one entry T1 owns
    _rewrite(rundir, rel, weights)
    cases["frozen"] = (rundir, "task pretrain: what serves it changed since its commit")

    rundir = copy_run(src, tmp_path / "head")
    weights = rundir.read_tensors(rel)
    weights["heads.pretrain.bias"] = -weights["heads.pretrain.bias"]
    _rewrite(rundir, rel, weights)
    cases["head"] = (rundir, "task pretrain: what serves it changed since its commit: heads.pretrain.bias")

    rundir = copy_run(src, tmp_path / "owners")
    owners = rundir.read_tensors("state/owners-v2.safetensors")
    owners[conv][tuple((owners[conv] == 1).nonzero()[0].tolist())] = 2  # a T1 entry handed to T2
    _rewrite(rundir, "state/owners-v2.safetensors", owners)
    cases["owners"] = (rundir, "owned entries changed owner")

    rundir = copy_run(src, tmp_path / "capacity")
    owners = rundir.read_tensors("state/owners-v2.safetensors")
    owners[conv][tuple((owners[conv] == 0).nonzero()[0].tolist())] = 2  # T2 takes one more free entry
    _rewrite(rundir, "state/owners-v2.safetensors", owners)
    cases["capacity"] = (rundir, "task click owns")

    rundir = copy_run(src, tmp_path / "checksum")
    _flip_last_byte(rundir.path("state/weights-pretrain-commit.safetensors"))
    cases["checksum"] = (rundir, "weights-pretrain-commit.safetensors: its content does not match")

    rundir = copy_run(src, tmp_path / "twice")
    manifest = manifest_of(rundir)
    manifest["stages"]["click/prune"]["completions"] = 2
    rundir.write_json("manifest.json", manifest)
    cases["twice"] = (rundir, "stage click/prune completed 2 times")

    for name, (rundir, expected) in cases.items():
        problems = check_run_invariants(rundir.uri)
        assert any(expected in p for p in problems), (name, problems)
    from conure_dist.train.invariants import main

    assert main([src]) == 0 and main([cases["owners"][0].uri]) == 1


# -- capacity ------------------------------------------------------------------------------

def test_the_capacity_plan_is_what_the_prunes_give(finished, dataset):
    from conure_dist.model import OwnerMap
    from conure_dist.train.capacity import plan_capacity

    rundir = RunDir(finished["conure"])
    owners = OwnerMap.from_state_dict(rundir.read_tensors(manifest_of(rundir)["state"]["owners"]))
    rows = plan_capacity(experiment(dataset))
    cap = owners.capacity()
    assert [r.kept for r in rows] == [cap.owned[1], cap.owned[2]]
    assert rows[-1].free_after == cap.free
    assert rows[0].fraction(rows[0].kept) == pytest.approx(0.3, abs=0.01)  # 1 - 0.7
    assert rows[1].fraction(rows[1].kept) == pytest.approx(0.3 * 0.7, abs=0.01)  # (1 - 0.7) of the 70 % left
    # A resumed run: tasks already pruned are read from its owner map, the rest planned.
    longer = experiment(dataset, tasks=("pretrain", "click", "age"))
    resumed = plan_capacity(longer, owners)
    assert [r.done for r in resumed] == [True, True, False]
    assert [r.kept for r in resumed] == [r.kept for r in plan_capacity(longer)]
    assert resumed[2].free_before == cap.free


STARVING = {"pretrain": 0.05, "click": 0.05, "age": 0.05}  # 192 free -> 10 -> 0: age finds nothing


def test_a_task_that_would_find_no_free_weight_is_refused_before_anything_is_written(dataset, tmp_path):
    exp = experiment(dataset, tasks=("pretrain", "click", "age"), ratios=STARVING)
    run_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        run_experiment(exp, run_dir, in_process=True)
    message = str(info.value)
    assert message.startswith("task age (task 3) would find no free weight left"), message
    assert "planned capacity" in message and "free at start" in message
    table = message[message.index("planned capacity"):].splitlines()
    age = next(line for line in table if line.strip().startswith("age "))
    assert age.split()[1:4] == ["0.00%", "0.00%", "0.00%"], age
    assert not os.path.exists(os.path.join(run_dir, "manifest.json"))


def test_a_task_added_to_a_run_with_too_little_left_is_refused_and_the_run_stays(dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    two = experiment(dataset, tasks=("pretrain", "click"), ratios=STARVING)
    run_experiment(two, run_dir, in_process=True)
    before = RunDir(run_dir).read_bytes("manifest.json")
    with pytest.raises(ConfigError) as info:
        run_experiment(experiment(dataset, tasks=("pretrain", "click", "age"), ratios=STARVING), run_dir,
                       add_task=True, in_process=True)
    message = str(info.value)
    assert "task age (task 3) would find no free weight left" in message
    assert "the run's owner map now:" in message and "ALL" in message  # the owner map's capacity table
    assert RunDir(run_dir).read_bytes("manifest.json") == before
    run_experiment(two, run_dir, in_process=True)  # the two-task run is still there to resume


def test_dry_run_shows_the_capacity_plan_and_warns_below_the_minimum_free(dataset):
    from conure_dist.launch import dry_run_report
    from conure_dist.train.capacity import MIN_FREE_FRACTION

    tasks = ("pretrain", "click", "age")
    report = dry_run_report(experiment(dataset, tasks=tasks), None)
    assert "capacity plan" in report and "warning: task" not in report
    # Two tasks with ratio 0.15 each leave 0.15 * 0.15 = 2.25 % free for the third.
    low = dry_run_report(experiment(dataset, tasks=tasks, ratios={"pretrain": 0.15, "click": 0.15}), None)
    warnings = [line for line in low.splitlines() if line.startswith("warning: task")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: task age would start with 2."), warnings
    assert f"(< {100 * MIN_FREE_FRACTION:.0f}%)" in warnings[0]
    refused = dry_run_report(experiment(dataset, tasks=tasks, ratios=STARVING), None)
    assert "error: the run would be refused: task age (task 3) would find no free weight left" in refused
    # Methods that do not prune have no capacity plan.
    assert "capacity plan" not in dry_run_report(experiment(dataset, tasks=tasks, method="fineall"), None)


# -- a full or unwritable run directory -----------------------------------------------------

@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES], ids=["full", "unwritable"])
def test_a_run_directory_that_fills_up_mid_run_keeps_its_last_state_resumable(dataset, tmp_path, monkeypatch, error):
    from conure_dist import storage

    exp = experiment(dataset)
    run_dir = str(tmp_path / "run")
    real = storage.write_bytes
    seen = []

    real_fsync = os.fsync

    def failing(path, data):
        seen.append(path)
        if not path.endswith("state/weights-click-retrain.safetensors"):
            return real(path, data)

        def full(fd):  # the disk fills up inside the real write, after its temporary file was made
            raise OSError(error, os.strerror(error), path)

        monkeypatch.setattr(os, "fsync", full)
        try:
            return real(path, data)
        finally:
            monkeypatch.setattr(os, "fsync", real_fsync)

    monkeypatch.setattr(storage, "write_bytes", failing)
    with pytest.raises(OSError) as info:
        run_experiment(exp, run_dir, in_process=True)
    assert info.value.errno == error and "weights-click-retrain" in str(info.value)
    monkeypatch.setattr(storage, "write_bytes", real)
    rundir = RunDir(run_dir)
    manifest = manifest_of(rundir)
    assert manifest["ledger"] == {"pretrain": "commit", "click": "prune"}
    assert check_run_invariants(run_dir) == []  # the last state written is whole and consistent
    assert not [n for n in os.listdir(rundir.path("state")) if ".tmp-" in n]
    committed = rundir.read_bytes("state/weights-pretrain-commit.safetensors")
    run_experiment(exp, run_dir, in_process=True)  # room again: the same command resumes
    manifest = manifest_of(rundir)
    assert manifest["ledger"] == {"pretrain": "commit", "click": "commit"}
    assert all(s["completions"] == 1 for s in manifest["stages"].values())
    assert manifest["stages"]["click/retrain"]["attempts"] == 2
    assert rundir.read_bytes("state/weights-pretrain-commit.safetensors") == committed
    assert check_run_invariants(run_dir) == []


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from conure_dist import storage

    target = str(tmp_path / "state" / "file.bin")

    def full_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_fsync)
    with pytest.raises(OSError, match="No space left"):
        storage.write_bytes(target, b"x" * 1000)
    assert os.listdir(tmp_path / "state") == []


# -- the driver killed by SIGKILL at each phase ----------------------------------------------

# Runs the in-process engine and kills itself (SIGKILL: no exception, no cleanup, no lock
# release) at a named point of the click task. Points that cut a write short write part of the
# file under its temporary name first, as a process killed inside the write would leave it.
KILLER = r"""
import json, os, signal, sys
from conure_dist import storage
from conure_dist.config import ExperimentConfig
from conure_dist.train import runner
from conure_dist.train.coordinator import run_experiment

exp = ExperimentConfig.from_dict(json.loads(sys.argv[1]))
run_dir, point = sys.argv[2], sys.argv[3]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

train, evaluate, write = runner.InProcessExecutor.train, runner.InProcessExecutor.evaluate, storage.write_bytes

def killing_train(self, task, number, stage, *args, **kwargs):
    if task.spec.name == "click" and point == f"click/{stage.value}":
        die()
    return train(self, task, number, stage, *args, **kwargs)

def killing_evaluate(self, tasks, *args, **kwargs):
    if point == "click/commit" and len(tasks) == 2:
        die()
    return evaluate(self, tasks, *args, **kwargs)

def killing_write(path, data):
    name = path.rsplit("/", 1)[-1]
    cut = ((point == "owner map write" and name == "owners-v2.safetensors")
           or (point == "manifest write" and name == "manifest.json" and json.loads(data)["ledger"]["click"] == "prune"))
    if point == "click/prune" and name == "manifest.json" and json.loads(data)["ledger"]["click"] == "prune":
        die()  # the prune's owner map and weights are written; the manifest does not point at them yet
    if cut:
        with open(f"{path}.tmp-killed", "wb") as f:
            f.write(data[: len(data) // 2])
        die()
    return write(path, data)

runner.InProcessExecutor.train, runner.InProcessExecutor.evaluate = killing_train, killing_evaluate
storage.write_bytes = killing_write
run_experiment(exp, run_dir, in_process=True)
print("not killed")
"""


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The same run, never interrupted."""
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    run_experiment(experiment(dataset), run_dir, in_process=True)
    return RunDir(run_dir)


@pytest.mark.parametrize("point", ["click/train", "click/prune", "owner map write", "manifest write", "click/retrain",
                                   "click/commit"])
def test_a_driver_killed_at_any_phase_resumes_without_running_a_stage_twice(dataset, reference, tmp_path, point):
    exp = experiment(dataset)
    run_dir = str(tmp_path / "run")
    # The two-task run in a process of its own, killed inside click (pretrain committed).
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    killed = subprocess.run([sys.executable, "-c", KILLER, json.dumps(exp.to_dict()), run_dir, point],
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr[-3000:]
    rundir = RunDir(run_dir)
    at_kill = manifest_of(rundir)  # whole: written under a temporary name, renamed
    assert at_kill["ledger"]["pretrain"] == "commit" and at_kill["ledger"]["click"] != "commit"
    assert check_run_invariants(run_dir) == []  # what the manifest points at is whole
    for name in os.listdir(rundir.path("state")):  # no half-written file under a real name
        if ".tmp-" not in name:
            rundir.read_tensors(f"state/{name}")
    cut = {"owner map write": "state/owners-v2.safetensors", "manifest write": "manifest.json"}.get(point)
    if cut:  # killed inside the write: the part written is under the temporary name only
        assert os.path.exists(rundir.path(cut + ".tmp-killed"))
        assert cut == "manifest.json" or not rundir.exists(cut)
    committed = rundir.read_bytes("state/weights-pretrain-commit.safetensors")
    # The same command again: the stale lock of the killed driver is taken over, the run resumes.
    run_experiment(exp, run_dir, in_process=True)
    manifest = manifest_of(rundir)
    assert manifest["ledger"] == {"pretrain": "commit", "click": "commit"}
    for key, stage in manifest["stages"].items():
        assert stage["status"] == "done" and stage["completions"] == 1, (key, stage)
        if key.startswith("pretrain/"):
            assert stage == at_kill["stages"][key], key  # nothing of pretrain ran again
    interrupted = {"owner map write": "click/prune", "manifest write": "click/prune"}.get(point, point)
    assert manifest["stages"][interrupted]["attempts"] == 2
    assert rundir.read_bytes("state/weights-pretrain-commit.safetensors") == committed
    assert check_run_invariants(run_dir) == []
    left = [n for d in ("", "state") for n in os.listdir(rundir.path(d) if d else run_dir) if ".tmp-" in n]
    assert not left, left  # what the killed writes left is gone
    # And the results are bit for bit those of the run that was never interrupted.
    for rel in ("state/weights-click-commit.safetensors", "state/owners-v2.safetensors"):
        assert rundir.read_bytes(rel) == reference.read_bytes(rel), rel
    assert manifest["accuracy"] == manifest_of(reference)["accuracy"]


def test_exporting_a_damaged_commit_for_serving_is_refused_naming_the_file(finished, tmp_path):
    from conure_dist import serve
    from conure_dist.serve.artifact import ModelFileError

    rundir = copy_run(finished["conure"], tmp_path)
    serve.export_model(rundir.uri, str(tmp_path / "model"))  # intact: exported
    _flip_last_byte(rundir.path("state/weights-click-commit.safetensors"))
    with pytest.raises(ModelFileError, match=r"weights-click-commit.safetensors: checksum mismatch"):
        serve.export_model(rundir.uri, str(tmp_path / "model"), overwrite=True)
    serve.export_model(rundir.uri, str(tmp_path / "model"), as_of="pretrain", overwrite=True)  # its commit is intact


def test_a_stage_checkpoint_is_checked_against_the_digests_its_ranks_recorded(tmp_path):
    """What a resumed Ray Train worker checks before loading a checkpoint (the real path, with
    Ray, is in test_faults_ray.py)."""
    import torch

    from conure_dist.train.worker import (PROGRESS_FILE, _checkpoint_damage, _checkpoint_key, _checkpoint_step,
                                         _own_checkpoint, _write_checksums)

    cpu = torch.device("cpu")
    d = tmp_path / "step-000000006-e0-a1"
    (d / "stage").mkdir(parents=True)
    (d / PROGRESS_FILE).write_text(json.dumps({"step": 6, "world_size": 2}))
    (d / "stage" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
    _write_checksums(str(d), rank=0)
    assert _checkpoint_damage(str(d), 0, cpu) == ""
    # rank 1 wrote the checkpoint too (world size 2), but its checksums never arrived
    assert _checkpoint_damage(str(d), 1, cpu).startswith("checksums-rank1.json: ")
    _write_checksums(str(d), rank=1)
    assert _checkpoint_damage(str(d), 1, cpu) == ""
    assert _checkpoint_damage(str(d), 2, cpu) == ""  # a rank added since wrote nothing there
    with open(d / "stage" / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(500)
    assert _checkpoint_damage(str(d), 0, cpu) == ("stage/mp_rank_00_model_states.pt (500 bytes) does not match the "
                                                  "checksum recorded when it was written")
    for rank in (0, 1):  # a checkpoint written before the checksums: its progress file only
        (d / f"checksums-rank{rank}.json").unlink()
    assert _checkpoint_damage(str(d), 0, cpu) == ""
    (d / PROGRESS_FILE).write_text('{"step": ')
    assert _checkpoint_damage(str(d), 0, cpu).startswith(f"{PROGRESS_FILE}: ")
    assert [_checkpoint_step(n) for n in ("step-000000006-e0-a1", "final-000000012-e2-a7", "eval-3890cdb9", "x")] == \
        [6, 12, None, None]
    # A session's checkpoints of every stage sit side by side: each name ends with its stage key.
    names = ("step-000000006-e0-a1r4-click-train", "final-000000012-e2-a7-pretrain-retrain", "step-000000006-e0-a1",
             "eval-3890cdb9-x-y", "x")
    assert [_checkpoint_key(n) for n in names] == ["click-train", "pretrain-retrain", "", "", ""]

    class Latest:
        path = "bucket/runs/r/ray/id/session/step-000000006-e0-a1-click-train/"

    assert _own_checkpoint(Latest, "click-train") is Latest
    assert _own_checkpoint(Latest, "click-retrain") is None and _own_checkpoint(None, "click-train") is None


def _stage_checkpoint_dir(d) -> None:
    """A stage's final checkpoint as its ranks write it: DeepSpeed state, rank 0's best weights
    and result, each rank's checksums."""
    import torch
    from safetensors.torch import save_file

    from conure_dist.train.worker import BEST_FILE, PROGRESS_FILE, RESULT_FILE, _write_checksums

    (d / "stage").mkdir(parents=True)
    (d / "stage" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
    (d / PROGRESS_FILE).write_text(json.dumps({"step": 6, "world_size": 1}))
    (d / RESULT_FILE).write_text(json.dumps({"progress": {"step": 6}, "timing": {"first_step": 1.0}}))
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(d / BEST_FILE))
    _write_checksums(str(d), rank=0)


def test_the_driver_reads_a_stages_result_alone_and_checked_locally_and_from_object_storage(tmp_path, s3_server,
                                                                                             monkeypatch):
    import pyarrow.fs as pafs
    import torch

    from conure_dist import storage
    from conure_dist.train.worker import BEST_FILE, RESULT_FILE, ResultDamaged, read_stage_result

    d = tmp_path / "final-000000006-e1-a1-pretrain-train"
    _stage_checkpoint_dir(d)
    bucket = s3_server()
    uri = f"s3://{bucket}/run/ray/id/session/{d.name}"
    for rel in storage.list_files(str(d)):
        storage.write_bytes(f"{uri}/{rel}", (d / rel).read_bytes())
    for location in (str(d), uri):
        best, outcome = read_stage_result(location)
        assert torch.equal(best["w"], torch.arange(6, dtype=torch.float32))
        assert outcome == {"progress": {"step": 6}, "timing": {"first_step": 1.0}}

    # Nothing but those files and rank 0's checksums is opened: no rank's DeepSpeed state.
    opened, real = [], storage.filesystem

    class Recording:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_input_stream(self, path):
            opened.append(path.rsplit("/", 1)[-1])
            return self.fs.open_input_stream(path)

    monkeypatch.setattr(storage, "filesystem", lambda path: (Recording(real(path)[0]), real(path)[1]))
    assert read_stage_result(uri)[1]["progress"] == {"step": 6}
    assert sorted(opened) == ["best.safetensors", "checksums-rank0.json", "result.json"]
    monkeypatch.undo()

    _flip_last_byte(str(d / BEST_FILE))
    with pytest.raises(ResultDamaged, match=f"{d / BEST_FILE} does not match the checksum recorded when it was written"):
        read_stage_result(str(d))
    storage.write_bytes(f"{uri}/{RESULT_FILE}", b'{"progress": {}}')
    with pytest.raises(ResultDamaged, match=f"{uri}/{RESULT_FILE} does not match the checksum"):
        read_stage_result(uri)
    fs, inner = storage.filesystem(uri)
    fs.delete_file(f"{inner}/{BEST_FILE}")
    with pytest.raises(ResultDamaged, match=f"{uri}/{BEST_FILE}: not found"):
        read_stage_result(uri)
    assert fs.get_file_info(inner).type == pafs.FileType.Directory

    # Rank 0's checksums missing where another rank's are: damaged. None at all: a checkpoint
    # written before the checksums, read unchecked (the workers resume from one the same way).
    (d / "checksums-rank0.json").rename(d / "checksums-rank1.json")
    with pytest.raises(ResultDamaged, match="checksums-rank0.json: not found"):
        read_stage_result(str(d))
    (d / "checksums-rank1.json").unlink()
    best, outcome = read_stage_result(str(d))
    assert best["w"].shape == (6,) and outcome["progress"] == {"step": 6}
    (d / RESULT_FILE).unlink()
    with pytest.raises(ResultDamaged, match=f"{d / RESULT_FILE}: not found"):
        read_stage_result(str(d))


def test_a_resumed_rank_downloads_its_checkpoint_from_object_storage_once(tmp_path, s3_server, monkeypatch):
    """The intact checkpoint is checked and then loaded from the same local directory; a damaged
    one's download is released before the next is tried."""
    import contextlib

    import torch
    from ray.train import Checkpoint

    from conure_dist import storage
    from conure_dist.train.worker import PROGRESS_FILE, _intact_checkpoint

    bucket = s3_server()
    session = f"s3://{bucket}/run/ray/id/session"
    for step in (4, 6):
        d = tmp_path / f"step-00000000{step}-e0-a1-click-train"
        _stage_checkpoint_dir(d)
        for rel in storage.list_files(str(d)):
            storage.write_bytes(f"{session}/{d.name}/{rel}", (d / rel).read_bytes())
    downloads = []
    real = Checkpoint.as_directory

    @contextlib.contextmanager
    def counted(self):
        with real(self) as local:
            downloads.append((self.path.rsplit("/", 1)[-1], local))
            yield local

    monkeypatch.setattr(Checkpoint, "as_directory", counted)
    fs, inner = storage.filesystem(session)
    latest = Checkpoint(path=f"{inner}/step-000000006-e0-a1-click-train", filesystem=fs)
    cpu = torch.device("cpu")
    with contextlib.ExitStack() as held:
        checkpoint, d, damaged = _intact_checkpoint(latest, 0, cpu, held)
        assert checkpoint is latest and damaged == [] and downloads == [("step-000000006-e0-a1-click-train", d)]
        assert json.loads(open(os.path.join(d, PROGRESS_FILE)).read())["step"] == 6  # still there to load from
    assert not os.path.exists(d)  # released when the caller is done with it

    downloads.clear()
    storage.write_bytes(f"{session}/step-000000006-e0-a1-click-train/stage/mp_rank_00_model_states.pt", b"y" * 1000)
    with contextlib.ExitStack() as held:
        checkpoint, d, damaged = _intact_checkpoint(latest, 0, cpu, held)
        assert checkpoint.path.endswith("step-000000004-e0-a1-click-train") and os.path.isdir(d)
        assert [path.rsplit("/", 1)[-1] for path, _ in damaged] == ["step-000000006-e0-a1-click-train"]
        assert [name for name, _ in downloads] == ["step-000000006-e0-a1-click-train", "step-000000004-e0-a1-click-train"]
        assert not os.path.exists(downloads[0][1])  # the damaged one's download is gone already
    assert not os.path.exists(d)


def test_the_checker_finds_a_status_report_that_does_not_match_the_ledger(finished, tmp_path):
    from conure_dist.train.invariants import check_run_invariants

    rundir = copy_run(finished["conure"], tmp_path)
    assert check_run_invariants(rundir.uri) == []
    rundir.write_text("reports/STATUS.txt", "incomplete: 1 of 2 tasks committed\n")
    assert check_run_invariants(rundir.uri) == []  # one commit behind, as after a crash right after the commit
    manifest = rundir.read_json("manifest.json")
    manifest["ledger"]["click"] = "retrain"
    rundir.write_json("manifest.json", manifest)
    rundir.write_text("reports/STATUS.txt", "complete: all 2 tasks committed\n")
    assert any("STATUS.txt says 'complete', but the run is not complete" in p for p in check_run_invariants(rundir.uri))
