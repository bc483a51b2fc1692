"""Fixtures shared by the whole suite: where the real data lives, and small exported models.

The data sets are the real public ones in ``../shared/data`` (beside the checkout, as in
CI). A missing folder is an error, not a skip: CI always has it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    root = Path(os.environ.get("SEQSTREAM_SHARED", REPO.parent / "shared")) / "data"
    if not root.is_dir():
        raise RuntimeError(f"shared data not found at {root} (set SEQSTREAM_SHARED)")
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_dir()


@pytest.fixture(scope="session")
def basicmotions(shared_data: Path) -> tuple[Path, Path]:
    d = shared_data / "basicmotions"
    return d / "BasicMotions_TRAIN.ts", d / "BasicMotions_TEST.ts"


@pytest.fixture(scope="session")
def waterflow(shared_data: Path) -> Path:
    return shared_data / "waterflow" / "water-flow.csv"


@pytest.fixture(scope="session")
def mitdb(shared_data: Path) -> Path:
    return shared_data / "mitdb" / "mitdb.csv"


@pytest.fixture(scope="session")
def airline(shared_data: Path) -> Path:
    return shared_data / "airline" / "Airline.csv"
