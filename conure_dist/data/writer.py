"""Streaming writer of the prepared-dataset format, shared by every converter.

Converters hand over batches of rows per task; the writer assigns splits, cuts Parquet
shards of ``rows_per_shard`` rows, counts train-split popularity, and at :meth:`finish`
writes the mappings and ``dataset.json``. Rows are shuffled before shards are cut, with a
generator seeded from (dataset seed, task, split, shard number): the same input and seed give
byte-identical shards. Which split a row lands in and the popularity counts do not depend on
the shuffle. Everything goes to ``<out>.tmp-<pid>`` first and is renamed to ``<out>`` only at
the end, so a failed run never leaves a dataset that looks complete (a leftover temporary
directory is removed on failure). An ``<out>`` on object storage (``s3://...``) is staged in a
local temporary directory and uploaded at the end with ``dataset.json`` last: readers take a
dataset as complete only once that file exists.

Example::

    with DatasetWriter("/data/out", seed=0, source="toy") as w:
        w.add_task("clicks", "sequence")
        w.write("clicks", users, seqs)                  # seqs: pa.ListArray of int32
        info = w.finish(num_items=100, item_tokens=[str(i) for i in range(1, 101)])
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conure_dist import storage
from conure_dist.data.format import (FORMAT_VERSION, METADATA_FILE, SPLITS, TASK_KINDS, DatasetInfo,
                                     TaskInfo, assign_splits, load_dataset_info, row_schema)

# Rows are shuffled within a window of this many shards' worth before each shard is cut
# (memory: about this many shards of rows per task and split).
SHUFFLE_WINDOW_SHARDS = 2


@dataclass
class _SplitShards:
    """Buffered rows and written shard paths of one (task, split)."""

    buffered: list = field(default_factory=list)
    buffered_rows: int = 0
    files: list = field(default_factory=list)
    rows: int = 0


@dataclass
class _TaskState:
    name: str
    kind: str
    splits: dict = field(default_factory=lambda: {s: _SplitShards() for s in SPLITS})
    popularity: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    users: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # seen user ids
    oov_tokens: int = 0


def _grow_add(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``counts += bincount(values)``, growing ``counts`` as needed (ids are not known up front)."""
    if values.size == 0:
        return counts
    add = np.bincount(values)
    if add.size > counts.size:
        counts = np.concatenate([counts, np.zeros(add.size - counts.size, dtype=np.int64)])
    counts[: add.size] += add
    return counts


