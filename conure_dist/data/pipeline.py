"""Ray Data pipeline: prepared Parquet shards -> equal, exactly-once shards -> padded torch batches.

Why a custom split
------------------
Ray Train's default ``DataConfig`` calls ``Dataset.streaming_split(n, equal=True)``. Read in
``ray/data/_internal/execution/operators/output_splitter.py`` (Ray 2.60): when the input is
done, the buffered rows are shared out so that every split has ``max_n + x`` rows, and the
last ``total % n`` rows are **dropped** every epoch. ``equal=False`` drops nothing but hands
out whole blocks, so row (and batch) counts differ between ranks, and DeepSpeed's lock-step
data parallelism deadlocks when one rank stops early.

So :class:`ExactlyOnceDataConfig` appends ``(-rows) % world_size`` **padding rows** to each
split dataset before the ``equal=True`` split (row counts come from ``dataset.json``, so
nothing is executed on the driver). The total is then a multiple of the world size, the
splitter drops nothing, and every rank gets exactly ``ceil(rows / world_size)`` rows and
therefore the same number of batches (with the same ``batch_size`` and ``drop_last``).

Padding-row contract (losses and metrics must ignore such rows): ``user == -1``, ``seq``
all zeros (``PAD_ID``) and ``label == -1``. At most ``world_size - 1`` of them per epoch.

Sequences are left-padded with 0 and truncated to the most recent ``seq_len`` items by
:func:`pad_sequences`, shared by the Ray collate function and the Ray-free readers.

Example (driver and worker)::

    datasets = {"train": read_split(info, "clicks", "train")}
    trainer = TorchTrainer(loop, datasets=datasets,
                           dataset_config=ExactlyOnceDataConfig.for_splits(info, "clicks", ["train"]),
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}))
    # in loop:
    for batch in iter_torch_batches(ray.train.get_dataset_shard("train"), batch_size=256,
                                    seq_len=100, with_label=True):
        real = batch["user"] >= 0
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import ray.data
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.data.dataset import MaterializedDataset
from ray.train import DataConfig

from conure_dist.data.format import PAD_ID, PAD_LABEL, PAD_USER, DatasetInfo
from conure_dist.data.part import Part, SplitSize


# --- padding, shared by every reader ------------------------------------------------------


def pad_sequences(seq: pa.Array | pa.ChunkedArray, seq_len: int) -> np.ndarray:
    """``[rows, seq_len]`` int64, left-padded with 0, keeping the most recent ``seq_len`` items."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if isinstance(seq, pa.ChunkedArray):
        seq = seq.combine_chunks() if seq.num_chunks else pa.array([], seq.type)
    offsets = seq.offsets.to_numpy().astype(np.int64)  # absolute into .values, also when sliced
    values = seq.values.to_numpy(zero_copy_only=False)
    rows = len(seq)
    ends = offsets[1:]
    lengths = ends - offsets[:-1]
    if rows and lengths.min() == lengths.max() >= seq_len:  # fast path: equal lengths (TTL: all 100)
        block = values[offsets[0]:offsets[-1]].reshape(rows, int(lengths[0]))
        return block[:, block.shape[1] - seq_len:].astype(np.int64)
    out = np.full((rows, seq_len), PAD_ID, dtype=np.int64)
    take = np.minimum(lengths, seq_len)
    total = int(take.sum())
    if total:
        row = np.repeat(np.arange(rows), take)
        pos = np.arange(total) - np.repeat(np.cumsum(take) - take, take)  # 0.. within each row
        src = np.repeat(ends - take, take) + pos
        col = seq_len - np.repeat(take, take) + pos
        out[row, col] = values[src]
    return out


def table_to_numpy(table: pa.Table, seq_len: int, with_label: bool) -> dict[str, np.ndarray]:
    """One batch as int64 numpy arrays: ``user`` [B], ``seq`` [B, seq_len], ``label`` [B]."""
    # copies: Arrow buffers are read-only and torch.from_numpy wants writable arrays
    batch = {"user": table.column("user").to_numpy().astype(np.int64),
             "seq": pad_sequences(table.column("seq"), seq_len)}
    if with_label:
        batch["label"] = table.column("label").to_numpy().astype(np.int64)
    return batch


def table_to_tensors(table: pa.Table, seq_len: int, with_label: bool) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in table_to_numpy(table, seq_len, with_label).items()}


