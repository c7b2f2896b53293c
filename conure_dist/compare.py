"""The paper's comparison (section 5) on one prepared dataset: every method, the ablations, a report.

    python jobs/movielens.py --compare --data PREPARED --out DIR [--seeds 3]

Each method is a plan of :mod:`conure_dist.train.plan`, run by the same
:class:`~conure_dist.train.machine.StageMachine` (merge rules, frozen guard, pruning, per-task
weight sets) as the distributed trainer, on the in-process engine: a torch optimizer over
batches read with pyarrow instead of DeepSpeed workers fed by Ray Data. The Ray Train start-up
of each stage would otherwise dominate a comparison of dozens of small stages on one machine;
``--check-ray`` produces the Conure row once more through Ray Train + DeepSpeed.

What is shared, and why it is fair: T1's train stage is the same computation for every method
built on the same network (same initialisation, data order and steps), so it runs once per seed
and every method goes on from its result, as the paper's Table 2 shows one T1 value for them.
Hyperparameters are the run config's, shared by all methods as in the paper; ``--tune`` first
chooses each later task's learning rate (and an item task's negative sampler) by FineAll's
validation metric, with the test splits withheld from the tuning runs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from conure_dist.config import ExperimentConfig, TaskPlan
from conure_dist.eval.evaluate import main_metric
from conure_dist.model import Weights
from conure_dist.train.machine import RunState
from conure_dist.train.plan import Ledger, PlannedStep, get_method
from conure_dist.train.runner import TaskData, build_model, concat_batches, run_in_process

log = logging.getLogger("conure_dist")

# Rows of Table 2, in the paper's order (Pop first: the floor every method must clear).
TABLE2_METHODS = ("dnn", "sinmo", "sinmoall", "finesmax", "fineall", "peterrec", "mtl", "conure")
PRUNE_SWEEP = (0.5, 0.8, 0.95)  # Figure 6
EMBEDDING_RATIOS = (0.3, 0.8, 0.8)  # Table 5: embedding prune ratios of T1, T2, T3
# The tuning grid of later tasks: learning rate x the item tasks' negative sampler (LambdaFM's rho:
# 0.3, the paper's, draws mostly popular items as negatives; 1000 draws them almost uniformly).
TUNE_GRID = tuple((lr, rho) for lr in (1e-3, 1e-4) for rho in (0.3, 1000.0))


@dataclass
class Outcome:
    """One run of one method (or ablation variant) at one seed."""

    variant: str  # e.g. "conure", "fineall", "conure_no_t2", "order2", "prune_0.5", "transformer_conure"
    method: str
    seed: int
    tasks: list[str]
    accuracy: list[dict]  # the accuracy matrix: after_task, task, metric, value (test)
    before_prune: list[dict] = field(default_factory=list)  # Conure-: task, metric, value (test)
    capacity: dict[str, float] = field(default_factory=dict)  # task -> share of the backbone owned; "free"
    histories: dict[str, list[dict]] = field(default_factory=dict)  # "task/stage" -> per-epoch history
    best_validation: dict[str, float] = field(default_factory=dict)  # "task/stage" -> best validation metric
    backbones: int = 1
    serving_bytes: int = 0
    seconds: float = 0.0

    def final(self, task: str, metric: str) -> float | None:
        """Test value of ``task`` after the last task was committed (what serving sees at the end)."""
        last = self.tasks[-1]
        for r in self.accuracy:
            if r["after_task"] == last and r["task"] == task and r["metric"] == metric:
                return float(r["value"])
        return None

    def at_commit(self, task: str, metric: str) -> float | None:
        for r in self.accuracy:
            if r["after_task"] == task and r["task"] == task and r["metric"] == metric:
                return float(r["value"])
        return None

    def before(self, task: str, metric: str) -> float | None:
        for r in self.before_prune:
            if r["task"] == task and r["metric"] == metric:
                return float(r["value"])
        return None


# -- data ---------------------------------------------------------------------------------------

def load_task_data(exp: ExperimentConfig, info) -> dict[str, TaskData]:
    """Every split of every task of ``exp``, in memory, in each task's batch size."""
    from conure_dist.data.pipeline import load_split_batches

    data = {}
    for plan in exp.tasks:
        name, size = plan.spec.name, plan.train.batch_size
        splits = {s: load_split_batches(info, name, s, size, exp.seq_len, 0 if s == "train" else exp.max_eval_rows)
                  for s in ("train", "validation", "test")}
        popularity = info.popularity(name) if plan.spec.kind != "class" else None
        data[name] = TaskData(splits["train"], splits["validation"], splits["test"], popularity)
    return data


