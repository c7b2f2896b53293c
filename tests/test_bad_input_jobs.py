"""Bad input and contradictory options through the jobs: one line naming the file, line or
option, exit status 2 for options and 1 for data, never a traceback, nothing half-written."""

import json
import os

import pytest

from conure_dist.data.ttl import DEFAULT_TASKS
from conure_dist.jobs import movielens as ml_job
from conure_dist.jobs import ttl as ttl_job
from conure_dist.launch import main_guard

USERS = 60


def write_ttl(path, bad_line=None):
    """The six TTL files (integer tokens) for USERS users; ``bad_line`` is appended to the click file."""
    path.mkdir(exist_ok=True)
    seqs = [",".join(str(1 + (u * 7 + k) % 40) for k in range(3 + u % 5)) + f",{100 + u}" for u in range(USERS)]
    labels = {"click": lambda u: f"{u % 9},{(u + 3) % 9}", "like": lambda u: str(u % 5), "age": lambda u: str(u % 4),
              "gender": lambda u: str(u % 2), "lifestatus": lambda u: str(u % 3)}
    for task in DEFAULT_TASKS:
        if task.kind == "sequence":
            lines = ["0,0," + s for s in seqs]
        else:
            lines = [f"{s},,{labels[task.name](u)}" for u, s in enumerate(seqs)]
        if task.name == "click" and bad_line is not None:
            lines.append(bad_line)
        (path / task.file).write_text("\n".join(lines) + "\n")
    return str(path)


