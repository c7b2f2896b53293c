"""The popularity / majority floor, computed by hand on a tiny dataset, and shown with the
accuracy matrix so that a model no better than it is visible at once."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from conure_dist.config import TaskPlan, TaskSpec, TrainConfig
from conure_dist.data.format import assign_splits
from conure_dist.data.writer import DatasetWriter
from conure_dist.eval.floors import popularity_floor, popularity_ranks
from conure_dist.launch import accuracy_table


def test_popularity_ranks_are_strict_most_frequent_first_ties_by_id():
    assert popularity_ranks(np.array([0, 5, 9, 5, 1])).tolist() == [5, 2, 1, 3, 4]


@pytest.fixture()
def dataset(tmp_path):
    users = np.arange(400)
    split = assign_splits(0, "clicks", users, np.zeros_like(users))
    # Item 3 is the most clicked, then 7; labels: class 1 for 70 % of users.
    rng = np.random.default_rng(0)
    last = np.where(rng.random(400) < 0.6, 3, np.where(rng.random(400) < 0.5, 7, 5))
    seqs = pa.array([[1, 2, int(x)] for x in last], pa.list_(pa.int32()))
    labels = (rng.random(400) < 0.7).astype(np.int64)
    with DatasetWriter(str(tmp_path / "d"), seed=0, source="t", rows_per_shard=1000) as w:
        w.add_task("clicks", "sequence")
        w.add_task("gender", "class")
        w.add_task("likes", "item")
        w.write("clicks", users, seqs)
        w.write("gender", users, seqs, labels=labels)
        w.write("likes", users, seqs, labels=(last % 4))
        info = w.finish(num_items=9, item_tokens=[str(i) for i in range(1, 10)],
                        label_tokens={"gender": ["f", "m"], "likes": ["a", "b", "c", "d"]})
    gender_test = assign_splits(0, "gender", users, np.zeros_like(users)) == 2
    return info, split == 2, last, labels, gender_test


def test_floors_match_a_hand_count(dataset):
    info, test, last, labels, gender_test = dataset
    clicks = popularity_floor(info, TaskSpec("clicks", "sequence"), k=5)
    # Train counts: items 1 and 2 appear in every train row, then 3, then 7, then 5.
    order = {1: 1, 2: 2, 3: 3, 7: 4, 5: 5}
    expected = np.mean([1.0 / order[int(x)] for x in last[test]])
    assert clicks["mrr@5"] == pytest.approx(expected) and clicks["count"] == test.sum()
    gender = popularity_floor(info, TaskSpec("gender", "class", num_labels=2))
    assert gender["accuracy"] == pytest.approx((labels[gender_test] == 1).mean())  # the majority class is 1


def test_the_matrix_shows_the_floor_and_marks_values_not_above_it():
    tasks = (TaskPlan(TaskSpec("clicks", "sequence")), TaskPlan(TaskSpec("gender", "class", num_labels=2), TrainConfig()))
    state = SimpleNamespace(accuracy=[
        {"after_task": "clicks", "task": "clicks", "metric": "mrr@5", "value": 0.2},
        {"after_task": "gender", "task": "clicks", "metric": "mrr@5", "value": 0.2},
        {"after_task": "gender", "task": "gender", "metric": "accuracy", "value": 0.6},
    ])
    table = accuracy_table(SimpleNamespace(exp=SimpleNamespace(tasks=tasks), state=state),
                           {"clicks": ("mrr@5", 0.1), "gender": ("accuracy", 0.68)})
    lines = table.splitlines()
    assert lines[-2].split() == ["popularity", "0.1000", "0.6800"]
    assert lines[2].split() == ["gender", "0.2000", "0.6000*"]
    assert lines[-1].startswith("* not above the popularity / majority floor")
