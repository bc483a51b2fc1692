"""Training progress: a tqdm bar on a terminal, a few plain lines anywhere else.

A bar redraws its line with carriage returns; written to a log file (the demo's, a CI
job's, systemd's journal) that is hundreds of redraws glued into one line. When stderr
is not a terminal, :class:`PlainProgress` writes one line at the start, about ``lines``
lines spread over the run, and one at the end (early stopping ends most runs long
before the last epoch, so the end line is what a log reader wants).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm


class PlainProgress:
    """The part of tqdm's interface training uses, as plain lines."""

    def __init__(
        self,
        iterable: Iterable[int],
        total: int,
        desc: str,
        stream: TextIO,
        lines: int = 10,
        unit: str = "epoch",
    ) -> None:
        self._iterable = iterable
        self.unit = unit
        self.total = total
        self.desc = desc
        self._stream = stream
        self._every = max(1, -(-total // max(1, lines)))  # ceil: at most ``lines`` lines
        self._done = 0  # epochs finished and seen finished by this generator
        self._yielded = 0  # epochs handed out (the last one finished if the loop broke)
        self._postfix = ""
        self._started = time.monotonic()
        self._last_written = -1

    def __iter__(self) -> Iterator[int]:
        self._write(f"{self.desc}: up to {self.total} {self.unit}s")
        for item in self._iterable:
            self._yielded += 1
            yield item
            self._done += 1
            if self._done % self._every == 0:
                self._line()

    def set_postfix(self, **values: Any) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        self._done = self._yielded  # after a break, the epoch that broke out had finished
        if self._last_written != self._done:
            self._line()

    def _line(self) -> None:
        self._last_written = self._done
        seconds = time.monotonic() - self._started
        self._write(
            f"{self.desc}: {self.unit} {self._done}/{self.total} {self._postfix} ({seconds:.0f} s)"
        )

    def _write(self, text: str) -> None:
        print(text.rstrip(), file=self._stream, flush=True)


def progress(
    iterable: range, *, desc: str, unit: str = "epoch", stream: TextIO | None = None
) -> Any:
    """tqdm on a terminal, :class:`PlainProgress` otherwise (both on ``stream``, stderr)."""
    out = sys.stderr if stream is None else stream
    if out.isatty():
        return tqdm(iterable, desc=desc, unit=unit, mininterval=0.5, file=out)
    return PlainProgress(iterable, len(iterable), desc, out, unit=unit)
