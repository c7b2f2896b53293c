"""TTL converter on tiny hand-written files: identity by sequence, OOV, multi-label lines, bad input."""

import os

import pytest

from conure_dist.cli import main
from conure_dist.data.badinput import BadInputError
from conure_dist.data.pipeline import read_split_table
from conure_dist.data.ttl import TaskFile, TTLOptions, prepare_ttl

TASKS = (TaskFile("pretrain", "t1.csv", "sequence"), TaskFile("click", "click.csv", "item"),
         TaskFile("gender", "gender.csv", "class"))
WORDS = r"\w+"  # these files use letters as tokens; the default pattern takes integer ids


def opts(**kw):
    return TTLOptions(**{"tasks": TASKS, "token_pattern": WORDS, **kw})


def write_raw(path, t1=None, click=None, gender=None):
    path.mkdir(exist_ok=True)
    files = {
        "t1.csv": t1 or ["0,0,a,b,c", "b,c", "c,d,e,a"],
        "click.csv": click or ["0,a,b,c,,x,y", "c,d,e,a,,y", "b,c,,x"],
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
    raw = write_raw(tmp_path / "raw", click=["0,a,b,c,,x,y", "c,d,e,a,,y", "zz,b,,x"])
    info, report = prepare_ttl(raw, str(tmp_path / "out"), opts(allow_new_users=True))
    assert report["new_users"] == {"click": 1}
    items = {r["id"]: r["token"] for r in info.item_tokens().to_pylist()}
    assert items == {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "<oov>"}  # padding "0" dropped
    assert info.num_items == 6 and info.oov_item_id == 6
    assert report["oov_tokens"] == {"click": 1, "gender": 0}
    assert info.task("click").oov_tokens == 1
    t1 = {r["user"]: r["seq"] for r in rows(info, "pretrain")}
    assert t1 == {0: [1, 2, 3], 1: [2, 3], 2: [3, 4, 5, 1]}
    labels = info.label_tokens("click").column("token").to_pylist()
    click = [(r["user"], r["seq"], labels[r["label"]]) for r in rows(info, "click")]
    # user 0 appears with two labels (two instances); the OOV line is a new user (3), accepted
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
    ({"gender": ["b,c,,m", "a, ,b,,f"]}, "gender.csv:2", "empty item token"),
    ({"t1": ["a,b", "hello world this is garbage"]}, "t1.csv:2", "item token not matching the token pattern"),
    ({"t1": ["a,b", "1;2;3;4"]}, "t1.csv:2", "item token not matching the token pattern"),
    ({"t1": ["a,b", "1.5,2e3,-7,abc"]}, "t1.csv:2", "item token not matching the token pattern"),
    ({"gender": ["a,b,c,,m", "b,c,,5,6"]}, "gender.csv:2", "more than one label in a class task"),
    ({"gender": ["a,b,c,,m", "b,c,,fe male"]}, "gender.csv:2", "label not matching the token pattern"),
    ({"t1": ["a,b,c", "b,c", "0,a,b,c"]}, "t1.csv:3", r"duplicate sequence \(the same user twice\): as line 1"),
    ({"click": ["a,b,c,,x", "q,r,,y"]}, "click.csv:2", "sequence of no first-task user"),
])
def test_bad_lines(tmp_path, files, where, reason):
    raw = write_raw(tmp_path / "raw", **files)
    with pytest.raises(BadInputError, match=rf"{where}: {reason}"):
        prepare_ttl(raw, str(tmp_path / "out"), opts())
    assert not os.path.exists(tmp_path / "out")


def test_the_default_token_pattern_takes_integer_ids_only(tmp_path):
    raw = write_raw(tmp_path / "raw", t1=["0,0,11,12,13", "12,13"], click=["11,12,13,,7", "12,13,,8"],
                    gender=["11,12,13,,1", "12,13,,2"])
    info, _ = prepare_ttl(raw, str(tmp_path / "out"), TTLOptions(tasks=TASKS))
    assert info.num_items == 3
    raw = write_raw(tmp_path / "raw2", t1=["11,12", "12,x1"])
    with pytest.raises(BadInputError, match=r"t1.csv:2: item token not matching .*'x1' is not \[0-9\]\+"):
        prepare_ttl(raw, str(tmp_path / "out2"), TTLOptions(tasks=TASKS))


def test_classes_declared_or_capped(tmp_path):
    raw = write_raw(tmp_path / "raw", gender=["a,b,c,,m", "b,c,,f", "c,d,e,a,,x"])
    declared = (("gender", ("f", "m")),)
    with pytest.raises(BadInputError, match=r"gender.csv:3: label not among the declared classes: 'x'"):
        prepare_ttl(raw, str(tmp_path / "out"), opts(classes=declared))
    with pytest.raises(BadInputError, match=r"gender.csv:3: too many classes: 'x' would be class 3"):
        prepare_ttl(raw, str(tmp_path / "out"), opts(max_classes=2))
    info, report = prepare_ttl(raw, str(tmp_path / "out"), opts(classes=declared, skip_bad=True))
    assert info.label_tokens("gender").column("token").to_pylist() == ["f", "m"]  # the declared order
    assert "label not among the declared classes" in report["skipped"]
    with pytest.raises(ValueError, match="--classes click=...: 'click' is not a class task"):
        opts(classes=(("click", ("a", "b")),))
    with pytest.raises(ValueError, match=r"--classes gender=...: \['m', 'f'\] do not match the token pattern"):
        TTLOptions(tasks=TASKS, classes=(("gender", ("m", "f")),))  # the default pattern takes integer ids
    assert TTLOptions.parse_classes(["age=0,1, 2"]) == (("age", ("0", "1", "2")),)


