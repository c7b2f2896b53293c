"""What a person reads: one console line per stage event and per epoch; everything in a file.

The driver logs through the ``conure_dist`` logger: INFO lines go to the console and to
``RUN_DIR/logs/driver.log``, DEBUG lines (the resolved config, the workers' step lines) to the
file only. For a run directory on object storage the file is written locally and uploaded at
each stage's end and when the job ends.

Workers do not print into the driver's console (Ray's ``log_to_driver`` is off unless
``--log-level debug``); rank 0 of each stage sends its progress as events through a Ray queue
(:class:`EventChannel`), which the driver turns into log lines with ETAs for the stage and the
whole run.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from typing import Any

LOGGER = "conure_dist"
LOG_FILE = "logs/driver.log"

log = logging.getLogger(LOGGER)


class DriverLog:
    """Console + ``RUN_DIR/logs/driver.log`` handlers on the ``conure_dist`` logger, for one job."""

    def __init__(self, run_dir: str, *, debug: bool = False) -> None:
        from conure_dist import storage

        self.run_dir = run_dir
        self.target = storage.join(run_dir, LOG_FILE)
        self.remote = storage.is_uri(run_dir)
        if self.remote:
            fd, self.local = tempfile.mkstemp(prefix="conure-driver-", suffix=".log")
            os.close(fd)
            try:  # a resumed run keeps its earlier log
                with open(self.local, "wb") as f:
                    f.write(storage.read_bytes(self.target))
            except FileNotFoundError:
                pass
        else:
            self.local = self.target
            os.makedirs(os.path.dirname(self.local), exist_ok=True)
        self.file_handler = logging.FileHandler(self.local, encoding="utf-8")
        self.file_handler.setLevel(logging.DEBUG)
        self.file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.file_handler._conure_owner = self  # type: ignore[attr-defined]  (see sync_driver_log)
        self.console = logging.StreamHandler(sys.stdout)
        self.console.setLevel(logging.DEBUG if debug else logging.INFO)
        self.console.setFormatter(logging.Formatter("%(message)s"))

    def __enter__(self) -> "DriverLog":
        log.setLevel(logging.DEBUG)
        log.propagate = False
        log.addHandler(self.file_handler)
        log.addHandler(self.console)
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and exc[0] is not KeyboardInterrupt:
            log.debug("job failed", exc_info=exc)
        self.sync()
        log.removeHandler(self.file_handler)
        log.removeHandler(self.console)
        self.file_handler.close()
        if self.remote:
            os.unlink(self.local)

    def info(self, text: str) -> None:
        log.info(text)

    def debug(self, text: str) -> None:
        log.debug(text)

    def sync(self) -> None:
        """Upload the log file (run directories on object storage)."""
        self.file_handler.flush()
        if self.remote:
            from conure_dist import storage

            with open(self.local, "rb") as f:
                storage.write_bytes(self.target, f.read())


def route_library_logs(debug: bool) -> None:
    """Ray's and Python's warnings go to the driver log file; on the console only errors remain,
    unless ``debug`` (call after ``import ray``, which installs Ray's console handler)."""
    files = [h for h in log.handlers if getattr(h, "_conure_owner", None) is not None]
    logging.captureWarnings(True)
    for name in ("ray", "ray.data", "ray.train", "py.warnings"):
        lib = logging.getLogger(name)
        for handler in files:
            if handler not in lib.handlers:
                lib.addHandler(handler)
        if debug:
            continue
        for handler in lib.handlers:
            if handler not in files and isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.ERROR)
        if name == "py.warnings":
            lib.propagate = False


def sync_driver_log() -> None:
    """Upload the driver log now, if a :class:`DriverLog` is active (called at each stage's end)."""
    for handler in log.handlers:
        owner = getattr(handler, "_conure_owner", None)
        if owner is not None:
            owner.sync()


