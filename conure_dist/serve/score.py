"""Batch scoring and embedding export with Ray Data: Parquet in, Parquet out.

Input: Parquet files (a file, a directory or a URI) with a ``seq`` column: a list of item tokens
per user, oldest first (with ``ids=True``: the model's item ids, as in a prepared dataset's
rows). Every other column (``user``, ...) is passed through. Output, per row:

- predictions: ``items`` + ``scores`` (T1 and item tasks) or ``labels`` + ``probabilities``
  (class tasks), the top ``k``;
- with ``embed``: ``embedding``, the user representation of the task;
- always: ``status`` (``ok``, or why the row was skipped: its outputs are then null),
  ``unknown_items`` and ``truncated_items``.

A pool of actors (``workers``, each with its CPUs / GPU) loads the model once and scores
batches as Ray Data streams them. The output is written under a temporary directory inside
``output`` and moved into place when every row is written; ``_scoring.json`` (rows, skipped
rows by reason, unknown tokens) is written last.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from conure_dist import storage
from conure_dist.serve.artifact import ModelFileError

SUMMARY_FILE = "_scoring.json"
STAGING_PREFIX = ".staging-"


class Scorer:
    """A Ray Data actor: one loaded model, scoring batches of one task."""

    def __init__(self, model_dir: str, task: str, k: int, embed: bool, ids: bool, device: str, dtype: str):
        import torch

        from conure_dist.serve.model import load

        if device == "cpu":
            import ray

            cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
            torch.set_num_threads(max(1, cpus))  # Ray sets OMP_NUM_THREADS=1 in workers
        self.model = load(model_dir, device=device, dtype=dtype)
        self.model.use(task)
        self.task, self.k, self.embed, self.ids = task, k, embed, ids
        self.kind = self.model.specs[task].kind

    def __call__(self, batch: pa.Table) -> pa.Table:
        seqs = batch.column("seq").to_pylist()
        enc = self.model.encode(seqs, self.model.window(self.task), ids=self.ids)
        good = [i for i, p in enumerate(enc.problems) if p is None]
        out = batch.drop_columns(["seq"])
        n = batch.num_rows
        if self.embed:
            dim = self.model.network.config.embed_dim
            values = np.zeros((n, dim), dtype=np.float32)
            if good:
                values[good] = self.model.representation(self.task, enc.ids[good]).cpu().numpy()
            flat = pa.array(values.reshape(-1), pa.float32())
            vectors = pa.FixedSizeListArray.from_arrays(flat, dim)
            out = out.append_column("embedding", _null_where(vectors, enc.problems))
        else:
            results = self.model.predict_encoded(self.task, enc, self.k)
            names, values = ("labels", "probabilities") if self.kind == "class" else ("items", "scores")
            out = out.append_column(names, pa.array([r.get(names) for r in results], pa.list_(pa.string())))
            out = out.append_column(values, pa.array([r.get(values) for r in results], pa.list_(pa.float32())))
        out = out.append_column("status", pa.array([p or "ok" for p in enc.problems], pa.string()))
        out = out.append_column("unknown_items", pa.array([len(u) for u in enc.unknown], pa.int32()))
        return out.append_column("truncated_items", pa.array(enc.truncated, pa.int32()))


def _null_where(values: pa.Array, problems: list[str | None]) -> pa.Array:
    if not any(problems):
        return values
    return pc.if_else(pa.array([p is not None for p in problems]), pa.nulls(len(values), values.type), values)


@dataclass
class ScoreSummary:
    rows: int
    scored: int
    skipped: dict[str, int]
    unknown_items: int
    truncated_rows: int
    seconds: float
    output: str

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def line(self) -> str:
        skipped = sum(self.skipped.values())
        why = "; ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return (f"{self.scored} of {self.rows} rows scored in {self.seconds:.1f} s "
                f"({self.rows / max(self.seconds, 1e-9):,.0f} rows/s) -> {self.output}"
                + (f"; {skipped} skipped ({why})" if skipped else "")
                + (f"; {self.unknown_items} unknown item tokens" if self.unknown_items else "")
                + (f"; {self.truncated_rows} rows truncated to the model's window" if self.truncated_rows else ""))


def _check_input(path: str) -> None:
    import pyarrow.parquet as pq

    if not storage.exists(path):
        raise ModelFileError(f"--input {path}: not found")
    fs, inner = storage.filesystem(path)
    first = inner if fs.get_file_info(inner).type == pafs.FileType.File else None
    if first is None:
        files = [f for f in storage.list_files(path) if f.endswith(".parquet") and not f.split("/")[-1].startswith(("_", "."))]
        if not files:
            raise ModelFileError(f"--input {path}: no .parquet files")
        first = "/".join([inner.rstrip("/"), files[0]])
    schema = pq.read_schema(first, filesystem=fs)
    if "seq" not in schema.names or not pa.types.is_list(schema.field("seq").type) and not pa.types.is_large_list(schema.field("seq").type):
        raise ModelFileError(f"--input {path}: needs a column `seq` (a list of item tokens per row); "
                             f"{first} has columns {schema.names}")


def score(model_dir: str, task: str, input_path: str, output: str, *, k: int = 5, embed: bool = False,
          ids: bool = False, workers: int = 1, cpus_per_worker: float = 1, gpus_per_worker: float = 0,
          batch_size: int = 1024, dtype: str = "float32", overwrite: bool = False) -> ScoreSummary:
    """Score (or, with ``embed``, embed) every row of ``input_path`` with ``task``; Ray must be
    initialised (:func:`conure_dist.launch.connect_ray`)."""
    import ray

    from conure_dist.serve.artifact import read_model_dir
    from conure_dist.train.engine import allocator_env

    doc, _ = read_model_dir(model_dir)  # a damaged or unknown model fails here, not in every actor
    served = [t["name"] for t in doc["tasks"]]
    if task not in served:
        raise ModelFileError(f"--task {task}: not served by {model_dir}; it serves {served}")
    input_path, output = storage.resolve(input_path), storage.resolve(output)
    _check_input(input_path)
    existing = [f for f in storage.list_files(output) if not f.startswith(STAGING_PREFIX)] if storage.exists(output) else []
    if existing and not overwrite:
        raise ModelFileError(f"--output {output}: not empty ({len(existing)} files); pass --overwrite or choose another")
    started = time.time()
    staging = storage.join(output, f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}")
    fs, inner = storage.filesystem(input_path)
    ds = ray.data.read_parquet(inner, filesystem=fs)
    ds = ds.map_batches(
        Scorer, batch_size=batch_size, batch_format="pyarrow", concurrency=workers,
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
        runtime_env={"env_vars": allocator_env()},  # huge pages for the [users x items] scores
        fn_constructor_kwargs={"model_dir": storage.resolve(model_dir), "task": task, "k": k, "embed": embed, "ids": ids,
                               "device": "cuda" if gpus_per_worker > 0 else "cpu", "dtype": dtype})
    try:
        out_fs, staging_inner = storage.filesystem(staging)
        ds.write_parquet(staging_inner, filesystem=out_fs)
        if not (storage.exists(staging) and storage.list_files(staging)):  # Ray writes no file for no rows
            raise ModelFileError(f"--input {input_path}: no rows to score; {output} was left as it was")
        for rel in existing:  # --overwrite: the old output goes only once the new one is complete
            storage.delete_tree(storage.join(output, rel))
        _move_up(staging, output)
    finally:
        storage.delete_tree(staging)
    summary = _summarise(output, time.time() - started)
    storage.write_bytes(storage.join(output, SUMMARY_FILE), json.dumps(summary.to_json(), indent=2).encode())
    return summary


def _move_up(staging: str, output: str) -> None:
    fs, inner = storage.filesystem(staging)
    _, out_inner = storage.filesystem(output)
    for rel in storage.list_files(staging):
        fs.move("/".join([inner, rel]), "/".join([out_inner.rstrip("/"), rel]))


def _summarise(output: str, seconds: float) -> ScoreSummary:
    import pyarrow.dataset as pads

    fs, inner = storage.filesystem(output)
    table = pads.dataset(inner, filesystem=fs, format="parquet").to_table(
        columns=["status", "unknown_items", "truncated_items"])
    status = table.column("status")
    counts = {r["values"]: r["counts"] for r in pc.value_counts(status).to_pylist()}
    ok = counts.pop("ok", 0)
    return ScoreSummary(rows=table.num_rows, scored=ok, skipped=counts,
                        unknown_items=int(pc.sum(table.column("unknown_items")).as_py() or 0),
                        truncated_rows=int(pc.sum(pc.greater(table.column("truncated_items"), 0)).as_py() or 0),
                        seconds=round(seconds, 2), output=output)