class PaddedBatchCollate(ArrowBatchCollateFn):
    """Ray collate function: variable-length ``seq`` lists -> fixed ``[B, seq_len]`` tensors."""

    def __init__(self, seq_len: int, with_label: bool) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.with_label = with_label

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        return table_to_tensors(batch, self.seq_len, self.with_label)


# --- Ray-free reading (evaluation in one process, tests) ----------------------------------


def read_split_table(info: DatasetInfo, task: str, split: str) -> pa.Table:
    """The whole split as one Arrow table, shards in order."""
    return pa.concat_tables([pq.read_table(f) for f in info.split_files(task, split)])


def load_split_batches(info: DatasetInfo, task: str, split: str, batch_size: int, seq_len: int,
                       max_rows: int = 0) -> list[dict[str, torch.Tensor]]:
    """All batches of one split in file order, without Ray (labels included for item/class tasks);
    with ``max_rows``, only the first ``max_rows`` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    table = read_split_table(info, task, split)
    if max_rows:
        table = table.slice(0, max_rows)
    with_label = info.task(task).has_label
    return [table_to_tensors(table.slice(start, batch_size), seq_len, with_label)
            for start in range(0, table.num_rows, batch_size)]


# --- Ray Data -----------------------------------------------------------------------------


# How stage workers read a split's Parquet files (a split cut into per-rank parts is read by
# the driver instead, in the same order: see split_dataset). The reader decides the file order (so which
# rows each rank's part holds, see TRAIN_SHUFFLES) and the block boundaries, which the
# per-worker shuffle buffer's output depends on, so it is a result setting (``cluster.reader``):
# a run keeps the reader it was made with.
#   files:   each file read whole by ``pyarrow.parquet.read_table`` in a Ray task (one block per
#            file; Ray Data slices a file larger than its target block size, 128 MiB by default),
#            files in a seeded numpy permutation (the default; several times faster to consume);
#   parquet: ``ray.data.read_parquet`` with its own seeded file shuffle (runs made before the
#            files reader existed).
READERS = ("files", "parquet")


def _read_file(batch: pa.Table) -> pa.Table:
    """``map_batches`` over one-path batches: the whole Parquet file at that path."""
    return pa.concat_tables([pq.read_table(path) for path in batch.column("path").to_pylist()])


def read_split(info: DatasetInfo, task: str, split: str, shuffle_files_seed: int | None = None,
               reader: str = "files") -> ray.data.Dataset:
    """A streaming Ray Dataset over one task split (nothing is read until it is iterated);
    with ``shuffle_files_seed``, its Parquet files in an order fixed by that seed; ``reader``:
    one of :data:`READERS`."""
    return read_files(info.split_files(task, split), shuffle_files_seed, reader)


def read_files(files: Sequence[str], shuffle_files_seed: int | None = None, reader: str = "files") -> ray.data.Dataset:
    """A streaming Ray Dataset over these Parquet files (see :func:`read_split`)."""
    files = list(files)
    if reader == "parquet":
        shuffle = None
        if shuffle_files_seed is not None:
            shuffle = ray.data.FileShuffleConfig(seed=shuffle_files_seed, reseed_after_execution=False)
        return ray.data.read_parquet(files, shuffle=shuffle)
    if reader != "files":
        hint = " (cluster.reader auto is resolved when the run is opened)" if reader == "auto" else ""
        raise ValueError(f"unknown reader {reader!r}; one of {', '.join(READERS)}{hint}")
    paths = ray.data.from_items([{"path": f} for f in _file_order(files, shuffle_files_seed)], override_num_blocks=len(files))
    return paths.map_batches(_read_file, batch_size=1, batch_format="pyarrow")


def _file_order(files: Sequence[str], seed: int | None) -> list[str]:
    """The ``files`` reader's order: as listed, or a numpy permutation seeded by ``seed``."""
    files = list(files)
    if seed is None:
        return files
    return [files[i] for i in np.random.default_rng(seed).permutation(len(files))]


