"""Runs a method's training stages and evaluations on Ray Train workers with DeepSpeed.

One ``TorchTrainer.fit()``, the *session* (:mod:`conure_dist.train.session`), runs every stage
and evaluation of a driver: its workers start once and take the coordinator's commands one
after another. It is named ``session`` under ``RUN_DIR/ray/<run id>/``, so a rerun of the same
command finds the latest checkpoint again (Ray Train loads the run snapshot by name) and the
stage it belongs to resumes from it; a run started over (``--new-run``, a new run id) can never
pick up another run's checkpoints.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Sequence

import torch

from conure_dist.config import ExperimentConfig, TaskPlan
from conure_dist.model import OwnerMap, Stage, Weights
from conure_dist.train.engine import allocator_env
from conure_dist.train.rundir import RunDir, RunDirError
from conure_dist.train.worker import ResultDamaged, peak_rss_bytes, read_stage_result, session_worker

if TYPE_CHECKING:
    from conure_dist.train.manifest import Manifest


class StageFailed(RuntimeError):
    """A stage's workers failed (after Ray Train's retries); the message is the workers' error."""


def _causes(error: BaseException) -> str:
    """A failed fit's error reduced to the workers' own error messages."""
    failures = getattr(error, "worker_failures", None) or {}
    return "; ".join(sorted({_last_line(str(f)) for f in failures.values()}) or [_last_line(str(error))])


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


