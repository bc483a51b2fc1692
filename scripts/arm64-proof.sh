#!/usr/bin/env bash
# The ARM64 proof: seqstream's runtime installed from its wheel into an emulated arm64
# Debian root (debootstrap + qemu-user-static), `seqstream eval` and a daemon round trip
# through mosquitto run inside it, compared with this host. Prints one JSON document.
# Needs root (debootstrap, chroot, mount), Debian's mirror and PyPI. Slow (qemu), so not
# part of CI; idempotent: the root and the model are cached in .cache/arm64-proof/.
# Usage: scripts/arm64-proof.sh [--cases N] [--rate HZ] [--atol X] [--rebuild]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "arm64-proof: needs root (debootstrap, chroot, mount)" >&2; exit 2; }
scripts/setup.sh dev >&2   # the host side trains the model and runs the broker
exec nice -n 10 .venv/bin/python benchmarks/arm64_proof.py "$@"
