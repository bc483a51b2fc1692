"""Predictions out: the one place that writes them.

Output (predictions): one JSON object per input message, for the step after its
last row, written from a template built once per model (no per-message ``json.dumps``)::

    {"seq": 21, "ts": 1718000000.25, "label": "Walking",
     "probs": {"Standing": 0.01, "Running": 0.02, "Walking": 0.95, "Badminton": 0.02},
     "model": "har", "version": "3"}
    {"seq": 21, "ts": ..., "forecast": {"flow": [12.5, 12.9]}, "model": ..., "version": ...}
    {"seq": 21, "ts": ..., "score": 0.84, "threshold": 0.31, "anomaly": true,
     "model": ..., "version": ...}

``seq`` is the sequence number of that last row (``null`` if the input had none),
``ts`` the input's ``ts``; ``probs``/``forecast`` are keyed by the model's labels and
target names, a forecast lists ``horizon`` values (``forecast`` and ``seq2seq`` models
alike). An anomaly model's ``score`` is the highest of the message's rows (so an
anomalous step inside a chunk is never hidden by the chunk's last row), ``anomaly`` is
:meth:`~pipeline.contract.ModelSpec.flags` of it, ``threshold`` the model's own. When
the engine reset the stream's state just before this message, ``"resets": [reasons]``
is added. Floats are written with 9 significant digits, which round-trips float32
exactly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from pipeline.contract import ModelSpec
from pipeline.engine.engine import Result
from pipeline.errors import ModelError


class PredictionEncoder:
    """Writes a :class:`~pipeline.engine.engine.Result` as prediction JSON (see module doc).

    The model-constant parts (keys, label names, model name and version) are escaped
    once into a ``%``-template; per message only numbers are formatted.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.task = spec.task
        tail = f'"model":{_lit(spec.name)},"version":{_lit(spec.version)}%s}}'
        if spec.task == "classify":
            self._output = "probs"
            self._labels = [json.dumps(label) for label in spec.labels]
            probs = ",".join(f"{_lit(label)}:%.9g" for label in spec.labels)
            self._template = '{"seq":%s,"ts":%s,"label":%s,"probs":{' + probs + "}," + tail
        elif spec.task in ("forecast", "seq2seq"):
            self._output = "forecast"
            row = ",".join(["%.9g"] * spec.horizon)
            lists = ",".join(f"{_lit(name)}:[{row}]" for name in spec.targets)
            self._template = '{"seq":%s,"ts":%s,"forecast":{' + lists + "}," + tail
        elif spec.task == "anomaly":
            self._output = "score"
            self._flags = spec.flags
            self.threshold = float(spec.threshold or 0.0)  # contract: finite for anomaly
            limit = f'"threshold":{self.threshold!r},'
            self._template = '{"seq":%s,"ts":%s,"score":%.9g,' + limit + '"anomaly":%s,' + tail
        else:  # pragma: no cover - the contract admits only the tasks above
            raise ModelError(f"task {spec.task!r} has no prediction format")

    def encode(self, result: Result) -> bytes | None:
        """The message for ``result``'s last row, or None when its outputs are not finite."""
        step = result.step
        out = result.output(self._output)
        if self._output == "probs":
            values = out[-1].tolist()
        elif self._output == "score":
            values = out.tolist()
        else:  # forecast row is [horizon, targets]; the template lists each target's horizon
            values = out[-1].T.ravel().tolist()
        if not math.isfinite(sum(values)):  # NaN or Inf anywhere
            return None
        seq = "null" if step.seq is None else str(step.seq + len(step.values) - 1)
        ts = "null" if step.ts is None else repr(step.ts)
        extra = _resets(result.resets) if result.resets else ""
        if self._output == "probs":
            k = values.index(max(values))
            return (self._template % (seq, ts, self._labels[k], *values, extra)).encode()
        if self._output == "score":
            score = max(values)
            flag = "true" if self._flags(score) else "false"
            return (self._template % (seq, ts, score, flag, extra)).encode()
        return (self._template % (seq, ts, *values, extra)).encode()

    def label(self, result: Result) -> int:
        """What publish-on-change watches: the class index after the last row, an anomaly
        model's flag (1 when any row is anomalous), 0 for forecasts."""
        if self._output == "probs":
            return int(result.output("probs")[-1].argmax())
        if self._output == "score":
            return int(self._flags(float(result.output("score").max())))
        return 0


def _resets(reasons: Sequence[str]) -> str:
    return ',"resets":' + json.dumps(list(reasons))


def _lit(text: str) -> str:
    """``text`` as a JSON string literal, escaped for the constant part of a %-template."""
    return json.dumps(text).replace("%", "%%")
