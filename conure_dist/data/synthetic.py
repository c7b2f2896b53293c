"""A TTL-shaped synthetic dataset with planted structure, so that a small model can show
learning, transfer and forgetting.

The planted structure:

- every user has a *primary* and a *secondary* topic and a taste weight ``w`` (probability
  of the primary topic); items are split into ``num_topics`` equal blocks, Zipf-popular
  inside each block;
- **T1** ``pretrain`` (sequence): a topic walk (stay on the previous topic with
  ``stay_prob``, else draw primary/secondary by ``w``); staying also follows a *chain* (the
  next item in the block) with ``chain_prob`` — a next-item signal a small model can learn;
- **T2** ``click`` (item): labels belong to topics too (label ``y`` has topic ``y % K``);
  1-2 instances per user drawn from the user's topics;
- **T3** ``like`` (item): with ``like_follows_click`` the label is the click label's
  counterpart in the like space (same topic, same rank), else a fresh draw from the user's
  topics — so T3 is correlated with T2 and, through the topics, with T1;
- **T4..T6** ``age`` / ``gender`` / ``lifestatus`` (class): fixed functions of the
  (primary, secondary) topics, flipped to a random class with ``label_noise``. The topics
  are visible in the sequence, so these labels are predictable from it.

Users are generated in chunks of ``users_per_chunk`` from ``default_rng([seed, chunk])``, and
every chunk is written before the next is made, so the ``ttl`` preset (1.47M users) streams
within a few GiB. The same seed and config give the same dataset.

Example::

    info = prepare_synthetic("demo", "/tmp/demo", seed=0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from conure_dist.data.format import DatasetInfo
from conure_dist.data.writer import DatasetWriter

TASKS = (("pretrain", "sequence"), ("click", "item"), ("like", "item"),
         ("age", "class"), ("gender", "class"), ("lifestatus", "class"))


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and the strength of the planted signals."""

    num_users: int
    num_items: int
    seq_len: int  # longest sequence
    min_seq_len: int
    num_topics: int
    click_labels: int
    like_labels: int
    age_classes: int = 8
    gender_classes: int = 2
    life_classes: int = 6
    # share of users that have instances in each task, T1..T6 (T1 must be 1.0)
    task_user_fraction: tuple[float, ...] = (1.0, 0.95, 0.7, 1.0, 1.0, 0.7)
    stay_prob: float = 0.75
    chain_prob: float = 0.6
    zipf_exponent: float = 1.0
    like_follows_click: float = 0.6
    label_noise: float = 0.15
    users_per_chunk: int = 50_000
    rows_per_shard: int = 100_000

    def __post_init__(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ValueError(f"SyntheticConfig: {message}")

        need(self.num_users >= 1, "num_users must be >= 1")
        need(self.num_topics >= 2, "num_topics must be >= 2")
        need(self.num_items >= 2 * self.num_topics, "num_items must be >= 2 * num_topics")
        need(1 <= self.min_seq_len <= self.seq_len, "need 1 <= min_seq_len <= seq_len")
        for name in ("click_labels", "like_labels"):
            need(getattr(self, name) >= self.num_topics, f"{name} must be >= num_topics")
        need(self.age_classes >= 2 and self.gender_classes >= 2 and self.life_classes >= 2,
             "class tasks need >= 2 classes")
        need(len(self.task_user_fraction) == len(TASKS) and self.task_user_fraction[0] == 1.0
             and all(0 < f <= 1 for f in self.task_user_fraction),
             f"task_user_fraction: {len(TASKS)} values in (0, 1], the first 1.0")
        for name in ("stay_prob", "chain_prob", "like_follows_click", "label_noise"):
            need(0 <= getattr(self, name) <= 1, f"{name} must lie in [0, 1]")
        need(self.users_per_chunk >= 1 and self.rows_per_shard >= 1, "chunk and shard sizes must be >= 1")


PRESETS: dict[str, SyntheticConfig] = {
    # A 6-task run on a 2-core CPU in a couple of minutes. Sequences of 20-25 items: with fewer,
    # the profile tasks' planted signal (which needs a user's secondary topic) was too weak to
    # beat the majority class reliably on validation.
    "demo": SyntheticConfig(num_users=3000, num_items=800, seq_len=25, min_seq_len=20, num_topics=8,
                            click_labels=200, like_labels=120),
    # Benchmarks: 1M full-length sequences.
    "ttl-small": SyntheticConfig(num_users=1_000_000, num_items=100_000, seq_len=100, min_seq_len=100,
                                 num_topics=32, click_labels=5000, like_labels=2000,
                                 task_user_fraction=(1.0, 0.5, 0.3, 0.3, 0.3, 0.3)),
    # The paper's TTL sizes (SIGIR 2021, Table 1), approximately.
    "ttl": SyntheticConfig(num_users=1_470_000, num_items=646_000, seq_len=100, min_seq_len=10,
                           num_topics=64, click_labels=18_000, like_labels=8000),
}


@dataclass(frozen=True)
class _Users:
    """One chunk of generated users."""

    ids: np.ndarray  # int64
    primary: np.ndarray
    secondary: np.ndarray
    seqs: pa.ListArray


class _Generator:
    def __init__(self, config: SyntheticConfig, seed: int) -> None:
        self.c = config
        self.seed = seed
        k = config.num_topics
        self.block = config.num_items // k  # items of topic t: 1 + t*block ... (t+1)*block
        self.item_cdf = self._zipf_cdf(self.block)
        self.click_cdf = self._zipf_cdf(config.click_labels // k)
        self.like_cdf = self._zipf_cdf(config.like_labels // k)

    def _zipf_cdf(self, n: int) -> np.ndarray:
        p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** self.c.zipf_exponent
        return np.cumsum(p / p.sum())

    @staticmethod
    def _draw(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(n)), cdf.size - 1)

    def chunks(self) -> Iterator[tuple[np.random.Generator, _Users]]:
        c = self.c
        for chunk, start in enumerate(range(0, c.num_users, c.users_per_chunk)):
            rng = np.random.default_rng([self.seed, chunk])
            n = min(c.users_per_chunk, c.num_users - start)
            yield rng, self._users(rng, np.arange(start, start + n, dtype=np.int64))

    def _users(self, rng: np.random.Generator, ids: np.ndarray) -> _Users:
        c, n = self.c, ids.size
        k = c.num_topics
        primary = rng.integers(0, k, n)
        secondary = (primary + rng.integers(1, k, n)) % k  # always differs from primary
        weight = rng.uniform(0.55, 0.95, n)
        lengths = rng.integers(c.min_seq_len, c.seq_len + 1, n)
        topics = np.empty((n, c.seq_len), dtype=np.int64)
        ranks = np.empty((n, c.seq_len), dtype=np.int64)
        topics[:, 0] = np.where(rng.random(n) < weight, primary, secondary)
        ranks[:, 0] = self._draw(rng, self.item_cdf, n)
        for t in range(1, c.seq_len):
            stay = rng.random(n) < c.stay_prob
            fresh = np.where(rng.random(n) < weight, primary, secondary)
            topics[:, t] = np.where(stay, topics[:, t - 1], fresh)
            chain = stay & (rng.random(n) < c.chain_prob)
            ranks[:, t] = np.where(chain, (ranks[:, t - 1] + 1) % self.block, self._draw(rng, self.item_cdf, n))
        items = (1 + topics * self.block + ranks).astype(np.int32)
        keep = np.arange(c.seq_len)[None, :] < lengths[:, None]  # row-major: each row's first items
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        seqs = pa.ListArray.from_arrays(pa.array(offsets), pa.array(items[keep]))
        return _Users(ids, primary, secondary, seqs)

    def _topic_labels(self, rng: np.random.Generator, users: _Users, rows: np.ndarray, cdf: np.ndarray,
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Item-task labels of the given user rows: topic from the user's tastes, Zipf rank in it."""
        topic = np.where(rng.random(rows.size) < 0.8, users.primary[rows], users.secondary[rows])
        rank = self._draw(rng, cdf, rows.size)
        return topic + self.c.num_topics * rank, rank

    def _noisy(self, rng: np.random.Generator, labels: np.ndarray, classes: int) -> np.ndarray:
        flip = rng.random(labels.size) < self.c.label_noise
        return np.where(flip, rng.integers(0, classes, labels.size), labels)

    def write_chunk(self, writer: DatasetWriter, rng: np.random.Generator, users: _Users) -> None:
        c, k = self.c, self.c.num_topics
        writer.write("pretrain", users.ids, users.seqs)
        member = [rng.random(users.ids.size) < f for f in c.task_user_fraction]
        # click: 1 or 2 instances per member user
        rows = np.flatnonzero(member[1])
        rows = np.repeat(rows, 1 + (rng.random(rows.size) < 0.3))
        instance = np.arange(rows.size) - np.searchsorted(rows, rows)  # 0, 1 within each user
        click, click_rank = self._topic_labels(rng, users, rows, self.click_cdf)
        writer.write("click", users.ids[rows], users.seqs.take(pa.array(rows)), click, instance)
        # like: follows the user's first click where there is one, else fresh
        like_rows = np.flatnonzero(member[2])
        fresh, _ = self._topic_labels(rng, users, like_rows, self.like_cdf)
        first_click = np.full(users.ids.size, -1)
        first_click[rows[instance == 0]] = np.flatnonzero(instance == 0)
        src = first_click[like_rows]
        follow = (src >= 0) & (rng.random(like_rows.size) < c.like_follows_click)
        like_rank = np.minimum(click_rank[np.maximum(src, 0)], c.like_labels // k - 1)
        follow_label = (click[np.maximum(src, 0)] % k) + k * like_rank
        like = np.where(follow, follow_label, fresh)
        writer.write("like", users.ids[like_rows], users.seqs.take(pa.array(like_rows)), like)
        profiles = {
            "age": ((users.primary * 3 + users.secondary) % c.age_classes, c.age_classes, member[3]),
            "gender": ((users.primary >= k // 2).astype(np.int64), c.gender_classes, member[4]),
            "lifestatus": (users.secondary % c.life_classes, c.life_classes, member[5]),
        }
        for name, (labels, classes, mask) in profiles.items():
            rows = np.flatnonzero(mask)
            writer.write(name, users.ids[rows], users.seqs.take(pa.array(rows)),
                         self._noisy(rng, labels[rows], classes))


def resolve_config(preset_or_config: str | SyntheticConfig, **overrides) -> SyntheticConfig:
    """A preset by name (or a config), with fields replaced by keyword overrides."""
    if isinstance(preset_or_config, SyntheticConfig):
        config = preset_or_config
    elif preset_or_config in PRESETS:
        config = PRESETS[preset_or_config]
    else:
        raise ValueError(f"unknown synthetic preset {preset_or_config!r}; one of {sorted(PRESETS)}")
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def prepare_synthetic(preset_or_config: str | SyntheticConfig, out_dir: str, seed: int = 0, *,
                      overwrite: bool = False) -> DatasetInfo:
    """Generate and write a synthetic dataset; returns its :class:`DatasetInfo`."""
    config = resolve_config(preset_or_config)
    source = f"synthetic:{preset_or_config}" if isinstance(preset_or_config, str) else "synthetic"
    gen = _Generator(config, seed)
    with DatasetWriter(out_dir, seed=seed, source=source, rows_per_shard=config.rows_per_shard,
                       overwrite=overwrite) as writer:
        for name, kind in TASKS:
            writer.add_task(name, kind)
        for rng, users in gen.chunks():
            gen.write_chunk(writer, rng, users)
        k = config.num_topics
        labels = {
            "click": [f"click_{y}" for y in range(k * (config.click_labels // k))],
            "like": [f"like_{y}" for y in range(k * (config.like_labels // k))],
            "age": [f"age_{y}" for y in range(config.age_classes)],
            "gender": [f"gender_{y}" for y in range(config.gender_classes)],
            "lifestatus": [f"life_{y}" for y in range(config.life_classes)],
        }
        return writer.finish(num_items=config.num_items, item_tokens=[str(i) for i in range(1, config.num_items + 1)],
                             label_tokens=labels)
