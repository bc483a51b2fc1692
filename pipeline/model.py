"""Loading an exported step model: the ONNX session, its metadata, its providers.

One :class:`StepModel` is shared by all streams (sherpa-onnx style); per-stream state
lives elsewhere (:mod:`pipeline.engine.store.state`). Loading checks the file against the contract
in :mod:`pipeline.contract` — metadata and the graph's actual inputs/outputs — so a
mismatched model is refused at start, not at the first message.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from pipeline.contract import BATCH, METADATA_KEY, ModelSpec
from pipeline.errors import ConfigError, ContractError, ModelError

log = logging.getLogger(__name__)

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}

Array = np.ndarray[Any, np.dtype[np.float32]]


def resolve_providers(wanted: Sequence[str]) -> tuple[list[str], str]:
    """Map config names to available onnxruntime providers, first available wins.

    Returns the provider list for the session and a human reason when the first wish
    could not be honoured (empty when it could).
    """
    if not wanted:
        raise ConfigError("providers: must name at least one of " + ", ".join(PROVIDERS))
    available = set(ort.get_available_providers())
    chosen: list[str] = []
    skipped: list[str] = []
    for name in wanted:
        if name not in PROVIDERS:
            raise ConfigError(f"providers: unknown provider {name!r}; use " + ", ".join(PROVIDERS))
        full = PROVIDERS[name]
        if full in available:
            chosen.append(full)
        else:
            skipped.append(f"{name} not available in this onnxruntime build")
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # always the last resort
    return chosen, "; ".join(skipped)


@dataclass(frozen=True)
class _Io:
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


class StepModel:
    """An ONNX step model: ``(x, state) -> (outputs, new_state)``."""

    def __init__(self, path: Path, session: ort.InferenceSession, spec: ModelSpec) -> None:
        self.path = path
        self.session = session
        self.spec = spec
        self.provider: str = session.get_providers()[0]
        self.output_names: tuple[str, ...] = spec.outputs + tuple(s.output for s in spec.state)
        self._check_io()

    @classmethod
    def load(
        cls,
        path: str | Path,
        providers: Sequence[str] = ("cpu",),
        threads: int = 1,
        *,
        sha256: str | None = None,
    ) -> StepModel:
        """Load and check a model; ``threads`` bounds onnxruntime's intra-op pool.

        One thread is the right default on an edge box: step models are tiny, and the
        daemon batches across streams instead of splitting one matmul across cores.

        The file is read once and onnxruntime loads those very bytes, so a ``sha256`` pin
        checks what runs: a file swapped between the check and the load cannot slip in.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: model file not found")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{path}: cannot read model ({exc.strerror or exc})") from None
        if sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise ModelError(
                    f"{path}: SHA-256 is {actual}, config model.sha256 expects {sha256}"
                )
        chosen, why = resolve_providers(providers)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(data, sess_options=opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises several unrelated types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{path}: not a loadable ONNX model ({first})") from None
        meta = session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ContractError(f"{path}: no '{METADATA_KEY}' metadata; export it with seqstream")
        try:
            spec = ModelSpec.from_json(meta[METADATA_KEY])
        except ContractError as exc:
            raise ContractError(f"{path}: {exc}") from None
        model = cls(path, session, spec)
        if why:
            log.warning("model %s: using %s (%s)", path.name, model.provider, why)
        else:
            log.info("model %s: using %s", path.name, model.provider)
        return model

    def _check_io(self) -> None:
        spec = self.spec
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        want_in = {spec.input, *(s.name for s in spec.state)}
        if set(inputs) != want_in:
            raise ContractError(
                f"{self.path}: graph inputs {sorted(inputs)} do not match metadata "
                f"{sorted(want_in)}"
            )
        missing = [n for n in self.output_names if n not in outputs]
        if missing:
            raise ContractError(f"{self.path}: graph lacks outputs {missing} named in metadata")
        for name, node in inputs.items():
            if node.type != "tensor(float)":
                raise ContractError(f"{self.path}: input {name!r} is {node.type}, expected float32")
        x_shape = inputs[spec.input].shape
        if len(x_shape) != 3 or (isinstance(x_shape[2], int) and x_shape[2] != spec.n_features):
            raise ContractError(
                f"{self.path}: input 'x' has shape {x_shape}; metadata says "
                f"[batch, time, {spec.n_features}]"
            )
        for s in spec.state:
            shape = inputs[s.name].shape
            if len(shape) != len(s.shape) or any(
                isinstance(g, int) and d != BATCH and g != d
                for g, d in zip(shape, s.shape, strict=True)
            ):
                raise ContractError(
                    f"{self.path}: state input {s.name!r} has shape {shape}; metadata says "
                    f"{list(s.shape)}"
                )

    def initial_state(self, batch: int) -> dict[str, Array]:
        state: dict[str, Array] = {}
        for s in self.spec.state:
            shape = tuple(batch if d == BATCH else int(d) for d in s.shape)
            state[s.name] = np.full(shape, s.init, dtype=np.float32)
        return state

    def run(
        self, x: Array, state: Mapping[str, Array]
    ) -> tuple[dict[str, Array], dict[str, Array]]:
        """One call over ``x`` ``[B, T, F]`` from ``state``; returns outputs and the new state."""
        feeds: dict[str, Array] = {self.spec.input: x}
        for s in self.spec.state:
            feeds[s.name] = state[s.name]
        values = self.session.run(self.output_names, feeds)
        n = len(self.spec.outputs)
        outputs = dict(zip(self.spec.outputs, values[:n], strict=True))
        new_state = {s.name: values[n + i] for i, s in enumerate(self.spec.state)}
        return outputs, new_state
