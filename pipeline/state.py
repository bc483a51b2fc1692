"""Per-stream carried state: rows in one preallocated array, slots, resets, checkpoints.

Every stream owns a slot and its home row in :attr:`StateStore.rows` (``[TWINS +
capacity, row_size]`` float32): all of its state tensors, flattened and laid end to
end (``h`` then ``c`` for an LSTM). One row per stream lets a batch be gathered with
one ``take`` and makes a checkpoint one array. The first :data:`TWINS` rows are lent
to streams stepping alone (:meth:`StateStore.twin_for`): such a stream runs with its
state bound in place, reading one of its two rows and writing the other (see the
engine), so its state lives in ``Stream.row``, either its home or its twin.

The store also decides whether a step may continue a stream (:meth:`StateStore.admit`):
sequence numbers and timestamps, duplicates, gaps and idleness. Every reset has a
reason from :data:`RESET_REASONS`, reported through ``on_reset`` when it happens and
kept on the stream (``pending``) until the stream's next result carries it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contract import StateSpec
from pipeline.errors import CheckpointError, ConfigError

Array = np.ndarray[Any, np.dtype[np.float32]]
Signature = tuple[tuple[str, tuple[int, ...], str], ...]

# Reset reasons: stable words for counters and logs.
RESET_EXPLICIT = "explicit"  # a caller asked (Engine.reset, Worker.submit_reset)
RESET_IDLE = "idle"  # no step for longer than idle_timeout_s
RESET_SEQ_GAP = "seq_gap"  # more sequence numbers missing than seq_gap_tolerance
RESET_TS_GAP = "ts_gap"  # timestamps further apart than ts_gap_tolerance_s
RESET_MODEL_CHANGE = "model_change"  # a new model cannot continue the old state
RESET_EVICTED = "evicted"  # least recently used stream dropped beyond max_streams
RESET_NON_FINITE = "non_finite_state"  # the model produced NaN/Inf state
RESET_DROPPED = "dropped"  # a step of the stream was dropped before the engine saw it
RESET_ENGINE_ERROR = "engine_error"  # onnxruntime failed on the stream's batch
RESET_REASONS: tuple[str, ...] = (
    RESET_EXPLICIT,
    RESET_IDLE,
    RESET_SEQ_GAP,
    RESET_TS_GAP,
    RESET_MODEL_CHANGE,
    RESET_EVICTED,
    RESET_NON_FINITE,
    RESET_DROPPED,
    RESET_ENGINE_ERROR,
)

# Why admit() refuses a step (the engine adds reasons for malformed input).
REJECT_DUPLICATE = "duplicate"  # same first sequence number (or timestamp) as the last step
REJECT_OUT_OF_ORDER = "out_of_order"  # older than what the stream has already run
REJECT_CAPACITY = "capacity"  # max_streams streams are all in use by this very call
ADMIT_REJECT_REASONS: tuple[str, ...] = (REJECT_DUPLICATE, REJECT_OUT_OF_ORDER, REJECT_CAPACITY)
# Not a rejection: the stream already has a step in the current wave; admit it in the next.
REPEAT = "_repeat"

TWINS = 8  # spare rows lent to streams stepping alone
CHECKPOINT_FORMAT = "seqstream-state"
CHECKPOINT_VERSION = 1

ResetCallback = Callable[[str, int], None]


@dataclass(frozen=True, slots=True)
class StorePolicy:
    """Limits and tolerances of the store (from :class:`~pipeline.engine.EngineSettings`)."""

    max_streams: int = 10_000
    idle_timeout_s: float | None = 600.0
    seq_gap_tolerance: int = 0
    ts_gap_tolerance_s: float | None = None
    initial_capacity: int = 1024

    def __post_init__(self) -> None:
        if self.max_streams < 1:
            raise ConfigError("max_streams: must be >= 1")
        if self.idle_timeout_s is not None and not self.idle_timeout_s > 0:
            raise ConfigError("idle_timeout_s: must be > 0 (or unset to never expire)")
        if self.seq_gap_tolerance < 0:
            raise ConfigError("seq_gap_tolerance: must be >= 0")
        if self.ts_gap_tolerance_s is not None and not self.ts_gap_tolerance_s >= 0:
            raise ConfigError("ts_gap_tolerance_s: must be >= 0 (or unset)")
        if self.initial_capacity < 1:
            raise ConfigError("initial_capacity: must be >= 1")


class Stream:
    """What the store knows about one stream besides its state row."""

    __slots__ = (
        "home",
        "key",
        "last_seen",
        "last_seq",
        "last_ts",
        "mark",
        "next_seq",
        "pending",
        "reset",
        "row",
        "slot",
        "twin",
    )

    def __init__(self, key: str, slot: int, now: float) -> None:
        self.key = key
        self.slot = slot
        self.home = TWINS + slot  # its own row of StateStore.rows
        self.row = self.home  # the row holding its state now: home, or its twin
        self.twin = -1  # a lent spare row, or -1
        self.next_seq: int | None = None  # sequence number expected next
        self.last_seq: int | None = None  # first sequence number of the last step run
        self.last_ts: float | None = None  # timestamp of the last step run
        self.last_seen = now
        self.pending: tuple[str, ...] = ()  # resets not yet reported in a result
        self.mark = -1  # the wave that last admitted a step (one step per stream per wave)
        self.reset = ""  # reset the last admitted step needs before it runs

    def forget_sequence(self) -> None:
        self.next_seq = None
        self.last_seq = None
        self.last_ts = None


class Layout:
    """Where each state tensor lives inside a row, and a row's initial value."""

    def __init__(self, specs: Sequence[StateSpec]) -> None:
        self.specs = tuple(specs)
        offsets: list[int] = []
        sizes: list[int] = []
        off = 0
        for s in self.specs:
            n = math.prod(s.row_shape)
            offsets.append(off)
            sizes.append(n)
            off += n
        self.offsets = tuple(offsets)
        self.sizes = tuple(sizes)
        self.row_size = off
        init = np.empty(off, dtype=np.float32)
        for s, o, n in zip(self.specs, offsets, sizes, strict=True):
            init[o : o + n] = s.init
        self.init_row: Array = init

    @property
    def signature(self) -> Signature:
        return tuple((s.name, s.row_shape, s.dtype) for s in self.specs)


