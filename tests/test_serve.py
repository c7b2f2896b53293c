"""Serving a trained run: export, load, predict, embed, evaluate, batch scoring, bad input.

The run directories are written by the coordinator with the in-process engine (the same
manifest, state files and commits as a Ray run, in seconds); the README's commands on a Ray
run are exercised by tests/test_readme.py.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conure_dist import serve, storage
from conure_dist.cli import main as cli_main
from conure_dist.data.format import load_dataset_info
from conure_dist.data.pipeline import load_split_batches
from conure_dist.jobs.ttl import main as ttl_main
from conure_dist.serve.artifact import MODEL_FILE, ModelFileError

TASKS = "pretrain,click,age"
SMALL = ["--demo", "--in-process", "--tasks", TASKS, "--epochs", "2", "--retrain-epochs", "1", "--embed-dim", "16"]


def make_run(root, method):
    run_dir = str(root / f"run-{method}")
    assert ttl_main([*SMALL, "--method", method, "--run-dir", run_dir]) == 0
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {m: make_run(root, m) for m in ("conure", "fineall", "peterrec", "dnn")}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    return {m: (serve.export_model(run, str(out / m)), str(out / m)) for m, run in runs.items()}


def data_of(run_dir):
    return os.path.join(run_dir, "data")


def committed_metrics(run_dir, after):
    rows = json.load(open(os.path.join(run_dir, "manifest.json")))["accuracy"]
    out = {}
    for r in rows:
        if r["after_task"] == after:
            out.setdefault(r["task"], {})[r["metric"]] = r["value"]
    return out


@pytest.mark.parametrize("method", ["conure", "fineall", "peterrec", "dnn"])
def test_the_exported_model_scores_every_task_exactly_as_the_run_evaluated_it(runs, exported, method):
    doc, model_dir = exported[method]
    model = serve.load(model_dir)
    assert model.tasks == ("pretrain", "click", "age")
    recorded = committed_metrics(runs[method], "age")
    for task in model.tasks:
        got = {k: v for k, v in model.evaluate(task, data_of(runs[method])).items() if k != "count"}
        assert got == recorded[task], (method, task)
    files = set(doc["files"])
    assert ("owners.safetensors" in files) == (method == "conure")  # the only masking method here
    assert ("sets/click.safetensors" in files) == (method in ("fineall", "dnn"))  # one backbone per task


def test_as_of_exports_the_model_of_an_earlier_commit(runs, tmp_path):
    doc = serve.export_model(runs["conure"], str(tmp_path / "m"), as_of="click")
    assert [t["name"] for t in doc["tasks"]] == ["pretrain", "click"]
    assert doc["source"]["left_out"] == {"age": "committed after --as-of"}
    model = serve.load(str(tmp_path / "m"))
    recorded = committed_metrics(runs["conure"], "click")
    for task in model.tasks:
        assert {k: v for k, v in model.evaluate(task, data_of(runs["conure"])).items() if k != "count"} == recorded[task]
    with pytest.raises(serve.UnknownTask, match="'age'.*committed after --as-of"):
        model.predict("age", [["1", "2"]])
    # Later commits never change what an earlier task serves: click from both exports, bit for bit.
    last = serve.load(exported_dir(runs, tmp_path))
    seqs = [["1", "2", "3"], ["7", "9"], [str(i) for i in range(30, 60)]]
    for task in ("pretrain", "click"):
        assert torch.equal(model.scores(task, model.encode(seqs, model.window(task)).ids),
                           last.scores(task, last.encode(seqs, last.window(task)).ids))


def exported_dir(runs, tmp_path):
    out = str(tmp_path / "last")
    serve.export_model(runs["conure"], out)
    return out


def test_serving_a_task_reads_only_the_weights_of_tasks_up_to_it(exported):
    _, model_dir = exported["conure"]
    model = serve.load(model_dir)
    seqs = [["1", "2", "3"], [str(i) for i in range(5, 40)]]
    ids = model.encode(seqs, model.window("click")).ids
    before = model.scores("click", ids)
    # Scramble every prunable entry not owned by T1 or T2 (free, or owned by age, T3).
    weights = dict(model._sets["click"])
    gen = torch.Generator().manual_seed(0)
    for name in model.owners.names:
        later = (model.owners.owner(name) == 0) | (model.owners.owner(name) > 2)
        assert later.any()
        weights[name] = torch.where(later, torch.randn(weights[name].shape, generator=gen), weights[name])
    model._sets = {t: weights for t in model.tasks}
    model._view = None
    assert torch.equal(model.scores("click", ids), before)
    # ... while entries T2 owns do change it.
    owned = model.owners.owner(model.owners.names[0]) == 2
    weights[model.owners.names[0]] = torch.where(owned, weights[model.owners.names[0]] * 3, weights[model.owners.names[0]])
    model._view = None
    assert not torch.equal(model.scores("click", ids), before)


def test_predictions_agree_with_the_evaluation_and_map_back_to_tokens(runs, exported):
    _, model_dir = exported["conure"]
    model = serve.load(model_dir)
    info = load_dataset_info(data_of(runs["conure"]))
    tokens = dict(zip(*(info.item_tokens().column(c).to_pylist() for c in ("id", "token"))))
    # T1: the item after each test sequence; hits in the top 5 = the evaluation's hr@5.
    rows = [r for b in load_split_batches(info, "pretrain", "test", 64, model.seq_len) for r in b["seq"].tolist()]
    rows = [[i for i in r if i] for r in rows]
    histories = [[tokens[i] for i in r[:-1]] for r in rows if len(r) > 1]
    targets = [tokens[r[-1]] for r in rows if len(r) > 1]
    preds = model.predict("pretrain", histories, k=5)
    hits = sum(t in p["items"] for t, p in zip(targets, preds))
    assert hits / len(rows) == model.evaluate("pretrain", data_of(runs["conure"]))["hr@5"]
    assert all(len(p["items"]) == 5 and p["scores"] == sorted(p["scores"], reverse=True) for p in preds)
    assert all(set(p["items"]) <= set(tokens.values()) for p in preds)  # never padding
    # Item task: the label of each test row among the top 5 labels = hr@5.
    labels = info.label_tokens("click").column("token").to_pylist()
    batches = load_split_batches(info, "click", "test", 128, model.seq_len)
    seqs = [[tokens[i] for i in r if i] for b in batches for r in b["seq"].tolist()]
    wanted = [labels[i] for b in batches for i in b["label"].tolist()]
    preds = model.predict("click", seqs, k=5)
    hits = sum(w in p["items"] for w, p in zip(wanted, preds))
    assert hits / len(wanted) == model.evaluate("click", data_of(runs["conure"]))["hr@5"]
    # Class task: labels with probabilities, likeliest first.
    (age,) = model.predict("age", [seqs[0]], k=3)
    assert set(age) == {"labels", "probabilities"} and len(age["labels"]) == 3
    assert age["probabilities"] == sorted(age["probabilities"], reverse=True) and 0 < sum(age["probabilities"]) <= 1.0001


def test_exclude_seen_unknown_tokens_and_truncation(exported):
    _, model_dir = exported["conure"]
    model = serve.load(model_dir)
    seq = [str(i) for i in range(1, 200)]  # longer than the window
    (plain,) = model.predict("pretrain", [seq], k=50)
    (fresh,) = model.predict("pretrain", [seq], k=50, exclude_seen=True)
    assert plain["truncated"] == 199 - (model.seq_len - 1)
    assert set(plain["items"]) & set(seq) and not set(fresh["items"]) & set(seq)
    (res,) = model.predict("click", [["1", "no-such-item", "2"]])
    assert res["unknown"] == ["no-such-item"]
    assert res["items"] == model.predict("click", [["1", "2"]])[0]["items"]  # no OOV id here: left out
    with pytest.raises(serve.BadSequence, match="sequence 1: empty"):
        model.predict("click", [["1"], []])
    with pytest.raises(serve.BadSequence, match="sequence 0: no known item"):
        model.predict("click", [["nope"]])
    with pytest.raises(TypeError, match="a list of sequences"):
        model.predict("click", ["1", "2"])
    # With an OOV id, unknown tokens take it, and it is never recommended.
    model.oov_item_id = model.network.config.num_items
    enc = model.encode([["1", "zz"]], 4)
    assert enc.ids.tolist() == [[0, 0, 1, model.oov_item_id]] and enc.unknown == [["zz"]]
    scores = model.scores("pretrain", enc.ids)
    assert scores[0, 0] == float("-inf") and scores[0, model.oov_item_id] == float("-inf")


def test_embed_is_the_representation_each_task_reads(exported):
    _, model_dir = exported["conure"]
    model = serve.load(model_dir)
    seqs = [["1", "2", "3"], ["4", "5"]]
    vectors = model.embed(seqs, task="click")
    assert vectors.shape == (2, 16) and vectors.dtype == np.float32
    head = model.network.heads["click"]
    np.testing.assert_array_equal(head(torch.from_numpy(vectors)).detach().numpy(),
                                  model.scores("click", model.encode(seqs, model.window("click")).ids).numpy())
    assert not np.array_equal(model.embed(seqs, task="age"), vectors)  # another task's view of the backbone
    np.testing.assert_array_equal(model.embed(seqs), model.embed(seqs, task="age"))  # default: the last task


def test_bfloat16_serving_is_close_to_float32(exported):
    _, model_dir = exported["conure"]
    full, half = serve.load(model_dir), serve.load(model_dir, dtype="bfloat16")
    seqs = [[str(i) for i in range(1, 20)]]
    a = full.scores("click", full.encode(seqs, full.window("click")).ids)
    b = half.scores("click", half.encode(seqs, half.window("click")).ids)
    assert torch.allclose(a, b, atol=0.1, rtol=0.05) and not torch.equal(a, b)


def test_bfloat16_serving_warns_where_the_hardware_would_emulate_it(exported, monkeypatch, caplog):
    from conure_dist.train import engine

    _, model_dir = exported["conure"]
    monkeypatch.setattr(engine, "native_bf16", lambda device: False)
    with caplog.at_level("WARNING", logger="conure_dist"):
        serve.load(model_dir, dtype="bfloat16")
        serve.load(model_dir)
    assert [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()] == [
        "serving in bfloat16 on a cpu without bf16 arithmetic in hardware: torch emulates it, many times slower than float32"]
    caplog.clear()
    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    with caplog.at_level("WARNING", logger="conure_dist"):
        serve.load(model_dir, dtype="bfloat16")
    assert not [r for r in caplog.records if "bfloat16" in r.getMessage()]


def test_export_refuses_what_it_cannot_serve(runs, tmp_path):
    with pytest.raises(ModelFileError, match="no such task"):
        serve.export_model(runs["conure"], str(tmp_path / "a"), as_of="nope")
    with pytest.raises(ModelFileError, match="not found; is --run-dir a run directory"):
        serve.export_model(str(tmp_path / "nothing"), str(tmp_path / "a"))
    serve.export_model(runs["conure"], str(tmp_path / "b"))
    with pytest.raises(ModelFileError, match="already holds a model; pass --overwrite"):
        serve.export_model(runs["conure"], str(tmp_path / "b"))
    serve.export_model(runs["conure"], str(tmp_path / "b"), as_of="pretrain", overwrite=True)
    assert sorted(storage.list_files(str(tmp_path / "b"))) == [MODEL_FILE, "owners.safetensors", "vocab/items.parquet",
                                                                "weights.safetensors"]  # the old label files are gone
    # A run whose first task is not committed yet: a run directory opened, nothing trained.
    from conure_dist import runconfig
    from conure_dist.jobs.ttl import get_parser
    from conure_dist.launch import build_experiment, resolve_config
    from conure_dist.train.coordinator import open_run

    args = get_parser().parse_args(["--demo", "--tasks", TASKS, "--embed-dim", "16", "--run-dir", str(tmp_path / "r")])
    rc = runconfig.to_run_config(resolve_config(args, "demo"))
    open_run(build_experiment(rc, data_of(runs["conure"])), str(tmp_path / "r"))
    with pytest.raises(ModelFileError, match="no task is committed yet.*pretrain: not started"):
        serve.export_model(str(tmp_path / "r"), str(tmp_path / "c"))
    # The dataset moved away: the export names the way out.
    with pytest.raises(ModelFileError, match="pass --data"):
        serve.export_model(runs["conure"], str(tmp_path / "d"), data=str(tmp_path / "nothing"))


def test_a_damaged_or_newer_model_is_refused_by_name(exported, tmp_path):
    import shutil

    _, model_dir = exported["conure"]
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="weights.safetensors: checksum mismatch"):
        serve.load(str(copy))
    doc = json.loads((copy / MODEL_FILE).read_text())
    doc["format_version"] = 99
    (copy / MODEL_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="version 99 was written by a newer conure_dist.*upgrade"):
        serve.load(str(copy))
    (copy / MODEL_FILE).unlink()
    with pytest.raises(ModelFileError, match="model.json: not found; is this a directory written by `conure-dist export`"):
        serve.load(str(copy))


def test_the_commands_export_predict_and_evaluate(runs, tmp_path, capsys):
    model_dir = str(tmp_path / "m")
    assert cli_main(["export", "--run-dir", runs["conure"], "--out", model_dir, "--as-of", "click"]) == 0
    assert "left out: age (committed after --as-of)" in capsys.readouterr().out
    users = tmp_path / "users.txt"
    users.write_text('0,0,1,2,3\n["4", "zz"]\n{"user": "u9", "seq": [5, 6]}\n\n{oops\n7,8,,click_1,click_2\n')
    assert cli_main(["predict", "--model", model_dir, "--task", "click", "--input", str(users), "--k", "3"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()]
    assert [x["line"] for x in lines] == [1, 2, 3, 5, 6]
    assert len(lines[0]["items"]) == 3 and lines[1]["unknown"] == ["zz"] and lines[2]["user"] == "u9"
    assert "error" in lines[3] and f"{users}:5: skipped: not valid JSON" in captured.err
    model = serve.load(model_dir)
    assert lines[0]["items"] == model.predict("click", [["1", "2", "3"]], k=3)[0]["items"]  # padding 0 dropped
    assert lines[4]["items"] == model.predict("click", [["7", "8"]], k=3)[0]["items"]  # labels part ignored
    assert cli_main(["predict", "--model", model_dir, "--task", "click", "--input", str(users), "--embed"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[0])["embedding"]) == 16
    assert cli_main(["predict", "--model", model_dir, "--task", "age", "--input", str(users)]) == 2
    assert "task 'age' is not served by this model (committed after --as-of" in capsys.readouterr().err
    assert cli_main(["evaluate", "--model", model_dir]) == 0
    out = capsys.readouterr().out
    assert out.count("equal") == 6 and "DIFFERS" not in out
    assert cli_main(["predict", "--model", str(tmp_path / "none"), "--task", "click", "--input", str(users)]) == 2


@pytest.mark.slow
def test_batch_scoring_with_ray_data_locally_and_on_object_storage(exported, runs, tmp_path, s3_server):
    _, model_dir = exported["conure"]
    model = serve.load(model_dir)
    seqs = [["1", "2", "3"], [], ["zz"], [str(i) for i in range(1, 80)], ["5", "zz", "6"]] * 40
    pq.write_table(pa.table({"user": list(range(len(seqs))), "seq": seqs}), tmp_path / "users.parquet")
    pq.write_table(pa.table({"user": pa.array([], pa.int64()), "seq": pa.array([], pa.list_(pa.string()))}),
                   tmp_path / "empty.parquet")
    bucket = s3_server()
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"),
           "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120"}
    env.pop("RAY_ADDRESS", None)
    # Local files, predictions; then object storage: model, input and output on s3://, embeddings.
    storage.write_bytes(f"s3://{bucket}/in/users.parquet", (tmp_path / "users.parquet").read_bytes())
    assert cli_main(["export", "--run-dir", runs["conure"], "--out", f"s3://{bucket}/model"]) == 0
    script = f"""
