"""Sensor payloads: the one place that parses them (and writes them, for replay and tests).

Input (sensor readings), recognised by their first bytes, so one topic can carry both:

**JSON** (UTF-8 object; other keys are ignored)::

    {"seq": 17, "ts": 1718000000.25, "values": [0.1, -0.3, 9.8, 0.0, 0.2, 0.1]}
    {"seq": 17, "ts": 1718000000.25, "values": [[...6 values...], [...6 values...]]}

``values`` is one step (``F`` numbers) or several consecutive steps (``T`` rows of
``F``); ``seq`` (integer >= 0) numbers the first row, the rows after it are
``seq+1, seq+2 ...``; ``seq`` and ``ts`` (seconds, any epoch) are optional.

``values`` may instead name the model's features (its metadata's ``features``, what
``seqstream info`` lists), in any order, one number each or one column of ``T``
numbers each (equal lengths)::

    {"seq": 17, "values": {"temp": 21.5, "hum": 40}}
    {"seq": 17, "values": {"temp": [21.5, 21.6], "hum": [40, 41]}}

Every feature must be there (``missing_feature``) and nothing else
(``unknown_feature``): a misspelt name is refused, not silently read as a gap. The
names live inside ``values`` rather than beside ``seq`` so that a feature may be
called anything, ``seq`` included, and other top-level keys stay ignored.

**Binary** (little-endian; for high-rate sensors), a 24-byte header then the data::

    offset size type     field
    0      2    bytes    magic b"SQ"
    2      1    u8       version (1)
    3      1    u8       flags: bit 0 = seq present, bit 1 = ts present, others 0
    4      8    u64      seq of the first row (ignored unless flag bit 0)
    12     8    f64      ts (ignored unless flag bit 1)
    20     2    u16      T, rows (steps), >= 1
    22     2    u16      F, values per row, >= 1
    24     4*T*F f32     values, row-major (row 0's F values, then row 1's ...)

i.e. ``struct.pack("<2sBBQdHH", b"SQ", 1, flags, seq, ts, T, F) + values.astype("<f4").tobytes()``.

Decoding never raises anything but :class:`~pipeline.errors.PayloadError`, whose
``reason`` is one of :data:`REASONS` (stable words, used as a metric label). Values
are not checked for NaN/Inf here: the engine does that for a whole batch at once and
rejects such a step with reason ``non_finite`` before it touches any state.

Output (predictions) is written by :mod:`pipeline.sinks.encoder`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.engine.engine import (
    REJECT_BAD_FEATURES,
    REJECT_BAD_SEQ,
    REJECT_BAD_TS,
    REJECT_TOO_LONG,
    Step,
)
from pipeline.engine.store.state import MAX_SEQ
from pipeline.errors import PayloadError

Array = np.ndarray[Any, np.dtype[np.float32]]

MAGIC = b"SQ"
VERSION = 1
FLAG_SEQ = 1
FLAG_TS = 2
HEADER = struct.Struct("<2sBBQdHH")  # 24 bytes: the float32 data starts 4-byte aligned

# Rejection reasons (metric label values), the engine's words where they overlap;
# the source adds "unknown_topic" and "queue_full".
OVERSIZED = "oversized"
MALFORMED_JSON = "malformed_json"
BAD_SEQ = REJECT_BAD_SEQ
BAD_TS = REJECT_BAD_TS
BAD_SHAPE = "bad_shape"
FEATURE_COUNT = REJECT_BAD_FEATURES
TOO_MANY_STEPS = REJECT_TOO_LONG
BAD_BINARY_HEADER = "bad_binary_header"
BAD_BINARY_LENGTH = "bad_binary_length"
MISSING_FEATURE = "missing_feature"
UNKNOWN_FEATURE = "unknown_feature"
REASONS: tuple[str, ...] = (
    OVERSIZED,
    MALFORMED_JSON,
    BAD_SEQ,
    BAD_TS,
    BAD_SHAPE,
    FEATURE_COUNT,
    TOO_MANY_STEPS,
    BAD_BINARY_HEADER,
    BAD_BINARY_LENGTH,
    MISSING_FEATURE,
    UNKNOWN_FEATURE,
)
NAMES_LISTED = 8  # feature names quoted in a rejection's detail at most


def _json_problem(exc: json.JSONDecodeError) -> str:
    """Why a payload is not JSON, in words a sensor author can act on: a message cut
    short (a buffer too small, a fragment) reads differently from a typo."""
    if exc.pos >= len(exc.doc.rstrip()) or exc.msg.startswith("Unterminated string"):
        return f"truncated JSON: the document ends inside a value ({len(exc.doc)} characters)"
    return f"malformed JSON at character {exc.pos}: {exc.msg}"


class Decoder:
    """Turns one payload into an engine :class:`~pipeline.engine.engine.Step`, or rejects it.

    Everything the engine would refuse about the shape is refused here, at the edge,
    so a bad message costs the network thread a few microseconds and never reaches
    the queue or any stream's state.
    """

    def __init__(
        self,
        n_features: int,
        *,
        max_payload_bytes: int,
        max_steps: int,
        features: Sequence[str] = (),
    ) -> None:
        """``features``: the model's feature names, in its input order; without them
        only positional ``values`` are accepted."""
        if features and len(features) != n_features:
            raise ValueError(f"{len(features)} feature names for {n_features} features")
        self.n_features = n_features
        self.max_payload_bytes = max_payload_bytes
        self.max_steps = max_steps
        self.features = tuple(features)
        self._known = frozenset(self.features)

    def decode(self, stream: str, payload: bytes | bytearray, received: float = 0.0) -> Step:
        if len(payload) > self.max_payload_bytes:
            raise PayloadError(OVERSIZED, f"{len(payload)} bytes > {self.max_payload_bytes}")
        if payload[:2] == MAGIC:
            values, seq, ts = self._binary(payload)
        else:
            values, seq, ts = self._json(payload)
        return Step(stream, values, seq, ts, received)

    def channel(self, payload: bytes | bytearray) -> tuple[int, float | None, float]:
        """One channel's reading (``seq``, ``ts``, ``value``) for :mod:`pipeline.sources.channels`:
        ``{"seq": 17, "ts": 1718000000.25, "value": 21.5}``; ``seq`` is required, as it
        is what puts the channels of one step together."""
        if len(payload) > self.max_payload_bytes:
            raise PayloadError(OVERSIZED, f"{len(payload)} bytes > {self.max_payload_bytes}")
        doc = _object(payload)
        seq, ts = _seq_ts(doc)
        if seq is None:
            raise PayloadError(BAD_SEQ, "a channel message needs 'seq' (it joins the channels)")
        value = doc.get("value")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise PayloadError(BAD_SHAPE, "'value' must be a number")
        try:
            return seq, ts, float(value)
        except OverflowError:  # a 400-digit integer
            raise PayloadError(BAD_SHAPE, "'value' must be a float32 number") from None

    def _json(self, payload: bytes | bytearray) -> tuple[Array, int | None, float | None]:
        # _object and _seq_ts, inlined: this is the hot path, a call costs measurably
        try:
            doc = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise PayloadError(MALFORMED_JSON, _json_problem(exc)) from None
        except (ValueError, RecursionError):  # UnicodeDecodeError; nesting past the stack
            raise PayloadError(MALFORMED_JSON, "not a UTF-8 JSON document") from None
        if not isinstance(doc, dict):
            raise PayloadError(MALFORMED_JSON, "not a JSON object")
        seq = doc.get("seq")
        if seq is not None and (
            not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < MAX_SEQ
        ):
            raise PayloadError(BAD_SEQ, "'seq' must be an integer in 0..2**62-1")
        ts = doc.get("ts")
        if ts is not None:
            if not isinstance(ts, int | float) or isinstance(ts, bool):
                raise PayloadError(BAD_TS, "'ts' must be a finite number")
            try:  # an integer beyond float's range (a 400-digit ts) overflows here
                ts = float(ts)
            except OverflowError:
                raise PayloadError(BAD_TS, "'ts' must be a finite number") from None
            if not math.isfinite(ts):
                raise PayloadError(BAD_TS, "'ts' must be a finite number")
        raw = doc.get("values")
        if not isinstance(raw, list) or not raw:
            if isinstance(raw, dict):  # named features; the positional path pays nothing
                return self._named(raw), seq, ts
            raise PayloadError(BAD_SHAPE, "'values' must be a non-empty list or an object")
        try:
            arr = np.array(raw)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise PayloadError(BAD_SHAPE, "'values' must be numbers or equal-length rows") from None
        if arr.dtype.kind not in "fiu" or arr.ndim not in (1, 2) or arr.size == 0:
            raise PayloadError(BAD_SHAPE, "'values' must be numbers or equal-length rows")
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        with np.errstate(over="ignore", invalid="ignore"):
            values = arr.astype(np.float32)
        self._check(values)
        return values, seq, ts

    def _named(self, raw: dict[str, Any]) -> Array:
        """``values`` given by feature name: one number or one column per feature."""
        names = self.features
        if not names:
            raise PayloadError(BAD_SHAPE, "this model takes positional 'values' only")
        try:
            columns = [raw[name] for name in names]
        except KeyError:
            missing = [name for name in names if name not in raw]
            raise PayloadError(
                MISSING_FEATURE, f"missing {_names(missing)}; the model takes {_names(names)}"
            ) from None
        if len(raw) != len(names):  # all present, so the rest are strangers
            unknown = [key for key in raw if key not in self._known]
            raise PayloadError(
                UNKNOWN_FEATURE, f"unknown {_names(unknown)}; the model takes {_names(names)}"
            )
        shape = "named values must be numbers or equal-length lists"
        try:
            arr = np.array(columns)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise PayloadError(BAD_SHAPE, shape) from None
        if arr.dtype.kind not in "fiu" or arr.ndim not in (1, 2) or arr.size == 0:
            raise PayloadError(BAD_SHAPE, shape)
        with np.errstate(over="ignore", invalid="ignore"):
            values = arr.astype(np.float32)
        # one number per feature is one step; columns [F, T] become rows [T, F]
        values = values.reshape(1, -1) if values.ndim == 1 else np.ascontiguousarray(values.T)
        self._check(values)
        return values

    def _binary(self, payload: bytes | bytearray) -> tuple[Array, int | None, float | None]:
        if len(payload) < HEADER.size:
            raise PayloadError(BAD_BINARY_HEADER, f"{len(payload)} bytes < {HEADER.size}")
        _, version, flags, seq, ts, t, f = HEADER.unpack_from(payload)
        if version != VERSION:
            raise PayloadError(BAD_BINARY_HEADER, f"version {version}, this reader knows 1")
        if flags & ~(FLAG_SEQ | FLAG_TS):
            raise PayloadError(BAD_BINARY_HEADER, f"unknown flags {flags:#04x}")
        if t == 0 or f == 0:
            raise PayloadError(BAD_SHAPE, f"T={t} F={f}; both must be >= 1")
        if len(payload) != HEADER.size + 4 * t * f:
            raise PayloadError(
                BAD_BINARY_LENGTH,
                f"{len(payload)} bytes; header says {HEADER.size + 4 * t * f} (T={t}, F={f})",
            )
        if not flags & FLAG_SEQ:
            seq = None
        elif seq >= MAX_SEQ:
            raise PayloadError(BAD_SEQ, "seq must be < 2**62")
        if not flags & FLAG_TS:
            ts = None
        elif not math.isfinite(ts):
            raise PayloadError(BAD_TS, "ts must be finite")
        values: Array = np.frombuffer(payload, "<f4", t * f, HEADER.size).reshape(t, f)
        self._check(values)
        return values, seq, ts

    def _check(self, values: Array) -> None:
        # NaN/Inf are left to the engine, which checks a whole batch in one pass and
        # rejects such a step ("non_finite") before it touches any state.
        t, f = values.shape
        if f != self.n_features:
            raise PayloadError(
                FEATURE_COUNT, f"{f} values per step; the model takes {self.n_features}"
            )
        if t > self.max_steps:
            raise PayloadError(TOO_MANY_STEPS, f"{t} steps in one message > {self.max_steps}")


def encode_json(
    values: Array,
    seq: int | None = None,
    ts: float | None = None,
    names: Sequence[str] | None = None,
) -> bytes:
    """A sensor message in the JSON format (one step for a 1-D ``values``); with
    ``names``, the named form: ``{"values": {name: value, or one column per name}}``."""
    arr = np.asarray(values, dtype=np.float32)
    doc: dict[str, Any] = {"values": arr.tolist()}
    if names is not None:
        if len(names) != arr.shape[-1]:
            raise ValueError(f"{len(names)} names for {arr.shape[-1]} features")
        columns = arr.T.tolist()  # [F] or [F, T]
        doc["values"] = dict(zip(names, columns, strict=True))
    if seq is not None:
        doc["seq"] = seq
    if ts is not None:
        doc["ts"] = ts
    return json.dumps(doc, separators=(",", ":")).encode()


def encode_channel(value: float, seq: int, ts: float | None = None) -> bytes:
    """One channel's reading (``input.channel_topic``): ``{"seq", "ts", "value"}``."""
    doc: dict[str, Any] = {"seq": seq, "value": float(np.float32(value))}
    if ts is not None:
        doc["ts"] = ts
    return json.dumps(doc, separators=(",", ":")).encode()