def split_dataset(info: DatasetInfo, task: str, split: str, *, seed: int, cache_below_bytes: int, reader: str,
                  max_rows: int = 0, parts: bool = False) -> ray.data.Dataset | list[pa.Table]:
    """The Ray Dataset a stage reads: train splits with their files in a seeded order (rows are
    shuffled again every epoch in each worker, see :func:`epoch_batches`); splits smaller than
    ``cache_below_bytes`` (uncompressed) read once into the object store, since Ray Data's
    per-epoch start-up dominates small splits. ``max_rows`` keeps the first rows of the split
    in file order (the rows :func:`load_split_batches` keeps), read once into the object store.

    ``parts``: the split will be cut into per-rank parts (:func:`split_in_memory`), which depend
    only on the order of its rows. With the ``files`` reader such a split is then read here, in
    this process (files in parallel threads, at most :data:`DRIVER_READ_THREADS`), and returned
    as a table per file in the reader's order: the same rows in the same order as the reader's
    Ray tasks give, without a Ray Data execution (seconds, on a small machine, for a split of a
    few thousand rows). This process holds the split until its parts are put into the object
    store, which then keeps them on this node. A streaming split's output also depends on the
    block boundaries, so it keeps the Ray Data read.
    """
    if max_rows and split == "train":
        raise ValueError("max_rows limits evaluation splits only")
    files = info.split_files(task, split)
    order_seed = seed if split == "train" else None
    in_store = bool(max_rows) or _uncompressed_bytes(files) < cache_below_bytes  # footers read only without max_rows
    if parts and reader == "files" and in_store:
        ordered = _file_order(files, order_seed)
        if max_rows:  # the first rows, in file order; only the row groups they are in are read
            tables, rows = [], 0
            for path in ordered:
                if rows >= max_rows:
                    break
                tables.append(_head(path, max_rows - rows))
                rows += tables[-1].num_rows
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(DRIVER_READ_THREADS, len(ordered))) as pool:
                tables = list(pool.map(pq.read_table, ordered))  # in the order given
        return tables
    ds = read_split(info, task, split, shuffle_files_seed=order_seed, reader=reader)
    if max_rows:
        ds.context.execution_options.preserve_order = True
        return ds.limit(max_rows).materialize()
    if not in_store:
        return ds
    # Blocks kept in the read order, so each rank's rows do not depend on which read finished
    # first (a dataset carries the context it was made with).
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


DRIVER_READ_THREADS = 8  # files of one split read at once by split_dataset(parts=True)


def _uncompressed_bytes(files: Sequence[str]) -> int:
    """The uncompressed size of these Parquet files' row groups, from their footers."""
    footers = [pq.read_metadata(f) for f in files]
    return sum(m.row_group(i).total_byte_size for m in footers for i in range(m.num_row_groups))


def _head(path: str, rows: int) -> pa.Table:
    """The first ``rows`` rows of a Parquet file (all of a shorter one), as ``pq.read_table``
    gives them, reading only the row groups they are in."""
    source = pq.ParquetFile(path)
    batches, have = [], 0
    for batch in source.iter_batches():
        batches.append(batch)
        have += batch.num_rows
        if have >= rows:
            break
    return pa.Table.from_batches(batches, schema=source.schema_arrow).slice(0, rows)


# Rows per batch asked of Ray Data where batches are consecutive rows (see iter_torch_batches).
RAY_BATCH_ROWS = 4096


