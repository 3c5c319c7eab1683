"""Ctrl-C while a bus is open: a cancellation of the bus, then KeyboardInterrupt.

Trio raises KeyboardInterrupt wherever the interpreter is when SIGINT
arrives, unless that code is KI-protected. With a broker transport that is
often asyncio code run by trio-asyncio: the exception kills the asyncio loop,
and whatever waits for an answer from it (the close of a consumer) waits
forever. So while at least one bus is open in the main thread, trio_bus
replaces Trio's SIGINT handler with one that never raises: it cancels every
open bus (from the Trio run loop, as Trio's own handler defers delivery) and
remembers the signal; each bus then closes the way a cancelled bus does —
handlers cancelled, acks of finished ones flushed, the rest left for
redelivery, bounded — and ``open_bus`` raises KeyboardInterrupt once it is
closed. An uncaught KeyboardInterrupt ends the process the way Python does
(exit status 130 in a shell, killed by SIGINT).

A SIGINT handler the application installed itself (not Python's default,
not Trio's) is left alone, as is everything outside the main thread.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import trio

__all__ = ["Interrupt", "sigint_cancels"]


class Interrupt:
    """What one open bus knows about Ctrl-C.

    Attributes:
        received: Whether SIGINT arrived while the bus was open.
    """

    def __init__(self, cancel: Callable[[], None]) -> None:
        self.received = False
        self._cancel = cancel
        self._token = trio.lowlevel.current_trio_token()

    def _deliver(self) -> None:
        # In a signal handler: only mark, and let the Trio run loop cancel.
        self.received = True
        try:
            self._token.run_sync_soon(self._cancel)
        except trio.RunFinishedError:  # pragma: no cover - the run is over
            pass


_open: list[Interrupt] = []
_previous: Any = None


def _handler(signum: int, frame: FrameType | None) -> None:
    for interrupt in _open:
        interrupt._deliver()


def _replaceable(handler: Any) -> bool:
    return handler is signal.default_int_handler or (
        getattr(handler, "__module__", None) == "trio._core._ki"
    )


@contextmanager
def sigint_cancels(cancel: Callable[[], None]) -> Iterator[Interrupt]:
    """While the block runs, SIGINT calls *cancel* (from the Trio run loop)
    instead of raising KeyboardInterrupt; the yielded :class:`Interrupt`
    says whether it came."""
    global _previous
    interrupt = Interrupt(cancel)
    installed = False
    if threading.current_thread() is threading.main_thread():
        current = signal.getsignal(signal.SIGINT)
        if current is _handler:
            installed = True
        elif _replaceable(current):
            _previous = current
            signal.signal(signal.SIGINT, _handler)
            installed = True
    if installed:
        _open.append(interrupt)
    try:
        yield interrupt
    finally:
        if installed:
            _open.remove(interrupt)
            if not _open and signal.getsignal(signal.SIGINT) is _handler:
                signal.signal(signal.SIGINT, _previous)
                _previous = None
