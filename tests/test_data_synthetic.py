"""Synthetic generator: determinism, presets, and the planted structure a small model can learn."""

import dataclasses

import numpy as np
import pytest

from conure_dist.cli import main
from conure_dist.data.pipeline import read_split_table
from conure_dist.data.synthetic import PRESETS, SyntheticConfig, prepare_synthetic

CONFIG = SyntheticConfig(num_users=1500, num_items=400, seq_len=25, min_seq_len=5, num_topics=8,
                         click_labels=80, like_labels=40, users_per_chunk=500)


def all_rows(info, task):
    import pyarrow as pa

    return pa.concat_tables([read_split_table(info, task, s) for s in ("train", "validation", "test")])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return prepare_synthetic(CONFIG, str(tmp_path_factory.mktemp("syn") / "d"), seed=5)


def test_deterministic_for_a_seed(tmp_path, demo):
    again = prepare_synthetic(CONFIG, str(tmp_path / "again"), seed=5)
    other = prepare_synthetic(CONFIG, str(tmp_path / "other"), seed=6)
    for task in demo.task_names:
        assert all_rows(again, task).equals(all_rows(demo, task))
    assert not all_rows(other, "pretrain").equals(all_rows(demo, "pretrain"))


def test_shapes(demo):
    t1 = all_rows(demo, "pretrain")
    assert t1.num_rows == CONFIG.num_users
    lengths = np.diff(t1.column("seq").combine_chunks().offsets.to_numpy())
    assert lengths.min() >= CONFIG.min_seq_len and lengths.max() <= CONFIG.seq_len
    assert [t.kind for t in demo.tasks] == ["sequence", "item", "item", "class", "class", "class"]
    assert [t.num_labels for t in demo.tasks[1:]] == [80, 40, 8, 2, 6]


def _primary_topics(info, table):
    block = CONFIG.num_items // CONFIG.num_topics
    topics = []
    for seq in table.column("seq").to_pylist():
        topics.append(np.bincount((np.array(seq) - 1) // block, minlength=CONFIG.num_topics).argmax())
    return np.array(topics)


def test_planted_structure_is_learnable(demo):
    k = CONFIG.num_topics
    # T1: a strong next-item signal (successor inside the topic block)
    seqs = all_rows(demo, "pretrain").column("seq").to_pylist()
    pairs = [(a, b) for s in seqs for a, b in zip(s, s[1:])]
    successor = np.mean([b == a + 1 or (b - 1) % (CONFIG.num_items // k) == 0 and a % (CONFIG.num_items // k) == 0
                         for a, b in pairs])
    assert successor > 0.3
    # profile labels follow from the sequence: gender = primary topic in the upper half
    gender = all_rows(demo, "gender")
    predicted = (_primary_topics(demo, gender) >= k // 2).astype(int)
    assert np.mean(predicted == gender.column("label").to_numpy()) > 0.75
    # item tasks: labels come from the user's topics, and like follows click
    click = all_rows(demo, "click")
    assert np.mean(click.column("label").to_numpy() % k == _primary_topics(demo, click)) > 0.5
    first_click = {}
    for u, y in zip(click.column("user").to_pylist(), click.column("label").to_pylist()):
        first_click.setdefault(u, y)
    like = all_rows(demo, "like")
    pairs = [(first_click[u] % k, y % k) for u, y in zip(like.column("user").to_pylist(), like.column("label").to_pylist())
             if u in first_click]
    assert np.mean([a == b for a, b in pairs]) > 0.6  # chance is 1/k


def test_presets_match_the_paper_sizes():
    ttl = PRESETS["ttl"]
    assert (ttl.num_users, ttl.num_items, ttl.seq_len) == (1_470_000, 646_000, 100)
    assert (ttl.click_labels, ttl.like_labels, ttl.age_classes, ttl.gender_classes, ttl.life_classes) == (
        18_000, 8000, 8, 2, 6)
    assert ttl.users_per_chunk <= 100_000  # streamed in chunks
    small = PRESETS["ttl-small"]
    assert small.num_users >= 1_000_000 and small.min_seq_len == small.seq_len == 100
    demo = PRESETS["demo"]
    assert demo.num_users <= 4000 and demo.num_items <= 1000 and demo.seq_len <= 30


def test_bad_config():
    with pytest.raises(ValueError, match="min_seq_len"):
        dataclasses.replace(CONFIG, min_seq_len=30)
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        prepare_synthetic("huge", "/nonexistent")


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert main(["prepare", "synthetic", "--preset", "demo", "--num-users", "300", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "users 300" in text and "lifestatus" in text
