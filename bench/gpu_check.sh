#!/usr/bin/env bash
# One GPU check (< 8 min): installs nothing from the internet, runs the GPU benchmarks, writes JSON under $OUT
# (default bench/results/). Run from the repository root on the GPU machine:
#   bash bench/gpu_check.sh
# Needs: torch with CUDA; wheels the machine lacks, from `bash bench/fetch_wheels.sh` run where there is network
# (copy the .whl/ folder along).
# Order = value: the issue-7 target (official-shaped, paper settings, 7 s, bf16) first, then the fp32 reference,
# torch.compile, 8 jobs in one batch, and 8 concurrent clients through the gRPC server.
set -uo pipefail
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
run() {  # run <timeout> <name> <args...>
  local t="$1" name="$2"; shift 2
  echo "=== $name"
  timeout "$t" "$PY" bench/protect.py --device cuda --model official-shaped --seconds 7 "$@" \
      --out "$OUT/protect-cuda-$name.json" 2>&1 | tail -25
}
run 75 bf16-1job --precision bf16
run 75 fp32-1job --precision fp32
run 150 bf16-compiled-1job --precision bf16 --compile
run 90 bf16-8jobs --precision bf16 --jobs 8
echo "=== serve: 8 concurrent 7 s jobs, paper settings"
timeout 90 "$PY" bench/serve_bench.py --random official --device cuda --precision bf16 --clients 8 --jobs 1 \
    --seconds 7 --iterations 50 --repeats 5 --source-frames 192 --max-batch 8 --out "$OUT/serve-cuda-official.json" \
    2>&1 | tail -8
ls -la "$OUT"
