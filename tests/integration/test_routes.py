"""Two models in one daemon, through a real mosquitto (``[[route]]``).

A classifier on ``sensors/{stream}/motion`` and a forecaster on ``plant/+/{stream}/flow``
share one daemon and one broker connection. Each stream's predictions must equal its
own model's offline stepwise run (:func:`pipeline.offline.evaluation.run_stepwise`), the
metrics must be counted per model (the ``model`` label), and a SIGHUP reload of one
model must leave the other model's streams' state untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.export import export_random
from pipeline.commands import status as status_command
from pipeline.daemon import config
from pipeline.errors import ConfigError
from pipeline.model import StepModel
from pipeline.offline.evaluation import run_stepwise
from pipeline.sources import codecs
from tests.integration.broker import Broker, wait_until
from tests.integration.conftest import (
    Collector,
    publisher,
    running_daemon,
    write_toml,
)

ATOL = 1e-5
T = 12  # rows per stream before the reload
T2 = 6  # rows per stream after it
MOTION = ("m0", "m1")  # classifier streams: sensors/<id>/motion
FLOW = (("siteA", "f0"), ("siteB", "f1"))  # forecaster streams: plant/<site>/<id>/flow


def routes_config(tmp: Path, port: int, motion: Path, flow: Path) -> dict[str, Any]:
    return {
        "mqtt": {"port": port, "client_id": "routes-test", "reconnect_max_s": 1},
        "metrics": {"port": 0},
        "checkpoint": {"path": str(tmp / "state.ckpt")},
        "route": [
            {
                "name": "motion",
                "model": {"path": str(motion)},
                "input": {"topic": "sensors/{stream}/motion", "reset_topic": ""},
                "output": {"topic": "predictions/{stream}"},
            },
            {
                "name": "flow",
                "model": {"path": str(flow)},
                "input": {"topic": "plant/+/{stream}/flow", "reset_topic": ""},
                "output": {"topic": "forecasts/{stream}"},
            },
        ],
    }


def sample(daemon: Any, name: str, **labels: str) -> float:
    value = daemon.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def by_stream(messages: list[tuple[str, bytes, bool]]) -> dict[str, list[dict[str, Any]]]:
    import json

    out: dict[str, list[dict[str, Any]]] = {}
    for topic, payload, _ in messages:
        out.setdefault(topic.split("/", 1)[1], []).append(json.loads(payload))
    return out


def test_two_models_in_one_daemon_each_stream_as_its_own_models_offline_run(
    broker: Broker, model_path: Path, tmp_path: Path
) -> None:
    flow_a, flow_b = tmp_path / "flow-a.onnx", tmp_path / "flow-b.onnx"
    export_random(flow_a, cell="gru", task="forecast", n_features=3, horizon=2, seed=0)
    export_random(flow_b, cell="gru", task="forecast", n_features=3, horizon=2, seed=1)
    served = tmp_path / "flow.onnx"
    shutil.copyfile(flow_a, served)
    doc = routes_config(tmp_path, broker.port, model_path, served)
    write_toml(tmp_path / "test.toml", doc)  # what a SIGHUP re-reads
    rng = np.random.default_rng(7)
    xm = rng.normal(size=(len(MOTION), T + T2, 6)).astype(np.float32)
    xf = rng.normal(size=(len(FLOW), T + T2, 3)).astype(np.float32)
    motion_model, flow_model = StepModel.load(model_path), StepModel.load(flow_a)
    want_m = [o["probs"] for o in run_stepwise(motion_model, list(xm))]
    want_f = [o["forecast"] for o in run_stepwise(flow_model, list(xf[:, :T]))]

    preds = Collector(broker.port, "predictions/#")
    forecasts = Collector(broker.port, "forecasts/#")

    def send(rows: range) -> None:
        with publisher(broker.port) as pub:
            for t in rows:
                for i, s in enumerate(MOTION):
                    pub.publish(f"sensors/{s}/motion", codecs.encode_json(xm[i, t], t))
                for i, (site, s) in enumerate(FLOW):
                    pub.publish(f"plant/{site}/{s}/flow", codecs.encode_json(xf[i, t], t))

    try:
        with running_daemon(doc, tmp_path) as daemon:
            send(range(T))
            got_m = by_stream(preds.take(len(MOTION) * T))
            got_f = by_stream(forecasts.take(len(FLOW) * T))
            for i, s in enumerate(MOTION):
                p = got_m[s]
                assert [m["seq"] for m in p] == list(range(T))
                probs = np.array([list(m["probs"].values()) for m in p], dtype=np.float32)
                np.testing.assert_allclose(probs, want_m[i][:T], atol=ATOL, rtol=0)
            for i, (_, s) in enumerate(FLOW):
                p = got_f[s]
                assert [m["seq"] for m in p] == list(range(T))
                values = np.array([next(iter(m["forecast"].values())) for m in p], dtype=np.float32)
                np.testing.assert_allclose(values, want_f[i][:, :, 0], atol=ATOL, rtol=0)
                assert all(m["model"] == flow_model.spec.name for m in p)
            assert preds.quiet(0.2) == [] and forecasts.quiet(0.2) == []

            # Metrics per model: published, received, active streams, the model info.
            total = "seqstream_predictions_published_total"
            assert sample(daemon, total, model="motion") == len(MOTION) * T
            assert sample(daemon, total, model="flow") == len(FLOW) * T
            assert sample(daemon, "seqstream_messages_received_total", model="flow") == 2 * T
            assert sample(daemon, "seqstream_active_streams", model="motion") == 2
            assert sample(daemon, "seqstream_active_streams", model="flow") == 2
            families = {f.name: f for f in daemon.metrics.registry.collect()}
            assert "seqstream_anomalies" not in families  # neither model can move it
            by_label = [
                x
                for x in families["seqstream_predictions_by_label"].samples
                if x.name.endswith("_total")
            ]
            assert {x.labels["model"] for x in by_label} == {"motion"}  # not the forecaster
            assert sum(x.value for x in by_label) == len(MOTION) * T
            info = {
                x.labels["model"]: x.labels["name"] for x in families["seqstream_model"].samples
            }
            assert info == {"motion": motion_model.spec.name, "flow": flow_model.spec.name}
            assert daemon.exporter is not None  # /status and `seqstream status`: both models
            url = f"http://127.0.0.1:{daemon.exporter.port}"
            doc = status_command.fetch(url)
            listed = {m["route"]: m for m in doc["models"]}
            assert set(listed) == {"motion", "flow"}
            assert {s["stream"] for s in listed["motion"]["streams"]["items"]} == set(MOTION)
            assert {s["stream"] for s in listed["flow"]["streams"]["items"]} == {s for _, s in FLOW}
            assert listed["flow"]["model"]["task"] == "forecast"
            text = status_command.render(doc)
            assert "[motion]" in text and "[flow]" in text and "f1" in text

            # A new flow model: the flow route alone reloads; motion keeps every state.
            shutil.copyfile(flow_b, served)
            daemon.request_reload()
            reloads = "seqstream_model_reloads_total"
            wait_until(
                lambda: sample(daemon, reloads, model="flow", result="ok") == 1, 20, "reload"
            )
            assert sample(daemon, reloads, model="motion", result="ok") == 0
            assert sample(daemon, reloads, model="motion", result="failed") == 0
            send(range(T, T + T2))
            after_m = by_stream(preds.take(len(MOTION) * T2))
            after_f = by_stream(forecasts.take(len(FLOW) * T2))
            for i, s in enumerate(MOTION):  # continues from the state of rows 0..T-1
                p = after_m[s]
                assert [m["seq"] for m in p] == list(range(T, T + T2))
                assert all("resets" not in m for m in p)
                probs = np.array([list(m["probs"].values()) for m in p], dtype=np.float32)
                np.testing.assert_allclose(probs, want_m[i][T:], atol=ATOL, rtol=0)
            new_version = StepModel.load(flow_b).spec.version
            for _, s in FLOW:
                assert [m["version"] for m in after_f[s]] == [new_version] * T2
            assert daemon.routes[0].engine.streams == 2
    finally:
        preds.close()
        forecasts.close()
    # Each route saved its own state file beside the configured path.
    assert (tmp_path / "state.motion.ckpt").is_file() and (tmp_path / "state.flow.ckpt").is_file()


def test_overlapping_route_templates_are_refused_at_config_time(
    model_path: Path, tmp_path: Path
) -> None:
    doc = routes_config(tmp_path, 1883, model_path, model_path)
    doc["route"][1]["input"]["topic"] = "sensors/+/{stream}"  # also takes sensors/x/motion
    with pytest.raises(ConfigError, match=r"route\[1\]\.input\.topic: .* overlaps route\[0\]"):
        config.parse(doc, base=tmp_path, source=tmp_path / "x.toml")
    doc = routes_config(tmp_path, 1883, model_path, model_path)
    doc["route"][1]["output"]["topic"] = "predictions/{stream}"
    with pytest.raises(ConfigError, match=r"route\[1\]\.output\.topic: .* overlaps"):
        config.parse(doc, base=tmp_path, source=tmp_path / "x.toml")
    doc = routes_config(tmp_path, 1883, model_path, model_path)
    doc["route"][1]["name"] = "motion"
    with pytest.raises(ConfigError, match=r"route\[1\]\.name: 'motion' is also route\[0\]"):
        config.parse(doc, base=tmp_path, source=tmp_path / "x.toml")
    doc = routes_config(tmp_path, 1883, model_path, model_path)
    doc["cluster"] = {"servers": ["nats://127.0.0.1:4222"]}
    with pytest.raises(ConfigError, match="cluster mode serves one model"):
        config.parse(doc, base=tmp_path, source=tmp_path / "x.toml")
    doc = routes_config(tmp_path, 1883, model_path, model_path)
    doc["model"] = {"path": str(model_path)}
    with pytest.raises(ConfigError, match=r"model: give \[route.model\]"):
        config.parse(doc, base=tmp_path, source=tmp_path / "x.toml")


def test_the_shipped_two_model_example_parses(tmp_path: Path) -> None:
    import tomllib

    shipped = Path(__file__).resolve().parents[2] / "deploy" / "seqstream-routes.toml"
    doc = tomllib.loads(shipped.read_text())
    doc["checkpoint"]["path"] = str(tmp_path / "state.ckpt")
    settings = config.parse(doc, base=shipped.parent, source=shipped)
    assert [r.name for r in settings.routes] == ["motion", "flow"]
    assert [r.checkpoint for r in settings.routes] == [
        tmp_path / "state.motion.ckpt",
        tmp_path / "state.flow.ckpt",
    ]
