"""The README's front door works as written: its main command, run from the root of a fresh
copy of the repository with its relative paths, in the reduced form the README documents."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
# The reduced form of the main command (same command, fewer tasks and epochs): about 1.5 minutes here.
REDUCED = ["--tasks", "pretrain,click", "--epochs", "1", "--retrain-epochs", "1"]


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def main_command():
    """The first bash block of "Set up": venv, install, then the job."""
    setup = README.split("## Set up", 1)[1]
    return bash_blocks(setup)[0].strip()


def test_the_readme_install_steps_are_those_ci_runs():
    parts = [p.strip() for p in main_command().split("&&")]
    tests = [p.strip() for p in bash_blocks(README.split("## Set up", 1)[1])[1].strip().split("&&")]
    assert parts[0] == tests[0] == "python3 -m venv .venv"
    assert parts[1] == tests[1].replace("-e '.[dev]'", "-e .")  # the same install, without the test extras
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert tests[1].replace("pip install", "pip install -q") in ci and tests[2].replace("pytest -q", "pytest -q -p no:cacheprovider") in ci
    assert parts[2].startswith(".venv/bin/python jobs/ttl.py ") and "--run-dir runs/" in parts[2]


@pytest.mark.slow
def test_the_readme_main_command_runs_from_a_fresh_copy_with_relative_paths(tmp_path):
    job = main_command().split("&&")[-1].split()
    assert job[0] == ".venv/bin/python"
    # A copy of the tracked files (a fresh clone), sharing this checkout's virtualenv.
    copy = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if os.path.exists(os.path.join(REPO, rel)):
            os.makedirs(copy / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(REPO, rel), copy / rel)
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), copy / ".venv")
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray", dir="/tmp"),
           "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "180"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([*job, *REDUCED], cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    run_dir = copy / job[job.index("--run-dir") + 1]
    manifest = json.load(open(run_dir / "manifest.json"))
    assert manifest["ledger"] == {"pretrain": "commit", "click": "commit"}
    assert (run_dir / "reports" / "accuracy_matrix.csv").exists()
    assert "accuracy matrix" in done.stdout
    # The same command again: the run is complete, nothing is trained twice.
    again = subprocess.run([*job, *REDUCED], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "every stage is complete" in again.stdout, (again.stdout + again.stderr)[-3000:]
    assert json.load(open(run_dir / "manifest.json"))["stages"] == manifest["stages"]

    # "Use a trained model", line by line, on that run directory (the virtualenv on the PATH).
    env["PATH"] = f"{copy / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    outputs = []
    for line in serving_commands():
        done = subprocess.run(["bash", "-c", line], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{(done.stdout + done.stderr)[-3000:]}"
        outputs.append(done.stdout)
    export, _, click, pretrain, evaluate, score = outputs
    model = json.load(open(copy / "models" / "demo" / "model.json"))
    assert [t["name"] for t in model["tasks"]] == ["pretrain", "click"] and model["source"]["as_of"] == "click"
    lines = [json.loads(x) for x in click.splitlines()]
    assert [len(x["items"]) for x in lines] == [5, 5, 5] and lines[1]["unknown"] == ["no-such-item"]
    assert lines[2]["user"] == "u7" and all("error" not in x for x in json.loads(f"[{','.join(pretrain.splitlines())}]"))
    # The Ray-trained run's test metrics, recomputed from the exported model: identical.
    assert evaluate.count("equal") == 6 and "DIFFERS" not in evaluate, evaluate
    assert "rows scored" in score and (copy / "scored" / "click" / "_scoring.json").exists()


def serving_commands():
    section = README.split("## Use a trained model", 1)[1]
    return [line for line in bash_blocks(section)[0].strip().splitlines() if line.strip()]


def test_the_serving_commands_use_the_main_commands_run_directory():
    lines = serving_commands()
    run_dir = main_command().split("--run-dir", 1)[1].split()[0]
    assert lines[0] == f"conure-dist export --run-dir {run_dir} --out models/demo"
    assert all(line.startswith(("conure-dist ", "printf ")) for line in lines)
    assert [line.split()[1] for line in lines if line.startswith("conure-dist")] == [
        "export", "predict", "predict", "evaluate", "score"]
