"""The session's mailbox: commands answered once and in order, restarts counted per command
(the real path, one Ray Train fit running every stage, is in test_distributed.py and
test_faults_ray.py)."""

import pytest

from conure_dist.train.session import Commands


def test_commands_are_taken_in_order_and_each_answered_once():
    box = Commands(world_size=2, max_failures=1)
    assert box.hello("g1") and box.next() is None  # workers started before the first command
    first = box.post({"kind": "train", "config": {"key": "pretrain-train"}}, {}, {})
    second = box.post({"kind": "evaluate", "config": {}}, {}, {})
    assert box.next() == (first, {"kind": "train", "config": {"key": "pretrain-train"}})
    assert box.begin(first, "g1") and box.result(first) is None
    assert box.shards(first, "g1", 1) == {}  # a command that reads no dataset
    box.done(first, {"checkpoint": "final-000000004-e1-a1-pretrain-train"})
    assert box.result(first) == ({"checkpoint": "final-000000004-e1-a1-pretrain-train"},)
    assert box.next() == (second, {"kind": "evaluate", "config": {}})
    box.done(second, {"metrics": {}})
    stop = box.post({"kind": "stop"}, {}, {})
    assert box.next() == (stop, {"kind": "stop"}) and box.next() == (stop, {"kind": "stop"})  # seen by every rank


def test_restarts_are_counted_per_command_and_answered_with_the_last_groups_errors():
    box = Commands(world_size=2, max_failures=1)
    seq = box.post({"kind": "train", "config": {}}, {}, {})
    assert box.hello("g1") and box.begin(seq, "g1")
    box.failed(seq, "g1", 1, "RuntimeError: injected failure at step 7")
    assert box.begin(seq, "g1")  # the same group asking again is not a restart
    assert box.hello("g2") and box.begin(seq, "g2")  # the one restart allowed
    box.failed(seq, "g2", 0, "RuntimeError: injected failure at step 9")
    box.failed(seq, "g2", 1, "RuntimeError: injected failure at step 9")
    box.failed(seq, "g2", 1, "DistBackendError: connection reset")  # a rank that lost its peer
    assert box.hello("g3")  # a group that fails before it begins the command has used up an attempt
    assert box.result(seq) == ({"error": "DistBackendError: connection reset; RuntimeError: injected failure at step 9 "
                                         "(after 2 restarts of the workers; cluster.max_failures is 1)"},)
    assert not box.begin(seq, "g3") and box.next() is None  # answered: the workers wait for the next command
    killed = box.post({"kind": "train", "config": {}}, {}, {})
    assert box.begin(killed, "g3") and box.hello("g4") and box.begin(killed, "g4")
    assert box.hello("g5") and not box.begin(killed, "g5")  # SIGKILL: no error to report
    assert box.result(killed)[0]["error"].startswith("a worker died without an error")


def test_a_session_gives_up_when_its_workers_keep_failing_before_any_command():
    box = Commands(world_size=1, max_failures=1)
    assert box.hello("g1") and box.hello("g2")
    assert not box.hello("g3")
    box = Commands(world_size=1, max_failures=1)
    seq = box.post({"kind": "train", "config": {}}, {}, {})
    assert box.hello("g1") and box.begin(seq, "g1")  # a command begun: the count starts over
    box.done(seq, {})
    assert box.hello("g2") and box.hello("g3") and not box.hello("g4")


def test_only_the_running_group_gets_data():
    box = Commands(world_size=2, max_failures=1)
    seq = box.post({"kind": "evaluate", "config": {}}, {}, {})
    box.hello("g1")
    box.hello("g2")  # Ray Train restarted the workers: a late call of the old group is refused
    with pytest.raises(RuntimeError, match="worker group g1 asked for data, but the session's workers are now group g2"):
        box.shards(seq, "g1", 0)
    assert box.shards(seq, "g2", 0) == {}


