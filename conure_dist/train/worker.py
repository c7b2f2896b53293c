"""What each Ray Train worker runs: the session's commands (:mod:`conure_dist.train.session`),
each one train/retrain stage or the evaluation of tasks.

A stage command builds the model from the stage's input weights and owner map (written by the
coordinator), wraps it in DeepSpeed, and runs the same :func:`~conure_dist.train.loop.run_stage`
as the in-process runner, fed by its Ray Data shard. At each epoch end (and every N steps if
asked) every rank saves its DeepSpeed checkpoint and reports it to Ray Train; rank 0 adds the
stage progress and the best-on-validation weights. A restarted worker (Ray Train's
FailureConfig) or a rerun of the driver resumes from the stage's latest checkpoint (the
checkpoints of every stage of a session sit side by side; each name ends with its stage key).
Each rank records the digest of every file it wrote into a checkpoint (``checksums-rank<r>.json``); a resumed
stage checks them before loading anything: when the checkpoint is damaged (a truncated upload,
a disk error) it resumes from the newest intact earlier one, or starts again from its input
weights, instead of failing on it at every retry.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import zlib
from typing import Any

import torch
import torch.distributed as dist

from conure_dist import storage
from conure_dist.config import ExperimentConfig
from conure_dist.eval.evaluate import MetricSums, evaluate_sums, main_metric
from conure_dist.logs import hms, send
from conure_dist.model import ConureModel, OwnerMap, Stage
from conure_dist.train.engine import DeepSpeedStepper, EngineSettings, emulated_bf16_warning
from conure_dist.train.loop import StageProgress, run_stage
from conure_dist.train.losses import make_loss
from conure_dist.train.rundir import RunDir

PROGRESS_FILE, BEST_FILE, RESULT_FILE = "progress.json", "best.safetensors", "result.json"


def _setup(config: dict[str, Any]) -> tuple[ExperimentConfig, RunDir, torch.device, int, int]:
    import ray.train

    ctx = ray.train.get_context()
    exp = ExperimentConfig.from_dict(config["experiment"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    torch.manual_seed(exp.seed)
    device = torch.device("cuda", torch.cuda.current_device()) if exp.cluster.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    return exp, RunDir(config["run_dir"]), device, ctx.get_world_rank(), ctx.get_world_size()


def _build_model(exp: ExperimentConfig, rundir: RunDir, config: dict[str, Any]) -> tuple[ConureModel, OwnerMap | None]:
    from conure_dist.train.plan import get_method
    from conure_dist.train.runner import build_model

    model = build_model(exp.model, [t.spec for t in exp.tasks], get_method(exp.method), exp.seed)
    model.load_weights(rundir.read_tensors(config["input_weights"]))
    owners = OwnerMap.from_state_dict(rundir.read_tensors(config["input_owners"])) if config.get("input_owners") else None
    return model, owners


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started or since :func:`_reset_peak_memory`
    (Linux: ``VmHWM``; elsewhere ``ru_maxrss``, never reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_memory() -> None:
    """Start this process's peak memory afresh (a session worker runs stage after stage: each
    stage's peak is its own). Linux resets ``VmHWM`` on ``5`` written to ``clear_refs``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _milestone(timing: dict, name: str) -> None:
    """Resident memory now and the peak so far, at a named point of the stage (this rank's):
    how the peak builds up, next to the plan's components. The kernel's resident counters are
    approximate (per-CPU batches: its peak can read a few hundred KiB under an earlier reading),
    so the peak so far is never taken below the current figure or an earlier milestone's peak."""
    rss = rss_bytes()
    marks = timing.setdefault("memory_milestones", {})
    earlier = max((m["peak_rss_bytes"] for m in marks.values()), default=0)
    marks[name] = {"rss_bytes": rss, "peak_rss_bytes": max(rss, peak_rss_bytes(), earlier)}


def _peak_memory(device: torch.device) -> dict[str, list[int]]:
    """Every rank's peak resident memory (and peak GPU memory allocated, on GPUs), gathered."""
    mine = [peak_rss_bytes()] + ([torch.cuda.max_memory_allocated(device)] if device.type == "cuda" else [])
    t = torch.tensor(mine, dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized():
        gathered = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, t)
    else:
        gathered = [t]
    out = {"peak_rss_bytes": [int(g[0]) for g in gathered]}
    if device.type == "cuda":
        out["peak_gpu_bytes"] = [int(g[1]) for g in gathered]
    return out


