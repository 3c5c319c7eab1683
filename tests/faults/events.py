"""The event log every fault-suite process appends to.

One JSON object per line, written with a single ``os.write`` on an
``O_APPEND`` descriptor and no buffering: a line is either whole in the file
or absent, even when the writer is SIGKILLed a moment later, and lines of
concurrent writers never interleave. Every event carries ``t``, a
``CLOCK_MONOTONIC`` reading in nanoseconds, which all processes of one
machine share, so events of different processes can be ordered.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

Event = dict[str, Any]

__all__ = ["Event", "EventLog", "LogReader", "now_ns", "read_events"]


def now_ns() -> int:
    """The shared clock: CLOCK_MONOTONIC, nanoseconds."""
    return time.monotonic_ns()


class EventLog:
    """Append-only, SIGKILL-safe writer of one process's events."""

    def __init__(self, path: Path, proc: str) -> None:
        self.proc = proc
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, ev: str, **fields: Any) -> None:
        """Append one event ``{"ev": ev, "proc": ..., "t": now, **fields}``."""
        line = json.dumps({"ev": ev, "proc": self.proc, "t": now_ns(), **fields})
        os.write(self._fd, line.encode() + b"\n")

    def close(self) -> None:
        """Close the descriptor (events written so far stay)."""
        os.close(self._fd)


def read_events(*paths: Path) -> list[Event]:
    """Every whole event line of *paths*, sorted by time (a torn last line,
    which O_APPEND writes make impossible, would be skipped)."""
    return LogReader().read(list(paths))


class LogReader:
    """Re-reads a set of growing logs cheaply: each call parses only the
    bytes appended since the last one (a line still being written, which
    O_APPEND makes impossible, would wait for its newline)."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[int, list[Event]]] = {}

    def read(self, paths: list[Path]) -> list[Event]:
        """Every whole event line of *paths* so far, sorted by time."""
        events: list[Event] = []
        for path in paths:
            offset, parsed = self._seen.get(path, (0, []))
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                continue
            whole = chunk.rfind(b"\n") + 1
            for raw in chunk[:whole].splitlines():
                try:
                    parsed.append(json.loads(raw))
                except ValueError:
                    continue
            self._seen[path] = (offset + whole, parsed)
            events.extend(parsed)
        events.sort(key=lambda e: e["t"])
        return events
