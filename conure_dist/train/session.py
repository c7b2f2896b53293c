"""The session: one Ray Train fit that runs every stage and evaluation a driver asks for.

Starting a worker group (processes, imports, the process group) costs most of a short stage,
so the coordinator keeps one group for the whole run: :class:`Mailbox`, a small Ray actor,
holds the coordinator's commands (``train`` a stage, ``evaluate`` tasks, ``stop``) and the
workers' results, and gives every rank its shard of each dataset a command reads. The
coordinator still computes the merges and prune masks and writes the run directory between
commands; the workers wait for the next command meanwhile. The mailbox keeps each split's
iterators (Ray Data's streaming split, one per rank) for the commands that read it again: a
retrain stage reads its train stage's splits, and every commit the earlier tasks' test splits.
Splits small enough to be read once into the object store are instead cut into a fixed part
per rank (train splits only under ``cluster.train_shuffle: permute``, the default for new
runs): no streaming split's coordinator process to start for each of them.

Failures are counted per command: a worker that fails (or a node that is lost: preemptions
count too, unlike Ray Train's own count) makes Ray Train restart the group, the new group asks
the mailbox for the command in progress and resumes it from its last checkpoint; once a
command has used up ``max_failures`` restarts it is answered with the workers' error, and the
stage fails with it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import ray


class Commands:
    """Commands in, results out; each command answered exactly once, in order (the state of
    :data:`Mailbox`). ``stop`` is the last command and is never answered: it stays the pending
    one, so that every rank sees it whenever it asks."""

    def __init__(self, world_size: int, max_failures: int, keep_splits: int = 8) -> None:
        self.world_size, self.max_failures, self.keep_splits = world_size, max_failures, keep_splits
        self.commands: list[dict[str, Any]] = []
        self.reads: dict[int, dict[str, str]] = {}  # seq -> {name in the worker: split id}
        # split id ("click.train", also the Ray Data dataset name: no "/") -> (each rank's Part, or a
        # Dataset to split; SplitSize; in memory)
        self.sources: dict[str, tuple[Any, Any, bool]] = {}
        self.results: dict[int, Any] = {}
        self.splits: dict[str, list] = {}  # split id -> each rank's part or iterator, most recently used last
        self.group: str | None = None  # the worker group now running (the iterators are its)
        self.attempts: dict[int, list[str]] = {}  # seq -> the groups that tried it
        self.errors: dict[int, list[tuple[str, int, str]]] = {}  # seq -> (group, rank, error) of each failure
        self.starts_without_command = 0
        self.groups_started = 0  # worker groups that said hello: the first, then restarts
        self.waiting: list[asyncio.Event] = []  # callers of wait_result / wait_next, woken by every change

    # -- the coordinator -------------------------------------------------------------
    def post(self, command: dict[str, Any], reads: dict[str, str], sources: dict[str, tuple[Any, Any, bool]]) -> int:
        """``reads``: the command's dataset names -> split ids; ``sources``: split id ->
        (data, :class:`~conure_dist.data.pipeline.SplitSize`, in memory) of those first seen;
        ``in memory``: the data is each rank's fixed part
        (:func:`~conure_dist.data.pipeline.split_in_memory`), else a Ray Dataset to split into
        streaming splits."""
        self.commands.append(command)
        seq = len(self.commands) - 1
        self.reads[seq] = dict(reads)
        for split, source in sources.items():
            self.sources.setdefault(split, source)
        self._wake()
        return seq

    def result(self, seq: int) -> tuple | None:
        """``(result,)`` once the command is answered, else None."""
        return (self.results[seq],) if seq in self.results else None

    async def wait_result(self, seq: int, timeout_s: float) -> tuple | None:
        """:meth:`result`, once there is one or after ``timeout_s``."""
        await self._until(lambda: seq in self.results, timeout_s)
        return self.result(seq)

    # -- the workers -----------------------------------------------------------------
    def hello(self, group: str) -> bool:
        """Rank 0 of a worker group that just started (the first group, or one Ray Train
        restarted after a failure). Its ranks get new iterators; a group started while a command
        is pending is an attempt at it (a group that fails before it begins the command has used
        one up). False: groups keep failing before any command, the session gives up."""
        self.group, self.splits = group, {}
        self.groups_started += 1
        pending = self._pending()
        if pending is not None and self.commands[pending]["kind"] != "stop":
            self._attempt(pending, group)
            return True
        self.starts_without_command += 1
        return self.starts_without_command <= self.max_failures + 1

    def restarted(self) -> bool:
        """Whether the group now running is not the session's first."""
        return self.groups_started > 1

    def next(self) -> tuple[int, dict[str, Any]] | None:
        """The first command not answered yet (every rank sees the same one)."""
        pending = self._pending()
        return None if pending is None else (pending, self.commands[pending])

    async def wait_next(self, timeout_s: float) -> tuple[int, dict[str, Any]] | None:
        """:meth:`next`, once there is a command not answered yet or after ``timeout_s``."""
        await self._until(lambda: self._pending() is not None, timeout_s)
        return self.next()

    async def _until(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Wait until ``ready()`` or ``timeout_s``, without polling: in the actor every method
        runs in one event loop, and each change wakes the waiting calls (:meth:`_wake`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not ready() and loop.time() < deadline:
            event = asyncio.Event()
            self.waiting.append(event)
            try:
                await asyncio.wait_for(event.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                return
            finally:
                if event in self.waiting:  # timed out (a woken one is gone already): not kept for ever
                    self.waiting.remove(event)

    def _wake(self) -> None:
        waiting, self.waiting = self.waiting, []
        for event in waiting:
            event.set()

    def begin(self, seq: int, group: str) -> bool:
        """Rank 0 of ``group`` starts command ``seq``. False: its restarts are used up, and it
        has been answered with the workers' error."""
        self._attempt(seq, group)
        return seq not in self.results

    def shards(self, seq: int, group: str, rank: int) -> dict[str, Any]:
        """Rank ``rank``'s data of each of the command's datasets: its part of a split the
        driver cut into parts (the same for every worker group), else its iterator of a
        streaming split, which is split once per worker group (padded to equal shards, see
        :class:`~conure_dist.data.pipeline.ExactlyOnceDataConfig`) and read again by later
        commands; every epoch starts a new pass over it on all ranks together. The most recently
        used ``keep_splits`` splits are kept (a part is also held by the driver)."""
        if group != self.group:
            raise RuntimeError(f"worker group {group} asked for data, but the session's workers are now group {self.group}")
        out = {}
        for name, split in self.reads[seq].items():
            if split not in self.splits:
                dataset, size, in_memory = self.sources[split]
                if in_memory:  # cut by the driver: the same parts for every worker group
                    self.splits[split] = list(dataset)
                else:
                    from conure_dist.data.pipeline import ExactlyOnceDataConfig

                    config = ExactlyOnceDataConfig({split: size}, datasets_to_split=[split])
                    self.splits[split] = [its[split] for its in config.configure({split: dataset}, self.world_size, None, None)]
            self.splits[split] = self.splits.pop(split)  # most recently used last
            out[name] = self.splits[split][rank]
        while len(self.splits) > max(self.keep_splits, len(self.reads[seq])):
            del self.splits[next(iter(self.splits))]  # the least recently used split's iterators
        return out

    def failed(self, seq: int, group: str, rank: int, error: str) -> None:
        """A rank's error in command ``seq`` (the group then fails and Ray Train restarts it)."""
        self.errors.setdefault(seq, []).append((group, rank, error))

    def done(self, seq: int, result: Any) -> None:
        self.results[seq] = result
        self._wake()

    def _attempt(self, seq: int, group: str) -> None:
        groups = self.attempts.setdefault(seq, [])
        if group not in groups:
            groups.append(group)
            self.starts_without_command = 0
        if len(groups) > self.max_failures + 1 and seq not in self.results:
            self.results[seq] = {"error": f"{self._cause(seq)} (after {len(groups) - 1} restarts of the workers; "
                                          f"cluster.max_failures is {self.max_failures})"}
            self._wake()

    def _cause(self, seq: int) -> str:
        """The errors of the last group that reported any for ``seq``, each once."""
        errors = self.errors.get(seq)
        if not errors:
            return "a worker died without an error (killed, out of memory?)"
        last = errors[-1][0]
        return "; ".join(sorted({e for g, _, e in errors if g == last}))

    def _pending(self) -> int | None:
        for seq in range(len(self.commands)):
            if seq not in self.results:
                return seq
        return None


# One per session, owned by the driver, on the driver's node; an async actor (wait_result and
# wait_next wait in its event loop, where its other methods run too, one at a time).
Mailbox = ray.remote(num_cpus=0)(Commands)
