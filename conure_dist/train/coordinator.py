"""The coordinator: runs a method's stage machine over Ray Train, owns the run directory.

Each train/retrain stage is one ``TorchTrainer.fit()`` named ``<task>-<stage>`` under the run
directory's Ray storage, so a rerun of the same command resumes it from its last checkpoint
(Ray Train loads the run snapshot by name). Between stages the coordinator merges the stage's
best weights into the committed ones, prunes, evaluates, and records everything in the
manifest, written atomically after every step of the plan. A rerun skips every completed step.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from conure_dist.config import ExperimentConfig, TaskPlan
from conure_dist.eval.evaluate import main_metric
from conure_dist.model import ConureModel, OwnerMap, Stage, Weights
from conure_dist.train.machine import RunState, StageMachine
from conure_dist.train.plan import Ledger, Step, get_method
from conure_dist.train.rundir import FORMAT_VERSION, MANIFEST, RunDir, RunDirError, config_fingerprint, csv_text, now
from conure_dist.train.worker import BEST_FILE, RESULT_FILE, evaluate_worker, stage_worker


def _log(line: str) -> None:
    print(line, flush=True)


class RayExecutor:
    """Runs stages and evaluations as Ray Train fits with DeepSpeed workers."""

    def __init__(self, exp: ExperimentConfig, rundir: RunDir, manifest: "Manifest", *, fail_once_at_step: dict | None = None):
        from conure_dist.data.format import load_dataset_info

        self.exp, self.rundir, self.manifest = exp, rundir, manifest
        self.info = load_dataset_info(exp.dataset)
        self.fail_once_at_step = fail_once_at_step or {}
        self._datasets: dict[tuple[str, str], Any] = {}

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.exp.cluster.resolved_precision == "bf16" else torch.float32

    # -- Ray plumbing ------------------------------------------------------------------
    def _trainer(self, fn, loop_config: dict[str, Any], datasets: dict[str, tuple[str, str]], name: str):
        """A TorchTrainer over ``datasets`` (name -> (task, split)), each split exactly once per epoch."""
        import ray.train
        from ray.train.torch import TorchTrainer

        from conure_dist.data.pipeline import ExactlyOnceDataConfig, split_size

        c = self.exp.cluster
        resources = {"CPU": c.cpus_per_worker}
        if c.use_gpu:
            resources["GPU"] = c.gpus_per_worker
        if c.memory_per_worker:
            resources["memory"] = c.memory_per_worker
        return TorchTrainer(
            fn,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources),
            datasets={n: self._dataset(task, split) for n, (task, split) in datasets.items()},
            dataset_config=ExactlyOnceDataConfig(
                {n: split_size(self.info, task, split) for n, (task, split) in datasets.items()},
                datasets_to_split=list(datasets),
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=self.rundir.storage_uri("ray"),
                failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": _worker_env()},
            ),
        )

    def _dataset(self, task: str, split: str):
        """The Ray Dataset of a split: streamed from Parquet, or, when small, read once into the
        object store (Ray Data's per-epoch start-up dominates small splits)."""
        import pyarrow.parquet as pq

        from conure_dist.data.pipeline import read_split

        key = (task, split)
        if key not in self._datasets:
            ds = read_split(self.info, task, split)
            footers = [pq.read_metadata(f) for f in self.info.split_files(task, split)]
            size = sum(m.row_group(i).total_byte_size for m in footers for i in range(m.num_row_groups))
            if size < self.exp.cluster.cache_splits_below_bytes:
                ds = ds.materialize()
            self._datasets[key] = ds
        return self._datasets[key]

    def _loop_config(self, key: str, weights: Weights, owners: OwnerMap | None) -> dict[str, Any]:
        self.rundir.write_tensors(f"stages/{key}/weights.safetensors", weights)
        config = {
            "experiment": self.exp.to_dict(),
            "run_dir": self.rundir.uri,
            "input_weights": f"stages/{key}/weights.safetensors",
            "input_owners": None,
            "threads": max(1, int(self.exp.cluster.cpus_per_worker)),
        }
        if owners is not None:
            self.rundir.write_tensors(f"stages/{key}/owners.safetensors", owners.state_dict())
            config["input_owners"] = f"stages/{key}/owners.safetensors"
        return config

    # -- StageExecutor -----------------------------------------------------------------
    def train(self, task: TaskPlan, number: int, stage: Stage, weights: Weights, owners: OwnerMap | None) -> Weights:
        from safetensors.torch import load_file

        name = task.spec.name
        key = f"{name}-{stage.value}"
        config = self._loop_config(key, weights, owners)
        if task.spec.kind != "class":  # samplers need the popularity of items / labels
            counts = torch.as_tensor(self.info.popularity(name))
            self.rundir.write_tensors(f"stages/{key}/popularity.safetensors", {"counts": counts})
            config["popularity"] = f"stages/{key}/popularity.safetensors"
        started = time.time()
        config.update(task=name, stage=stage.value, train_rows=self.info.task(name).counts["train"],
                      fit_started=started, tensorboard_dir=self._tensorboard_dir(key))
        if key in self.fail_once_at_step:
            config["fail_once_at_step"] = self.fail_once_at_step[key]
            config["fail_marker"] = os.path.join(tempfile.gettempdir(), f"conure-fail-{uuid.uuid5(uuid.NAMESPACE_URL, self.rundir.uri + key)}")
        datasets = {"train": (name, "train"), "validation": (name, "validation")}
        self.manifest.stage_started(f"{name}/{stage.value}")
        result = self._trainer(stage_worker, config, datasets, key).fit()
        finished = time.time()
        if result.checkpoint is None:
            raise RuntimeError(f"stage {key} returned no checkpoint (error: {result.error})")
        with result.checkpoint.as_directory() as d:
            best = load_file(os.path.join(d, BEST_FILE))
            outcome = json.load(open(os.path.join(d, RESULT_FILE)))
        timing = outcome["timing"]
        overhead = {}
        if timing.get("first_step") and timing.get("last_step"):
            overhead = {"startup_s": round(timing["first_step"] - started, 2), "teardown_s": round(finished - timing["last_step"], 2)}
        self.manifest.stage_trained(f"{name}/{stage.value}", outcome["progress"], fit_seconds=round(finished - started, 2),
                                    checkpoint=result.checkpoint.path, **overhead)
        return best

    def evaluate(self, tasks: Sequence[TaskPlan], weights: Weights, owners: OwnerMap | None) -> dict[str, dict[str, float]]:
        key = f"eval-{uuid.uuid4().hex[:8]}"
        config = self._loop_config("eval", weights, owners)
        config["eval_tasks"] = [t.spec.name for t in tasks]
        datasets = {f"test_{t.spec.name}": (t.spec.name, "test") for t in tasks}
        result = self._trainer(evaluate_worker, config, datasets, key).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"evaluation returned no checkpoint (error: {result.error})")
        with result.checkpoint.as_directory() as d:
            return json.load(open(os.path.join(d, RESULT_FILE)))

    def _tensorboard_dir(self, key: str) -> str | None:
        if self.rundir.local:
            return self.rundir.path("tensorboard", key)
        return None  # remote run directories: follow progress in the job logs


