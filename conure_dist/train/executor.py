"""Runs a method's training stages and evaluations as Ray Train fits with DeepSpeed workers.

Each train/retrain stage is one ``TorchTrainer.fit()`` named ``<task>-<stage>`` under
``RUN_DIR/ray/<run id>/``, so a rerun of the same command resumes it from its last checkpoint
(Ray Train loads the run snapshot by name), and a run started over (``--new-run``, a new run
id) can never pick up another run's checkpoints.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any, Sequence

import torch

from conure_dist.config import ExperimentConfig, TaskPlan
from conure_dist.model import OwnerMap, Stage, Weights
from conure_dist.train.rundir import RunDir, RunDirError
from conure_dist.train.worker import BEST_FILE, RESULT_FILE, evaluate_worker, peak_rss_bytes, stage_worker

if TYPE_CHECKING:
    from conure_dist.train.manifest import Manifest


class StageFailed(RuntimeError):
    """A stage's workers failed (after Ray Train's retries); the message is the workers' error."""


def _fit(trainer, what: str):
    """``trainer.fit()``, with a failure reduced to the workers' own error message."""
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()
    except TrainingFailedError as e:
        failures = getattr(e, "worker_failures", None) or {}
        causes = sorted({_last_line(str(f)) for f in failures.values()}) or [_last_line(str(e))]
        raise StageFailed(f"{what} failed: " + "; ".join(causes)) from e
    if result.checkpoint is None:
        raise StageFailed(f"{what} returned no checkpoint (error: {result.error})")
    return result


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


