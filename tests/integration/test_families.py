"""Every model family through the daemon: the metadata alone drives it (no per-task code).

For each cell (lstm/gru/rnn) and task (classify/forecast/anomaly/seq2seq), an exported
model serves interleaved streams over a real mosquitto, and each published message
equals the offline stepwise run (:func:`pipeline.offline.evaluation.run_stepwise`) at that
message's last row; an anomaly message carries the highest score of its rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.model import StepModel
from pipeline.offline.evaluation import run_stepwise
from pipeline.sources import codecs
from tests.integration.broker import Broker
from tests.integration.conftest import (
    Collector,
    daemon_config,
    predictions_by_stream,
    publisher,
    running_daemon,
    sample_value,
)

CELLS = ("lstm", "gru", "rnn")
TASKS = ("classify", "forecast", "anomaly", "seq2seq")
ATOL = 1e-5
N_FEATURES = 4


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    from models.export import export_random

    d = tmp_path_factory.mktemp("families")
    out = {}
    for cell in CELLS:
        for task in TASKS:
            path = d / f"{cell}-{task}.onnx"
            export_random(
                path, cell=cell, task=task, n_features=N_FEATURES, hidden=8, layers=2,
                horizon=3, window=6, seed=3,
            )  # fmt: skip
            out[cell, task] = path
    return out


def published(doc: dict[str, Any], task: str) -> np.ndarray:
    """The numbers of one prediction message, flat, in the oracle's order."""
    if task == "classify":
        return np.array(list(doc["probs"].values()), dtype=np.float32)
    if task == "anomaly":
        return np.array([doc["score"]], dtype=np.float32)
    return np.array([v for vs in doc["forecast"].values() for v in vs], dtype=np.float32)


def expected(out: dict[str, np.ndarray], task: str, rows: slice) -> np.ndarray:
    if task == "classify":
        return out["probs"][rows.stop - 1]
    if task == "anomaly":
        return out["score"][rows][None].max(axis=1)
    return out["forecast"][rows.stop - 1].T.ravel()  # [horizon, targets] -> per target


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("cell", CELLS)
def test_family_through_the_daemon_equals_the_offline_run(
    cell: str,
    task: str,
    family_models: dict[tuple[str, str], Path],
    broker: Broker,
    tmp_path: Path,
) -> None:
    path = family_models[cell, task]
    model = StepModel.load(path)
    rng = np.random.default_rng(11)
    cases = [rng.normal(size=(14, N_FEATURES)).astype(np.float32) * 2 for _ in range(4)]
    oracle = run_stepwise(model, cases)
    # messages of 1-3 rows per stream, streams interleaved round-robin
    cuts: list[list[slice]] = []
    for case in cases:
        row, mine = 0, []
        while row < len(case):
            t = int(rng.integers(1, 4))
            mine.append(slice(row, min(row + t, len(case))))
            row += t
        cuts.append(mine)
    client_id = f"family-{cell}-{task}"
    doc = daemon_config(tmp_path, path, broker.port, client_id)
    doc["output"] = {"topic": f"predictions/{client_id}/{{stream}}"}
    preds = Collector(broker.port, f"predictions/{client_id}/#")
    n_messages = sum(len(c) for c in cuts)
    with running_daemon(doc, tmp_path) as daemon, publisher(broker.port) as pub:
        for k in range(max(len(c) for c in cuts)):
            for i, mine in enumerate(cuts):
                if k < len(mine):
                    rows = cases[i][mine[k]]
                    encode = codecs.encode_binary if k % 2 else codecs.encode_json
                    pub.publish(f"sensors/s{i}/data", encode(rows, mine[k].start, None))
        by_stream = predictions_by_stream(preds.take(n_messages))
        scored = sample_value(daemon.metrics.registry, "seqstream_anomaly_score_ratio_count")
    preds.close()
    for i, mine in enumerate(cuts):
        docs = by_stream[f"s{i}"]
        assert [d["seq"] for d in docs] == [s.stop - 1 for s in mine]
        for d, rows in zip(docs, mine, strict=True):
            np.testing.assert_allclose(
                published(d, task), expected(oracle[i], task, rows), atol=ATOL, rtol=1e-5
            )
            if task == "anomaly":
                assert d["threshold"] == pytest.approx(model.spec.threshold)
                assert d["anomaly"] is bool(model.spec.flags(np.float32(d["score"])))
    # every scored step is observed by the anomaly metrics, and only for anomaly models
    assert (scored or 0.0) == (sum(len(c) for c in cases) if task == "anomaly" else 0.0)