class RayExecutor:
    """Runs stages and evaluations as commands of a session (one Ray Train fit, DeepSpeed workers)."""

    def __init__(self, exp: ExperimentConfig, rundir: RunDir, manifest: "Manifest", *, fail_once_at_step: dict | None = None,
                 kill_once_at_step: dict | None = None, events=None):
        """``fail_once_at_step`` / ``kill_once_at_step`` (tests): stage key (``click-train``) ->
        the optimizer step at which rank 0 raises an exception / is killed by SIGKILL, once."""
        from conure_dist.data.format import load_dataset_info

        from conure_dist.train.manifest import AUTO_SETTINGS, recorded

        # The run's own data order, as open_run resolved and recorded it.
        for key in AUTO_SETTINGS:
            value = recorded(manifest.data["settings"], key)
            if getattr(exp.cluster, key) == "auto":
                from dataclasses import replace

                exp = replace(exp, cluster=replace(exp.cluster, **{key: value}))
            elif getattr(exp.cluster, key) != value:
                raise RunDirError(f"{rundir.uri} was made with cluster.{key} {value}; got {getattr(exp.cluster, key)} "
                                  f"(the {key.replace('_', ' ')} is part of the data order)")
        cache = manifest.data["settings"].get("cluster.cache_splits_below_bytes")
        if cache is not None and cache != exp.cluster.cache_splits_below_bytes:
            raise RunDirError(f"{rundir.uri} was made with cluster.cache_splits_below_bytes {cache}; got "
                              f"{exp.cluster.cache_splits_below_bytes} (under train_shuffle permute it is part of the data order)")
        self.exp, self.rundir, self.manifest = exp, rundir, manifest
        self.run_id = manifest.data["run_id"]
        self.info = load_dataset_info(exp.dataset)
        self.fail_once_at_step = fail_once_at_step or {}
        self.kill_once_at_step = kill_once_at_step or {}
        self.events = events  # a Ray queue to the driver's log (conure_dist.logs.EventChannel)
        self._datasets: dict[tuple[str, str], Any] = {}
        self._session: Session | None = None
        self.eval_seconds: list[float] = []  # each evaluation's time in the workers, read by the coordinator

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.exp.cluster.resolved_precision == "bf16" else torch.float32

    # -- Ray plumbing ------------------------------------------------------------------
    def _run(self, kind: str, config: dict[str, Any], datasets: dict[str, tuple[str, str]], what: str) -> Any:
        """Run one command in the session (started at the first one, and again after a failed one);
        ``datasets``: name -> (task, split), each split read exactly once per epoch."""
        if self._session is None:
            self._session = Session(self)
        reads = {name: f"{task}.{split}" for name, (task, split) in datasets.items()}
        sources = {f"{task}.{split}": self._source(task, split)
                   for task, split in datasets.values() if f"{task}.{split}" not in self._session.posted}
        try:
            answer = self._session.run(kind, config, reads, sources, what)
        except StageFailed:
            self.close()
            raise
        if self.exp.cluster.worker_group == "stage":
            self.close(timeout_s=None)  # until the fit has ended: the next command's has the same name and storage
        return answer

    def close(self, wait: bool = True, timeout_s: float | None = 120.0) -> None:
        """Stop the session's workers (the next command starts a new session); ``wait``: until
        they have stopped, at most ``timeout_s`` (not when the driver is on its way out after an
        error)."""
        if self._session is not None:
            session, self._session = self._session, None
            session.close(wait, timeout_s)

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
            return
        try:  # on the way out after an error: never hide it behind one of closing
            self.close(wait=False)
        except Exception as e:  # noqa: BLE001
            logging.getLogger("conure_dist").warning(f"could not stop the session's workers: {e}")

    def _dataset(self, task: str, split: str, size):
        """What the mailbox hands the workers of a split, read once per run: each rank's
        :class:`~conure_dist.data.pipeline.Part` of a split held in the object store (splits
        read into it, and cut into parts (:meth:`_parts`)), else the Ray Dataset it splits for
        them (a streaming split). ``size``: the split's row count and schema (to pad it)."""
        from ray.data.dataset import MaterializedDataset

        from conure_dist.data.pipeline import split_dataset, split_in_memory

        key = (task, split)
        if key not in self._datasets:
            data = split_dataset(self.info, task, split, seed=self.exp.seed,
                                 cache_below_bytes=self.exp.cluster.cache_splits_below_bytes,
                                 max_rows=self._max_rows(split), reader=self.exp.cluster.reader, parts=self._parts(split))
            if self._parts(split) and isinstance(data, (list, MaterializedDataset)):  # read whole
                data = split_in_memory(data, size, self.exp.cluster.num_workers)
            self._datasets[key] = data
        return self._datasets[key]

    def _source(self, task: str, split: str) -> tuple[Any, Any, bool]:
        """What the mailbox gives the workers of a split: each rank's part (True) or the dataset
        it splits into streaming splits (False), with the split's size."""
        from conure_dist.data.pipeline import split_size

        size = split_size(self.info, task, split, self._max_rows(split))  # it reads a file's schema: not again for the cut
        data = self._dataset(task, split, size)
        return data, size, isinstance(data, list)

    def _parts(self, split: str) -> bool:
        """Whether a split held in the object store is cut into fixed per-rank parts."""
        return split != "train" or self.exp.cluster.train_shuffle == "permute"

    def _max_rows(self, split: str) -> int:
        return 0 if split == "train" else self.exp.max_eval_rows

    def _loop_config(self, key: str, weights: Weights, owners: OwnerMap | None) -> dict[str, Any]:
        self.rundir.write_tensors(f"stages/{key}/weights.safetensors", weights)
        config = {"input_weights": f"stages/{key}/weights.safetensors", "input_owners": None}
        if owners is not None:
            self.rundir.write_tensors(f"stages/{key}/owners.safetensors", owners.state_dict())
            config["input_owners"] = f"stages/{key}/owners.safetensors"
        return config

    # -- StageExecutor -----------------------------------------------------------------
    def train(self, task: TaskPlan, number: int, stage: Stage, weights: Weights, owners: OwnerMap | None,
              scope: str = "all", first: TaskPlan | None = None) -> Weights:
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
        config["key"] = key
        if self.rundir.exists("ray", self.run_id, key):
            logging.getLogger("conure_dist").info(
                f"{name}/{stage.value}  checkpoints in {self.rundir.path('ray', self.run_id, key)} were written by an "
                "earlier version (one Ray Train fit per stage) and are not resumed from: the stage starts again")
        datasets = {"train": (name, "train"), "validation": (name, "validation")}
        self.manifest.stage_started(f"{name}/{stage.value}")
        answer = self._run("train", config, datasets, f"task {name}, {stage.value} stage")
        finished = time.time()
        checkpoint = self.rundir.storage_uri("ray", self.run_id, SESSION, answer["checkpoint"])
        try:
            best, outcome = read_stage_result(checkpoint)
        except ResultDamaged as e:
            raise StageFailed(f"task {name}, {stage.value} stage: its result cannot be read back ({e}); a rerun "
                              "resumes the stage from its last intact checkpoint") from None
        timing = outcome["timing"]
        overhead = {k: timing[k] for k in ("peak_rss_bytes", "peak_gpu_bytes", "memory_milestones") if k in timing}
        overhead["driver_peak_rss_bytes"] = peak_rss_bytes()
        if timing.get("first_step") and timing.get("last_step"):
            overhead.update(startup_s=round(timing["first_step"] - started, 2), teardown_s=round(finished - timing["last_step"], 2))
        self.manifest.stage_trained(f"{name}/{stage.value}", outcome["progress"], fit_seconds=round(finished - started, 2),
                                    checkpoint=checkpoint, **overhead)
        return best

    def evaluate(self, tasks: Sequence[TaskPlan], weights: Weights, owners: OwnerMap | None,
                 view: Stage = Stage.SERVE) -> dict[str, dict[str, float]]:
        config = self._loop_config("eval", weights, owners)
        config["eval_tasks"] = [t.spec.name for t in tasks]
        config["view"] = Stage(view).value
        datasets = {f"test_{t.spec.name}": (t.spec.name, "test") for t in tasks}
        answer = self._run("evaluate", config, datasets, "evaluation")
        self.eval_seconds.append(answer["seconds"])
        return answer["metrics"]

    def _tensorboard_dir(self, key: str) -> str:
        return self.rundir.storage_uri("tensorboard", key)


