"""Shared command line of the job entry points (jobs/ttl.py, jobs/movielens.py).

A job is a :class:`Setting` (the paper's defaults for one dataset) plus this command line.
Precedence: command line > the setting's defaults. The job connects to a running Ray cluster
when there is one (``ray job submit``), and starts an embedded local Ray otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

from conure_dist.config import ClusterConfig, ConfigError, ExperimentConfig, ModelConfig, TaskPlan, TaskSpec, TrainConfig


@dataclass(frozen=True)
class Setting:
    """One dataset's defaults: model shape, and per-task training settings in task order."""

    name: str
    model: ModelConfig
    first: TrainConfig  # T1
    later: TrainConfig  # every later task
    ratios: tuple[float, ...]
    l2_overrides: dict[int, float] = field(default_factory=dict)  # task number -> l2
    seq_len: int = 100


QUIET_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # reports block ~2 s each otherwise
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="prepared dataset directory (conure-dist prepare ...)")
    data.add_argument("--tasks", help="comma-separated task order (default: the dataset's order); T1 first")
    run = parser.add_argument_group("run")
    run.add_argument("--run-dir", help="run directory: local path or URI (s3://, gs://); rerun to resume")
    run.add_argument("--new-run", action="store_true", help="start over in --run-dir even if it holds a run")
    run.add_argument("--add-task", action="store_true", help="extend a committed run with the new tasks at the end of --tasks")
    run.add_argument("--method", default="conure", choices=["conure", "sinmoall"])
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--dry-run", action="store_true", help="print the resource plan per worker and exit")
    run.add_argument("--in-process", action="store_true",
                     help="run every stage in this process without Ray or DeepSpeed (debugging; no run directory)")
    train = parser.add_argument_group("training")
    train.add_argument("--ratios", help="comma-separated prune ratios, one per task")
    train.add_argument("--epochs", type=int, help="train epochs of every task")
    train.add_argument("--retrain-epochs", type=int, help="retrain epochs of every task")
    train.add_argument("--batch-size", type=int, help="global batch of every later task (T1 keeps its own)")
    train.add_argument("--embed-dim", type=int)
    train.add_argument("--seq-len", type=int)
    train.add_argument("--shuffle-buffer", type=int,
                       help="rows each worker shuffles per epoch (default 100000; 0: stored order)")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--workers", type=int, default=2, help="Ray Train workers per stage")
    cluster.add_argument("--gpus-per-worker", type=float, default=0.0, help="0: train on CPUs")
    cluster.add_argument("--cpus-per-worker", type=float, help="default 0.5 on CPU (leaves room for Ray Data), 4 on GPU")
    cluster.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2])
    cluster.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    cluster.add_argument("--max-failures", type=int, default=1)
    cluster.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: each epoch)")
    cluster.add_argument("--log-every", type=int, default=50, help="steps between progress lines")


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"{option}: comma-separated numbers expected, got {text!r}") from e


