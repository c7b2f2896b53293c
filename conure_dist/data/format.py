"""The prepared-dataset format: one directory that every converter writes and every reader opens.

Layout (documented for users in ``docs/dataset-format.md``)::

    dataset.json                              metadata, validated by load_dataset_info
    tasks/<task>/<split>/part-00000.parquet   rows: user int64, seq list<int32>, [label int32]
    popularity/<task>.npy                     int64 counts over the train split
    mappings/items.parquet                    item id -> original token
    mappings/labels/<task>.parquet            label id -> original token (item/class tasks)

Item ids are contiguous ``1..num_items``; 0 is padding. A converter that maps unknown tokens
of later tasks to one out-of-vocabulary id uses ``num_items`` itself (``oov_item_id``), so the
embedding of ``num_items + 1`` rows covers it. The split of an instance is a pure function
of ``(seed, task, user, instance)`` (:func:`assign_splits`), so it never depends on how the
data was sharded or how many workers read it.

Example::

    info = load_dataset_info("/data/ml100k")
    files = info.split_files("clicks", "train")
    counts = info.popularity("clicks")          # [num_items + 1] int64
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pyarrow as pa

from conure_dist import storage

FORMAT_VERSION = 1
METADATA_FILE = "dataset.json"
TASK_KINDS = ("sequence", "item", "class")
SPLITS = ("train", "validation", "test")
# Percent of instances per split (paper protocol); cumulative bounds over a 0..99 bucket.
SPLIT_PERCENT = (80, 5, 15)
PAD_ID = 0
# Padding rows the pipeline adds so that data-parallel workers see equal batch counts.
PAD_USER = -1
PAD_LABEL = -1


class DatasetFormatError(ValueError):
    """A prepared dataset is missing or inconsistent; the message names the file."""


class DatasetNotFound(DatasetFormatError):
    """No prepared dataset at the path given (a wrong ``--data``: the jobs exit 2)."""


def row_schema(kind: str) -> pa.Schema:
    """Parquet schema of one task's rows; item/class tasks carry a label."""
    fields = [pa.field("user", pa.int64(), nullable=False),
              pa.field("seq", pa.list_(pa.field("item", pa.int32(), nullable=False)), nullable=False)]
    if kind != "sequence":
        fields.append(pa.field("label", pa.int32(), nullable=False))
    return pa.schema(fields)