def encode_binary(values: Array, seq: int | None = None, ts: float | None = None) -> bytes:
    """A sensor message in the binary format; ``values`` is ``[F]`` or ``[T, F]``."""
    arr = np.asarray(values, dtype="<f4")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    t, f = arr.shape
    flags = (FLAG_SEQ if seq is not None else 0) | (FLAG_TS if ts is not None else 0)
    head = HEADER.pack(MAGIC, VERSION, flags, seq or 0, ts or 0.0, t, f)
    return head + np.ascontiguousarray(arr).tobytes()


def _object(payload: bytes | bytearray) -> dict[str, Any]:
    """The payload as a JSON object, or the reason it is not one."""
    try:
        doc = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise PayloadError(MALFORMED_JSON, _json_problem(exc)) from None
    except (ValueError, RecursionError):  # UnicodeDecodeError; nesting past the stack
        raise PayloadError(MALFORMED_JSON, "not a UTF-8 JSON document") from None
    if not isinstance(doc, dict):
        raise PayloadError(MALFORMED_JSON, "not a JSON object")
    return doc


def _seq_ts(doc: dict[str, Any]) -> tuple[int | None, float | None]:
    """A channel message's ``seq`` and ``ts``, checked as :meth:`Decoder._json` checks them."""
    seq = doc.get("seq")
    if seq is not None and (
        not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < MAX_SEQ
    ):
        raise PayloadError(BAD_SEQ, "'seq' must be an integer in 0..2**62-1")
    ts = doc.get("ts")
    if ts is None:
        return seq, None
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise PayloadError(BAD_TS, "'ts' must be a finite number")
    try:
        ts = float(ts)
    except OverflowError:
        raise PayloadError(BAD_TS, "'ts' must be a finite number") from None
    if not math.isfinite(ts):
        raise PayloadError(BAD_TS, "'ts' must be a finite number")
    return seq, ts


def _names(names: Sequence[str]) -> str:
    """Some feature names for a rejection's detail, quoted, at most :data:`NAMES_LISTED`
    (a hostile payload may carry thousands of keys)."""
    shown = ", ".join(json.dumps(name[:64]) for name in names[:NAMES_LISTED])
    more = len(names) - NAMES_LISTED
    return shown + (f" and {more} more" if more > 0 else "")
