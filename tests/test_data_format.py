"""The prepared-dataset format: splits, metadata validation, popularity, padding, atomic writes."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conure_dist.data.format import (SPLITS, DatasetFormatError, assign_splits, load_dataset_info)
from conure_dist.data.pipeline import load_split_batches, pad_sequences, padding_table, read_split_table
from conure_dist.data.synthetic import SyntheticConfig, prepare_synthetic
from conure_dist.data.writer import DatasetWriter

TINY = SyntheticConfig(num_users=400, num_items=60, seq_len=12, min_seq_len=3, num_topics=4,
                       click_labels=20, like_labels=12, users_per_chunk=150, rows_per_shard=10_000)


def rows_by_split(info, task):
    out = {}
    for split in SPLITS:
        t = read_split_table(info, task, split)
        key = [tuple(r.values()) for r in t.to_pylist()]
        out[split] = sorted(tuple(tuple(v) if isinstance(v, list) else v for v in r) for r in key)
    return out


def test_split_shares_follow_80_5_15_and_are_deterministic():
    users = np.arange(200_000)
    codes = assign_splits(7, "clicks", users, np.zeros_like(users))
    shares = np.bincount(codes, minlength=3) / users.size
    assert np.allclose(shares, [0.80, 0.05, 0.15], atol=0.005)
    assert np.array_equal(codes, assign_splits(7, "clicks", users, np.zeros_like(users)))


def test_split_depends_only_on_seed_task_user_instance():
    users = np.arange(5000)
    inst = users % 3
    codes = assign_splits(1, "a", users, inst)
    perm = np.random.default_rng(0).permutation(users.size)
    assert np.array_equal(assign_splits(1, "a", users[perm], inst[perm]), codes[perm])  # order-free
    assert not np.array_equal(assign_splits(2, "a", users, inst), codes)  # seed matters
    assert not np.array_equal(assign_splits(1, "b", users, inst), codes)  # task matters
    assert not np.array_equal(assign_splits(1, "a", users, inst + 1), codes)  # instance matters


def test_split_is_stable_across_shard_counts(tmp_path):
    import dataclasses

    few = prepare_synthetic(TINY, str(tmp_path / "few"), seed=3)
    many = prepare_synthetic(dataclasses.replace(TINY, rows_per_shard=17), str(tmp_path / "many"), seed=3)
    assert len(many.split_files("pretrain", "train")) > 5 > len(few.split_files("pretrain", "train"))
    for task in ("pretrain", "click", "gender"):
        assert rows_by_split(few, task) == rows_by_split(many, task)
        assert few.task(task).counts == many.task(task).counts


def test_metadata_counts_popularity_and_files(tmp_path):
    info = prepare_synthetic(TINY, str(tmp_path / "d"), seed=0)
    again = load_dataset_info(str(tmp_path / "d"))
    assert again == info
    assert [t.name for t in info.tasks] == ["pretrain", "click", "like", "age", "gender", "lifestatus"]
    for t in info.tasks:
        for split in SPLITS:
            assert read_split_table(info, t.name, split).num_rows == t.counts[split]
    train = read_split_table(info, "pretrain", "train")
    expected = np.bincount(train.column("seq").combine_chunks().flatten().to_numpy(), minlength=info.num_items + 1)
    assert np.array_equal(info.popularity("pretrain"), expected)
    assert info.popularity("pretrain")[0] == 0
    labels = read_split_table(info, "click", "train").column("label").to_numpy()
    assert np.array_equal(info.popularity("click"), np.bincount(labels, minlength=info.task("click").num_labels))
    tokens = info.item_tokens()
    assert tokens.column("id").to_pylist() == list(range(1, info.num_items + 1))
    assert info.label_tokens("gender").num_rows == 2


def test_rows_follow_the_schema(tmp_path):
    info = prepare_synthetic(TINY, str(tmp_path / "d"), seed=0)
    t = pq.read_table(info.split_files("click", "train")[0])
    assert t.schema.field("user").type == pa.int64()
    assert t.schema.field("seq").type.value_type == pa.int32()
    assert t.schema.field("label").type == pa.int32()
    seq = t.column("seq").combine_chunks().flatten().to_numpy()
    assert seq.min() >= 1 and seq.max() <= info.num_items
    assert "label" not in pq.read_schema(info.split_files("pretrain", "test")[0]).names


@pytest.mark.parametrize("damage, message", [
    ("delete", "not found"),
    ("garbage", "not valid JSON"),
    ("version", "format_version 99"),
    ("shard", "is missing"),
    ("kind", "kind must be one of"),
])
def test_bad_metadata_names_the_file(tmp_path, damage, message):
    info = prepare_synthetic(TINY, str(tmp_path / "d"), seed=0)
    meta = os.path.join(info.path, "dataset.json")
    data = json.load(open(meta))
    if damage == "delete":
        os.remove(meta)
    elif damage == "garbage":
        open(meta, "w").write("{not json")
    elif damage == "version":
        data["format_version"] = 99
    elif damage == "shard":
        os.remove(info.split_files("like", "test")[0])
    elif damage == "kind":
        data["tasks"][1]["kind"] = "ranking"
    if damage in ("version", "kind"):
        json.dump(data, open(meta, "w"))
    with pytest.raises(DatasetFormatError, match=message) as e:
        load_dataset_info(info.path)
    assert "dataset.json" in str(e.value)


def test_failed_write_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with DatasetWriter(str(out), seed=0, source="t") as w:
            w.add_task("s", "sequence")
            w.write("s", np.arange(3), pa.array([[1], [2, 1], [2]], pa.list_(pa.int32())))
            raise RuntimeError("converter failed half-way")
    assert os.listdir(tmp_path) == []


def test_writer_refuses_existing_output_and_duplicate_tasks(tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        DatasetWriter(str(tmp_path / "exists"), seed=0, source="t")
    with DatasetWriter(str(tmp_path / "new"), seed=0, source="t") as w:
        w.add_task("a", "sequence")
        with pytest.raises(ValueError, match="duplicate task"):
            w.add_task("a", "item")


def test_pad_sequences_left_pads_and_keeps_most_recent():
    seq = pa.array([[1, 2, 3, 4, 5], [7], [], [8, 9]], pa.list_(pa.int32()))
    assert pad_sequences(seq, 3).tolist() == [[3, 4, 5], [0, 0, 7], [0, 0, 0], [0, 8, 9]]
    assert pad_sequences(seq.slice(1, 3), 2).tolist() == [[0, 7], [0, 0], [8, 9]]
    chunked = pa.chunked_array([seq.slice(0, 2), seq.slice(2)])
    assert pad_sequences(chunked, 5).tolist()[0] == [1, 2, 3, 4, 5]
    assert pad_sequences(chunked, 5).dtype == np.int64
    equal = pa.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], pa.list_(pa.int32()))  # the equal-length fast path
    assert pad_sequences(equal.slice(1), 2).tolist() == [[5, 6], [8, 9]]
    assert pad_sequences(equal, 3).tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert pad_sequences(equal, 4).tolist() == [[0, 1, 2, 3], [0, 4, 5, 6], [0, 7, 8, 9]]


def test_padding_rows_follow_the_contract():
    schema = pa.schema([("user", pa.int64()), ("seq", pa.list_(pa.int32())), ("label", pa.int32())])
    t = padding_table(schema, 2)
    assert t.schema == schema
    assert t.column("user").to_pylist() == [-1, -1] and t.column("label").to_pylist() == [-1, -1]
    assert pad_sequences(t.column("seq"), 4).tolist() == [[0] * 4, [0] * 4]


def test_load_split_batches_without_ray(tmp_path):
    info = prepare_synthetic(TINY, str(tmp_path / "d"), seed=0)
    batches = load_split_batches(info, "click", "validation", batch_size=8, seq_len=10)
    assert sum(len(b["user"]) for b in batches) == info.task("click").counts["validation"]
    assert all(b["seq"].shape[1] == 10 and b["seq"].dtype.is_floating_point is False for b in batches)
    assert {"user", "seq", "label"} == set(batches[0])
    assert set(load_split_batches(info, "pretrain", "test", 8, 10)[0]) == {"user", "seq"}


def _write_sorted_by_user(out, seed, rows_per_shard=100, users=300, per_user=4, chunk=250):
    """An item task handed over sorted by user; ``seq`` holds the row's input position."""
    user = np.repeat(np.arange(users), per_user)
    instance = np.tile(np.arange(per_user), users)
    position = np.arange(user.size)
    with DatasetWriter(str(out), seed=seed, source="t", rows_per_shard=rows_per_shard) as w:
        w.add_task("likes", "item")
        for s in range(0, user.size, chunk):
            sl = slice(s, s + chunk)
            n = position[sl].size
            seqs = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)),
                                            pa.array((position[sl] + 1).astype(np.int32)))
            w.write("likes", user[sl], seqs, labels=position[sl] % 7, instances=instance[sl])
        info = w.finish(num_items=user.size, item_tokens=[str(i) for i in range(user.size)],
                        label_tokens={"likes": [str(i) for i in range(7)]})
    return info, user, instance, position


