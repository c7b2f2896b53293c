"""One filesystem layer for every path the product reads or writes: local disk, or any URI
pyarrow's filesystems open (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``).

Local paths are made absolute once, in the driver (Ray Train workers run in working
directories of their own). URIs are kept as given; credentials and endpoints come from the
usual environment (``AWS_*``, ``AWS_ENDPOINT_URL`` for S3-compatible servers,
``GOOGLE_APPLICATION_CREDENTIALS``...), on the driver and on every Ray node.

Writes never leave a half-written file that looks complete: a local file is written to a
temporary name and renamed; an object is one PUT.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator, Sequence

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str) -> str:
    """A local path made absolute (``~`` expanded); a URI unchanged."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    if not is_uri(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), resolve(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise FileNotFoundError(f"{path}: cannot open this location ({e})") from None


def read_bytes(path: str, attempts: int = 5) -> bytes:
    """A whole file; raises FileNotFoundError (naming the path) when there is no such file.

    An object replaced while it is read (another driver's heartbeat in ``lock.json``) can come
    back cut at the old object's size: the read is repeated until the size it got is the
    object's size."""
    fs, inner = filesystem(path)
    for _ in range(attempts):
        info = fs.get_file_info(inner)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{path}: not found")
        with fs.open_input_stream(inner) as f:
            data = f.read()
        if not is_uri(path) or fs.get_file_info(inner).size == len(data):
            return data
    return data


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file: temporary name + rename locally, one PUT on object stores."""
    fs, inner = filesystem(path)
    parent = inner.rsplit("/", 1)[0] if "/" in inner else inner
    fs.create_dir(parent, recursive=True)
    if is_uri(path):
        with fs.open_output_stream(inner) as out:
            out.write(data)
        return
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, inner)
    except BaseException:
        # A full or failing disk: no partial temporary file left to fill it further. The file
        # under its own name is untouched (the previous version, or none).
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def kind(path: str) -> pafs.FileType:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type


def exists(path: str) -> bool:
    return kind(path) != pafs.FileType.NotFound


def list_files(path: str) -> list[str]:
    """Paths (relative to ``path``) of every file below a directory or prefix; [] if none."""
    fs, inner = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    root = inner.rstrip("/") + "/"
    return sorted(i.path[len(root):] for i in infos if i.type == pafs.FileType.File)


def delete_tree(path: str) -> None:
    """Delete a file, or a directory / prefix with everything below it; nothing if absent."""
    fs, inner = filesystem(path)
    found = fs.get_file_info(inner).type
    if found == pafs.FileType.Directory:
        fs.delete_dir(inner)
    elif found == pafs.FileType.File:
        fs.delete_file(inner)


def upload_tree(local_dir: str, dest: str, *, last: Sequence[str] = ()) -> None:
    """Copy every file of ``local_dir`` to ``dest`` (a directory or prefix), the files named in
    ``last`` after all others: a reader that waits for those never sees a partial tree."""
    fs, inner = filesystem(dest)
    local = pafs.LocalFileSystem()
    files = []
    for root, _, names in os.walk(local_dir):
        files += [os.path.relpath(os.path.join(root, n), local_dir) for n in names]
    ordered = sorted(f for f in files if f not in last) + [f for f in last if f in files]
    for rel in ordered:
        target = "/".join([inner.rstrip("/"), *rel.split(os.sep)])
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(os.path.join(local_dir, rel), target, source_filesystem=local, destination_filesystem=fs)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local directory with the contents of ``path``: the path itself when it is local, a
    temporary download (removed afterwards) when it is a URI."""
    if not is_uri(path):
        yield resolve(path)
        return
    fs, inner = filesystem(path)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{path}: not found")
    tmp = tempfile.mkdtemp(prefix="conure-download-")
    try:
        pafs.copy_files(inner, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
