"""The run manifest (``manifest.json``) and the settings a run is resumed under.

A run records every setting that changes what it computes (:func:`result_settings`: the
model, each task's spec and training settings, the seeds, precision, ZeRO stage, the data
order, and the dataset's content). A rerun must match them; :func:`settings_diff` lists the
ones that differ, old and new side by side. Settings that only change how the work is spread
or reported (workers, CPUs/GPUs per worker, checkpoint interval, log interval, failure
retries, the path the dataset was reached by) may change between attempts.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

from conure_dist import storage
from conure_dist.config import ExperimentConfig
from conure_dist.train.rundir import MANIFEST, RunDir, now

# Cluster settings that may change when a run is resumed. An interrupted stage that resumes
# with another number of workers starts that stage over (each rank's data order and optimizer
# shards belong to the world size they were made with); completed stages are kept. Under
# cluster.train_shuffle permute, cache_splits_below_bytes is a result setting all the same
# (see result_settings).
RESUME_FREE_CLUSTER = ("num_workers", "gpus_per_worker", "cpus_per_worker", "memory_per_worker", "max_failures",
                       "checkpoint_every_steps", "log_every_steps", "cache_splits_below_bytes", "worker_group")


def dataset_digest(info_json: Mapping[str, Any]) -> str:
    """Content identity of a prepared dataset (its ``dataset.json``), whatever its path."""
    return hashlib.sha256(json.dumps(info_json, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = json.loads(json.dumps(value))  # tuples -> lists, as stored in JSON


def result_settings(exp: ExperimentConfig, digest: str, engine: str = "ray") -> dict[str, Any]:
    """Every setting that changes a run's results, as ``dotted.name -> value`` (``engine``: the
    one that runs it, ``ray`` or ``in-process``, which reads no Ray Data splits)."""
    data = exp.to_dict()
    out: dict[str, Any] = {"dataset.content": digest}
    for key, value in data.items():
        if key not in ("dataset", "tasks", "cluster"):
            _flatten(key, value, out)
    for key, value in data["cluster"].items():
        if key not in RESUME_FREE_CLUSTER:
            _flatten(f"cluster.{key}", value, out)
    out["cluster.precision"] = exp.cluster.resolved_precision
    if exp.cluster.train_shuffle == "permute" and engine == "ray":  # it decides which train splits are permuted whole
        out["cluster.cache_splits_below_bytes"] = exp.cluster.cache_splits_below_bytes
    for task in data["tasks"]:
        _flatten(f"tasks.{task['spec']['name']}", task, out)
    return out


# Settings added after runs were first written, with the value an older run had in effect: a
# manifest without them resumes when the new value is that one.
ADDED_SETTINGS = {"max_eval_rows": 0, "tasks.*.train.max_steps": 0, "cluster.reader": "parquet",
                  "cluster.train_shuffle": "buffer"}

# Cluster settings of the data order whose ``auto`` is this value for a new run, while a resumed
# run keeps the value it was made with (see :func:`recorded`).
AUTO_SETTINGS = {"reader": "files", "train_shuffle": "permute"}


def recorded(settings: Mapping[str, Any], key: str) -> str:
    """The value of ``cluster.<key>`` (one of :data:`AUTO_SETTINGS`) a run was made with (runs
    made before the setting: the value it had then)."""
    return settings.get(f"cluster.{key}", ADDED_SETTINGS[f"cluster.{key}"])


def _added_default(key: str) -> Any:
    parts = key.split(".")
    for pattern, value in ADDED_SETTINGS.items():
        p = pattern.split(".")
        if len(p) == len(parts) and all(a == "*" or a == b for a, b in zip(p, parts)):
            return value
    return "(not set)"


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], tasks: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """``(setting, old, new)`` for each setting that differs; only tasks in ``tasks`` are compared
    (tasks added to a run have no old settings). A setting that an older run's manifest lacks
    (:data:`ADDED_SETTINGS`) counts as its value then."""
    def compared(key: str) -> bool:
        return not key.startswith("tasks.") or key.split(".")[1] in tasks

    keys = sorted(k for k in set(old) | set(new) if compared(k))
    missing = "(not set)"
    rows = [(k, old.get(k, _added_default(k)), new.get(k, missing)) for k in keys]
    return [(k, o, n) for k, o, n in rows if o != n]


def format_diff(rows: Sequence[tuple[str, Any, Any]]) -> str:
    """The differing settings as an aligned table: setting, this run's value, the new value."""
    table = [("setting", "in the run", "now"), *((k, json.dumps(o), json.dumps(n)) for k, o, n in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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
        """Record a trained stage (``info``: its timings, memory, and with Ray its final
        ``checkpoint``). Ray Train keeps a session's latest two checkpoints, deleting older ones
        as new ones come: an earlier stage's record stops naming its checkpoint when a later
        stage is recorded and finds it gone (one still being deleted then goes at the next)."""
        s = self._stage(key)
        s.update(progress={k: v for k, v in progress.items() if k != "history"}, history=progress.get("history", []), **info)
        for other, record in self.data["stages"].items():
            if other != key and "checkpoint" in record:
                try:
                    gone = not storage.exists(record["checkpoint"])
                except OSError:  # storage unreachable for a moment: the record is kept as it is
                    gone = False
                if gone:
                    del record["checkpoint"]
        self.save()

    def step_done(self, key: str, **info: Any) -> None:
        s = self._stage(key)
        s.update(status="done", completions=s["completions"] + 1, finished=now(), **info)
        self.save()
