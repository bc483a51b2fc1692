"""Runs one model on preallocated, IO-bound buffers: the engine's arithmetic, no policy.

The engine (:mod:`pipeline.engine.engine`) decides which stream rows form a batch; a
:class:`Runner` owns a :class:`Plan`'s buffers per batch shape, which the state store
fills (gather) and empties (scatter), and runs ``session.run`` on them through
onnxruntime's IO binding. A stream stepping alone runs on a :class:`Banked` binding
that reads and writes its twin rows in place.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.errors import ModelError
from pipeline.model import StepModel

Array = np.ndarray[Any, np.dtype[np.float32]]

SMALL = 64  # arrays up to this size are probed for NaN/Inf in pure Python


class Plan:
    """IO-bound buffers for one batch shape ``(B, T)``; views into the runner's flat buffers."""

    __slots__ = (
        "first",
        "io",
        "outputs",
        "state_in",
        "state_in_flat",
        "state_out",
        "state_out_flat",
        "x",
        "x2d",
        "x_flat",
        "x_small",
    )

    io: Any
    x: Array
    x2d: Array
    x_flat: Array
    x_small: bool  # few enough values for the pure-Python NaN/Inf probe
    first: list[Array]  # each output of batch row 0 (the single-stream path)
    state_in: list[Array]
    state_in_flat: Array
    state_out: list[Array]
    state_out_flat: Array
    outputs: list[Array]


class Banked:
    """A binding of a single-stream run to twin rows: reads one row, writes ``out``."""

    __slots__ = ("io", "out")

    def __init__(self, io: Any, out: Array) -> None:
        self.io = io
        self.out = out