def _allreduce_sums(sums: MetricSums, device: torch.device) -> MetricSums:
    t = sums.as_tensor().to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return sums.from_tensor(t.cpu())


def _log(line: str, events=None, level: str = "debug") -> None:
    """A worker's line: to its own stderr (Ray's worker logs) and, from rank 0, to the driver's
    log (console at ``info``, file only at ``debug``)."""
    print(line, file=sys.stderr, flush=True)
    send(events, {"kind": "line", "level": level, "text": line})


def session_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` of a session: runs the mailbox's commands in order
    until it says stop. Rank 0 answers each command once every rank has finished it."""
    import ray

    started = time.time()
    mailbox = config["mailbox"]
    rank = ray.train.get_context().get_world_rank()
    group = _broadcast(os.urandom(4).hex() if rank == 0 else None)  # this worker group, restarted or not
    if not _broadcast(ray.get(mailbox.hello.remote(group)) if rank == 0 else None):
        return  # groups keep failing before they reach a command: the driver reports it
    _settle_heap()
    if rank == 0:
        ready = started - config["session_started"]
        _log(f"session: {ray.train.get_context().get_world_size()} workers ready {ready:.1f}s after fit()", config.get("events"))
        if not ray.get(mailbox.restarted.remote()):  # a restarted group's time includes the failed one's
            send(config.get("events"), {"kind": "workers_ready", "seconds": max(0.0, ready)})
    while True:
        seq, command = _next_command(mailbox)
        if command["kind"] == "stop":  # the last command, never answered: every rank sees it
            return
        modules = len(sys.modules)
        try:
            if not _broadcast(ray.get(mailbox.begin.remote(seq, group)) if rank == 0 else None):
                continue  # its restarts were used up: the mailbox answered it with the workers' error
            shards = ray.get(mailbox.shards.remote(seq, group, rank))
            step = {**config, **command["config"], "shards": shards}
            _reset_peak_memory()
            result = (stage_command if command["kind"] == "train" else evaluate_command)(step)
            _barrier()  # every rank has finished the command (its checkpoint files written)
        except BaseException as e:
            ray.get(mailbox.failed.remote(seq, group, rank, f"{type(e).__name__}: {e}"))
            raise
        if rank == 0:
            ray.get(mailbox.done.remote(seq, result))
        _barrier()  # every rank asks for the next command only after this one is answered
        del shards, step, result
        gc.collect()  # the stage's model and data, before the next command builds its own
        if len(sys.modules) > modules:
            # What the command imported is frozen too (see _settle_heap): the first stage imports
            # torch's compiler stack (torch's optimizers do, on first use), TensorBoard and more,
            # some 130K objects that each later collection would walk again (0.14-0.35 s). The
            # command's own objects are gone by now (collected above); what else is alive here
            # is the process's (modules, Ray's and DeepSpeed's globals) and is frozen with them.
            gc.freeze()


def _settle_heap() -> None:
    """Take what is alive now (the modules of torch, Ray and DeepSpeed: some 300K objects) out
    of the garbage collector's view (``gc.freeze``). A full collection otherwise walks them all,
    0.3-0.6 s on a small machine: after every command (below) and whenever Python runs one
    during training. Collections still find the commands' own garbage."""
    try:  # imported by the first stage otherwise: its modules are frozen too
        from conure_dist.train.engine import prepare_deepspeed_import

        prepare_deepspeed_import()
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001  (the first stage imports it again, and reports its error to the driver)
        pass
    gc.collect()
    gc.freeze()


def _next_command(mailbox, wait_s: float = 10.0) -> tuple[int, dict[str, Any]]:
    import ray

    while True:
        found = ray.get(mailbox.wait_next.remote(wait_s))  # answered as soon as there is one
        if found is not None:
            return found


def _broadcast(value):
    """Rank 0's ``value`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def stage_command(config: dict[str, Any]) -> dict[str, Any]:
    """One train/retrain stage; returns the name of its final checkpoint (the stage's result:
    best weights, progress and timings)."""
    import ray.train
    from safetensors.torch import load_file

    from conure_dist.data.pipeline import epoch_batches, iter_torch_batches

    entered = time.time()
    exp, rundir, device, rank, world = _setup(config)
    key = config["key"]
    plan = exp.task(config["task"])
    spec, train = plan.spec, plan.train
    stage = Stage(config["stage"])
    epochs = train.epochs if stage is Stage.TRAIN else train.retrain_epochs
    events = config.get("events") if rank == 0 else None
    timing = {"fit_started": config["fit_started"], "first_step": None, "last_step": None}
    model, owners = _build_model(exp, rundir, config)
    model.set_view(owners, spec.name, stage, config.get("scope", "all"))
    model.to(device)
    _milestone(timing, "model")
    micro_batch = max(1, math.ceil(train.batch_size / world))
    stepper = DeepSpeedStepper(model, train, EngineSettings(exp.cluster.zero_stage, exp.cluster.resolved_precision, micro_batch),
                               exp.deepspeed)
    _milestone(timing, "engine")

    warning = emulated_bf16_warning(exp.cluster.resolved_precision, device)
    if rank == 0 and warning:
        _log(f"{spec.name}/{stage.value}  {warning}", events, "info")
    if rank == 0:
        _log(f"[{spec.name}/{stage.value}] {world} workers began {entered - config['fit_started']:.1f}s after the stage "
             f"was asked for; model and DeepSpeed engine ready in {time.time() - entered:.1f}s", events)
    progress, best, finished_before = StageProgress(world_size=world), None, False
    with contextlib.ExitStack() as held:
        # Checked before anything of it is loaded: a damaged checkpoint leaves the model as
        # built. The intact one stays where it was checked (downloaded once, from object storage).
        checkpoint, d, damaged = _intact_checkpoint(_own_checkpoint(ray.train.get_checkpoint(), key), rank, device,
                                                    held)
        if rank == 0 and damaged:
            for path, why in damaged:
                _log(f"{spec.name}/{stage.value}  the checkpoint {path} is damaged ({why})", events, "info")
            _log(f"{spec.name}/{stage.value}  " + (f"resuming from the earlier checkpoint {checkpoint.path}" if checkpoint
                                                  else "no intact checkpoint: the stage starts again from its input weights"),
                 events, "info")
        if damaged and checkpoint is None:
            progress.resumed_at.append(0)
        if checkpoint is not None:
            saved = StageProgress.from_dict(json.loads(open(os.path.join(d, PROGRESS_FILE)).read()))
            finished_before = os.path.exists(os.path.join(d, RESULT_FILE))
            if finished_before:
                progress = saved  # the result is that checkpoint: nothing to load
            elif saved.world_size == world:
                stepper.load(d)
                progress = saved
                progress.resumed_at.append(progress.step)  # in the stage's record: the steps a failure cost
                if os.path.exists(os.path.join(d, BEST_FILE)):
                    best = load_file(os.path.join(d, BEST_FILE))
            if rank == 0 and progress is saved:
                _log(f"{spec.name}/{stage.value}  resumed at epoch {progress.epoch}, step {progress.step}", events, "info")
            elif rank == 0:
                # Each rank's data order and optimizer shards belong to the world size they were
                # made with: a stage interrupted with another number of workers starts over.
                _log(f"[{spec.name}/{stage.value}] the checkpoint was taken with {saved.world_size} workers, this "
                     f"fit has {world}: the stage starts again from its input weights", events, "info")

    popularity = None
    if config.get("popularity"):
        popularity = rundir.read_tensors(config["popularity"])["counts"].numpy()
    loss_fn = make_loss(spec, train, exp.model.num_items, popularity)
    with_label = spec.kind != "sequence"
    train_shard, val_shard = config["shards"]["train"], config["shards"]["validation"]
    steps_per_epoch = max(1, math.ceil(config["train_rows"] / (micro_batch * world)))
    tb = _tensorboard(config, rank)
    window = {"t": time.perf_counter(), "step": progress.step, "loss": 0.0, "n": 0}
    # A failure injected by tests, once, at this optimizer step, in rank 0: an exception, or
    # the process killed by SIGKILL (no exception, no cleanup: what the OOM killer does).
    fail_at = config.get("fail_once_at_step")
    kill_at = config.get("kill_once_at_step")
    fail_marker = config.get("fail_marker")
    # Names this attempt's checkpoints: the time the stage was asked for, and the steps resumed
    # at since (a restart that fell back to an earlier checkpoint must not reuse a name Ray
    # Train still keeps for a damaged one).
    attempt = f"a{int(config['fit_started'] * 1000) % 10**10}" + "".join(f"r{s}" for s in progress.resumed_at)

    stage_seed = exp.seed * 7919 + hash_task(spec.name, stage)

    def batches(epoch: int):
        return epoch_batches(train_shard, epoch=epoch, rank=rank, seed=stage_seed,
                             shuffle_rows=exp.shuffle_buffer_rows, batch_size=micro_batch, seq_len=exp.seq_len,
                             with_label=with_label)

    def validate():
        sums = evaluate_sums(model, spec, iter_torch_batches(val_shard, batch_size=micro_batch * 4, seq_len=exp.seq_len,
                                                               with_label=with_label), train.metric_k, device)
        return _allreduce_sums(sums, device).result()

    def on_step(p: StageProgress, loss: float) -> None:
        now = time.time()
        if timing["first_step"] is None:
            _milestone(timing, "first_step")
        timing["first_step"] = timing["first_step"] or now
        timing["last_step"] = now
        window["loss"] += loss
        window["n"] += 1
        if fail_at is not None and p.step == fail_at and rank == 0 and not os.path.exists(fail_marker):
            open(fail_marker, "w").close()
            raise RuntimeError(f"injected failure at step {p.step}")
        if kill_at is not None and p.step == kill_at and rank == 0 and not os.path.exists(fail_marker):
            open(fail_marker, "w").close()
            _log(f"[{spec.name}/{stage.value}] killing this worker (SIGKILL) at step {p.step}, as asked", events, "info")
            os.kill(os.getpid(), signal.SIGKILL)
        if p.step % exp.cluster.log_every_steps == 0:
            _progress_line(spec.name, stage, p, window, steps_per_epoch, epochs, micro_batch * world, rank, tb, events,
                           train.max_steps)
        last_step = bool(train.max_steps) and p.step >= train.max_steps  # the epoch end follows at once
        if exp.cluster.checkpoint_every_steps and p.step % exp.cluster.checkpoint_every_steps == 0 and not last_step:
            _report(stepper, p, best_box["w"], rank, {"step": p.step}, attempt, key)

    best_box = {"w": best}

    def on_epoch_end(p: StageProgress, best_weights, improved: bool) -> None:
        best_box["w"] = best_weights
        last = p.history[-1]
        if rank == 0:
            vals = " ".join(f"{k[4:]}={v:.4f}" for k, v in last.items() if k.startswith("val_") and k != "val_count")
            print(f"[{spec.name}/{stage.value}] epoch {p.epoch}/{epochs} loss {last['loss']:.4f} "
                  f"{last['examples_per_s']:.0f} ex/s {last['seconds']:.1f}s (waiting for data "
                  f"{last['data_wait_s']:.1f}s of {last['train_s']:.1f}s of steps) {vals}{' (best)' if improved else ''}",
                  file=sys.stderr, flush=True)
            metric = main_metric(spec, train.metric_k)
            send(events, {"kind": "epoch", "task": spec.name, "stage": stage.value, "epoch": p.epoch, "epochs": epochs,
                          "loss": last["loss"], "metric": metric, "value": last.get(f"val_{metric}", float("nan")),
                          "improved": improved, "examples_per_s": last["examples_per_s"], "seconds": last["seconds"],
                          "last": p.finished(epochs), "train_s": last["train_s"], "data_wait_s": last["data_wait_s"]})
            if tb is not None:
                for k, v in last.items():
                    if k != "epoch":
                        tb.add_scalar(f"epoch/{k}", v, p.epoch)
                tb.flush()
        metrics = {"epoch": p.epoch, **{k: v for k, v in last.items()}}
        if p.finished(epochs):
            # The final checkpoint follows at once and holds the same state: no second copy of
            # it (at TTL size each is ~6 GB). A failure in between resumes from the previous one.
            import ray.train

            ray.train.report(metrics)
        else:
            _report(stepper, p, best_weights, rank, metrics, attempt, key)

    if finished_before:  # the stage had finished before the driver stopped: its last checkpoint is the result
        stepper.close()
        return {"checkpoint": _checkpoint_name(checkpoint)}
    if not progress.finished(epochs):
        progress, best = run_stage(
            model=model, stepper=stepper, loss_fn=loss_fn, train_batches=batches, validate=validate,
            metric=main_metric(spec, train.metric_k), epochs=epochs, patience=train.patience,
            max_steps=train.max_steps, l2=train.l2,
            l2_scope=train.l2_scope, seed=stage_seed + rank, device=device,
            progress=progress, best=best, snapshot=stepper.fp32_weights, on_step=on_step, on_epoch_end=on_epoch_end,
            name=f"task {spec.name}, {stage.value} stage",
        )
    if best is None:
        best = stepper.fp32_weights()
    _milestone(timing, "stage_end")
    timing.update(_peak_memory(device))
    # The final checkpoint is also the stage's result: best weights, progress and timings.
    final = _report(stepper, progress, best, rank, {"done": 1, "epoch": progress.epoch}, attempt, key,
                    extra={RESULT_FILE: {"progress": progress.to_dict(), "timing": timing}}, name="final")
    if tb is not None:
        tb.close()
    stepper.close()  # the next command builds its own engine in this process
    return {"checkpoint": final}


