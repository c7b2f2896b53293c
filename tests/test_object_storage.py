"""The cluster README's worked example on object storage, end to end through the real path:
a dataset prepared to s3://, the demo's first two tasks trained from it with the run directory
on s3://, the driver killed inside a stage, the run resumed by the other entry point, and the
reports, config, TensorBoard files and driver log read back from the bucket.

The S3 server is a real S3-protocol server (moto's server mode) on 127.0.0.1.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conure_dist import storage

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = {
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "180",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "DS_ACCELERATOR": "cpu",
}
# Appended to the README's lines: a tiny dataset and a short run of the first two tasks.
SMALL_DATA = ["--num-users", "400", "--num-items", "60", "--seq-len", "10", "--rows-per-shard", "120"]
SMALL_RUN = ["--tasks", "pretrain,click", "--epochs", "2", "--retrain-epochs", "1", "--embed-dim", "16",
             "--seq-len", "10", "--workers", "2", "--log-every", "5",
             # click/train long enough to be killed inside it (the workers start once: stages take seconds)
             "--set", "tasks.click.epochs=20", "--set", "tasks.click.patience=20"]


def readme_example() -> list[list[str]]:
    text = (REPO / "cluster" / "README.md").read_text()
    block = re.search(r"<!-- s3-example[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert block, "cluster/README.md lost its s3-example block"
    return [shlex.split(line) for line in block.group(1).strip().splitlines()]


def command(words: list[str], bucket: str, extra: list[str]) -> list[str]:
    words = [w.replace("YOUR_BUCKET", bucket) for w in words]
    if words[0] == "python":
        return [sys.executable, *words[1:], *extra]
    assert words[0] == "conure-dist"
    return [sys.executable, "-m", "conure_dist.cli", *words[1:], *extra]


def test_the_cluster_readme_example_on_s3_with_a_kill_and_a_resume(s3_server, tmp_path):
    bucket = s3_server()
    prepare, first, resume = readme_example()
    env = {**os.environ, **ENV, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)

    done = subprocess.run(command(prepare, bucket, SMALL_DATA), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = next(w for w in command(first, bucket, []) if w.startswith("s3://") and "/runs/" in w)
    manifest_uri = f"{run_dir}/manifest.json"

    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(command(first, bucket, SMALL_RUN), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {(tmp_path / 'first.log').read_text()[-3000:]}")
            if storage.exists(manifest_uri):
                try:
                    stage = json.loads(storage.read_bytes(manifest_uri))["stages"].get("click/train", {})
                except ValueError:  # read while the driver replaced it (the object's size changed)
                    continue
                if stage.get("status") == "running":
                    time.sleep(3)  # inside the stage: 20 epochs
                    break
            time.sleep(1)
        else:
            pytest.fail("click/train never started")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first_manifest = json.loads(storage.read_bytes(manifest_uri))
    assert first_manifest["ledger"]["click"] is None
    # The lock of the killed driver is taken over: same host, its process is gone.
    second = subprocess.run(command(resume, bucket, SMALL_RUN), cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    manifest = json.loads(storage.read_bytes(manifest_uri))
    assert manifest["ledger"] == {"pretrain": "commit", "click": "commit"}
    for key in ("pretrain/train", "pretrain/prune", "pretrain/retrain", "pretrain/commit"):
        assert manifest["stages"][key]["finished"] == first_manifest["stages"][key]["finished"], key
    assert manifest["stages"]["click/train"]["attempts"] == 2

    # What the run directory holds, read back from the bucket.
    matrix = storage.read_bytes(f"{run_dir}/reports/accuracy_matrix.csv").decode().splitlines()
    assert matrix[0] == "after_task,task,metric,value,status" and any(r.startswith("click,click,") for r in matrix)
    assert "pending" not in "\n".join(matrix)
    assert storage.read_bytes(f"{run_dir}/reports/STATUS.txt").decode().startswith("complete: all 2 tasks committed")
    assert "task_order: [pretrain, click]" in storage.read_bytes(f"{run_dir}/config.yaml").decode()
    driver_log = storage.read_bytes(f"{run_dir}/logs/driver.log").decode()
    assert driver_log.count("run directory " + run_dir) == 2  # both drivers, one file
    assert "pretrain/train  epoch 2/2" in driver_log
    board = storage.list_files(f"{run_dir}/tensorboard")
    assert {f.split("/")[0] for f in board if "events.out.tfevents" in f} >= {"pretrain-train", "click-retrain"}

    # The console: stage lines, no worker output, the tables and report paths last.
    out = second.stdout
    assert "(RayTrainWorker" not in out and "SplitCoordinator" not in out
    assert re.search(r"click/retrain  epoch 1/1  loss [0-9.]+  val mrr@5 [0-9.]+.*ex/s  waiting for data [0-9]+ %  ETA stage",
                     out)
    tail = out.strip().splitlines()
    assert tail[-1].startswith("reports: ") and f"{run_dir}/reports/accuracy_matrix.csv" in tail[-1]
    assert any(line.startswith("accuracy matrix") for line in tail[-10:])

    # The run on the bucket exported to the bucket, and served from there: every committed task's
    # test metrics, recomputed from the model directory, equal the run's.
    model_dir = f"s3://{bucket}/models/demo"
    exported = subprocess.run([sys.executable, "-m", "conure_dist.cli", "export", "--run-dir", run_dir, "--out", model_dir],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert storage.exists(f"{model_dir}/model.json") and storage.exists(f"{model_dir}/owners.safetensors")
    evaluated = subprocess.run([sys.executable, "-m", "conure_dist.cli", "evaluate", "--model", model_dir],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0 and evaluated.stdout.count("equal") == 6, evaluated.stdout + evaluated.stderr[-3000:]