class Runner:
    """Runs ``session`` on preallocated buffers with IO binding; no allocation per call.

    Buffers are flat arrays grown on demand; a :class:`Plan` per ``(B, T)`` binds
    contiguous views of them, so plans for every batch size share the same memory.
    ``state_in_flat`` / ``state_out_flat`` hold the state tensors end to end in the
    model's layout, which is what :meth:`StateStore.gather` and ``scatter`` fill and read.

    With B == 1 the state inputs laid end to end are exactly one twin row, so a stream
    stepping alone can skip both copies: a :class:`Banked` binding points the state
    inputs at its current twin row and the state outputs at the other row of the pair.
    """

    MAX_PLANS = 256
    MAX_BANKED = 64

    def __init__(self, model: StepModel, row_size: int) -> None:
        spec = model.spec
        self.model = model
        self.session = model.session
        self._sess = getattr(model.session, "_sess", None)  # skips Python-side checks
        self.n_features = spec.n_features
        self.row_size = row_size
        self.specs = spec.state
        self.output_names = spec.outputs
        self.output_rows = tuple(spec.output_shapes[name] for name in spec.outputs)
        self._plans: dict[tuple[int, int], Plan] = {}
        self._x = np.empty(0, dtype=np.float32)
        self._in = np.empty(0, dtype=np.float32)
        self._out = np.empty(0, dtype=np.float32)
        self._task: list[Array] = [np.empty(0, dtype=np.float32) for _ in spec.outputs]
        self._bank: dict[tuple[int, int, int], Banked] = {}
        self._bank_rows: Array | None = None
        self._check_shapes()

    def _check_shapes(self) -> None:
        """One real step at start: outputs must have the shapes the buffers will assume
        (the contract's), or every batch would fail later, one by one."""
        model = self.model
        try:
            x = np.zeros((1, 1, self.n_features), dtype=np.float32)
            outputs, state = model.run(x, model.initial_state(1))
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise ModelError(f"{model.path}: a first step fails: {exc}") from None
        for name, row in zip(self.output_names, self.output_rows, strict=True):
            got = tuple(outputs[name].shape)
            if got != (1, 1, *row):
                raise ModelError(
                    f"{model.path}: output {name!r} has shape {list(got)} for one step; "
                    f"the metadata implies {[1, 1, *row]}"
                )
        for spec in self.specs:
            want = tuple(1 if d == "batch" else int(d) for d in spec.shape)
            if tuple(state[spec.name].shape) != want:
                raise ModelError(
                    f"{model.path}: state output {spec.output!r} has shape "
                    f"{list(state[spec.name].shape)}; the metadata says {list(want)}"
                )

    def plan(self, batch: int, steps: int) -> Plan:
        plan = self._plans.get((batch, steps))
        if plan is None:
            plan = self._make_plan(batch, steps)
        return plan

    def _ensure(self, batch: int, steps: int) -> None:
        grown = False
        need_x = batch * steps * self.n_features
        if self._x.size < need_x:
            self._x = np.empty(max(need_x, 2 * self._x.size), dtype=np.float32)
            grown = True
        need_s = batch * self.row_size
        if self._in.size < need_s:
            size = max(need_s, 2 * self._in.size)
            self._in = np.empty(size, dtype=np.float32)
            self._out = np.empty(size, dtype=np.float32)
            grown = True
        for k, row in enumerate(self.output_rows):
            need = batch * steps * math.prod(row)
            if self._task[k].size < need:
                self._task[k] = np.empty(max(need, 2 * self._task[k].size), dtype=np.float32)
                grown = True
        if grown:
            self._plans.clear()  # their views point at the old buffers
            self._bank.clear()

    def _make_plan(self, batch: int, steps: int) -> Plan:
        self._ensure(batch, steps)
        if len(self._plans) >= self.MAX_PLANS:
            self._plans.clear()
            self._bank.clear()  # bound to views of the plans just dropped
        p = Plan()
        f = self.n_features
        p.x = self._x[: batch * steps * f].reshape(batch, steps, f)
        p.x2d = p.x.reshape(batch * steps, f)
        p.x_flat = p.x.reshape(-1)
        p.x_small = p.x_flat.size <= SMALL
        p.state_in_flat = self._in[: batch * self.row_size]
        p.state_out_flat = self._out[: batch * self.row_size]
        p.state_in, p.state_out = [], []
        off = 0
        for s in self.specs:
            shape = tuple(batch if d == "batch" else int(d) for d in s.shape)
            n = math.prod(s.row_shape)
            p.state_in.append(p.state_in_flat[batch * off : batch * (off + n)].reshape(shape))
            p.state_out.append(p.state_out_flat[batch * off : batch * (off + n)].reshape(shape))
            off += n
        p.outputs = [
            self._task[k][: batch * steps * math.prod(row)].reshape(batch, steps, *row)
            for k, row in enumerate(self.output_rows)
        ]
        p.first = [o[0] for o in p.outputs]
        io = self.session.io_binding()
        io.bind_cpu_input(self.model.spec.input, p.x)
        for s, arr in zip(self.specs, p.state_in, strict=True):
            io.bind_cpu_input(s.name, arr)
        for name, arr in zip(self.output_names, p.outputs, strict=True):
            io.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        for s, arr in zip(self.specs, p.state_out, strict=True):
            io.bind_output(s.output, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        p.io = io
        self._plans[(batch, steps)] = p
        return p

    def run(self, plan: Plan) -> None:
        self.run_io(plan.io)

    def run_io(self, io: Any) -> None:
        if self._sess is not None:
            self._sess.run_with_iobinding(io._iobinding, None)
        else:  # pragma: no cover - onnxruntime without the private handle
            self.session.run_with_iobinding(io)

    # A stream stepping alone: bind its state rows in place (read one, write the other).

    def banked(self, plan: Plan, rows: Array, steps: int, row: int, other: int) -> Banked:
        """The binding that reads store row ``row`` and writes ``other`` (made on first use,
        with its reverse), sharing ``plan``'s x and task outputs."""
        if rows is not self._bank_rows:
            self._bank.clear()  # the store reallocated: the pointers are stale
            self._bank_rows = rows
        key = (steps, row, other)
        banked = self._bank.get(key)
        if banked is None:
            if len(self._bank) >= self.MAX_BANKED:
                self._bank.clear()
            self._bank[(steps, other, row)] = self._make_banked(plan, rows, other, row)
            self._bank[key] = banked = self._make_banked(plan, rows, row, other)
        return banked

    def _make_banked(self, plan: Plan, rows: Array, row_in: int, row_out: int) -> Banked:
        assert rows.flags.c_contiguous
        io = self.session.io_binding()
        io.bind_cpu_input(self.model.spec.input, plan.x)
        for name, arr in zip(self.output_names, plan.outputs, strict=True):
            io.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        base = rows.ctypes.data
        width = rows.shape[1] * rows.itemsize
        off = 0
        for s in self.specs:
            shape = [1 if d == "batch" else int(d) for d in s.shape]
            at = off * rows.itemsize
            io.bind_input(s.name, "cpu", 0, np.float32, shape, base + row_in * width + at)
            io.bind_output(s.output, "cpu", 0, np.float32, shape, base + row_out * width + at)
            off += math.prod(s.row_shape)
        return Banked(io, rows[row_out])
