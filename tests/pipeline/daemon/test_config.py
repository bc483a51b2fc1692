"""The daemon's TOML config: defaults, every kind of mistake named by its key, secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cli
from pipeline.daemon import config
from pipeline.errors import ConfigError
from pipeline.sinks.mqtt import OutputConfig
from pipeline.sources.mqtt import InputConfig
from pipeline.transport.mqtt import MqttConfig, Secret, TlsConfig

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "deploy" / "seqstream.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "seqstream.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_documented_example_is_valid_and_matches_the_defaults() -> None:
    s = config.load(EXAMPLE)
    assert s.model.path == EXAMPLE.parent / "model.onnx"
    assert s.mqtt == MqttConfig()
    assert s.input == InputConfig()
    assert s.output == OutputConfig()
    assert s.queue == config.QueueConfig()
    assert s.metrics == config.MetricsConfig()
    assert s.engine.idle_timeout_s == 600.0
    assert s.engine.ts_gap_tolerance_s is None


def test_a_minimal_config_needs_only_the_model(tmp_path: Path) -> None:
    s = config.load(write(tmp_path, '[model]\npath = "m.onnx"\n'))
    assert s.model.path == tmp_path / "m.onnx"  # relative to the config's directory
    assert s.mqtt.clean_session is False
    assert s.metrics.bind == "127.0.0.1"
    assert s.mqtt.status() == "seqstream/seqstream/status"
    assert s.error_topic() == "seqstream/seqstream/errors"


def test_values_are_read_into_typed_settings(tmp_path: Path) -> None:
    s = config.load(
        write(
            tmp_path,
            """
