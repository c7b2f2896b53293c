"""The capacity plan: how much of the prunable backbone each task of a run will own.

A prune gives its task ``round((1 - ratio) * free)`` of each tensor's free entries
(:func:`~conure_dist.model.owner_map.kept_count`), a count that does not depend on the weights'
values. So the whole plan's capacity is known before any training: T1 with ratio 0.7 keeps
30 %, T2 with 0.8 keeps 20 % of the 70 % left (14 %), T3 with 0.6 keeps 40 % of the 56 % left
(22.4 %), and so on, per tensor, rounded to whole entries.

A task that would keep no entry of some tensor would be refused by its prune, after its
whole train stage. :func:`check_capacity` refuses such a plan before anything is trained (or
written), with the planned table; ``--dry-run`` also warns when a task after T1 would start
with less than :data:`MIN_FREE_FRACTION` of the backbone free (it then learns in a sliver of
the network, and every later task in less).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from conure_dist.config import ConfigError, ExperimentConfig, TaskSpec
from conure_dist.model.owner_map import OwnerMap, kept_count

# A task after T1 that would start with less of the backbone free than this is warned about.
MIN_FREE_FRACTION = 0.05

EMBEDDING = "backbone.embedding.weight"


def prune_ratios(spec: TaskSpec, names: Sequence[str]) -> dict[str, float]:
    """The ratio each prunable tensor is pruned with after ``spec``'s task (the embedding table
    has its own ratio when one is set, paper Table 5)."""
    ratios = {name: spec.prune_ratio for name in names}
    if spec.embedding_prune_ratio is not None and EMBEDDING in ratios:
        ratios[EMBEDDING] = spec.embedding_prune_ratio
    return ratios


SMALL_TABLE_ELEMENTS = 8_000_000  # item tables up to this many values in all are built for real by prunable_shapes (32 MB)


def prunable_shapes(exp: ExperimentConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the run's prunable tensors, from a model built on the meta device (no memory:
    a TTL-size embedding table costs nothing here), or on the CPU when its item tables are small
    (the meta device's first use costs about 2 s of initialisation); never drawing from the
    caller's random generator."""
    from conure_dist.model import ConureModel
    from conure_dist.train.plan import get_method
    from conure_dist.train.runner import method_model_config

    method = get_method(exp.method)
    specs = [t.spec for t in exp.tasks]
    rows = exp.model.num_items + 1 + sum(t.spec.num_labels for t in exp.tasks if t.spec.kind == "item")
    small = 2 * rows * exp.model.embed_dim <= SMALL_TABLE_ELEMENTS  # T1's embedding and scorer, item heads: at most 2 x rows
    with torch.random.fork_rng(devices=[]), torch.device("cpu" if small else "meta"):
        model = ConureModel(method_model_config(exp.model, method), specs,
                            patched=[t.name for t in specs[1:]] if method.patched else ())
    return model.prunable_shapes()


@dataclass(frozen=True)
class PlannedTask:
    """One task's share of the prunable backbone, as the plan will leave it."""

    name: str
    number: int
    total: int  # prunable entries, all tensors
    free_before: int  # free when the task starts training
    kept: int  # entries its prune gives it
    starved: tuple[str, ...] = ()  # tensors of which its prune would keep nothing (it would be refused)
    done: bool = False  # already pruned (a resumed run): the numbers are the owner map's

    @property
    def free_after(self) -> int:
        return self.free_before - self.kept

    def fraction(self, entries: int) -> float:
        return entries / self.total if self.total else 0.0


def plan_capacity(exp: ExperimentConfig, owners: OwnerMap | None = None) -> list[PlannedTask]:
    """Each task's planned capacity, in task order. ``owners``: the run's owner map (a resumed
    run: tasks that own entries in it are taken as they are, the others planned from what is
    free); None: a new run, every entry free."""
    if owners is None:
        owners = OwnerMap.for_shapes(prunable_shapes(exp))
    free = {name: int((owners.owner(name) == 0).sum()) for name in owners.names}
    total = sum(owners.owner(name).numel() for name in owners.names)
    owned = owners.capacity().owned
    rows = []
    for number, plan in enumerate(exp.tasks, start=1):
        before = sum(free.values())
        if owned.get(number):
            # Pruned already: what it kept is in the map, which no longer counts it, nor any
            # later task's, as free.
            before += sum(n for task, n in owned.items() if task >= number)
            rows.append(PlannedTask(plan.spec.name, number, total, before, owned[number], done=True))
            continue
        ratios = prune_ratios(plan.spec, owners.names)
        kept = {name: kept_count(n, ratios[name]) for name, n in free.items()}
        starved = tuple(name for name, k in kept.items() if k == 0)
        rows.append(PlannedTask(plan.spec.name, number, total, before, sum(kept.values()), starved))
        free = {name: n - kept[name] for name, n in free.items()}
    return rows


def capacity_plan_table(rows: Sequence[PlannedTask]) -> str:
    """The plan as a table: per task, the backbone share free when it starts, the share it keeps,
    and the share left free after it."""
    def pct(x: float) -> str:
        return f"{100 * x:.2f}%"

    table = [("task", "free at start", "keeps", "free after", "")]
    for r in rows:
        note = ("pruned" if r.done else
                f"keeps nothing of {len(r.starved)} tensor(s): {', '.join(r.starved[:3])}"
                + (" ..." if len(r.starved) > 3 else "") if r.starved else "")
        table.append((r.name, pct(r.fraction(r.free_before)), pct(r.fraction(r.kept)), pct(r.fraction(r.free_after)), note))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def capacity_warnings(rows: Sequence[PlannedTask], min_free: float = MIN_FREE_FRACTION) -> list[str]:
    """A line for each task after T1 that would start with less than ``min_free`` of the backbone."""
    return [f"warning: task {r.name} would start with {100 * r.fraction(r.free_before):.2f}% of the prunable backbone "
            f"free (< {100 * min_free:.0f}%): raise the prune_ratio of the tasks before it (each then keeps less)"
            for r in rows if r.number > 1 and not r.done and not r.starved and r.fraction(r.free_before) < min_free]


def check_capacity(exp: ExperimentConfig, owners: OwnerMap | None = None,
                   task_names: Mapping[int, str] | None = None) -> list[PlannedTask]:
    """Refuse a plan in which a task would find no free weight left to keep (its prune would
    fail after its whole train stage), with the planned table and, for a resumed run, the
    owner map's. Returns the plan. Only for methods that prune (the others own nothing)."""
    rows = plan_capacity(exp, owners)
    starved = [r for r in rows if r.starved]
    if starved:
        first = starved[0]
        where = ("no free weight left" if first.free_before == 0 else
                 f"too few free weights left to keep any of {len(first.starved)} tensor(s), e.g. {first.starved[0]}")
        current = ""
        if owners is not None and owners.max_task:
            current = "\nthe run's owner map now:\n" + owners.capacity_table(task_names)
        raise ConfigError(
            f"task {first.name} (task {first.number}) would find {where}: the prune ratios of the tasks before it "
            f"leave {100 * first.fraction(first.free_before):.2f}% of the prunable backbone free. Raise the "
            "prune_ratio of earlier tasks (each then keeps less), lower this task's, use a larger model, or run "
            "fewer tasks.\nplanned capacity (share of the prunable backbone):\n" + capacity_plan_table(rows) + current)
    return rows
