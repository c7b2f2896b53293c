#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one bounded script (expect 15-25 minutes on one H100/H200;
# GPU_CHECK_STEPS lowers the steps per stage, GPU_CHECK_ZERO="0" runs one ZeRO stage only):
#   1. the backbone benchmark (masked NextItNet vs the plain Conv2d reference, fp32 and bf16);
#   2. the mask overhead and the frozen-guard cost at TTL size, bf16;
#   3. a bounded run of T1 and one later task at 646K items (the `ttl` synthetic preset)
#      through Ray Train + DeepSpeed on one GPU, ZeRO-0 and ZeRO-2 in bf16, with the retention
#      check: the first task's test metrics after the second commit equal those at its own.
#
# Usage, from the repository root of an installed checkout:
#   bash jobs/gpu_check.sh [OUT_DIR]        (default: gpu-check/)
# Results: OUT_DIR/*.json, OUT_DIR/*.log and OUT_DIR/summary.txt (small files only: the runs
# and the generated data live under GPU_CHECK_WORK, default /tmp/conure-gpu, and each run's
# multi-GB checkpoints are deleted once its figures are read).
set -euo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
steps=${GPU_CHECK_STEPS:-50}
work=${GPU_CHECK_WORK:-/tmp/conure-gpu}
data=${GPU_CHECK_DATA:-$work/ttl}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

python jobs/bench.py backbone --device cuda --repeats 30 --json "$out/backbone.json" 2>&1 | tee "$out/backbone.log"
python jobs/bench.py masks --device cuda --repeats 30 --json "$out/masks.json" 2>&1 | tee "$out/masks.log"
python jobs/bench.py guard --device cuda --dtype bf16 --json "$out/guard.json" 2>&1 | tee "$out/guard.log"

if [ ! -f "$data/dataset.json" ]; then
  conure-dist prepare synthetic --preset ttl --out "$data" 2>&1 | tail -3 | tee "$out/prepare.log"
fi
for zero in ${GPU_CHECK_ZERO:-0 2}; do
  run="$work/run-zero$zero"
  rm -rf "$run"
  python jobs/ttl.py --data "$data" --tasks pretrain,age --workers 1 --gpus-per-worker 1 \
    --zero-stage "$zero" --precision bf16 --max-steps "$steps" --max-eval-rows 5000 --log-every 10 \
    --run-dir "$run" > "$out/run-zero$zero.log" 2>&1
  python - "$run" "$zero" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
run, zero = sys.argv[1], sys.argv[2]
m = json.load(open(f"{run}/manifest.json"))
acc = {(r["after_task"], r["task"], r["metric"]): r["value"] for r in m["accuracy"]}
first = [(k, v) for k, v in acc.items() if k[0] == "pretrain" and k[1] == "pretrain"]
if not first or not any(k[0] == "age" for k in acc):
    sys.exit("retention check: the run committed no pretrain and age metrics to compare")
same = all(acc[("age", "pretrain", metric)] == v for (_, _, metric), v in first)
print(f"ZeRO-{zero} bf16: pretrain metrics after age == at its commit: {same}")
gib = lambda values: [round(v / 2**30, 2) for v in values]
for name, stage in sorted(m["stages"].items()):
    extra = {k: stage[k] for k in ("startup_s", "teardown_s") if k in stage}
    for key in ("peak_gpu_bytes", "peak_rss_bytes"):
        if key in stage:
            extra[key.replace("_bytes", "_gib")] = gib(stage[key])
    if stage.get("history"):
        h = stage["history"][-1]
        extra.update(examples_per_s=round(h["examples_per_s"], 1), data_wait_s=round(h.get("data_wait_s", 0), 1))
    print(f"  {name}: {stage.get('status')} {stage.get('seconds', '')} s " + json.dumps(extra))
if not same:
    sys.exit("retention check failed")
EOF
  rm -rf "$run/ray"  # the Ray Train checkpoints (GBs each at this size)
done
echo "results in $out"