def iter_torch_batches(data_iterator, *, batch_size: int, seq_len: int, with_label: bool,
                       local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
                       drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Padded int64 batches from a rank's iterator (a streaming split, as the session's mailbox
    or ``ray.train.get_dataset_shard(...)`` gives it), a Dataset, or a rank's :class:`Part`.

    Yields ``user`` [B], ``seq`` [B, seq_len] and, with ``with_label``, ``label`` [B]. Rows with
    ``user == -1`` are padding (see the module docstring).

    Without a shuffle buffer the batches are consecutive rows, so Ray Data is asked for about
    :data:`RAY_BATCH_ROWS` rows at a time, padded at once and cut into ``batch_size`` views:
    the same batches, without Ray Data's per-batch cost (~0.5 ms) for each of them.
    """
    if isinstance(data_iterator, Part):  # a rank's fixed part: its rows in the stored order
        if local_shuffle_buffer_size:
            raise ValueError("a Part is shuffled by epoch_batches, not through a buffer")
        return permuted_batches(data_iterator, None, batch_size=batch_size, seq_len=seq_len, with_label=with_label,
                                drop_last=drop_last)
    collate = PaddedBatchCollate(seq_len, with_label)
    if local_shuffle_buffer_size:
        return iter(data_iterator.iter_torch_batches(
            batch_size=batch_size, collate_fn=collate, drop_last=drop_last,
            local_shuffle_buffer_size=local_shuffle_buffer_size, local_shuffle_seed=local_shuffle_seed))
    per_fetch = max(1, RAY_BATCH_ROWS // batch_size)
    return _cut(data_iterator.iter_torch_batches(batch_size=batch_size * per_fetch, collate_fn=collate),
                batch_size, drop_last)


def _cut(batches, batch_size: int, drop_last: bool) -> Iterator[dict[str, torch.Tensor]]:
    """``batch_size``-row views of each batch, in order. Only the last batch that Ray Data gives
    can be short, so only the last view can be: dropped with ``drop_last``."""
    for batch in batches:
        rows = len(batch["user"])
        for start in range(0, rows, batch_size):
            if drop_last and start + batch_size > rows:
                return
            yield {key: value[start:start + batch_size] for key, value in batch.items()}


# How each rank shuffles its train rows every epoch. A result setting (``cluster.train_shuffle``):
# it decides the batches, so a run keeps the one it was made with.
#   permute: a train split read into the object store (``cache_splits_below_bytes``) is cut into
#            a fixed, contiguous part per rank (:func:`split_in_memory`), and each rank takes its
#            whole part in a seeded permutation every epoch (the default; no streaming split's
#            coordinator to start, and no buffer to fill); larger splits stream as under buffer;
#   buffer:  every train split is a streaming split, shuffled through a buffer of
#            ``shuffle_buffer_rows`` rows in each rank (runs made before permute).
TRAIN_SHUFFLES = ("permute", "buffer")


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's order in one epoch."""
    return ((seed * 1_000_003 + epoch) * 1009 + rank) % 2**63