def build_experiment(args: argparse.Namespace, setting: Setting, dataset_dir: str) -> ExperimentConfig:
    """The experiment from the setting's defaults, the dataset's tasks and the command line."""
    from conure_dist.data.format import load_dataset_info

    info = load_dataset_info(dataset_dir)
    available = {t.name: t for t in info.tasks}
    order = [t.strip() for t in args.tasks.split(",")] if args.tasks else [t.name for t in info.tasks]
    unknown = [t for t in order if t not in available]
    if unknown:
        raise ConfigError(f"--tasks: {unknown} not in {dataset_dir} (has {list(available)})")
    ratios = _floats(args.ratios, "--ratios") if args.ratios else list(setting.ratios)
    if len(ratios) < len(order):
        raise ConfigError(f"--ratios: {len(ratios)} ratios for {len(order)} tasks")
    plans = []
    for i, name in enumerate(order):
        t = available[name]
        train = setting.first if i == 0 else setting.later
        updates = {k: v for k, v in (("epochs", args.epochs), ("retrain_epochs", args.retrain_epochs)) if v is not None}
        if i > 0 and args.batch_size:
            updates["batch_size"] = args.batch_size
        if i + 1 in setting.l2_overrides:
            updates["l2"] = setting.l2_overrides[i + 1]
        spec = TaskSpec(name, t.kind, num_labels=t.num_labels if t.kind != "sequence" else 0, prune_ratio=ratios[i])
        plans.append(TaskPlan(spec, replace(train, seed=args.seed, **updates)))
    model = replace(setting.model, num_items=info.num_items,
                    **({"embed_dim": args.embed_dim} if args.embed_dim else {}))
    use_gpu = args.gpus_per_worker > 0
    cluster = ClusterConfig(
        num_workers=args.workers, use_gpu=use_gpu, gpus_per_worker=args.gpus_per_worker or 1.0,
        cpus_per_worker=args.cpus_per_worker or (4.0 if use_gpu else 0.5), zero_stage=args.zero_stage,
        precision=args.precision, max_failures=args.max_failures, checkpoint_every_steps=args.checkpoint_every,
        log_every_steps=args.log_every,
    )
    shuffle = {} if getattr(args, "shuffle_buffer", None) is None else {"shuffle_buffer_rows": args.shuffle_buffer}
    exp = ExperimentConfig(dataset=os.path.abspath(dataset_dir), model=model, tasks=tuple(plans), method=args.method,
                           seq_len=args.seq_len or setting.seq_len, seed=args.seed, cluster=cluster, **shuffle)
    # Each worker asks Ray for the memory its largest stage needs, so an autoscaling cluster
    # brings up nodes that fit a bigger catalogue instead of failing with out-of-memory.
    memory = int(resource_plan(exp).resources.get("memory", 0))
    return replace(exp, cluster=replace(cluster, memory_per_worker=memory))


def resource_plan(exp: ExperimentConfig):
    """The worker plan of the run's largest stage (memory by component, Ray resource request)."""
    from conure_dist.resources import SizingInputs, plan_run

    labels = [t.spec.num_labels for t in exp.tasks[1:]]
    first = exp.tasks[0]
    inputs = SizingInputs(
        num_items=exp.model.num_items, embed_dim=exp.model.embed_dim, num_conv_layers=len(exp.model.dilations),
        kernel_size=exp.model.kernel_size, max_label_space=max(labels, default=0), batch_size=first.train.batch_size,
        seq_len=exp.seq_len, sample_ratio=first.train.sample_ratio, zero_stage=exp.cluster.zero_stage,
        num_workers=exp.cluster.num_workers, precision=exp.cluster.resolved_precision, use_gpu=exp.cluster.use_gpu,
        prune_embedding=exp.model.prune_embedding, total_label_space=sum(labels) or None,
    )
    later = max((t.train.batch_size for t in exp.tasks[1:]), default=None)
    return plan_run(inputs, later_batch_size=later, cpus_per_worker=exp.cluster.cpus_per_worker,
                    gpus_per_worker=exp.cluster.gpus_per_worker)


def connect_ray(num_cpus_hint: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it; ``RAY_ADDRESS=auto``
    joins a ``ray start`` cluster on this machine), else start a private local Ray.

    A private local Ray never joins another program's embedded Ray by accident: two runs
    sharing one small node would each hold CPUs that the other's Ray Data tasks need.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import logging

    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=num_cpus_hint, logging_level=logging.WARNING, include_dashboard=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


PATH_OPTIONS = ("run_dir", "data", "raw", "raw_ttl")


def resolve_local_paths(args: argparse.Namespace) -> argparse.Namespace:
    """Local path options made absolute, once, in the driver: Ray Train workers run in working
    directories of their own, where a relative path would name another place. URIs stay."""
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if value and "://" not in value:
            setattr(args, name, os.path.abspath(os.path.expanduser(value)))
    return args


