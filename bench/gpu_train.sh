#!/usr/bin/env bash
# Train cloak-mini's decoder on a GPU in one run, continuing the shipped checkpoint with the CPU recipe's loss at GPU
# batch sizes (64 x 128 frames, bf16 autocast). The data travel as a pack file (no corpora on the GPU machine):
#   where the corpora are:  python -m cloak.train.mini --stage pack --pack runs/pack.pt && bash bench/fetch_wheels.sh train
#   on the GPU machine (with runs/pack.pt and .whl/ copied along):  bash bench/gpu_train.sh   (~ MINUTES + 2 min)
# It continues from INIT (default: the shipped checkpoint). To continue the CPU run instead (step 9,500, further on):
#   python -m cloak.train.mini --stage export --out runs/init.pt      (17 MB; copy it too, INIT=runs/init.pt)
# Writes $OUT/cloak-mini-gpu.pt (EMA weights), the loss log and probe.json; then, where the corpora are:
#   mkdir -p /tmp/gpu && cp <OUT>/cloak-mini-gpu.pt /tmp/gpu/diffvc.pt
#   python -m cloak.train.acceptance --models /tmp/gpu --pairs 2 --out runs/acceptance-gpu.json
set -uo pipefail
OUT="${OUT:-runs/gpu-out}"
MINUTES="${MINUTES:-7}"
INIT="${INIT:-cloak/data/cloak-mini.pt}"
mkdir -p "$OUT"
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -m cloak.train.mini --items runs/pack.pt --cache /tmp/cloak-gpu --stage all --device cuda \
    --init "$INIT" --dec-batch 64 --dec-frames 128 --dec-steps 1000000 \
    --hours "$("$PY" -c "print($MINUTES / 60)")" --out "$OUT/cloak-mini-gpu.pt" 2>&1 | tee "$OUT/train.log" | tail -40
cp /tmp/cloak-gpu/decoder_log.jsonl "$OUT/" 2>/dev/null
# does the decoder use its speaker conditioning now? (right vs another speaker's; gain 0 = cannot clone)
"$PY" -m cloak.train.probe --models "$OUT/cloak-mini-gpu.pt" --cache /tmp/cloak-gpu --items runs/pack.pt \
    --batches 24 --json | tee "$OUT/probe.json"
ls -la "$OUT"
