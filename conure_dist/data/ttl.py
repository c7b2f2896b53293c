"""The TTL files released with the paper -> the prepared format.

File format: the sequence-task (T1) file has one user per line, comma-separated item tokens
in time order. Every other task file has lines ``<item tokens>,,<labels>``, where the labels
part may hold several comma-separated labels (one instance each). The released files
left-pad sequences with the token ``0``; that token is padding and is dropped.

TTL has no user ids: a user *is* their sequence (after dropping padding). User ids are given
in order of first appearance, T1 first, so identical sequences in later tasks join the T1
user. A line of the sequence-task file that repeats an earlier line is the same user again:
it is dropped (the user keeps one row, instance 0) and counted in the report as
``duplicate_sequences``. In later tasks every label of every line is an instance of its own.
Item ids are T1's vocabulary in order of first appearance; item tokens of later tasks'
sequences that T1 never saw map to one OOV id, ``num_items`` (counted per task in
``dataset.json`` as ``oov_tokens``). Labels get ids per task in order of first appearance.

Files are streamed line by line and written in chunks, so memory holds the vocabularies and
the user index (8 bytes of hash per user), not the data.

Example::

    info, report = prepare_ttl("/data/ttl", "/data/ttl-prepared")
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from conure_dist.data.badinput import BadInputError, BadRows, convert_from
from conure_dist.data.format import TASK_KINDS, DatasetInfo
from conure_dist.data.writer import DatasetWriter

PAD_TOKEN = "0"
CHUNK_ROWS = 50_000


@dataclass(frozen=True)
class TaskFile:
    """One task: its name, its file (relative to the raw directory) and kind."""

    name: str
    file: str
    kind: str

    @classmethod
    def parse(cls, text: str) -> "TaskFile":
        """``name=file:kind``, as given to ``--task``."""
        name, eq, rest = text.partition("=")
        file, colon, kind = rest.rpartition(":")
        if not eq or not colon or not name or not file:
            raise ValueError(f"--task {text!r}: expected name=file:kind")
        if not name.isidentifier():
            raise ValueError(f"--task {text!r}: the name must be an identifier (letters, digits, _)")
        if kind not in TASK_KINDS:
            raise ValueError(f"--task {text!r}: kind must be one of {TASK_KINDS}")
        return cls(name, file, kind)


DEFAULT_TASKS = (
    TaskFile("pretrain", "original_desen_pretrain.csv", "sequence"),
    TaskFile("click", "original_desen_finetune_click_nouserID.csv", "item"),
    TaskFile("like", "original_desen_finetune_like_nouserID.csv", "item"),
    TaskFile("age", "original_desen_age.csv", "class"),
    TaskFile("gender", "original_desen_gender.csv", "class"),
    TaskFile("lifestatus", "original_desen_lifestatus.csv", "class"),
)


@dataclass(frozen=True)
class TTLOptions:
    tasks: tuple[TaskFile, ...] = DEFAULT_TASKS
    seed: int = 0
    skip_bad: bool = False
    rows_per_shard: int = 100_000
    overwrite: bool = False


def check_tasks(tasks: tuple[TaskFile, ...], raw: str) -> None:
    """One sequence task, first; unique names; every file present."""
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadInputError(f"duplicate task name(s) {duplicates}")
    if not tasks or tasks[0].kind != "sequence" or any(t.kind == "sequence" for t in tasks[1:]):
        raise BadInputError(f"the first task, and only the first, must be of kind 'sequence'; got "
                            f"{[(t.name, t.kind) for t in tasks]}")
    for t in tasks:
        path = os.path.join(raw, t.file)
        if not os.path.isfile(path):
            raise BadInputError(f"{path}: file of task {t.name!r} not found")


class _Converter:
    """State shared across task files: item vocabulary, user index, chunk buffers."""

    def __init__(self, writer: DatasetWriter, bad: BadRows) -> None:
        self.writer = writer
        self.bad = bad
        self.items: dict[str, int] = {}
        self.users: dict[int, int] = {}
        self.labels: dict[str, dict[str, int]] = {}
        self.oov_total = 0
        self.duplicates: dict[str, int] = {}  # task -> repeated sequence-task lines dropped

    def _user(self, tokens: list[str]) -> int:
        key = int.from_bytes(hashlib.blake2b(",".join(tokens).encode(), digest_size=8).digest(), "little")
        return self.users.setdefault(key, len(self.users))

    def _tokens(self, text: str, path: str, no: int) -> list[str] | None:
        tokens = [t.strip() for t in text.split(",")]
        if any(not t for t in tokens):
            self.bad.report(path, no, "empty item token")
            return None
        tokens = [t for t in tokens if t != PAD_TOKEN]
        if not tokens:
            self.bad.report(path, no, "empty sequence")
            return None
        return tokens

    def convert(self, task: TaskFile, path: str) -> None:
        rows = _Chunk()
        counters: dict[int, int] = defaultdict(int)  # user -> instances so far in this task
        label_ids = self.labels.setdefault(task.name, {})
        if task.kind == "sequence":
            self.duplicates[task.name] = 0
        oov_id = None if task.kind == "sequence" else self.oov_id
        with open(path, encoding="utf-8", errors="strict") as f:
            for no, text in enumerate(f, 1):
                text = text.rstrip("\r\n")
                if not text.strip():
                    self.bad.report(path, no, "empty line")
                    continue
                seq_text, sep, label_text = text.partition(",,")
                if task.kind == "sequence" and sep:
                    self.bad.report(path, no, "',,' (labels) in the sequence-task file")
                    continue
                if task.kind != "sequence" and not sep:
                    self.bad.report(path, no, "missing ',,' before the label")
                    continue
                tokens = self._tokens(seq_text, path, no)
                if tokens is None:
                    continue
                labels = [t.strip() for t in label_text.split(",")] if sep else [None]
                if sep and any(not t for t in labels):
                    self.bad.report(path, no, "missing label", repr(label_text))
                    continue
                if oov_id is None:
                    ids = [self.items.setdefault(t, len(self.items) + 1) for t in tokens]
                    oov = 0
                else:
                    ids = [self.items.get(t, oov_id) for t in tokens]
                    oov = ids.count(oov_id)
                    self.oov_total += oov
                user = self._user(tokens)
                if task.kind == "sequence" and counters[user]:
                    # The same user again (a TTL user is their sequence): a second row would be a
                    # second instance that could land in another split than the first.
                    self.duplicates[task.name] += 1
                    continue
                for label in labels:
                    label_id = None if label is None else label_ids.setdefault(label, len(label_ids))
                    rows.add(user, counters[user], ids, label_id, oov)
                    oov = 0  # count a line's OOV tokens once, not per label
                    counters[user] += 1
                if rows.size >= CHUNK_ROWS:
                    rows.flush(self.writer, task)
        rows.flush(self.writer, task)
        if task.kind != "sequence" and len(label_ids) < 2:
            raise BadInputError(f"{path}: task {task.name!r} has {len(label_ids)} distinct label(s); needs >= 2")
        if task.kind == "sequence" and not self.items:
            raise BadInputError(f"{path}: no usable sequences")

    @property
    def oov_id(self) -> int:
        return len(self.items) + 1


class _Chunk:
    def __init__(self) -> None:
        self.users, self.instances, self.lengths, self.values, self.labels = [], [], [], [], []
        self.oov = 0

    @property
    def size(self) -> int:
        return len(self.users)

    def add(self, user: int, instance: int, ids: list[int], label: int | None, oov: int) -> None:
        self.users.append(user), self.instances.append(instance), self.lengths.append(len(ids))
        self.values.extend(ids), self.labels.append(label)
        self.oov += oov

    def flush(self, writer: DatasetWriter, task: TaskFile) -> None:
        if not self.users:
            return
        offsets = np.r_[0, np.cumsum(self.lengths)].astype(np.int32)
        seqs = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.array(self.values, np.int32)))
        labels = None if task.kind == "sequence" else np.array(self.labels, np.int32)
        writer.write(task.name, np.array(self.users, np.int64), seqs, labels,
                     instances=np.array(self.instances, np.int64), oov_tokens=self.oov)
        self.__init__()


def prepare_ttl(raw: str, out_dir: str, options: TTLOptions = TTLOptions()) -> tuple[DatasetInfo, dict]:
    """Convert the TTL files in ``raw`` (a directory or a URI, downloaded first); returns the
    info and a report (OOV tokens, skipped rows)."""
    return convert_from(raw, lambda local: _prepare_ttl(local, out_dir, options))


def _prepare_ttl(raw: str, out_dir: str, options: TTLOptions) -> tuple[DatasetInfo, dict]:
    check_tasks(options.tasks, raw)
    bad = BadRows(skip=options.skip_bad)
    with DatasetWriter(out_dir, seed=options.seed, source="ttl", rows_per_shard=options.rows_per_shard,
                       overwrite=options.overwrite) as writer:
        conv = _Converter(writer, bad)
        for task in options.tasks:
            writer.add_task(task.name, task.kind)
            conv.convert(task, os.path.join(raw, task.file))
        vocab = list(conv.items)  # insertion order = id order
        oov_used = conv.oov_total > 0
        num_items = len(vocab) + (1 if oov_used else 0)
        tokens = vocab + (["<oov>"] if oov_used else [])
        labels = {name: list(ids) for name, ids in conv.labels.items() if ids}
        info = writer.finish(num_items=num_items, item_tokens=tokens,
                             oov_item_id=num_items if oov_used else None, label_tokens=labels)
    report = {"oov_tokens": {t.name: t.oov_tokens for t in info.tasks if t.kind != "sequence"},
              "duplicate_sequences": conv.duplicates,
              "skipped": bad.summary()}
    return info, report