def _together(iterators):
    """Read one epoch of each rank's iterator at once (the ranks start an epoch together)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(iterators)) as pool:
        return list(pool.map(lambda it: sorted(row["user"] for row in it.iter_rows()), iterators))


def test_each_split_is_split_once_per_worker_group_and_read_again_by_later_commands(ray_cluster):
    """Real Ray Data: the mailbox splits a dataset into equal per-rank iterators the first time a
    command reads it, hands the same iterators to later commands (a retrain stage reads its
    train stage's splits), drops the least recently used beyond ``keep_splits``, and splits
    again for a restarted worker group."""
    import pyarrow as pa
    import ray.data

    from conure_dist.data.pipeline import SplitSize

    table = pa.table({"user": pa.array(range(5), pa.int64()), "seq": pa.array([[u + 1] for u in range(5)], pa.list_(pa.int64()))})
    ds, size = ray.data.from_arrow(table), SplitSize(5, table.schema)
    box = Commands(world_size=2, max_failures=0, keep_splits=1)
    box.hello("g1")
    first = box.post({"kind": "train"}, {"train": "a.train"}, {"a.train": (ds, size, False)})
    its = [box.shards(first, "g1", r)["train"] for r in (0, 1)]
    for _ in range(2):  # two epochs: every row once each, one padding row (user -1) to make 3 + 3
        users = _together(its)
        assert sorted(users[0] + users[1]) == [-1, 0, 1, 2, 3, 4] and len(users[0]) == len(users[1]) == 3
    again = box.post({"kind": "train"}, {"train": "a.train"}, {})
    assert box.shards(again, "g1", 0)["train"] is its[0]  # the same iterators, split once
    assert sorted(sum(_together(its), [])) == [-1, 0, 1, 2, 3, 4]  # and read again by the later command
    other = box.post({"kind": "evaluate"}, {"test_b": "b.test"}, {"b.test": (ds, size, False)})
    box.shards(other, "g1", 0)
    assert list(box.splits) == ["b.test"]  # keep_splits 1: a/train's were dropped
    kept = box.splits["b.test"]
    box.hello("g2")  # a restarted group gets new ones
    box.shards(other, "g2", 0)
    assert box.group == "g2" and box.splits["b.test"] is not kept


def test_evaluation_splits_in_the_object_store_are_cut_into_a_fixed_part_per_rank(ray_cluster):
    """Real Ray: a split read whole (tables, or a dataset Ray Data materialized) reaches each
    rank as its own equal, contiguous part (padded), every row exactly once, the same part every
    time it is cut and the part ``Dataset.split(n, equal=True)`` gives (the parts of the runs
    made before the driver cut them), readable again and again without a coordinator."""
    import pyarrow as pa
    import ray.data

    from conure_dist.data.pipeline import Part, SplitSize, iter_torch_batches, padding_to_multiple, split_in_memory

    table = pa.table({"user": pa.array(range(11), pa.int64()), "seq": pa.array([[u + 1] for u in range(11)], pa.list_(pa.int64()))})
    tables = [table.slice(0, 4), table.slice(4, 5), table.slice(9, 2)]  # a table per file: 4, 5, 2 rows
    ds = ray.data.from_arrow(tables)
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    size = SplitSize(11, table.schema)

    def users(part):
        return part.table()["user"].to_pylist()

    for world, padding in ((1, 0), (2, 1), (3, 1), (4, 1), (6, 1), (11, 0)):
        parts = split_in_memory(tables, size, world)
        assert len(parts) == world and all(isinstance(p, Part) and p.rows == len(users(p)) for p in parts)
        got = [users(p) for p in parts]
        assert len({len(u) for u in got}) == 1  # equal parts: every rank runs the same steps
        # every row once, contiguous in the stored order, the padding rows (user -1) last
        assert sum(got, []) == list(range(11)) + [-1] * padding, (world, got)
        assert [users(p) for p in parts] == got  # read again: the same rows
        assert [users(p) for p in split_in_memory(tables, size, world)] == got  # cut again: the same parts
        assert [users(p) for p in split_in_memory(ds, size, world)] == got  # from Ray Data's blocks: the same
        pad = padding_to_multiple(size, world)
        blocks = ds.to_arrow_refs() + ([ray.put(pad)] if pad is not None else [])
        ray_parts = ray.data.from_arrow_refs(blocks).split(world, equal=True)
        assert [[r["user"] for r in p.iter_rows()] for p in ray_parts] == got  # Ray Data's equal split
    with pytest.raises(ValueError, match="split has 11 rows, but its dataset.json count is 12"):
        split_in_memory(tables, SplitSize(12, table.schema), 2)  # rows would be dropped or padded wrongly
    empty = split_in_memory([table.slice(0, 0)], SplitSize(0, table.schema), 2)  # an empty split: empty parts
    assert [p.rows for p in empty] == [0, 0] and [users(p) for p in empty] == [[], []]
    assert list(iter_torch_batches(empty[1], batch_size=4, seq_len=3, with_label=False)) == []

    box = Commands(world_size=2, max_failures=0)
    box.hello("g1")
    cut = split_in_memory(tables, size, 2)
    seq = box.post({"kind": "evaluate"}, {"test_a": "a.test"}, {"a.test": (cut, size, True)})
    parts = [box.shards(seq, "g1", r)["test_a"] for r in (0, 1)]
    assert parts == cut  # each rank its own part
    again = box.post({"kind": "evaluate"}, {"test_a": "a.test"}, {})
    assert box.shards(again, "g1", 1)["test_a"] is parts[1]  # kept for later commands
    box.hello("g2")  # a restarted group: the same parts
    assert [box.shards(again, "g2", r)["test_a"] for r in (0, 1)] == parts


def test_a_train_part_in_the_object_store_is_taken_whole_in_a_new_seeded_order_every_epoch(ray_cluster):
    """cluster.train_shuffle permute, real Ray Data: each rank takes every row of its part
    (padding included) exactly once per epoch, in a permutation of (seed, epoch, rank): the same
    one when the epoch is run again, another in the next epoch and on the other rank; with
    shuffling off, the stored order; the batches are padded like the streaming path's."""
    import pyarrow as pa
    import ray.data
    import torch

    from conure_dist.data.pipeline import SplitSize, epoch_batches, iter_torch_batches, split_in_memory

    rows = 1000
    table = pa.table({"user": pa.array(range(rows), pa.int64()),
                      "seq": pa.array([list(range(1, u % 7 + 2)) for u in range(rows)], pa.list_(pa.int64())),
                      "label": pa.array([u % 5 for u in range(rows)], pa.int32())})
    ds = ray.data.from_arrow([table.slice(0, 400), table.slice(400, 599), table.slice(999, 1)])
    ds.context.execution_options.preserve_order = True
    parts = split_in_memory(ds.materialize(), SplitSize(rows, table.schema), 3)  # 334 rows each, 2 padding

    def epoch(rank, number, shuffle_rows=100_000, batch_size=32):
        return list(epoch_batches(parts[rank], epoch=number, rank=rank, seed=11, shuffle_rows=shuffle_rows,
                                  batch_size=batch_size, seq_len=4, with_label=True))

    def users(batches):
        return torch.cat([b["user"] for b in batches]).tolist()

    first = [epoch(rank, 1) for rank in range(3)]
    assert [len(b) for b in first] == [11, 11, 11] and [len(b["user"]) for b in first[0]] == [32] * 10 + [14]
    stored = [part.table()["user"].to_pylist() for part in parts]
    for rank in range(3):
        assert sorted(users(first[rank])) == sorted(stored[rank])  # every row of the part once
        assert users(first[rank]) != stored[rank]  # shuffled
        assert users(epoch(rank, 1)) == users(first[rank])  # an epoch run again: the same batches
        assert users(epoch(rank, 2)) != users(first[rank])  # the next epoch: another order
        assert users(epoch(rank, 1, shuffle_rows=0)) == stored[rank]  # shuffling off: the stored order
    assert sum(stored, []) == list(range(rows)) + [-1, -1]  # the parts: every row once, padding last
    assert users(first[1])[:20] != [u + 334 for u in users(first[0])[:20]]  # ranks' orders are their own
    # the same padded batches as the streaming path gives for the same rows in the same order
    streamed = ray.data.from_arrow(parts[2].table())
    plain = list(iter_torch_batches(streamed, batch_size=50, seq_len=4, with_label=True))
    assert [torch.equal(a["user"], b["user"]) for a, b in zip(plain, iter_torch_batches(
        parts[2], batch_size=50, seq_len=4, with_label=True))] == [True] * 7  # a Part read in its stored order
    unshuffled = epoch(2, 1, shuffle_rows=0, batch_size=50)
    assert len(plain) == len(unshuffled) == 7
    for a, b in zip(plain, unshuffled):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.int64 for k in a)
    # one row for three ranks: each still takes one batch (two of them a padding row)
    single = split_in_memory([table.slice(0, 1)], SplitSize(1, table.schema), 3)
    got = [users(list(epoch_batches(part, epoch=1, rank=r, seed=11, shuffle_rows=100_000, batch_size=32, seq_len=4,
                                    with_label=True))) for r, part in enumerate(single)]
    assert got == [[0], [-1], [-1]]


