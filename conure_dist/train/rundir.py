"""The run directory: manifest, owner maps, weights, reports — local path or a pyarrow URI.

Layout::

    manifest.json                  config, settings, task list, ledger, per-stage status/metrics/timings
    lock.json                      the driver using the directory (host, pid, heartbeat)
    state/weights-<step>.safetensors  weights after the latest step of the plan, and after
                                   each commit (``<task>-commit``)
    state/owners-v<n>.safetensors  owner map version n (one per prune)
    state/set-<task>.safetensors   a task's own weight set (methods with one backbone per task)
    stages/<task>-<step>/          inputs of a training stage (weights, owner map)
    ray/<run id>/session/          Ray Train storage of this run (checkpoints, named after their stage)
    replaced/<time>/               what --new-run moved aside
    reports/STATUS.txt             complete, or incomplete with the tasks committed so far
    reports/accuracy_matrix.csv    after_task,task,metric,value,status (measured | pending)
    reports/capacity.txt           share of each prunable tensor owned by each task
    tensorboard/                   event files per stage

Only the coordinator writes the manifest. Every file is written to a temporary name and
renamed (on object stores, where rename is not atomic, a single PUT is), so a crash never
leaves a half-written manifest or owner map that looks complete. The manifest records a
digest of every state file it points at (``state_checksums``), so a file damaged afterwards (a
truncated copy, a disk error) is found when the run is resumed instead of being trained on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import Any, Mapping

import pyarrow.fs as pafs
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from conure_dist import storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 2


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (different config, corrupt manifest...)."""


def digest(data: bytes) -> str:
    """Content digest of a state file as the manifest records it (``sha256:<hex>``)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RunDirDamaged(RunDirError):
    """A file of the run directory is damaged (bad data, not a bad option: the jobs exit 1)."""


def damaged(path: str, reason: str) -> RunDirError:
    """The error for a run-directory file that cannot be trusted, with what to do about it."""
    return RunDirDamaged(f"{path} is damaged ({reason}). Restore it from a copy of the run directory, or pass "
                       "--new-run to start over (the damaged run is moved aside under replaced/)")


class RunDir:
    """Files of one run, on any filesystem pyarrow understands (local, s3://, gs://...)."""

    def __init__(self, uri: str):
        self.uri = uri
        if "://" in uri:
            try:
                self.fs, self.root = storage.filesystem(uri)
            except FileNotFoundError as e:
                raise RunDirError(f"--run-dir: {e}") from None
            self.local = False
        else:
            # Absolute once, here: Ray Train workers run in directories of their own, where a
            # relative path would name another place.
            self.uri = os.path.abspath(uri)
            self.fs, self.root = pafs.LocalFileSystem(), self.uri
            self.local = True
        self.fs.create_dir(self.root, recursive=True)

    # -- paths -------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def storage_uri(self, *parts: str) -> str:
        """A location other tools (Ray Train's storage_path) can open."""
        if self.local:
            return self.path(*parts)
        return storage.join(self.uri, *parts)  # keeps what the URI names besides the path (abfs' account)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    # -- bytes -------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> None:
        storage.write_bytes(self.storage_uri(rel), data)

    def read_bytes(self, rel: str) -> bytes:
        return storage.read_bytes(self.storage_uri(rel))

    def delete(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def remove_temporary(self, under: str = "", recursive: bool = False) -> list[str]:
        """Delete the temporary files a writer killed inside a write left in ``under`` (the
        top level by default): ``<name>.tmp-<id>``, never renamed to their name. Returns their
        paths. Only while holding the run's lock: another driver's writes in flight look the same;
        the lock file's own (the heartbeat rewrites it meanwhile) is left alone."""
        where = self.path(under) if under else self.root
        infos = self.fs.get_file_info(pafs.FileSelector(where, recursive=recursive, allow_not_found=True))
        stale = [i.path for i in infos if i.type == pafs.FileType.File and ".tmp-" in i.base_name
                 and not i.base_name.startswith("lock.json")]
        for path in stale:
            self.fs.delete_file(path)
        return stale

    def entries(self) -> list[str]:
        """Names of the top-level files and folders."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def move_aside(self, into: str, keep: tuple[str, ...]) -> list[str]:
        """Move every top-level entry except ``keep`` under ``into``; returns the names moved."""
        moved = []
        for name in self.entries():
            if name in keep or name == into.split("/", 1)[0]:
                continue
            if self.local:
                os.makedirs(self.path(into), exist_ok=True)
                os.rename(self.path(name), self.path(into, name))
            else:  # object stores move object by object
                info = self.fs.get_file_info(self.path(name))
                files = ([info] if info.type == pafs.FileType.File else
                         [f for f in self.fs.get_file_info(pafs.FileSelector(self.path(name), recursive=True))
                          if f.type == pafs.FileType.File])
                for f in files:
                    target = self.path(into, f.path[len(self.root.rstrip("/")) + 1:])
                    self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                    self.fs.move(f.path, target)
                if info.type == pafs.FileType.Directory:
                    self.fs.delete_dir(self.path(name))
            moved.append(name)
        return moved

    # -- typed files -------------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_bytes(rel))
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.path(rel)}: not valid JSON ({e})") from e

    def write_tensors(self, rel: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Write a safetensors file; returns its :func:`digest`."""
        data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
        self.write_bytes(rel, data)
        return digest(data)

    def read_tensors(self, rel: str) -> dict[str, torch.Tensor]:
        return st_load(self.read_bytes(rel))

    def read_state_tensors(self, rel: str, expected: str | None) -> dict[str, torch.Tensor]:
        """A state file, refused with :func:`damaged` when it is missing, does not match the
        digest the manifest recorded (``expected``; None: a manifest older than the digests), or
        is not a readable safetensors file."""
        if not self.exists(rel):
            raise damaged(self.path(rel), "the manifest names it, but it is missing")
        data = self.read_bytes(rel)
        if expected is not None and digest(data) != expected:
            raise damaged(self.path(rel), f"its content ({len(data)} bytes) does not match the checksum the manifest "
                          f"recorded when it was written")
        try:
            return st_load(data)
        except Exception as e:  # safetensors raises its own error types for a truncated header or body
            raise damaged(self.path(rel), f"not a readable safetensors file: {e}") from None

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())


def now() -> float:
    return round(time.time(), 3)


def csv_text(rows: list[Mapping[str, Any]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    buf.write(",".join(columns) + "\n")
    for row in rows:
        buf.write(",".join(repr(row[c]) if isinstance(row[c], float) else str(row[c]) for c in columns) + "\n")
    return buf.getvalue()
