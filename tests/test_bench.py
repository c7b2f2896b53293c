"""Every benchmark of jobs/bench.py runs at a tiny size through ``bench.py all --tiny`` (proof
that each works and writes its result; nothing here is timed)."""

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_PROCESS = ["backbone", "masks", "t1-step", "prune", "guard", "item-step"]
WITH_RAY = ["serve", "pipeline", "batch-mix", "scaling", "fixed-cost", "floor"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "jobs", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_all(bench, tmp_path, only):
    out = tmp_path / "bench.json"
    assert bench.main(["all", "--tiny", "--workdir", str(tmp_path / "work"), "--out", str(out), "--only", *only]) == 0
    result = json.loads(out.read_text())
    assert list(result["benchmarks"]) == only and result["tiny"] is True
    return {name: b["result"] for name, b in result["benchmarks"].items()}


def test_all_covers_every_benchmark(bench):
    assert [name for name, _ in bench.all_benchmarks("/tmp/w", True)] == IN_PROCESS + WITH_RAY
    full = [name for name, _ in bench.all_benchmarks("/tmp/w", False)]  # fixed-cost only by hand: floor has the demo's
    assert full == [name for name in IN_PROCESS + WITH_RAY if name != "fixed-cost"]
    with pytest.raises(SystemExit, match="no benchmark nope"):
        bench.main(["all", "--out", "/dev/null", "--only", "nope"])


def test_in_process_benchmarks_at_a_tiny_size(bench, tmp_path):
    r = run_all(bench, tmp_path, IN_PROCESS)
    rows = {(row["variant"], row["dtype"]): row for row in r["backbone"]["rows"]}
    assert set(rows) == {(v, d) for v in ("reference (Conv2d)", "conure (masked)", "conure, conv1d layout (before)")
                         for d in ("fp32", "bf16")}  # --tiny asks for bf16 on any machine
    assert rows["reference (Conv2d)", "fp32"]["speed_vs_fp32_reference"] == 1.0
    assert all(row["ms"] > 0 and row["conv_gflops"] > 0 for row in rows.values())
    assert set(r["masks"]["seconds"]) == {"forward", "forward+backward"}
    steps = r["t1-step"]["seconds_per_step"]
    assert any(k.startswith("exact softmax") for k in steps) and all(v > 0 for v in steps.values())
    assert set(r["prune"]) == {"conv layers, selection", "conv layers, stable sort (before)",
                               "conv layers + item embedding, selection"}  # as `all` runs it: no embedding baseline
    assert all(v["weights"] > 0 for v in r["prune"].values())
    assert r["guard"]["exact copy"]["caught"] and r["guard"]["checksums"]["caught"]
    assert set(r["item-step"]["seconds"]) == {"every row", "distinct sequences"}


@pytest.mark.slow
def test_ray_benchmarks_at_a_tiny_size(bench, tmp_path):
    r = run_all(bench, tmp_path, WITH_RAY)
    sizes = r["serve"]["sizes"]
    assert sizes["owner_map"] > 0 and sizes["one_backbone_per_task"] > sizes["weights"]
    assert set(r["serve"]["latency_ms"]) == {"float32/pretrain", "float32/click", "bfloat16/pretrain", "bfloat16/click"}
    readers = {(m["reader"], m["workers"]) for m in r["pipeline"]["measurements"]}
    assert readers == {("pyarrow", 1), ("pyarrow+pad", 1), ("ray (files)", 1), ("ray (parquet)", 1)}
    assert all(m["rows"] > 0 for m in r["pipeline"]["measurements"])
    assert r["batch-mix"]["stored order"]["batches"] > 0
    one, two = r["scaling"].values()
    for row in (one, two):
        assert row["steps"] == 3 and row["examples_per_s"] > 0 and 0 <= row["data_wait_share"] <= 1
    assert len(one["peak_rss_gib_per_worker"]) == 1 and len(two["peak_rss_gib_per_worker"]) == 2
    fixed = r["fixed-cost"]
    for group in ("stage", "run"):  # the runs gave the same metrics, or the benchmark would have raised
        task = fixed[group]["tasks"]["pretrain"]
        assert task["steps_s"] > 0 and task["test_eval_s"] > 0 and task["fixed_s"] > 0
        assert 0 < fixed[group]["steps_and_eval_share"] < 1
    assert fixed["wall_ratio"] == fixed["stage"]["run_wall_s"] / fixed["run"]["run_wall_s"]
    (floor,) = r["floor"]["runs"]  # the demo command and the empty session, each a process of its own
    assert 0 < floor["steps_and_eval_s"] < floor["demo_wall_s"] and floor["floor_wall_s"] > 0
    assert all(v > 0 for v in floor["floor_parts_s"].values())
    assert sum(floor["floor_parts_s"].values()) < floor["floor_wall_s"]  # measured inside the process it timed
    assert list(floor["fixed_s_per_task"]) == ["pretrain"] and floor["fixed_s_per_task"]["pretrain"] > 0


def test_bf16_is_measured_by_default_only_where_the_hardware_has_it(bench, monkeypatch, capsys):
    import torch

    from conure_dist.train import engine

    cpu = torch.device("cpu")
    assert bench._dtypes(["bf16"], cpu, "fp32", "bf16") == ["bf16"]  # asked for: always
    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    assert bench._dtypes(None, cpu, "fp32", "bf16") == ["fp32", "bf16"]
    monkeypatch.setattr(engine, "native_bf16", lambda device: False)
    assert bench._dtypes(None, cpu, "float32", "bfloat16") == ["float32"]
    assert "bfloat16: not measured, this cpu has no bf16 arithmetic" in capsys.readouterr().out


def test_native_bf16_follows_torch_cpu_features(monkeypatch):
    import torch

    from conure_dist.train.engine import emulated_bf16_warning, native_bf16

    # torch's own checks, which native_bf16 asks (a rename in torch would fail here first)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert native_bf16("cpu") is False
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert native_bf16("cpu") is True
    assert emulated_bf16_warning("bf16", torch.device("cpu")) is None and emulated_bf16_warning("fp32", torch.device("cpu")) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert "torch emulates it" in emulated_bf16_warning("bf16", torch.device("cpu"))
    assert emulated_bf16_warning("fp32", torch.device("cpu")) is None


def test_bench_options_are_checked_before_anything_runs(bench):
    with pytest.raises(SystemExit, match="include fp32"):
        bench.main(["backbone", "--dtypes", "bf16"])
    with pytest.raises(SystemExit, match="each must be one of --ratios"):
        bench.main(["t1-step", "--ratios", "0.2", "--baseline-ratios", "0.05"])
    with pytest.raises(SystemExit):  # argparse: at least one pair
        bench.main(["floor", "--repeats", "0"])


def test_t1_step_measures_the_baselines_it_is_asked_for(bench, tmp_path):
    out = tmp_path / "t1.json"
    assert bench.main(["t1-step", "--embed-dim", "16", "--repeat-dilations", "1", "--seq-len", "8", "--num-items", "3000",
                       "--batch-size", "4", "--full-batch", "0", "--repeats", "1", "--warmup", "0",
                       "--no-intermediate", "--baseline-ratios", "0.2", "--json", str(out)]) == 0
    steps = json.loads(out.read_text())["seconds_per_step"]
    # "now" also in a process of its own under the allocator the trainer's workers get
    workers = "distinct draws, fused Adam, huge pages (now, as the workers run it)"
    assert sorted(steps) == ["sampled 20%, batch 4: distinct draws, fused Adam (now)",
                             f"sampled 20%, batch 4: {workers}",
                             "sampled 20%, batch 4: every draw, foreach Adam (before)",
                             "sampled 5%, batch 4: distinct draws, fused Adam (now)",
                             f"sampled 5%, batch 4: {workers}"]
    assert bench.main(["t1-step", "--embed-dim", "16", "--repeat-dilations", "1", "--seq-len", "8", "--num-items", "3000",
                       "--batch-size", "4", "--full-batch", "0", "--repeats", "1", "--warmup", "0", "--ratios", "0.2",
                       "--no-baseline", "--no-huge-pages", "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())["seconds_per_step"]) == ["sampled 20%, batch 4: distinct draws, fused Adam (now)"]
