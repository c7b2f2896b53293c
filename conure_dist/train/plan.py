"""The stage machine as data: a method is a list of steps per task, executed in order.

Conure: ``train -> prune -> retrain -> commit`` for every task. The naive sequential
fine-tuning baseline (the paper's SinMoAll) is ``train -> commit`` without masks. Other
methods are other plans on the same machinery. :class:`Ledger` records each task's phase and
refuses an illegal transition (a task trained twice, a commit before training, a task started
before the previous one is committed).
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
    masking: bool  # use the owner map (False: every task trains the whole backbone)
    steps: tuple[Step, ...]  # per task, in order; always ends with COMMIT


METHODS: dict[str, Method] = {
    "conure": Method("conure", True, (Step.TRAIN, Step.PRUNE, Step.RETRAIN, Step.COMMIT)),
    "sinmoall": Method("sinmoall", False, (Step.TRAIN, Step.COMMIT)),
}


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
