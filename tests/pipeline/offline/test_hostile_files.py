"""Broken files and unsafe set-ups: a clear one-line error, and the previous state kept.

Corrupt, truncated and wrong-shaped model files, model metadata that lies about the
graph, unreadable configs and a corrupt checkpoint: ``seqstream run`` refuses to start
with one line naming the file, and the state checkpoint on disk is left exactly as it
was. Also the security basics of the daemon: it refuses to run as root unless told, a
model file must match the configured SHA-256, and metrics listen on loopback only.
(A full disk while checkpointing is proven against a running daemon in
``tests/integration/test_faults.py``; a password file readable by others is warned
about in ``test_config.py``.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pipeline import cli
from pipeline.commands.run import refuse_root
from pipeline.contract import METADATA_KEY
from pipeline.daemon import app, config
from pipeline.engine.engine import Engine, EngineSettings, Step
from pipeline.errors import ConfigError, ModelError
from pipeline.model import StepModel
from pipeline.offline import datasets
from pipeline.telemetry.metrics import Exporter
from tests.pipeline.conftest import ModelFactory


@pytest.fixture(scope="module")
def model_bytes(random_model_path: ModelFactory) -> bytes:
    return random_model_path("lstm", "classify").read_bytes()


@pytest.fixture
def checkpoint(random_model_path: ModelFactory, tmp_path: Path) -> Path:
    """A real checkpoint of three streams, as a previous run left it."""
    engine = Engine(StepModel.load(random_model_path("lstm", "classify")), EngineSettings())
    rows = np.random.default_rng(0).normal(size=(3, 4, 6)).astype(np.float32)
    for t in range(4):
        engine.process([Step(f"s{i}", rows[i, t : t + 1], t) for i in range(3)])
    path = tmp_path / "state.ckpt"
    engine.save(path)
    return path


def run_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: Path, ckpt: Path, **extra: str
) -> str:
    """``seqstream run`` on a config naming ``model`` and ``ckpt``; its one error line."""
    lines = [f'[model]\npath = "{model}"', f'[checkpoint]\npath = "{ckpt}"']
    # a port nobody listens on: a start that gets as far as the broker fails at once
    lines.append(f"[mqtt]\nport = {_free_port()}\nconnect_timeout_s = 1")
    lines += [f"[{k}]\n{v}" for k, v in extra.items()]
    cfg = tmp_path / "run.toml"
    cfg.write_text("\n".join(lines) + "\n")
    code = cli.main(["run", "--config", str(cfg), "--allow-root"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_ERROR and len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# -- model files ---------------------------------------------------------------------------


def _without_metadata(data: bytes) -> bytes:
    proto = onnx.load_from_string(data)
    del proto.metadata_props[:]
    return proto.SerializeToString()


def _metadata(data: bytes, edit: Callable[[str], str]) -> bytes:
    proto = onnx.load_from_string(data)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = edit(prop.value)
    return proto.SerializeToString()


def _lie(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    """Metadata that is valid on its own but contradicts the graph."""

    def edit(text: str) -> str:
        doc = json.loads(text)
        change(doc)
        return json.dumps(doc)

    return lambda data: _metadata(data, edit)


def _seven_features(doc: dict[str, Any]) -> None:
    doc["features"].append("f6")
    doc["normalisation"]["mean"].append(0.0)
    doc["normalisation"]["std"].append(1.0)


def _wider_state(doc: dict[str, Any]) -> None:
    for s in doc["state"]:
        s["shape"][-1] += 1


def _forecaster(doc: dict[str, Any]) -> None:
    doc.update(task="forecast", outputs=["forecast"], targets=["f0"], horizon=1, labels=[])


BROKEN: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "empty": (lambda b: b"", "not a loadable ONNX model"),
    "truncated": (lambda b: b[: len(b) // 2], "not a loadable ONNX model"),
    "garbage": (lambda b: os.urandom(4096), "not a loadable ONNX model"),
    "text": (lambda b: b"model = 'har'\n", "not a loadable ONNX model"),
    "no metadata": (_without_metadata, "no 'seqstream' metadata"),
    "metadata not JSON": (lambda b: _metadata(b, lambda t: t[:-7]), "not valid JSON"),
    "metadata lies about features": (_lie(_seven_features), "input 'x' has shape"),
    "metadata lies about state": (_lie(_wider_state), "state input 'h' has shape"),
    "metadata of another task": (_lie(_forecaster), "graph lacks outputs"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_model_file_is_refused_by_name_and_the_checkpoint_is_kept(
    kind: str,
    model_bytes: bytes,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    damage, why = BROKEN[kind]
    bad = tmp_path / "model.onnx"
    bad.write_bytes(damage(model_bytes))
    before = checkpoint.read_bytes()
    with pytest.raises(ModelError, match=why) as info:
        StepModel.load(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    err = run_cli(tmp_path, capsys, bad, checkpoint)
    assert err.startswith("seqstream: error: ") and str(bad) in err and why in err
    assert checkpoint.read_bytes() == before


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    cut=st.integers(0, 10**6),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=3),
)
def test_damaged_model_bytes_load_or_raise_model_error_and_a_hash_catches_any_change(
    model_bytes: bytes,
    tmp_path_factory: pytest.TempPathFactory,
    cut: int,
    flips: list[tuple[int, int]],
) -> None:
    data = bytearray(model_bytes)
    for at, bit in flips:
        data[at % len(data)] ^= 1 << bit
    if cut % 3 == 0:
        del data[cut % len(data) :]
    path = tmp_path_factory.getbasetemp() / "damaged.onnx"
    path.write_bytes(bytes(data))
    try:
        model = StepModel.load(path)
        Engine(model, EngineSettings())  # a first real step, as the daemon does at start
    except ModelError:
        pass
    # with the hash of the original in the config, nothing changed loads at all
    doc = {"model": {"path": str(path), "sha256": hashlib.sha256(model_bytes).hexdigest()}}
    settings_ = config.parse(doc, base=path.parent, source=path.parent / "c.toml")
    if bytes(data) == model_bytes:
        assert app.load_model(settings_).spec.name
    else:
        with pytest.raises(ModelError, match="SHA-256"):
            app.load_model(settings_)


# -- configs and checkpoints ---------------------------------------------------------------


UNREADABLE: dict[str, Callable[[Path], None]] = {
    "missing": lambda p: None,
    "a directory": lambda p: p.mkdir(),
    "a dangling link": lambda p: p.symlink_to(p.parent / "nowhere.toml"),
    "not UTF-8": lambda p: p.write_bytes(b"[model]\npath = '\xff\xfe'\n"),
    "not TOML": lambda p: p.write_text("[model\npath = 3\n"),
    "binary": lambda p: p.write_bytes(os.urandom(512)),
}


@pytest.mark.parametrize("kind", list(UNREADABLE))
def test_an_unreadable_config_is_one_line_naming_the_file(
    kind: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "seqstream.toml"
    UNREADABLE[kind](path)
    before = checkpoint.read_bytes()
    with pytest.raises(ConfigError, match=str(path)):
        config.load(path)
    assert cli.main(["run", "--config", str(path), "--allow-root"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0], err
    assert cli.main(["config", "check", str(path)]) == cli.EXIT_ERROR
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b"",
        lambda b: _npz(rows=np.zeros((1, 3), np.float32), header=np.array('{"format": "x"}')),
    ],
    ids=["truncated", "empty", "foreign"],
)
def test_a_corrupt_checkpoint_stops_the_start_and_is_left_for_inspection(
    damage: Callable[[bytes], bytes],
    random_model_path: ModelFactory,
    checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Starting from zeros would silently drop every stream's state: refuse instead."""
    checkpoint.write_bytes(damage(checkpoint.read_bytes()))
    before = checkpoint.read_bytes()
    model = random_model_path("lstm", "classify")
    err = run_cli(tmp_path, capsys, model, checkpoint, metrics="enabled = false")
    assert str(checkpoint) in err
    assert checkpoint.read_bytes() == before


