"""Executes a method's plan, stage by stage, over a :class:`RunState`.

Training stages are delegated to a :class:`StageExecutor` (in-process, or Ray Train +
DeepSpeed workers). Everything between them happens here, on one process: merging a stage's
output into the committed weights (only entries the stage could train), pruning, and the
evaluation of every committed task after each commit (the accuracy matrix).

Methods that keep one backbone per task (SinMo, FineAll, MTL, DNN) commit each task's weights
as its own *weight set* (``RunState.sets``), and every task is served from its set; the other
methods serve every task from the one shared ``RunState.weights``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from conure_dist.config import TaskPlan
from conure_dist.model import OwnerMap, Stage, Weights, merge_stage_weights
from conure_dist.train.plan import Ledger, Method, PlannedStep, Step, build_plan


class StageExecutor(Protocol):
    def train(self, task: TaskPlan, number: int, stage: Stage, weights: Weights, owners: OwnerMap | None,
              scope: str = "all", first: TaskPlan | None = None) -> Weights:
        """Run a train/retrain stage from ``weights``; return the best-on-validation weights.

        ``scope``: what the task trains (:data:`~conure_dist.model.freeze.SCOPES`); with
        ``joint``, T1 (``first``) is trained jointly: its loss is added at every step."""

    def evaluate(self, tasks: Sequence[TaskPlan], weights: Weights, owners: OwnerMap | None,
                 view: Stage = Stage.SERVE) -> dict[str, dict[str, float]]:
        """Test metrics of each task (by name), every one served from ``weights`` (``view``
        TRAIN: as the task saw the backbone while it trained, before pruning)."""

    @property
    def compute_dtype(self) -> torch.dtype:
        """Precision the stages run in (frozen entries come back equal in it)."""


@dataclass
class RunState:
    """What exists between stages: committed weights, owner map, phases, results."""

    weights: Weights
    owners: OwnerMap
    ledger: Ledger
    accuracy: list[dict] = field(default_factory=list)  # rows: after_task, task, metric, value
    sets: dict[str, Weights] = field(default_factory=dict)  # per-task methods: task -> its committed weights
    before_prune: list[dict] = field(default_factory=list)  # rows: task, metric, value (test, before pruning)

    def serving(self, task: str) -> Weights:
        """The weights that serve ``task``: its own set where it has one, else the shared ones."""
        return self.sets.get(task, self.weights)


class StageMachine:
    def __init__(
        self,
        method: Method,
        tasks: Sequence[TaskPlan],
        executor: StageExecutor,
        *,
        on_step_done: Callable[[PlannedStep, RunState], None] | None = None,
        init: Callable[[int], Weights] | None = None,
        measure_before_prune: bool = False,
    ):
        """``init(number)``: freshly initialised weights for task ``number`` (methods that start
        later tasks from scratch). ``measure_before_prune``: evaluate each task on its test split
        right after its train stage too (the paper's Conure-), into ``RunState.before_prune``."""
        self.method, self.tasks, self.executor = method, list(tasks), executor
        self.plan = build_plan(method, [t.spec.name for t in self.tasks])
        self.on_step_done = on_step_done
        self.init = init
        self.measure_before_prune = measure_before_prune

    def number(self, task: str) -> int:
        return [t.spec.name for t in self.tasks].index(task) + 1

    def task(self, name: str) -> TaskPlan:
        return self.tasks[self.number(name) - 1]

    def pending(self, state: RunState) -> list[PlannedStep]:
        return [p for p in self.plan if not state.ledger.is_done(p, self.method)]

    def run(self, state: RunState) -> RunState:
        for planned in self.pending(state):
            self.execute(planned, state)
        return state

    def fits(self, planned: PlannedStep) -> bool:
        """Whether the step trains: a retrain stage of 0 epochs does not; the pruned weights
        stand as they are, without asking the workers to train nothing."""
        if planned.step is Step.RETRAIN:
            return self.task(planned.task).train.retrain_epochs > 0
        return planned.step is Step.TRAIN

    def execute(self, planned: PlannedStep, state: RunState) -> None:
        task, number = self.task(planned.task), self.number(planned.task)
        state.ledger.advance(planned.task, planned.step)  # refuses an illegal order first
        owners = state.owners if self.method.masking else None
        if planned.step is Step.RETRAIN and not self.fits(planned):
            pass
        elif planned.step in (Step.TRAIN, Step.RETRAIN):
            stage = Stage.TRAIN if planned.step is Step.TRAIN else Stage.RETRAIN
            if planned.step is Step.TRAIN and number > 1:
                state.weights = self.start_weights(number, state)
            scope, first = self.method.scope(number), self.tasks[0]
            trained = self.executor.train(task, number, stage, state.weights, owners, scope=scope, first=first)
            state.weights = merge_stage_weights(
                state.weights, trained, owners, task.spec.name, number, stage,
                compute_dtype=self.executor.compute_dtype, scope=scope, first=first.spec.name,
            )
            if planned.step is Step.TRAIN and self.measure_before_prune and Step.PRUNE in self.method.steps:
                results = self.executor.evaluate([task], state.weights, owners, view=Stage.TRAIN)
                state.before_prune += [{"task": task.spec.name, "metric": m, "value": v}
                                       for m, v in results[task.spec.name].items() if m != "count"]
        elif planned.step is Step.PRUNE:
            state.owners = state.owners.prune(state.weights, number, self.prune_ratios(task, state.owners))
            state.weights = {**state.weights, **state.owners.release_unowned(state.weights)}
        else:
            self.commit(number, state)
        if self.on_step_done is not None:
            self.on_step_done(planned, state)

    def start_weights(self, number: int, state: RunState) -> Weights:
        """Where task ``number`` (> 1) starts: as the previous task left the weights, T1's
        committed weights, or fresh ones."""
        if self.method.start == "previous":
            return state.weights
        if self.method.start == "first":
            return dict(state.sets[self.tasks[0].spec.name])
        if self.init is None:
            raise ValueError(f"method {self.method.name} starts every task afresh: the machine needs init")
        return self.init(number)

    def prune_ratios(self, task: TaskPlan, owners: OwnerMap) -> dict[str, float]:
        from conure_dist.train.capacity import prune_ratios  # the capacity plan uses the same ratios

        return prune_ratios(task.spec, owners.names)

    def commit(self, number: int, state: RunState) -> None:
        """Evaluate every committed task (this one included) on its test split."""
        after = self.tasks[number - 1].spec.name
        owners = state.owners if self.method.masking else None
        if self.method.backbones == "per_task":
            state.sets[after] = state.weights
            results = {}
            for task in self.tasks[:number]:  # each task from its own weights
                results.update(self.executor.evaluate([task], state.sets[task.spec.name], owners))
        else:
            results = self.executor.evaluate(self.tasks[:number], state.weights, owners)
        for task in self.tasks[:number]:
            for metric, value in results[task.spec.name].items():
                if metric != "count":
                    state.accuracy.append({"after_task": after, "task": task.spec.name, "metric": metric, "value": value})
