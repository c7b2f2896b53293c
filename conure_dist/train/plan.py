"""The stage machine as data: a method is a list of steps per task, executed in order.

Conure: ``train -> prune -> retrain -> commit`` for every task. Every baseline of the paper
(section 5.1) is ``train -> commit`` on the same machinery, and differs only in

- what a task after T1 trains (``later``: the whole backbone, only its head, only its
  patches, or the backbone jointly with T1's objective),
- whether every task is served by one shared weight set or keeps its own (``backbones``),
- where a task after T1 starts (``start``: the weights as the previous task left them, T1's
  committed weights, or a fresh initialisation),
- and, for DNN, the network itself (``backbone``).

:class:`Ledger` records each task's phase and refuses an illegal transition (a task trained
twice, a commit before training, a task started before the previous one is committed).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping, Sequence


class Step(str, enum.Enum):
    TRAIN = "train"
    PRUNE = "prune"
    RETRAIN = "retrain"
    COMMIT = "commit"


@dataclass(frozen=True)
class Method:
    name: str
    masking: bool  # use the owner map (False: no masks)
    steps: tuple[Step, ...]  # per task, in order; always ends with COMMIT
    later: str = "all"  # what tasks after T1 train: all | head | patches | joint (see freeze.SCOPES)
    backbones: str = "shared"  # shared: one weight set serves every task | per_task: each task keeps its own
    start: str = "previous"  # where a task after T1 starts: previous | first (T1's committed weights) | fresh
    backbone: str | None = None  # the network this method needs, whatever the model config says
    summary: str = ""

    def scope(self, number: int) -> str:
        """What task ``number`` (1-based) trains; T1 always trains the whole network."""
        return "all" if number == 1 else self.later

    @property
    def patched(self) -> bool:
        return self.later == "patches"


_TRAIN_COMMIT = (Step.TRAIN, Step.COMMIT)
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("conure", True, (Step.TRAIN, Step.PRUNE, Step.RETRAIN, Step.COMMIT),
           summary="one backbone; each task prunes and keeps its own share, nothing is forgotten"),
    Method("sinmoall", False, _TRAIN_COMMIT, summary="one backbone fine-tuned task after task, nothing protected"),
    Method("sinmo", False, _TRAIN_COMMIT, backbones="per_task", start="fresh",
           summary="one backbone per task, each trained from scratch"),
    Method("finesmax", False, _TRAIN_COMMIT, later="head",
           summary="T1's backbone frozen after T1; later tasks train only their head"),
    Method("fineall", False, _TRAIN_COMMIT, backbones="per_task", start="first",
           summary="each later task fine-tunes its own copy of T1's whole model"),
    Method("peterrec", False, _TRAIN_COMMIT, later="patches",
           summary="T1's backbone frozen; later tasks train residual bottleneck patches and their head"),
    Method("mtl", False, _TRAIN_COMMIT, later="joint", backbones="per_task", start="fresh",
           summary="each later task trained from scratch jointly with T1's objective"),
    Method("dnn", False, _TRAIN_COMMIT, backbones="per_task", start="fresh", backbone="dnn",
           summary="a two-layer feed-forward network over the bag of T1 items, one per task"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class PlannedStep:
    task: str
    step: Step

    @property
    def key(self) -> str:
        return f"{self.task}/{self.step.value}"


def build_plan(method: Method, tasks: Sequence[str]) -> list[PlannedStep]:
    return [PlannedStep(task, step) for task in tasks for step in method.steps]


class IllegalTransition(RuntimeError):
    """A step was asked for in a phase that does not allow it."""


_ALLOWED: dict[Step | None, set[Step]] = {
    None: {Step.TRAIN},
    Step.TRAIN: {Step.PRUNE, Step.COMMIT},
    Step.PRUNE: {Step.RETRAIN, Step.COMMIT},
    Step.RETRAIN: {Step.COMMIT},
    Step.COMMIT: set(),
}


class Ledger:
    """Last completed step of each task, in task order."""

    def __init__(self, tasks: Sequence[str], done: Mapping[str, str | None] | None = None):
        self.tasks = list(tasks)
        self._done: dict[str, Step | None] = {t: None for t in self.tasks}
        for task, step in (done or {}).items():
            if task not in self._done:
                raise ValueError(f"ledger names unknown task {task!r}")
            self._done[task] = Step(step) if step is not None else None

    def last(self, task: str) -> Step | None:
        return self._done[task]

    def committed(self, task: str) -> bool:
        return self._done[task] is Step.COMMIT

    def is_done(self, planned: PlannedStep, method: Method) -> bool:
        last = self._done[planned.task]
        if last is None:
            return False
        return method.steps.index(planned.step) <= method.steps.index(last)

    def advance(self, task: str, step: Step) -> None:
        last = self._done[task]
        if step not in _ALLOWED[last]:
            raise IllegalTransition(f"task {task!r}: {step.value} is not allowed after {last.value if last else 'nothing'}")
        if step is Step.TRAIN:
            earlier = self.tasks[: self.tasks.index(task)]
            open_ = [t for t in earlier if not self.committed(t)]
            if open_:
                raise IllegalTransition(f"task {task!r} cannot start before {open_} are committed")
        self._done[task] = step

    def to_dict(self) -> dict[str, str | None]:
        return {t: (s.value if s else None) for t, s in self._done.items()}
