"""Shared command line of the jobs (``conure-dist train``, ``python -m conure_dist.jobs.ttl``,
``jobs/ttl.py``, ...).

A job is a run config (:mod:`conure_dist.runconfig`: a shipped preset, the user's config files,
then this command line, which wins) and a prepared dataset. The job connects to a running Ray
cluster when there is one (``ray job submit``), and starts an embedded local Ray otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Any, Sequence

from conure_dist import __version__
from conure_dist.config import BACKBONES, ConfigError, ExperimentConfig, TaskPlan, TaskSpec
from conure_dist.train.plan import METHODS


QUIET_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # reports block ~2 s each otherwise
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}

# Named options -> config keys (see conure_dist/runconfig.py); applied over the config files.
OPTION_KEYS = {
    "data": "data", "run_dir": "run_dir", "raw": "source.raw", "skip_bad": "source.skip_bad", "allow_new_users": "source.allow_new_users", "method": "method", "seed": "seed",
    "embed_dim": "model.embed_dim", "backbone": "model.backbone", "seq_len": "seq_len",
    "shuffle_buffer": "shuffle_buffer_rows", "max_eval_rows": "max_eval_rows", "first_batch_size": "first_task.batch_size",
    "workers": "cluster.num_workers", "cpus_per_worker": "cluster.cpus_per_worker",
    "zero_stage": "cluster.zero_stage", "precision": "cluster.precision", "max_failures": "cluster.max_failures",
    "checkpoint_every": "cluster.checkpoint_every_steps", "log_every": "cluster.log_every_steps",
}
# Named options that set a key of every task (T1, later tasks and each per-task override).
EVERY_TASK_KEYS = {"epochs": "epochs", "retrain_epochs": "retrain_epochs", "max_steps": "max_steps"}


def add_run_arguments(parser: argparse.ArgumentParser, preset: str) -> None:
    """Options of a run; defaults come from the config (``preset``, then --config files), and
    every option given on the command line wins over both."""
    from conure_dist import runconfig

    base = runconfig.to_run_config(runconfig.load_config(preset))

    def d(value) -> str:
        return f" (preset {preset}: {value})"

    config = parser.add_argument_group("config (command line > --config files > --preset)")
    config.add_argument("--preset", default=None, choices=runconfig.preset_names(),
                        help=f"shipped config to start from (default {preset}; conure-dist config show NAME)")
    config.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML config file (local path or URI); repeat to layer several, later ones win")
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="set any config key, e.g. --set later_tasks.lr=3e-4 --set tasks.like.l2=0.05")
    config.add_argument("--print-config", action="store_true", help="print the fully resolved config (YAML) and exit")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="prepared dataset: directory or URI (s3://, gs://) made by conure-dist prepare")
    data.add_argument("--tasks", help="comma-separated task order (default: the dataset's order); T1 first")
    data.add_argument("--skip-bad", action="store_true", default=None,
                      help="when raw inputs are prepared into RUN_DIR/data: skip bad lines (counted) instead of stopping")
    run = parser.add_argument_group("run")
    run.add_argument("--run-dir", help="run directory: local path or URI (s3://, gs://); rerun to resume")
    run.add_argument("--new-run", action="store_true", help="start over in --run-dir even if it holds a run")
    run.add_argument("--add-task", action="store_true", help="extend a committed run with the new tasks at the end of --tasks")
    run.add_argument("--method", choices=sorted(METHODS), metavar="METHOD",
                     help="conure (prune and retrain, nothing forgotten) or a baseline of the paper: "
                          + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + d(base.method))
    run.add_argument("--seed", type=int, help=f"seed of initialisation, sampling and data order{d(base.seed)}")
    run.add_argument("--dry-run", action="store_true",
                     help="check the config, the task order and the per-worker resource plan, print the plan and exit")
    run.add_argument("--gpu-memory", metavar="SIZE|CARD",
                     help="with --dry-run: check the plan against a GPU, e.g. 80GiB, 24GB or a card name (h100, a10g, ...)")
    run.add_argument("--in-process", action="store_true",
                     help="run every stage in this process with a torch optimizer in fp32, without Ray or DeepSpeed (debugging, "
                          "small runs); with --run-dir it writes a run directory (manifest, state, reports; no Ray "
                          "checkpoints or TensorBoard files: an interrupted stage starts over), without, it only "
                          "prints the results")
    run.add_argument("--log-level", choices=["info", "debug"], default="info",
                     help="info: one line per stage event and epoch; debug: also every Ray worker's output (default info)")
    comp = parser.add_argument_group("comparison (the paper's section 5: every method, ablations, a report)")
    comp.add_argument("--compare", action="store_true",
                      help="run every method and the ablations in process and write OUT/report.md, CSVs and figures")
    comp.add_argument("--out", help="with --compare: the report's directory")
    comp.add_argument("--seeds", type=int, default=3, help="with --compare: seeds of Table 2, from --seed on (default 3)")
    comp.add_argument("--ablation-seeds", type=int, default=1, help="with --compare: seeds of the ablations (default 1)")
    comp.add_argument("--no-ablations", action="store_true", help="with --compare: Table 2 only")
    comp.add_argument("--tune", action="store_true",
                      help="with --compare: first choose each later task's learning rate on its validation split")
    comp.add_argument("--report-only", action="store_true",
                      help="with --compare: write the report again from OUT/outcomes.json, without training")
    comp.add_argument("--check-ray", action="store_true",
                      help="with --compare: also produce the Conure row through Ray Train + DeepSpeed (first seed)")
    train = parser.add_argument_group("training")
    train.add_argument("--ratios", help=f"comma-separated prune ratios, one per task{d(base.prune_ratios)}")
    train.add_argument("--epochs", type=int, help="train epochs of every task "
                       f"(preset {preset}: {base.first_task.epochs} for T1, {base.later_tasks.epochs} after)")
    train.add_argument("--retrain-epochs", type=int, help="retrain epochs of every task "
                       f"(preset {preset}: {base.first_task.retrain_epochs} for T1, {base.later_tasks.retrain_epochs} after)")
    train.add_argument("--max-steps", type=int, help="optimizer steps per train/retrain stage of every task, "
                       "then the stage validates and ends (0: no limit; for smoke tests at scale)"
                       f"{d(base.first_task.max_steps)}")
    train.add_argument("--max-eval-rows", type=int, help="validate and test on at most this many rows of each "
                       "split (0: all; for smoke tests: the reports say the metrics are partial)"
                       f"{d(base.max_eval_rows)}")
    train.add_argument("--batch-size", type=int, help=f"global batch of every later task{d(base.later_tasks.batch_size)}")
    train.add_argument("--first-batch-size", type=int, help=f"global batch of T1{d(base.first_task.batch_size)}")
    train.add_argument("--embed-dim", type=int, help=f"embedding width f{d(base.model.embed_dim)}")
    train.add_argument("--backbone", choices=list(BACKBONES), help=f"the shared network{d(base.model.backbone)}")
    train.add_argument("--seq-len", type=int, help=f"longest user sequence{d(base.seq_len)}")
    train.add_argument("--shuffle-buffer", type=int, help=f"rows each worker shuffles at a time through a buffer (see cluster.train_shuffle), 0: stored order{d(base.shuffle_buffer_rows)}")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--workers", type=int, help=f"Ray Train workers per stage{d(base.cluster.num_workers)}")
    cluster.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; 0: train on CPUs (default: the config's)")
    cluster.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (default 0.5 on CPU, leaving room for Ray Data; 4 on GPU)")
    cluster.add_argument("--zero-stage", type=int, choices=[0, 1, 2], help=f"DeepSpeed ZeRO stage{d(base.cluster.zero_stage)}")
    cluster.add_argument("--precision", choices=["auto", "fp32", "bf16"], help=f"auto: bf16 on GPU, fp32 on CPU{d(base.cluster.precision)}")
    cluster.add_argument("--max-failures", type=int, help=f"worker failures retried per stage or evaluation{d(base.cluster.max_failures)}")
    cluster.add_argument("--checkpoint-every", type=int, help=f"steps between checkpoints, 0: each epoch end{d(base.cluster.checkpoint_every_steps)}")
    cluster.add_argument("--log-every", type=int, help=f"steps between progress lines in the log file{d(base.cluster.log_every_steps)}")
    cluster.add_argument("--deepspeed-config", metavar="FILE",
                         help="DeepSpeed JSON merged into the generated config (same as the config's deepspeed: section)")


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"{option}: comma-separated numbers expected, got {text!r}") from e


def _ratios(text: str) -> list[float]:
    """``--ratios``: each value strictly between 0 and 1 (checked before their count, which
    needs the dataset's tasks)."""
    ratios = _floats(text, "--ratios")
    bad = [r for r in ratios if not 0.0 < r < 1.0]
    if bad or not ratios:
        raise ConfigError(f"--ratios {text}: each prune ratio must lie strictly between 0 and 1"
                          + (f"; got {bad}" if bad else ""))
    return ratios


def command_line_updates(args: argparse.Namespace, cfg) -> list[tuple[str, Any]]:
    """``(config key, value)`` for each named option given on the command line."""
    updates = [(key, getattr(args, name)) for name, key in OPTION_KEYS.items() if getattr(args, name, None) is not None]
    if getattr(args, "tasks", None):
        updates.append(("task_order", [t.strip() for t in args.tasks.split(",") if t.strip()]))
    if getattr(args, "ratios", None):
        updates.append(("prune_ratios", _ratios(args.ratios)))
    if getattr(args, "batch_size", None) is not None:
        updates.append(("later_tasks.batch_size", args.batch_size))
    for name, key in EVERY_TASK_KEYS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        updates += [(f"first_task.{key}", value), (f"later_tasks.{key}", value)]
        updates += [(f"tasks.{task}.{key}", value) for task, o in cfg.tasks.items() if o[key] is not None]
    gpus = getattr(args, "gpus_per_worker", None)
    if gpus is not None:
        updates.append(("cluster.use_gpu", gpus > 0))
        if gpus > 0:
            updates.append(("cluster.gpus_per_worker", gpus))
    if getattr(args, "deepspeed_config", None):
        updates.append(("deepspeed", _deepspeed_file(args.deepspeed_config)))
    return updates


def _deepspeed_file(path: str) -> dict:
    import json

    from conure_dist import storage

    try:
        data = json.loads(storage.read_bytes(storage.resolve(path)))
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed-config: {path}: not found") from None
    except ValueError as e:
        raise ConfigError(f"--deepspeed-config: {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed-config: {path}: a JSON object expected")
    return data


def resolve_config(args: argparse.Namespace, preset: str):
    """The run's merged config: preset < --config files < named options < --set; local paths
    made absolute (once, in the driver: Ray workers run in directories of their own)."""
    from conure_dist import runconfig, storage

    preset = args.preset or preset
    cfg = runconfig.load_config(preset, args.config)  # each config file is read once
    cfg = runconfig.apply_command_line(cfg, command_line_updates(args, cfg), args.overrides)
    for key in ("data", "run_dir"):
        if cfg[key]:
            cfg[key] = storage.resolve(cfg[key])
    if cfg.source.raw:
        cfg.source.raw = storage.resolve(cfg.source.raw)
    return cfg


def build_experiment(rc, dataset: str, preset_tasks: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment from the run config (:class:`conure_dist.runconfig.RunConfig`) and the
    prepared dataset's tasks. A per-task override for a task the dataset lacks is refused (a
    typo would otherwise go unnoticed), except those the preset ships (``preset_tasks``: the
    ``ttl`` preset's ``like`` on a dataset without likes)."""
    from conure_dist import runconfig, storage
    from conure_dist.data.format import load_dataset_info

    info = load_dataset_info(dataset)
    available = {t.name: t for t in info.tasks}
    order = list(rc.task_order) if rc.task_order else [t.name for t in info.tasks]
    unknown = [t for t in order if t not in available]
    if unknown:
        raise ConfigError(f"task_order (--tasks): {unknown} not in {dataset} (has {list(available)})")
    if len(set(order)) != len(order):
        raise ConfigError(f"task_order (--tasks): a task appears twice in {order}")
    if available[order[0]].kind != "sequence":
        raise ConfigError(f"task_order (--tasks): T1 must be a sequence task (next-item prediction); "
                          f"{order[0]!r} is an {available[order[0]].kind} task")
    strays = sorted(set(rc.tasks) - set(available) - set(preset_tasks))
    if strays:
        raise ConfigError(f"tasks: overrides for {strays}, which {dataset} does not have (has {list(available)})")
    if len(rc.prune_ratios) < len(order):
        raise ConfigError(f"prune_ratios (--ratios): {len(rc.prune_ratios)} ratios for {len(order)} tasks")
    plans = []
    for i, name in enumerate(order):
        t = available[name]
        train, spec_overrides = runconfig.train_config(rc, name, i, rc.seed)
        spec = TaskSpec(name, t.kind, num_labels=t.num_labels if t.kind != "sequence" else 0,
                        prune_ratio=rc.prune_ratios[i], **spec_overrides)
        plans.append(TaskPlan(spec, train))
    cluster = runconfig.cluster_config(rc)
    exp = ExperimentConfig(dataset=storage.resolve(dataset), model=runconfig.model_config(rc, info.num_items),
                           tasks=tuple(plans), method=rc.method, seq_len=rc.seq_len, seed=rc.seed,
                           shuffle_buffer_rows=rc.shuffle_buffer_rows,
                           max_eval_rows=rc.max_eval_rows, cluster=cluster, deepspeed=dict(rc.deepspeed))
    if cluster.memory_per_worker:
        return exp
    # Each worker asks Ray for the memory its largest stage needs, so an autoscaling cluster
    # brings up nodes that fit a bigger catalogue instead of failing with out-of-memory.
    memory = int(resource_plan(exp).resources.get("memory", 0))
    return replace(exp, cluster=replace(cluster, memory_per_worker=memory))


def resource_plan(exp: ExperimentConfig, gpu_memory: int | None = None):
    """The worker plan of the run's largest stage (memory by component, Ray resource request)."""
    from conure_dist.resources import SizingInputs, plan_run

    labels = [t.spec.num_labels for t in exp.tasks[1:]]
    first = exp.tasks[0]
    inputs = SizingInputs(
        num_items=exp.model.num_items, embed_dim=exp.model.embed_dim, num_conv_layers=len(exp.model.dilations),
        kernel_size=exp.model.kernel_size, max_label_space=max(labels, default=0), batch_size=first.train.batch_size,
        seq_len=exp.seq_len, sample_ratio=first.train.sample_ratio, sampler=first.train.sampler,
        zero_stage=exp.cluster.zero_stage,
        num_workers=exp.cluster.num_workers, precision=exp.cluster.resolved_precision, use_gpu=exp.cluster.use_gpu,
        prune_embedding=exp.model.prune_embedding, total_label_space=sum(labels) or None,
    )
    later = max((t.train.batch_size for t in exp.tasks[1:]), default=None)
    return plan_run(inputs, later_batch_size=later, cpus_per_worker=exp.cluster.cpus_per_worker,
                    gpus_per_worker=exp.cluster.gpus_per_worker, gpu_memory_bytes=gpu_memory)


def start_train_helpers() -> None:
    """Start now an actor that Ray Train's controller waits for when the session starts.

    At its start the controller asks Ray Data's autoscaling coordinator (a named actor: a
    process of its own, created on first use) for the workers' resources, and waits up to 5 s
    for the answer; on a 2-core machine that process takes about as long to start. Asked for
    here, right after Ray is up, it starts while the driver opens the run and the controller
    imports. Ray's own get-or-create (a private function): if this Ray has none, or it fails,
    nothing is started here."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        get_or_create_autoscaling_coordinator()
    except Exception as e:  # noqa: BLE001  (a head start only: Ray Train creates it anyway)
        import logging

        logging.getLogger("conure_dist").debug(f"Ray Data's autoscaling coordinator not started early: {e}")


def connect_ray(num_cpus_hint: int | None = None, *, worker_output: bool = False) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it; ``RAY_ADDRESS=auto``
    joins a ``ray start`` cluster on this machine), else start a private local Ray.

    A private local Ray never joins another program's embedded Ray by accident: two runs
    sharing one small node would each hold CPUs that the other's Ray Data tasks need.
    Ray workers' own output reaches this console only with ``worker_output`` (--log-level
    debug); the stage lines the job prints come through :mod:`conure_dist.logs`.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import logging

    import ray

    from conure_dist.logs import route_library_logs

    if ray.is_initialized():
        return
    route_library_logs(debug=worker_output)  # Ray's own warnings at init (and again for Ray Data's loggers below)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=worker_output)
    else:
        ray.init(address="local", num_cpus=num_cpus_hint, logging_level=logging.WARNING, include_dashboard=False,
                 log_to_driver=worker_output)
    from ray.data import DataContext

    if not worker_output:  # Ray Data's and Ray Train's INFO chatter ("Starting execution ...")
        for name in ("ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    route_library_logs(debug=worker_output)
    DataContext.get_current().enable_progress_bars = False


SOURCE_RECORD = "prepared-from.json"  # in RUN_DIR/data: what it was prepared from


def prepared_dataset(rc) -> str:
    """The run's prepared dataset: ``data``, or RUN_DIR/data prepared from ``source`` on first use.
    What it was prepared from is recorded next to it; a rerun that names other raw inputs is
    refused rather than silently given the old data."""
    import json

    from conure_dist import storage
    from conure_dist.data.format import METADATA_FILE

    if rc.data:
        return rc.data
    kind = rc.source.kind
    if kind == "none":
        raise ConfigError("give --data (a prepared dataset, conure-dist prepare ...) or a source of raw data "
                          "(source.kind with --raw, or --demo)")
    if kind in ("ttl", "movielens") and not rc.source.raw:
        raise ConfigError(f"give --data (a prepared dataset) or --raw (the {kind} files)")
    if not rc.run_dir:
        raise ConfigError("--run-dir is required (the prepared dataset is kept in RUN_DIR/data)")
    dataset = storage.join(rc.run_dir, "data")
    wanted = {"kind": kind, "raw": rc.source.raw if kind != "synthetic" else None,
              "preset": rc.source.preset if kind == "synthetic" else None,
              "seed": rc.seed if kind == "synthetic" else 0, "skip_bad": bool(rc.source.skip_bad),
              "allow_new_users": bool(rc.source.allow_new_users)}
    record = storage.join(dataset, SOURCE_RECORD)
    preset = None
    if kind == "synthetic":
        from dataclasses import asdict

        from conure_dist.data.synthetic import resolve_config

        preset = json.loads(json.dumps(asdict(resolve_config(rc.source.preset))))  # as stored: lists, not tuples
    if storage.exists(storage.join(dataset, METADATA_FILE)):
        if storage.exists(record):  # datasets prepared before the record was kept have none
            had = json.loads(storage.read_bytes(record))
            changed = {k: (had.get(k, False if k == "allow_new_users" else None), v) for k, v in wanted.items()
                       if had.get(k, False if k == "allow_new_users" else None) != v}
            if changed:
                raise ConfigError(
                    f"{dataset} was prepared from other inputs: "
                    + ", ".join(f"source.{k} {o!r} -> {n!r}" for k, (o, n) in changed.items())
                    + f"; give the same ones, another --run-dir, --data for a dataset prepared elsewhere, or "
                    f"delete {dataset} to prepare it again")
            if preset is not None and had.get("preset_parameters") != preset:
                # Kept (the runs there were made on it), but not silently: the preset has changed.
                older = had.get("preset_parameters")
                what = ("by a version that did not record the preset's parameters" if older is None else
                        "with other parameters: " + ", ".join(f"{k} {older.get(k)!r} -> {v!r}" for k, v in preset.items()
                                                               if older.get(k) != v))
                print(f"note: {dataset} was prepared from the synthetic preset {rc.source.preset!r} {what}; it is kept "
                      f"(runs made on it stay comparable); delete it, or use another --run-dir, to prepare the current one")
        return dataset
    # No dataset.json: nothing was published there, so whatever is left is a failed attempt.
    if kind == "synthetic":
        from conure_dist.data.synthetic import prepare_synthetic

        prepare_synthetic(rc.source.preset, dataset, seed=rc.seed, overwrite=True)
        report = {}
    elif kind == "ttl":
        from conure_dist.data.ttl import TTLOptions, prepare_ttl

        _, report = prepare_ttl(rc.source.raw, dataset, TTLOptions(overwrite=True, skip_bad=rc.source.skip_bad,
                                                                   allow_new_users=rc.source.allow_new_users))
    else:
        from conure_dist.data.movielens import MovieLensOptions, prepare_movielens

        _, report = prepare_movielens(rc.source.raw, dataset, MovieLensOptions(overwrite=True, skip_bad=rc.source.skip_bad))
    if report.get("skipped", "skipped rows: none") != "skipped rows: none":
        print(f"prepared {dataset} from {rc.source.raw}, {report['skipped']}")
    storage.write_bytes(record, json.dumps({**wanted, "preset_parameters": preset} if preset else wanted, indent=1).encode())
    return dataset


def run_from_args(args: argparse.Namespace, preset: str) -> int:
    """A job: resolve the config, prepare the data if asked, then print it (--print-config),
    plan it (--dry-run), run it in process (--in-process) or run it on Ray."""
    from conure_dist import runconfig
    from conure_dist.logs import DriverLog

    cfg = resolve_config(args, preset)
    rc = runconfig.to_run_config(cfg)
    runconfig.check_source(rc)
    shipped = list(runconfig.load_config(args.preset or preset).tasks)

    def experiment(dataset: str) -> ExperimentConfig:
        from conure_dist.data.format import check_shards, load_dataset_info

        exp = build_experiment(rc, dataset, shipped)
        if getattr(args, "ratios", None) and len(rc.prune_ratios) != len(exp.tasks):
            raise ConfigError(f"--ratios: {len(rc.prune_ratios)} prune ratios for {len(exp.tasks)} tasks "
                              f"({', '.join(t.spec.name for t in exp.tasks)}); give one per task")
        check_shards(load_dataset_info(exp.dataset))
        return exp

    config_yaml = runconfig.to_yaml(cfg)
    if args.print_config:
        print(config_yaml, end="")
        return 0
    gpu_memory = parse_gpu_memory(args.gpu_memory) if getattr(args, "gpu_memory", None) else None
    if args.dry_run:
        report = dry_run_report(experiment(prepared_dataset(rc)), gpu_memory)
        print(report)
        return 2 if REFUSED in report else 0
    if getattr(args, "compare", False):
        from conure_dist.compare import compare_job

        return compare_job(args, rc, experiment, preset)
    if args.in_process and not rc.run_dir:
        return run_in_process_job(experiment(prepared_dataset(rc)))
    if not rc.run_dir:
        raise ConfigError("--run-dir is required (where the manifest, checkpoints and reports go)")
    from conure_dist.train.coordinator import check_method, run_experiment

    if not args.in_process:
        check_method(rc.method)

    with DriverLog(rc.run_dir, debug=args.log_level == "debug") as log:
        exp = experiment(prepared_dataset(rc))
        log.info(f"conure_dist {__version__}: run directory {rc.run_dir}" + (" (in process)" if args.in_process else ""))
        log.debug("resolved config:\n" + config_yaml)
        if exp.smoke_settings():
            log.info("smoke test: " + "; ".join(exp.smoke_settings()))
        if not args.in_process:
            connect_ray(worker_output=args.log_level == "debug")
            start_train_helpers()
        started = time.time()
        run = run_experiment(exp, rc.run_dir, new_run=args.new_run, add_task=args.add_task, config_yaml=config_yaml,
                             in_process=args.in_process)
        log.sync()
        log.info(f"\nrun directory: {run.rundir.uri}  ({time.time() - started:.0f} s)")
        if METHODS[exp.method].masking:
            log.info("capacity of the backbone:")
            log.info(run.state.owners.capacity_table({i + 1: t.spec.name for i, t in enumerate(exp.tasks)}))
        log.info("accuracy matrix (main metric; rows: after committing; columns: task):")
        log.info(accuracy_table(run, run.floors or floors_of(exp)))
        if exp.smoke_settings():
            log.info("NOTE: smoke-test settings cut this run short, so these are not the tasks' metrics: "
                     + "; ".join(exp.smoke_settings()))
        log.info("reports: " + ", ".join(run.rundir.storage_uri(p) for p in
                                          ("reports/STATUS.txt", "reports/accuracy_matrix.csv", "reports/floors.csv",
                                           "reports/capacity.txt", "config.yaml",
                                           "logs/driver.log")))
    return 0


# GPU memory of common cards (GiB), for --dry-run --gpu-memory CARD.
GPU_CARDS = {"t4": 16, "v100": 16, "v100-32gb": 32, "a10g": 24, "l4": 24, "l40s": 48, "a40": 48,
             "a100-40gb": 40, "a100": 80, "a100-80gb": 80, "h100": 80, "h200": 141, "b200": 180, "rtx4090": 24}


def parse_gpu_memory(text: str) -> int:
    """Bytes of GPU memory from ``80GiB``, ``24GB``, ``24`` (GiB) or a card name (``h100``)."""
    import re

    key = text.strip().lower()
    if key in GPU_CARDS:
        return GPU_CARDS[key] * 2**30
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb)?", key)
    if not m:
        raise ConfigError(f"--gpu-memory: a size (80GiB, 24GB) or a card ({', '.join(sorted(GPU_CARDS))}), got {text!r}")
    scale = {"gib": 2**30, "g": 2**30, None: 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6}[m.group(2)]
    return int(float(m.group(1)) * scale)


# A micro-batch below this leaves a GPU mostly idle (and batch statistics noisy).
SMALL_MICRO_BATCH = 8


def dry_run_report(exp: ExperimentConfig, gpu_memory: int | None) -> str:
    """What a real run would check before starting: task order, batch split, resource plan."""
    lines = ["tasks: " + " -> ".join(f"{t.spec.name} ({t.spec.kind}, batch {t.train.batch_size}, "
                                     f"prune {t.spec.prune_ratio})" for t in exp.tasks)]
    workers = exp.cluster.num_workers
    for t in exp.tasks:
        micro = -(-t.train.batch_size // workers)
        if t.train.batch_size < workers:
            lines.append(f"warning: task {t.spec.name}: global batch {t.train.batch_size} is smaller than the "
                         f"{workers} workers; some workers would get only padding rows. Raise its batch_size.")
        elif micro < SMALL_MICRO_BATCH:
            lines.append(f"warning: task {t.spec.name}: global batch {t.train.batch_size} over {workers} workers "
                         f"is a micro-batch of {micro} per worker (< {SMALL_MICRO_BATCH}); raise its batch_size "
                         f"(first_task.batch_size / later_tasks.batch_size) or use fewer workers.")
    lines += capacity_plan_lines(exp)
    plan = resource_plan(exp, gpu_memory)
    lines.append(plan.table())
    return "\n".join(lines)


REFUSED = "error: the run would be refused: "  # in a --dry-run report: the job then exits 2


def capacity_plan_lines(exp: ExperimentConfig) -> list[str]:
    """The planned share of the prunable backbone of each task (methods that prune), a warning
    for each later task left less than MIN_FREE_FRACTION of it, and the refusal a real run would
    end with when a task would find no free weight at all."""
    from conure_dist.train.capacity import capacity_plan_table, capacity_warnings, check_capacity

    if not METHODS[exp.method].masking:
        return []
    try:
        rows = check_capacity(exp)  # the plan it checked
    except ConfigError as e:
        return [f"{REFUSED}{e}"]
    return ["capacity plan (share of the prunable backbone):", capacity_plan_table(rows), *capacity_warnings(rows)]


def run_in_process_job(exp: ExperimentConfig) -> int:
    """The same plan on one process: a torch optimizer instead of DeepSpeed, batches read with
    pyarrow instead of Ray Data. Prints the capacity table and the accuracy matrix."""
    from types import SimpleNamespace

    from conure_dist.compare import load_task_data
    from conure_dist.data.format import load_dataset_info
    from conure_dist.train.runner import run_in_process

    data = load_task_data(exp, load_dataset_info(exp.dataset))
    started = time.time()
    run = run_in_process(exp.model, exp.tasks, data, method=exp.method, seed=exp.seed)
    print(f"in-process run: {time.time() - started:.0f} s")
    print("capacity of the backbone:")
    print(run.state.owners.capacity_table({i + 1: t.spec.name for i, t in enumerate(exp.tasks)}))
    print("accuracy matrix (main metric; rows: after committing; columns: task):")
    print(accuracy_table(SimpleNamespace(exp=exp, state=run.state), floors_of(exp)))
    return 0


def accuracy_table(run, floors: dict[str, tuple[str, float]] | None = None) -> str:
    """The accuracy matrix (main metric; rows: after committing; columns: task), with the
    popularity / majority floor of each task as a last row; ``*`` marks a value below it."""
    from conure_dist.eval.evaluate import main_metric

    names = [t.spec.name for t in run.exp.tasks]
    main = {t.spec.name: main_metric(t.spec, t.train.metric_k) for t in run.exp.tasks}
    cell = {(r["after_task"], r["task"]): r["value"] for r in run.state.accuracy if r["metric"] == main[r["task"]]}
    floors = floors or {}

    def shown(after: str, task: str) -> str:
        if (after, task) not in cell:
            return ""
        value = cell[(after, task)]
        below = task in floors and value <= floors[task][1]
        return f"{value:.4f}{'*' if below else ''}"

    rows = [["after \\ task", *(f"{n} ({main[n]})" for n in names)]]
    for after in names:
        if any((after, t) in cell for t in names):
            rows.append([after, *(shown(after, t) for t in names)])
    if floors:
        rows.append(["popularity", *(f"{floors[n][1]:.4f}" if n in floors else "" for n in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    if any("*" in c for r in rows[1:] for c in r):
        table += "\n* not above the popularity / majority floor (last row): this model is no better than it"
    return table


def floors_of(exp: ExperimentConfig) -> dict[str, tuple[str, float]]:
    from conure_dist.data.format import load_dataset_info
    from conure_dist.eval.floors import floors

    return floors(load_dataset_info(exp.dataset), exp.tasks)


def main_guard(fn, argv: Sequence[str] | None = None) -> int:
    """Run ``fn(argv)``; a bad option, config, dataset path or run directory (another run's
    settings, a second driver) ends with a one-line message, exit 2; bad data (raw inputs:
    ``file:line: reason``; a damaged prepared dataset or run-directory file), a stage that
    failed (non-finite loss, workers' errors after retries) or storage that cannot be reached,
    with its error, exit 1. Never a traceback for these."""
    import pyarrow as pa

    from conure_dist.data.badinput import BadInputError
    from conure_dist.data.format import DatasetFormatError, DatasetNotFound
    from conure_dist.model import FrozenWeightsChanged
    from conure_dist.train.executor import StageFailed
    from conure_dist.train.loop import NonFiniteLoss
    from conure_dist.serve.artifact import ModelFileError
    from conure_dist.train.rundir import RunDirDamaged, RunDirError

    try:
        return fn(argv)
    except (BadInputError, RunDirDamaged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, RunDirError, ModelFileError, DatasetNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DatasetFormatError, StageFailed, NonFiniteLoss, FrozenWeightsChanged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (UnicodeDecodeError, pa.ArrowException) as e:  # data read outside the converters' checks
        print(f"error: unreadable data: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # storage: a path or bucket that cannot be read or written (details in the log file)
        print(f"error: {e}", file=sys.stderr)
        return 1
