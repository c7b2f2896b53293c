"""The comparison job on a tiny generated dataset: every method, the ablations, the report."""

import csv

import pytest

from conure_dist.data.synthetic import SyntheticConfig, prepare_synthetic
from conure_dist.jobs import ttl

TINY = SyntheticConfig(num_users=300, num_items=60, seq_len=10, min_seq_len=3, num_topics=4, click_labels=12, like_labels=10)
SMALL = ["--embed-dim", "16", "--set", "model.dilations=[1,2,1,2]", "--epochs", "2", "--retrain-epochs", "1",
         "--first-batch-size", "32", "--batch-size", "32", "--seq-len", "10"]
TASKS = ["pretrain", "click", "like", "age"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    prepare_synthetic(TINY, str(root / "data"), seed=0)
    out = root / "report"
    argv = ["--compare", "--data", str(root / "data"), "--out", str(out), "--seeds", "1", "--tasks", ",".join(TASKS), *SMALL]
    assert ttl.main(argv) == 0
    return out


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_has_every_table_and_figure(report):
    for name in ("report.md", "table2.csv", "runs.csv", "table3.csv", "table4.csv", "figure6.csv", "table5.csv",
                 "table6.csv", "accuracy_matrix.png", "capacity.png", "retraining.png"):
        assert (report / name).exists(), name
    text = (report / "report.md").read_text()
    for heading in ("## Table 2", "## Table 3", "## Table 4", "## Figure 6", "## Table 5", "## Table 6", "What this shows"):
        assert heading in text
    assert "PREPARED_DATASET" in text and str(report.parent / "data") not in text  # no local data path in the report
    table = rows(report / "table2.csv")
    methods = {r["method"] for r in table}
    assert methods == {"Pop", "DNN", "SinMo", "SinMoAll", "FineSmax", "FineAll", "PeterRec", "MTL", "Conure-", "Conure"}
    for method in methods - {"MTL"}:
        assert {r["task"] for r in table if r["method"] == method and r["mean"] != ""} == set(TASKS), method
    backbones = {r["method"]: r["backbones"] for r in table if r["task"] == "pretrain"}
    for method in ("DNN", "SinMo", "FineAll", "MTL"):  # one backbone per task
        assert float(backbones[method]) == len(TASKS), method
    for method in ("SinMoAll", "FineSmax", "PeterRec", "Conure"):
        assert float(backbones[method]) == 1, method


def test_sinmoall_forgets_and_conure_does_not(report):
    runs = rows(report / "runs.csv")

    def values(variant, task):
        return {r["phase"]: float(r["value"]) for r in runs
                if r["variant"] == variant and r["task"] == task and r["metric"] == "mrr@5" and r["phase"].startswith("after")}

    conure = values("conure", "pretrain")
    assert len(conure) == len(TASKS) and len(set(conure.values())) == 1, conure  # T1 exactly as at its commit
    conure_click = values("conure", "click")
    assert len(conure_click) == len(TASKS) - 1 and len(set(conure_click.values())) == 1
    sinmoall = values("sinmoall", "pretrain")
    assert sinmoall["after pretrain"] != sinmoall[f"after {TASKS[-1]}"], sinmoall


def test_compare_needs_an_output_directory(tmp_path, capsys):
    from conure_dist.launch import main_guard

    code = main_guard(ttl.main, ["--compare", "--data", str(tmp_path)])
    assert code == 2 and "--out" in capsys.readouterr().err


@pytest.mark.slow
def test_check_ray_adds_the_conure_row_from_ray_train(tmp_path, monkeypatch):
    """--check-ray: the Conure row once more through Ray Data -> Ray Train -> DeepSpeed -> coordinator."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    for key, value in {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                       "DS_ACCELERATOR": "cpu", "RAY_TMPDIR": ray_tmp}.items():
        monkeypatch.setenv(key, value)
    prepare_synthetic(TINY, str(tmp_path / "data"), seed=0)
    out = tmp_path / "report"
    argv = ["--compare", "--check-ray", "--no-ablations", "--data", str(tmp_path / "data"), "--out", str(out),
            "--seeds", "1", "--tasks", "pretrain,click", "--workers", "1", "--run-dir", str(tmp_path / "run"), *SMALL]
    try:
        assert ttl.main(argv) == 0
    finally:
        import ray

        ray.shutdown()
    table = rows(out / "table2.csv")
    ray_row = {r["task"]: float(r["mean"]) for r in table if r["method"] == "Conure (Ray Train + DeepSpeed)"}
    assert set(ray_row) == {"pretrain", "click"}
    assert (tmp_path / "run" / "compare-conure" / "manifest.json").exists()  # a real run directory, with its manifest
