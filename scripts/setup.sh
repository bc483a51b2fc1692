#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine: Debian packages (only those
# missing), a virtual environment in .venv, and seqstream with its extras.
# Usage: scripts/setup.sh [dev|demo]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-dev}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Binaries the tests and the demo start for real (broker, Prometheus, audio).
need=()
command -v mosquitto >/dev/null || need+=(mosquitto mosquitto-clients)
if [ "$profile" = dev ]; then
  command -v promtool >/dev/null || need+=(prometheus)
  command -v espeak-ng >/dev/null || need+=(espeak-ng)
  command -v sox >/dev/null || need+=(sox)
  command -v pulseaudio >/dev/null || need+=(pulseaudio pulseaudio-utils libasound2-plugins alsa-utils)
  command -v paplay >/dev/null || need+=(pulseaudio-utils)  # paplay/parec/pactl: the virtual mic
  dpkg -s libasound2-plugins >/dev/null 2>&1 || need+=(libasound2-plugins)  # ALSA -> PulseAudio
  command -v systemd-analyze >/dev/null || need+=(systemd)
  command -v npm >/dev/null || need+=(nodejs npm)  # Grafana's schema types (tests/deploy)
  dpkg -s libportaudio2 >/dev/null 2>&1 || need+=(libportaudio2)
  command -v chromium >/dev/null || need+=(chromium)  # headless: the status page's test
  command -v nats-server >/dev/null || need+=(nats-server)  # cluster mode's tests (3 nodes)
fi
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: seqstream needs Python >= 3.11, found {sys.version.split()[0]}")
PY

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: the CPU wheel; a looser spec can pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
if [ "$profile" = dev ]; then extras="dev"; else extras="train"; fi
.venv/bin/python -m pip install -q -e ".[$extras]"
if [ "$profile" = dev ]; then
  # Grafana's dashboard types for tests/deploy, pinned by the lock file; cached, never committed.
  lock=tests/deploy/grafana-schema/package-lock.json
  if ! cmp -s "$lock" .cache/grafana-schema/package-lock.json \
      || [ ! -d .cache/grafana-schema/node_modules/@grafana/schema ]; then
    mkdir -p .cache/grafana-schema
    cp tests/deploy/grafana-schema/package.json "$lock" .cache/grafana-schema/
    (cd .cache/grafana-schema && npm ci --no-audit --no-fund --silent)
  fi
  # The tests' data: ../shared/data where it exists, else fetched from the aeon, sktime
  # and river wheels (pip download --no-deps) into .cache/testdata, checked by SHA-256.
  .venv/bin/python -m tests.testdata fetch
fi
echo "setup: ready ($(.venv/bin/python --version))"
