"""MovieLens converter on tiny hand-written 100K and 1M layouts, and every bad-input case."""

import os
import re

import pytest

from conure_dist.cli import main
from conure_dist.data.badinput import BadInputError
from conure_dist.data.movielens import MovieLensOptions, prepare_movielens
from conure_dist.data.pipeline import read_split_table

# user 1: clicks (rating < 4) at t=1..5 -> items 10,11,12,13,14; likes 20 (4), 21 (5)
# user 2: clicks 10, 12 (too few with min_clicks=3) -> dropped
# user 3: clicks 15, 10, 11 (t=3,1,2 -> time order 10, 11, 15); rated 5: 22
# user 4: clicks 10, 11, 12; rated 4: 20; rated 5: 23
RATINGS = [(1, 10, 1, 1), (1, 11, 2, 2), (1, 12, 3, 3), (1, 20, 4, 4), (1, 13, 1, 5), (1, 14, 2, 6), (1, 21, 5, 7),
           (2, 10, 1, 1), (2, 12, 2, 2), (2, 20, 5, 3),
           (3, 15, 3, 3), (3, 10, 1, 1), (3, 11, 2, 2), (3, 22, 5, 4),
           (4, 10, 1, 1), (4, 11, 1, 2), (4, 12, 1, 3), (4, 20, 4, 4), (4, 23, 5, 5)]
USERS_100K = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|17|F|writer|32067", "4|30|F|doctor|1"]
USERS_1M = ["1::M::18::17::85711", "2::F::50::0::94043", "3::F::1::20::32067", "4::F::25::6::1"]


def write_100k(path, ratings=RATINGS, users=USERS_100K, extra_ratings=()):
    path.mkdir(exist_ok=True)
    lines = ["\t".join(map(str, r)) for r in ratings] + list(extra_ratings)
    (path / "u.data").write_text("\n".join(lines) + "\n")
    (path / "u.user").write_text("\n".join(users) + "\n")
    return str(path)


def all_rows(info, task):
    rows = []
    for split in ("train", "validation", "test"):
        rows += read_split_table(info, task, split).to_pylist()
    return sorted(rows, key=lambda r: (r["user"], r.get("label", 0)))


def test_ml100k_tasks(tmp_path):
    raw = write_100k(tmp_path / "raw")
    info, report = prepare_movielens(raw, str(tmp_path / "out"), MovieLensOptions(max_clicks=4))
    assert report["layout"] == "ml-100k" and report["users_dropped_fewer_than_3_clicks"] == 1
    assert info.task_names == ("clicks", "rated_4_5", "rated_5", "gender", "age", "occupation")
    tokens = {r["id"]: int(r["token"]) for r in info.item_tokens().to_pylist()}
    assert sorted(tokens.values()) == [10, 11, 12, 13, 14, 15]
    clicks = {r["user"]: [tokens[i] for i in r["seq"]] for r in all_rows(info, "clicks")}
    assert clicks == {1: [11, 12, 13, 14], 3: [10, 11, 15], 4: [10, 11, 12]}  # most recent 4, time order
    likes = info.label_tokens("rated_4_5").column("token").to_pylist()
    assert [(r["user"], likes[r["label"]]) for r in all_rows(info, "rated_4_5")] == [
        (1, "20"), (1, "21"), (3, "22"), (4, "20"), (4, "23")]
    fives = info.label_tokens("rated_5").column("token").to_pylist()
    assert [(r["user"], fives[r["label"]]) for r in all_rows(info, "rated_5")] == [(1, "21"), (3, "22"), (4, "23")]
    gender = info.label_tokens("gender").column("token").to_pylist()
    assert [gender[r["label"]] for r in all_rows(info, "gender")] == ["M", "F", "F"]
    age = info.label_tokens("age").column("token").to_pylist()
    assert [age[r["label"]] for r in all_rows(info, "age")] == ["18-24", "under-18", "25-34"]
    assert all(r["seq"] == next(c for c in all_rows(info, "clicks") if c["user"] == r["user"])["seq"]
               for r in all_rows(info, "rated_4_5"))