def hms(seconds: float) -> str:
    """``H:MM:SS`` (hours not wrapped at a day)."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class RunClock:
    """ETA of the stage (its remaining epochs at the measured speed; early stopping can only make
    it shorter) and of the run: the remaining epochs of later stages at the current speed, plus
    each remaining stage's or evaluation's fixed cost as measured so far (the first one, which
    also loaded the libraries, is left out once there are others). Starting a worker group is
    counted apart (:meth:`workers_ready`): with ``new_workers_per_fit`` (``cluster.worker_group:
    stage``) every remaining fit pays it again, else only the first fit paid it."""

    def __init__(self, new_workers_per_fit: bool = False) -> None:
        self.remaining_examples = 0  # epochs x train rows of the stages after the current one
        self.remaining_fits = 0
        self.new_workers_per_fit = new_workers_per_fit
        self.fixed_costs: list[float] = []  # each fit's wall time less its epochs and its workers' start
        self.worker_starts: list[float] = []  # seconds from asking for a worker group to its workers running
        self._started = time.time()
        self._epoch_seconds = 0.0
        self._start_seconds = 0.0
        self._in_fit = False
        self._lock = threading.Lock()  # the event thread reports; the coordinator's thread begins and ends fits

    def plan(self, remaining_examples: int, remaining_fits: int) -> None:
        self.remaining_examples, self.remaining_fits = remaining_examples, remaining_fits

    def begin_fit(self) -> None:
        with self._lock:
            self._started, self._epoch_seconds, self._start_seconds, self._in_fit = time.time(), 0.0, 0.0, True

    def end_fit(self) -> None:
        with self._lock:
            self._in_fit = False
            self.fixed_costs.append(max(0.0, time.time() - self._started - self._epoch_seconds - self._start_seconds))

    def workers_ready(self, seconds: float) -> None:
        """A session's workers are running, ``seconds`` after it was asked for (their report can
        reach the driver just after the fit has ended: then it is that fit's)."""
        with self._lock:
            self.worker_starts.append(seconds)
            if self._in_fit:
                self._start_seconds += seconds
            elif self.fixed_costs:
                self.fixed_costs[-1] = max(0.0, self.fixed_costs[-1] - seconds)

    def epoch_line(self, e: dict[str, Any]) -> str:
        with self._lock:
            self._epoch_seconds += e["seconds"]
        rate = e.get("examples_per_s") or 0.0
        stage_eta = 0.0 if e.get("last") else (e["epochs"] - e["epoch"]) * e["seconds"]
        costs = self.fixed_costs[1:] or self.fixed_costs
        fixed = sum(costs) / len(costs) if costs else 0.0
        if self.new_workers_per_fit and self.worker_starts:
            fixed += sum(self.worker_starts) / len(self.worker_starts)
        run_eta = stage_eta + (self.remaining_examples / rate if rate > 0 else 0.0) + fixed * self.remaining_fits
        metric = f"val {e['metric']} {e['value']:.4f}{' (best)' if e.get('improved') else ''}" if e.get("metric") else ""
        wait = f"  waiting for data {100 * e['data_wait_s'] / e['train_s']:.0f} %" if e.get("train_s") else ""
        return (f"{e['task']}/{e['stage']}  epoch {e['epoch']}/{e['epochs']}  loss {e['loss']:.4f}  {metric}  "
                f"{rate:,.0f} ex/s{wait}  ETA stage {hms(stage_eta)}, run {hms(run_eta)}")


class EventChannel:
    """A Ray queue from the workers' rank 0 to the driver, drained by a driver thread into the log."""

    def __init__(self, clock: RunClock) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="conure-events", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                event = self.queue.get(block=True, timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (Ray shut down): nothing more will come
                return
            self.handle(event)

    def handle(self, event: dict[str, Any]) -> None:
        if event.get("kind") == "epoch":
            log.info(self.clock.epoch_line(event))
        elif event.get("kind") == "workers_ready":
            self.clock.workers_ready(event["seconds"])
        else:
            log.log(logging.INFO if event.get("level") == "info" else logging.DEBUG, event.get("text", ""))

    def close(self) -> None:
        """Print what is still queued, then stop."""
        from ray.util.queue import Empty

        self._stop.set()
        self._thread.join(timeout=5)
        try:
            while True:
                self.handle(self.queue.get(block=False))
        except (Empty, Exception):
            pass
        try:
            import ray

            ray.kill(self.queue.actor)
        except Exception:
            pass


def send(channel, event: dict[str, Any]) -> None:
    """From a worker: hand one event to the driver; never fails the stage."""
    if channel is None:
        return
    try:
        channel.put_nowait(event)
    except Exception:
        pass

