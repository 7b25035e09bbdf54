#!/usr/bin/env bash
# One prepared GPU check (< 8 min): installs nothing from the internet, runs the GPU benchmarks, writes JSON
# under $OUT (the device tool's result folder) or bench/results/. Run from the repository root on the GPU box:
#   bash bench/gpu_check.sh
# Needs: the project importable (PYTHONPATH=. works), torch with CUDA, the resemblyzer weights file.
set -uo pipefail
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-}:$(pwd)" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python - <<'PY' | tee "$OUT/env.txt"
import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
timeout 240 python bench/protect.py --device cuda --model official-shaped --seconds 7 \
    --out "$OUT/protect-cuda-official-1job.json" 2>&1 | tail -30
timeout 240 python bench/protect.py --device cuda --model official-shaped --seconds 7 --jobs 8 \
    --out "$OUT/protect-cuda-official-8jobs.json" 2>&1 | tail -30
ls -la "$OUT"