CHECKSUMS_FILE = "checksums-rank{rank}.json"  # each rank's files in a checkpoint, and their digests


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return _stream_digest(f)


def _stream_digest(source, copy=None) -> str:
    """Digest of what ``source`` (a binary stream) holds, read in 8 MiB pieces, each also
    written to ``copy`` if given."""
    import hashlib

    h = hashlib.sha256()
    while chunk := source.read(8 << 20):
        h.update(chunk)
        if copy is not None:
            copy.write(chunk)
    return "sha256:" + h.hexdigest()


def _has_checksums(names) -> bool:
    """Whether a checkpoint directory holding ``names`` has any rank's checksums (one written
    before the checksums has none)."""
    return any(n.startswith("checksums-rank") for n in names)


def _write_checksums(d: str, rank: int) -> None:
    """Record the digest of every file this rank wrote into checkpoint directory ``d``."""
    sums = {}
    for root, _, files in os.walk(d):
        for name in files:
            path = os.path.join(root, name)
            sums[os.path.relpath(path, d)] = _file_digest(path)
    with open(os.path.join(d, CHECKSUMS_FILE.format(rank=rank)), "w") as f:
        json.dump(sums, f)


def _checkpoint_damage(d: str, rank: int, device: torch.device) -> str:
    """Why the checkpoint in ``d`` cannot be resumed from ("" if it can), the same answer on
    every rank: each checks the files it wrote (and everyone the progress file) before any of
    it is loaded, then the ranks agree. A checkpoint written before the checksums is checked
    for its progress file only."""
    problem, saved_world = "", 0
    try:
        saved_world = int(json.loads(open(os.path.join(d, PROGRESS_FILE)).read()).get("world_size", 0))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        problem = f"{PROGRESS_FILE}: {e}"
    own = os.path.join(d, CHECKSUMS_FILE.format(rank=rank))
    with_checksums = _has_checksums(os.listdir(d))
    # Every rank that wrote the checkpoint left its checksums (a rank beyond those, when there
    # are more workers now, has no files of its own there); a checkpoint from before the
    # checksums has none at all.
    if not problem and with_checksums and rank < saved_world:
        try:
            sums = json.loads(open(own).read())
        except (OSError, ValueError) as e:
            problem = f"{os.path.basename(own)}: {e}"
            sums = {}
        for rel, expected in sorted(sums.items()):
            path = os.path.join(d, rel)
            if not os.path.exists(path):
                problem = f"{rel} is missing"
            elif _file_digest(path) != expected:
                problem = f"{rel} ({os.path.getsize(path)} bytes) does not match the checksum recorded when it was written"
            if problem:
                break
    flag = torch.tensor([1 if problem else 0], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag)
    if int(flag.item()) and not problem:
        problem = f"{int(flag.item())} other rank(s) found files of theirs damaged"
    return problem


