"""``seqstream config check`` refuses what ``run`` refuses, without connecting; every CLI
error is one line with exit 2; truncated JSON is named; the docs list every reason.

The CLI runs as a real process (``python -m pipeline.cli``) so the one-line, no-traceback
promise is checked on what a user's terminal gets.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.daemon import app
from pipeline.errors import PayloadError
from pipeline.offline.datasets import file_sha256
from pipeline.sources.codecs import MALFORMED_JSON, Decoder
from pipeline.transport.mqtt import host_problem

REPO = Path(__file__).resolve().parents[3]
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) ")


def seqstream(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip


def refused(proc: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a refused command (asserting exit 2 and nothing else)."""
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    # log records (the model loader's INFO line) are not errors; the error is one line
    lines = [ln for ln in proc.stderr.splitlines() if not LOG_RECORD.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("seqstream"), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def write(tmp: Path, text: str) -> Path:
    path = tmp / "seqstream.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def model(random_model_path: Callable[..., Path]) -> Path:
    return random_model_path("lstm", "classify")


def test_a_good_config_and_model_pass(model: Path, tmp_path: Path) -> None:
    proc = seqstream("config", "check", str(write(tmp_path, f'[model]\npath = "{model}"\n')))
    assert proc.returncode == 0, proc.stderr
    assert (
        "ok" in proc.stdout and "random-lstm-classify" in proc.stdout and "classify" in proc.stdout
    )


def test_a_missing_model_is_refused_unless_told_not_to_load_it(tmp_path: Path) -> None:
    path = write(tmp_path, '[model]\npath = "absent.onnx"\n')
    assert "model file not found" in refused(seqstream("config", "check", str(path)))
    assert seqstream("config", "check", "--no-model", str(path)).returncode == 0


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ('[mqtt]\nhost = "mqtt://127.0.0.1:1883"\n', "host = '127.0.0.1', and port = 1883"),
        ('[mqtt]\nhost = "broker:1883"\n', "includes a port; give host = 'broker' and port = 1883"),
        ('[mqtt]\nhost = "two words"\n', "is not a host name or IP address"),
        ("[mqtt]\nport = 70000\n", "mqtt.port: must be 1..65535"),
        ("[metrics]\nport = -1\n", "metrics.port"),
        ('[mqtt]\nusername = "u"\npassword_file = "nope"\n', "password_file"),
        (f'sha256 = "{"0" * 64}"\n', "config model.sha256 expects 000"),
    ],
)  # fmt: skip
def test_config_check_refuses_what_run_refuses(
    extra: str, why: str, model: Path, tmp_path: Path
) -> None:
    path = write(tmp_path, f'[model]\npath = "{model}"\n' + extra)
    line = refused(seqstream("config", "check", str(path)))
    assert why in line
    # and run refuses it too, before any connection (its own error, one line)
    run_line = refused(seqstream("run", "--config", str(path), "--allow-root"))
    assert why in run_line


def test_a_model_that_does_not_fit_the_config_is_refused(
    random_model_path: Callable[..., Path], tmp_path: Path
) -> None:
    forecaster = random_model_path("gru", "forecast")
    path = write(tmp_path, f'[model]\npath = "{forecaster}"\n[output]\non_change = true\n')
    assert "output.on_change: needs a classify model" in refused(
        seqstream("config", "check", str(path))
    )
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx at all")
    path = write(tmp_path, f'[model]\npath = "{broken}"\n')
    assert str(broken) in refused(seqstream("config", "check", str(path)))


def test_a_matching_sha256_passes(model: Path, tmp_path: Path) -> None:
    path = write(tmp_path, f'[model]\npath = "{model}"\nsha256 = "{file_sha256(model)}"\n')
    assert seqstream("config", "check", str(path)).returncode == 0


def test_cli_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    line = refused(
        seqstream("replay", str(tmp_path / "x.ts"), "--broker", "mqtt://127.0.0.1:notaport")
    )
    assert "--broker" in line and "no valid port" in line
    assert "host" in refused(seqstream("replay", "x.ts", "--broker", "mqtt://a b:1883"))
    assert "--config" in refused(seqstream("run"))
    assert "invalid choice" in refused(seqstream("no-such-command"))
    assert "invalid int value" in refused(
        seqstream("train", "--task", "classify", "--data", "d", "--out", "o", "--epochs", "x")
    )


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b'{"seq": 1, "values": [1.0, 2', "truncated JSON"),
        (b'{"seq": 1, "values": [1.0, 2.0]', "truncated JSON"),
        (b'{"seq": 1, "name": "abc', "truncated JSON"),
        (b'{"seq": 1 "values": []}', "malformed JSON at character 10"),
        (b'{"seq": "\xff"}', "not a UTF-8 JSON document"),
    ],
)
def test_truncated_json_is_named_as_such(payload: bytes, detail: str) -> None:
    decoder = Decoder(2, max_payload_bytes=1024, max_steps=4)
    with pytest.raises(PayloadError) as info:
        decoder.decode("s", payload)
    assert info.value.reason == MALFORMED_JSON
    assert detail in str(info.value)


def test_deploy_readme_lists_every_rejection_reason() -> None:
    text = (REPO / "deploy" / "README.md").read_text()
    section = text[text.index("Rejection reasons") : text.index("A rejected message never")]
    listed = set(re.findall(r"`([a-z_]+)`", section))
    assert sorted(set(app.REJECT_REASONS) - listed) == []


def test_host_problem_accepts_hosts_and_addresses() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "broker.example.org", "my_broker", "fd00::5"):
        assert host_problem(host) is None, host


def test_every_route_is_checked_and_overlapping_routes_are_refused(
    model: Path, random_model_path: Callable[..., Path], tmp_path: Path
) -> None:
    forecaster = random_model_path("gru", "forecast")
    routes = (
        f'[[route]]\nname = "motion"\n[route.model]\npath = "{model}"\n'
        '[route.input]\ntopic = "sensors/{stream}/motion"\nreset_topic = ""\n'
        '[route.output]\ntopic = "predictions/{stream}"\n'
        f'[[route]]\nname = "flow"\n[route.model]\npath = "{forecaster}"\n'
        '[route.input]\ntopic = "plant/+/{stream}/flow"\nreset_topic = ""\n'
        '[route.output]\ntopic = "forecasts/{stream}"\n'
    )
    proc = seqstream("config", "check", str(write(tmp_path, routes)))
    assert proc.returncode == 0, proc.stderr
    assert "route motion: " in proc.stdout and "route flow: " in proc.stdout
    assert "random-gru-forecast" in proc.stdout
    # the second route's model is loaded and checked as run would: on_change needs a classifier
    bad = routes + "on_change = true\n"
    why = refused(seqstream("config", "check", str(write(tmp_path, bad))))
    assert "route flow: output.on_change: needs a classify model" in why
    overlap = routes.replace("plant/+/{stream}/flow", "sensors/+/{stream}")
    why = refused(seqstream("config", "check", "--no-model", str(write(tmp_path, overlap))))
    assert "route[1].input.topic: 'sensors/+/{stream}' overlaps route[0].input.topic" in why
