"""An exported model: one self-contained directory that serves every committed task of a run.

Layout (``MODEL_DIR``, a local path or a URI)::

    model.json                   format version, model config, tasks (kind, labels, metrics at
                                 commit), method, where it came from, and every file's size and
                                 SHA-256; written last, so a directory without it is incomplete
    weights.safetensors          backbone + the heads (and PeterRec patches) of the exported tasks
    owners.safetensors           the owner map: one uint8 per prunable weight (masking methods)
    sets/<task>.safetensors      methods with one backbone per task: each task's own weights
                                 (instead of weights.safetensors)
    vocab/items.parquet          item id -> original token
    vocab/labels/<task>.parquet  label id -> original token (item and class tasks)

Tensors are safetensors (no pickle); the vocabularies are Parquet. Serving task k reads the
weights owned by tasks 1..k (the owner map's SERVE view), so the exported weights serve every
exported task exactly as it was evaluated when committed.

Example::

    summary = export_model("runs/demo", "models/demo")            # as of the last commit
    summary = export_model("runs/demo", "models/demo-t2", as_of="click")
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from conure_dist import __version__, storage

MODEL_FILE = "model.json"
MODEL_FORMAT = "conure_dist.model"
MODEL_FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """An export that cannot be made, or a model directory that cannot be served; the message
    names the directory or file and what to do."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


# --- reading a run ----------------------------------------------------------------------------


def _read_json(path: str, what: str) -> dict:
    try:
        data = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: not found; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return data


def _read_tensors(path: str, expected: str | None = None) -> dict[str, torch.Tensor]:
    """A run's state file; ``expected``: the digest its manifest recorded (none in older runs)."""
    from conure_dist.train.rundir import digest

    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: not found (the run directory is incomplete)") from None
    if expected is not None and digest(data) != expected:
        raise ModelFileError(f"{path}: checksum mismatch: the file changed since the run wrote it (damaged or "
                             "truncated); restore it from a copy of the run directory")
    try:
        return st_load(data)
    except Exception as e:  # safetensors' own error types
        raise ModelFileError(f"{path}: not a readable safetensors file ({e})") from None


def _kept(name: str, tasks: set[str]) -> bool:
    """Whether a parameter belongs in the export: the backbone, and the exported tasks' heads and patches."""
    if name.startswith(("heads.", "patches.")):
        return name.split(".")[1] in tasks
    return True


@dataclass
class RunCommit:
    """What a run directory holds for one commit: tasks, config, weights, owner map, metrics."""

    run_dir: str
    manifest: dict
    as_of: str
    tasks: list[str]  # exported: T1 .. as_of
    left_out: dict[str, str]  # task -> why it is not exported

    @classmethod
    def open(cls, run_dir: str, as_of: str | None) -> "RunCommit":
        from conure_dist.train.rundir import FORMAT_VERSION, MANIFEST

        run_dir = storage.resolve(run_dir)
        manifest = _read_json(storage.join(run_dir, MANIFEST), "is --run-dir a run directory?")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ModelFileError(f"{storage.join(run_dir, MANIFEST)}: run format {manifest.get('format_version')} "
                                 f"is not {FORMAT_VERSION}; export it with the version that made it")
        names, ledger = list(manifest["tasks"]), manifest["ledger"]
        committed = [t for t in names if ledger.get(t) == "commit"]
        if not committed:
            progress = ", ".join(f"{t}: {ledger.get(t) or 'not started'}" for t in names)
            raise ModelFileError(f"{run_dir}: no task is committed yet, so there is nothing to serve ({progress})")
        as_of = as_of or committed[-1]
        if as_of not in names:
            raise ModelFileError(f"--as-of {as_of}: the run has no such task; its tasks are {names}")
        if as_of not in committed:
            raise ModelFileError(f"--as-of {as_of}: the task is not committed (last step: {ledger.get(as_of) or 'none'}); "
                                 f"committed: {committed}")
        cut = names.index(as_of) + 1
        left_out = {t: ("committed after --as-of" if t in committed else f"not committed (last step: {ledger.get(t) or 'none'})")
                    for t in names[cut:]}
        return cls(run_dir, manifest, as_of, names[:cut], left_out)

    def file(self, rel: str) -> str:
        return storage.join(self.run_dir, rel)

    def _state(self, rel: str) -> dict[str, torch.Tensor]:
        return _read_tensors(self.file(rel), self.manifest.get("state_checksums", {}).get(rel))

    @property
    def commit_info(self) -> dict:
        return self.manifest["stages"].get(f"{self.as_of}/commit", {})

    def weights(self) -> dict[str, torch.Tensor]:
        return self._state(f"state/weights-{self.as_of}-commit.safetensors")

    def owners(self) -> dict[str, torch.Tensor]:
        version = self.commit_info.get("owner_map_version")
        if version is None:
            raise ModelFileError(f"{self.run_dir}: the manifest does not record the owner map of {self.as_of}'s commit")
        return self._state(f"state/owners-v{version}.safetensors")

    def task_set(self, task: str) -> dict[str, torch.Tensor]:
        sets = self.manifest["state"].get("sets", {})
        if task not in sets:
            raise ModelFileError(f"{self.run_dir}: the manifest lists no weight set for task {task}")
        return self._state(sets[task])

    def metrics(self) -> dict[str, dict[str, float]]:
        """Each exported task's test metrics as evaluated at the commit of ``as_of``."""
        out: dict[str, dict[str, float]] = {}
        for row in self.manifest["accuracy"]:
            if row["after_task"] == self.as_of:
                out.setdefault(row["task"], {})[row["metric"]] = row["value"]
        return out