def dataset_in_run_dir(args: argparse.Namespace, prepare) -> str:
    """RUN_DIR/data, prepared by ``prepare(out_dir)`` on first use (raw inputs and --demo)."""
    resolve_local_paths(args)
    if not args.run_dir:
        raise ConfigError("--run-dir is required (the prepared dataset is kept in RUN_DIR/data)")
    if "://" in args.run_dir:
        raise ConfigError("--run-dir: raw inputs are prepared on local disk; prepare them with "
                          "`conure-dist prepare` and pass --data, or use a local --run-dir")
    dataset = os.path.join(args.run_dir, "data")
    if not os.path.exists(os.path.join(dataset, "dataset.json")):
        prepare(dataset)
    return dataset


def run_job(args: argparse.Namespace, setting: Setting, dataset_dir: str) -> int:
    from conure_dist.train.coordinator import run_experiment

    resolve_local_paths(args)
    exp = build_experiment(args, setting, dataset_dir)
    if args.dry_run:
        print(resource_plan(exp).table())
        return 0
    if args.in_process:
        return run_in_process_job(exp)
    if not args.run_dir:
        raise ConfigError("--run-dir is required (where the manifest, checkpoints and reports go)")
    connect_ray()
    started = time.time()
    run = run_experiment(exp, args.run_dir, new_run=args.new_run, add_task=args.add_task)
    print(f"\nrun directory: {run.rundir.uri}  ({time.time() - started:.0f} s)")
    print("capacity of the backbone:")
    print(run.state.owners.capacity_table({i + 1: t.spec.name for i, t in enumerate(exp.tasks)}))
    print("accuracy matrix (main metric; rows: after committing; columns: task):")
    print(accuracy_table(run))
    return 0


def run_in_process_job(exp: ExperimentConfig) -> int:
    """The same plan on one process: a torch optimizer instead of DeepSpeed, batches read with
    pyarrow instead of Ray Data. Prints the capacity table and the accuracy matrix."""
    from types import SimpleNamespace

    from conure_dist.data.format import load_dataset_info
    from conure_dist.data.pipeline import load_split_batches
    from conure_dist.train.runner import TaskData, run_in_process

    info = load_dataset_info(exp.dataset)
    data = {}
    for plan in exp.tasks:
        name, size = plan.spec.name, plan.train.batch_size
        splits = {s: load_split_batches(info, name, s, size, exp.seq_len) for s in ("train", "validation", "test")}
        popularity = info.popularity(name) if plan.spec.kind != "class" else None
        data[name] = TaskData(splits["train"], splits["validation"], splits["test"], popularity)
    started = time.time()
    run = run_in_process(exp.model, exp.tasks, data, method=exp.method, seed=exp.seed)
    print(f"in-process run: {time.time() - started:.0f} s")
    print("capacity of the backbone:")
    print(run.state.owners.capacity_table({i + 1: t.spec.name for i, t in enumerate(exp.tasks)}))
    print("accuracy matrix (main metric; rows: after committing; columns: task):")
    print(accuracy_table(SimpleNamespace(exp=exp, state=run.state)))
    return 0


def accuracy_table(run) -> str:
    from conure_dist.eval.evaluate import main_metric

    names = [t.spec.name for t in run.exp.tasks]
    main = {t.spec.name: main_metric(t.spec, t.train.metric_k) for t in run.exp.tasks}
    cell = {(r["after_task"], r["task"]): r["value"] for r in run.state.accuracy if r["metric"] == main[r["task"]]}
    rows = [["after \\ task", *(f"{n} ({main[n]})" for n in names)]]
    for after in names:
        if any((after, t) in cell for t in names):
            rows.append([after, *(f"{cell[(after, t)]:.4f}" if (after, t) in cell else "" for t in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main_guard(fn, argv: Sequence[str] | None = None) -> int:
    """Run ``fn(argv)``; a bad option or run directory ends with a one-line message, exit 2;
    a stage that failed (non-finite loss, workers' errors after retries) with its error, exit 1."""
    from conure_dist.data.format import DatasetFormatError
    from conure_dist.model import FrozenWeightsChanged
    from conure_dist.train.executor import StageFailed
    from conure_dist.train.loop import NonFiniteLoss
    from conure_dist.train.rundir import RunDirError

    try:
        return fn(argv)
    except (ConfigError, RunDirError, DatasetFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (StageFailed, NonFiniteLoss, FrozenWeightsChanged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
