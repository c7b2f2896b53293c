"""One driver per run directory: ``RUN_DIR/lock.json`` names the holder (host, pid).

Two drivers on one run directory would each run the same stages and overwrite each other's
manifest. The lock records the holder's host, pid and a heartbeat that a background thread
refreshes; a second driver is refused with the holder's name. A lock is stale, and taken
over with a warning, when its holder's pid is gone (same host) or its heartbeat is older
than ``stale_after_s`` (any host: a lost node cannot say it is gone).

Example::

    with RunLock(rundir):
        ...  # run the stages
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from conure_dist.train.rundir import RunDir, RunDirError

LOCK_FILE = "lock.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is someone else's
    return True


class RunLock:
    """Exclusive use of a run directory by one driver process."""

    def __init__(self, rundir: RunDir, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        self.rundir, self.heartbeat_s, self.stale_after_s = rundir, heartbeat_s, stale_after_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started": getattr(self, "_started", time.time()), "heartbeat": time.time()}

    def stale_reason(self, held: dict[str, Any]) -> str | None:
        """Why ``held`` no longer protects anything, or None while its holder may be running."""
        age = time.time() - float(held.get("heartbeat", 0))
        if held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1))):
            return f"process {held.get('pid')} on this host has ended"
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def acquire(self) -> "RunLock":
        self._started = time.time()
        if not self._create():
            held = self._read()
            reason = self.stale_reason(held) if held is not None else "it is unreadable"
            if reason is None:
                raise RunDirError(
                    f"{self.rundir.uri} is in use by another driver (host {held.get('host')}, pid {held.get('pid')}, "
                    f"heartbeat {time.time() - float(held.get('heartbeat', 0)):.0f} s ago). Wait for it to end, or stop "
                    f"it; a lock whose holder is gone is taken over by itself.")
            print(f"warning: taking over the stale lock of {self.rundir.uri} ({reason})", file=sys.stderr, flush=True)
            self.rundir.write_json(LOCK_FILE, self._record())
        # Object stores have no exclusive create: read back, and give way to a driver that wrote last.
        held = self._read()
        if held is None or held.get("token") != self.token:
            raise RunDirError(f"{self.rundir.uri}: another driver took the lock at the same time "
                              f"(host {held and held.get('host')}, pid {held and held.get('pid')})")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        """Write the lock if there is none; False if one exists."""
        if self.rundir.local:
            path = self.rundir.path(LOCK_FILE)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:  # the content goes in with the exclusive create
                json.dump(self._record(), f)
            return True
        if self.rundir.exists(LOCK_FILE):
            return False
        self.rundir.write_json(LOCK_FILE, self._record())
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            held = self.rundir.read_json(LOCK_FILE)
        except (FileNotFoundError, RunDirError, OSError):
            return None
        return held if isinstance(held, dict) else None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = self._read()
            if held is not None and held.get("token") == self.token:
                try:
                    self.rundir.write_json(LOCK_FILE, self._record())
                except OSError:  # storage briefly unreachable: the next beat tries again
                    pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held is not None and held.get("token") == self.token:
            self.rundir.delete(LOCK_FILE)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