class StateStore:
    """Rows of carried state for up to ``policy.max_streams`` streams, least recently used last out.

    Capacity starts at ``initial_capacity`` rows and doubles on demand up to
    ``max_streams``, so a handful of streams do not pay for ten thousand.
    """

    def __init__(
        self,
        specs: Sequence[StateSpec],
        policy: StorePolicy,
        on_reset: ResetCallback | None = None,
    ) -> None:
        self.policy = policy
        self.layout = Layout(specs)
        self._on_reset: ResetCallback = on_reset if on_reset is not None else _ignore
        self._streams: OrderedDict[str, Stream] = OrderedDict()  # oldest first
        self._move_to_end = self._streams.move_to_end
        self._get = self._streams.get
        # The policy as plain numbers for admit(): "never" is infinity.
        self._idle = math.inf if policy.idle_timeout_s is None else policy.idle_timeout_s
        self._seq_tol = policy.seq_gap_tolerance
        tol = policy.ts_gap_tolerance_s
        self._ts_tol = math.inf if tol is None else tol
        self.last: Stream | None = None  # the stream admit() admitted last
        capacity = min(policy.initial_capacity, policy.max_streams)
        self.rows: Array = np.empty((TWINS + capacity, self.layout.row_size), dtype=np.float32)
        self._twins_free = list(range(TWINS - 1, -1, -1))
        self._twins_lent: OrderedDict[int, Stream] = OrderedDict()  # oldest loan first
        self._free: list[int] = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first
        self.mark = 0  # the current wave; every begin() and next_wave() moves it on
        self._call_mark = 0  # the first wave of the current call
        self.pending_streams = 0  # streams whose pending resets are not reported yet
        # What the current call's admissions held beyond the plain case (see begin()).
        self.call_rejects = 0
        self.call_repeats = 0
        self.call_resets = 0

    # -- lookup -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, key: object) -> bool:
        return key in self._streams

    def get(self, key: str) -> Stream | None:
        return self._streams.get(key)

    def __iter__(self) -> Iterator[Stream]:
        return iter(self._streams.values())

    @property
    def capacity(self) -> int:
        """How many streams fit before the rows grow."""
        return int(self.rows.shape[0]) - TWINS

    def state_of(self, key: str) -> dict[str, Array]:
        """A copy of one stream's state tensors (row shapes), for inspection and tests."""
        st = self._streams[key]
        row = self.rows[st.row]
        return {
            s.name: row[o : o + n].reshape(s.row_shape).copy()
            for s, o, n in zip(
                self.layout.specs, self.layout.offsets, self.layout.sizes, strict=True
            )
        }

    # -- admission ------------------------------------------------------------------------

    def begin(self) -> None:
        """Start an engine call: streams admitted from now on are pinned against eviction."""
        self.next_wave()
        self._call_mark = self.mark

    def next_wave(self) -> None:
        """Start a wave: each stream admits at most one step until the next wave.

        The ``call_*`` counters then tell the engine whether any admission of the wave
        was refused, deferred (:data:`REPEAT`) or needs a reset, so the plain case can
        skip looking.
        """
        self.mark += 1
        self.call_rejects = self.call_repeats = self.call_resets = 0

    def admit(
        self, key: str, seq: int | None, ts: float | None, n_rows: int, now: float
    ) -> int | str:
        """Decide whether a step continues ``key``: the stream's row, or why it must not run.

        A refused step changes nothing; :data:`REPEAT` means the stream already has a step
        in this wave (see :meth:`next_wave`). The admitted stream is :attr:`last`; its
        ``reset`` names a reset to apply just before the step runs ("" for none). The
        caller applies it (:meth:`clear_row`) when it runs the step, because earlier steps
        of the same stream in the same call have not run yet.
        """
        st = self._get(key)
        if st is None:
            new = self._create(key, now)
            if new is None:
                self.call_rejects += 1
                return REJECT_CAPACITY
            st = new
            st.reset = ""
        else:
            if st.mark == self.mark:
                self.call_repeats += 1
                return REPEAT
            reset = ""
            if now - st.last_seen > self._idle:
                reset = RESET_IDLE
            else:
                nxt = st.next_seq
                if seq is not None and nxt is not None:
                    if seq < nxt:
                        self.call_rejects += 1
                        return REJECT_DUPLICATE if seq == st.last_seq else REJECT_OUT_OF_ORDER
                    if seq - nxt > self._seq_tol:
                        reset = RESET_SEQ_GAP
                if ts is not None and (last_ts := st.last_ts) is not None:
                    if seq is None and ts <= last_ts:
                        self.call_rejects += 1
                        return REJECT_DUPLICATE if ts == last_ts else REJECT_OUT_OF_ORDER
                    if not reset and ts - last_ts > self._ts_tol:
                        reset = RESET_TS_GAP
            self._move_to_end(key)
            if reset:
                self.call_resets += 1
            st.reset = reset
        st.mark = self.mark
        st.last_seen = now
        st.last_seq = seq
        st.next_seq = None if seq is None else seq + n_rows
        st.last_ts = ts
        self.last = st
        return st.row

    def admit_many(
        self,
        keys: Sequence[str],
        seqs: Sequence[int | None],
        tss: Sequence[float | None],
        lens: Sequence[int] | None,
        now: float,
    ) -> list[int | str]:
        """:meth:`admit` for each step in order (``lens`` None: one row each).

        The plain case (a known stream continuing without a reset) is decided inline,
        which halves admission's cost at a thousand streams; anything else goes through
        :meth:`admit`, so both decide alike.
        """
        get = self._get
        move = self._move_to_end
        admit = self.admit
        mark = self.mark
        idle = self._idle
        seq_tol = self._seq_tol
        ts_tol = self._ts_tol
        out: list[int | str] = []
        append = out.append
        for i, key in enumerate(keys):
            seq = seqs[i]
            ts = tss[i]
            n = 1 if lens is None else lens[i]
            st = get(key)
            fast = (
                st is not None
                and st.mark != mark
                and not now - st.last_seen > idle
                and (
                    seq is None
                    or (nxt := st.next_seq) is None
                    or (nxt <= seq and not seq - nxt > seq_tol)
                )
                and (
                    ts is None
                    or (lt := st.last_ts) is None
                    or ((seq is not None or ts > lt) and not ts - lt > ts_tol)
                )
            )
            if not fast:
                append(admit(key, seq, ts, n, now))
                continue
            assert st is not None
            move(key)
            st.reset = ""
            st.mark = mark
            st.last_seen = now
            st.last_seq = seq
            st.next_seq = None if seq is None else seq + n
            st.last_ts = ts
            self.last = st
            append(st.row)
        return out

    def _create(self, key: str, now: float) -> Stream | None:
        if not self._free:
            if self.capacity < self.policy.max_streams:
                self._grow()
            elif not self._evict_one():
                return None
        st = Stream(key, self._free.pop(), now)
        self.rows[st.row] = self.layout.init_row
        self._streams[key] = st
        return st

    def _evict_one(self) -> bool:
        oldest = next(iter(self._streams.values()))
        if oldest.mark >= self._call_mark:
            return False  # every stream has a step in the current call
        self._remove(oldest)
        self._on_reset(RESET_EVICTED, 1)
        return True

    def _grow(self) -> None:
        old = self.capacity
        new = min(max(old * 2, 1), self.policy.max_streams)
        rows = np.empty((TWINS + new, self.layout.row_size), dtype=np.float32)
        rows[: TWINS + old] = self.rows
        self.rows = rows
        self._free.extend(range(new - 1, old - 1, -1))

    def _remove(self, st: Stream) -> None:
        if st.twin >= 0:
            self._return_twin(st)
        if st.pending:
            self.pending_streams -= 1
        del self._streams[st.key]
        self._free.append(st.slot)

    # -- twins ---------------------------------------------------------------------------

    def twin_for(self, st: Stream) -> int:
        """Lend ``st`` a spare row (the longest-held loan is recalled when none is free).

        The stream's state may then live in either row; :attr:`Stream.row` says which.
        """
        if st.twin >= 0:
            return st.twin
        if not self._twins_free:
            _, holder = next(iter(self._twins_lent.items()))
            self._return_twin(holder)
        k = self._twins_free.pop()
        st.twin = k
        self._twins_lent[k] = st
        return k

    def _return_twin(self, st: Stream) -> None:
        """Take the spare row back; the state moves home first if it lives there."""
        k = st.twin
        if st.row == k:
            self.rows[st.home] = self.rows[k]
            st.row = st.home
        st.twin = -1
        del self._twins_lent[k]
        self._twins_free.append(k)

    def _return_all_twins(self) -> None:
        while self._twins_lent:
            self._return_twin(next(iter(self._twins_lent.values())))

    # -- resets -------------------------------------------------------------------------

    def clear_row(self, row: int) -> None:
        """Put a row back to the model's initial state."""
        self.rows[row] = self.layout.init_row

    def reset(self, key: str, reason: str, *, forget_sequence: bool) -> bool:
        """Reset one stream now; its next result reports ``reason``. False if unknown."""
        st = self._streams.get(key)
        if st is None:
            return False
        self.mark_reset(st, reason, forget_sequence=forget_sequence)
        return True

    def mark_reset(self, st: Stream, reason: str, *, forget_sequence: bool) -> None:
        """Reset a stream now; its next result reports ``reason``."""
        self.rows[st.row] = self.layout.init_row
        self._add_pending(st, reason)
        if forget_sequence:
            st.forget_sequence()
        self._on_reset(reason, 1)

    def expire(self, now: float) -> int:
        """Forget streams idle for longer than the timeout; returns how many."""
        idle = self.policy.idle_timeout_s
        if idle is None:
            return 0
        expired = 0
        while self._streams:
            oldest = next(iter(self._streams.values()))
            if now - oldest.last_seen <= idle:
                break  # the order is by last use, so the rest are fresher
            self._remove(oldest)
            expired += 1
        if expired:
            self._on_reset(RESET_IDLE, expired)
        return expired

    def reset_all(self, specs: Sequence[StateSpec], reason: str) -> int:
        """Re-lay out the rows for new state specs; every stream starts again with ``reason``."""
        self._return_all_twins()
        self.layout = Layout(specs)
        self.rows = np.empty((TWINS + self.capacity, self.layout.row_size), dtype=np.float32)
        self.rows[:] = self.layout.init_row
        for st in self._streams.values():
            self._add_pending(st, reason)
        n = len(self._streams)
        if n:
            self._on_reset(reason, n)
        return n

    def _add_pending(self, st: Stream, reason: str) -> None:
        if not st.pending:
            self.pending_streams += 1
        st.pending = (*st.pending, reason)

    def take_pending(self, st: Stream) -> tuple[str, ...]:
        """The resets not yet reported for ``st``; they count as reported from now on."""
        pending = st.pending
        if pending:
            st.pending = ()
            self.pending_streams -= 1
        return pending

    def clear(self) -> None:
        """Forget every stream (no reset is reported: there is nothing left to report to)."""
        self._return_all_twins()
        self.pending_streams = 0
        self._streams.clear()
        self._free = list(range(self.capacity - 1, -1, -1))

    # -- checkpoint -----------------------------------------------------------------------

    def save(self, path: Path, meta: dict[str, Any]) -> int:
        """Write every stream's state atomically (temp file, fsync, rename); returns the count.

        One ``.npz``: ``rows`` ``[n, row_size]`` float32 in least-recently-used order, and
        ``header``, a JSON document with the state signature and each stream's sequence
        bookkeeping. ``meta`` (model name, version) is stored for people, not checked.
        """
        streams = list(self._streams.values())
        if streams:
            index = np.fromiter((s.row for s in streams), dtype=np.intp, count=len(streams))
            rows = self.rows[index]
        else:
            rows = np.empty((0, self.layout.row_size), dtype=np.float32)
        header = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "state_signature": _signature_json(self.layout.signature),
            "row_size": self.layout.row_size,
            "meta": meta,
            "streams": [
                [s.key, s.next_seq, s.last_seq, s.last_ts, list(s.pending)] for s in streams
            ],
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
        return len(streams)

    def load(self, path: Path, now: float) -> int:
        """Replace every stream with the checkpoint's; returns how many were restored.

        Refuses a checkpoint whose state signature differs from this store's layout.
        Idle clocks restart at ``now`` (monotonic time does not survive a restart). When
        the checkpoint holds more than ``max_streams``, the least recently used are
        evicted (and counted).
        """
        path = Path(path)
        header, rows = _read_checkpoint(path)
        want = _signature_json(self.layout.signature)
        if header.get("state_signature") != want:
            raise CheckpointError(
                f"{path}: state signature {header.get('state_signature')} does not match "
                f"the model's {want}"
            )
        entries = header.get("streams")
        if (
            not isinstance(entries, list)
            or rows.ndim != 2
            or rows.shape != (len(entries), self.layout.row_size)
        ):
            raise CheckpointError(f"{path}: rows and streams do not agree")
        parsed = [_parse_entry(e, path) for e in entries]
        if len({p[0] for p in parsed}) != len(parsed):
            raise CheckpointError(f"{path}: a stream appears twice")
        skip = max(0, len(parsed) - self.policy.max_streams)
        self.clear()
        while self.capacity < min(len(parsed) - skip, self.policy.max_streams):
            self._grow()
        for i in range(skip, len(parsed)):
            key, next_seq, last_seq, last_ts, pending = parsed[i]
            st = Stream(key, self._free.pop(), now)
            self.rows[st.row] = rows[i]
            st.next_seq, st.last_seq, st.last_ts = next_seq, last_seq, last_ts
            self._streams[key] = st
            for reason in pending:
                self._add_pending(st, reason)
        if skip:
            self._on_reset(RESET_EVICTED, skip)
        return len(parsed) - skip


def _ignore(reason: str, count: int) -> None:
    """The default ``on_reset``: nobody is counting."""


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


def _parse_entry(
    entry: Any, path: Path
) -> tuple[str, int | None, int | None, float | None, tuple[str, ...]]:
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
    return v is None or (isinstance(v, int) and not isinstance(v, bool))
