"""Raising one exception out of Trio's exception groups.

Nurseries wrap whatever passes through them in an ``ExceptionGroup``
(strict groups). A public context manager should raise the one exception a
caller expects instead, as itself — the same object, its own context kept
(trio-websocket's ``open_websocket`` does the same).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import trio

__all__ = ["leaves", "lone_exception", "raise_as_is", "unwrap_lone_exception"]


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside *exc*, depth first; one exception
    object reaching the group along two paths counts once."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    seen: dict[int, BaseException] = {}
    for sub in exc.exceptions:
        for leaf in leaves(sub):
            seen.setdefault(id(leaf), leaf)
    return list(seen.values())


def lone_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The only leaf of *group* that is not a ``trio.Cancelled``, if it has
    exactly one (a pending cancellation is delivered again at the next
    checkpoint); else the lone Cancelled; else None."""
    found = leaves(group)
    errors = [leaf for leaf in found if not isinstance(leaf, trio.Cancelled)]
    if len(errors) == 1:
        return errors[0]
    return found[0] if len(found) == 1 else None


def raise_as_is(exc: BaseException) -> NoReturn:
    """Raise *exc* from inside an ``except`` block without chaining the
    handled exception to it: its ``__context__`` stays its own."""
    context, suppress = exc.__context__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__context__, exc.__suppress_context__ = context, suppress
        del exc


@contextmanager
def unwrap_lone_exception() -> Iterator[None]:
    """Raise a group holding a single exception as that exception."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = lone_exception(group)
        if leaf is None:
            raise
        raise_as_is(leaf)
