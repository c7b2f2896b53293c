"""Prepared datasets and run files on object storage, against a real S3-protocol server."""

import json

import numpy as np
import pyarrow as pa
import pytest

from conure_dist import storage
from conure_dist.data.badinput import BadInputError
from conure_dist.data.format import DatasetFormatError, load_dataset_info
from conure_dist.data.pipeline import read_split_table
from conure_dist.data.synthetic import SyntheticConfig, prepare_synthetic
from conure_dist.data.writer import DatasetWriter

TINY = SyntheticConfig(num_users=120, num_items=40, seq_len=8, min_seq_len=3, num_topics=4, click_labels=8,
                       like_labels=8, rows_per_shard=50)


def keys(s3_server, bucket: str, prefix: str = "") -> list[str]:
    listed = s3_server.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []) if not o["Key"].endswith("/"))  # not dir markers


def test_a_dataset_prepared_to_s3_reads_back_like_the_local_one(s3_server, tmp_path):
    bucket = s3_server()
    local = prepare_synthetic(TINY, str(tmp_path / "local"), seed=1)
    remote = prepare_synthetic(TINY, f"s3://{bucket}/data/tiny", seed=1)
    assert remote.path == f"s3://{bucket}/data/tiny"
    again = load_dataset_info(f"s3://{bucket}/data/tiny")
    assert again.to_json() == local.to_json()
    for task in local.task_names:
        assert read_split_table(again, task, "train").equals(read_split_table(local, task, "train"))
        np.testing.assert_array_equal(again.popularity(task), local.popularity(task))
    assert again.item_tokens().equals(local.item_tokens())
    assert not [k for k in keys(s3_server, bucket) if ".tmp" in k]


def test_a_failed_prepare_publishes_nothing_and_an_existing_dataset_is_kept(s3_server):
    bucket = s3_server()
    out = f"s3://{bucket}/data/d"
    with pytest.raises(RuntimeError, match="converter failed"):
        with DatasetWriter(out, seed=0, source="t") as w:
            w.add_task("clicks", "sequence")
            w.write("clicks", np.arange(10), pa.array([[1, 2, 3]] * 10, pa.list_(pa.int32())))
            raise RuntimeError("converter failed")
    assert keys(s3_server, bucket) == []
    prepare_synthetic(TINY, out, seed=0)
    with pytest.raises(FileExistsError, match="exists"):
        prepare_synthetic(TINY, out, seed=1)
    assert json.loads(storage.read_bytes(f"{out}/dataset.json"))["seed"] == 0


def test_overwriting_a_dataset_on_s3_leaves_only_the_new_one(s3_server):
    bucket = s3_server()
    out = f"s3://{bucket}/data/d"
    prepare_synthetic(TINY, out, seed=0)
    bigger = prepare_synthetic(SyntheticConfig(**{**TINY.__dict__, "rows_per_shard": 25}), out, seed=2, overwrite=True)
    files = {f"data/d/{f}" for t in bigger.tasks for s in t.files.values() for f in s}
    shards = {k for k in keys(s3_server, bucket, "data/d/tasks/")}
    assert shards == files  # no shard of the old dataset left behind
    assert load_dataset_info(out).seed == 2


def test_missing_dataset_and_missing_shards_on_s3_are_named(s3_server):
    bucket = s3_server()
    with pytest.raises(DatasetFormatError, match=f"s3://{bucket}/nothing/dataset.json: not found"):
        load_dataset_info(f"s3://{bucket}/nothing")
    info = prepare_synthetic(TINY, f"s3://{bucket}/d", seed=0)
    shard = info.task("click").files["test"][0]
    s3_server.client.delete_object(Bucket=bucket, Key=f"d/{shard}")
    with pytest.raises(DatasetFormatError, match="shard .*is missing"):
        load_dataset_info(f"s3://{bucket}/d")


def test_prepare_command_writes_to_s3_and_refuses_a_bad_uri(s3_server, capsys):
    from conure_dist.cli import main

    bucket = s3_server()
    assert main(["prepare", "synthetic", "--out", f"s3://{bucket}/cli", "--num-users", "80", "--num-items", "30",
                 "--seq-len", "6"]) == 0
    assert f"s3://{bucket}/cli/dataset.json" in [f"s3://{bucket}/{k}" for k in keys(s3_server, bucket)]
    capsys.readouterr()
    assert main(["prepare", "synthetic", "--out", "nosuchscheme://x/y"]) != 0
    assert "nosuchscheme://x/y" in capsys.readouterr().err


def test_raw_inputs_on_s3_are_downloaded_then_converted(s3_server, tmp_path):
    from conure_dist.data.movielens import prepare_movielens

    bucket = s3_server()
    ratings = "".join(f"{u}\t{i}\t{1 + (u * i) % 5}\t{1000 + i}\n" for u in range(1, 9) for i in range(1, 12))
    users = "".join(f"{u}|{20 + 5 * u}|{'M' if u % 2 else 'F'}|{'student' if u % 3 else 'writer'}|00000\n"
                    for u in range(1, 9))
    storage.write_bytes(f"s3://{bucket}/raw/u.data", ratings.encode())
    storage.write_bytes(f"s3://{bucket}/raw/u.user", users.encode())
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "u.data").write_text(ratings)
    (tmp_path / "raw" / "u.user").write_text(users)
    remote, _ = prepare_movielens(f"s3://{bucket}/raw", str(tmp_path / "a"))
    local, _ = prepare_movielens(str(tmp_path / "raw"), str(tmp_path / "b"))
    assert remote.to_json() == local.to_json()
    # Bad input in a downloaded file is named by its URI, not by the temporary copy.
    storage.write_bytes(f"s3://{bucket}/raw/u.data", (ratings + "9\tx\t1\t5\n").encode())
    with pytest.raises(BadInputError, match=f"^s3://{bucket}/raw/u.data:89: "):
        prepare_movielens(f"s3://{bucket}/raw", str(tmp_path / "c"))


def test_run_directory_files_on_s3(s3_server):
    import torch

    from conure_dist.train.rundir import RunDir

    bucket = s3_server()
    rundir = RunDir(f"s3://{bucket}/runs/r")
    rundir.write_json("manifest.json", {"a": 1})
    rundir.write_tensors("state/w.safetensors", {"w": torch.arange(4.0)})
    assert rundir.read_json("manifest.json") == {"a": 1}
    assert torch.equal(rundir.read_tensors("state/w.safetensors")["w"], torch.arange(4.0))
    assert rundir.storage_uri("ray") == f"s3://{bucket}/runs/r/ray"