SESSION = "session"  # the session fit's name, under RUN_DIR/ray/<run id>/
SESSION_RESTARTS = 20  # worker-group restarts Ray Train allows a session, plus 10 per cluster.max_failures


class Session:
    """The running session fit of a :class:`RayExecutor`, in a driver thread, and its mailbox."""

    def __init__(self, executor: RayExecutor) -> None:
        import ray
        import ray.train
        from ray.train.torch import TorchTrainer

        from conure_dist.train.session import Mailbox

        c = executor.exp.cluster
        resources = {"CPU": c.cpus_per_worker}
        if c.use_gpu:
            resources["GPU"] = c.gpus_per_worker
        if c.memory_per_worker:
            resources["memory"] = c.memory_per_worker
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node, as Ray Train's controller: the session lives as long as the driver.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.mailbox = Mailbox.options(scheduling_strategy=here).remote(c.num_workers, c.max_failures)
        self.started = time.time()
        config = {"experiment": executor.exp.to_dict(), "run_dir": executor.rundir.uri, "mailbox": self.mailbox,
                  "threads": max(1, int(c.cpus_per_worker)), "events": executor.events, "session_started": self.started}
        self.trainer = TorchTrainer(
            session_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources),
            run_config=ray.train.RunConfig(
                name=SESSION,
                storage_path=executor.rundir.storage_uri("ray", executor.run_id),
                # Restarts are counted per command by the mailbox (cluster.max_failures per stage and
                # per evaluation). Ray Train's own limit counts every restart of the session: it
                # ends one whose workers keep failing before they reach the mailbox (and a very
                # long run on flaky nodes; a rerun resumes it).
                failure_config=ray.train.FailureConfig(max_failures=SESSION_RESTARTS + 10 * c.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": _worker_env()},
            ),
        )
        self.error: BaseException | None = None
        self.posted: set[str] = set()  # the split ids the mailbox holds
        self.thread = threading.Thread(target=self._fit, name="conure-session", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # reported by run() to the command waiting for it
            self.error = e

    def run(self, kind: str, config: dict[str, Any], reads: dict[str, str], sources: dict, what: str,
            wait_s: float = 1.0) -> Any:
        """Post a command (``reads``: its dataset names -> split ids; ``sources``: the splits the
        mailbox has not had yet) and wait for its answer."""
        import ray

        seq = ray.get(self.mailbox.post.remote({"kind": kind, "config": config}, reads, sources))
        self.posted.update(sources)
        while True:
            answer = ray.get(self.mailbox.wait_result.remote(seq, wait_s))  # as soon as it is answered
            if answer is not None:
                if isinstance(answer[0], dict) and "error" in answer[0]:
                    raise StageFailed(f"{what} failed: {answer[0]['error']}")
                return answer[0]
            if not self.thread.is_alive():
                cause = _causes(self.error) if self.error is not None else \
                    "the workers stopped before it finished (they kept failing before they reached it)"
                raise StageFailed(f"{what} failed: {cause}") from self.error

    def close(self, wait: bool = True, timeout_s: float | None = 120.0) -> None:
        """Tell the workers to stop after the command in progress (if any); ``wait``: until the
        fit has ended, at most ``timeout_s`` (None: no limit). (A driver that exits takes its
        session with it.)"""
        import ray

        if not self.thread.is_alive():
            return
        ray.get(self.mailbox.post.remote({"kind": "stop"}, {}, {}))
        if wait:
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                logging.getLogger("conure_dist").warning(
                    f"the session's workers did not stop within {timeout_s} s; they stop after their command")


def _worker_env() -> dict[str, str]:
    keep = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_DATA_DISABLE_PROGRESS_BARS", "DS_ACCELERATOR",
            "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "PYTHONPATH")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, **allocator_env()}
