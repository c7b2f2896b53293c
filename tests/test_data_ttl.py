"""TTL converter on tiny hand-written files: identity by sequence, OOV, multi-label lines, bad input."""

import os

import pytest

from conure_dist.cli import main
from conure_dist.data.badinput import BadInputError
from conure_dist.data.pipeline import read_split_table
from conure_dist.data.ttl import TaskFile, TTLOptions, prepare_ttl

TASKS = (TaskFile("pretrain", "t1.csv", "sequence"), TaskFile("click", "click.csv", "item"),
         TaskFile("gender", "gender.csv", "class"))


def write_raw(path, t1=None, click=None, gender=None):
    path.mkdir(exist_ok=True)
    files = {
        "t1.csv": t1 or ["0,0,a,b,c", "b,c", "c,d,e,a"],
        "click.csv": click or ["0,a,b,c,,x,y", "c,d,e,a,,y", "zz,b,,x"],
        "gender.csv": gender or ["a,b,c,,m", "b,c,,f", "c,d,e,a,,f"],
    }
    for name, lines in files.items():
        (path / name).write_text("\n".join(lines) + "\n")
    return str(path)


def rows(info, task):
    out = []
    for split in ("train", "validation", "test"):
        out += read_split_table(info, task, split).to_pylist()
    return sorted(out, key=lambda r: (r["user"], r.get("label", -1)))


def test_ttl_conversion(tmp_path):
    raw = write_raw(tmp_path / "raw")
    info, report = prepare_ttl(raw, str(tmp_path / "out"), TTLOptions(tasks=TASKS))
    items = {r["id"]: r["token"] for r in info.item_tokens().to_pylist()}
    assert items == {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "<oov>"}  # padding "0" dropped
    assert info.num_items == 6 and info.oov_item_id == 6
    assert report["oov_tokens"] == {"click": 1, "gender": 0}
    assert info.task("click").oov_tokens == 1
    t1 = {r["user"]: r["seq"] for r in rows(info, "pretrain")}
    assert t1 == {0: [1, 2, 3], 1: [2, 3], 2: [3, 4, 5, 1]}
    labels = info.label_tokens("click").column("token").to_pylist()
    click = [(r["user"], r["seq"], labels[r["label"]]) for r in rows(info, "click")]
    # user 0 appears with two labels (two instances); the OOV line is a new user (3)
    assert click == [(0, [1, 2, 3], "x"), (0, [1, 2, 3], "y"), (2, [3, 4, 5, 1], "y"), (3, [6, 2], "x")]
    gender = info.label_tokens("gender").column("token").to_pylist()
    assert [(r["user"], gender[r["label"]]) for r in rows(info, "gender")] == [(0, "m"), (1, "f"), (2, "f")]
    assert info.popularity("pretrain").shape == (7,)


def test_default_task_files_and_task_option():
    assert [t.file for t in TTLOptions().tasks][:3] == [
        "original_desen_pretrain.csv", "original_desen_finetune_click_nouserID.csv",
        "original_desen_finetune_like_nouserID.csv"]
    assert TaskFile.parse("likes=dir/f.csv:item") == TaskFile("likes", "dir/f.csv", "item")
    for bad in ("likes", "likes=f.csv", "likes=f.csv:ranking", "1x=f.csv:item"):
        with pytest.raises(ValueError):
            TaskFile.parse(bad)


@pytest.mark.parametrize("files, where, reason", [
    ({"click": ["a,b,c,x"]}, "click.csv:1", "missing ',,' before the label"),
    ({"click": ["a,b,c,,x", "a,b,,"]}, "click.csv:2", "missing label"),
    ({"click": ["a,b,c,,x", "a,,b,,y"]}, "click.csv:2", "missing label"),  # seq 'a', labels 'b,,y'
    ({"t1": ["a,b", "0,0,0"]}, "t1.csv:2", "empty sequence"),
    ({"t1": ["a,b", ""]}, "t1.csv:2", "empty line"),
    ({"t1": ["a,b", "a,,b"]}, "t1.csv:2", r"',,' \(labels\) in the sequence-task file"),
    ({"gender": ["a,b,,m", "a, ,b,,f"]}, "gender.csv:2", "empty item token"),
])
def test_bad_lines(tmp_path, files, where, reason):
    raw = write_raw(tmp_path / "raw", **files)
    with pytest.raises(BadInputError, match=rf"{where}: {reason}"):
        prepare_ttl(raw, str(tmp_path / "out"), TTLOptions(tasks=TASKS))
    assert not os.path.exists(tmp_path / "out")


