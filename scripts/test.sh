#!/usr/bin/env bash
# The whole check, as CI runs it: set-up, lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy pipeline models
.venv/bin/pytest "$@"
