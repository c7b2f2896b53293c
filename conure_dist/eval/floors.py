"""The floor every trained model must clear: recommend the most popular items of the train
split (item and sequence tasks) or predict its majority class (class tasks), the same for every
user, scored on the same split with the same metrics and tie rule as a model.

Pop is a strict ranking (equal counts ordered by id), so its numbers are those of a real
popularity recommender, not of a tie that the conservative rank rule would punish.
"""

from __future__ import annotations

import numpy as np
import torch

from conure_dist.config import TaskSpec
from conure_dist.data.format import PAD_ID, DatasetInfo
from conure_dist.eval.evaluate import MetricSums, main_metric


def popularity_ranks(counts: np.ndarray) -> np.ndarray:
    """1-based rank of every id when ids are ordered by ``counts``, most frequent first, ties by id."""
    order = np.lexsort((np.arange(counts.size), -counts.astype(np.int64)))
    ranks = np.empty(counts.size, dtype=np.int64)
    ranks[order] = np.arange(1, counts.size + 1)
    return ranks


def popularity_floor(info: DatasetInfo, spec: TaskSpec, k: int = 5, split: str = "test") -> dict[str, float]:
    """The metrics of the popularity / majority predictor on ``split`` of task ``spec.name``."""
    ranks = _popularity_target_ranks(info, spec, split)
    sums = MetricSums("class" if spec.kind == "class" else "ranking", k)
    if spec.kind == "class":
        sums.add_correct(ranks == 1)
    else:
        sums.add_ranks(ranks)
    return sums.result()


def floor_standard_error(info: DatasetInfo, spec: TaskSpec, k: int = 5, split: str = "test") -> float:
    """Standard error of the floor's main metric from the sampling of ``split``'s rows alone
    (per-row reciprocal rank within k, or correct / wrong): how far two predictors of this
    quality may differ on this split by chance."""
    ranks = _popularity_target_ranks(info, spec, split).numpy()
    per_row = (ranks == 1).astype(float) if spec.kind == "class" else np.where(ranks <= k, 1.0 / ranks, 0.0)
    return float(per_row.std(ddof=1) / np.sqrt(len(per_row))) if len(per_row) > 1 else float("nan")


def _popularity_target_ranks(info: DatasetInfo, spec: TaskSpec, split: str) -> torch.Tensor:
    from conure_dist.data.pipeline import read_split_table

    table = read_split_table(info, spec.name, split)
    counts = info.popularity(spec.name).copy()
    if spec.kind == "sequence":
        counts[PAD_ID] = -1  # padding is never recommended
        seq = table.column("seq").combine_chunks()
        lengths = np.diff(seq.offsets.to_numpy())
        last = seq.values.to_numpy()[seq.offsets.to_numpy()[1:][lengths > 0] - 1]  # each row's last item
        targets = last[last != PAD_ID].astype(np.int64)
    else:
        targets = table.column("label").to_numpy().astype(np.int64)
    return torch.as_tensor(popularity_ranks(counts)[targets])


def floors(info: DatasetInfo, tasks, split: str = "test") -> dict[str, tuple[str, float]]:
    """Task name -> (main metric, the floor's value) for each :class:`~conure_dist.config.TaskPlan`."""
    out = {}
    for plan in tasks:
        metric = main_metric(plan.spec, plan.train.metric_k)
        out[plan.spec.name] = (metric, popularity_floor(info, plan.spec, plan.train.metric_k, split)[metric])
    return out
