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

echo "== 5. serve it live: a private broker, the daemon, 40 replayed smart watches"
pids=()
cleanup() {
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill "${pids[$i]}" 2>/dev/null || true; wait "${pids[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
broker_port=$(free_port); metrics_port=$(free_port)
cat > "$out/mosquitto.conf" <<CONF
listener $broker_port 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
set_tcp_nodelay true
$( [ "$(id -u)" -eq 0 ] && echo "user root" )
CONF
mosquitto -c "$out/mosquitto.conf" > "$out/mosquitto.log" 2>&1 & pids+=($!)
cat > "$out/seqstream.toml" <<CONF
[model]
path = "basicmotions-lstm.onnx"
[checkpoint]
path = "state.ckpt"
[mqtt]
port = $broker_port
client_id = "demo"
[metrics]
port = $metrics_port
CONF
seqstream config check "$out/seqstream.toml"
mosquitto_sub -p "$broker_port" -t 'predictions/#' -v > "$out/predictions.txt" & pids+=($!)
seqstream run --config "$out/seqstream.toml" $( [ "$(id -u)" -eq 0 ] && echo --allow-root ) \
  > "$out/daemon.log" 2>&1 & daemon=$!; pids+=($daemon)
mosquitto_sub -p "$broker_port" -t seqstream/demo/status -C 1 -W 30 | sed 's/^/   daemon status: /'
seqstream --log-level WARNING replay "$data/BasicMotions_TEST.ts" \
  --broker "mqtt://127.0.0.1:$broker_port" --rate 50 --prefix watch-
for _ in $(seq 1 100); do
  [ "$(wc -l < "$out/predictions.txt")" -ge 4000 ] && break; sleep 0.1
done
curl -s "127.0.0.1:$metrics_port/metrics" > "$out/metrics.txt"
kill -TERM "$daemon"; wait "$daemon" || true
.venv/bin/python - "$out" "$data/BasicMotions_TEST.ts" <<'PY'
import json, sys
from pathlib import Path
from pipeline.offline import datasets
out, test = Path(sys.argv[1]), datasets.load(sys.argv[2])
last = {}
lines = (out / "predictions.txt").read_text().splitlines()
for line in lines:
    topic, payload = line.split(" ", 1)
    last[topic.rsplit("/", 1)[1]] = json.loads(payload)
right = sum(last.get(f"watch-{test.case_name(i)}", {}).get("label") == test.labels[i]
            for i in range(test.n_cases))
print(f"   {len(lines)} predictions published for {len(last)} streams; "
      f"label after each stream's last step right for {right}/{test.n_cases}")
print("   e.g.", lines[-1][:160])
wanted = ("seqstream_messages_received_total", "seqstream_predictions_published_total",
          "seqstream_active_streams", "seqstream_inference_latency_seconds_count")
for line in (out / "metrics.txt").read_text().splitlines():
    if line.startswith(wanted):
        print("   metric", line)
PY
echo "   daemon log: $out/daemon.log; checkpoint: $out/state.ckpt"