# --- splits -------------------------------------------------------------------------------

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-distributed 64-bit mix (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x & _MASK64


def _task_key(task: str) -> np.uint64:
    # hashlib, not hash(): Python's str hash is salted per process.
    return np.uint64(int.from_bytes(hashlib.blake2b(task.encode(), digest_size=8).digest(), "little"))


def assign_splits(seed: int, task: str, users: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """Split code per instance (index into :data:`SPLITS`), from a hash of (seed, task, user, instance).

    Deterministic and independent of row order, sharding and worker count.
    """
    users = np.asarray(users, dtype=np.int64).view(np.uint64)
    instances = np.asarray(instances, dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix64(np.full(users.shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ _task_key(task)))
        h = _mix64(h ^ users)
        h = _mix64(h ^ (instances * np.uint64(0x9E3779B97F4A7C15)))
    bucket = (h % np.uint64(100)).astype(np.int64)
    train, validation, _ = SPLIT_PERCENT
    return np.where(bucket < train, 0, np.where(bucket < train + validation, 1, 2)).astype(np.int8)


# --- metadata -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """One task of a prepared dataset; ``counts`` maps split -> rows."""

    name: str
    kind: str
    num_labels: int
    counts: Mapping[str, int]
    files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # split -> relative paths
    popularity_file: str = ""
    label_mapping_file: str | None = None
    num_users: int = 0
    oov_tokens: int = 0  # later-task sequence tokens mapped to the OOV item id

    @property
    def has_label(self) -> bool:
        return self.kind != "sequence"

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "num_labels": self.num_labels,
                "counts": dict(self.counts), "files": {s: list(f) for s, f in self.files.items()},
                "popularity_file": self.popularity_file, "label_mapping_file": self.label_mapping_file,
                "num_users": self.num_users, "oov_tokens": self.oov_tokens}


@dataclass(frozen=True)
class DatasetInfo:
    """A prepared dataset on disk or object storage (``path`` is a local path or a URI).
    Paths stored inside are relative to ``path``."""

    path: str
    format_version: int
    num_items: int
    tasks: tuple[TaskInfo, ...]
    seed: int
    oov_item_id: int | None = None
    num_users: int = 0
    source: str = ""
    item_mapping_file: str = "mappings/items.parquet"

    def task(self, name: str) -> TaskInfo:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"{self.path}: no task {name!r}; tasks are {[t.name for t in self.tasks]}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def split_files(self, task: str, split: str) -> list[str]:
        """Absolute paths (or URIs) of the Parquet shards of one task split, in shard order."""
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; one of {SPLITS}")
        return [storage.join(self.path, f) for f in self.task(task).files[split]]

    def popularity(self, task: str) -> np.ndarray:
        """Train-split counts: per item id 0..num_items (sequence task) or per label (item/class)."""
        t = self.task(task)
        path = storage.join(self.path, t.popularity_file)
        counts = np.load(io.BytesIO(storage.read_bytes(path)))
        expected = self.num_items + 1 if t.kind == "sequence" else t.num_labels
        if counts.shape != (expected,):
            raise DatasetFormatError(f"{path}: expected {expected} counts, found shape {counts.shape}")
        return counts.astype(np.int64, copy=False)

    def item_tokens(self) -> pa.Table:
        """Columns ``id`` (int32) and ``token`` (string): the original item tokens."""
        import pyarrow.parquet as pq

        return pq.read_table(storage.join(self.path, self.item_mapping_file))

    def label_tokens(self, task: str) -> pa.Table:
        """Columns ``id`` and ``token`` for an item/class task's labels."""
        import pyarrow.parquet as pq

        t = self.task(task)
        if t.label_mapping_file is None:
            raise KeyError(f"task {task!r} ({t.kind}) has no labels")
        return pq.read_table(storage.join(self.path, t.label_mapping_file))

    def to_json(self) -> dict:
        return {"format_version": self.format_version, "num_items": self.num_items,
                "oov_item_id": self.oov_item_id, "num_users": self.num_users, "seed": self.seed,
                "source": self.source, "item_mapping_file": self.item_mapping_file,
                "tasks": [t.to_json() for t in self.tasks]}


def _field(data: Mapping, key: str, kind: type | tuple, where: str):
    if key not in data:
        raise DatasetFormatError(f"{where}: missing field {key!r}")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise DatasetFormatError(f"{where}: field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _task_from_json(data: Mapping, where: str) -> TaskInfo:
    name = _field(data, "name", str, where)
    where = f"{where} task {name!r}"
    kind = _field(data, "kind", str, where)
    if kind not in TASK_KINDS:
        raise DatasetFormatError(f"{where}: kind must be one of {TASK_KINDS}, got {kind!r}")
    counts = _field(data, "counts", dict, where)
    files = _field(data, "files", dict, where)
    if set(counts) != set(SPLITS) or set(files) != set(SPLITS):
        raise DatasetFormatError(f"{where}: counts and files need exactly the splits {SPLITS}")
    label_file = data.get("label_mapping_file")
    num_labels = _field(data, "num_labels", int, where)
    if kind != "sequence" and (num_labels < 2 or label_file is None):
        raise DatasetFormatError(f"{where}: an {kind} task needs num_labels >= 2 and a label mapping")
    return TaskInfo(name=name, kind=kind, num_labels=num_labels,
                    counts={s: int(counts[s]) for s in SPLITS},
                    files={s: tuple(files[s]) for s in SPLITS},
                    popularity_file=_field(data, "popularity_file", str, where),
                    label_mapping_file=label_file,
                    num_users=int(data.get("num_users", 0)), oov_tokens=int(data.get("oov_tokens", 0)))


def load_dataset_info(path: str) -> DatasetInfo:
    """Open and validate ``<path>/dataset.json`` (a local path or a URI); errors name the file
    and the problem. A dataset is complete once its ``dataset.json`` exists: writers publish
    that file last."""
    path = storage.resolve(path)
    meta = storage.join(path, METADATA_FILE)
    try:
        data = json.loads(storage.read_bytes(meta).decode("utf-8"))
    except FileNotFoundError:
        raise DatasetNotFound(f"{meta}: not found; is {path!r} a prepared dataset "
                                 f"(conure-dist prepare ...)?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{meta}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{meta}: expected a JSON object")
    version = _field(data, "format_version", int, meta)
    if version != FORMAT_VERSION:
        raise DatasetFormatError(f"{meta}: format_version {version} is not supported "
                                 f"(this code reads version {FORMAT_VERSION})")
    tasks = tuple(_task_from_json(t, meta) for t in _field(data, "tasks", list, meta))
    names = [t.name for t in tasks]
    if not tasks or len(set(names)) != len(names):
        raise DatasetFormatError(f"{meta}: task names must be non-empty and unique, got {names}")
    num_items = _field(data, "num_items", int, meta)
    oov = data.get("oov_item_id")
    if oov is not None and oov != num_items:
        raise DatasetFormatError(f"{meta}: oov_item_id must be null or equal num_items ({num_items})")
    info = DatasetInfo(path=path, format_version=version, num_items=num_items,
                       tasks=tasks, seed=_field(data, "seed", int, meta), oov_item_id=oov,
                       num_users=int(data.get("num_users", 0)), source=str(data.get("source", "")),
                       item_mapping_file=str(data.get("item_mapping_file", "mappings/items.parquet")))
    present = set(storage.list_files(path))  # one listing, also on object storage
    for t in tasks:
        for split in SPLITS:
            for rel in t.files[split]:
                if rel not in present:
                    raise DatasetFormatError(f"{meta}: task {t.name!r} {split} shard {storage.join(path, rel)} is missing")
    return info


def check_shards(info: DatasetInfo, threads: int = 8) -> None:
    """Open every shard's Parquet footer: each must be readable, have its task's columns, and
    the shards of a split must hold the rows ``dataset.json`` counts. A truncated or replaced
    shard is named here, before any training starts, instead of failing inside a worker.
    Footers are small (one read each, also on object storage)."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    def footer(path: str) -> tuple[int, list[str]]:
        try:
            fs, inner = storage.filesystem(path)
            with fs.open_input_file(inner) as f:
                meta = pq.ParquetFile(f).metadata
                return meta.num_rows, list(meta.schema.to_arrow_schema().names)
        except (pa.ArrowException, OSError) as e:
            raise DatasetFormatError(f"{path}: not a readable Parquet file ({e}); prepare the dataset again") from None

    shards = [(t, split, path) for t in info.tasks for split in SPLITS for path in info.split_files(t.name, split)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        footers = list(pool.map(lambda s: footer(s[2]), shards))
    rows: dict[tuple[str, str], int] = {}
    for (t, split, path), (n, names) in zip(shards, footers):
        expected = row_schema(t.kind).names
        if names != expected:
            raise DatasetFormatError(f"{path}: columns {names}, expected {expected} (task {t.name!r}, {t.kind})")
        rows[(t.name, split)] = rows.get((t.name, split), 0) + n
    for t in info.tasks:
        for split in SPLITS:
            if rows.get((t.name, split), 0) != t.counts[split]:
                raise DatasetFormatError(
                    f"{storage.join(info.path, METADATA_FILE)}: task {t.name!r} {split} counts {t.counts[split]} rows, "
                    f"its shards hold {rows.get((t.name, split), 0)}; prepare the dataset again")
