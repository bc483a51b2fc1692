"""The shipped deployment files checked by the real tools: promtool, systemd-analyze,
TypeScript with Grafana's own schema types (npm, installed once into ``.cache/``)."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCHEMA_PKG = Path(__file__).resolve().parent / "grafana-schema"
SCHEMA_CACHE = REPO / ".cache" / "grafana-schema"


@pytest.fixture(scope="session")
def grafana_schema() -> Path:
    """``node_modules`` with ``@grafana/schema`` and ``typescript`` at the locked versions.

    scripts/setup.sh installs it; this installs it the same way when it is missing or
    the lock file changed (npm reaches the registry only then).
    """
    lock = SCHEMA_PKG / "package-lock.json"
    cached = SCHEMA_CACHE / "package-lock.json"
    modules = SCHEMA_CACHE / "node_modules"
    fresh = cached.is_file() and filecmp.cmp(lock, cached, shallow=False)
    if not (fresh and (modules / "@grafana" / "schema").is_dir()):
        assert shutil.which("npm"), "npm not found: run scripts/setup.sh (installs nodejs npm)"
        SCHEMA_CACHE.mkdir(parents=True, exist_ok=True)
        shutil.copy(SCHEMA_PKG / "package.json", SCHEMA_CACHE)
        shutil.copy(lock, SCHEMA_CACHE)
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--silent"],
            cwd=SCHEMA_CACHE,
            check=True,
            timeout=300,
        )
    return modules