def run(job, args, capsys):
    code = main_guard(job.main, args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def test_bad_raw_lines_through_the_job_name_file_and_line_and_skip_bad_skips_them(tmp_path, capsys):
    raw = write_ttl(tmp_path / "raw", bad_line="hello world this is garbage,,3")
    run_dir = str(tmp_path / "run")
    code, _, err = run(ttl_job, ["--raw-ttl", raw, "--run-dir", run_dir, "--dry-run"], capsys)
    assert code == 1
    line = USERS + 1
    assert err.strip().splitlines() == [
        f"error: {raw}/original_desen_finetune_click_nouserID.csv:{line}: item token not matching the token pattern: "
        "'hello world this is garbage' is not [0-9]+ (--token-pattern) (use --skip-bad to skip such rows)"]
    assert not os.path.exists(os.path.join(run_dir, "data", "dataset.json"))
    code, out, _ = run(ttl_job, ["--raw-ttl", raw, "--run-dir", run_dir, "--dry-run", "--skip-bad"], capsys)
    assert code == 0 and "skipped rows: 1" in out and "pretrain (sequence" in out
    record = json.loads((tmp_path / "run" / "data" / "prepared-from.json").read_text())
    assert record["raw"] == raw and record["skip_bad"] is True


def test_a_changed_raw_directory_on_rerun_is_refused_not_silently_reused(tmp_path, capsys):
    raw, other = write_ttl(tmp_path / "raw"), write_ttl(tmp_path / "other")
    run_dir = str(tmp_path / "run")
    assert run(ttl_job, ["--raw-ttl", raw, "--run-dir", run_dir, "--dry-run"], capsys)[0] == 0
    code, _, err = run(ttl_job, ["--raw-ttl", other, "--run-dir", run_dir, "--dry-run"], capsys)
    assert code == 2 and f"source.raw {raw!r} -> {other!r}" in err and "was prepared from other inputs" in err
    assert run(ttl_job, ["--raw-ttl", raw, "--run-dir", run_dir, "--dry-run"], capsys)[0] == 0


def test_demo_data_prepared_from_other_preset_parameters_is_kept_with_a_note(tmp_path, capsys):
    """A synthetic preset may change between versions: its data in RUN_DIR/data is kept (runs
    there were made on it) and the rerun says so, naming what changed."""
    run_dir = str(tmp_path / "run")
    code, out, _ = run(ttl_job, ["--demo", "--run-dir", run_dir, "--dry-run"], capsys)
    assert code == 0 and "note:" not in out
    path = tmp_path / "run" / "data" / "prepared-from.json"
    record = json.loads(path.read_text())
    assert record["preset_parameters"]["min_seq_len"] == 20
    assert run(ttl_job, ["--demo", "--run-dir", run_dir, "--dry-run"], capsys)[1].count("note:") == 0
    record["preset_parameters"]["min_seq_len"] = 5  # as the demo preset had it before
    path.write_text(json.dumps(record))
    code, out, _ = run(ttl_job, ["--demo", "--run-dir", run_dir, "--dry-run"], capsys)
    assert code == 0 and "with other parameters: min_seq_len 5 -> 20; it is kept" in out
    del record["preset_parameters"]  # prepared before the parameters were recorded
    path.write_text(json.dumps(record))
    code, out, _ = run(ttl_job, ["--demo", "--run-dir", run_dir, "--dry-run"], capsys)
    assert code == 0 and "by a version that did not record the preset's parameters" in out


def test_undecodable_bytes_through_the_job(tmp_path, capsys):
    raw = write_ttl(tmp_path / "raw")
    with open(os.path.join(raw, DEFAULT_TASKS[3].file), "ab") as f:
        f.write(b"1,2,\xff,,3\n")
    code, _, err = run(ttl_job, ["--raw-ttl", raw, "--run-dir", str(tmp_path / "run"), "--dry-run"], capsys)
    assert code == 1 and f"original_desen_age.csv:{USERS + 1}: not UTF-8 text: byte 0xff" in err


def test_movielens_job_bad_line(tmp_path, capsys):
    raw = tmp_path / "ml"
    raw.mkdir()
    (raw / "u.data").write_text("1\t10\t3\t1\n-5\t10\t3\t2\n")
    (raw / "u.user").write_text("1|24|M|technician|85711\n")
    code, _, err = run(ml_job, ["--raw", str(raw), "--run-dir", str(tmp_path / "run"), "--dry-run"], capsys)
    assert code == 1 and "u.data:2: id out of range (user and movie ids start at 1): user -5, movie 10" in err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from conure_dist.data.synthetic import prepare_synthetic, resolve_config

    out = str(tmp_path_factory.mktemp("ds") / "demo")
    prepare_synthetic(resolve_config("demo", num_users=300), out, 0)
    return out


@pytest.mark.parametrize("args, message", [
    (["--demo"], "--demo prepares its own synthetic dataset; it cannot be combined with --data"),
    (["--raw-ttl", "somewhere"], "are both set; give a prepared dataset or raw inputs, not both"),
    (["--ratios", "0.7,0.8,0.9,0.8,0.9,0.9,0.5"], "--ratios: 7 prune ratios for 6 tasks"),
    (["--ratios", "0.7,0.8"], "prune_ratios (--ratios): 2 ratios for 6 tasks"),
    (["--ratios", "1.5"], "--ratios 1.5: each prune ratio must lie strictly between 0 and 1; got [1.5]"),
    (["--ratios", "0.7,0,0.9"], "got [0.0]"),
])
def test_contradictory_or_unused_options_are_refused(dataset, tmp_path, capsys, args, message):
    code, _, err = run(ttl_job, ["--data", dataset, "--run-dir", str(tmp_path / "run"), "--dry-run", *args], capsys)
    assert code == 2 and message in err, err


def test_a_data_path_without_a_dataset_is_a_bad_option(tmp_path, capsys):
    code, _, err = run(ttl_job, ["--data", str(tmp_path / "nothing"), "--dry-run"], capsys)
    assert code == 2 and "dataset.json: not found; is" in err


def test_new_users_in_later_tasks_through_the_job(tmp_path, capsys):
    raw = write_ttl(tmp_path / "raw", bad_line="900,901,,1")  # a click line of no pretrain user
    run_dir = str(tmp_path / "run")
    code, _, err = run(ttl_job, ["--raw-ttl", raw, "--run-dir", run_dir, "--dry-run"], capsys)
    assert code == 1 and f"click_nouserID.csv:{USERS + 1}: sequence of no first-task user" in err
    assert run(ttl_job, ["--raw-ttl", raw, "--run-dir", run_dir, "--dry-run", "--allow-new-users"], capsys)[0] == 0
    code, _, err = run(ttl_job, ["--raw-ttl", raw, "--run-dir", run_dir, "--dry-run"], capsys)
    assert code == 2 and "source.allow_new_users True -> False" in err


def test_preset_ratios_for_fewer_tasks_are_fine(dataset, tmp_path, capsys):
    code, out, _ = run(ttl_job, ["--data", dataset, "--tasks", "pretrain,click", "--dry-run"], capsys)
    assert code == 0 and "click (item" in out


def test_a_truncated_shard_is_named_at_dry_run(tmp_path, capsys):
    import shutil

    from conure_dist.data.format import load_dataset_info
    from conure_dist.data.synthetic import prepare_synthetic, resolve_config

    data = str(tmp_path / "d")
    prepare_synthetic(resolve_config("demo", num_users=300), data, 0)
    shard = load_dataset_info(data).split_files("age", "validation")[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    code, _, err = run(ttl_job, ["--data", data, "--dry-run"], capsys)
    assert code == 1 and f"{shard}: not a readable Parquet file" in err
    # a shard swapped for another split's: readable, but not the rows dataset.json counts
    other = load_dataset_info(data).split_files("age", "train")[0]
    shutil.copy(other, shard)
    code, _, err = run(ttl_job, ["--data", data, "--dry-run"], capsys)
    assert code == 1 and "task 'age' validation counts" in err and "its shards hold" in err


def test_a_dry_run_of_a_plan_that_would_be_refused_exits_2(dataset, capsys):
    args = ["--data", dataset, "--tasks", "pretrain,click,age", "--embed-dim", "8", "--set", "model.dilations=[1,2]",
            "--dry-run"]
    code, out, _ = run(ttl_job, [*args, "--ratios", "0.05,0.05,0.05"], capsys)
    assert code == 2 and "error: the run would be refused: task age (task 3) would find no free weight left" in out
    code, out, _ = run(ttl_job, [*args, "--ratios", "0.7,0.8,0.9"], capsys)
    assert code == 0 and "would be refused" not in out
