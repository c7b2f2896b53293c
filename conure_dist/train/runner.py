"""The whole Conure procedure in one process, on in-memory batches.

Used by the tests and by small demos; the distributed trainer runs the same
:class:`~conure_dist.train.machine.StageMachine` with Ray Train workers instead of
:class:`InProcessExecutor`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from conure_dist.config import ModelConfig, TaskPlan, TaskSpec
from conure_dist.eval.evaluate import evaluate_task, main_metric
from conure_dist.model import ConureModel, OwnerMap, Stage, Weights
from conure_dist.train.loop import Batch, StageProgress, TorchStepper, run_stage
from conure_dist.train.losses import TaskLoss, make_loss
from conure_dist.train.machine import RunState, StageMachine
from conure_dist.train.plan import Ledger, Method, PlannedStep, get_method


@dataclass
class TaskData:
    """In-memory splits of one task (lists of batches) and its popularity counts.

    ``popularity`` may be omitted: it is then counted on the train batches (items for the
    sequence task, labels for item tasks), as the dataset writer counts the train split.
    The train batches are pooled into rows and regrouped into ``batch_size`` batches each
    epoch.
    """

    train: list[Batch]
    validation: list[Batch] = field(default_factory=list)
    test: list[Batch] = field(default_factory=list)
    popularity: np.ndarray | None = None


def concat_batches(batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
    """One tensor per key holding every row of ``batches``, without padding rows (user -1).

    Sequences narrower than the widest are left-padded with 0, the padding id.
    """
    if not batches:
        return {}
    width = max(int(b["seq"].shape[1]) for b in batches)
    out: dict[str, torch.Tensor] = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if key == "seq":
            parts = [torch.nn.functional.pad(p, (width - p.shape[1], 0)) for p in parts]
        out[key] = torch.cat(parts)
    if "user" in out:
        keep = out["user"] >= 0
        if not bool(keep.all()):
            out = {k: v[keep] for k, v in out.items()}
    return out


def shuffle_seed(seed: int, number: int, stage: Stage, epoch: int) -> int:
    """Seed of one epoch's row order; differs between tasks, stages and epochs."""
    stage_code = list(Stage).index(Stage(stage))
    entropy = [seed & 0xFFFFFFFFFFFFFFFF, number, stage_code, epoch]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def epoch_batches(rows: Mapping[str, torch.Tensor], batch_size: int, seed: int) -> Iterator[Batch]:
    """Batches of ``batch_size`` rows in the order of a permutation drawn from ``seed``.

    A new seed per epoch regroups the rows: which rows share a batch changes every epoch, and
    the same seed gives the same batches again (a resumed epoch replays them).
    """
    if not rows:
        return iter(())
    n = int(next(iter(rows.values())).shape[0])
    order = torch.from_numpy(np.random.Generator(np.random.PCG64(seed)).permutation(n))
    return ({k: v[idx] for k, v in rows.items()} for idx in order.split(batch_size))


def train_popularity(batches: Sequence[Batch], key: str, size: int) -> np.ndarray:
    """Counts of each id in column ``key`` of the train batches (ids < 0 and item 0 are padding)."""
    counts = np.zeros(size, dtype=np.int64)
    for b in batches:
        ids = b[key].reshape(-1).numpy()
        ids = ids[ids >= 0]
        counts += np.bincount(ids, minlength=size)[:size]
    if key == "seq":
        counts[0] = 0
    return counts


