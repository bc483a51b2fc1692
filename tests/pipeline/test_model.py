"""Loading step models: provider choice and fallback, I/O checks against the contract."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest

from models.export import export_random
from pipeline.errors import ConfigError, ContractError, ModelError
from pipeline.model import StepModel, resolve_providers


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m.onnx"
    export_random(path, cell="gru", task="classify", hidden=8)
    return path


def test_cpu_is_always_the_last_resort() -> None:
    chosen, why = resolve_providers(["cpu"])
    assert chosen == ["CPUExecutionProvider"] and why == ""


def test_unknown_provider_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown provider 'tpu'"):
        resolve_providers(["tpu"])
    with pytest.raises(ConfigError, match="at least one"):
        resolve_providers([])


def test_cuda_falls_back_with_one_log_line_when_unavailable(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    caplog.set_level(logging.INFO, logger="pipeline.model")
    model = StepModel.load(model_path, providers=["cuda", "cpu"])
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.model"]
    assert len(lines) == 1
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert model.provider == "CUDAExecutionProvider"
    else:
        assert model.provider == "CPUExecutionProvider"
        assert "cuda not available" in lines[0] and "CPUExecutionProvider" in lines[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model file not found"):
        StepModel.load(tmp_path / "nope.onnx")


def test_graph_that_disagrees_with_its_metadata_is_refused(
    model_path: Path, tmp_path: Path
) -> None:
    proto = onnx.load(str(model_path))
    proto.graph.input[1].name = "hidden"  # rename the state input in the graph only
    for node in proto.graph.node:
        node.input[:] = ["hidden" if i == "h" else i for i in node.input]
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ContractError, match="graph inputs"):
        StepModel.load(bad)
