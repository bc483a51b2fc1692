"""The test-data manifest: it matches the data the suite reads, and fetching verifies.

Offline: the wheel here is a real zip built from the real files (as pip would leave it
in the wheel cache), so :func:`tests.testdata.fetch` runs its real extraction and
checks without a download.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests import testdata


def test_the_manifest_matches_every_file_the_suite_reads() -> None:
    root = testdata.data_dir()
    for rel, (_, _, digest) in testdata.FILES.items():
        assert testdata.sha256((root / rel).read_bytes()) == digest, rel


def test_fetch_extracts_verified_files_and_refuses_a_changed_one(tmp_path: Path) -> None:
    root = testdata.data_dir()
    good, other = "airline/Airline.csv", "basicmotions/BasicMotions_TRAIN.ts"
    files = {rel: testdata.FILES[rel] for rel in (good, other)}
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "aeon-1.6.0-py3-none-any.whl", "w") as whl:
        whl.writestr(files[good][1], (root / good).read_bytes())
        whl.writestr(files[other][1], (root / other).read_bytes() + b"tampered\n")
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="SHA-256 .* expected"):
        testdata.fetch(files, cache, wheels)
    assert (cache / good).read_bytes() == (root / good).read_bytes()
    assert not (cache / other).exists()  # never written, not even partly
    # what is cached and verified is not fetched again
    assert testdata.fetch({good: files[good]}, cache, wheels) == []
