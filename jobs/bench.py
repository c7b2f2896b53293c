"""Benchmarks, one subcommand each. Not timed tests: run by hand, numbers go to BENCHMARKS.md.

``pipeline``: rows/s of the Ray Data pipeline (read -> exactly-once split -> padded torch
batches) into 1 and 2 Ray Train workers, against reading the same Parquet files with
pyarrow in one process (raw, and with the same padding to tensors).

    python jobs/bench.py pipeline --data /tmp/conure-bench/ttl-small

``masks``: the cost of the owner-map masks in the forward pass: the paper's TTL backbone
(f = 256, dilations 4x{1,2,4,8}, batch 32 x 100) with masking off against the same model in
a masked view (T2 train: T1 owns 30 %, the rest trainable), same batch, interleaved repeats.

    python jobs/bench.py masks

``guard``: the per-step cost and the memory of the frozen guard on a TTL-sized frozen item
table (646K x 256): an exact copy compared bit for bit, against per-chunk checksums.

    python jobs/bench.py guard --device cuda --dtype bf16

``batch-mix``: how mixed a training batch is: distinct users per batch of one task's train
split, read the way stage workers read a streaming split (seeded file order, exactly-once
split, per-epoch shuffle buffer: ``cluster.train_shuffle: buffer``, and splits too large for
the object store), against the stored order (no per-epoch shuffle).

    python jobs/bench.py batch-mix --data runs/ml100k/data --task rated_4_5 --batch-size 512

``serve``: an exported model of the paper's TTL shape (646K items, f = 256, 16 conv layers,
six tasks with 18K / 8K item labels and 8 / 2 / 6 classes, the paper's prune ratios): its size
against one backbone per task and against a dense float mask per task; predict latency for
one user (p50 / p99); users/s of batch prediction in process and of `conure-dist score`
(Ray Data, an actor pool) on Parquet; fp32 and bf16.

    python jobs/bench.py serve --users 2048

``t1-step``: one T1 training step at 646K items (f = 256, 16 conv layers, batch 32 x 100,
torch Adam): sampled softmax at 20 % and 5 % with distinct draws and torch's fused Adam,
against distinct draws with the foreach Adam and against every draw a column with the
foreach Adam (before); the "now" step also in a process started as the trainer's workers are
(glibc huge pages for large blocks, ``allocator_env``); and the exact softmax against sampled on
a batch small enough for it.

    python jobs/bench.py t1-step

``prune``: the coordinator's owner-map prune of the TTL model (T1 at ratio 0.7, then T2 at
0.8), conv layers alone and with the 646K x 256 item embedding, against a float64 stable sort.

    python jobs/bench.py prune

``backbone``: forward + backward of the project's masked NextItNet against a plain Conv2d
NextItNet written here (the common way: ``[B, C, 1, L]`` view, ``ZeroPad2d``), fp32 and bf16
autocast, interleaved; also the former conv1d layout and (``--compile``) torch.compile.

    python jobs/bench.py backbone

``scaling``: T1's train stage through Ray Data -> Ray Train -> DeepSpeed with 1 worker of N
threads against N workers of 1 thread (same global batch and steps): examples/s, the share of
step time spent waiting for data, start-up and peak memory per worker, from the manifest.

    python jobs/bench.py scaling --data /tmp/conure-bench/ttl-small

``fixed-cost``: the same small plan through the real path twice, a new Ray Train worker group
for every stage and evaluation against one group for the whole run: wall time, each task's
fixed cost (outside optimizer steps, validation and test evaluation) and the share of the run
in steps and evaluation, from the manifests; the two runs' metrics must be equal.

    python jobs/bench.py fixed-cost -- --epochs 1 --retrain-epochs 1

``floor``: the README's demo command against the least any Ray Train + DeepSpeed job costs on
this machine (a fresh process that starts a local Ray, runs a session whose workers import
DeepSpeed and meet once in the process group, and exits), each timed from process start to
exit: what of the demo's wall time is its steps and evaluation, what is that floor, and what
is the trainer's own overhead beyond it.

    python jobs/bench.py floor

``all``: every benchmark above but ``fixed-cost`` in turn into one JSON file, in under 15
minutes on a 2-core machine (``--tiny``: every one, each at a size that only proves it runs,
as the tests do).

    python jobs/bench.py all --out bench.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import pyarrow
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Measurement:
    reader: str
    workers: int
    epoch: int
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def _files(info, task: str) -> list[str]:
    return [f for split in ("train", "validation", "test") for f in info.split_files(task, split)]


def bench_pyarrow(files: list[str], batch_size: int, seq_len: int | None, epochs: int) -> list[Measurement]:
    """One process, file after file, ``iter_batches``; with ``seq_len``, padded to tensors too."""
    from conure_dist.data.pipeline import table_to_tensors
    import pyarrow as pa

    out = []
    for epoch in range(epochs):
        start, rows = time.perf_counter(), 0
        for f in files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                if seq_len is not None:
                    table_to_tensors(pa.Table.from_batches([batch]), seq_len, with_label=False)
                rows += batch.num_rows
        out.append(Measurement("pyarrow+pad" if seq_len else "pyarrow", 1, epoch, rows, time.perf_counter() - start))
    return out


def bench_ray(info, task: str, files: list[str], workers: int, batch_size: int, seq_len: int,
              epochs: int, reader: str) -> list[Measurement]:
    """A TorchTrainer whose loop only iterates the shard; per epoch: all rows / slowest worker."""
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from conure_dist.data.pipeline import ExactlyOnceDataConfig, SplitSize, iter_torch_batches, read_files

    results = tempfile.mkdtemp(prefix="bench-")

    def loop(config):
        shard = ray.train.get_dataset_shard("rows")
        times = []
        for _ in range(config["epochs"]):
            start, rows = time.perf_counter(), 0
            for batch in iter_torch_batches(shard, batch_size=config["batch_size"], seq_len=config["seq_len"],
                                            with_label=False):
                rows += int((batch["user"] >= 0).sum())
            times.append((rows, time.perf_counter() - start))
        with open(os.path.join(config["results"], f"{ray.train.get_context().get_world_rank()}.json"), "w") as f:
            json.dump(times, f)

    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    config = ExactlyOnceDataConfig({"rows": SplitSize(rows, pq.read_schema(files[0]))}, datasets_to_split=["rows"])
    TorchTrainer(loop, train_loop_config={"epochs": epochs, "batch_size": batch_size, "seq_len": seq_len,
                                          "results": results},
                 datasets={"rows": read_files(files, reader=reader)}, dataset_config=config,
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name=f"bench-{workers}", storage_path=tempfile.mkdtemp(prefix="bench-"),
                                      logging_config=ray.train.LoggingConfig(log_level="WARNING"))).fit()
    per_rank = [json.load(open(os.path.join(results, f"{r}.json"))) for r in range(workers)]
    out = []
    for epoch in range(epochs):
        total = sum(rank[epoch][0] for rank in per_rank)
        if total != rows:
            raise RuntimeError(f"epoch {epoch}: workers saw {total} rows, expected {rows}")
        out.append(Measurement(f"ray ({reader})", workers, epoch, total, max(rank[epoch][1] for rank in per_rank)))
    return out


def _dataset(path: str, preset: str | None):
    """The prepared dataset at ``path``, generated from the synthetic ``preset`` if missing."""
    from conure_dist.data.format import load_dataset_info
    from conure_dist.data.synthetic import prepare_synthetic

    if not os.path.exists(os.path.join(path, "dataset.json")):
        if not preset:
            raise SystemExit(f"error: --data {path}: no prepared dataset there (give --preset to generate one)")
        print(f"generating preset {preset} into {path} ...", flush=True)
        start = time.perf_counter()
        prepare_synthetic(preset, path, seed=0)
        print(f"  generated in {time.perf_counter() - start:.0f} s", flush=True)
    return load_dataset_info(path)


def run_pipeline(args: argparse.Namespace) -> dict:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    info = _dataset(args.data, args.preset)
    files = _files(info, args.task)
    if args.max_files:
        files = files[:args.max_files]
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    print(f"{rows} rows of task {args.task!r} in {len(files)} files, batch {args.batch_size}, "
          f"seq_len {args.seq_len}, {args.epochs} epochs", flush=True)

    results = bench_pyarrow(files, args.batch_size, None, args.epochs)
    results += bench_pyarrow(files, args.batch_size, args.seq_len, args.epochs)
    import ray

    ray.init(address="local", num_cpus=args.num_cpus, logging_level=logging.WARNING)
    try:
        for reader in args.readers:
            for workers in args.workers:
                results += bench_ray(info, args.task, files, workers, args.batch_size, args.seq_len, args.epochs, reader)
    finally:
        ray.shutdown()

    # baseline: the best pyarrow epoch (the later epochs read from the page cache, like Ray's)
    base = max(m.rows_per_s for m in results if m.reader == "pyarrow")
    print(f"\nmachine: {platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"ray {ray.__version__}, pyarrow {pyarrow.__version__}")
    padded = max(m.rows_per_s for m in results if m.reader == "pyarrow+pad")
    print("| reader | workers | epoch | rows | seconds | rows/s | vs pyarrow | vs pyarrow+pad |")
    print("|---|---|---|---|---|---|---|---|")
    for m in results:
        print(f"| {m.reader} | {m.workers} | {m.epoch + 1} | {m.rows} | {m.seconds:.1f} | "
              f"{m.rows_per_s:,.0f} | {m.rows_per_s / base:.2f} | {m.rows_per_s / padded:.2f} |")
    return {"measurements": [asdict(m) | {"rows_per_s": m.rows_per_s} for m in results],
            "pyarrow_best_rows_per_s": base, "pyarrow_pad_best_rows_per_s": padded}


def run_masks(args: argparse.Namespace) -> dict:
    """Median time of forward (no grad) and forward+backward, unmasked vs masked."""
    import statistics

    import torch

    from conure_dist.config import ModelConfig, TaskSpec
    from conure_dist.model import ConureModel, Stage

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(num_items=args.num_items, embed_dim=args.embed_dim, dilations=(1, 2, 4, 8) * args.repeat_dilations,
                      backbone=args.backbone, max_seq_len=args.seq_len)
    tasks = [TaskSpec("t1", "sequence"), TaskSpec("t2", "item", num_labels=100)]
    model = ConureModel(cfg, tasks).to(device)
    owners = model.new_owner_map().prune({n: w for n, w in model.weights().items()}, 1, 0.7)
    seq = torch.randint(1, args.num_items + 1, (args.batch_size, args.seq_len), device=device)

    def views():
        yield "unmasked", lambda: model.set_view(None, "t2", Stage.TRAIN)
        yield "masked", lambda: model.set_view(owners, "t2", Stage.TRAIN)

    def run_once(train: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if train:
            model.hidden(seq).sum().backward()
        else:
            with torch.no_grad():
                model.hidden(seq)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    results = {}
    for train in (False, True):
        times = {name: [] for name, _ in views()}
        for _ in range(args.warmup):
            for _, set_view in views():
                set_view()
                run_once(train)
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for name, set_view in views():
                set_view()
                model.zero_grad(set_to_none=True)
                times[name].append(run_once(train))
        mode = "forward+backward" if train else "forward"
        med = {name: statistics.median(v) for name, v in times.items()}
        results[mode] = med
        print(f"{mode:17s} unmasked {1e3 * med['unmasked']:8.2f} ms   masked {1e3 * med['masked']:8.2f} ms   "
              f"masked/unmasked {med['masked'] / med['unmasked']:.3f}")
    depth = f"conv layers={4 * args.repeat_dilations}" if args.backbone == "nextitnet" else f"blocks={cfg.transformer_blocks}"
    print(f"config: {args.backbone} f={args.embed_dim} {depth} batch={args.batch_size} "
          f"seq={args.seq_len} device={device} threads={torch.get_num_threads()} repeats={args.repeats} (median)")
    return {"seconds": results}


def run_guard(args: argparse.Namespace) -> dict:
    import statistics

    import torch

    from conure_dist.model import FrozenGuard, FrozenWeightsChanged

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(args.rows, args.dim, device=device).to(dtype),
                                             requires_grad=False)

    table = Table()
    guards = {"exact copy": FrozenGuard(table, large_tensor_elements=args.rows * args.dim + 1),
              "checksums": FrozenGuard(table)}
    if guards["checksums"].checksummed != ["weight"]:
        raise RuntimeError("the table is below the checksum threshold; raise --rows or --dim")

    def timed(guard) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        guard.check()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {name: [] for name in guards}
    for _ in range(args.warmup):
        for guard in guards.values():
            timed(guard)
    for _ in range(args.repeats):  # interleaved
        for name, guard in guards.items():
            times[name].append(timed(guard))
    with torch.no_grad():  # one changed entry must be caught by both
        table.weight.view(-1)[args.rows * args.dim // 2] += 1
    caught = {}
    for name, guard in guards.items():
        try:
            guard.check()
            caught[name] = False
        except FrozenWeightsChanged:
            caught[name] = True
    print(f"frozen table {args.rows:,} x {args.dim} {args.dtype} on {device} "
          f"({table.weight.numel() * table.weight.element_size() / 2**20:,.1f} MiB), {args.repeats} interleaved checks")
    print("| guard | check, median ms | min ms | memory held, MiB | caught one changed entry |")
    print("|---|---|---|---|---|")
    for name, guard in guards.items():
        print(f"| {name} | {1e3 * statistics.median(times[name]):.2f} | {1e3 * min(times[name]):.2f} | "
              f"{guard.snapshot_bytes / 2**20:,.1f} | {caught[name]} |")
    return {name: {"median_ms": 1e3 * statistics.median(times[name]), "memory_mib": guard.snapshot_bytes / 2**20,
                   "caught": caught[name]} for name, guard in guards.items()}


def run_batch_mix(args: argparse.Namespace) -> dict:
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import numpy as np
    import ray
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from conure_dist.data.pipeline import ExactlyOnceDataConfig, epoch_batches, split_dataset

    info = _dataset(args.data, args.preset)
    results = tempfile.mkdtemp(prefix="bench-")
    readings = [("stored order", 0, 0), *((f"shuffled, epoch {e + 1}", args.shuffle_rows, e) for e in range(args.epochs))]

    def loop(config):
        shard = ray.train.get_dataset_shard("train")
        out = {}
        for name, rows, epoch in config["readings"]:
            out[name] = [len(set(b["user"][b["user"] >= 0].tolist()))
                         for b in epoch_batches(shard, epoch=epoch, rank=0, seed=0, shuffle_rows=rows,
                                                batch_size=config["batch_size"], seq_len=8, with_label=config["with_label"])]
        with open(os.path.join(config["results"], "mix.json"), "w") as f:
            json.dump(out, f)

    ray.init(address="local", num_cpus=args.num_cpus, logging_level=logging.WARNING)
    try:
        TorchTrainer(loop, train_loop_config={"readings": readings, "batch_size": args.batch_size, "results": results,
                                              "with_label": info.task(args.task).has_label},
                     datasets={"train": split_dataset(info, args.task, "train", seed=0, cache_below_bytes=2**30, reader="files")},
                     dataset_config=ExactlyOnceDataConfig.for_splits(info, args.task, ["train"]),
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                     run_config=RunConfig(name="mix", storage_path=tempfile.mkdtemp(prefix="bench-"),
                                          logging_config=ray.train.LoggingConfig(log_level="WARNING"))).fit()
    finally:
        ray.shutdown()
    mix = json.load(open(os.path.join(results, "mix.json")))
    print(f"task {args.task!r} of {args.data}: {info.task(args.task).counts['train']} train rows, "
          f"{info.task(args.task).num_users} users, batch {args.batch_size}, shuffle buffer {args.shuffle_rows} rows")
    print("| reading | batches | distinct users per batch: mean | min | median |")
    print("|---|---|---|---|---|")
    out = {}
    for name, counts in mix.items():
        full = counts[:-1] or counts  # the last batch may be short
        out[name] = {"batches": len(counts), "mean": float(np.mean(full)), "min": min(full),
                     "median": float(np.median(full))}
        print(f"| {name} | {len(counts)} | {np.mean(full):.1f} | {min(full)} | {np.median(full):.0f} |")
    return out


def run_item_step(args: argparse.Namespace) -> dict:
    """One item-task training step (BPR forward + backward) over a batch whose rows repeat users:
    the backbone over every row vs once per distinct sequence (what ``user_representation`` does)."""
    import statistics

    import torch
    import torch.nn.functional as F

    from conure_dist.config import ModelConfig, TaskSpec
    from conure_dist.model import ConureModel, Stage

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ModelConfig(num_items=args.num_items, embed_dim=args.embed_dim, dilations=(1, 2, 4, 8) * args.repeat_dilations)
    model = ConureModel(cfg, [TaskSpec("t1", "sequence"), TaskSpec("t2", "item", num_labels=args.labels)])
    model.set_view(None, "t2", Stage.TRAIN)
    users = torch.randint(1, args.num_items + 1, (args.users, args.seq_len))
    rows = users[torch.randint(0, args.users, (args.batch_size,))]
    distinct = torch.unique(rows, dim=0).shape[0]
    pos, neg = torch.randint(0, args.labels, (2, args.batch_size))
    head = model.heads["t2"]

    def step(represent) -> float:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        h = represent(rows)
        (-F.logsigmoid(head.score(h, pos) - head.score(h, neg)).mean()).backward()
        return time.perf_counter() - t

    ways = {"every row": lambda seq: model.hidden(seq)[:, -1], "distinct sequences": model.user_representation}
    times = {name: [] for name in ways}
    for _ in range(args.warmup):
        for fn in ways.values():
            step(fn)
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for name, fn in ways.items():
            times[name].append(step(fn))
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"batch {args.batch_size} rows of {distinct} distinct users: every row {1e3 * med['every row']:.1f} ms, "
          f"distinct sequences {1e3 * med['distinct sequences']:.1f} ms, "
          f"ratio {med['distinct sequences'] / med['every row']:.3f}")
    print(f"config: nextitnet f={args.embed_dim} conv layers={4 * args.repeat_dilations} seq={args.seq_len} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} (median)")
    return {"seconds": med, "distinct_users": distinct}


TTL_TASKS = (("pretrain", "sequence", 0, 0.7), ("click", "item", 18_000, 0.8), ("like", "item", 8_000, 0.9),
             ("age", "class", 8, 0.8), ("gender", "class", 2, 0.9), ("lifestatus", "class", 6, 0.9))


def _ttl_model_dir(out: str, num_items: int, embed_dim: int, repeat_dilations: int, seq_len: int) -> dict:
    """A model directory of the TTL shape: random weights, the owner map after six prunes."""
    import pyarrow as pa
    import torch

    from conure_dist.config import ModelConfig, TaskSpec
    from conure_dist.model import ConureModel
    from conure_dist.serve.artifact import write_model

    torch.manual_seed(0)
    cfg = ModelConfig(num_items=num_items, embed_dim=embed_dim, dilations=(1, 2, 4, 8) * repeat_dilations)
    specs = [TaskSpec(n, k, num_labels=labels, prune_ratio=r) for n, k, labels, r in TTL_TASKS]
    model = ConureModel(cfg, specs)
    weights = model.weights()
    owners = model.new_owner_map()
    for number, spec in enumerate(specs, 1):
        owners = owners.prune(weights, number, {name: spec.prune_ratio for name in owners.names})
    weights.update(owners.release_unowned(weights))
    items = pa.table({"id": pa.array(range(1, num_items + 1), pa.int32()),
                      "token": pa.array([f"i{i}" for i in range(1, num_items + 1)])})
    labels = {s.name: pa.table({"id": pa.array(range(s.num_labels), pa.int32()),
                                "token": pa.array([f"{s.name}_{i}" for i in range(s.num_labels)])})
              for s in specs if s.kind != "sequence"}
    tasks = [{"name": s.name, "kind": s.kind, "num_labels": s.num_labels, "metric_k": 5, "main_metric": "",
              "eval_batch_size": 256, "test_at_commit": {}} for s in specs]
    doc = write_model(out, model=cfg, method="conure", tasks=tasks, seq_len=seq_len, items=items, labels=labels,
                      num_items=num_items, oov_item_id=None, weights=weights, owners=owners.state_dict(),
                      source={"bench": "serve"}, overwrite=True)
    heads = sum(v.numel() for k, v in weights.items() if k.startswith("heads."))
    backbone = sum(v.numel() for k, v in weights.items() if not k.startswith("heads."))
    prunable = sum(o.numel() for o in owners.state_dict().values())
    return {"doc": doc, "heads": heads, "backbone": backbone, "prunable": prunable}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_serve(args: argparse.Namespace) -> dict:
    """Size, one-user latency and batch throughput of an exported TTL-shaped model."""
    import numpy as np
    import pyarrow as pa
    import torch

    from conure_dist import serve
    from conure_dist.serve.artifact import footprint

    if args.threads:
        torch.set_num_threads(args.threads)
    out = os.path.join(args.workdir, "model")
    started = time.time()
    made = _ttl_model_dir(out, args.num_items, args.embed_dim, args.repeat_dilations, args.seq_len)
    print(f"model directory written in {time.time() - started:.0f} s: {out}")
    sizes = footprint(made["doc"], made["backbone"], made["prunable"], made["heads"])
    print(f"size (MB): model directory {sizes['model_dir'] / 1e6:.1f} (tensors {sizes['weights'] / 1e6:.1f}, owner map "
          f"{sizes['owner_map'] / 1e6:.2f}); one backbone per task {sizes['one_backbone_per_task'] / 1e6:.1f} "
          f"({sizes['one_backbone_per_task'] / sizes['model_dir']:.2f}x); one backbone + a dense float mask per task "
          f"{sizes['dense_float_masks'] / 1e6:.1f} ({sizes['dense_float_masks'] / sizes['model_dir']:.2f}x)")
    rng = np.random.default_rng(0)
    users = [[f"i{i}" for i in rng.integers(1, args.num_items + 1, args.seq_len)] for _ in range(args.users)]
    results = {"sizes": sizes, "latency_ms": {}, "in_process_users_per_s": {}, "score_job_users_per_s": {}}
    dtypes = _dtypes(args.dtypes, torch.device("cpu"), "float32", "bfloat16")
    results["dtypes"] = dtypes
    for dtype in dtypes:
        started = time.time()
        model = serve.load(out, dtype=dtype)
        print(f"[{dtype}] load {time.time() - started:.1f} s")
        for task in args.tasks:
            model.use(task)
            for _ in range(args.warmup):
                model.predict(task, [users[0]], k=5)
            times = []
            for i in range(args.repeats):
                t = time.perf_counter()
                model.predict(task, [users[i % len(users)]], k=5)
                times.append(1e3 * (time.perf_counter() - t))
            p50, p99 = _percentile(times, 0.5), _percentile(times, 0.99)
            results["latency_ms"][f"{dtype}/{task}"] = (p50, p99)
            t = time.perf_counter()
            for start in range(0, len(users), args.batch_size):
                model.predict(task, users[start:start + args.batch_size], k=5)
            rate = len(users) / (time.perf_counter() - t)
            results["in_process_users_per_s"][f"{dtype}/{task}"] = rate
            print(f"[{dtype}] {task}: one user p50 {p50:.1f} ms, p99 {p99:.1f} ms; batches of {args.batch_size}: "
                  f"{rate:,.0f} users/s in process")
        del model
    if args.score_job:
        import pyarrow.parquet as pq

        from conure_dist.launch import connect_ray
        from conure_dist.serve.score import score

        data = os.path.join(args.workdir, "users.parquet")
        pq.write_table(pa.table({"user": list(range(len(users))), "seq": users}), data)
        connect_ray()
        for dtype in dtypes:
            for task in args.tasks:
                summary = score(out, task, data, os.path.join(args.workdir, f"scored-{dtype}-{task}"),
                                workers=args.workers, cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size,
                                dtype=dtype, overwrite=True)
                rate = summary.rows / summary.seconds
                results["score_job_users_per_s"][f"{dtype}/{task}"] = rate
                print(f"[{dtype}] {task}: conure-dist score ({args.workers} actors x {args.cpus_per_worker} CPU, "
                      f"batch {args.batch_size}): {rate:,.0f} users/s over {summary.rows} users "
                      f"({summary.seconds:.1f} s, actor start and model load included)")
    print(f"config: items={args.num_items} f={args.embed_dim} conv layers={4 * args.repeat_dilations} "
          f"seq={args.seq_len} threads={torch.get_num_threads()} repeats={args.repeats} "
          f"python={platform.python_version()} torch={torch.__version__}")
    return results


def run_prune(args: argparse.Namespace) -> dict:
    """The coordinator's prune (owner map update) on the TTL model: the conv layers alone, and
    with the item embedding too (Table 5), against a stable sort of -|w| in float64 (the
    definition the selection must match, and the implementation before it)."""
    import torch

    from conure_dist.model.owner_map import OwnerMap, prune_free_weights

    def by_sort(weight, owner, task, ratio):
        flat = owner.reshape(-1)
        free = torch.nonzero(flat == 0).reshape(-1)
        n_keep = int(round((1.0 - ratio) * free.numel()))
        order = torch.sort(-weight.reshape(-1)[free].abs().to(torch.float64), stable=True).indices
        out = flat.clone()
        out[free[order[:n_keep]]] = task
        return out.reshape(owner.shape)

    torch.manual_seed(0)
    convs = {f"backbone.blocks.{i // 2}.conv{i % 2 + 1}.weight": torch.randn(args.embed_dim, args.embed_dim, 3)
             for i in range(4 * args.repeat_dilations)}
    cases = {"conv layers": convs}
    if args.num_items:
        cases["conv layers + item embedding"] = {**convs, "backbone.embedding.weight": torch.randn(args.num_items + 1, args.embed_dim)}
    out = {}
    for label, weights in cases.items():
        n = sum(w.numel() for w in weights.values())
        methods = [("selection", prune_free_weights), ("stable sort (before)", by_sort)]
        if args.no_embedding_baseline and label != "conv layers":
            methods = methods[:1]
        for name, fn in methods:
            owners = OwnerMap.for_shapes({k: tuple(v.shape) for k, v in weights.items()})
            times = []
            for task, ratio in ((1, 0.7), (2, 0.8)):
                t = time.perf_counter()
                owners = OwnerMap({k: fn(weights[k], owners.owner(k), task, ratio) for k in owners.names})
                times.append(time.perf_counter() - t)
            out[f"{label}, {name}"] = {"weights": n, "t1_prune_s": times[0], "t2_prune_s": times[1]}
            print(f"{label} ({n / 1e6:.1f}M weights), {name}: T1 prune {times[0]:.2f} s, T2 prune {times[1]:.2f} s")
    print(f"threads={torch.get_num_threads()}")
    return out


def _replacement_softmax_loss(model, batch, generator, task, sampler, num_sampled):
    """The T1 loss before deduplication (the baseline): every draw a column of the logits."""
    import torch
    import torch.nn.functional as F

    from conure_dist.train.losses import next_item_pairs

    h, targets = next_item_pairs(model, batch["seq"])
    scorer = model.heads[task]
    sampled = sampler.sample(num_sampled, generator)
    true_logit = scorer.score(h, targets).float() - sampler.log_expected_count(targets, num_sampled)
    logits = scorer.score_shared(h, sampled).float() - sampler.log_expected_count(sampled, num_sampled)[None, :]
    logits = logits.masked_fill(sampled[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([true_logit[:, None], logits], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def run_t1_step(args: argparse.Namespace) -> dict:
    """One T1 training step at the paper's scale (646K items, f = 256, 16 conv layers, batch
    32 x 100): the project's model and loss with a torch Adam, sampled softmax at each ratio
    (deduplicated draws, and every draw a column as before), and the exact softmax on a batch
    small enough for it."""
    import resource
    import statistics

    import numpy as np
    import torch

    from conure_dist.config import ModelConfig, TaskSpec, TrainConfig
    from conure_dist.model import ConureModel, Stage
    from conure_dist.train.engine import allocator_env
    from conure_dist.train.loop import TorchStepper
    from conure_dist.train.losses import make_loss

    if args.baseline_ratios and not set(args.baseline_ratios) <= set(args.ratios):
        raise SystemExit(f"error: --baseline-ratios {args.baseline_ratios}: each must be one of --ratios {args.ratios}")
    results = {}
    workers = allocator_env()
    if args.huge_pages and os.environ.get("GLIBC_TUNABLES", "") != workers["GLIBC_TUNABLES"]:
        # The trainer's workers run under allocator_env(), which glibc reads when a process
        # starts: the same "now" step, in a process of its own started that way.
        print(f"now, in a process under the workers' allocator (GLIBC_TUNABLES={workers['GLIBC_TUNABLES']}):", flush=True)
        sizes = ["--num-items", args.num_items, "--embed-dim", args.embed_dim, "--repeat-dilations", args.repeat_dilations,
                 "--seq-len", args.seq_len, "--batch-size", args.batch_size, "--ratios", *args.ratios,
                 "--repeats", args.repeats, "--warmup", args.warmup, "--threads", args.threads]
        with tempfile.TemporaryDirectory(prefix="t1-step-") as tmp:
            out = os.path.join(tmp, "now.json")
            _child([sys.executable, os.path.abspath(__file__), "t1-step", *map(str, sizes), "--no-baseline",
                    "--full-batch", "0", "--json", out], "the T1 step under the workers' allocator", 3600, env=workers,
                   echo=True)
            measured = json.load(open(out))["seconds_per_step"]
        for label, seconds in measured.items():
            results[label.replace("fused Adam (now)", "fused Adam, huge pages (now, as the workers run it)")] = seconds
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=args.num_items, embed_dim=args.embed_dim, dilations=(1, 2, 4, 8) * args.repeat_dilations)
    model = ConureModel(cfg, [TaskSpec("t1", "sequence")])
    model.set_view(None, "t1", Stage.TRAIN)
    rng = np.random.default_rng(0)
    ranks = np.arange(1, args.num_items + 1)
    zipf = 1.0 / ranks
    zipf /= zipf.sum()
    popularity = np.concatenate([[0], rng.multinomial(50 * args.num_items, zipf)])

    def batch(rows: int):
        seq = rng.choice(args.num_items, size=(rows, args.seq_len), p=zipf) + 1
        return {"seq": torch.from_numpy(seq.astype(np.int64))}

    def measure(label: str, loss_fn, rows: int, fused: bool = True) -> None:
        stepper = TorchStepper(model.trainable_parameters(), TrainConfig(lr=1e-3), fused=fused)
        gen = torch.Generator().manual_seed(0)
        data = batch(rows)
        times = []
        for i in range(args.warmup + args.repeats):
            t = time.perf_counter()
            stepper.step(loss_fn(model, data, gen))
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        med = statistics.median(times)
        results[label] = med
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{label}: {med:.2f} s per step (median of {args.repeats}); process peak so far {peak:.1f} GiB")
        del stepper

    for ratio in args.ratios:
        train = TrainConfig(sample_ratio=ratio)
        loss = make_loss(TaskSpec("t1", "sequence"), train, args.num_items, popularity)
        measure(f"sampled {ratio:.0%}, batch {args.batch_size}: distinct draws, fused Adam (now)", loss, args.batch_size)
        baseline = args.baseline and (args.baseline_ratios is None or ratio in args.baseline_ratios)
        if baseline and args.intermediate:
            measure(f"sampled {ratio:.0%}, batch {args.batch_size}: distinct draws, foreach Adam", loss, args.batch_size,
                    fused=False)
        if baseline:
            measure(f"sampled {ratio:.0%}, batch {args.batch_size}: every draw, foreach Adam (before)",
                    lambda m, b, g: _replacement_softmax_loss(m, b, g, "t1", loss.sampler, loss.num_sampled),
                    args.batch_size, fused=False)
        before = results.get(f"sampled {ratio:.0%}, batch {args.batch_size}: every draw, foreach Adam (before)")
        for label, seconds in list(results.items()):
            if before and label.startswith(f"sampled {ratio:.0%}, batch {args.batch_size}:") and "(now" in label:
                print(f"  before / {label.split(': ', 1)[1]}: {before / seconds:.2f}x")
        sample = loss.sampler.sample(loss.num_sampled, torch.Generator().manual_seed(0))
        print(f"  {loss.num_sampled} draws hold {torch.unique(sample).numel()} distinct items")
    for rows in [b for b in args.full_batch if b > 0]:
        full = make_loss(TaskSpec("t1", "sequence"), TrainConfig(sample_ratio=1.0), args.num_items, popularity)
        measure(f"exact softmax, batch {rows}", full, rows)
        for ratio in args.ratios:
            loss = make_loss(TaskSpec("t1", "sequence"), TrainConfig(sample_ratio=ratio), args.num_items, popularity)
            measure(f"sampled {ratio:.0%}, batch {rows}", loss, rows)
            exact = results[f"exact softmax, batch {rows}"]
            print(f"  exact / sampled {ratio:.0%} at batch {rows}: {exact / results[f'sampled {ratio:.0%}, batch {rows}']:.2f}x")
    print(f"config: items={args.num_items} f={args.embed_dim} conv layers={4 * args.repeat_dilations} "
          f"seq={args.seq_len} threads={torch.get_num_threads()} torch={torch.__version__}")
    return {"seconds_per_step": results}


def run_scaling(args: argparse.Namespace) -> dict:
    """T1's train stage through the real path (Ray Data -> Ray Train -> DeepSpeed) with 1 worker
    of N threads against N workers of 1 thread, the same global batch and steps; examples/s and
    the share of step time spent waiting for data come from the run's own manifest."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray

    from conure_dist.jobs.ttl import main as ttl_main
    from conure_dist.train.rundir import RunDir

    _dataset(args.data, args.preset)
    # Logical CPUs: the workers' threads plus what Ray Data's tasks need next to them.
    ray.init(address="local", num_cpus=2 * args.threads, logging_level=logging.WARNING, include_dashboard=False)
    out = {}
    try:
        for workers in (1, args.threads):
            run_dir = os.path.join(args.workdir, f"scaling-{workers}w")
            argv = ["--data", args.data, "--tasks", args.task, "--run-dir", run_dir, "--new-run",
                    "--workers", str(workers), "--cpus-per-worker", str(args.threads // workers),
                    "--epochs", "1", "--retrain-epochs", "0", "--max-steps", str(args.steps),
                    "--max-eval-rows", str(args.eval_rows), "--embed-dim", str(args.embed_dim)]
            t = time.perf_counter()
            if ttl_main(argv) != 0:
                raise RuntimeError(f"the run {' '.join(argv)} failed")
            wall = time.perf_counter() - t
            stage = RunDir(run_dir).read_json("manifest.json")["stages"][f"{args.task}/train"]
            epoch = stage["history"][0]
            examples = epoch["examples_per_s"] * epoch["seconds"]  # the rows the stage's steps took, all ranks
            out[f"{workers} worker(s) x {args.threads // workers} thread(s)"] = row = {
                "steps": stage["progress"]["step"], "examples": round(examples), "train_s": epoch["train_s"],
                "examples_per_s": examples / epoch["train_s"], "data_wait_share": epoch["data_wait_s"] / epoch["train_s"],
                "startup_s": stage.get("startup_s"), "stage_s": stage.get("fit_seconds"), "run_wall_s": wall,
                "peak_rss_gib_per_worker": [b / 2**30 for b in stage.get("peak_rss_bytes", [])]}
            print(f"{workers} worker(s) x {args.threads // workers} thread(s): {row['examples_per_s']:.1f} examples/s "
                  f"over {row['steps']} steps, waiting for data {100 * row['data_wait_share']:.1f} % of step time, "
                  f"start-up {row['startup_s']} s", flush=True)
    finally:
        ray.shutdown()
    (one, many) = out.values()
    print(f"{args.threads} workers / 1 worker: {many['examples_per_s'] / one['examples_per_s']:.2f}x examples/s "
          f"(task {args.task!r} of {args.data}, f={args.embed_dim})")
    return out


def task_time(manifest: dict, task: str) -> dict:
    """Where one task's wall time went (train through commit), from a run's manifest: optimizer
    steps (``train_s`` less the wait for data), waiting for data, validation, test evaluation
    (the workers' own time where recorded), and the rest: the fixed cost."""
    stages = {k: v for k, v in manifest["stages"].items() if k.split("/")[0] == task}
    wall = max(v["finished"] for v in stages.values()) - min(v["started"] for v in stages.values())
    epochs = [h for v in stages.values() for h in v.get("history", [])]
    commit = stages[f"{task}/commit"]
    out = {"wall_s": wall, "steps_s": sum(h["train_s"] - h["data_wait_s"] for h in epochs),
           "data_wait_s": sum(h["data_wait_s"] for h in epochs),
           "validation_s": sum(h["seconds"] - h["train_s"] for h in epochs),
           "test_eval_s": commit.get("eval_seconds", commit["seconds"])}
    out["fixed_s"] = wall - out["steps_s"] - out["validation_s"] - out["test_eval_s"]
    return out


def run_fixed_cost(args: argparse.Namespace) -> dict:
    """The same plan through the real path twice: a new Ray Train worker group for every stage
    and evaluation (``cluster.worker_group: stage``, the layout before the session) against one
    group for the whole run (``run``). Per task: its fixed cost (wall time outside optimizer
    steps, validation and test evaluation, data waits included); per run: the share of wall
    time in steps and evaluation. Both runs must give the same metrics, bit for bit."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    import ray

    from conure_dist.jobs.ttl import main as ttl_main
    from conure_dist.train.rundir import RunDir

    _dataset(args.data, args.preset)
    ray.init(address="local", num_cpus=args.num_cpus, logging_level=logging.WARNING, include_dashboard=False)
    out, accuracy = {}, {}
    try:
        for group in ("run", "stage"):  # the baseline second: it gets the warmer caches
            run_dir = os.path.join(args.workdir, f"fixed-cost-{group}")
            argv = ["--data", args.data, "--preset", args.preset, "--tasks", args.tasks, "--run-dir", run_dir,
                    "--new-run", "--set", f"cluster.worker_group={group}", *args.extra]
            t = time.perf_counter()
            if ttl_main(argv) != 0:
                raise RuntimeError(f"the run {' '.join(argv)} failed")
            wall = time.perf_counter() - t
            manifest = RunDir(run_dir).read_json("manifest.json")
            accuracy[group] = manifest["accuracy"]
            tasks = {task: task_time(manifest, task) for task in manifest["tasks"]}
            busy = sum(v["steps_s"] + v["validation_s"] + v["test_eval_s"] for v in tasks.values())
            out[group] = row = {"run_wall_s": wall, "tasks": tasks, "steps_and_eval_share": busy / wall,
                                "stages_s": {k: v.get("seconds") for k, v in manifest["stages"].items()}}
            print(f"worker_group {group}: {wall:.1f} s wall, {100 * row['steps_and_eval_share']:.1f} % of it in steps "
                  "and evaluation; fixed cost per task: "
                  + ", ".join(f"{task} {v['fixed_s']:.1f} s" for task, v in tasks.items()), flush=True)
    finally:
        ray.shutdown()
    out = {"stage": out["stage"], "run": out["run"]}
    if accuracy["stage"] != accuracy["run"]:
        raise RuntimeError(f"the two runs' metrics differ: {accuracy['stage']} against {accuracy['run']}")
    ratio = out["stage"]["run_wall_s"] / out["run"]["run_wall_s"]
    later = [t for t in out["run"]["tasks"]][1:] or list(out["run"]["tasks"])
    print(f"one worker group per run / one per stage: {ratio:.2f}x less wall time, the same metrics; tasks after "
          f"the first: {max(out['run']['tasks'][t]['fixed_s'] for t in later):.1f} s fixed cost at most "
          f"(one group per stage: {min(out['stage']['tasks'][t]['fixed_s'] for t in later):.1f} s at least)")
    return {**out, "wall_ratio": ratio}


def _empty_session(args: argparse.Namespace) -> dict:
    """The floor's job (in a process of its own): the driver's imports, a local Ray started
    as the trainer starts it, and a Ray Train session of ``--workers`` workers (each asking for
    the trainer's default CPUs per worker) that import torch and DeepSpeed and meet once in the
    process group."""
    t = time.time()
    import ray.train
    import torch  # noqa: F401  (a driver of the trainer imports it too)
    from ray.train.torch import TorchTrainer

    from conure_dist.config import ClusterConfig
    from conure_dist.launch import connect_ray, start_train_helpers

    imported = time.time()
    connect_ray()
    start_train_helpers()
    started = time.time()

    def loop(config):
        import torch.distributed as dist

        from conure_dist.train.engine import prepare_deepspeed_import

        prepare_deepspeed_import()
        import deepspeed  # noqa: F401

        dist.barrier()

    cpus = ClusterConfig().cpus_per_worker
    TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": cpus}),
                 run_config=ray.train.RunConfig(name=f"floor-{os.getpid()}", storage_path=os.path.join(args.workdir, "ray"))).fit()
    return {"imports_s": imported - t, "ray_start_s": started - imported, "session_s": time.time() - started}


def _child(argv: list[str], what: str, timeout_s: float, env: dict[str, str] | None = None, echo: bool = False) -> float:
    """Run ``argv`` in a new process (this checkout's package importable; ``env`` added to this
    process's environment); its wall time. A failure raises with the end of its error output;
    ``echo``: its standard output is printed once it has ended."""
    import subprocess

    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(filter(None, [path, REPO]))}  # the caller's first
    t = time.perf_counter()
    try:
        done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, timeout=timeout_s)
        if echo:
            print("".join(f"  {line}" for line in done.stdout.splitlines(keepends=True)), end="", flush=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{what} failed (exit {e.returncode}): {e.stderr[-3000:]}") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} did not finish within {timeout_s:.0f} s") from None
    return time.perf_counter() - t


def run_floor(args: argparse.Namespace) -> dict:
    """The demo command against the empty session (:func:`_empty_session`), each in a new
    process, interleaved ``--repeats`` times. "Steps and evaluation" are the demo's optimizer
    steps with their waits for data, validation and test evaluation (the waits, 0.2-0.3 s in
    the demo, are fixed cost in ``fixed-cost``); each task's fixed cost is ``task_time``'s."""
    import statistics

    from conure_dist.train.rundir import RunDir

    rows = []
    for i in range(args.repeats):
        parts_file = os.path.join(args.workdir, f"floor-{i}.json")
        floor_wall = _child([sys.executable, os.path.abspath(__file__), "floor-session", "--workers", str(args.workers),
                             "--workdir", args.workdir, "--json", parts_file], "the empty session", args.timeout)
        with open(parts_file) as f:
            parts = json.load(f)
        run_dir = os.path.join(args.workdir, f"demo-{i}")
        demo_wall = _child([sys.executable, os.path.join(REPO, "jobs", "ttl.py"), "--demo", "--run-dir", run_dir,
                            "--new-run", "--workers", str(args.workers), *args.extra], "the demo", args.timeout)
        manifest = RunDir(run_dir).read_json("manifest.json")
        tasks = {task: task_time(manifest, task) for task in manifest["tasks"]}
        useful = sum(v["steps_s"] + v["data_wait_s"] + v["validation_s"] + v["test_eval_s"] for v in tasks.values())
        rows.append(row := {"demo_wall_s": demo_wall, "floor_wall_s": floor_wall, "floor_parts_s": parts,
                            "steps_and_eval_s": useful, "share": useful / demo_wall,
                            "best_share_over_the_floor": useful / (floor_wall + useful),
                            "own_overhead_s": demo_wall - floor_wall - useful,
                            "fixed_s_per_task": {task: v["fixed_s"] for task, v in tasks.items()}})
        later = list(tasks)[1:]
        print(f"demo {demo_wall:.1f} s, of it steps and evaluation {useful:.1f} s ({100 * row['share']:.1f} %); "
              f"the empty session {floor_wall:.1f} s (imports {parts['imports_s']:.1f}, Ray's start {parts['ray_start_s']:.1f}, "
              f"session {parts['session_s']:.1f}, the rest the interpreter's start and exit); the demo's own overhead "
              f"beyond it {row['own_overhead_s']:.1f} s; at most {100 * row['best_share_over_the_floor']:.1f} % in steps and "
              "evaluation with no overhead of its own"
              + (f"; fixed cost of each task after the first {min(tasks[t]['fixed_s'] for t in later):.2f}-"
                 f"{max(tasks[t]['fixed_s'] for t in later):.2f} s" if later else ""), flush=True)
    median = {k: statistics.median(r[k] for r in rows) for k in ("demo_wall_s", "floor_wall_s", "steps_and_eval_s",
                                                                   "own_overhead_s", "share", "best_share_over_the_floor")}
    return {"runs": rows, "median": median}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, got {value}")
    return value


def _reference_nextitnet(num_items: int, dim: int, kernel: int, dilations: tuple[int, ...]):
    """A plain PyTorch NextItNet written the common way (the goal's reference): ``nn.Conv2d``
    over a ``[B, C, 1, L]`` view with ``ZeroPad2d`` left padding, permuting around every layer."""
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d1: int, d2: int):
            super().__init__()
            self.pad1, self.pad2 = nn.ZeroPad2d(((kernel - 1) * d1, 0, 0, 0)), nn.ZeroPad2d(((kernel - 1) * d2, 0, 0, 0))
            self.conv1 = nn.Conv2d(dim, dim, (1, kernel), dilation=(1, d1))
            self.conv2 = nn.Conv2d(dim, dim, (1, kernel), dilation=(1, d2))
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

        @staticmethod
        def conv(x, pad, conv):
            return conv(pad(x.permute(0, 2, 1).unsqueeze(2))).squeeze(2).permute(0, 2, 1)

        def forward(self, x):
            h = F.relu(self.conv(self.ln1(x), self.pad1, self.conv1))
            return x + F.relu(self.conv(self.ln2(h), self.pad2, self.conv2))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(num_items + 1, dim, padding_idx=0)
            self.blocks = nn.ModuleList(Block(a, b) for a, b in zip(dilations[0::2], dilations[1::2]))

        def forward(self, seq):
            x = self.embedding(seq)
            for block in self.blocks:
                x = block(x)
            return x

    return Net()


def _conv1d_forward(self, x):
    """CausalConv1d's former forward (the "before" of the layout change): ``conv1d`` with a
    transpose on both sides."""
    import torch.nn.functional as F

    x = F.pad(x.transpose(1, 2), ((self.kernel_size - 1) * self.dilation, 0))
    return F.conv1d(x, self.effective_weight(), self.bias, dilation=self.dilation).transpose(1, 2)


def run_backbone(args: argparse.Namespace) -> dict:
    """Forward + backward of the project's NextItNet (masks on: a T2 train view) against the
    plain Conv2d reference, fp32 and bf16 autocast, interleaved; also the former conv1d layout
    and, with ``--compile``, torch.compile of the project's backbone."""
    import contextlib
    import statistics

    import torch

    from conure_dist.config import ModelConfig, TaskSpec
    from conure_dist.model import ConureModel, Stage
    from conure_dist.model.masked import CausalConv1d

    if args.dtypes and "fp32" not in args.dtypes:
        raise SystemExit("error: --dtypes: include fp32 (the fp32 reference is what every variant is compared with)")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dilations = (1, 2, 4, 8) * args.repeat_dilations
    cfg = ModelConfig(num_items=args.num_items, embed_dim=args.embed_dim, dilations=dilations, max_seq_len=args.seq_len)
    model = ConureModel(cfg, [TaskSpec("t1", "sequence"), TaskSpec("t2", "item", num_labels=100)]).to(device)
    owners = model.new_owner_map().prune(dict(model.weights()), 1, 0.7)
    model.set_view(owners, "t2", Stage.TRAIN)
    reference = _reference_nextitnet(args.num_items, args.embed_dim, cfg.kernel_size, dilations).to(device)
    seq = torch.randint(1, args.num_items + 1, (args.batch_size, args.seq_len), device=device)

    @contextlib.contextmanager
    def conv1d_layout():
        now = CausalConv1d.forward
        CausalConv1d.forward = _conv1d_forward
        try:
            yield
        finally:
            CausalConv1d.forward = now

    variants = {"reference (Conv2d)": (reference, contextlib.nullcontext),
                "conure (masked)": (model.hidden, contextlib.nullcontext),
                "conure, conv1d layout (before)": (model.hidden, conv1d_layout)}
    if args.compile:
        t = time.perf_counter()
        compiled = torch.compile(model.hidden)
        for bf16 in (False, True):
            if ("bf16" if bf16 else "fp32") in _dtypes(args.dtypes, device, "fp32", "bf16", quiet=True):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    compiled(seq).float().sum().backward()
        print(f"torch.compile: {time.perf_counter() - t:.1f} s to compile")
        variants["conure (masked), torch.compile"] = (compiled, contextlib.nullcontext)

    def step(fn, bf16: bool) -> float:
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fn(seq)
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    # Conv FLOPs of one forward; backward costs about twice that (input and weight gradients).
    flops = 3 * 2 * args.batch_size * args.seq_len * args.embed_dim * args.embed_dim * cfg.kernel_size * len(dilations)
    dtypes = _dtypes(args.dtypes, device, "fp32", "bf16")
    times = {(name, bf16): [] for name in variants for bf16 in (False, True) if ("bf16" if bf16 else "fp32") in dtypes}
    for i in range(args.warmup + args.repeats):  # interleaved, so drift hits every variant alike
        for (name, bf16) in times:
            fn, context = variants[name]
            with context():
                dt = step(fn, bf16)
            if i >= args.warmup:
                times[name, bf16].append(dt)
    base = statistics.median(times["reference (Conv2d)", False])
    rows = []
    for (name, bf16), v in times.items():
        med = statistics.median(v)
        rows.append({"variant": name, "dtype": "bf16" if bf16 else "fp32", "ms": 1e3 * med,
                     "speed_vs_fp32_reference": base / med, "conv_gflops": flops / med / 1e9})
        print(f"{name:34s} {'bf16' if bf16 else 'fp32'}  {1e3 * med:8.1f} ms  "
              f"x{base / med:5.2f} vs fp32 reference  {flops / med / 1e9:6.1f} GFLOP/s (conv)")
    print(f"config: f={args.embed_dim} conv layers={len(dilations)} batch={args.batch_size} seq={args.seq_len} "
          f"device={device} threads={torch.get_num_threads()} repeats={args.repeats} (median), forward + backward")
    return {"rows": rows, "threads": torch.get_num_threads(), "dtypes": dtypes}


def _dtypes(asked: list[str] | None, device, fp32: str, bf16: str, quiet: bool = False) -> list[str]:
    """The dtypes a benchmark measures: those asked for, else fp32 and, where ``device`` has bf16
    arithmetic, bf16 (emulated bf16 is not a figure anyone runs with, and takes minutes)."""
    from conure_dist.train.engine import native_bf16

    if asked:
        return list(asked)
    if native_bf16(device):
        return [fp32, bf16]
    if not quiet:
        print(f"{bf16}: not measured, this {device.type} has no bf16 arithmetic (ask for it with --dtypes)")
    return [fp32]


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", default=None, help="also write the measurements here (JSON)")
    sub = parser.add_subparsers(dest="bench", required=True)
    sub_add = sub.add_parser
    sub.add_parser = lambda *a, **k: sub_add(*a, parents=[common], **k)  # every benchmark takes --json
    p = sub.add_parser("pipeline", help="Ray Data pipeline rows/s vs pyarrow")
    p.add_argument("--data", default="/tmp/conure-bench/ttl-small",
                   help="prepared dataset; generated from --preset if missing (default outside the repo)")
    p.add_argument("--preset", default="ttl-small", help="synthetic preset to generate (default ttl-small)")
    p.add_argument("--task", default="pretrain", help="task whose rows (all splits) are read")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-files", type=int, default=0, help="read only the first N files of the task (0: all)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--readers", nargs="+", default=["files", "parquet"], choices=["files", "parquet"],
                   help="how the workers read the files (cluster.reader)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.set_defaults(func=run_pipeline)
    m = sub.add_parser("masks", help="forward-pass overhead of the owner-map masks")
    m.add_argument("--backbone", default="nextitnet", choices=["nextitnet", "transformer"])
    m.add_argument("--embed-dim", type=int, default=256)
    m.add_argument("--repeat-dilations", type=int, default=4, help="4: the TTL 16 conv layers; 6: ML's 24")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--seq-len", type=int, default=100)
    m.add_argument("--num-items", type=int, default=10_000)
    m.add_argument("--repeats", type=int, default=30)
    m.add_argument("--warmup", type=int, default=3)
    m.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    m.add_argument("--device", default="cpu")
    m.set_defaults(func=run_masks)
    g = sub.add_parser("guard", help="frozen guard: exact copy vs checksums on a TTL-sized item table")
    g.add_argument("--rows", type=int, default=646_001)
    g.add_argument("--dim", type=int, default=256)
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    g.add_argument("--repeats", type=int, default=10)
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=run_guard)
    b = sub.add_parser("batch-mix", help="distinct users per training batch, stored order vs per-epoch shuffle")
    b.add_argument("--data", required=True, help="prepared dataset")
    b.add_argument("--preset", default=None, help="synthetic preset to generate into --data if it is missing")
    b.add_argument("--task", required=True)
    b.add_argument("--batch-size", type=int, default=512)
    b.add_argument("--shuffle-rows", type=int, default=100_000, help="per-epoch shuffle buffer (rows)")
    b.add_argument("--epochs", type=int, default=2)
    b.add_argument("--num-cpus", type=int, default=os.cpu_count())
    b.set_defaults(func=run_batch_mix)
    it = sub.add_parser("item-step", help="item-task step: backbone over every row vs once per distinct user")
    it.add_argument("--users", type=int, default=750, help="users the batch rows are drawn from (ML-100K: ~750)")
    it.add_argument("--batch-size", type=int, default=512)
    it.add_argument("--embed-dim", type=int, default=64)
    it.add_argument("--repeat-dilations", type=int, default=2)
    it.add_argument("--seq-len", type=int, default=30)
    it.add_argument("--num-items", type=int, default=1682)
    it.add_argument("--labels", type=int, default=1444)
    it.add_argument("--repeats", type=int, default=15)
    it.add_argument("--warmup", type=int, default=2)
    it.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    it.set_defaults(func=run_item_step)
    t1 = sub.add_parser("t1-step", help="T1 step at 646K items: sampled softmax (dedup vs every draw) and exact")
    t1.add_argument("--num-items", type=int, default=646_000)
    t1.add_argument("--embed-dim", type=int, default=256)
    t1.add_argument("--repeat-dilations", type=int, default=4)
    t1.add_argument("--seq-len", type=int, default=100)
    t1.add_argument("--batch-size", type=int, default=32)
    t1.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.05])
    t1.add_argument("--full-batch", type=int, nargs="+", default=[2, 8],
                    help="batches of the exact-softmax comparison (0: skip)")
    t1.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the every-draw baseline")
    t1.add_argument("--baseline-ratios", type=float, nargs="+", default=None,
                    help="the sample ratios the baselines are measured at (default: every one of --ratios)")
    t1.add_argument("--no-intermediate", dest="intermediate", action="store_false",
                    help="skip the step between the baseline and now (distinct draws, foreach Adam)")
    t1.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                    help="skip the step in a process under the trainer workers' allocator (glibc huge pages)")
    t1.add_argument("--repeats", type=int, default=3)
    t1.add_argument("--warmup", type=int, default=1)
    t1.add_argument("--threads", type=int, default=0)
    t1.set_defaults(func=run_t1_step)
    bb = sub.add_parser("backbone", help="NextItNet forward+backward (masks on) vs a plain Conv2d reference, fp32/bf16")
    bb.add_argument("--embed-dim", type=int, default=256)
    bb.add_argument("--repeat-dilations", type=int, default=4)
    bb.add_argument("--batch-size", type=int, default=32)
    bb.add_argument("--seq-len", type=int, default=100)
    bb.add_argument("--num-items", type=int, default=10_000)
    bb.add_argument("--repeats", type=int, default=15)
    bb.add_argument("--warmup", type=int, default=2)
    bb.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    bb.add_argument("--device", default="cpu")
    bb.add_argument("--compile", action="store_true", help="also torch.compile the project's backbone")
    bb.add_argument("--dtypes", nargs="+", default=None, choices=["fp32", "bf16"],
                    help="default: fp32, and bf16 where the device has bf16 arithmetic (emulated bf16 takes minutes)")
    bb.set_defaults(func=run_backbone)
    sc = sub.add_parser("scaling", help="T1 stage examples/s: 1 worker x N threads vs N workers x 1 thread (real path)")
    sc.add_argument("--data", default="/tmp/conure-bench/ttl-small", help="prepared dataset (generated if missing)")
    sc.add_argument("--preset", default="ttl-small")
    sc.add_argument("--task", default="pretrain")
    sc.add_argument("--workdir", default="/tmp/conure-bench/scaling", help="run directories (outside the repo)")
    sc.add_argument("--threads", type=int, default=2, help="CPU threads in all: one worker with them, or one each")
    sc.add_argument("--steps", type=int, default=20)
    sc.add_argument("--eval-rows", type=int, default=500)
    sc.add_argument("--embed-dim", type=int, default=256)
    sc.set_defaults(func=run_scaling)
    fc = sub.add_parser("fixed-cost", help="a run's time outside steps and evaluation: one worker group per stage vs per run")
    fc.add_argument("--data", default="/tmp/conure-bench/demo", help="prepared dataset (generated if missing)")
    fc.add_argument("--preset", default="demo")
    fc.add_argument("--tasks", default="pretrain,click")
    fc.add_argument("--workdir", default="/tmp/conure-bench/fixed-cost", help="run directories (outside the repo)")
    fc.add_argument("--num-cpus", type=int, default=os.cpu_count())
    fc.add_argument("extra", nargs="*", help="more options of jobs/ttl.py (after --), e.g. -- --epochs 1")
    fc.set_defaults(func=run_fixed_cost)

    fl = sub.add_parser("floor", help="the demo command against the least a Ray Train + DeepSpeed job costs here")
    fl.add_argument("--workers", type=int, default=2, help="the demo's workers and the empty session's")
    fl.add_argument("--repeats", type=_positive_int, default=1, help="pairs of runs, interleaved")
    fl.add_argument("--timeout", type=float, default=1800, help="seconds each process may take")
    fl.add_argument("--workdir", default="/tmp/conure-bench/floor", help="run directories (outside the repo)")
    fl.add_argument("extra", nargs="*", help="more options of jobs/ttl.py (after --), e.g. -- --epochs 1")
    fl.set_defaults(func=run_floor)
    fs = sub.add_parser("floor-session")  # the floor's own job, run by `floor` in a process of its own
    fs.add_argument("--workers", type=int, default=2)
    fs.add_argument("--workdir", default="/tmp/conure-bench/floor")
    fs.set_defaults(func=_empty_session)
    pr = sub.add_parser("prune", help="owner-map prune of the TTL model: selection vs a stable sort")
    pr.add_argument("--embed-dim", type=int, default=256)
    pr.add_argument("--repeat-dilations", type=int, default=4)
    pr.add_argument("--num-items", type=int, default=646_000, help="0: conv layers only")
    pr.add_argument("--no-embedding-baseline", action="store_true",
                    help="with the item embedding, time the selection only (its stable sort takes ~80 s here)")
    pr.set_defaults(func=run_prune)
    sv = sub.add_parser("serve", help="exported model: size, one-user latency, batch users/s (in process, Ray Data)")
    sv.add_argument("--workdir", default="/tmp/conure-bench/serve", help="where the model and data go (outside the repo)")
    sv.add_argument("--num-items", type=int, default=646_000)
    sv.add_argument("--embed-dim", type=int, default=256)
    sv.add_argument("--repeat-dilations", type=int, default=4)
    sv.add_argument("--seq-len", type=int, default=100)
    sv.add_argument("--users", type=int, default=2048, help="users scored in the throughput runs")
    sv.add_argument("--batch-size", type=int, default=256)
    sv.add_argument("--tasks", nargs="+", default=["pretrain", "click"])
    sv.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"],
                    help="default: float32, and bfloat16 where this CPU has bf16 arithmetic")
    sv.add_argument("--repeats", type=int, default=100)
    sv.add_argument("--warmup", type=int, default=5)
    sv.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    sv.add_argument("--no-score-job", dest="score_job", action="store_false", help="skip the Ray Data runs")
    sv.add_argument("--workers", type=int, default=2, help="score job actors")
    sv.add_argument("--cpus-per-worker", type=float, default=0.5)
    sv.set_defaults(func=run_serve)
    al = sub.add_parser("all", help="every benchmark but fixed-cost in turn, one JSON file (--tiny: every one)")
    al.add_argument("--out", required=True, help="the JSON file with every benchmark's result")
    al.add_argument("--workdir", default="/tmp/conure-bench", help="generated data and models (outside the repo)")
    al.add_argument("--tiny", action="store_true", help="each benchmark at a tiny size: proves they run, measures nothing")
    al.add_argument("--only", nargs="+", default=None, help="run only these benchmarks")
    al.set_defaults(func=run_all)
    return parser.parse_args(argv)


