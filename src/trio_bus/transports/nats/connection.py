"""The nats-py connection (asyncio side) and its watch loop.

nats-py reports connection changes through callbacks it awaits from its
own tasks. Ours only record the event; :meth:`Connection.watch`, a loop the
transport runs as a Trio task of its nursery, reacts to them: after a
reconnection it tells the publisher and every puller (which resync, see
:mod:`.resume`); when nats-py gives up and closes the connection it raises
:class:`~trio_bus.errors.TransportUnavailableError`, which ends the
transport and so ``open_bus``.

Credentials refused while running (a revoked or expired credential, a
changed password): nats-py would close the client for good at the
server's ``-ERR 'Authorization Violation'``; :class:`Client` makes that a
lost connection instead, so reconnection attempts go on and each refusal
reaches the error callback. The connection then reports the refusal
(:attr:`Connection.problem`, read by health) and, if the server still
refuses after ``ConnectOptions.auth_failure_grace`` seconds, the watch
raises :class:`~trio_bus.errors.AuthenticationError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as _NatsClient
from nats.aio.msg import Msg

from ..._secrets import redact_text, warn_if_unverified
from ...errors import AuthenticationError, TransportUnavailableError
from .._refusals import Refusals
from .options import NatsOptions
from .security import (
    AUTH_REFUSALS,
    auth_failure,
    authentication_error,
    connect_bound,
    connect_error,
    secrets_of,
    shown,
)

__all__ = ["Client", "Connection"]

logger = logging.getLogger("trio_bus.nats")


class Client(_NatsClient):
    """nats-py's client with a cheaper header parser, and which reconnects
    when the server refuses its credentials while connected.

    nats-py checks each header name for whitespace with a generator over its
    characters: a few microseconds per message, a fifth of our per-message
    cost. Same result, computed with ``str.split`` (tests compare both).
    """

    async def _process_err(self, err_msg: str) -> None:
        # nats-py closes the client at any -ERR; a refusal of our
        # credentials while connected becomes a lost connection, so the
        # Connection decides (auth_failure_grace) instead of nats-py.
        if self.is_connected and any(r in err_msg.lower() for r in AUTH_REFUSALS):
            error = nats.errors.Error(f"nats: {err_msg.strip()}")
            await self._error_cb(error)
            await self._process_op_err(error)
            return
        await super()._process_err(err_msg)

    async def _connect_to_server(self, s: Any) -> None:
        # nats-py keeps its transport object across reconnection attempts
        # and opens a new socket in it without closing the one a refused
        # attempt left open (a leak per attempt while refused).
        if self.is_reconnecting and self._transport is not None:
            self._transport.close()  # type: ignore[no-untyped-call]
        await super()._connect_to_server(s)

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if key and key.split() != [key]:
                continue  # whitespace inside the name: invalid, skipped
            out[key] = value.strip().decode("utf-8", "replace")
        return out


class Connection:
    """The nats-py client and what its users share; asyncio side only.

    Attributes:
        options: The transport's options.
        nc: The nats-py client.
        generation: Bumped by every reconnection.
        on_reconnect: Called (asyncio side) by :meth:`watch` after every
            reconnection, in registration order.
    """

    def __init__(self, options: NatsOptions) -> None:
        self.options = options
        self.nc: _NatsClient = Client()
        self.closing = False
        self.generation = 0
        self.on_reconnect: list[Callable[[], Any]] = []
        self._connected = asyncio.Event()
        self._events: asyncio.Queue[str] = asyncio.Queue()
        self._last_error: BaseException | None = None
        self._server_error: BaseException | None = None
        self._secrets: list[str] = []
        self._js: Any = None
        self._echo_inbox: str | None = None
        self._echo_seq = 0
        self._echo_waiters: dict[bytes, asyncio.Future[None]] = {}
        self._servers: list[str] = []
        self._was_connected = False
        # The refusals of our credentials since the last (re)connection (the
        # shared policy, on the loop's clock: the timer ending the grace runs
        # on it), the client's last refusal (the error's cause) and the timer.
        self._refusals = Refusals(
            "nats",
            options.connect.auth_failure_grace,
            logger,
            clock=lambda: asyncio.get_running_loop().time(),
        )
        self._auth_refusal: BaseException | None = None
        self._auth_timer: asyncio.TimerHandle | None = None

    @property
    def problem(self) -> str | None:
        """Why the connection is failing in a way waiting will not mend
        (the server refuses our credentials), without secrets; or None."""
        return self._refusals.problem

    @property
    def js(self) -> Any:
        """The JetStream context (publish, subscribe, KV; cached)."""
        if self._js is None:
            self._js = self.nc.jetstream(timeout=self.options.request_timeout)
        return self._js

    @property
    def jsm(self) -> Any:
        """The JetStream management API (cached)."""
        return self.js._jsm

    def cause(self) -> str:
        """The server's or client's last error, for messages (no secrets)."""
        # What the server said (Authorization Violation...) beats what the
        # socket did afterwards (connection reset).
        error = self._server_error or self._last_error or self.nc.last_error
        if error is None:
            return "no error reported"
        text = str(error).strip() or type(error).__name__
        return redact_text(text, self._secrets)

    async def connect(self, servers: list[str], client_id: str) -> None:
        """Connect (one pass over *servers*; later reconnections retry
        forever).

        Raises:
            TransportUnavailableError: no server accepted us; the message
                names the cause (``Authorization Violation``...) and never
                a URL's password or token.
        """
        c = self.options.connect
        events = self._events
        self._secrets = secrets_of(c, servers)
        self._servers = list(servers)
        seen: list[BaseException] = []  # for the first connect's error

        async def on_error(exc: Exception) -> None:
            seen.append(exc)
            self._last_error = exc
            if not isinstance(exc, OSError | TimeoutError | asyncio.TimeoutError):
                self._server_error = exc
            if self._was_connected and auth_failure([exc]) is not None:
                self._refused(exc)
                return
            logger.warning("nats connection error: %s", redact_text(repr(exc), self._secrets))

        async def on_disconnected() -> None:
            self._connected.clear()
            events.put_nowait("disconnected")

        async def on_reconnected() -> None:
            self._server_error = None
            self._end_refusal()
            self._connected.set()
            events.put_nowait("reconnected")

        async def on_closed() -> None:
            events.put_nowait("closed")

        kwargs: dict[str, Any] = {
            "servers": servers,
            "name": c.name or client_id,
            "error_cb": on_error,
            "disconnected_cb": on_disconnected,
            "reconnected_cb": on_reconnected,
            "closed_cb": on_closed,
            "allow_reconnect": True,
            "connect_timeout": c.connect_timeout,
            "reconnect_time_wait": c.reconnect_time_wait,
            "ping_interval": c.ping_interval,
            "max_outstanding_pings": c.max_outstanding_pings,
            "pending_size": c.pending_size,
        }
        for key in ("user", "password", "token", "user_credentials", "nkeys_seed"):
            value = getattr(c, key)
            if value is not None:
                kwargs[key] = value
        warn_if_unverified(c.tls, shown(servers))
        for key in ("tls", "tls_hostname"):
            value = getattr(c, key)
            if value is not None:
                kwargs[key] = value
        kwargs.update(c.extra)
        kwargs["no_echo"] = False  # ack confirmation echoes to itself
        # The first connection must work: one pass over the servers, then a
        # clear error (nats-py would retry the first connection forever).
        kwargs["max_reconnect_attempts"] = 1
        try:
            await asyncio.wait_for(self.nc.connect(**kwargs), connect_bound(c, servers))
        except Exception as exc:
            # What the server said (Authorization Violation...) beats what
            # the socket did afterwards (connection reset).
            ordered = [e for e in seen if e is self._server_error] + [*seen, exc]
            error, cause = connect_error(c, servers, ordered)
            raise error from cause
        if c.tls is not None and not self.nc._server_info.get("tls_required"):
            # nats-py upgrades to TLS only when the server asks: refuse a
            # server that does not (the CONNECT has gone out by then).
            await self.nc.close()
            raise AuthenticationError(shown(servers), "TLS", "the server offers no TLS")
        self.nc.options["max_reconnect_attempts"] = -1
        self._was_connected = True
        self._connected.set()

    def _refused(self, exc: BaseException) -> None:
        """Record a refusal of our credentials after the first connection
        (see :class:`.._refusals.Refusals`); the first of an episode arms
        the timer that ends its grace."""
        first = self._refusals.remaining() is None
        self._auth_refusal = exc
        self._refusals.refused(authentication_error(self.options.connect, self._servers, exc))
        if first:
            self._arm_auth_timer(self._refusals.grace)

    def _arm_auth_timer(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._auth_timer = loop.call_later(delay, self._events.put_nowait, "auth_deadline")

    def _end_refusal(self) -> None:
        if self.closing:
            self._refusals.clear()
        else:
            self._refusals.accepted()
        self._auth_refusal = None
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None

    def _auth_error(self) -> AuthenticationError | None:
        if self._auth_refusal is None:
            return None
        return authentication_error(self.options.connect, self._servers, self._auth_refusal)

    async def watch(self) -> None:
        """React to connection events until cancelled (a lifetime loop).

        Raises:
            AuthenticationError: the server refused our credentials for
                ``auth_failure_grace`` seconds.
            TransportUnavailableError: nats-py closed the connection by
                itself (it reconnects forever, so the cause is fatal).
        """
        while True:
            event = await self._events.get()
            if event == "auth_deadline" and not self.closing:
                error = self._refusals.expired()
                if error is not None:
                    raise error from self._auth_refusal
                left = self._refusals.remaining()
                if left is not None:
                    # asyncio may run a timer a little early: wait the rest.
                    self._arm_auth_timer(left)
            elif event == "disconnected" and not self.closing:
                logger.warning("disconnected from nats: %s", self.cause())
            elif event == "reconnected":
                self.generation += 1
                url = self.nc.connected_url
                logger.warning(
                    "reconnected to nats at %s", url.netloc.rpartition("@")[2] if url else "?"
                )
                for callback in list(self.on_reconnect):
                    result = callback()
                    if asyncio.iscoroutine(result):
                        await result
            elif event == "closed" and not self.closing:
                refused = self._auth_error() or self._closed_by_refusal()
                if refused is not None:
                    raise refused
                raise TransportUnavailableError(f"the nats connection closed: {self.cause()}")

    def _closed_by_refusal(self) -> AuthenticationError | None:
        # nats-py closed the client at a refusal Client did not intercept.
        last = self.nc.last_error
        if last is None or auth_failure([last]) is None:
            return None
        return authentication_error(self.options.connect, self._servers, last)

    async def wait_connected(self, seconds: float) -> bool:
        """True once connected, False after *seconds*."""
        if self.nc.is_connected:
            return True
        try:
            await asyncio.wait_for(self._connected.wait(), seconds)
        except TimeoutError:
            return False
        return bool(self.nc.is_connected)

    async def echo(self) -> asyncio.Future[None]:
        """A future done once everything this connection sent before the
        call has been processed by the server.

        A message to our own inbox comes back only after the server handled
        what was sent before it (nats-py's ``flush`` PING can overtake
        buffered publishes, and cancelling it on a timeout breaks its read
        loop). The future never completes if the message is lost.
        """
        nc = self.nc
        if self._echo_inbox is None:
            self._echo_inbox = nc.new_inbox()

            async def on_echo(msg: Msg) -> None:
                waiter = self._echo_waiters.pop(msg.data, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

            await nc.subscribe(self._echo_inbox, cb=on_echo)
        self._echo_seq += 1
        token = b"%d" % self._echo_seq
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._echo_waiters[token] = waiter
        waiter.add_done_callback(lambda _: self._echo_waiters.pop(token, None))
        await nc.publish(self._echo_inbox, token)
        return waiter

    async def round_trip(self, seconds: float) -> bool:
        """True once the server processed what was sent before; False after
        *seconds* or on a broken connection."""
        if self.nc.is_closed:
            return False
        try:
            waiter = await self.echo()
            await asyncio.wait({waiter}, timeout=seconds)
        except Exception as exc:
            logger.debug("round trip failed: %r", exc)
            return False
        if not waiter.done():
            waiter.cancel()
            return False
        return True

    async def close(self) -> None:
        """Close the client (bounded by the caller)."""
        self.closing = True
        self._end_refusal()
        if not self.nc.is_closed:
            try:
                await self.nc.close()
            except Exception as exc:
                logger.warning(
                    "closing the nats connection failed: %s", redact_text(repr(exc), self._secrets)
                )
