"""The stage loop: train or retrain one task, keep the best-on-validation weights.

Engine-agnostic and free of Ray: the in-process runner calls it with a plain torch optimizer,
and each Ray Train worker calls the same function with a DeepSpeed engine behind
:class:`Stepper`. After every optimizer step the :class:`~conure_dist.model.FrozenGuard`
verifies that no frozen entry moved (a moved entry fails the stage), and a non-finite loss
stops the stage with an error that names the task, the stage and the step.

Resuming inside an epoch: ``train_batches(epoch)`` must yield the same batches in the same
order whenever it is called for the same epoch (the data order is a function of the seed and
the epoch). The loop skips the batches the checkpoint had already consumed, and the negative
sampler's generator is seeded per step, so a resumed stage takes exactly the steps an
uninterrupted one would have taken.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch

from conure_dist.config import TrainConfig
from conure_dist.model import ConureModel, FrozenGuard, Weights
from conure_dist.train.losses import TaskLoss, l2_penalty

Batch = Mapping[str, torch.Tensor]


class Stepper(Protocol):
    """Backward pass and optimizer step for one loss (a torch optimizer or a DeepSpeed engine)."""

    def step(self, loss: torch.Tensor) -> None: ...


class TorchStepper:
    """A fresh torch Adam/AdamW over the parameters the current view trains (torch's fused
    implementation, as the DeepSpeed engine's config asks for)."""

    def __init__(self, params: list[torch.nn.Parameter], cfg: TrainConfig, *, fused: bool = True):
        if not params:
            raise ValueError("nothing to train: the current view has no trainable parameter")
        opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


@dataclass
class StageProgress:
    """Everything a checkpoint must carry to resume a stage where it stopped."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    best_metric: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped_early: bool = False
    step_limited: bool = False  # stopped at the stage's step limit (train.max_steps)
    world_size: int = 1  # data-parallel ranks the steps were taken with
    # The epoch in progress (a checkpoint taken inside an epoch resumes from here).
    epoch_step: int = 0  # batches of epoch ``epoch`` already consumed
    epoch_loss_sum: float = 0.0
    epoch_examples: int = 0  # rows of all ranks
    epoch_seconds: float = 0.0
    epoch_data_seconds: float = 0.0  # of epoch_seconds: waiting for the next batch
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)  # the step each resume from a checkpoint started at

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StageProgress":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def finished(self, epochs: int) -> bool:
        return self.stopped_early or self.step_limited or self.epoch >= epochs


class NonFiniteLoss(RuntimeError):
    """A stage's loss became NaN or infinite: the stage stops instead of training on."""


def step_seed(seed: int, epoch: int, epoch_step: int) -> int:
    """Seed of the negative sampler at one step: the same draws when a step is taken again."""
    return (seed * 1_000_003 + epoch * 100_003 + epoch_step) % (2**63)


StepHook = Callable[[StageProgress, float], None]
EpochHook = Callable[[StageProgress, Weights, bool], None]


def run_stage(
    *,
    model: ConureModel,
    stepper: Stepper,
    loss_fn: TaskLoss,
    train_batches: Callable[[int], Iterable[Batch]],
    validate: Callable[[], Mapping[str, float]] | None,
    metric: str,
    epochs: int,
    patience: int,
    max_steps: int = 0,
    l2: float = 0.0,
    l2_scope: str = "head",
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: StageProgress | None = None,
    best: Weights | None = None,
    snapshot: Callable[[], Weights] | None = None,
    on_step: StepHook | None = None,
    on_epoch_end: EpochHook | None = None,
    name: str = "stage",
) -> tuple[StageProgress, Weights]:
    """Run the epochs of one stage that ``progress`` has not completed yet.

    ``train_batches(epoch)`` yields the epoch's batches. After each epoch ``validate()`` gives
    the metrics; the weights of the best epoch by ``metric`` are kept (``snapshot()``, by
    default the model's effective fp32 weights) and returned. Training stops early after
    ``patience`` epochs without improvement. With ``max_steps`` the stage ends once it has taken
    that many optimizer steps: the epoch in progress is validated and counted, and the stage is
    done (a smoke test's budget). ``on_epoch_end`` is where callers checkpoint.
    ``name`` (e.g. ``"task click, train stage"``) names the stage in errors.
    """
    progress = progress if progress is not None else StageProgress()
    snapshot = snapshot or model.weights
    guard = FrozenGuard(model, context=name)
    best_weights = best
    generator = torch.Generator()
    model.train()
    for epoch in range(progress.epoch, epochs):
        if progress.stopped_early or progress.step_limited:
            break
        started = time.perf_counter()
        skip = progress.epoch_step  # batches a checkpoint inside this epoch had consumed
        batches = iter(train_batches(epoch))
        for index in itertools.count():
            if max_steps and progress.step >= max_steps:
                break
            waiting = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            if index < skip:
                continue
            progress.epoch_data_seconds += time.perf_counter() - waiting
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            generator.manual_seed(step_seed(seed, epoch, index))
            loss = loss_fn(model, batch, generator)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLoss(f"{name}: the loss became {value} at step {progress.step + 1} (epoch {epoch + 1}, "
                                    f"batch {index + 1}); lower the learning rate or check the data")
            reg = l2_penalty(model, l2, scope=l2_scope)
            stepper.step(loss if reg is None else loss + reg)
            guard.check()
            progress.step += 1
            progress.epoch_step = index + 1
            progress.epoch_loss_sum += value
            # Every rank takes an equal batch each step (the data config pads the split): the
            # examples of the step are this rank's times the world size.
            progress.epoch_examples += int(batch["seq"].shape[0]) * progress.world_size
            progress.epoch_seconds += time.perf_counter() - started
            started = time.perf_counter()
            if on_step is not None:
                on_step(progress, value)
        metrics = dict(validate()) if validate is not None else {}
        value = metrics.get(metric)
        improved = value is None or progress.best_metric is None or value > progress.best_metric
        if improved:
            progress.best_metric, progress.best_epoch, progress.bad_epochs = value, epoch, 0
            best_weights = snapshot()
        else:
            progress.bad_epochs += 1
        seconds = progress.epoch_seconds + time.perf_counter() - started
        progress.epoch = epoch + 1
        progress.history.append({
            "epoch": epoch,
            "loss": progress.epoch_loss_sum / progress.epoch_step if progress.epoch_step else math.nan,
            "seconds": seconds,
            "examples_per_s": progress.epoch_examples / seconds if seconds > 0 else 0.0,
            "train_s": progress.epoch_seconds,  # the steps and the waits for their batches, no validation
            "data_wait_s": progress.epoch_data_seconds,
            **{f"val_{k}": float(v) for k, v in metrics.items()},
        })
        progress.epoch_step, progress.epoch_loss_sum, progress.epoch_examples, progress.epoch_seconds = 0, 0.0, 0, 0.0
        progress.epoch_data_seconds = 0.0
        progress.stopped_early = progress.bad_epochs >= patience and progress.epoch < epochs
        progress.step_limited = bool(max_steps) and progress.step >= max_steps and progress.epoch < epochs
        if on_epoch_end is not None:
            on_epoch_end(progress, best_weights, improved)
    if best_weights is None:  # zero epochs left to run and nothing carried over
        best_weights = snapshot()
    return progress, best_weights