def test_ml1m_layout_is_detected(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ratings.dat").write_text("\n".join("::".join(map(str, r)) for r in RATINGS) + "\n")
    (raw / "users.dat").write_text("\n".join(USERS_1M) + "\n")
    info, report = prepare_movielens(str(raw), str(tmp_path / "out"))
    assert report["layout"] == "ml-1m"
    occupation = info.label_tokens("occupation").column("token").to_pylist()
    assert sorted(occupation) == ["doctor/health care", "technician/engineer", "writer"]
    age = info.label_tokens("age").column("token").to_pylist()
    assert [age[r["label"]] for r in all_rows(info, "age")] == ["18-24", "under-18", "25-34"]


def test_unknown_layout(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "ratings.csv").write_text("userId,movieId\n")
    with pytest.raises(BadInputError, match="unknown MovieLens layout"):
        prepare_movielens(str(tmp_path / "raw"), str(tmp_path / "out"))


@pytest.mark.parametrize("bad_line, reason", [
    ("1\t10\t3", "malformed line"),
    ("1\tten\t3\t9", "non-integer field"),
    ("1\t10\t7\t9", "rating out of range"),
    ("", "empty line"),
    ("-5\t10\t3\t9", r"id out of range \(user and movie ids start at 1\): user -5, movie 10"),
    ("1\t0\t3\t9", r"id out of range \(user and movie ids start at 1\): user 1, movie 0"),
    ("1\t10\t3\t-9", "negative timestamp"),
])
def test_bad_rating_lines(tmp_path, bad_line, reason):
    raw = write_100k(tmp_path / "raw", extra_ratings=[bad_line, "3\t16\t1\t9"])
    line_no = len(RATINGS) + 1
    with pytest.raises(BadInputError, match=rf"u.data:{line_no}: {reason}"):
        prepare_movielens(raw, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    info, report = prepare_movielens(raw, str(tmp_path / "out"), MovieLensOptions(skip_bad=True))
    assert re.search(rf"1  {reason.split(':')[0]}", report["skipped"]) and f"first at line {line_no}" in report["skipped"]
    assert info.task("clicks").num_users == 3


# user 2 is dropped from T1 anyway, so skipping its profile line leaves the tasks intact
@pytest.mark.parametrize("user2, reason", [
    ("2|53|X|other|94043", "missing label"),
    ("2|x|F|other|94043", "non-integer field"),
    ("2|53|F|other", "malformed line"),
    ("3|18|F|writer|1", "duplicate user"),
    ("0|53|F|other|94043", "id out of range"),
    ("2|0|F|other|94043", "age out of range"),
    (None, "missing label"),  # user 3 has ratings but no profile line
])
def test_bad_user_lines(tmp_path, user2, reason):
    users = [USERS_100K[0], user2, *USERS_100K[2:]] if user2 else [u for u in USERS_100K if u[0] != "3"]
    raw = write_100k(tmp_path / "raw", users=users)
    with pytest.raises(BadInputError, match=reason):
        prepare_movielens(raw, str(tmp_path / "out"))
    info, report = prepare_movielens(raw, str(tmp_path / "out"), MovieLensOptions(skip_bad=True))
    assert reason in report["skipped"]


def test_an_empty_user_file_is_named(tmp_path):
    raw = write_100k(tmp_path / "raw", users=[])
    with pytest.raises(BadInputError, match=r"u.user: no usable user lines"):
        prepare_movielens(raw, str(tmp_path / "out"), MovieLensOptions(skip_bad=True))


def test_cli_exit_status_and_summary(tmp_path, capsys):
    raw = write_100k(tmp_path / "raw", extra_ratings=["1\t10"])
    assert main(["prepare", "movielens", "--raw", raw, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"u.data:{len(RATINGS) + 1}: malformed line" in err and "--skip-bad" in err
    assert not os.path.exists(tmp_path / "out")
    assert main(["prepare", "movielens", "--raw", raw, "--out", str(tmp_path / "out"), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "clicks" in out and "validation" in out and "skipped rows: 1" in out


def test_shards_are_not_in_user_order(tmp_path):
    # u.data sorted by user, as MovieLens ships it: 40 users, 4 clicks and 5 likes each.
    ratings = [(u, 100 + (u * 7 + k) % 30, 1 if k < 4 else 5, k + 1) for u in range(1, 41) for k in range(9)]
    users = [f"{u}|{20 + u}|{'MF'[u % 2]}|{('writer', 'doctor')[u % 2]}|1" for u in range(1, 41)]
    raw = write_100k(tmp_path / "raw", ratings=ratings, users=users)

    def order(out, seed):
        info, _ = prepare_movielens(raw, str(tmp_path / out), MovieLensOptions(seed=seed))
        return {t: [r["user"] for r in read_split_table(info, t, "train").to_pylist()] for t in ("clicks", "rated_5")}

    first = order("a", 0)
    for task, sequence in first.items():
        assert len(sequence) > 20 and sequence != sorted(sequence), task
    likes = first["rated_5"]  # a user's likes do not come one after another
    assert sum(a == b for a, b in zip(likes, likes[1:])) < len(likes) // 3
    assert order("b", 0) == first
