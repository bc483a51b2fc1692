"""The store's checkpoint file: one ``.npz``, written atomically, read back with checks.

``rows`` is ``[n, row_size]`` float32, each stream's state in the row layout
(:class:`~pipeline.engine.store.layout.Layout`), least recently used first; ``header`` is
a JSON document with the format and version, the state signature (names, row shapes,
dtypes), the row size, ``meta`` (model name and version, for people, not checked) and one
entry per stream: ``[key, next_seq, last_seq, last_ts, pending resets]``. A file that is
not this, is truncated, or was written for another state layout is refused with a
:class:`~pipeline.errors.CheckpointError` naming the file, never half-loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.engine.store.layout import Array, Signature
from pipeline.errors import CheckpointError

CHECKPOINT_FORMAT = "seqstream-state"
CHECKPOINT_VERSION = 1

# One stream's bookkeeping: key, next seq, last seq, last ts, resets not yet reported.
Entry = tuple[str, int | None, int | None, float | None, tuple[str, ...]]


def write(
    path: Path, rows: Array, signature: Signature, meta: dict[str, Any], entries: Sequence[Entry]
) -> None:
    """Write ``rows`` and ``entries`` to ``path`` atomically (temp file, fsync, rename)."""
    header = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "state_signature": _signature_json(signature),
        "row_size": int(rows.shape[1]),
        "meta": meta,
        "streams": [[key, nxt, last, ts, list(pending)] for key, nxt, last, ts, pending in entries],
    }
    text = json.dumps(header, separators=(",", ":"), allow_nan=False)
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot create a temporary file: {exc}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, rows=rows, header=np.array(text))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write checkpoint: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read(path: Path, signature: Signature, row_size: int) -> tuple[list[Entry], Array]:
    """The entries and rows of the checkpoint at ``path``, checked against ``signature``."""
    path = Path(path)
    header, rows = _read_checkpoint(path)
    want = _signature_json(signature)
    if header.get("state_signature") != want:
        raise CheckpointError(
            f"{path}: state signature {header.get('state_signature')} does not match "
            f"the model's {want}"
        )
    entries = header.get("streams")
    if not isinstance(entries, list) or rows.ndim != 2 or rows.shape != (len(entries), row_size):
        raise CheckpointError(f"{path}: rows and streams do not agree")
    parsed = [_parse_entry(e, path) for e in entries]
    if len({p[0] for p in parsed}) != len(parsed):
        raise CheckpointError(f"{path}: a stream appears twice")
    return parsed, rows


def _signature_json(sig: Signature) -> list[list[Any]]:
    return [[name, list(shape), dtype] for name, shape, dtype in sig]


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], Array]:
    try:
        with np.load(path, allow_pickle=False) as data:
            text = str(data["header"][()])
            rows = np.asarray(data["rows"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # truncated
        raise CheckpointError(f"{path}: not a readable state checkpoint ({exc})") from None
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: checkpoint header is not JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a seqstream state checkpoint")
    if header.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {header.get('version')!r}; this runtime reads "
            f"{CHECKPOINT_VERSION}"
        )
    if rows.dtype != np.float32:
        raise CheckpointError(f"{path}: rows are {rows.dtype}, expected float32")
    return header, rows


def _parse_entry(entry: Any, path: Path) -> Entry:
    ok = isinstance(entry, list) and len(entry) == 5
    if ok:
        key, next_seq, last_seq, last_ts, pending = entry
        ok = (
            isinstance(key, str)
            and _opt_int(next_seq)
            and _opt_int(last_seq)
            and (
                last_ts is None
                or (isinstance(last_ts, int | float) and not isinstance(last_ts, bool))
            )
            and isinstance(pending, list)
            and all(isinstance(p, str) for p in pending)
        )
    if not ok:
        raise CheckpointError(f"{path}: malformed stream entry {str(entry)[:80]}")
    return key, next_seq, last_seq, None if last_ts is None else float(last_ts), tuple(pending)


def _opt_int(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63)
