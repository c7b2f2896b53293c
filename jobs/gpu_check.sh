#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one bounded script (about 10 minutes on one H100/H200):
#   1. the backbone benchmark (masked NextItNet vs the plain Conv2d reference, fp32 and bf16);
#   2. the mask overhead and the frozen-guard cost at TTL size, bf16;
#   3. a bounded run of T1 and one later task at 646K items (the `ttl` synthetic preset)
#      through Ray Train + DeepSpeed on one GPU, ZeRO-0 and ZeRO-2 in bf16, with the retention
#      check: the first task's test metrics after the second commit equal those at its own.
#
# Usage, from the repository root of an installed checkout:
#   bash jobs/gpu_check.sh [OUT_DIR]        (default: gpu-check/)
# Results: OUT_DIR/*.json, OUT_DIR/*.log and OUT_DIR/summary.txt.
set -euo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
steps=${GPU_CHECK_STEPS:-50}
data=${GPU_CHECK_DATA:-/tmp/conure-gpu/ttl}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

python jobs/bench.py backbone --device cuda --repeats 30 --json "$out/backbone.json" 2>&1 | tee "$out/backbone.log"
python jobs/bench.py masks --device cuda --repeats 30 --json "$out/masks.json" 2>&1 | tee "$out/masks.log"
python jobs/bench.py guard --device cuda --dtype bf16 --json "$out/guard.json" 2>&1 | tee "$out/guard.log"

if [ ! -f "$data/dataset.json" ]; then
  conure-dist prepare synthetic --preset ttl --out "$data" 2>&1 | tail -3 | tee "$out/prepare.log"
fi
for zero in 0 2; do
  run="$out/run-zero$zero"
  rm -rf "$run"
  /usr/bin/time -v python jobs/ttl.py --data "$data" --tasks pretrain,age --workers 1 --gpus-per-worker 1 \
    --zero-stage "$zero" --precision bf16 --max-steps "$steps" --max-eval-rows 5000 --log-every 10 \
    --run-dir "$run" > "$out/run-zero$zero.log" 2>&1
  python - "$run" "$zero" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
run, zero = sys.argv[1], sys.argv[2]
m = json.load(open(f"{run}/manifest.json"))
acc = {(r["after_task"], r["task"], r["metric"]): r["value"] for r in m["accuracy"]}
first = [(k, v) for k, v in acc.items() if k[0] == "pretrain" and k[1] == "pretrain"]
same = all(acc[("age", "pretrain", metric)] == v for (_, _, metric), v in first)
print(f"ZeRO-{zero} bf16: pretrain metrics after age == at its commit: {same}")
for name, stage in sorted(m["stages"].items()):
    print(f"  {name}: {stage.get('status')} {stage.get('seconds', '')} s " + json.dumps(
        {k: stage[k] for k in ('startup_s', 'teardown_s') if k in stage}))
if not same:
    sys.exit("retention check failed")
EOF
done
echo "results in $out"
