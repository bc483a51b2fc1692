"""Fixtures shared by the whole suite: where the real data lives, and small exported models.

The data sets are the real public ones: ``../shared/data`` beside the checkout when it is
there (this project's machines and CI), else the copy ``scripts/setup.sh dev`` fetched
from the aeon/sktime/river wheels and checked by SHA-256 (:mod:`tests.testdata`).
Neither is an error, not a skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import testdata

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return testdata.data_dir()


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