def resplit(data: TaskData, train_share: float, seed: int, batch_size: int) -> TaskData:
    """The task's train and test rows pooled and split again, ``train_share`` for training
    (paper Table 3's 20/80 split); validation unchanged; popularity counted on the new train split."""
    rows = concat_batches([*data.train, *data.test])
    n = int(next(iter(rows.values())).shape[0])
    order = torch.from_numpy(np.random.Generator(np.random.PCG64(seed)).permutation(n))
    cut = max(1, int(round(n * train_share)))

    def batches(idx: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        return [{k: v[part] for k, v in rows.items()} for part in idx.split(batch_size)]

    return TaskData(batches(order[:cut]), data.validation, batches(order[cut:]), None)


# -- experiment variants --------------------------------------------------------------------------

def with_seed(exp: ExperimentConfig, seed: int) -> ExperimentConfig:
    return replace(exp, seed=seed, tasks=tuple(replace(p, train=replace(p.train, seed=seed)) for p in exp.tasks))


def with_train(exp: ExperimentConfig, settings: dict[str, dict[str, Any]]) -> ExperimentConfig:
    """``exp`` with train settings replaced per task (task -> {field: value})."""
    return replace(exp, tasks=tuple(replace(p, train=replace(p.train, **settings[p.spec.name])) if p.spec.name in settings else p
                                    for p in exp.tasks))


def pick(exp: ExperimentConfig, names: Sequence[str]) -> list[TaskPlan]:
    return [exp.task(n) for n in names]


def footprint(method_name: str, state: RunState) -> tuple[int, int]:
    """(#B, bytes) a method must keep to serve every task: backbones, heads, patches, owner map."""
    method = get_method(method_name)

    def size(weights: Weights, keep: Callable[[str], bool]) -> int:
        return sum(t.numel() * t.element_size() for k, t in weights.items() if keep(k))

    if method.backbones == "per_task":
        total = sum(size(w, lambda k, t=task: k.startswith("backbone.") or k.startswith(f"heads.{t}."))
                    for task, w in state.sets.items())
        return len(state.sets), total
    total = size(state.weights, lambda k: True)
    if method.masking:
        total += size(state.owners.state_dict(), lambda k: True)
    return 1, total


class Comparison:
    """Runs the methods and ablations of one dataset; collects :class:`Outcome` s."""

    def __init__(self, exp: ExperimentConfig, data: dict[str, TaskData], *, device: str = "cpu"):
        self.exp, self.data, self.device = exp, data, device
        self.outcomes: list[Outcome] = []
        self.tuning: list[dict] = []

    # one run ---------------------------------------------------------------------------------
    def run(self, variant: str, method: str, exp: ExperimentConfig, plans: Sequence[TaskPlan], *,
            data: dict[str, TaskData] | None = None, start: RunState | None = None,
            capture: dict[str, RunState] | None = None, keep: bool = True) -> Outcome:
        """Run ``method`` over ``plans``, from ``start`` (a state whose ledger says what is done)
        or from scratch; ``capture`` receives a copy of the state after each step named in it."""
        data = data or self.data
        specs = [p.spec for p in plans]
        chosen = get_method(method)
        model = build_model(exp.model, specs, chosen, exp.seed)
        if start is not None:
            fresh = model.weights()
            start = RunState({**fresh, **{k: v for k, v in start.weights.items() if k in fresh}},
                             start.owners if chosen.masking and start.owners.names == model.new_owner_map().names
                             else model.new_owner_map(),
                             Ledger([s.name for s in specs], {k: v for k, v in start.ledger.to_dict().items()
                                                               if k in {s.name for s in specs}}),
                             sets=dict(start.sets))

        def on_step(planned: PlannedStep, state: RunState) -> None:
            if capture is not None and planned.key in capture:
                capture[planned.key] = RunState(dict(state.weights), state.owners, Ledger(state.ledger.tasks, state.ledger.to_dict()),
                                                list(state.accuracy), dict(state.sets), list(state.before_prune))

        started = time.time()
        result = run_in_process(exp.model, plans, data, method=method, seed=exp.seed, device=self.device, model=model,
                                state=start, on_step_done=on_step, measure_before_prune=chosen.masking)
        state = result.state
        names = {i + 1: s.name for i, s in enumerate(specs)}
        cap = state.owners.capacity() if chosen.masking else None
        backbones, nbytes = footprint(method, state)
        outcome = Outcome(
            variant=variant, method=method, seed=exp.seed, tasks=[s.name for s in specs], accuracy=list(state.accuracy),
            before_prune=list(state.before_prune),
            capacity=({names[i]: cap.fraction(i) for i in names} | {"free": cap.free_fraction}) if cap else {},
            histories={k: list(p.history) for k, p in result.executor.progress.items()},
            best_validation={k: p.best_metric for k, p in result.executor.progress.items() if p.best_metric is not None},
            backbones=backbones, serving_bytes=nbytes, seconds=round(time.time() - started, 1),
        )
        if keep:
            log.info(f"  {variant} (seed {exp.seed}): {outcome.seconds:.0f} s; test " + ", ".join(
                f"{t} {v:.4f}" for t in outcome.tasks
                if (v := outcome.final(t, main_metric(exp.task(t).spec, exp.task(t).train.metric_k))) is not None))
            self.outcomes.append(outcome)
        else:  # a tuning trial: only its validation values are shown
            log.info(f"  {variant} (seed {exp.seed}): {outcome.seconds:.0f} s; best validation " + ", ".join(
                f"{k} {v:.4f}" for k, v in outcome.best_validation.items()))
        return outcome

    # the paper's tables ---------------------------------------------------------------------------
    def tune(self, seed: int, grid: Sequence[tuple[float, float]] = TUNE_GRID) -> dict[str, dict[str, float]]:
        """Each later task's learning rate (and an item task's negative sampler), chosen on its
        validation split: FineAll (every later task fine-tunes T1's model) at each point of
        ``grid`` (lr, bpr_rho); the best validation metric wins. Returns task -> settings."""
        exp = with_seed(self.exp, seed)
        names = [p.spec.name for p in exp.tasks]
        # No test split at all: the commits of tuning runs evaluate nothing.
        blind = {n: replace(d, test=[]) for n, d in self.data.items()}
        # T1's train stage as Table 2 runs it (Conure's, masked), shared by every trial.
        capture: dict[str, RunState | None] = {f"{names[0]}/train": None}
        self.run("tune_t1", "conure", exp, pick(exp, names[:1]), data=blind, capture=capture, keep=False)
        best: dict[str, tuple[dict[str, float], float]] = {}
        for lr, rho in grid:
            # The sampler is an item task's: class tasks train once per learning rate.
            tasks = [n for n in names[1:] if rho == grid[0][1] or exp.task(n).spec.kind == "item"]
            if not tasks:
                continue
            trial = with_train(exp, {n: {"lr": lr, "bpr_rho": rho} for n in tasks})
            out = self.run(f"tune_lr_{lr:g}_rho_{rho:g}", "fineall", trial, pick(trial, names[:1] + tasks), data=blind,
                           start=capture[f"{names[0]}/train"], keep=False)
            for name in tasks:
                item = exp.task(name).spec.kind == "item"
                value = out.best_validation.get(f"{name}/train", float("-inf"))
                metric = main_metric(exp.task(name).spec, exp.task(name).train.metric_k)
                self.tuning.append({"task": name, "lr": lr, "bpr_rho": rho if item else "", "metric": metric, "validation": value})
                if name not in best or value > best[name][1]:
                    best[name] = ({"lr": lr, "bpr_rho": rho} if item else {"lr": lr}, value)
        chosen = {name: settings for name, (settings, _) in best.items()}
        for row in self.tuning:
            row["chosen"] = chosen[row["task"]]["lr"] == row["lr"] and chosen[row["task"]].get("bpr_rho", "") == row["bpr_rho"]
        log.info("tuned on validation: " + ", ".join(f"{n} " + " ".join(f"{k} {v:g}" for k, v in c.items()) for n, c in chosen.items()))
        return chosen

    def table2(self, seed: int, methods: Sequence[str] = TABLE2_METHODS) -> dict[str, RunState]:
        """Every method at one seed; returns the captured states (after T1 and T2 train) of Conure."""
        exp = with_seed(self.exp, seed)
        names = [p.spec.name for p in exp.tasks]
        capture: dict[str, RunState | None] = {f"{names[0]}/train": None}
        if len(names) > 1:
            capture[f"{names[1]}/train"] = None
        self.run("conure", "conure", exp, exp.tasks, capture=capture)
        t1 = capture[f"{names[0]}/train"]
        for method in methods:
            if method == "conure":
                continue
            # DNN is another network: its own T1. Every other method goes on from T1's train stage.
            self.run(method, method, exp, exp.tasks, start=None if get_method(method).backbone else t1)
        return capture

    def ablations(self, seed: int, capture: dict[str, RunState]) -> None:
        """Tables 3-6 and Figure 6 at one seed (see the module docstring of each variant)."""
        exp = with_seed(self.exp, seed)
        names = [p.spec.name for p in exp.tasks]
        t1 = capture[f"{names[0]}/train"]
        if len(names) >= 3:  # Table 3: T3 without T2 first, also on a 20/80 train/test split
            t1n, t2n, t3n = names[:3]
            self.run("conure_no_t2", "conure", exp, pick(exp, [t1n, t3n]), start=t1)
            split = dict(self.data)
            for i, n in enumerate((t2n, t3n)):
                split[n] = resplit(self.data[n], 0.2, seed * 101 + i, exp.task(n).train.batch_size)
            self.run("conure_split20", "conure", exp, pick(exp, [t1n, t2n, t3n]), data=split, start=t1)
            self.run("conure_no_t2_split20", "conure", exp, pick(exp, [t1n, t3n]), data=split, start=t1)
        if len(names) >= 4:  # Table 4: the last task moved forward
            last = names[-1]
            self.run("order2", "conure", exp, pick(exp, [names[0], names[1], last, names[2]]), start=t1)
            self.run("order3", "conure", exp, pick(exp, [names[0], last, names[1], names[2]]), start=t1)
        if len(names) >= 2:  # Figure 6: T2 pruned by other ratios, then retrained
            t2_trained = capture.get(f"{names[1]}/train")
            for ratio in PRUNE_SWEEP:
                plans = [exp.task(names[0]), replace(exp.task(names[1]), spec=replace(exp.task(names[1]).spec, prune_ratio=ratio))]
                self.run(f"prune_{ratio:g}", "conure", exp, plans, start=t2_trained)
        three = names[:3]
        # Table 5: the embedding pruned too
        emb = replace(exp, model=replace(exp.model, prune_embedding=True))
        plans = [replace(p, spec=replace(p.spec, embedding_prune_ratio=EMBEDDING_RATIOS[min(i, 2)]))
                 for i, p in enumerate(pick(emb, three))]
        self.run("embedding_conure", "conure", emb, plans, start=t1)
        # Table 6: the Transformer backbone (its own T1), FineAll and Conure
        tf = replace(exp, model=replace(exp.model, backbone="transformer"))
        tcap: dict[str, RunState | None] = {f"{names[0]}/train": None}
        self.run("transformer_conure", "conure", tf, pick(tf, three), capture=tcap)
        self.run("transformer_fineall", "fineall", tf, pick(tf, three), start=tcap[f"{names[0]}/train"])


def run_comparison(exp: ExperimentConfig, info, *, seeds: int, ablation_seeds: int = 1, tune: bool = False,
                   methods: Sequence[str] = TABLE2_METHODS, ablations: bool = True) -> Comparison:
    """The whole comparison: tuning (optional, first seed), Table 2 at every seed, ablations at
    the first ``ablation_seeds`` seeds."""
    comparison = Comparison(exp, load_task_data(exp, info))
    base = exp.seed
    if tune:
        comparison.exp = with_train(exp, comparison.tune(base))
    for s in range(seeds):
        log.info(f"seed {base + s}: Table 2 ({len(methods)} methods)")
        capture = comparison.table2(base + s, methods)
        if ablations and s < ablation_seeds:
            log.info(f"seed {base + s}: ablations")
            comparison.ablations(base + s, capture)
    return comparison


def ray_conure_row(exp: ExperimentConfig, run_dir: str) -> Outcome:
    """The Conure row once more through the real path (Ray Data, Ray Train, DeepSpeed, the coordinator)."""
    from conure_dist.launch import connect_ray
    from conure_dist.train.coordinator import run_experiment

    connect_ray(worker_output=False)
    started = time.time()
    run = run_experiment(replace(exp, method="conure"), run_dir, new_run=True)
    return Outcome("conure_ray", "conure", exp.seed, [t.spec.name for t in exp.tasks], list(run.state.accuracy),
                   seconds=round(time.time() - started, 1), backbones=1, serving_bytes=footprint("conure", run.state)[1])


def outcome_rows(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Every test value of every outcome, flat (the raw CSV of the report)."""
    rows = []
    for o in outcomes:
        for r in o.accuracy:
            rows.append({"variant": o.variant, "method": o.method, "seed": o.seed, "phase": "after " + r["after_task"],
                         "task": r["task"], "metric": r["metric"], "value": r["value"]})
        for r in o.before_prune:
            rows.append({"variant": o.variant, "method": o.method, "seed": o.seed, "phase": "before pruning",
                         "task": r["task"], "metric": r["metric"], "value": r["value"]})
    return rows


def _shown_command(argv: Sequence[str], job: str) -> str:
    """The job's command line as the report shows it: data locations replaced by placeholders."""
    shown, hide = [], {"--data": "PREPARED_DATASET", "--raw": "RAW_DATA_DIR", "--run-dir": "RUN_DIR"}
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in hide:
            shown.append(f"{key} {hide[key]}")
            skip = "=" not in a
            continue
        shown.append(a)
    return " ".join([f"python jobs/{job}.py", *shown])


def compare_job(args, rc, experiment: Callable[[str], ExperimentConfig], preset: str) -> int:
    """``--compare``: every method and the ablations on the prepared dataset, then the report."""
    import platform
    import sys
    import tempfile

    from conure_dist import __version__, storage
    from conure_dist.config import ConfigError
    from conure_dist.data.format import load_dataset_info
    from conure_dist.eval.floors import floor_standard_error, floors, popularity_floor
    from conure_dist.eval.report import ReportInputs, write_report
    from conure_dist.launch import prepared_dataset
    from conure_dist.logs import DriverLog

    if not args.out:
        raise ConfigError("--compare needs --out DIR (where report.md, its CSVs and figures go)")
    if args.report_only:
        from conure_dist.eval.report import load_inputs

        print(f"report: {write_report(load_inputs(args.out), args.out)}")
        return 0
    if storage.is_uri(args.out):
        raise ConfigError(f"--out {args.out}: the report is written to a local directory")
    if args.seeds < 1 or args.ablation_seeds < 0:
        raise ConfigError("--seeds must be >= 1 and --ablation-seeds >= 0")
    with tempfile.TemporaryDirectory(prefix="conure-compare-") as scratch, DriverLog(args.out) as logger:
        if not rc.data and not rc.run_dir:  # raw inputs: prepared into a scratch directory, never into the report
            rc = replace(rc, run_dir=scratch)
        exp = experiment(prepared_dataset(rc))
        info = load_dataset_info(exp.dataset)
        started = time.time()
        logger.info(f"conure_dist {__version__}: comparison on {exp.dataset}, {args.seeds} seed(s), report in {args.out}")
        # Same seed, same numbers: with several threads some CPU kernels (index accumulation in the
        # embedding and sampled-softmax backward) sum in a varying order, and the small differences
        # grow over hundreds of steps into a different best epoch.
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            comparison = run_comparison(exp, info, seeds=args.seeds, ablation_seeds=args.ablation_seeds, tune=args.tune,
                                        ablations=not args.no_ablations)
        finally:
            torch.use_deterministic_algorithms(deterministic)
        in_process = time.time() - started
        if args.check_ray:
            logger.info(f"in-process comparison: {in_process / 60:.1f} min; the Conure row through Ray Train + DeepSpeed")
            ray_dir = storage.join(rc.run_dir if rc.run_dir and rc.run_dir != scratch else scratch, "compare-conure")
            comparison.outcomes.append(ray_conure_row(with_seed(comparison.exp, exp.seed), ray_dir))
        wall = time.time() - started
        final = comparison.exp
        metrics = {p.spec.name: main_metric(p.spec, p.train.metric_k) for p in final.tasks}
        first = final.tasks[0].train
        settings = {
            "title": f"The paper's comparison on {os.path.basename(os.path.normpath(rc.source.raw or rc.data or exp.dataset))}",
            "wall_time": f"{wall / 60:.1f} min" + (f" ({in_process / 60:.1f} min in process, the rest through Ray Train)"
                                                  if args.check_ray else ""),
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
            "engine": "in process (the same stage machine, plans and merge rules as the distributed trainer; torch Adam)"
                      + ("; the Conure row once more through Ray Train + DeepSpeed" if args.check_ray else ""),
            "tasks": " → ".join(f"T{i + 1} {p.spec.name}" for i, p in enumerate(final.tasks)),
            "model": f"{final.model.backbone}, f = {final.model.embed_dim}, dilations {list(final.model.dilations)}, "
                     f"kernel {final.model.kernel_size}, sequence length {final.seq_len}",
            "T1": f"lr {first.lr:g}, batch {first.batch_size}, up to {first.epochs} epochs (patience {first.patience}), "
                  f"retrain {first.retrain_epochs}, sampled softmax over {first.sample_ratio:.0%} of the items",
            "later tasks": "; ".join(
                f"{p.spec.name}: lr {p.train.lr:g}, batch {p.train.batch_size}, up to {p.train.epochs} epochs (patience "
                f"{p.train.patience}), retrain {p.train.retrain_epochs}, l2 {p.train.l2:g} on the head"
                + (f", LambdaFM ρ {p.train.bpr_rho:g}" if p.spec.kind == "item" else "") for p in final.tasks[1:]) or "none",
            "prune ratios": ", ".join(f"{p.spec.name} {p.spec.prune_ratio:g}" for p in final.tasks),
            "seeds": f"Table 2: {args.seeds} ({exp.seed}..{exp.seed + args.seeds - 1}); ablations: "
                     f"{min(args.ablation_seeds, args.seeds) if not args.no_ablations else 0}",
        }
        floor_values = {name: value for name, (_, value) in floors(info, final.tasks).items()}
        test_rows = {p.spec.name: info.task(p.spec.name).counts["test"] for p in final.tasks}
        floor_se = {p.spec.name: floor_standard_error(info, p.spec, p.train.metric_k) for p in final.tasks}
        validation_floors = {p.spec.name: popularity_floor(info, p.spec, p.train.metric_k, "validation")[metrics[p.spec.name]]
                             for p in final.tasks}
        command = _shown_command(getattr(args, "argv", None) or sys.argv[1:], getattr(args, "job", preset))
        path = write_report(ReportInputs(comparison.outcomes, [p.spec.name for p in final.tasks], metrics, floor_values,
                                         test_rows, settings, comparison.tuning, command, floor_se, validation_floors),
                            args.out)
        logger.info(f"report: {path} ({wall / 60:.1f} min)")
    return 0