class JointLoss:
    """A task's loss plus T1's loss on the next T1 batch (MTL): T1's rows are cycled through,
    in a new order each pass."""

    def __init__(self, task_loss: TaskLoss, first_loss: TaskLoss, first_rows: Mapping[str, torch.Tensor],
                 batch_size: int, seed: int):
        self.task_loss, self.first_loss, self.rows, self.batch_size, self.seed = task_loss, first_loss, first_rows, batch_size, seed
        self._passes, self._batches = 0, iter(())

    def _next_first_batch(self) -> Batch:
        for _ in range(2):
            batch = next(self._batches, None)
            if batch is not None:
                return batch
            self._passes += 1
            self._batches = epoch_batches(self.rows, self.batch_size, self.seed + self._passes)
        raise ValueError("MTL: the first task has no train rows")

    def __call__(self, model: ConureModel, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        return self.task_loss(model, batch, generator) + self.first_loss(model, self._next_first_batch(), generator)


class InProcessExecutor:
    """Runs train/retrain stages with a torch optimizer on one model in this process."""

    compute_dtype = torch.float32

    def __init__(self, model: ConureModel, data: Mapping[str, TaskData], *, device: str = "cpu", seed: int = 0):
        self.model, self.data, self.device, self.seed = model.to(device), data, device, seed
        self.progress: dict[str, StageProgress] = {}

    def train(self, task: TaskPlan, number: int, stage: Stage, weights: Weights, owners: OwnerMap | None,
              scope: str = "all", first: TaskPlan | None = None) -> Weights:
        spec, cfg, data = task.spec, task.train, self.data[task.spec.name]
        self.model.load_weights(weights)
        self.model.set_view(owners, spec.name, stage, scope)
        epochs = cfg.epochs if stage is Stage.TRAIN else cfg.retrain_epochs
        if epochs == 0:
            return self.model.weights()

        rows = concat_batches(data.train)

        def batches(epoch: int):
            return epoch_batches(rows, cfg.batch_size, shuffle_seed(cfg.seed, number, stage, epoch))

        validate = None
        if data.validation:
            validate = lambda: evaluate_task(self.model, spec, data.validation, cfg.metric_k, self.device)  # noqa: E731
        loss_fn = make_loss(spec, cfg, self.model.config.num_items, self._popularity(spec, data))
        if scope == "joint":
            if first is None:
                raise ValueError("scope joint needs the first task")
            first_data = self.data[first.spec.name]
            first_loss = make_loss(first.spec, first.train, self.model.config.num_items, self._popularity(first.spec, first_data))
            loss_fn = JointLoss(loss_fn, first_loss, concat_batches(first_data.train), first.train.batch_size,
                                shuffle_seed(cfg.seed, 1, stage, 10_000 + number))
        progress, best = run_stage(
            model=self.model,
            stepper=TorchStepper(self.model.trainable_parameters(), cfg),
            loss_fn=loss_fn,
            train_batches=batches,
            validate=validate,
            metric=main_metric(spec, cfg.metric_k),
            epochs=epochs,
            patience=cfg.patience,
            max_steps=cfg.max_steps,
            l2=cfg.l2,
            l2_scope=cfg.l2_scope,
            seed=cfg.seed + 7919 * number + (1 if stage is Stage.RETRAIN else 0),
            device=self.device,
        )
        self.progress[f"{spec.name}/{stage.value}"] = progress
        return best

    def _popularity(self, spec: TaskSpec, data: TaskData) -> np.ndarray | None:
        """The given counts, else counted on the train split as a prepared dataset does."""
        if data.popularity is not None or spec.kind == "class":
            return data.popularity
        if spec.kind == "sequence":
            return train_popularity(data.train, "seq", self.model.config.num_items + 1)
        return train_popularity(data.train, "label", spec.num_labels)

    def evaluate(self, tasks: Sequence[TaskPlan], weights: Weights, owners: OwnerMap | None,
                 view: Stage = Stage.SERVE) -> dict[str, dict[str, float]]:
        self.model.load_weights(weights)
        results = {}
        for task in tasks:
            self.model.set_view(owners, task.spec.name, view)
            results[task.spec.name] = evaluate_task(self.model, task.spec, self.data[task.spec.name].test, task.train.metric_k, self.device)
        return results


@dataclass
class InProcessRun:
    state: RunState
    model: ConureModel
    executor: InProcessExecutor


def method_model_config(model_config: ModelConfig, method: Method) -> ModelConfig:
    """The model config as ``method`` builds it: with the method's own backbone, if it has one."""
    if method.backbone is not None and model_config.backbone != method.backbone:
        return replace(model_config, backbone=method.backbone)
    return model_config


def build_model(model_config: ModelConfig, tasks: Sequence[TaskSpec], method: Method, seed: int) -> ConureModel:
    """The network of ``method`` (its own backbone, PeterRec's patches), initialised from ``seed``."""
    torch.manual_seed(seed)
    return ConureModel(method_model_config(model_config, method), tasks,
                       patched=[t.name for t in tasks[1:]] if method.patched else ())


def fresh_weights(model_config: ModelConfig, tasks: Sequence[TaskSpec], method: Method, seed: int, number: int) -> Weights:
    """Freshly initialised weights for task ``number`` of a method that starts tasks from scratch,
    from a seed of their own, drawn from (seed, number): T2 and T3 do not start from the same
    draw, nor from the draw of another run seed."""
    own = int(np.random.SeedSequence([seed & 0xFFFFFFFF, number]).generate_state(1)[0])
    return build_model(model_config, tasks, method, own).weights()


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
    state: RunState | None = None,
    measure_before_prune: bool = False,
) -> InProcessRun:
    """Learn ``tasks`` one after another with ``method`` (a name of :data:`~conure_dist.train.plan.METHODS`).

    ``model`` (optional) is the network to train, built from ``model_config`` when omitted.
    ``state`` (optional) is a state to go on from: its ledger says which steps are done.
    """
    chosen = get_method(method)
    specs = [t.spec for t in tasks]
    model = model if model is not None else build_model(model_config, specs, chosen, seed)
    executor = InProcessExecutor(model, data, device=device, seed=seed)
    if state is None:
        state = RunState(model.weights(), model.new_owner_map(), Ledger([t.spec.name for t in tasks]))
    machine = StageMachine(chosen, tasks, executor, on_step_done=on_step_done, measure_before_prune=measure_before_prune,
                           init=lambda number: fresh_weights(model.config, specs, chosen, seed, number))
    machine.run(state)
    return InProcessRun(state, model, executor)