class RayExecutor:
    """Runs stages and evaluations as Ray Train fits with DeepSpeed workers."""

    def __init__(self, exp: ExperimentConfig, rundir: RunDir, manifest: "Manifest", *, fail_once_at_step: dict | None = None,
                 kill_once_at_step: dict | None = None, events=None):
        """``fail_once_at_step`` / ``kill_once_at_step`` (tests): stage key (``click-train``) ->
        the optimizer step at which rank 0 raises an exception / is killed by SIGKILL, once."""
        from conure_dist.data.format import load_dataset_info

        from conure_dist.train.manifest import recorded_reader

        # The run's own reader, as open_run resolved and recorded it: it is part of the data order.
        recorded = recorded_reader(manifest.data["settings"])
        if exp.cluster.reader == "auto":
            from dataclasses import replace

            exp = replace(exp, cluster=replace(exp.cluster, reader=recorded))
        elif exp.cluster.reader != recorded:
            raise RunDirError(f"{rundir.uri} was made with cluster.reader {recorded}; got {exp.cluster.reader} "
                              "(the reader is part of the data order)")
        self.exp, self.rundir, self.manifest = exp, rundir, manifest
        self.run_id = manifest.data["run_id"]
        self.info = load_dataset_info(exp.dataset)
        self.fail_once_at_step = fail_once_at_step or {}
        self.kill_once_at_step = kill_once_at_step or {}
        self.events = events  # a Ray queue to the driver's log (conure_dist.logs.EventChannel)
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
                {n: split_size(self.info, task, split, self._max_rows(split)) for n, (task, split) in datasets.items()},
                datasets_to_split=list(datasets),
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=self.rundir.storage_uri("ray", self.run_id),
                failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": _worker_env()},
            ),
        )

    def _dataset(self, task: str, split: str):
        from conure_dist.data.pipeline import split_dataset

        key = (task, split)
        if key not in self._datasets:
            self._datasets[key] = split_dataset(self.info, task, split, seed=self.exp.seed,
                                                cache_below_bytes=self.exp.cluster.cache_splits_below_bytes,
                                                max_rows=self._max_rows(split), reader=self.exp.cluster.reader)
        return self._datasets[key]

    def _max_rows(self, split: str) -> int:
        return 0 if split == "train" else self.exp.max_eval_rows

    def _loop_config(self, key: str, weights: Weights, owners: OwnerMap | None) -> dict[str, Any]:
        self.rundir.write_tensors(f"stages/{key}/weights.safetensors", weights)
        config = {
            "experiment": self.exp.to_dict(),
            "run_dir": self.rundir.uri,
            "input_weights": f"stages/{key}/weights.safetensors",
            "input_owners": None,
            "threads": max(1, int(self.exp.cluster.cpus_per_worker)),
            "events": self.events,
        }
        if owners is not None:
            self.rundir.write_tensors(f"stages/{key}/owners.safetensors", owners.state_dict())
            config["input_owners"] = f"stages/{key}/owners.safetensors"
        return config

    # -- StageExecutor -----------------------------------------------------------------
    def train(self, task: TaskPlan, number: int, stage: Stage, weights: Weights, owners: OwnerMap | None,
              scope: str = "all", first: TaskPlan | None = None) -> Weights:
        from safetensors.torch import load_file

        name = task.spec.name
        if scope == "joint":
            raise ValueError(f"task {name}: joint training with the first task (method mtl) runs in process only "
                             "(the comparison job, --compare); the Ray Train workers read one task's data")
        key = f"{name}-{stage.value}"
        config = self._loop_config(key, weights, owners)
        config["scope"] = scope
        if task.spec.kind != "class":  # samplers need the popularity of items / labels
            counts = torch.as_tensor(self.info.popularity(name))
            self.rundir.write_tensors(f"stages/{key}/popularity.safetensors", {"counts": counts})
            config["popularity"] = f"stages/{key}/popularity.safetensors"
        started = time.time()
        config.update(task=name, stage=stage.value, train_rows=self.info.task(name).counts["train"],
                      fit_started=started, tensorboard_dir=self._tensorboard_dir(key))
        if key in self.fail_once_at_step or key in self.kill_once_at_step:
            if key in self.fail_once_at_step:
                config["fail_once_at_step"] = self.fail_once_at_step[key]
            if key in self.kill_once_at_step:
                config["kill_once_at_step"] = self.kill_once_at_step[key]
            config["fail_marker"] = os.path.join(tempfile.gettempdir(), f"conure-fail-{uuid.uuid5(uuid.NAMESPACE_URL, self.rundir.uri + key)}")
        datasets = {"train": (name, "train"), "validation": (name, "validation")}
        self.manifest.stage_started(f"{name}/{stage.value}")
        result = _fit(self._trainer(stage_worker, config, datasets, key), f"task {name}, {stage.value} stage")
        finished = time.time()
        with result.checkpoint.as_directory() as d:
            best = load_file(os.path.join(d, BEST_FILE))
            outcome = json.load(open(os.path.join(d, RESULT_FILE)))
        timing = outcome["timing"]
        overhead = {k: timing[k] for k in ("peak_rss_bytes", "peak_gpu_bytes", "memory_milestones") if k in timing}
        overhead["driver_peak_rss_bytes"] = peak_rss_bytes()
        if timing.get("first_step") and timing.get("last_step"):
            overhead.update(startup_s=round(timing["first_step"] - started, 2), teardown_s=round(finished - timing["last_step"], 2))
        self.manifest.stage_trained(f"{name}/{stage.value}", outcome["progress"], fit_seconds=round(finished - started, 2),
                                    checkpoint=result.checkpoint.path, **overhead)
        return best

    def evaluate(self, tasks: Sequence[TaskPlan], weights: Weights, owners: OwnerMap | None,
                 view: Stage = Stage.SERVE) -> dict[str, dict[str, float]]:
        key = f"eval-{uuid.uuid4().hex[:8]}"
        config = self._loop_config("eval", weights, owners)
        config["eval_tasks"] = [t.spec.name for t in tasks]
        config["view"] = Stage(view).value
        datasets = {f"test_{t.spec.name}": (t.spec.name, "test") for t in tasks}
        result = _fit(self._trainer(evaluate_worker, config, datasets, key), "evaluation")
        with result.checkpoint.as_directory() as d:
            return json.load(open(os.path.join(d, RESULT_FILE)))

    def _tensorboard_dir(self, key: str) -> str:
        return self.rundir.storage_uri("tensorboard", key)


def _worker_env() -> dict[str, str]:
    keep = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_DATA_DISABLE_PROGRESS_BARS", "DS_ACCELERATOR",
            "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "PYTHONPATH")
    return {k: os.environ[k] for k in keep if k in os.environ}