def _grow_mark(seen: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``seen[ids] = True``, growing the bitmap as needed."""
    if ids.size == 0:
        return seen
    top = int(ids.max()) + 1
    if top > seen.size:
        seen = np.concatenate([seen, np.zeros(max(top, 2 * seen.size) - seen.size, dtype=bool)])
    seen[ids] = True
    return seen


class DatasetWriter:
    """Writes one prepared dataset; use as a context manager so failures clean up."""

    def __init__(self, out_dir: str, *, seed: int, source: str, rows_per_shard: int = 100_000,
                 overwrite: bool = False) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out_dir = storage.resolve(out_dir)
        self.remote = storage.is_uri(self.out_dir)
        if (storage.list_files(self.out_dir) if self.remote else os.path.exists(self.out_dir)) and not overwrite:
            raise FileExistsError(f"{self.out_dir} exists; choose another --out or pass --overwrite")
        self.seed = seed
        self.source = source
        self.rows_per_shard = rows_per_shard
        self.overwrite = overwrite
        if self.remote:
            self.tmp_dir = tempfile.mkdtemp(prefix="conure-prepare-")
        else:
            self.tmp_dir = f"{self.out_dir}.tmp-{os.getpid()}"
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            os.makedirs(self.tmp_dir)
        self._tasks: dict[str, _TaskState] = {}
        self._finished = False

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def add_task(self, name: str, kind: str) -> None:
        if name in self._tasks:
            raise ValueError(f"duplicate task name {name!r}")
        if kind not in TASK_KINDS:
            raise ValueError(f"task {name!r}: kind must be one of {TASK_KINDS}, got {kind!r}")
        self._tasks[name] = _TaskState(name, kind)

    def write(self, task: str, users: np.ndarray, seqs: pa.ListArray, labels: np.ndarray | None = None,
              instances: np.ndarray | None = None, oov_tokens: int = 0) -> None:
        """Append rows. ``instances`` numbers each user's instances in this task (default 0)."""
        state = self._tasks[task]
        users = np.asarray(users, dtype=np.int64)
        instances = np.zeros_like(users) if instances is None else np.asarray(instances, dtype=np.int64)
        if (labels is None) != (state.kind == "sequence"):
            raise ValueError(f"task {task!r} ({state.kind}): labels must be given exactly for item/class tasks")
        if len(seqs) != users.size or instances.size != users.size or (labels is not None and len(labels) != users.size):
            raise ValueError(f"task {task!r}: users, seqs, labels and instances differ in length")
        columns = {"user": pa.array(users, pa.int64()), "seq": seqs.cast(pa.list_(pa.int32()))}
        if labels is not None:
            columns["label"] = pa.array(np.asarray(labels, dtype=np.int32), pa.int32())
        table = pa.table(columns).cast(row_schema(state.kind))
        if users.size and users.min() < 0:
            raise ValueError(f"task {task!r}: user ids must be >= 0 (-1 marks pipeline padding rows)")
        state.users = _grow_mark(state.users, users)
        state.oov_tokens += oov_tokens
        split = assign_splits(self.seed, task, users, instances)
        for code, name in enumerate(SPLITS):
            part = table.filter(pa.array(split == code))
            if part.num_rows == 0:
                continue
            if code == 0:  # samplers use train-split popularity only
                values = (part.column("seq").combine_chunks().flatten() if state.kind == "sequence"
                          else part.column("label"))
                state.popularity = _grow_add(state.popularity, values.to_numpy(zero_copy_only=False))
            self._append(state, name, part)

    def _append(self, state: _TaskState, split: str, part: pa.Table) -> None:
        shards = state.splits[split]
        shards.buffered.append(part)
        shards.buffered_rows += part.num_rows
        while shards.buffered_rows >= SHUFFLE_WINDOW_SHARDS * self.rows_per_shard:
            self._cut_shard(state, split)

    def _cut_shard(self, state: _TaskState, split: str) -> None:
        """Shuffle a window of the buffered rows and write ``rows_per_shard`` of them as a shard.

        Converters hand rows over in input order (MovieLens sorted by user, a TTL line's labels
        one after another), so a shard cut in that order gives batches of a handful of users.
        The window spans :data:`SHUFFLE_WINDOW_SHARDS` shards' worth, so rows also cross shard
        borders; the window's other rows stay buffered, ahead of the rest, for the next cut.
        """
        shards = state.splits[split]
        buffered = pa.concat_tables(shards.buffered) if shards.buffered else row_schema(state.kind).empty_table()
        window = buffered.slice(0, SHUFFLE_WINDOW_SHARDS * self.rows_per_shard)
        rng = np.random.Generator(np.random.PCG64(self._shard_seed(state.name, split, len(shards.files))))
        window = window.take(pa.array(rng.permutation(window.num_rows)))
        self._write_shard(state, split, window.slice(0, self.rows_per_shard))
        rest = [t for t in (window.slice(self.rows_per_shard), buffered.slice(window.num_rows)) if t.num_rows]
        shards.buffered = rest
        shards.buffered_rows = sum(t.num_rows for t in rest)

    def _shard_seed(self, task: str, split: str, shard: int) -> np.random.SeedSequence:
        # hashlib, not hash(): str hashes are salted per process and the order must be reproducible.
        task_key = int.from_bytes(hashlib.blake2b(task.encode(), digest_size=8).digest(), "little")
        return np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF, task_key, SPLITS.index(split), shard])

    def _write_shard(self, state: _TaskState, split: str, table: pa.Table) -> None:
        shards = state.splits[split]
        rel = os.path.join("tasks", state.name, split, f"part-{len(shards.files):05d}.parquet")
        path = os.path.join(self.tmp_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path, row_group_size=min(max(table.num_rows, 1), 16_384))
        shards.files.append(rel)
        shards.rows += table.num_rows

    def finish(self, *, num_items: int, item_tokens: Sequence[str], oov_item_id: int | None = None,
               label_tokens: dict[str, Sequence[str]] | None = None) -> DatasetInfo:
        """Flush shards, write mappings and metadata, rename into place; returns the loaded info.

        ``item_tokens[i]`` is the token of item id ``i + 1`` (the OOV id, if any, included);
        ``label_tokens[task][j]`` is the token of label ``j``.
        """
        label_tokens = label_tokens or {}
        if len(item_tokens) != num_items:
            raise ValueError(f"{len(item_tokens)} item tokens for num_items={num_items}")
        self._write_mapping("mappings/items.parquet", item_tokens, first_id=1)
        tasks = []
        for state in self._tasks.values():
            tasks.append(self._finish_task(state, num_items, label_tokens.get(state.name)))
        seen = np.zeros(max((s.users.size for s in self._tasks.values()), default=0), dtype=bool)
        for s in self._tasks.values():
            seen[: s.users.size] |= s.users
        info = DatasetInfo(path=self.out_dir, format_version=FORMAT_VERSION, num_items=num_items,
                           tasks=tuple(tasks), seed=self.seed, oov_item_id=oov_item_id,
                           num_users=int(seen.sum()), source=self.source)
        with open(os.path.join(self.tmp_dir, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(info.to_json(), f, indent=1)
        if self.remote:
            self._publish_remote()
        else:
            if os.path.exists(self.out_dir) and self.overwrite:
                shutil.rmtree(self.out_dir)
            os.rename(self.tmp_dir, self.out_dir)
        self._finished = True
        return load_dataset_info(self.out_dir)

    def _publish_remote(self) -> None:
        """Upload the staged dataset, ``dataset.json`` last. An old dataset being overwritten is
        unpublished first (its ``dataset.json`` deleted), so no reader mixes old and new shards."""
        try:
            if self.overwrite:
                storage.delete_tree(storage.join(self.out_dir, METADATA_FILE))
                storage.delete_tree(self.out_dir)
            storage.upload_tree(self.tmp_dir, self.out_dir, last=(METADATA_FILE,))
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _finish_task(self, state: _TaskState, num_items: int, labels: Sequence[str] | None) -> TaskInfo:
        for split, shards in state.splits.items():
            while shards.buffered_rows or not shards.files:  # an empty split still gets one (empty) shard
                self._cut_shard(state, split)
        if state.kind == "sequence":
            size = num_items + 1
            label_file, num_labels = None, 0
        else:
            if labels is None:
                raise ValueError(f"task {state.name!r}: label tokens are required for an {state.kind} task")
            size = num_labels = len(labels)
            label_file = f"mappings/labels/{state.name}.parquet"
            self._write_mapping(label_file, labels, first_id=0)
        if state.popularity.size > size:
            raise ValueError(f"task {state.name!r}: ids up to {state.popularity.size - 1} exceed the space of {size}")
        popularity = np.zeros(size, dtype=np.int64)
        popularity[: state.popularity.size] = state.popularity
        pop_file = f"popularity/{state.name}.npy"
        os.makedirs(os.path.join(self.tmp_dir, "popularity"), exist_ok=True)
        np.save(os.path.join(self.tmp_dir, pop_file), popularity)
        return TaskInfo(name=state.name, kind=state.kind, num_labels=num_labels,
                        counts={s: sh.rows for s, sh in state.splits.items()},
                        files={s: tuple(sh.files) for s, sh in state.splits.items()},
                        popularity_file=pop_file, label_mapping_file=label_file,
                        num_users=int(state.users.sum()), oov_tokens=state.oov_tokens)

    def _write_mapping(self, rel: str, tokens: Sequence[str], first_id: int) -> None:
        path = os.path.join(self.tmp_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ids = np.arange(first_id, first_id + len(tokens), dtype=np.int32)
        pq.write_table(pa.table({"id": ids, "token": pa.array(list(tokens), pa.string())}), path)
