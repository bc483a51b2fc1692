#!/usr/bin/env bash
# The whole loop on the shipped BasicMotions data: train -> export -> verify -> eval.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
export PATH="$PWD/.venv/bin:$PATH"
data=examples/data/basicmotions
out=runs/demo
mkdir -p "$out"

echo "== 1. train a stateful LSTM classifier (smart-watch IMU, 4 activities)"
seqstream train --task classify --cell lstm --data "$data/BasicMotions_TRAIN.ts" \
  --test "$data/BasicMotions_TEST.ts" --seed 0 --out "$out/train" > "$out/train.json"
echo "   wrote $out/train (checkpoint, config.json, metrics.json, curve.png)"

echo "== 2. export it as an ONNX step model (x, h, c -> probs, h_out, c_out)"
seqstream export "$out/train" --out "$out/basicmotions-lstm.onnx"

echo "== 3. verify: stepwise ONNX == full-sequence ONNX == PyTorch"
seqstream verify "$out/basicmotions-lstm.onnx" --checkpoint "$out/train" \
  --data "$data/BasicMotions_TEST.ts"

echo "== 4. evaluate step by step through onnxruntime (no torch) on the test split"
seqstream eval "$out/basicmotions-lstm.onnx" --data "$data/BasicMotions_TEST.ts" > "$out/eval.json"
.venv/bin/python - "$out/eval.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"   accuracy {d['accuracy']:.3f} on {d['n_cases']} cases (stepwise, onnxruntime)")
PY
