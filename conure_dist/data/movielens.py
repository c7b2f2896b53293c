"""MovieLens 100K / 1M -> the paper's six ML tasks.

Layouts are detected from the file names: ``u.data`` + ``u.user`` (100K, tab and ``|``
separated) or ``ratings.dat`` + ``users.dat`` (1M, ``::`` separated).

Tasks (SIGIR 2021, section 5.1, ML setting):

- ``clicks`` (sequence): each user's most recent ``max_clicks`` (30) interactions rated below
  4, in time order. Users with fewer than ``min_clicks`` (3) such interactions are dropped
  and counted; only users kept here appear in later tasks, whose input is this sequence.
- ``rated_4_5`` / ``rated_5`` (item): one instance per item the user rated 4-5 / 5; labels
  are those items in their own label space (ids by ascending movie id).
- ``gender``, ``age`` (ML-1M age buckets; 100K ages are bucketed the same way),
  ``occupation`` (class).

Item ids of the sequence task are the T1 vocabulary, ordered by movie id. Ties in timestamps
keep the file order.

Example::

    info = prepare_movielens("/data/ml-100k", "/data/ml100k-prepared")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from conure_dist.data.badinput import BadInputError, BadRows, convert_from
from conure_dist.data.format import DatasetInfo
from conure_dist.data.writer import DatasetWriter

AGE_BUCKETS = ((1, "under-18"), (18, "18-24"), (25, "25-34"), (35, "35-44"), (45, "45-49"),
               (50, "50-55"), (56, "56+"))  # ML-1M codes: lower bound -> label
ML1M_OCCUPATIONS = ("other", "academic/educator", "artist", "clerical/admin", "college/grad student",
                    "customer service", "doctor/health care", "executive/managerial", "farmer",
                    "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
                    "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
                    "unemployed", "writer")


@dataclass(frozen=True)
class MovieLensOptions:
    max_clicks: int = 30
    min_clicks: int = 3
    seed: int = 0
    skip_bad: bool = False
    rows_per_shard: int = 100_000
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_clicks <= self.max_clicks:
            raise ValueError(f"--min-clicks {self.min_clicks}, --max-clicks {self.max_clicks}: "
                             "need 1 <= min-clicks <= max-clicks")


@dataclass(frozen=True)
class Layout:
    name: str  # "ml-100k" | "ml-1m"
    ratings: str
    users: str
    rating_sep: str
    user_sep: str


def detect_layout(raw: str) -> Layout:
    """Which MovieLens release ``raw`` holds, from its file names."""
    def has(*names: str) -> bool:
        return all(os.path.isfile(os.path.join(raw, n)) for n in names)

    if has("u.data", "u.user"):
        return Layout("ml-100k", os.path.join(raw, "u.data"), os.path.join(raw, "u.user"), "\t", "|")
    if has("ratings.dat", "users.dat"):
        return Layout("ml-1m", os.path.join(raw, "ratings.dat"), os.path.join(raw, "users.dat"), "::", "::")
    found = sorted(os.listdir(raw)) if os.path.isdir(raw) else "directory not found"
    raise BadInputError(f"{raw}: unknown MovieLens layout; expected u.data + u.user (100K) or "
                        f"ratings.dat + users.dat (1M), found {found}")


@dataclass
class _Ratings:
    user: list = field(default_factory=list)
    item: list = field(default_factory=list)
    rating: list = field(default_factory=list)
    time: list = field(default_factory=list)
    line: list = field(default_factory=list)


def _read_ratings(layout: Layout, bad: BadRows) -> _Ratings:
    out = _Ratings()
    with open(layout.ratings, encoding="latin-1") as f:
        for no, text in enumerate(f, 1):
            text = text.rstrip("\r\n")
            if not text.strip():
                bad.report(layout.ratings, no, "empty line")
                continue
            parts = text.split(layout.rating_sep)
            if len(parts) != 4:
                bad.report(layout.ratings, no, "malformed line", f"expected 4 fields, got {len(parts)}: {text!r}")
                continue
            try:
                user, item, rating, time = (int(p) for p in parts)
            except ValueError:
                bad.report(layout.ratings, no, "non-integer field", repr(text))
                continue
            if not 1 <= rating <= 5:
                bad.report(layout.ratings, no, "rating out of range 1..5", str(rating))
                continue
            if user < 1 or item < 1:
                bad.report(layout.ratings, no, "id out of range (user and movie ids start at 1)",
                           f"user {user}, movie {item}")
                continue
            if time < 0:
                bad.report(layout.ratings, no, "negative timestamp", str(time))
                continue
            out.user.append(user), out.item.append(item), out.rating.append(rating)
            out.time.append(time), out.line.append(no)
    if not out.user:
        raise BadInputError(f"{layout.ratings}: no usable ratings")
    return out


def _age_bucket(age: int) -> str:
    label = AGE_BUCKETS[0][1]
    for lower, name in AGE_BUCKETS:
        if age >= lower:
            label = name
    return label


def _read_users(layout: Layout, bad: BadRows) -> dict[int, tuple[str, str, str, int]]:
    """user -> (gender, age bucket, occupation, line)."""
    profiles: dict[int, tuple[str, str, str, int]] = {}
    codes = {lower for lower, _ in AGE_BUCKETS}
    with open(layout.users, encoding="latin-1") as f:
        for no, text in enumerate(f, 1):
            text = text.rstrip("\r\n")
            if not text.strip():
                bad.report(layout.users, no, "empty line")
                continue
            parts = text.split(layout.user_sep)
            if len(parts) != 5:
                bad.report(layout.users, no, "malformed line", f"expected 5 fields, got {len(parts)}: {text!r}")
                continue
            if layout.name == "ml-100k":
                user, age, gender, occupation = parts[0], parts[1], parts[2], parts[3]
            else:
                user, gender, age, occupation = parts[0], parts[1], parts[2], parts[3]
            try:
                user_id, age_value = int(user), int(age)
                if layout.name == "ml-1m":
                    occupation = ML1M_OCCUPATIONS[int(occupation)]
            except (ValueError, IndexError):
                bad.report(layout.users, no, "non-integer field", repr(text))
                continue
            if user_id < 1:
                bad.report(layout.users, no, "id out of range (user ids start at 1)", str(user_id))
                continue
            if not 1 <= age_value <= 120:
                bad.report(layout.users, no, "age out of range 1..120", str(age_value))
                continue
            if gender not in ("M", "F"):
                bad.report(layout.users, no, "missing label", f"gender must be M or F, got {gender!r}")
                continue
            if layout.name == "ml-1m" and age_value not in codes:
                bad.report(layout.users, no, "missing label", f"unknown ML-1M age code {age_value}")
                continue
            if not occupation.strip():
                bad.report(layout.users, no, "missing label", "empty occupation")
                continue
            if user_id in profiles:
                bad.report(layout.users, no, "duplicate user", f"user {user_id} first at line {profiles[user_id][3]}")
                continue
            profiles[user_id] = (gender, _age_bucket(age_value), occupation.strip(), no)
    if not profiles:
        raise BadInputError(f"{layout.users}: no usable user lines (every user's gender, age and occupation "
                            "come from this file)")
    return profiles


def _group_starts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal keys in a sorted array."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if keys.size else np.zeros(0, dtype=np.int64)
    return starts, np.diff(np.r_[starts, keys.size])


def _rank_in_group(keys: np.ndarray) -> np.ndarray:
    starts, lengths = _group_starts(keys)
    return np.arange(keys.size) - np.repeat(starts, lengths)


def prepare_movielens(raw: str, out_dir: str, options: MovieLensOptions = MovieLensOptions(),
                      ) -> tuple[DatasetInfo, dict]:
    """Convert a MovieLens directory (or a URI, downloaded first); returns the info and a report
    (dropped users, skipped rows)."""
    return convert_from(raw, lambda local: _prepare_movielens(local, out_dir, options))


def _prepare_movielens(raw: str, out_dir: str, options: MovieLensOptions) -> tuple[DatasetInfo, dict]:
    layout = detect_layout(raw)
    bad = BadRows(skip=options.skip_bad)
    r = _read_ratings(layout, bad)
    profiles = _read_users(layout, bad)
    user, item = np.array(r.user, np.int64), np.array(r.item, np.int64)
    rating, line = np.array(r.rating, np.int64), np.array(r.line, np.int64)
    order = np.lexsort((line, np.array(r.time, np.int64), user))  # by user, then time, then file order
    user, item, rating, line = user[order], item[order], rating[order], line[order]

    # T1: most recent max_clicks interactions rated below 4; keep users with >= min_clicks.
    click = rating < 4
    cu, ci = user[click], item[click]
    starts, lengths = _group_starts(cu)
    long_enough = lengths >= options.min_clicks
    from_end = np.repeat(lengths, lengths) - _rank_in_group(cu)
    keep = (from_end <= options.max_clicks) & np.repeat(long_enough, lengths)
    kept_users = cu[starts[long_enough]]
    all_users = np.unique(user)
    dropped_users = int(all_users.size - kept_users.size)
    # users without a profile line cannot have profile labels: report them (file: ratings, first line)
    missing = [u for u in kept_users.tolist() if u not in profiles]
    if missing:
        first_line = {int(u): int(l) for u, l in zip(user[::-1], line[::-1])}
        for u in missing:
            bad.report(layout.ratings, first_line[u], "missing label", f"user {u} has no line in {layout.users}")
        kept_mask = ~np.isin(kept_users, missing)
        keep &= np.isin(cu, kept_users[kept_mask])
        kept_users = kept_users[kept_mask]
    if kept_users.size == 0:
        raise BadInputError(f"{layout.ratings}: no user has >= {options.min_clicks} interactions rated below 4")
    seq_users, seq_items = cu[keep], ci[keep]
    vocab = np.unique(seq_items)  # item id k+1 <-> movie vocab[k]
    _, seq_lengths = _group_starts(seq_users)
    offsets = np.r_[0, np.cumsum(seq_lengths)].astype(np.int32)
    seqs = pa.ListArray.from_arrays(pa.array(offsets), pa.array((np.searchsorted(vocab, seq_items) + 1).astype(np.int32)))
    row_of = {int(u): i for i, u in enumerate(kept_users)}  # kept_users is sorted, like seq rows

    with DatasetWriter(out_dir, seed=options.seed, source=layout.name, rows_per_shard=options.rows_per_shard,
                       overwrite=options.overwrite) as writer:
        writer.add_task("clicks", "sequence")
        writer.write("clicks", kept_users, seqs)
        labels: dict[str, list[str]] = {}
        for name, positive in (("rated_4_5", rating >= 4), ("rated_5", rating == 5)):
            mask = positive & np.isin(user, kept_users)
            pu, pi = user[mask], item[mask]
            space = np.unique(pi)
            writer.add_task(name, "item")
            rows = np.array([row_of[int(u)] for u in pu], dtype=np.int64)
            writer.write(name, pu, seqs.take(pa.array(rows, pa.int64())), np.searchsorted(space, pi),
                         instances=_rank_in_group(pu))
            labels[name] = [str(m) for m in space.tolist()]
        for index, name in enumerate(("gender", "age", "occupation")):
            values = [profiles[int(u)][index] for u in kept_users]
            if name == "age":
                space = [b for _, b in AGE_BUCKETS if b in set(values)]
            else:
                space = sorted(set(values))
            ids = {v: i for i, v in enumerate(space)}
            writer.add_task(name, "class")
            writer.write(name, kept_users, seqs, np.array([ids[v] for v in values], dtype=np.int32))
            labels[name] = space
        for name, space in labels.items():
            if len(space) < 2:
                raise BadInputError(f"{raw}: task {name!r} has {len(space)} distinct label(s); needs >= 2")
        info = writer.finish(num_items=int(vocab.size), item_tokens=[str(m) for m in vocab.tolist()],
                             label_tokens=labels)
    report = {"layout": layout.name, "users_in_ratings": int(all_users.size),
              f"users_dropped_fewer_than_{options.min_clicks}_clicks": dropped_users,
              "skipped": bad.summary()}
    return info, report
