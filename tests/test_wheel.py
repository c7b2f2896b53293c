"""A wheel built from the repository holds the whole trainer: installed in a fresh virtualenv
outside the repository, it prints its version and presets and runs the demo through Ray Train
and DeepSpeed (the demo's first task)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_wheel_runs_the_demo_from_a_fresh_virtualenv(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO)], timeout=600)
    wheel = next(dist.glob("conure_dist-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    # The CPU build of torch and the tested versions, as on any CPU machine (README "Set up").
    run([str(python), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints-cpu.txt"), str(wheel)], timeout=1500)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"), RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S="180")
    where = run([str(python), "-c", "import conure_dist; print(conure_dist.__file__)"], cwd=work, env=env).stdout
    assert str(venv) in where and str(REPO) not in where
    assert run([str(venv / "bin" / "conure-dist"), "--version"], cwd=work, env=env).stdout.startswith("conure-dist ")
    shown = run([str(venv / "bin" / "conure-dist"), "config", "show", "demo"], cwd=work, env=env).stdout
    assert "kind: synthetic" in shown
    done = run([str(python), "-m", "conure_dist.jobs.ttl", "--demo", "--run-dir", "runs/demo", "--tasks", "pretrain",
                "--epochs", "1", "--retrain-epochs", "1"], cwd=work, env=env, timeout=900)
    assert "accuracy matrix" in done.stdout
    manifest = json.loads((work / "runs" / "demo" / "manifest.json").read_text())
    assert manifest["ledger"] == {"pretrain": "commit"}