[model]
path = "/abs/m.onnx"
providers = ["cuda", "cpu"]
[engine]
max_streams = 5
idle_timeout_s = false
seq_gap_tolerance = 3
ts_gap_tolerance_s = 2
[queue]
overflow = "drop"
max_wait_ms = 0
[mqtt]
protocol = "5"
client_id = "edge-7"
port = 1884
status_topic = "site/{client_id}/up"
[input]
topic = "a/{stream}/b/c"
reset_topic = ""
[output]
topic = "out/{stream}/p"
every_k = 10
on_change = true
error_topic = ""
""",
        )
    )
    assert s.model.path == Path("/abs/m.onnx")
    assert s.model.providers == ("cuda", "cpu")
    assert s.engine.max_streams == 5 and s.engine.initial_capacity == 5
    assert s.engine.idle_timeout_s is None
    assert s.engine.ts_gap_tolerance_s == 2.0
    assert s.queue.overflow == "drop" and s.queue.max_wait_ms == 0.0
    assert s.mqtt.status() == "site/edge-7/up"
    assert s.input.reset_topic is None
    assert s.error_topic() is None
    assert (s.output.every_k, s.output.on_change) == (10, True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "model: is required"),
        ("[model]\n", "model.path: is required"),
        ('[model]\npath = "m"\n[mqtt]\nprot = 1\n', "mqtt.prot: unknown key"),
        ('[model]\npath = "m"\nextra = 1\n', "model.extra: unknown key"),
        ('[model]\npath = "m"\n[mqqt]\n', "mqqt: unknown key"),
        ('[model]\npath = "m"\n[mqtt]\nport = 0\n', "mqtt.port: must be 1..65535, got 0"),
        (
            '[model]\npath = "m"\n[mqtt]\nport = "1883"\n',
            "mqtt.port: must be an integer, got string",
        ),
        (
            '[model]\npath = "m"\n[mqtt]\nport = true\n',
            "mqtt.port: must be an integer, got boolean",
        ),
        ('[model]\npath = "m"\n[mqtt]\nprotocol = "3.1"\n', "mqtt.protocol: must be one of"),
        (
            '[model]\npath = "m"\n[mqtt]\nclean_session = 0\n',
            "mqtt.clean_session: must be true or false",
        ),
        ('[model]\npath = "m"\n[mqtt]\nclient_id = ""\n', "mqtt.client_id: must be a non-empty"),
        ('[model]\npath = "m"\n[mqtt]\nhost = 5\n', "mqtt.host: must be a string"),
        (
            '[model]\npath = "m"\n[mqtt]\nreconnect_min_s = 10\nreconnect_max_s = 5\n',
            "mqtt.reconnect_max_s: must be >= reconnect_min_s",
        ),
        ('[model]\npath = "m"\n[mqtt]\ntls = 1\n', "mqtt.tls: must be a table"),
        (
            '[model]\npath = "m"\n[mqtt.tls]\nca_file = "nope.crt"\n',
            "mqtt.tls.ca_file: file not found",
        ),
        (
            '[model]\npath = "m"\n[mqtt]\npassword_env = "X"\npassword_file = "f"\n',
            "mqtt.password_file: give password_file or password_env",
        ),
        ('[model]\npath = "m"\nproviders = ["tpu"]\n', "model.providers: unknown provider 'tpu'"),
        ('[model]\npath = "m"\nproviders = []\n', "model.providers: must name at least one"),
        ('[model]\npath = "m"\nsha256 = "abc"\n', "model.sha256: must be 64 hex digits"),
        ('[model]\npath = ""\n', "model.path: must be a non-empty path"),
        (
            '[model]\npath = "m"\n[engine]\nmax_batch = 0\n',
            "engine.max_batch: must be 1..65536, got 0",
        ),
        (
            '[model]\npath = "m"\n[engine]\nidle_timeout_s = -1\n',
            "engine.idle_timeout_s: must be a finite number > 0",
        ),
        (
            '[model]\npath = "m"\n[engine]\nidle_timeout_s = nan\n',
            "engine.idle_timeout_s: must be a finite number > 0",
        ),
        (
            '[model]\npath = "m"\n[engine]\nidle_timeout_s = true\n',
            "engine.idle_timeout_s: must be a number or false",
        ),
        (
            '[model]\npath = "m"\n[engine]\nseq_gap_tolerance = -1\n',
            "engine.seq_gap_tolerance: must be >= 0",
        ),
        (
            '[model]\npath = "m"\n[queue]\noverflow = "spill"\n',
            "queue.overflow: must be one of 'block', 'drop'",
        ),
        ('[model]\npath = "m"\n[queue]\nmax_wait_ms = inf\n', "queue.max_wait_ms: must be finite"),
        (
            '[model]\npath = "m"\n[input]\ntopic = "sensors/+/data"\n',
            "input.topic: must contain {stream} once",
        ),
        (
            '[model]\npath = "m"\n[input]\ntopic = "s/{stream}/#"\n',
            "input.topic: must not contain MQTT wildcards",
        ),
        (
            '[model]\npath = "m"\n[input]\ntopic = "s/x{stream}"\n',
            "input.topic: must contain {stream} once or more, each a whole topic level",
        ),
        (
            '[model]\npath = "m"\n[input]\ntopic = "s/{stream}/{x}"\n',
            "input.topic: only {stream} may appear",
        ),
        (
            '[model]\npath = "m"\n[input]\nreset_topic = "sensors/{stream}/data"\n',
            "input.reset_topic: must differ",
        ),
        ('[model]\npath = "m"\n[input]\nqos = 3\n', "input.qos: must be 0..2, got 3"),
        (
            '[model]\npath = "m"\n[output]\ntopic = "predictions"\n',
            "output.topic: must contain {stream} exactly once",
        ),
        (
            '[model]\npath = "m"\n[output]\nerror_topic = "e/+"\n',
            "output.error_topic: must not contain MQTT wildcards",
        ),
        ('[model]\npath = "m"\n[output]\nevery_k = 0\n', "output.every_k: must be >= 1, got 0"),
        ('[model]\npath = "m"\n[metrics]\nport = 70000\n', "metrics.port: must be 0..65535"),
        ('[model]\npath = "m"\n[metrics]\nbind = ""\n', "metrics.bind: must not be empty"),
        (
            '[model]\npath = "m"\n[checkpoint]\npath = "no/such/dir/s.ckpt"\n',
            "checkpoint.path: directory",
        ),
        ("[model\n", "invalid TOML"),
    ],
)
def test_mistakes_fail_with_one_line_naming_the_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'seqstream.toml'}: ")
    assert expected in message


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[model]\npath = '\xe9'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(bad)


def test_the_password_comes_from_a_file_and_never_shows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2-s3cret\n")
    secret.chmod(0o644)
    s = config.load(
        write(
            tmp_path,
            '[model]\npath = "m"\n[mqtt]\nusername = "u"\npassword_file = "pw"\n',
        )
    )
    assert s.mqtt.password is not None
    assert s.mqtt.password.reveal() == "hunter2-s3cret"  # the trailing newline is not part
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.mqtt)
    assert "readable by other users" in caplog.text and "hunter2" not in caplog.text
    caplog.clear()
    secret.chmod(0o600)
    config.load(tmp_path / "seqstream.toml")
    assert caplog.text == ""


def test_the_password_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = '[model]\npath = "m"\n[mqtt]\nusername = "u"\npassword_env = "SEQSTREAM_TEST_PW"\n'
    monkeypatch.delenv("SEQSTREAM_TEST_PW", raising=False)
    assert "mqtt.password_env: environment variable SEQSTREAM_TEST_PW is not set" in error_of(
        tmp_path, text
    )
    monkeypatch.setenv("SEQSTREAM_TEST_PW", "from-env")
    s = config.load(write(tmp_path, text))
    assert s.mqtt.password is not None and s.mqtt.password.reveal() == "from-env"


def test_secret_problems_name_the_key_not_the_secret(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    assert "mqtt.password_file:" in error_of(
        tmp_path, '[model]\npath = "m"\n[mqtt]\nusername = "u"\npassword_file = "empty"\n'
    )
    assert "mqtt.password_file: cannot read" in error_of(
        tmp_path, '[model]\npath = "m"\n[mqtt]\nusername = "u"\npassword_file = "absent"\n'
    )
    (tmp_path / "pw").write_text("x")
    assert "mqtt.username: is required" in error_of(
        tmp_path, '[model]\npath = "m"\n[mqtt]\npassword_file = "pw"\n'
    )


def test_tls_defaults_the_port_and_needs_cert_and_key_together(tmp_path: Path) -> None:
    for name in ("ca.crt", "c.crt"):
        (tmp_path / name).write_text("x")
    s = config.load(write(tmp_path, '[model]\npath = "m"\n[mqtt.tls]\nca_file = "ca.crt"\n'))
    assert s.mqtt.port == 8883
    assert s.mqtt.tls == TlsConfig(ca_file=tmp_path / "ca.crt")
    assert "needs both cert_file and key_file" in error_of(
        tmp_path, '[model]\npath = "m"\n[mqtt.tls]\ncert_file = "c.crt"\n'
    )


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, '[model]\npath = "m.onnx"\n')
    assert cli.main(["config", "check", "--no-model", str(good)]) == 0
    assert f"{good}: ok" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\npath = "m"\n[mqtt]\nport = 0\n')
    assert cli.main(["config", "check", str(bad)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err == f"seqstream: error: {bad}: mqtt.port: must be 1..65535, got 0\n"


def test_secret_equality_and_hash_use_the_value() -> None:
    assert Secret("a") == Secret("a") != Secret("b")
    assert hash(Secret("a")) == hash(Secret("a"))