def all_benchmarks(workdir: str, tiny: bool) -> list[tuple[str, list[str]]]:
    """Each benchmark with the arguments ``all`` runs it with: sizes that keep the whole run
    under 15 minutes on a 2-core machine (every benchmark but ``fixed-cost``), or (``tiny``)
    every benchmark at a size that only proves it runs."""
    small_model = ["--embed-dim", "16", "--repeat-dilations", "1", "--seq-len", "8"]
    quick = ["--repeats", "2", "--warmup", "1"]
    demo = os.path.join(workdir, "demo")
    if tiny:
        return [
            ("backbone", small_model + quick + ["--batch-size", "4", "--num-items", "50", "--dtypes", "fp32", "bf16"]),
            ("masks", small_model + quick + ["--batch-size", "4", "--num-items", "50"]),
            ("t1-step", small_model + ["--num-items", "3000", "--batch-size", "4", "--full-batch", "2",
                                       "--repeats", "1", "--warmup", "0"]),
            ("prune", ["--embed-dim", "8", "--repeat-dilations", "1", "--num-items", "500", "--no-embedding-baseline"]),
            ("guard", ["--rows", "66000", "--dim", "256", "--repeats", "2", "--warmup", "0"]),
            ("item-step", small_model + quick + ["--users", "20", "--batch-size", "32", "--num-items", "50",
                                                 "--labels", "30"]),
            ("serve", small_model + ["--workdir", os.path.join(workdir, "serve"), "--num-items", "300", "--users", "40",
                                     "--batch-size", "16", "--repeats", "5", "--warmup", "1", "--workers", "1",
                                     "--dtypes", "float32", "bfloat16"]),  # bf16 too, emulated or not: the code runs
            ("pipeline", ["--data", demo, "--preset", "demo", "--task", "click", "--epochs", "1", "--workers", "1",
                          "--batch-size", "64", "--seq-len", "25", "--num-cpus", "2"]),
            ("batch-mix", ["--data", demo, "--task", "click", "--batch-size", "64", "--shuffle-rows", "500",
                           "--epochs", "1", "--num-cpus", "2"]),
            ("scaling", ["--data", demo, "--preset", "demo", "--workdir", os.path.join(workdir, "scaling"),
                         "--steps", "3", "--eval-rows", "50", "--embed-dim", "16"]),
            ("fixed-cost", ["--data", demo, "--workdir", os.path.join(workdir, "fixed-cost"), "--tasks", "pretrain",
                            "--", "--epochs", "1", "--retrain-epochs", "0", "--max-steps", "2", "--max-eval-rows", "50",
                            "--embed-dim", "16"]),
            ("floor", ["--workdir", os.path.join(workdir, "floor"), "--", "--tasks", "pretrain", "--epochs", "1",
                       "--retrain-epochs", "0", "--max-steps", "2", "--max-eval-rows", "50", "--embed-dim", "16"]),
        ]
    return [
        ("backbone", []),
        ("masks", ["--repeats", "15"]),
        ("t1-step", ["--repeats", "2", "--full-batch", "8", "--no-intermediate", "--baseline-ratios", "0.2"]),
        ("prune", ["--no-embedding-baseline"]),
        ("guard", []),
        ("item-step", []),
        ("serve", ["--workdir", os.path.join(workdir, "serve"), "--repeats", "30", "--users", "512", "--tasks", "pretrain"]),
        ("pipeline", ["--data", os.path.join(workdir, "ttl-small"), "--max-files", "3", "--epochs", "2",
                      "--workers", "1", "--readers", "files"]),
        ("batch-mix", ["--data", demo, "--preset", "demo", "--task", "click", "--batch-size", "256"]),
        ("scaling", ["--data", os.path.join(workdir, "ttl-small"), "--workdir", os.path.join(workdir, "scaling"),
                     "--steps", "8"]),
        # fixed-cost (one worker group per stage against the session, 131 s here) is left out:
        # floor measures the session's fixed cost per task on the demo itself (run it by hand).
        ("floor", ["--workdir", os.path.join(workdir, "floor")]),
    ]


def run_all(args: argparse.Namespace) -> dict:
    """Every benchmark in turn; the result of each (and its wall time) under its name."""
    plan = all_benchmarks(args.workdir, args.tiny)
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _ in plan})
        if unknown:
            raise SystemExit(f"error: --only: no benchmark {', '.join(unknown)}; one of {', '.join(n for n, _ in plan)}")
        plan = [(name, argv) for name, argv in plan if name in args.only]
    results = {"machine": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": args.tiny, "benchmarks": {}}
    start = time.perf_counter()
    for name, argv in plan:
        print(f"\n== {name} {' '.join(argv)}", flush=True)
        t = time.perf_counter()
        sub = get_args([name, *argv])
        result = sub.func(sub)
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()  # each benchmark starts Ray the way it needs
        results["benchmarks"][name] = {"argv": argv, "wall_s": time.perf_counter() - t, "result": result}
        _write_json(args.out, results)  # after each, so a long run leaves what it measured
    results["wall_s"] = time.perf_counter() - start
    print(f"\nall: {len(plan)} benchmarks in {results['wall_s']:.0f} s; results in {args.out}")
    return results


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, default=str)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    result = args.func(args)
    target = args.out if args.bench == "all" else args.json
    if target:
        _write_json(target, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