import sys
from conure_dist.cli import main
assert main(["score", "--model", {model_dir!r}, "--task", "click", "--input", {str(tmp_path / 'users.parquet')!r},
             "--output", {str(tmp_path / 'out')!r}, "--batch-size", "64", "--k", "4"]) == 0
assert main(["score", "--model", {model_dir!r}, "--task", "click", "--input", {str(tmp_path / 'users.parquet')!r},
             "--output", {str(tmp_path / 'out')!r}]) == 2
assert main(["score", "--model", {model_dir!r}, "--task", "click", "--input", {str(tmp_path / 'empty.parquet')!r},
             "--output", {str(tmp_path / 'out')!r}, "--overwrite"]) == 2
assert main(["score", "--model", "s3://{bucket}/model", "--task", "age", "--input", "s3://{bucket}/in",
             "--output", "s3://{bucket}/out", "--embed", "--workers", "2", "--cpus-per-worker", "0.5"]) == 0
"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "1000 rows" not in done.stdout and "120 of 200 rows scored" in done.stdout
    assert "80 skipped (40 empty sequence; 40 no known item)" in done.stdout
    assert "not empty" in done.stderr  # the second run without --overwrite
    assert "no rows to score" in done.stderr  # an empty input leaves the output as it was (checked below)
    out = pq.read_table(tmp_path / "out").sort_by("user").to_pylist()
    assert len(out) == 200 and all(set(r) == {"user", "items", "scores", "status", "unknown_items", "truncated_items"}
                                   for r in out)
    want = model.predict("click", [s for s in seqs if s and s != ["zz"]], k=4)
    got = [r for r in out if r["status"] == "ok"]
    assert [r["items"] for r in got] == [w["items"] for w in want]
    np.testing.assert_allclose([r["scores"] for r in got], [w["scores"] for w in want], rtol=1e-6)
    assert {r["status"] for r in out if r["items"] is None} == {"empty sequence", "no known item"}
    assert sum(r["unknown_items"] for r in out) == 80 and sum(r["truncated_items"] > 0 for r in out) == 40
    summary = json.loads((tmp_path / "out" / "_scoring.json").read_text())
    assert summary["rows"] == 200 and summary["scored"] == 120
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".staging")]
    # On object storage: embeddings of the age task, as the Python API computes them.
    files = [f for f in storage.list_files(f"s3://{bucket}/out") if f.endswith(".parquet")]
    table = pa.concat_tables([pq.read_table(pa.BufferReader(storage.read_bytes(f"s3://{bucket}/out/{f}"))) for f in files])
    rows = sorted(table.to_pylist(), key=lambda r: r["user"])
    ok = [r for r in rows if r["status"] == "ok"]
    np.testing.assert_allclose([r["embedding"] for r in ok], model.embed([s for s in seqs if s and s != ["zz"]], "age"),
                               rtol=1e-5, atol=1e-6)
    assert storage.exists(f"s3://{bucket}/out/_scoring.json")
    assert not [f for f in storage.list_files(f"s3://{bucket}/out") if f.startswith(".staging")]