def epoch_batches(shard, *, epoch: int, rank: int, seed: int, shuffle_rows: int, batch_size: int,
                  seq_len: int, with_label: bool) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of a worker's training shard, in an order of its own.

    The shard is either a fixed part in the object store (a :class:`Part`, see
    :data:`TRAIN_SHUFFLES`: taken whole in a permutation) or a streaming split, which arrives in
    a fixed order (:class:`ExactlyOnceDataConfig` preserves order) and is shuffled through a
    buffer of ``shuffle_rows`` rows. Either is seeded from ``(seed, epoch, rank)``: every epoch
    sees a new order, and an epoch that is run again (a resume) sees the same one.
    ``shuffle_rows=0`` reads the shard in its stored order.
    """
    if isinstance(shard, Part):
        order = np.random.default_rng(epoch_seed(seed, epoch, rank)) if shuffle_rows else None
        return permuted_batches(shard, order, batch_size=batch_size, seq_len=seq_len, with_label=with_label)
    return iter_torch_batches(shard, batch_size=batch_size, seq_len=seq_len, with_label=with_label,
                              local_shuffle_buffer_size=shuffle_rows or None,
                              local_shuffle_seed=epoch_seed(seed, epoch, rank) if shuffle_rows else None)


def permuted_batches(part: Part, rng: np.random.Generator | None, *, batch_size: int, seq_len: int,
                     with_label: bool, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """A rank's whole part (:func:`split_in_memory`) in the order of ``rng.permutation`` (None:
    the stored order), as padded batches of ``batch_size`` rows (the last one short, or dropped
    with ``drop_last``). The part is read from the object store without Ray Data; rows are
    gathered and padded :data:`RAY_BATCH_ROWS` at a time."""
    table = part.table()
    rows = table.num_rows
    if not rows:
        return
    order = rng.permutation(rows) if rng is not None else None
    per_fetch = max(1, RAY_BATCH_ROWS // batch_size) * batch_size
    for start in range(0, rows, per_fetch):
        chunk = table.slice(start, per_fetch) if order is None else table.take(order[start:start + per_fetch])
        yield from _cut([table_to_tensors(chunk, seq_len, with_label)], batch_size, drop_last)


def split_size(info: DatasetInfo, task: str, split: str, max_rows: int = 0) -> SplitSize:
    """Row count (from ``dataset.json``; at most ``max_rows`` if given) and schema of one task split."""
    rows = info.task(task).counts[split]
    return SplitSize(min(rows, max_rows) if max_rows else rows, pq.read_schema(info.split_files(task, split)[0]))


def padding_table(schema: pa.Schema, rows: int) -> pa.Table:
    """``rows`` padding rows in ``schema``: user -1, empty seq (all zeros once padded), label -1."""
    columns = {"user": pa.array([PAD_USER] * rows, pa.int64()),
               "seq": pa.array([[]] * rows, schema.field("seq").type)}
    if "label" in schema.names:
        columns["label"] = pa.array([PAD_LABEL] * rows, pa.int32())
    return pa.table(columns).cast(schema)


class ExactlyOnceDataConfig(DataConfig):
    """``DataConfig`` that pads split datasets to a multiple of the world size before the
    equal split, so each row reaches exactly one rank per epoch and all ranks run equal steps.

    Every dataset that is split must have a :class:`SplitSize`; build them with
    :meth:`for_splits`.
    """

    def __init__(self, sizes: Mapping[str, SplitSize], **kwargs) -> None:
        if "execution_options" not in kwargs:
            # A fixed order of rows per rank and epoch (Ray Data then ignores locality hints),
            # so that an epoch run again, or resumed mid-way, sees the same batches.
            options = DataConfig.default_ingest_options()
            options.preserve_order = True
            kwargs["execution_options"] = options
        super().__init__(**kwargs)
        self._sizes = dict(sizes)

    @classmethod
    def for_splits(cls, info: DatasetInfo, task: str, splits: Sequence[str] | Mapping[str, str],
                   **kwargs) -> "ExactlyOnceDataConfig":
        """Sizes from ``dataset.json``; ``splits`` maps dataset name -> split (a list: same names)."""
        names = dict(splits) if isinstance(splits, Mapping) else {s: s for s in splits}
        sizes = {name: split_size(info, task, split) for name, split in names.items()}
        return cls(sizes, datasets_to_split=list(names), **kwargs)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        padded = {}
        for name, ds in datasets.items():
            if name in to_split and name not in self._sizes:
                raise ValueError(f"ExactlyOnceDataConfig: no SplitSize for split dataset {name!r}")
            pad = padding_to_multiple(self._sizes[name], world_size) if name in to_split else None
            padded[name] = ds if pad is None else ds.union(ray.data.from_arrow(pad))
        return super().configure(padded, world_size, worker_handles, worker_node_ids, **kwargs)


def padding_to_multiple(size: SplitSize, world_size: int) -> pa.Table | None:
    """The padding rows that make a split of ``size`` a multiple of ``world_size`` rows (None: it is one)."""
    missing = (-size.rows) % world_size
    return padding_table(size.schema, missing) if missing else None


def split_in_memory(split: Sequence[pa.Table] | MaterializedDataset, size: SplitSize, world_size: int) -> list[Part]:
    """Each rank's share of a split that is read whole (a table per file, or a dataset Ray Data
    materialized): padded to a multiple of ``world_size`` rows with the padding rows of
    :class:`ExactlyOnceDataConfig` (last), and cut into ``world_size`` equal, contiguous parts in
    the stored order (the parts ``Dataset.split(world_size, equal=True)`` gives), so every row
    reaches exactly one rank, always the same one. Each part is put into the object store as
    one table, here, with pyarrow: no Ray Data execution to cut it, and each rank reads its
    part without the coordinator actor (a process: seconds to start) that a streaming split
    needs. For evaluation splits, which rank reads a row only changes how the metric sums are
    added up; for train splits (``cluster.train_shuffle: permute``) each rank permutes its part
    every epoch (:func:`epoch_batches`)."""
    tables = ray.get(split.to_arrow_refs()) if isinstance(split, ray.data.Dataset) else list(split)
    rows = sum(t.num_rows for t in tables)
    if rows != size.rows:  # a padded count that is not the split's would drop or pad the wrong rows
        raise ValueError(f"split has {rows} rows, but its dataset.json count is {size.rows}")
    pad = padding_to_multiple(size, world_size)
    pieces = [t for t in tables if t.num_rows] + ([pad] if pad is not None else [])
    whole = pa.concat_tables(pieces) if pieces else size.schema.empty_table()
    share = whole.num_rows // world_size
    return [Part(ray.put(whole.slice(rank * share, share)), share) for rank in range(world_size)]
