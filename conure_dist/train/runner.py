"""The whole Conure procedure in one process, on in-memory batches.

Used by the tests and by small demos; the distributed trainer runs the same
:class:`~conure_dist.train.machine.StageMachine` with Ray Train workers instead of
:class:`InProcessExecutor`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from conure_dist.config import ModelConfig, TaskPlan
from conure_dist.eval.evaluate import evaluate_task, main_metric
from conure_dist.model import ConureModel, OwnerMap, Stage, Weights
from conure_dist.train.loop import Batch, StageProgress, TorchStepper, run_stage
from conure_dist.train.losses import make_loss
from conure_dist.train.machine import RunState, StageMachine
from conure_dist.train.plan import Ledger, PlannedStep, get_method


@dataclass
class TaskData:
    """In-memory splits of one task (lists of batches) and its popularity counts."""

    train: list[Batch]
    validation: list[Batch] = field(default_factory=list)
    test: list[Batch] = field(default_factory=list)
    popularity: np.ndarray | None = None


class InProcessExecutor:
    """Runs train/retrain stages with a torch optimizer on one model in this process."""

    compute_dtype = torch.float32

    def __init__(self, model: ConureModel, data: Mapping[str, TaskData], *, device: str = "cpu", seed: int = 0):
        self.model, self.data, self.device, self.seed = model.to(device), data, device, seed
        self.progress: dict[str, StageProgress] = {}

    def train(self, task: TaskPlan, number: int, stage: Stage, weights: Weights, owners: OwnerMap | None) -> Weights:
        spec, cfg, data = task.spec, task.train, self.data[task.spec.name]
        self.model.load_weights(weights)
        self.model.set_view(owners, spec.name, stage)
        epochs = cfg.epochs if stage is Stage.TRAIN else cfg.retrain_epochs
        if epochs == 0:
            return self.model.weights()

        def batches(epoch: int):
            order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            return (data.train[i] for i in order.tolist())

        validate = None
        if data.validation:
            validate = lambda: evaluate_task(self.model, spec, data.validation, cfg.metric_k, self.device)  # noqa: E731
        progress, best = run_stage(
            model=self.model,
            stepper=TorchStepper(self.model.trainable_parameters(), cfg),
            loss_fn=make_loss(spec, cfg, self.model.config.num_items, data.popularity),
            train_batches=batches,
            validate=validate,
            metric=main_metric(spec, cfg.metric_k),
            epochs=epochs,
            patience=cfg.patience,
            l2=cfg.l2,
            seed=cfg.seed + 7919 * number + (1 if stage is Stage.RETRAIN else 0),
            device=self.device,
        )
        self.progress[f"{spec.name}/{stage.value}"] = progress
        return best

    def evaluate(self, tasks: Sequence[TaskPlan], weights: Weights, owners: OwnerMap | None) -> dict[str, dict[str, float]]:
        self.model.load_weights(weights)
        results = {}
        for task in tasks:
            self.model.set_view(owners, task.spec.name, Stage.SERVE)
            results[task.spec.name] = evaluate_task(self.model, task.spec, self.data[task.spec.name].test, task.train.metric_k, self.device)
        return results


@dataclass
class InProcessRun:
    state: RunState
    model: ConureModel
    executor: InProcessExecutor


def run_in_process(
    model_config: ModelConfig,
    tasks: Sequence[TaskPlan],
    data: Mapping[str, TaskData],
    *,
    method: str = "conure",
    seed: int = 0,
    device: str = "cpu",
    on_step_done: Callable[[PlannedStep, RunState], None] | None = None,
    model: ConureModel | None = None,
) -> InProcessRun:
    """Learn ``tasks`` one after another with ``method`` ("conure" or "sinmoall").

    ``model`` (optional) is the network to train, built from ``model_config`` when omitted.
    """
    torch.manual_seed(seed)
    model = model if model is not None else ConureModel(model_config, [t.spec for t in tasks])
    executor = InProcessExecutor(model, data, device=device, seed=seed)
    state = RunState(model.weights(), model.new_owner_map(), Ledger([t.spec.name for t in tasks]))
    StageMachine(get_method(method), tasks, executor, on_step_done=on_step_done).run(state)
    return InProcessRun(state, model, executor)