def test_a_run_made_in_process_is_resumed_only_in_process(runs):
    from conure_dist import runconfig
    from conure_dist.jobs.ttl import get_parser
    from conure_dist.launch import build_experiment, resolve_config
    from conure_dist.train.coordinator import open_run
    from conure_dist.train.rundir import RunDirError

    args = get_parser().parse_args(SMALL[1:] + ["--method", "conure", "--run-dir", runs["conure"]])
    exp = build_experiment(runconfig.to_run_config(resolve_config(args, "demo")), data_of(runs["conure"]))
    with pytest.raises(RunDirError, match="was run by the in-process engine; resume it the same way \\(with --in-process\\)"):
        open_run(exp, runs["conure"], engine="ray")
    # The same command again finds every step done.
    assert ttl_main([*SMALL, "--method", "conure", "--run-dir", runs["conure"]]) == 0


def test_encoding_ids_and_model_files_without_a_task_list(exported, tmp_path):
    import shutil

    _, model_dir = exported["conure"]
    model = serve.load(model_dir)
    enc = model.encode([[3, "7", "x", -2, 10**9]], 5, ids=True)  # as a prepared dataset's rows, with junk
    assert enc.ids.tolist() == [[0, 0, 0, 3, 7]] and enc.unknown == [["x", "-2", str(10**9)]]
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    doc = json.loads((copy / MODEL_FILE).read_text())
    del doc["files"]
    (copy / MODEL_FILE).write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="lists no files or no tasks"):
        serve.load(str(copy))