def test_a_group_knows_whether_it_is_the_sessions_first():
    """Only the first group's start is the session's start (a restarted one's includes the failed one)."""
    box = Commands(world_size=2, max_failures=1)
    box.hello("g1")
    assert not box.restarted()
    box.post({"kind": "train", "config": {}}, {}, {})
    box.hello("g2")
    assert box.restarted()


def test_the_mailbox_answers_waiting_callers_as_soon_as_it_can(ray_cluster):
    """The real actor: wait_next and wait_result return at once when there is something, are
    woken by the change they wait for (no polling), and give None after their timeout."""
    import time

    import ray

    from conure_dist.train.session import Mailbox

    box = Mailbox.remote(2, 0)
    ray.get(box.hello.remote("g1"))
    started = time.monotonic()
    assert ray.get(box.wait_next.remote(0.3)) is None and time.monotonic() - started >= 0.3  # nothing yet
    waiting = box.wait_next.remote(30.0)
    time.sleep(0.2)
    seq = ray.get(box.post.remote({"kind": "train", "config": {}}, {}, {}))
    started = time.monotonic()
    assert ray.get(waiting) == (seq, {"kind": "train", "config": {}}) and time.monotonic() - started < 10
    answer = box.wait_result.remote(seq, 30.0)
    assert ray.get(box.wait_result.remote(seq, 0.1)) is None  # not answered yet
    ray.get(box.done.remote(seq, {"checkpoint": "c"}))
    started = time.monotonic()
    assert ray.get(answer) == ({"checkpoint": "c"},) and time.monotonic() - started < 10
    assert ray.get(box.wait_result.remote(seq, 30.0)) == ({"checkpoint": "c"},)  # answered: at once
    ray.kill(box)