def test_a_byte_order_mark_before_the_first_line_is_not_data(tmp_path):
    raw = write_raw(tmp_path / "raw")
    path = tmp_path / "raw" / "t1.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    info, _ = prepare_ttl(raw, str(tmp_path / "out"), opts())
    assert {r["id"]: r["token"] for r in info.item_tokens().to_pylist()}[1] == "a"


def test_undecodable_bytes_name_file_and_line_and_can_be_skipped(tmp_path):
    raw = write_raw(tmp_path / "raw")
    with open(tmp_path / "raw" / "click.csv", "ab") as f:
        f.write(b"a,b,c,,\xff\xfe\n")
    with pytest.raises(BadInputError, match=r"click.csv:4: not UTF-8 text: byte 0xff at byte 8 of the line"):
        prepare_ttl(raw, str(tmp_path / "out"), opts(allow_new_users=True))
    _, report = prepare_ttl(raw, str(tmp_path / "out"), opts(allow_new_users=True, skip_bad=True))
    assert "not UTF-8 text" in report["skipped"] and "first at line 4" in report["skipped"]


def test_missing_label_detail_and_skip_bad(tmp_path):
    raw = write_raw(tmp_path / "raw", click=["a,b,c,,x", "a,b,,", "b,c,,y", "q"])
    info, report = prepare_ttl(raw, str(tmp_path / "out"), opts(skip_bad=True))
    assert "skipped rows: 2" in report["skipped"]
    assert "missing label" in report["skipped"] and "missing ',,'" in report["skipped"]
    assert sum(info.task("click").counts.values()) == 2


def test_task_list_errors(tmp_path):
    raw = write_raw(tmp_path / "raw")
    dup = TASKS + (TaskFile("click", "gender.csv", "item"),)
    with pytest.raises(ValueError, match="duplicate task name"):
        opts(tasks=dup)
    with pytest.raises(ValueError, match="first task, and only the first"):
        opts(tasks=TASKS[1:])
    with pytest.raises(BadInputError, match="not found"):
        prepare_ttl(raw, str(tmp_path / "out"), opts(tasks=TASKS + (TaskFile("x", "nope.csv", "class"),)))
    one_label = write_raw(tmp_path / "raw2", gender=["a,b,c,,m", "b,c,,m"])
    with pytest.raises(BadInputError, match="1 distinct label"):
        prepare_ttl(one_label, str(tmp_path / "out"), opts())


def test_cli(tmp_path, capsys):
    raw = write_raw(tmp_path / "raw", click=["a,b,c,x"])
    args = ["prepare", "ttl", "--raw", raw, "--out", str(tmp_path / "out"), "--token-pattern", WORDS,
            "--task", "pretrain=t1.csv:sequence", "--task", "click=click.csv:item"]
    assert main(args) == 1
    assert "click.csv:1: missing ',,' before the label" in capsys.readouterr().err
    raw = write_raw(tmp_path / "raw", click=["a,b,c,,x", "b,c,,y"])
    assert main(args) == 0
    assert "click" in capsys.readouterr().out
    assert main(args) == 1  # the output exists now
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--task", "pretrain=t1.csv:sequence", "--task", "pretrain=click.csv:item"], "duplicate task name"),
    (["--task", "click=click.csv:item"], "the first task, and only the first"),
    (["--token-pattern", "[0-9"], "--token-pattern '[0-9': not a regular expression"),
    (["--classes", "gender"], "--classes 'gender': expected NAME=label"),
    (["--classes", "nope=a,b"], "'nope' is not a class task"),
    (["--max-classes", "1"], "--max-classes must be >= 2"),
    (["--rows-per-shard", "0"], "--rows-per-shard must be >= 1"),
])
def test_bad_options_exit_2_before_reading_input(tmp_path, capsys, extra, message):
    args = ["prepare", "ttl", "--raw", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_repeated_sequence_lines_are_refused_or_skipped_and_counted(tmp_path, capsys):
    # Lines 1, 3 and 4 are one sequence (padding aside): one user twice, which could sit in two splits.
    raw = write_raw(tmp_path / "raw", t1=["a,b,c", "b,c", "a,b,c", "0,0,a,b,c", "c,d,e,a"],
                    click=["a,b,c,,x", "a,b,c,,y", "b,c,,x"])
    args = ["prepare", "ttl", "--raw", raw, "--out", str(tmp_path / "cli"), "--task", "pretrain=t1.csv:sequence",
            "--task", "click=click.csv:item", "--token-pattern", WORDS]
    assert main(args) == 1
    assert "t1.csv:3: duplicate sequence (the same user twice): as line 1" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "cli")
    info, report = prepare_ttl(raw, str(tmp_path / "out"), opts(skip_bad=True))
    assert "       2  duplicate sequence (the same user twice)" in report["skipped"]
    t1 = rows(info, "pretrain")
    assert [(r["user"], r["seq"]) for r in t1] == [(0, [1, 2, 3]), (1, [2, 3]), (2, [3, 4, 5, 1])]
    assert sum(info.task("pretrain").counts.values()) == 3 and info.task("pretrain").num_users == 3
    assert info.popularity("pretrain").tolist() == _train_counts(info, "pretrain")
    # Later tasks: a line with a T1 user's sequence is that user, each label an instance of its own.
    labels = info.label_tokens("click").column("token").to_pylist()
    assert [(r["user"], labels[r["label"]]) for r in rows(info, "click")] == [(0, "x"), (0, "y"), (1, "x")]
    assert main([*args, "--skip-bad"]) == 0
    assert "skipped rows: 2" in capsys.readouterr().out


def _train_counts(info, task):
    counts = [0] * (info.num_items + 1)
    for r in read_split_table(info, task, "train").to_pylist():
        for item in r["seq"]:
            counts[item] += 1
    return counts
