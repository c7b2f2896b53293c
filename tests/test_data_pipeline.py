"""The Ray Data pipeline with real Ray, real Parquet and real Ray Train workers.

The exactly-once property: every row of a split reaches exactly one worker per epoch, with
1 and 2 workers, and all workers run the same number of steps (padding rows: user == -1).
"""

import os
import tempfile
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from conure_dist.data.pipeline import load_split_batches, read_split_table
from conure_dist.data.synthetic import SyntheticConfig, prepare_synthetic

# 301 users (odd), small shards: several files per split and an uneven total for 2 workers
CONFIG = SyntheticConfig(num_users=301, num_items=80, seq_len=12, min_seq_len=2, num_topics=4,
                         click_labels=20, like_labels=12, users_per_chunk=100, rows_per_shard=37)


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    return prepare_synthetic(CONFIG, str(tmp_path_factory.mktemp("pipe") / "d"), seed=1)


@pytest.fixture
def ray_session(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "180")
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
    import logging

    import ray

    ray.init(address="local", num_cpus=2, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _fit(info, task, split, workers, epochs, shuffle):
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from conure_dist.data.pipeline import ExactlyOnceDataConfig, iter_torch_batches, read_split

    with_label = info.task(task).has_label

    def loop(config):
        shard = ray.train.get_dataset_shard("rows")
        epochs_seen = []
        for _ in range(config["epochs"]):
            users, labels, steps = [], [], 0
            for batch in iter_torch_batches(shard, batch_size=16, seq_len=8, with_label=config["with_label"],
                                            local_shuffle_buffer_size=config["shuffle"]):
                assert batch["seq"].shape == (len(batch["user"]), 8) and str(batch["seq"].dtype) == "torch.int64"
                pad = batch["user"] == -1
                assert (batch["seq"][pad] == 0).all()
                if config["with_label"]:
                    assert (batch["label"][pad] == -1).all()
                    labels += batch["label"].tolist()
                users += batch["user"].tolist()
                steps += 1
            epochs_seen.append({"users": users, "steps": steps})
        return epochs_seen

    results_dir = tempfile.mkdtemp()
    seen = {}

    def collect(config):  # rank-0 return value only: gather via a shared directory instead
        import json

        epochs_seen = loop(config)
        rank = ray.train.get_context().get_world_rank()
        with open(os.path.join(results_dir, f"rank{rank}.json"), "w") as f:
            json.dump(epochs_seen, f)

    trainer = TorchTrainer(
        collect, train_loop_config={"epochs": epochs, "with_label": with_label, "shuffle": shuffle},
        datasets={"rows": read_split(info, task, split)},
        dataset_config=ExactlyOnceDataConfig.for_splits(info, task, {"rows": split}),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="pipe", storage_path=tempfile.mkdtemp(),
                             logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    trainer.fit()
    import json

    for rank in range(workers):
        with open(os.path.join(results_dir, f"rank{rank}.json")) as f:
            seen[rank] = json.load(f)
    return seen


def _check_exactly_once(info, task, split, seen, workers, epochs):
    expected = Counter(read_split_table(info, task, split).column("user").to_pylist())
    assert len(expected) == info.task(task).counts[split]  # one row per user in these tasks
    for epoch in range(epochs):
        per_rank = [seen[r][epoch]["users"] for r in range(workers)]
        real = Counter(u for users in per_rank for u in users if u != -1)
        assert real == expected, f"epoch {epoch}: rows lost or duplicated"
        pads = sum(users.count(-1) for users in per_rank)
        assert pads == (-sum(expected.values())) % workers
        assert len({len(users) for users in per_rank}) == 1  # equal rows ...
        assert len({seen[r][epoch]["steps"] for r in range(workers)}) == 1  # ... and equal steps


@pytest.mark.slow
def test_exactly_once_one_worker(info, ray_session):
    seen = _fit(info, "pretrain", "train", workers=1, epochs=2, shuffle=None)
    _check_exactly_once(info, "pretrain", "train", seen, 1, 2)


@pytest.mark.slow
def test_exactly_once_two_workers_with_labels_and_shuffle(info, ray_session):
    assert info.task("gender").counts["train"] % 2 == 1 or info.task("gender").counts["test"] % 2 == 1
    split = "train" if info.task("gender").counts["train"] % 2 == 1 else "test"
    seen = _fit(info, "gender", split, workers=2, epochs=2, shuffle=64)
    _check_exactly_once(info, "gender", split, seen, 2, 2)


@pytest.mark.slow
def test_ray_equal_split_drops_the_remainder_and_the_dataset_path_matches_pyarrow(info, ray_session):
    """Why ExactlyOnceDataConfig exists: streaming_split(equal=True) drops total % n rows."""
    ray = ray_session
    from conure_dist.data.pipeline import iter_torch_batches, read_split

    split = next(s for s in ("train", "validation", "test") if info.task("pretrain").counts[s] % 2 == 1)
    rows = info.task("pretrain").counts[split]
    splits = read_split(info, "pretrain", split).streaming_split(2, equal=True)

    @ray.remote(num_cpus=0)
    def count(it):
        return sum(b.num_rows for b in it.iter_batches(batch_format="pyarrow"))

    assert sum(ray.get([count.remote(it) for it in splits])) == rows - 1
    # a plain Dataset through the same collate gives the same batches as the Ray-free reader
    got = list(iter_torch_batches(read_split(info, "click", "validation"), batch_size=10, seq_len=6, with_label=True))
    want = load_split_batches(info, "click", "validation", batch_size=10, seq_len=6)
    def rows_of(batches):
        return sorted((int(u), tuple(s.tolist()), int(y)) for b in batches
                      for u, s, y in zip(b["user"], b["seq"], b["label"]))
    assert rows_of(got) == rows_of(want)


def _fit_epoch_orders(info, task, workers, epochs, seed):
    """Users in the order each rank's training batches deliver them, per listed epoch, through
    the stage workers' own dataset and epoch order of a streaming split (split_dataset,
    epoch_batches; cluster.train_shuffle buffer)."""
    import json

    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from conure_dist.data.pipeline import ExactlyOnceDataConfig, epoch_batches, split_dataset

    results_dir = tempfile.mkdtemp()

    def loop(config):
        shard = ray.train.get_dataset_shard("train")
        rank = ray.train.get_context().get_world_rank()
        orders = []
        for epoch in config["epochs"]:
            orders.append([u for b in epoch_batches(shard, epoch=epoch, rank=rank, seed=config["seed"], shuffle_rows=1000,
                                                    batch_size=8, seq_len=6, with_label=config["with_label"])
                           for u in b["user"].tolist()])
        with open(os.path.join(results_dir, f"rank{rank}.json"), "w") as f:
            json.dump(orders, f)

    trainer = TorchTrainer(
        loop, train_loop_config={"epochs": epochs, "seed": seed, "with_label": info.task(task).has_label},
        datasets={"train": split_dataset(info, task, "train", seed=seed, cache_below_bytes=2**30, reader="files")},
        dataset_config=ExactlyOnceDataConfig.for_splits(info, task, ["train"]),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="order", storage_path=tempfile.mkdtemp(),
                             logging_config=ray.train.LoggingConfig(log_level="WARNING")))
    trainer.fit()
    return [json.load(open(os.path.join(results_dir, f"rank{r}.json"))) for r in range(workers)]


@pytest.mark.slow
def test_every_epoch_has_a_fresh_order_and_a_rerun_epoch_the_same_one(info, ray_session):
    first = _fit_epoch_orders(info, "click", workers=2, epochs=[0, 1, 0], seed=5)
    again = _fit_epoch_orders(info, "click", workers=2, epochs=[0, 1], seed=5)
    expected = Counter(read_split_table(info, "click", "train").column("user").to_pylist())
    for rank in range(2):
        epoch0, epoch1, epoch0_again = first[rank]
        assert epoch0 != epoch1  # a fresh order every epoch ...
        assert epoch0 == epoch0_again == again[rank][0] and epoch1 == again[rank][1]  # ... the same when rerun
    for epoch in (0, 1):  # still exactly once
        seen = Counter(u for rank in range(2) for u in first[rank][epoch] if u != -1)
        assert seen == expected
    # Rows are mixed across the whole shard, not read in stored order.
    stored = [u for u in read_split_table(info, "click", "train").column("user").to_pylist()]
    assert first[0][0] != [u for u in stored if u in set(first[0][0])]


def test_max_rows_keeps_the_first_rows_of_an_evaluation_split_in_both_engines(info, ray_session):
    """``--max-eval-rows``: the Ray dataset and the in-process batches hold the same first rows."""
    from conure_dist.data.pipeline import split_dataset, split_size

    task, limit = "click", 45  # past the first file of the split
    batches = load_split_batches(info, task, "test", 10, 8, max_rows=limit)
    local = [int(u) for b in batches for u in b["user"]]
    ds = split_dataset(info, task, "test", seed=0, cache_below_bytes=0, reader="files", max_rows=limit)
    assert [int(r["user"]) for r in ds.iter_rows()] == local == read_split_table(info, task, "test")["user"].to_pylist()[:limit]
    here = split_dataset(info, task, "test", seed=0, cache_below_bytes=0, reader="files", max_rows=limit, parts=True)
    assert sum((t["user"].to_pylist() for t in here), []) == local  # read in this process: the same rows
    assert pq.ParquetFile(info.split_files(task, "test")[0]).metadata.num_rows < limit
    assert split_size(info, task, "test", limit).rows == limit
    assert split_size(info, task, "test").rows == info.task(task).counts["test"] > limit
    with pytest.raises(ValueError, match="evaluation splits only"):
        split_dataset(info, task, "train", seed=0, cache_below_bytes=0, reader="files", max_rows=limit)


def test_a_split_cut_into_parts_is_read_in_this_process_with_the_rows_of_the_ray_read(info, ray_session):
    """``parts``: a split in the object store that is cut into per-rank parts is read by the
    driver itself, with the same rows in the same order as the files reader's Ray Data read
    (train: the seeded file order); a split over the threshold still streams, and the parquet
    reader keeps Ray Data's read."""
    from ray.data.dataset import MaterializedDataset

    from conure_dist.data.pipeline import split_dataset

    def users(ds):
        return [int(r["user"]) for r in ds.iter_rows()]

    for split, seed in (("train", 5), ("train", 6), ("validation", 5)):
        assert len(info.split_files("click", split)) > 1 or split == "validation"
        kwargs = dict(seed=seed, cache_below_bytes=2**30, reader="files")
        here, ray_read = split_dataset(info, "click", split, parts=True, **kwargs), split_dataset(info, "click", split, **kwargs)
        assert isinstance(here, list) and len(here) == len(info.split_files("click", split))  # a table per file
        assert sum((t["user"].to_pylist() for t in here), []) == users(ray_read)
    assert not isinstance(split_dataset(info, "click", "train", seed=5, cache_below_bytes=0, reader="files", parts=True),
                          (list, MaterializedDataset))
    parquet = split_dataset(info, "click", "train", seed=5, cache_below_bytes=2**30, reader="parquet", parts=True)
    assert isinstance(parquet, MaterializedDataset) and sorted(users(parquet)) == sorted(
        sum((t["user"].to_pylist() for t in split_dataset(info, "click", "train", seed=5, cache_below_bytes=2**30,
                                                             reader="files", parts=True)), []))


def test_the_files_reader_reads_each_file_whole_in_a_seeded_order(info, ray_session):
    """``cluster.reader: files``: one block per Parquet file, the files in a permutation fixed by
    the seed; every row exactly once, in its file's stored order."""
    from conure_dist.data.pipeline import read_split

    task, split = "pretrain", "train"
    files = info.split_files(task, split)
    assert len(files) >= 3
    users_of = {f: pq.read_table(f, columns=["user"]).column("user").to_pylist() for f in files}

    def read(seed, reader="files"):
        ds = read_split(info, task, split, shuffle_files_seed=seed, reader=reader)
        ds.context.execution_options.preserve_order = True
        return [int(r["user"]) for r in ds.iter_rows()]

    stored = [u for f in files for u in users_of[f]]
    assert read(None) == stored  # no seed: shard order
    orders = {}
    for seed in (1, 2, 3):
        got = read(seed)
        assert sorted(got) == sorted(stored)
        # the rows are whole files one after another, each in its stored order
        order, at = [], 0
        while at < len(got):
            f = next(f for f in files if f not in order and got[at:at + len(users_of[f])] == users_of[f])
            order.append(f)
            at += len(users_of[f])
        orders[seed] = order
        # pinned: existing runs' data order depends on this permutation
        assert order == [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
        assert read(seed) == got  # the same seed, the same order
    assert len({tuple(o) for o in orders.values()}) > 1  # the seed decides the order
    assert read_split(info, task, split, shuffle_files_seed=1).materialize().num_blocks() == len(files)  # a block per file
    assert sorted(read(1, reader="parquet")) == sorted(stored)  # the older reader still reads the split
    with pytest.raises(ValueError, match="unknown reader"):
        read_split(info, task, split, reader="csv")


def test_unshuffled_batches_fetched_in_bulk_are_the_batches_ray_would_give(info, ray_session, monkeypatch):
    """Without a shuffle buffer, Ray Data is asked for several batches' rows at once and they are
    cut into views: the same batches, in the same order, as Ray's own batching, short last
    batch included (or dropped with drop_last)."""
    import torch

    from conure_dist.data import pipeline

    ds = pipeline.read_split(info, "click", "train")
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    rows = ds.count()
    batch = next(b for b in (7, 5, 11, 13) if rows % b and rows % (3 * b))  # a short last fetch and batch
    monkeypatch.setattr(pipeline, "RAY_BATCH_ROWS", 3 * batch)  # 3 batches per fetch
    for drop_last in (False, True):
        ray_own = list(ds.iter_torch_batches(batch_size=batch, drop_last=drop_last,
                                             collate_fn=pipeline.PaddedBatchCollate(6, True)))
        ours = list(pipeline.iter_torch_batches(ds, batch_size=batch, seq_len=6, with_label=True, drop_last=drop_last))
        assert len(ours) == len(ray_own) == (rows // batch if drop_last else -(-rows // batch))
        for a, b in zip(ours, ray_own):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
