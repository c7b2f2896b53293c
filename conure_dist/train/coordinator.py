"""The coordinator: runs a method's stage machine, owns the run directory and its lifecycle.

Between stages the coordinator merges the stage's best weights into the committed ones,
prunes, evaluates, and records everything in the manifest, written atomically after every
step of the plan. A rerun of the same command skips every completed step; a rerun with other
result-changing settings is refused with the settings that differ; ``--new-run`` moves the
old run aside and starts a new one (new run id, so no checkpoint of the old run is reused).
One driver at a time holds a run directory (:class:`~conure_dist.train.lock.RunLock`).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from conure_dist.config import ConfigError, ExperimentConfig
from conure_dist.eval.evaluate import main_metric
from conure_dist.model import ConureModel, OwnerMap, Weights
from conure_dist.train.capacity import check_capacity
from conure_dist.train.executor import RayExecutor, StageFailed  # noqa: F401  (re-exported)
from conure_dist.train.lock import LOCK_FILE, RunLock
from conure_dist.train.machine import RunState, StageMachine
from conure_dist.train.manifest import (AUTO_SETTINGS, RESUME_FREE_CLUSTER, Manifest, dataset_digest, format_diff, recorded,
                                        result_settings, settings_diff, settings_fingerprint)
from conure_dist.train.plan import Ledger, Step, get_method
from conure_dist.train.runner import build_model, fresh_weights
from conure_dist.train.rundir import FORMAT_VERSION, MANIFEST, RunDir, RunDirError, csv_text, damaged, digest, now


def _log(line: str) -> None:
    logging.getLogger("conure_dist").info(line)


@dataclass
class Run:
    exp: ExperimentConfig
    rundir: RunDir
    manifest: Manifest
    state: RunState
    floors: dict | None = None  # task -> (main metric, popularity / majority floor on test)


def _settings(exp: ExperimentConfig, engine: str) -> dict[str, Any]:
    from conure_dist.data.format import load_dataset_info

    return result_settings(exp, dataset_digest(load_dataset_info(exp.dataset).to_json()), engine)


def open_run(exp: ExperimentConfig, run_dir: str, *, new_run: bool = False, add_task: bool = False,
             engine: str = "ray") -> Run:
    """Create the run directory, or reopen it to resume; refuse one made with other settings
    or by the other engine (DeepSpeed workers and the in-process optimizer differ in numerics)."""
    rundir = RunDir(run_dir)
    exp = _resolve_auto(exp, rundir, new_run)
    names = [t.spec.name for t in exp.tasks]
    settings = _settings(exp, engine)
    prunes = get_method(exp.method).masking
    if prunes and (new_run or not rundir.exists(MANIFEST)):
        check_capacity(exp)  # before anything is moved or written
    if rundir.exists(MANIFEST) and new_run:
        into = f"replaced/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        # The prepared dataset of --demo / raw inputs stays: it does not depend on the run.
        moved = rundir.move_aside(into, keep=("data", "replaced", LOCK_FILE))
        _log(f"--new-run: the previous run in {rundir.uri} was moved to {rundir.path(into)} ({', '.join(moved)})")
    if rundir.exists(MANIFEST):
        data = _read_manifest(rundir)
        if data.get("format_version") != FORMAT_VERSION:
            raise RunDirError(f"{rundir.path(MANIFEST)}: format version {data.get('format_version')} is not "
                              f"{FORMAT_VERSION}; resume it with the version that made it, or pass --new-run")
        made_by = data.get("engine", "ray")
        if made_by != engine:
            raise RunDirError(f"{rundir.uri} was run by the {made_by} engine; resume it the same way "
                              f"({'without' if made_by == 'ray' else 'with'} --in-process), or pass --new-run")
        old = data["tasks"]
        if old != names and not (add_task and names[: len(old)] == old and len(names) > len(old)):
            raise RunDirError(
                f"{rundir.uri} was run with tasks {old}; got {names}. To extend a run with new tasks, keep the "
                "old ones first in the same order and pass --add-task."
            )
        diff = settings_diff(data["settings"], settings, old)
        if diff:
            raise RunDirError(
                f"{rundir.uri} holds a run made with other settings:\n{format_diff(diff)}\n"
                "Resume with the run's settings, use another --run-dir, or pass --new-run to start over there.")
        changed = {f"cluster.{k}": [data["config"]["cluster"].get(k), v] for k, v in exp.to_dict()["cluster"].items()
                   if k in RESUME_FREE_CLUSTER and data["config"]["cluster"].get(k) != v}
        if changed:
            _log("resuming with changed settings: " + ", ".join(f"{k} {o} -> {n}" for k, (o, n) in changed.items()))
        if len(names) > len(old) and rundir.exists(STATUS_REPORT):
            rundir.delete(STATUS_REPORT)  # it said complete; the run is not any more (rewritten before its next step)
        data.setdefault("resumes", []).append({"time": now(), "changed": changed, "added_tasks": names[len(old):]})
        data.update(tasks=names, config=exp.to_dict(), settings=settings, fingerprint=settings_fingerprint(settings))
        manifest = Manifest(rundir, data)
        sums = data.get("state_checksums", {})  # absent in manifests written before the checksums

        def read(rel: str) -> Weights:
            return rundir.read_state_tensors(rel, sums.get(rel))

        state = RunState(
            weights=read(data["state"]["weights"]),
            owners=OwnerMap.from_state_dict(read(data["state"]["owners"])),
            ledger=Ledger(names, data["ledger"]),
            accuracy=list(data["accuracy"]),
            sets={task: read(f) for task, f in data["state"].get("sets", {}).items()},
            before_prune=list(data.get("before_prune", [])),
        )
        if prunes:  # the tasks still to prune, from what the run's owner map leaves free
            check_capacity(exp, state.owners, {i + 1: n for i, n in enumerate(names)})
        state.weights = _with_new_heads(exp, state.weights)
        for path in [*rundir.remove_temporary(), *rundir.remove_temporary("state", recursive=True)]:
            _log(f"removed {path}: a write the previous driver did not finish")
        manifest.data["ledger"] = state.ledger.to_dict()
        manifest.save()
        return Run(exp, rundir, manifest, state)
    model = _model(exp, exp.seed)
    state = RunState(model.weights(), model.new_owner_map(), Ledger(names))
    manifest = Manifest(rundir, {
        "format_version": FORMAT_VERSION, "run_id": uuid.uuid4().hex[:12], "created": now(),
        "fingerprint": settings_fingerprint(settings), "settings": settings, "config": exp.to_dict(),
        "method": exp.method, "engine": engine, "tasks": names, "ledger": state.ledger.to_dict(), "stages": {}, "accuracy": [],
        "owner_map_version": 0, "state": {},
    })
    _save_state(manifest, state, "init")
    return Run(exp, rundir, manifest, state)


def _resolve_auto(exp: ExperimentConfig, rundir: RunDir, new_run: bool) -> ExperimentConfig:
    """Data-order settings left ``auto`` (:data:`~conure_dist.train.manifest.AUTO_SETTINGS`:
    ``cluster.reader``, ``cluster.train_shuffle``): what a resumed run was made with (for runs
    made before a setting existed, the value it had then), the current default for a new run."""
    auto = [key for key in AUTO_SETTINGS if getattr(exp.cluster, key) == "auto"]
    if not auto:
        return exp
    values = {key: AUTO_SETTINGS[key] for key in auto}
    if not new_run and rundir.exists(MANIFEST):
        settings = _read_manifest(rundir)["settings"]
        for key in auto:
            values[key] = recorded(settings, key)
            if values[key] != AUTO_SETTINGS[key]:
                _log(f"cluster.{key} auto: this run keeps the value it was made with ({values[key]})")
    return replace(exp, cluster=replace(exp.cluster, **values))


def _read_manifest(rundir: RunDir) -> dict[str, Any]:
    """The manifest, or a :func:`~conure_dist.train.rundir.damaged` error when it cannot be
    the one the coordinator wrote (it is always written whole, under a temporary name first)."""
    try:
        data = rundir.read_json(MANIFEST)
    except RunDirError as e:
        raise damaged(rundir.path(MANIFEST), f"not valid JSON: {e.__cause__ or e}") from None
    missing = [k for k in ("format_version", "tasks", "settings", "config", "ledger", "state") if k not in data] \
        if isinstance(data, dict) else ["(not a JSON object)"]
    if missing:
        raise damaged(rundir.path(MANIFEST), f"it lacks {', '.join(missing)}")
    return data


def _model(exp: ExperimentConfig, seed: int) -> ConureModel:
    return build_model(exp.model, [t.spec for t in exp.tasks], get_method(exp.method), seed)


def _with_new_heads(exp: ExperimentConfig, weights: Weights) -> Weights:
    """Weights of a resumed run plus freshly initialised heads (and patches) of tasks added since."""
    fresh = _model(exp, exp.seed + len(exp.tasks)).weights()
    added = {k: v for k, v in fresh.items() if ConureModel.head_task(k) or k.startswith("patches.")}
    return {**added, **weights}


def _save_state(manifest: Manifest, state: RunState, tag: str) -> None:
    """Write weights and owner map under new names, then point the manifest at them.

    The manifest records the digest of every state file it keeps (``state_checksums``: the
    current weights, every owner map version, each commit's weights, the per-task sets), taken
    from the bytes written, so :func:`open_run` can tell a file damaged since from a good one.
    """
    rundir, old = manifest.rundir, dict(manifest.data["state"])
    sums = dict(manifest.data.get("state_checksums", {}))
    version = manifest.data["owner_map_version"]
    owners_file = f"state/owners-v{version}.safetensors"
    if old.get("owners") != owners_file:
        sums[owners_file] = rundir.write_tensors(owners_file, state.owners.state_dict())
    weights_file = f"state/weights-{tag}.safetensors"
    sums[weights_file] = rundir.write_tensors(weights_file, state.weights)
    sets = dict(old.get("sets", {}))
    for task, weights in state.sets.items():  # a task's own weight set never changes once committed
        if task not in sets:
            sets[task] = f"state/set-{task}.safetensors"
            sums[sets[task]] = rundir.write_tensors(sets[task], weights)
    for rel in [owners_file, *sets.values()]:  # kept from a run written before the checksums
        if rel not in sums:
            sums[rel] = digest(rundir.read_bytes(rel))
    manifest.data["state"] = {"weights": weights_file, "owners": owners_file, **({"sets": sets} if sets else {})}
    manifest.data["ledger"] = state.ledger.to_dict()
    manifest.data["accuracy"] = state.accuracy
    manifest.data["before_prune"] = state.before_prune
    # Committed versions stay (each task can be served as of its commit); others are replaced.
    replaced = (old.get("weights") if old.get("weights") and old["weights"] != weights_file
                and not old["weights"].endswith("-commit.safetensors") else None)
    sums.pop(replaced, None)
    manifest.data["state_checksums"] = sums
    manifest.save()
    if replaced:
        rundir.delete(replaced)


SMOKE_REPORT = "reports/SMOKE_TEST.txt"


STATUS_REPORT = "reports/STATUS.txt"
ACCURACY_COLUMNS = ("after_task", "task", "metric", "value", "status")


def accuracy_rows(run: Run) -> list[dict[str, Any]]:
    """The accuracy matrix: every measured value (status ``measured``), then, for each task not
    committed yet, the cells its commit will fill (status ``pending``, no value), so the CSV of
    an unfinished run shows what is missing."""
    tasks = [t.spec.name for t in run.exp.tasks]
    rows = [{**r, "status": "measured"} for r in run.state.accuracy]
    for i, after in enumerate(tasks):
        if not run.state.ledger.committed(after):
            rows += [{"after_task": after, "task": task, "value": "", "status": "pending",
                      "metric": main_metric(run.exp.task(task).spec, run.exp.task(task).train.metric_k)}
                     for task in tasks[: i + 1]]
    return rows


def run_status(run: Run) -> str:
    """One line: whether every task is committed, and if not, which are and what to do."""
    tasks = [t.spec.name for t in run.exp.tasks]
    done = [t for t in tasks if run.state.ledger.committed(t)]
    if len(done) == len(tasks):
        return f"complete: all {len(tasks)} tasks committed ({', '.join(tasks)})"
    waiting = [t for t in tasks if t not in done]
    return (f"incomplete: {len(done)} of {len(tasks)} tasks committed ({', '.join(done) or 'none'}); "
            f"not yet: {', '.join(waiting)}. Rerun the same command to resume; the accuracy matrix marks the "
            "missing values 'pending'.")


def write_reports(run: Run) -> None:
    from conure_dist.data.format import load_dataset_info
    from conure_dist.eval.floors import floors

    state, names = run.state, {i + 1: t.spec.name for i, t in enumerate(run.exp.tasks)}
    run.rundir.write_text("reports/accuracy_matrix.csv", csv_text(accuracy_rows(run), ACCURACY_COLUMNS))
    run.rundir.write_text(STATUS_REPORT, run_status(run) + "\n")
    run.rundir.write_text("reports/capacity.txt", state.owners.capacity_table(names) + "\n")
    smoke = run.exp.smoke_settings()
    if smoke:
        run.rundir.write_text(SMOKE_REPORT, "This run was cut short by smoke-test settings; its metrics are not the "
                              "tasks' own and must not be compared with full runs:\n" + "".join(f"- {s}\n" for s in smoke))
    if run.floors is None:
        run.floors = floors(load_dataset_info(run.exp.dataset), run.exp.tasks)
    rows = [{"task": task, "metric": metric, "value": value} for task, (metric, value) in run.floors.items()]
    run.rundir.write_text("reports/floors.csv", csv_text(rows, ("task", "metric", "value")))


def check_method(name: str) -> None:
    """Refuse a method the Ray Train workers cannot run (before any cluster is started)."""
    if get_method(name).later == "joint":
        raise ConfigError(f"method: {name} trains two tasks' data in one stage, which only the in-process runs do "
                          "(--compare, --in-process); the Ray Train workers read one task's data per stage")


def run_experiment(exp: ExperimentConfig, run_dir: str, *, new_run: bool = False, add_task: bool = False,
                   fail_once_at_step: dict | None = None, config_yaml: str | None = None, in_process: bool = False,
                   kill_once_at_step: dict | None = None) -> Run:
    """Run (or resume) every pending step of the plan; returns the finished run. ``config_yaml``
    (the resolved run config) is written to RUN_DIR/config.yaml once the run is opened.
    ``in_process``: train with a torch optimizer in this process instead of Ray Train workers
    (debugging, small runs): the same manifest, state and reports, without Ray checkpoints or
    TensorBoard files. ``fail_once_at_step`` / ``kill_once_at_step`` (tests, Ray workers): stage
    key -> the step at which a worker raises / is killed by SIGKILL, once."""
    from conure_dist.logs import EventChannel, RunClock

    if not in_process:
        check_method(exp.method)
    with RunLock(RunDir(run_dir)):
        run = open_run(exp, run_dir, new_run=new_run, add_task=add_task, engine="in-process" if in_process else "ray")
        if config_yaml is not None:
            run.rundir.write_text("config.yaml", config_yaml)
        clock = RunClock(new_workers_per_fit=exp.cluster.worker_group == "stage")
        channel = None if in_process else EventChannel(clock)
        try:
            return _run_locked(run, clock, channel, {"fail_once_at_step": fail_once_at_step,
                                                     "kill_once_at_step": kill_once_at_step}, in_process)
        finally:
            if channel is not None:
                channel.close()


# Steps the workers run (commit: the evaluation of every committed task).
FIT_STEPS = (Step.TRAIN, Step.RETRAIN, Step.COMMIT)


def _remaining_examples(exp: ExperimentConfig, info, steps) -> int:
    """Epochs x train rows of the train/retrain steps in ``steps`` (for the run's ETA)."""
    total = 0
    for planned in steps:
        if planned.step in (Step.TRAIN, Step.RETRAIN):
            train = exp.task(planned.task).train
            epochs = train.epochs if planned.step is Step.TRAIN else train.retrain_epochs
            examples = epochs * info.task(planned.task).counts["train"]
            total += min(examples, train.max_steps * train.batch_size) if train.max_steps else examples
    return total


def _in_process_executor(exp: ExperimentConfig, info):
    from conure_dist.compare import load_task_data
    from conure_dist.train.runner import InProcessExecutor

    return InProcessExecutor(_model(exp, exp.seed), load_task_data(exp, info), seed=exp.seed)


def _run_locked(run: Run, clock, channel, faults: dict[str, dict | None], in_process: bool = False) -> Run:
    from conure_dist.data.format import load_dataset_info

    exp = run.exp
    if in_process:
        dataset = load_dataset_info(exp.dataset)
        executor = _in_process_executor(exp, dataset)
    else:
        executor = RayExecutor(exp, run.rundir, run.manifest, events=channel.queue, **faults)
        dataset = executor.info
    if in_process:
        return _run_plan(run, clock, executor, dataset, in_process)
    with executor:  # the workers stop at the end; after an error, the driver does not wait for them
        return _run_plan(run, clock, executor, dataset, in_process)


def _run_plan(run: Run, clock, executor, dataset, in_process: bool) -> Run:
    from conure_dist.logs import sync_driver_log

    exp = run.exp
    method = get_method(exp.method)
    machine = StageMachine(method, exp.tasks, executor,
                           init=lambda number: fresh_weights(exp.model, [t.spec for t in exp.tasks], method, exp.seed, number))
    pending = machine.pending(run.state)
    if pending and any(run.state.ledger.committed(t.spec.name) for t in exp.tasks):
        write_reports(run)  # e.g. extended by --add-task: its reports say it is incomplete from now on
    if not pending:
        _log(f"run {run.rundir.uri}: every stage is complete")
    else:
        _log(f"{len(pending)} steps to run: {' '.join(p.key for p in pending)}")
    for index, planned in enumerate(pending):
        started = time.time()
        if hasattr(executor, "eval_seconds"):
            executor.eval_seconds.clear()  # this step's evaluations only
        later = pending[index + 1:]
        clock.plan(_remaining_examples(exp, dataset, later),
                   sum(p.step is Step.COMMIT or machine.fits(p) for p in later))
        if planned.step in FIT_STEPS:
            clock.begin_fit()
        if machine.fits(planned):
            train = exp.task(planned.task).train
            epochs = train.epochs if planned.step is Step.TRAIN else train.retrain_epochs
            workers = exp.cluster.num_workers
            _log(f"{planned.key}  started: {epochs} epoch{'s' * (epochs != 1)}, batch {train.batch_size} "
                 + ("in process" if in_process else f"on {workers} worker{'s' * (workers != 1)}"))
        elif planned.step is Step.RETRAIN:
            _log(f"{planned.key}  skipped: 0 retrain epochs, the pruned weights stand")
        if in_process or not machine.fits(planned):  # the Ray executor records the stages it fits
            run.manifest.stage_started(planned.key)
        machine.execute(planned, run.state)
        if planned.step is Step.PRUNE:
            run.manifest.data["owner_map_version"] += 1
        elif planned.step in FIT_STEPS:
            clock.end_fit()
        _save_state(run.manifest, run.state, planned.key.replace("/", "-"))
        info: dict[str, Any] = {"seconds": round(time.time() - started, 2), "owner_map_version": run.manifest.data["owner_map_version"]}
        if planned.step is Step.PRUNE:
            cap = run.state.owners.capacity()
            info["capacity"] = {"owned": cap.fraction(machine.number(planned.task)), "free": cap.free_fraction}
        if planned.step is Step.COMMIT:
            spent = getattr(executor, "eval_seconds", None)
            if spent:  # the evaluations' own time in the workers (the rest of "seconds": getting there)
                info["eval_seconds"] = round(sum(spent), 2)
            info["metrics"] = {r["task"]: {r["metric"]: r["value"]} for r in run.state.accuracy if r["after_task"] == planned.task
                               and r["metric"] == main_metric(exp.task(r["task"]).spec, exp.task(r["task"]).train.metric_k)}
            write_reports(run)
            _log(f"{planned.key}  test: " + ", ".join(f"{t} {next(iter(m.items()))[0]} {next(iter(m.values())):.4f}" for t, m in info["metrics"].items()))
        elif planned.step is Step.PRUNE:
            _log(f"{planned.key}  {planned.task} keeps {info['capacity']['owned']:.1%} of the backbone, "
                 f"{info['capacity']['free']:.1%} stays free")
        else:
            _log(f"{planned.key}  done in {info['seconds']:.0f} s")
        run.manifest.step_done(planned.key, **info)
        sync_driver_log()
    write_reports(run)
    return run