class ResultDamaged(RuntimeError):
    """A stage's final checkpoint does not hold what its rank 0 wrote there."""


def read_stage_result(location: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The best weights and the result (progress, timings) of the stage whose final checkpoint
    is at ``location`` (a local path or a URI), checked against the digests rank 0 recorded
    (a checkpoint written before the checksums, which has none, is read unchecked, as the
    workers resume from one). Only those files are read, not every rank's DeepSpeed state
    beside them (~6 GB at TTL size, all of it downloaded to read them before)."""
    import pyarrow.fs as pafs
    from safetensors.torch import load_file

    sums_file = storage.join(location, CHECKSUMS_FILE.format(rank=0))
    try:
        sums = json.loads(storage.read_bytes(sums_file))
    except FileNotFoundError:
        fs, inner = storage.filesystem(location)
        names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))]
        if _has_checksums(names):
            raise ResultDamaged(f"{sums_file}: not found") from None
        sums = None
    except ValueError as e:
        raise ResultDamaged(f"{sums_file}: not valid JSON ({e})") from None
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="conure-result-") as tmp:
        for name in (BEST_FILE, RESULT_FILE):
            path = storage.join(location, name)
            if sums is not None and name not in sums:
                raise ResultDamaged(f"{path}: rank 0 recorded no checksum for it")
            local, found = _fetch(path, tmp)
            if sums is not None and found != sums[name]:
                raise ResultDamaged(f"{path} does not match the checksum recorded when it was written")
            out[name] = load_file(local) if name == BEST_FILE else json.loads(open(local, "rb").read())
    return out[BEST_FILE], out[RESULT_FILE]


def _fetch(path: str, tmp: str) -> tuple[str, str]:
    """A local file with the bytes of ``path`` (itself when local, a download into ``tmp`` when a
    URI) and their digest; ResultDamaged naming ``path`` if it cannot be read."""
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(path)
    try:
        if fs.get_file_info(inner).type != pafs.FileType.File:
            raise ResultDamaged(f"{path}: not found")
        if not storage.is_uri(path):
            return inner, _file_digest(inner)  # then loaded from the same file (in the page cache)
        local = os.path.join(tmp, os.path.basename(inner))
        with fs.open_input_stream(inner) as source, open(local, "wb") as copy:
            return local, _stream_digest(source, copy)
    except OSError as e:
        raise ResultDamaged(f"{path}: {e}") from None


def _checkpoint_step(name: str) -> int | None:
    """The step in a checkpoint directory's name (``step-000000006-e0-a...``, ``final-...``)."""
    head, _, rest = name.partition("-")
    number = rest.split("-", 1)[0]
    return int(number) if head in ("step", "final") and number.isdigit() else None


def _checkpoint_name(checkpoint) -> str:
    """A Ray Train checkpoint's directory name (``step-000000006-e0-a1-click-train``)."""
    return checkpoint.path.rstrip("/").rsplit("/", 1)[-1]


def _checkpoint_key(name: str) -> str:
    """The stage key a checkpoint directory's name ends with (``step-000000006-e0-a1-click-train``:
    ``click-train``; task names have no ``-``), "" for another name."""
    parts = name.split("-")
    return "-".join(parts[4:]) if len(parts) >= 6 and _checkpoint_step(name) is not None else ""


def _own_checkpoint(latest, key: str):
    """``latest`` if it is a checkpoint of stage ``key``: a session's latest checkpoint can be
    another stage's (the stage before this one, or none of this stage yet)."""
    if latest is None or _checkpoint_key(_checkpoint_name(latest)) != key:
        return None
    return latest


def _stage_checkpoints(latest):
    """``latest``, then the stage's other checkpoints (Ray Train keeps the last two) taken at the
    same or an earlier step, newest first; every rank lists them in the same order."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    yield latest
    parent, name = latest.path.rstrip("/").rsplit("/", 1)
    step = _checkpoint_step(name)
    if step is None:
        return
    infos = latest.filesystem.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    steps = {i.base_name: _checkpoint_step(i.base_name) for i in infos
             if i.type == pafs.FileType.Directory and i.base_name != name}
    others = [n for n, s in steps.items() if s is not None and s <= step and _checkpoint_key(n) == _checkpoint_key(name)]
    for other in sorted(others, key=lambda n: (steps[n], n), reverse=True):
        yield Checkpoint(path=f"{parent}/{other}", filesystem=latest.filesystem)


def _intact_checkpoint(latest, rank: int, device: torch.device, held: contextlib.ExitStack):
    """The checkpoint to resume from and the local directory that holds it, open until ``held``
    closes: the latest one, or when it is damaged the newest intact earlier one of the stage
    ((None, None): none is intact, or there is none). Also returns the damaged ones passed over,
    as (path, why). A checkpoint on object storage is downloaded once, to be checked and then
    loaded from the same directory; a damaged one's download is released at once."""
    damaged: list[tuple[str, str]] = []
    if latest is None:
        return None, None, damaged
    for candidate in _stage_checkpoints(latest):
        with contextlib.ExitStack() as this:
            d = this.enter_context(candidate.as_directory())
            problem = _checkpoint_damage(d, rank, device)
            if not problem:
                held.enter_context(this.pop_all())
                return candidate, d, damaged
        damaged.append((candidate.path, problem))
    return None, None, damaged


def hash_task(name: str, stage: Stage) -> int:
    return zlib.crc32(f"{name}/{stage.value}".encode()) % 100_003


def _report(stepper: DeepSpeedStepper, p: StageProgress, best, rank: int, metrics: dict, attempt: str, key: str,
            extra: dict[str, Any] | None = None, name: str = "step") -> str:
    """Checkpoint every rank's DeepSpeed state (rank 0 adds progress and best weights) and report;
    returns the checkpoint's directory name.

    ``attempt`` (the same on every rank) keeps the names of a restarted stage's checkpoints
    apart from those of an earlier attempt at the same step; ``key`` (the stage's) ends it."""
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        stepper.save(d)
        if rank == 0:
            files = {PROGRESS_FILE: p.to_dict(), **(extra or {})}
            for filename, obj in files.items():
                with open(os.path.join(d, filename), "w") as f:
                    json.dump(obj, f)
            if best is not None:
                save_file({k: v.contiguous() for k, v in best.items()}, os.path.join(d, BEST_FILE))
        _write_checksums(d, rank)
        dirname = f"{name}-{p.step:09d}-e{p.epoch}-{attempt}-{key}"
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=dirname)
    return dirname