def test_allocator_env_adds_huge_pages_to_what_the_driver_sets():
    from conure_dist.train.engine import HUGE_PAGES_TUNABLE, allocator_env

    assert allocator_env({}) == {"GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    assert allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == \
        {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"}
    off = "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"  # the driver's own choice is kept
    assert allocator_env({"GLIBC_TUNABLES": off}) == {"GLIBC_TUNABLES": off}


def test_the_session_workers_environment_gives_their_large_tensors_huge_pages(ray_cluster, monkeypatch):
    """The trainer's workers get :func:`allocator_env` through Ray's runtime environment, which
    starts their processes with it (glibc reads it once, at start)."""
    import ray

    from conure_dist.train.executor import _worker_env

    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        mode = f.read()
    if "[never]" in mode:
        pytest.skip(f"this kernel gives no transparent huge pages ({mode.strip()})")

    def grown_by_a_large_tensor() -> int:
        import re

        import torch

        def huge() -> int:
            with open("/proc/self/smaps_rollup") as f:
                return int(re.search(r"AnonHugePages:\s+(\d+) kB", f.read()).group(1)) * 1024

        before = huge()
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, mapped by malloc and touched
        grown = huge() - before
        del x
        return grown

    probe = ray.remote(grown_by_a_large_tensor)  # defined here: shipped by value
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    env = _worker_env()
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert ray.get(probe.options(runtime_env={"env_vars": env}).remote()) >= 32 * 2**20
    if "[madvise]" in mode:  # without it, malloc asks for none
        assert ray.get(probe.remote()) < 32 * 2**20
