"""Each benchmark of jobs/bench.py runs at a tiny size (proof that it works; not timed)."""

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "jobs", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_serve_benchmark_at_a_tiny_size(bench, tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert bench.main(["serve", "--workdir", str(tmp_path), "--num-items", "300", "--embed-dim", "16",
                       "--repeat-dilations", "1", "--seq-len", "12", "--users", "40", "--batch-size", "16",
                       "--repeats", "5", "--warmup", "1", "--no-score-job", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "one backbone per task" in text and "p99" in text
    result = json.loads(out.read_text())
    assert set(result["latency_ms"]) == {"float32/pretrain", "float32/click", "bfloat16/pretrain", "bfloat16/click"}
    sizes = result["sizes"]
    assert sizes["owner_map"] > 0 and sizes["one_backbone_per_task"] > sizes["weights"]


def test_prune_benchmark_at_a_tiny_size(bench, capsys):
    assert bench.main(["prune", "--embed-dim", "8", "--repeat-dilations", "1", "--num-items", "500"]) == 0
    text = capsys.readouterr().out
    assert text.count("selection") == 2 and text.count("stable sort") == 2


def test_item_step_and_masks_benchmarks_at_a_tiny_size(bench, capsys):
    assert bench.main(["item-step", "--users", "20", "--batch-size", "32", "--embed-dim", "8", "--repeat-dilations", "1",
                       "--seq-len", "6", "--num-items", "50", "--labels", "30", "--repeats", "2", "--warmup", "1"]) == 0
    assert bench.main(["masks", "--embed-dim", "8", "--repeat-dilations", "1", "--batch-size", "4", "--seq-len", "6",
                       "--num-items", "50", "--repeats", "2", "--warmup", "1"]) == 0
    assert "ratio" in capsys.readouterr().out
