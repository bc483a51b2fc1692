"""The runtime must run on a box without torch: no pipeline module may import it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pipeline


def test_importing_every_pipeline_module_and_the_cli_never_imports_torch() -> None:
    modules = sorted(m.name for m in pkgutil.walk_packages(pipeline.__path__, "pipeline."))
    assert "pipeline.engine.engine" in modules and "pipeline.model" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import pipeline.cli\n"
        "pipeline.cli.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(len(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "0"


def test_plain_import_pipeline_does_not_import_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.strip() == "False"