def test_missing_label_detail_and_skip_bad(tmp_path):
    raw = write_raw(tmp_path / "raw", click=["a,b,c,,x", "a,b,,", "b,c,,y", "q"])
    info, report = prepare_ttl(raw, str(tmp_path / "out"), TTLOptions(tasks=TASKS, skip_bad=True))
    assert "skipped rows: 2" in report["skipped"]
    assert "missing label" in report["skipped"] and "missing ',,'" in report["skipped"]
    assert sum(info.task("click").counts.values()) == 2


def test_task_list_errors(tmp_path):
    raw = write_raw(tmp_path / "raw")
    dup = TASKS + (TaskFile("click", "gender.csv", "item"),)
    with pytest.raises(BadInputError, match="duplicate task name"):
        prepare_ttl(raw, str(tmp_path / "out"), TTLOptions(tasks=dup))
    with pytest.raises(BadInputError, match="first task, and only the first"):
        prepare_ttl(raw, str(tmp_path / "out"), TTLOptions(tasks=TASKS[1:]))
    with pytest.raises(BadInputError, match="not found"):
        prepare_ttl(raw, str(tmp_path / "out"), TTLOptions(tasks=TASKS + (TaskFile("x", "nope.csv", "class"),)))
    one_label = write_raw(tmp_path / "raw2", gender=["a,b,c,,m", "b,c,,m"])
    with pytest.raises(BadInputError, match="1 distinct label"):
        prepare_ttl(one_label, str(tmp_path / "out"), TTLOptions(tasks=TASKS))


def test_cli(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw", click=["a,b,c,x"])
    args = ["prepare", "ttl", "--raw", raw, "--out", str(tmp_path / "out"),
            "--task", "pretrain=t1.csv:sequence", "--task", "click=click.csv:item"]
    assert main(args) == 1
    assert "click.csv:1: missing ',,' before the label" in capsys.readouterr().err
    raw = write_raw(tmp_path / "raw", click=["a,b,c,,x", "b,c,,y"])
    assert main(args) == 0
    assert "click" in capsys.readouterr().out
    assert main(args) == 1  # the output exists now
    assert "exists" in capsys.readouterr().err


def test_identical_sequence_lines_are_one_user(tmp_path, capsys):
    # Lines 1, 3 and 4 are one sequence (padding aside): one user, one row, whatever the split.
    raw = write_raw(tmp_path / "raw", t1=["a,b,c", "b,c", "a,b,c", "0,0,a,b,c", "c,d,e,a"],
                    click=["a,b,c,,x", "a,b,c,,y", "b,c,,x"])
    info, report = prepare_ttl(raw, str(tmp_path / "out"), TTLOptions(tasks=TASKS))
    assert report["duplicate_sequences"] == {"pretrain": 2}
    t1 = rows(info, "pretrain")
    assert [(r["user"], r["seq"]) for r in t1] == [(0, [1, 2, 3]), (1, [2, 3]), (2, [3, 4, 5, 1])]
    assert sum(info.task("pretrain").counts.values()) == 3 and info.task("pretrain").num_users == 3
    assert info.popularity("pretrain").tolist() == _train_counts(info, "pretrain")
    # Later tasks: a repeated sequence is the same user, each label an instance of its own.
    labels = info.label_tokens("click").column("token").to_pylist()
    assert [(r["user"], labels[r["label"]]) for r in rows(info, "click")] == [(0, "x"), (0, "y"), (1, "x")]
    args = ["prepare", "ttl", "--raw", raw, "--out", str(tmp_path / "cli"), "--task", "pretrain=t1.csv:sequence",
            "--task", "click=click.csv:item"]
    assert main(args) == 0
    assert "duplicate_sequences: {'pretrain': 2}" in capsys.readouterr().out


def _train_counts(info, task):
    counts = [0] * (info.num_items + 1)
    for r in read_split_table(info, task, "train").to_pylist():
        for item in r["seq"]:
            counts[item] += 1
    return counts