class _TensorBoard:
    """Rank 0's event files: written locally, uploaded after each epoch and at the end when the
    run directory is on object storage."""

    def __init__(self, target: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.target = target
        self.remote = storage.is_uri(target)
        self.local = tempfile.mkdtemp(prefix="conure-tb-") if self.remote else target
        self.writer = SummaryWriter(self.local)

    def add_scalar(self, *args) -> None:
        self.writer.add_scalar(*args)

    def flush(self) -> None:
        self.writer.flush()
        if self.remote:
            storage.upload_tree(self.local, self.target)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def _tensorboard(config: dict[str, Any], rank: int):
    if rank != 0 or not config.get("tensorboard_dir"):
        return None
    return _TensorBoard(config["tensorboard_dir"])


def _progress_line(task, stage, p, window, steps_per_epoch, epochs, global_batch, rank, tb, events,
                   max_steps: int = 0) -> None:
    if rank != 0 or window["n"] == 0:
        return
    now = time.perf_counter()
    rate = (p.step - window["step"]) / max(now - window["t"], 1e-9)
    loss = window["loss"] / window["n"]
    remaining = max(0, (min(epochs * steps_per_epoch, max_steps) if max_steps else epochs * steps_per_epoch) - p.step)
    eta = hms(remaining / rate) if rate > 0 else "?"
    _log(f"[{task}/{stage.value}] step {p.step} (epoch {p.epoch + 1}/{epochs}) loss {loss:.4f} "
         f"{rate:.2f} steps/s {rate * global_batch:.0f} ex/s ETA {eta} (at most)", events)
    if tb is not None:
        tb.add_scalar("step/loss", loss, p.step)
        tb.add_scalar("step/steps_per_s", rate, p.step)
        tb.add_scalar("step/examples_per_s", rate * global_batch, p.step)
    window.update(t=now, step=p.step, loss=0.0, n=0)


def evaluate_command(config: dict[str, Any]) -> dict[str, Any]:
    """Test metrics of the committed tasks ``eval_tasks`` (every rank returns the same), and the
    seconds the command took in the worker."""
    from conure_dist.data.pipeline import iter_torch_batches

    started = time.perf_counter()
    exp, rundir, device, _, _ = _setup(config)
    model, owners = _build_model(exp, rundir, config)
    model.to(device)
    results = {}
    for name in config["eval_tasks"]:
        plan = exp.task(name)
        model.set_view(owners, name, Stage(config.get("view", Stage.SERVE.value)))
        shard = config["shards"][f"test_{name}"]
        batches = iter_torch_batches(shard, batch_size=plan.train.batch_size * 4, seq_len=exp.seq_len,
                                     with_label=plan.spec.kind != "sequence")
        results[name] = _allreduce_sums(evaluate_sums(model, plan.spec, batches, plan.train.metric_k, device), device).result()
    return {"metrics": results, "seconds": time.perf_counter() - started}