# -- security basics -----------------------------------------------------------------------


def test_the_daemon_refuses_to_run_as_root_unless_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="refusing to run as root.*--allow-root"):
        refuse_root(False, euid=0)
    refuse_root(True, euid=0)
    refuse_root(False, euid=1000)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npath = "missing.onnx"\n')
    code = cli.main(["run", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR
    if os.geteuid() == 0:  # as CI runs: refused before anything is read
        assert "refusing to run as root" in err and "missing.onnx" not in err
    else:
        assert "model file not found" in err
    assert cli.main(["run", "--config", str(cfg), "--allow-root"]) == cli.EXIT_ERROR
    assert "model file not found" in capsys.readouterr().err


def _listening(port: int) -> list[str]:
    """Local addresses listening on ``port`` (from the kernel's own table)."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append(socket.inet_ntop(family, raw))
    return found


def test_metrics_listen_on_loopback_unless_configured(tmp_path: Path) -> None:
    default = config.parse({"model": {"path": "m"}}, base=tmp_path, source=tmp_path / "c").metrics
    exporter = Exporter(CollectorRegistry(), default.bind, 0)
    try:
        assert _listening(exporter.port) == ["127.0.0.1"]
    finally:
        exporter.close()


def test_a_model_file_with_another_hash_is_refused_before_loading(
    random_model_path: ModelFactory, tmp_path: Path
) -> None:
    """Before onnxruntime parses a byte of it: a tampered file never reaches the parser."""
    good = random_model_path("lstm", "classify")
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x08" + os.urandom(64))  # what onnxruntime would choke on
    digest = datasets.file_sha256(good)
    doc = {"model": {"path": str(fake), "sha256": digest}}
    cfg = config.parse(doc, base=tmp_path, source=tmp_path / "c.toml")
    with pytest.raises(ModelError, match=f"SHA-256 is {datasets.file_sha256(fake)}"):
        app.load_model(cfg)
