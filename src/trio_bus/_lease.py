"""Leases: the fence that keeps one aggregate in one place across processes.

When several processes share a group, a transport gives each delivery the
:class:`Lease` of the partition it came from: the member's right to handle
that partition, valid until ``expires`` on the Trio clock. The transport
renews it while the member holds the partition (a broker heartbeat, a KV
update) and revokes it when the member gives the partition up.

The pool makes the lease a fence (see docs/scaling.md):

* no handler call of a leased delivery starts unless the lease is held;
* a running call's cancel scope has ``deadline <= lease.expires``, kept in
  step by :meth:`Lease.renew`; so when the lease lapses (the process was
  frozen past it, or renewals stopped reaching the broker) the call is
  cancelled by Trio's own deadline, *before* any code after the ``await``
  it was suspended in runs — even when the whole process was stopped and
  the lease expired while it was;
* a delivery whose lease lapsed is neither acked, retried nor dead-lettered
  here: it is handed back with ``release`` and the transport drops it (the
  partition's new owner has it).

A transport makes this safe across processes by never letting another
member take the partition before ``expires`` can have passed here: it sets
``expires`` from a time *before* it sent the renewal the broker accepted,
and the new owner waits at least the lease time after it last saw a renewal.
"""

from __future__ import annotations

import math

import trio

__all__ = ["Lease"]


class Lease:
    """The right to handle one partition's deliveries until ``expires``.

    Created and renewed by a transport, on the Trio side. The pool reads it;
    nothing else should.
    """

    __slots__ = ("_running", "expires", "name", "revoked")

    def __init__(self, expires: float, *, name: str = "") -> None:
        #: Trio time (``trio.current_time()``) after which the lease is void.
        self.expires = expires
        #: What it covers, for logs (e.g. ``"orders/p3"``).
        self.name = name
        #: Given up, lost or lapsed for good: never held again (a new
        #: acquisition of the partition gets a new Lease).
        self.revoked = False
        # Cancel scopes of handler calls running under this lease, with the
        # deadline each call wants for its own timeout.
        self._running: dict[trio.CancelScope, float] = {}

    def __repr__(self) -> str:
        state = "revoked" if self.revoked else f"expires={self.expires:.3f}"
        return f"<Lease {self.name or '?'} {state}>"

    def held(self) -> bool:
        """Whether a handler call may start (or go on) under this lease."""
        return not self.revoked and trio.current_time() < self.expires

    def renew(self, expires: float) -> bool:
        """Extend the lease to *expires* (never shortens it; no-op once
        revoked), moving the deadlines of the calls running under it.
        Returns False when the lease is void (revoked, or revoked now).

        A lease that already lapsed is revoked instead: while it was not
        held the pool may have handed deliveries back (the transport drops
        them), so reviving it would let the partition's later deliveries
        run before those -- out of order, the skipped ones replayed only at
        the next rebalance. The transport acquires the partition again
        with a new lease (and redelivers from its committed position)."""
        if self.revoked:
            return False
        if expires <= self.expires:
            return True
        if trio.current_time() >= self.expires:
            self.revoke()
            return False
        self.expires = expires
        for scope, own in self._running.items():
            scope.deadline = min(own, expires)
        return True

    def revoke(self) -> None:
        """Void the lease now and cancel every call running under it."""
        if self.revoked:
            return
        self.revoked = True
        self.expires = -math.inf
        for scope in self._running:
            scope.cancel()

    def enter(self, scope: trio.CancelScope, own: float | None = None) -> None:
        """A handler call starts in *scope*, wanting the deadline *own*
        (default: the scope's): set it, capped at ``expires``."""
        if own is None:
            own = scope.deadline
        self._running[scope] = own
        if self.revoked:
            scope.cancel()
        elif (want := min(own, self.expires)) != scope.deadline:
            scope.deadline = want

    def exit(self, scope: trio.CancelScope, *, restore: bool = True) -> None:
        """The call in *scope* ended: give the scope its own deadline back
        (*restore* False: the caller sets the next deadline itself, so a
        reused scope's deadline does not move twice per call)."""
        own = self._running.pop(scope, None)
        if restore and own is not None and not scope.cancel_called:
            scope.deadline = own
