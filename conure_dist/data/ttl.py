"""The TTL files released with the paper -> the prepared format.

File format: the sequence-task (T1) file has one user per line, comma-separated item tokens
in time order. Every other task file has lines ``<item tokens>,,<labels>``, where the labels
part may hold several comma-separated labels (one instance each). The released files
left-pad sequences with the token ``0``; that token is padding and is dropped.

TTL has no user ids: a user *is* their sequence (after dropping padding). User ids are given
in order of first appearance, T1 first; a later task's line joins the T1 user with the same
sequence. In later tasks every label of every line is an instance of its own. Item ids are
T1's vocabulary in order of first appearance; item tokens of later tasks' sequences that T1
never saw map to one OOV id, ``num_items`` (counted per task in ``dataset.json`` as
``oov_tokens``). Labels get ids per task in order of first appearance.

Every line must follow its grammar, or the conversion stops at ``file:line: reason``
(``--skip-bad``: the line is skipped and counted under its reason):

- UTF-8 text; tokens separated by single commas, each matching the token pattern (default
  ``[0-9]+``: the released files hold integer ids; ``--token-pattern`` for other logs);
- a sequence-task line: tokens only, at least one that is not padding, and not the same
  sequence as an earlier line (that would be one user twice, possibly in two splits);
- an item-task line: ``<tokens>,,<label>[,<label>...]``; a class-task line:
  ``<tokens>,,<label>``, exactly one label, from the declared classes of the task
  (``--classes``) or at most ``--max-classes`` distinct ones;
- a later task's sequence must be a T1 user's (``--allow-new-users`` accepts and counts
  others as new users).

Files are streamed line by line and written in chunks, so memory holds the vocabularies and
the user index (8 bytes of hash per user), not the data.

Example::

    info, report = prepare_ttl("/data/ttl", "/data/ttl-prepared")
"""

from __future__ import annotations

import hashlib
import os
import re
from array import array
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from conure_dist.data.badinput import BadInputError, BadRows, convert_from
from conure_dist.data.format import TASK_KINDS, DatasetInfo
from conure_dist.data.writer import DatasetWriter