def _shard_bytes(info):
    return [open(os.path.join(info.path, f), "rb").read() for s in SPLITS for f in info.split_files("likes", s)]


def test_shards_are_shuffled_deterministically(tmp_path):
    info, user, instance, position = _write_sorted_by_user(tmp_path / "a", seed=4)
    files = info.split_files("likes", "train")
    assert len(files) == -(-info.task("likes").counts["train"] // 100) >= 8
    train_positions = np.sort(position[assign_splits(4, "likes", user, instance) == 0])
    for i, f in enumerate(files):
        shard = pq.read_table(os.path.join(info.path, f))
        users = shard.column("user").to_numpy()
        if shard.num_rows >= 50:  # in input order: ~3.2 train rows per user, ~31 users per 100 rows
            assert len(np.unique(users)) > 0.45 * shard.num_rows
        assert np.any(np.diff(users) < 0)  # not sorted by user
        if i == 0:  # rows cross shard borders: the first shard holds rows from beyond its own hundred
            first = np.array([s[0] for s in shard.column("seq").to_pylist()]) - 1
            assert first.max() > train_positions[99]
    # Splits and popularity do not depend on the order.
    codes = assign_splits(4, "likes", user, instance)
    for code, split in enumerate(SPLITS):
        got = np.sort(np.array([s[0] - 1 for s in read_split_table(info, "likes", split).column("seq").to_pylist()]))
        assert np.array_equal(got, position[codes == code])
    assert np.array_equal(info.popularity("likes"), np.bincount(position[codes == 0] % 7, minlength=7))
    # Same seed: byte-identical shards. Another seed: another order of the rows both keep in train.
    again, *_ = _write_sorted_by_user(tmp_path / "b", seed=4)
    assert _shard_bytes(again) == _shard_bytes(info)
    other, *_ = _write_sorted_by_user(tmp_path / "c", seed=5)

    def train_order(i):
        return [s[0] for s in read_split_table(i, "likes", "train").column("seq").to_pylist()]

    both = set(train_order(info)) & set(train_order(other))
    assert [p for p in train_order(info) if p in both] != [p for p in train_order(other) if p in both]