def _worker_env() -> dict[str, str]:
    keep = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_DATA_DISABLE_PROGRESS_BARS", "DS_ACCELERATOR",
            "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "PYTHONPATH")
    return {k: os.environ[k] for k in keep if k in os.environ}


class Manifest:
    """The run manifest (``manifest.json``); written atomically after every change."""

    def __init__(self, rundir: RunDir, data: dict[str, Any]):
        self.rundir, self.data = rundir, data

    def save(self) -> None:
        self.data["updated"] = now()
        self.rundir.write_json(MANIFEST, self.data)

    def _stage(self, key: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(key, {"status": "pending", "attempts": 0, "completions": 0})

    def stage_started(self, key: str) -> None:
        s = self._stage(key)
        s.update(status="running", attempts=s["attempts"] + 1, started=now())
        self.save()

    def stage_trained(self, key: str, progress: dict, **info: Any) -> None:
        s = self._stage(key)
        s.update(progress={k: v for k, v in progress.items() if k != "history"}, history=progress.get("history", []), **info)
        self.save()

    def step_done(self, key: str, **info: Any) -> None:
        s = self._stage(key)
        s.update(status="done", completions=s["completions"] + 1, finished=now(), **info)
        self.save()


@dataclass
class Run:
    exp: ExperimentConfig
    rundir: RunDir
    manifest: Manifest
    state: RunState


def open_run(exp: ExperimentConfig, run_dir: str, *, new_run: bool = False, add_task: bool = False) -> Run:
    """Create the run directory, or reopen it to resume; refuse one made with another config."""
    rundir = RunDir(run_dir)
    names = [t.spec.name for t in exp.tasks]
    fingerprint = config_fingerprint(exp.fingerprint_dict())
    if rundir.exists(MANIFEST) and not new_run:
        data = rundir.read_json(MANIFEST)
        if data.get("format_version") != FORMAT_VERSION:
            raise RunDirError(f"{rundir.path(MANIFEST)}: format version {data.get('format_version')} is not {FORMAT_VERSION}")
        if data["fingerprint"] != fingerprint:
            raise RunDirError(
                f"{rundir.uri} holds a run made with a different configuration (fingerprint {data['fingerprint']} != "
                f"{fingerprint}). Use the same options to resume, another --run-dir, or --new-run to start over there."
            )
        old = data["tasks"]
        if old != names:
            if not (add_task and names[: len(old)] == old and len(names) > len(old)):
                raise RunDirError(
                    f"{rundir.uri} was run with tasks {old}; got {names}. To extend a run with new tasks, keep the "
                    "old ones first in the same order and pass --add-task."
                )
            # Compare as JSON values (the manifest stores them with sorted keys).
            if any(json.loads(json.dumps(t)) != o for t, o in zip(exp.to_dict()["tasks"], data["config"]["tasks"])):
                raise RunDirError(f"{rundir.uri}: the settings of the existing tasks changed; only new tasks may be added")
            data["tasks"], data["config"] = names, exp.to_dict()
        manifest = Manifest(rundir, data)
        state = RunState(
            weights=rundir.read_tensors(data["state"]["weights"]),
            owners=OwnerMap.from_state_dict(rundir.read_tensors(data["state"]["owners"])),
            ledger=Ledger(names, data["ledger"]),
            accuracy=list(data["accuracy"]),
        )
        state.weights = _with_new_heads(exp, state.weights)
        manifest.data["ledger"] = state.ledger.to_dict()
        manifest.save()
        return Run(exp, rundir, manifest, state)
    torch.manual_seed(exp.seed)
    model = ConureModel(exp.model, [t.spec for t in exp.tasks])
    state = RunState(model.weights(), model.new_owner_map(), Ledger(names))
    manifest = Manifest(rundir, {
        "format_version": FORMAT_VERSION, "created": now(), "fingerprint": fingerprint, "config": exp.to_dict(),
        "method": exp.method, "tasks": names, "ledger": state.ledger.to_dict(), "stages": {}, "accuracy": [],
        "owner_map_version": 0, "state": {},
    })
    _save_state(manifest, state, "init")
    return Run(exp, rundir, manifest, state)


def _with_new_heads(exp: ExperimentConfig, weights: Weights) -> Weights:
    """Weights of a resumed run plus freshly initialised heads for tasks added since."""
    torch.manual_seed(exp.seed + len(exp.tasks))
    fresh = ConureModel(exp.model, [t.spec for t in exp.tasks]).weights()
    return {**{k: v for k, v in fresh.items() if k.startswith("heads.") and k not in weights}, **weights}


def _save_state(manifest: Manifest, state: RunState, tag: str) -> None:
    """Write weights and owner map under new names, then point the manifest at them."""
    rundir, old = manifest.rundir, dict(manifest.data["state"])
    version = manifest.data["owner_map_version"]
    owners_file = f"state/owners-v{version}.safetensors"
    if old.get("owners") != owners_file:
        rundir.write_tensors(owners_file, state.owners.state_dict())
    weights_file = f"state/weights-{tag}.safetensors"
    rundir.write_tensors(weights_file, state.weights)
    manifest.data["state"] = {"weights": weights_file, "owners": owners_file}
    manifest.data["ledger"] = state.ledger.to_dict()
    manifest.data["accuracy"] = state.accuracy
    manifest.save()
    # Committed versions stay (each task can be served as of its commit); others are replaced.
    if old.get("weights") and old["weights"] != weights_file and not old["weights"].endswith("-commit.safetensors"):
        rundir.delete(old["weights"])


def write_reports(run: Run) -> None:
    state, names = run.state, {i + 1: t.spec.name for i, t in enumerate(run.exp.tasks)}
    run.rundir.write_text("reports/accuracy_matrix.csv", csv_text(state.accuracy, ("after_task", "task", "metric", "value")))
    run.rundir.write_text("reports/capacity.txt", state.owners.capacity_table(names) + "\n")


def run_experiment(exp: ExperimentConfig, run_dir: str, *, new_run: bool = False, add_task: bool = False,
                   fail_once_at_step: dict | None = None) -> Run:
    """Run (or resume) every pending step of the plan; returns the finished run."""
    run = open_run(exp, run_dir, new_run=new_run, add_task=add_task)
    executor = RayExecutor(exp, run.rundir, run.manifest, fail_once_at_step=fail_once_at_step)
    machine = StageMachine(get_method(exp.method), exp.tasks, executor)
    pending = machine.pending(run.state)
    if not pending:
        _log(f"run {run_dir}: every stage is complete")
    for planned in pending:
        started = time.time()
        _log(f"== {planned.key} ==")
        if planned.step not in (Step.TRAIN, Step.RETRAIN):
            run.manifest.stage_started(planned.key)
        machine.execute(planned, run.state)
        if planned.step is Step.PRUNE:
            run.manifest.data["owner_map_version"] += 1
        _save_state(run.manifest, run.state, planned.key.replace("/", "-"))
        info: dict[str, Any] = {"seconds": round(time.time() - started, 2), "owner_map_version": run.manifest.data["owner_map_version"]}
        if planned.step is Step.PRUNE:
            cap = run.state.owners.capacity()
            info["capacity"] = {"owned": cap.fraction(machine.number(planned.task)), "free": cap.free_fraction}
        if planned.step is Step.COMMIT:
            info["metrics"] = {r["task"]: {r["metric"]: r["value"]} for r in run.state.accuracy if r["after_task"] == planned.task
                               and r["metric"] == main_metric(exp.task(r["task"]).spec, exp.task(r["task"]).train.metric_k)}
            write_reports(run)
            _log(f"   committed {planned.task}: " + ", ".join(f"{t} {next(iter(m.items()))[0]}={next(iter(m.values())):.4f}" for t, m in info["metrics"].items()))
        run.manifest.step_done(planned.key, **info)
    write_reports(run)
    return run