PAD_TOKEN = "0"
CHUNK_ROWS = 50_000
TOKEN_PATTERN = r"[0-9]+"
MAX_CLASSES = 64


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
    token_pattern: str = TOKEN_PATTERN  # item tokens and labels (full match)
    allow_new_users: bool = False  # later-task sequences that match no T1 user become new users
    classes: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (class task, its declared labels)
    max_classes: int = MAX_CLASSES  # distinct labels of a class task without declared classes

    def __post_init__(self) -> None:
        check_task_list(self.tasks)
        try:
            re.compile(self.token_pattern)
        except re.error as e:
            raise ValueError(f"--token-pattern {self.token_pattern!r}: not a regular expression ({e})") from None
        if self.max_classes < 2:
            raise ValueError(f"--max-classes must be >= 2, got {self.max_classes}")
        kinds = {t.name: t.kind for t in self.tasks}
        for name, labels in self.classes:
            if kinds.get(name) != "class":
                raise ValueError(f"--classes {name}=...: {name!r} is not a class task of this conversion "
                                 f"(class tasks: {[n for n, k in kinds.items() if k == 'class']})")
            if len(set(labels)) != len(labels) or len(labels) < 2 or not all(labels):
                raise ValueError(f"--classes {name}=...: at least two distinct, non-empty labels expected, got {list(labels)}")
            odd = [label for label in labels if not re.fullmatch(self.token_pattern, label)]
            if odd:
                raise ValueError(f"--classes {name}=...: {odd} do not match the token pattern {self.token_pattern} "
                                 "(--token-pattern), so no line could carry them")

    @staticmethod
    def parse_classes(texts) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``--classes NAME=a,b,c`` (repeatable) -> ``((NAME, (a, b, c)), ...)``."""
        out = []
        for text in texts or ():
            name, eq, labels = text.partition("=")
            if not eq or not name:
                raise ValueError(f"--classes {text!r}: expected NAME=label,label,...")
            out.append((name, tuple(x.strip() for x in labels.split(","))))
        return tuple(out)


def check_task_list(tasks: tuple[TaskFile, ...]) -> None:
    """One sequence task, first; unique names (a bad ``--task`` list: ValueError)."""
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--task: duplicate task name(s) {duplicates}")
    if not tasks or tasks[0].kind != "sequence" or any(t.kind == "sequence" for t in tasks[1:]):
        raise ValueError(f"--task: the first task, and only the first, must be of kind 'sequence'; got "
                         f"{[(t.name, t.kind) for t in tasks]}")


def check_task_files(tasks: tuple[TaskFile, ...], raw: str) -> None:
    for t in tasks:
        path = os.path.join(raw, t.file)
        if not os.path.isfile(path):
            raise BadInputError(f"{path}: file of task {t.name!r} not found")


class _Converter:
    """State shared across task files: item vocabulary, user index, chunk buffers."""

    def __init__(self, writer: DatasetWriter, bad: BadRows, options: TTLOptions) -> None:
        self.writer = writer
        self.bad = bad
        self.options = options
        self.token = re.compile(options.token_pattern)
        self.declared = dict(options.classes)
        self.items: dict[str, int] = {}
        self.users: dict[int, int] = {}  # blake2b of the sequence -> user id
        self.user_lines = array("q")  # user id -> its line in the sequence-task file
        self.t1_users = 0  # users 0 .. t1_users-1 are the sequence task's
        self.labels: dict[str, dict[str, int]] = {}
        self.oov_total = 0
        self.new_users: dict[str, int] = {}  # task -> users a later task added (--allow-new-users)

    @staticmethod
    def _key(tokens: list[str]) -> int:
        return int.from_bytes(hashlib.blake2b(",".join(tokens).encode(), digest_size=8).digest(), "little")

    def _fields(self, text: str, path: str, no: int, what: str, empty: tuple[str, str]) -> list[str] | None:
        """The comma-separated ``what``s (item tokens or labels) of a line, each matching the
        token pattern; None once the line is reported (``empty``: reason and detail for an
        empty field)."""
        fields = [t.strip() for t in text.split(",")]
        if any(not t for t in fields):
            self.bad.report(path, no, *empty)
            return None
        odd = next((t for t in fields if not self.token.fullmatch(t)), None)
        if odd is not None:
            self.bad.report(path, no, f"{what} not matching the token pattern",
                            f"{odd!r} is not {self.options.token_pattern} (--token-pattern)")
            return None
        return fields

    def _tokens(self, text: str, path: str, no: int) -> list[str] | None:
        tokens = self._fields(text, path, no, "item token", ("empty item token", ""))
        if tokens is None:
            return None
        tokens = [t for t in tokens if t != PAD_TOKEN]
        if not tokens:
            self.bad.report(path, no, "empty sequence")
            return None
        return tokens

    def _labels(self, task: TaskFile, text: str, known: dict[str, int], path: str, no: int) -> list[str] | None:
        labels = self._fields(text, path, no, "label", ("missing label", repr(text)))
        if labels is None or task.kind != "class":
            return labels
        if len(labels) != 1:
            self.bad.report(path, no, "more than one label in a class task", repr(text))
            return None
        label = labels[0]
        declared = self.declared.get(task.name)
        if declared is not None and label not in declared:
            self.bad.report(path, no, "label not among the declared classes",
                            f"{label!r} is not one of {list(declared)} (--classes {task.name}=...)")
            return None
        if declared is None and label not in known and len(known) >= self.options.max_classes:
            self.bad.report(path, no, "too many classes",
                            f"{label!r} would be class {len(known) + 1} of task {task.name!r}; at most "
                            f"{self.options.max_classes} (--max-classes, or declare them with --classes)")
            return None
        return labels

    def _decode(self, raw: bytes, path: str, no: int) -> str | None:
        try:  # a byte-order mark some editors put first is not part of the line
            return raw.decode("utf-8-sig" if no == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            self.bad.report(path, no, "not UTF-8 text", f"byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line")
            return None

    def convert(self, task: TaskFile, path: str) -> None:
        rows = _Chunk()
        counters: dict[int, int] = defaultdict(int)  # user -> instances so far in this task
        label_ids = self.labels.setdefault(task.name, {})
        for label in self.declared.get(task.name, ()):  # declared classes keep their declared order
            label_ids.setdefault(label, len(label_ids))
        sequence = task.kind == "sequence"
        oov_id = None if sequence else self.oov_id
        with open(path, "rb") as f:
            for no, raw in enumerate(f, 1):
                text = self._decode(raw, path, no)
                if text is None:
                    continue
                if not text.strip():
                    self.bad.report(path, no, "empty line")
                    continue
                seq_text, sep, label_text = text.partition(",,")
                if sequence and sep:
                    self.bad.report(path, no, "',,' (labels) in the sequence-task file")
                    continue
                if not sequence and not sep:
                    self.bad.report(path, no, "missing ',,' before the label")
                    continue
                tokens = self._tokens(seq_text, path, no)
                if tokens is None:
                    continue
                labels = self._labels(task, label_text, label_ids, path, no) if sep else [None]
                if labels is None:
                    continue
                key = self._key(tokens)
                user = self.users.get(key)
                if sequence and user is not None:
                    # The same user twice: a second row could land in another split than the first.
                    self.bad.report(path, no, "duplicate sequence (the same user twice)",
                                    f"as line {self.user_lines[user]}")
                    continue
                if not sequence and (user is None or user >= self.t1_users):
                    if not self.options.allow_new_users:
                        self.bad.report(path, no, "sequence of no first-task user",
                                        "later tasks' users are the first task's (--allow-new-users accepts others)")
                        continue
                    if user is None or not counters[user]:
                        self.new_users[task.name] = self.new_users.get(task.name, 0) + 1
                if user is None:
                    user = self.users[key] = len(self.users)
                    if sequence:
                        self.user_lines.append(no)
                if oov_id is None:
                    ids = [self.items.setdefault(t, len(self.items) + 1) for t in tokens]
                    oov = 0
                else:
                    ids = [self.items.get(t, oov_id) for t in tokens]
                    oov = ids.count(oov_id)
                    self.oov_total += oov
                for label in labels:
                    label_id = None if label is None else label_ids.setdefault(label, len(label_ids))
                    rows.add(user, counters[user], ids, label_id, oov)
                    oov = 0  # count a line's OOV tokens once, not per label
                    counters[user] += 1
                if rows.size >= CHUNK_ROWS:
                    rows.flush(self.writer, task)
        rows.flush(self.writer, task)
        if sequence:
            self.t1_users = len(self.users)
        if not sequence and len(label_ids) < 2:
            raise BadInputError(f"{path}: task {task.name!r} has {len(label_ids)} distinct label(s); needs >= 2")
        if sequence and not self.items:
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
    check_task_files(options.tasks, raw)
    bad = BadRows(skip=options.skip_bad)
    with DatasetWriter(out_dir, seed=options.seed, source="ttl", rows_per_shard=options.rows_per_shard,
                       overwrite=options.overwrite) as writer:
        conv = _Converter(writer, bad, options)
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
              **({"new_users": conv.new_users} if options.allow_new_users else {}),
              "skipped": bad.summary()}
    return info, report