# --- export -----------------------------------------------------------------------------------


def _dataset(commit: RunCommit, data: str | None):
    from conure_dist.data.format import DatasetFormatError, load_dataset_info
    from conure_dist.train.manifest import dataset_digest

    path = data or commit.manifest["config"]["dataset"]
    try:
        info = load_dataset_info(path)
    except (DatasetFormatError, OSError) as e:
        raise ModelFileError(f"the run's dataset cannot be read ({e}); pass --data with the prepared dataset "
                             "the run was trained on (its vocabularies go into the model)") from None
    expected = commit.manifest["settings"].get("dataset.content")
    if expected and dataset_digest(info.to_json()) != expected:
        raise ModelFileError(f"{info.path}: not the dataset the run {commit.run_dir} was trained on (its dataset.json "
                             "differs); pass --data with the right one")
    return info


def export_model(run_dir: str, out: str, *, as_of: str | None = None, data: str | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write the model of ``run_dir`` as of the commit of ``as_of`` (default: the last commit)
    to ``out``; returns the written ``model.json``. ``data``: the prepared dataset, where the
    run's own path no longer reaches it."""
    from conure_dist.config import ExperimentConfig
    from conure_dist.eval.evaluate import main_metric
    from conure_dist.train.plan import get_method
    from conure_dist.train.runner import method_model_config

    commit = RunCommit.open(run_dir, as_of)
    out = storage.resolve(out)
    _refuse_existing(out, overwrite)  # before reading the run's weights
    exp = ExperimentConfig.from_dict(commit.manifest["config"])
    method = get_method(exp.method)
    info = _dataset(commit, data)
    metrics = commit.metrics()
    tasks = []
    for task in commit.tasks:
        plan = exp.task(task)
        tasks.append({"name": task, "kind": plan.spec.kind, "num_labels": plan.spec.num_labels,
                      "metric_k": plan.train.metric_k, "main_metric": main_metric(plan.spec, plan.train.metric_k),
                      "eval_batch_size": plan.train.batch_size, "test_at_commit": metrics.get(task, {})})
    per_task = method.backbones == "per_task"
    return write_model(
        out, model=method_model_config(exp.model, method),
        method=exp.method, tasks=tasks, seq_len=exp.seq_len,
        items=info.item_tokens(), labels={t: info.label_tokens(t) for t in commit.tasks if exp.task(t).spec.kind != "sequence"},
        num_items=info.num_items, oov_item_id=info.oov_item_id,
        weights=None if per_task else commit.weights(),
        sets={t: commit.task_set(t) for t in commit.tasks} if per_task else None,
        owners=commit.owners() if method.masking else None,
        source={"run_dir": commit.run_dir, "run_id": commit.manifest.get("run_id"), "as_of": commit.as_of,
                "dataset": info.path, "left_out": commit.left_out},
        overwrite=overwrite)


def write_model(out: str, *, model, method: str, tasks: list[dict], seq_len: int, items: pa.Table,
                labels: Mapping[str, pa.Table], num_items: int, oov_item_id: int | None,
                weights: Mapping[str, torch.Tensor] | None = None, sets: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                owners: Mapping[str, torch.Tensor] | None = None, source: dict | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Write a model directory: ``model`` (a ModelConfig), the ``tasks`` entries (name, kind,
    num_labels, metric_k, main_metric, eval_batch_size, test_at_commit), the vocabularies, and
    either the shared ``weights`` or each task's own weight set (``sets``); heads and patches of
    tasks not in ``tasks`` are left out. Returns the written ``model.json``."""
    from conure_dist.config import to_dict
    from conure_dist.train.plan import get_method

    out = storage.resolve(out)
    _refuse_existing(out, overwrite)
    names = [t["name"] for t in tasks]
    files: dict[str, bytes] = {}
    if sets is not None:
        for task in names:  # each task serves from its own weights; other tasks' heads are not needed
            files[f"sets/{task}.safetensors"] = tensor_bytes({k: v for k, v in sets[task].items() if _kept(k, {task})})
    else:
        files["weights.safetensors"] = tensor_bytes({k: v for k, v in weights.items() if _kept(k, set(names))})
    if owners is not None:
        files["owners.safetensors"] = tensor_bytes(owners)
    files["vocab/items.parquet"] = parquet_bytes(items.select(["id", "token"]))
    for task in names:
        if task in labels:
            files[f"vocab/labels/{task}.parquet"] = parquet_bytes(labels[task].select(["id", "token"]))
    doc = {
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "conure_dist_version": __version__,
        "created": round(time.time(), 3), "source": source or {},
        "method": method, "masking": owners is not None, "per_task_weights": sets is not None,
        "patched": names[1:] if get_method(method).patched else [],
        "model": to_dict(model), "seq_len": seq_len, "num_items": num_items, "oov_item_id": oov_item_id,
        "tasks": tasks,
        "files": {rel: {"bytes": len(data), "sha256": sha256(data)} for rel, data in sorted(files.items())},
    }
    _publish(out, files, doc, overwrite)
    return doc


def _refuse_existing(out: str, overwrite: bool) -> None:
    if storage.exists(storage.join(out, MODEL_FILE)) and not overwrite:
        raise ModelFileError(f"{out}: already holds a model; pass --overwrite to replace it, or choose another --out")


def _publish(out: str, files: Mapping[str, bytes], doc: dict, overwrite: bool) -> None:
    """Every file first, ``model.json`` last: a reader never takes a half-written directory for
    a model. An overwritten model stops being one before its files are replaced."""
    marker = storage.join(out, MODEL_FILE)
    old = set(storage.list_files(out)) if storage.exists(out) else set()
    if overwrite and MODEL_FILE in old:
        storage.delete_tree(marker)
    for rel, data in files.items():
        storage.write_bytes(storage.join(out, rel), data)
    storage.write_bytes(marker, json.dumps(doc, indent=2, sort_keys=True).encode())
    if overwrite:  # files of the replaced model that the new one does not have
        for rel in old - set(files) - {MODEL_FILE}:
            if rel.startswith(("sets/", "vocab/")) or rel in ("weights.safetensors", "owners.safetensors"):
                storage.delete_tree(storage.join(out, rel))


# --- reading a model directory ----------------------------------------------------------------


def read_model_dir(model_dir: str) -> tuple[dict, dict[str, bytes]]:
    """``model.json`` and every file it lists, each checked against its size and SHA-256."""
    model_dir = storage.resolve(model_dir)
    doc = _read_json(storage.join(model_dir, MODEL_FILE), "is this a directory written by `conure-dist export`?")
    where = storage.join(model_dir, MODEL_FILE)
    if doc.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{where}: not a conure_dist model (format {doc.get('format')!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > MODEL_FORMAT_VERSION:
        raise ModelFileError(f"{where}: model format version {version} was written by a newer conure_dist "
                             f"({doc.get('conure_dist_version')}); this is {__version__}, which reads up to "
                             f"version {MODEL_FORMAT_VERSION}: upgrade conure_dist")
    if not isinstance(doc.get("files"), dict) or not isinstance(doc.get("tasks"), list) or not doc["tasks"]:
        raise ModelFileError(f"{where}: lists no files or no tasks; export the model again")
    files = {}
    for rel, meta in doc["files"].items():
        path = storage.join(model_dir, rel)
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            raise ModelFileError(f"{path}: missing (listed in {MODEL_FILE})") from None
        if len(data) != meta["bytes"] or sha256(data) != meta["sha256"]:
            raise ModelFileError(f"{path}: checksum mismatch ({len(data)} bytes, {MODEL_FILE} lists {meta['bytes']}): "
                                 "the file was damaged or changed after export; export the model again")
        files[rel] = data
    return doc, files


def footprint(doc: Mapping[str, Any], backbone_params: int, prunable_params: int, head_params: int) -> dict[str, int]:
    """Bytes of this model directory next to two other ways to serve the same tasks in fp32:
    FineAll's one backbone per task, and one backbone plus a dense float mask per task per
    prunable weight (as the reference implementation stores its masks)."""
    tasks = len(doc["tasks"])
    return {
        "model_dir": sum(f["bytes"] for f in doc["files"].values()),
        "weights": sum(f["bytes"] for rel, f in doc["files"].items() if rel.endswith(".safetensors") and "owners" not in rel),
        "owner_map": doc["files"].get("owners.safetensors", {}).get("bytes", 0),
        "one_backbone_per_task": 4 * (tasks * backbone_params + head_params),
        "dense_float_masks": 4 * (backbone_params + tasks * prunable_params + head_params),
    }
