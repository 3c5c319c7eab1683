"""The nats-py connection (asyncio side) and its watch loop.

nats-py reports connection changes through callbacks it awaits from its
own tasks. Ours only record the event; :meth:`Connection.watch`, a loop the
transport runs as a Trio task of its nursery, reacts to them: after a
reconnection it tells the publisher and every puller (which resync, see
:mod:`.resume`); when nats-py gives up and closes the connection it raises
:class:`~trio_bus.errors.TransportUnavailableError`, which ends the
transport and so ``open_bus``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as _NatsClient
from nats.aio.msg import Msg

from ..._secrets import redact_text, warn_if_unverified
from ...errors import AuthenticationError, TransportUnavailableError
from .options import NatsOptions
from .security import connect_bound, connect_error, secrets_of, shown

__all__ = ["Client", "Connection"]

logger = logging.getLogger("trio_bus.nats")


class Client(_NatsClient):
    """nats-py's client with a cheaper header parser.

    nats-py checks each header name for whitespace with a generator over its
    characters: a few microseconds per message, a fifth of our per-message
    cost. Same result, computed with ``str.split`` (tests compare both).
    """

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

    @property
    def jsm(self) -> Any:
        """The JetStream management API (cached)."""
        if self._js is None:
            self._js = self.nc.jetstream(timeout=self.options.request_timeout)
        return self._js._jsm

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
        seen: list[BaseException] = []  # for the first connect's error

        async def on_error(exc: Exception) -> None:
            seen.append(exc)
            self._last_error = exc
            if not isinstance(exc, OSError | TimeoutError | asyncio.TimeoutError):
                self._server_error = exc
            logger.warning("nats connection error: %s", redact_text(repr(exc), self._secrets))

        async def on_disconnected() -> None:
            self._connected.clear()
            events.put_nowait("disconnected")

        async def on_reconnected() -> None:
            self._server_error = None
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
        self._connected.set()

    async def watch(self) -> None:
        """React to connection events until cancelled (a lifetime loop).

        Raises:
            TransportUnavailableError: nats-py closed the connection by
                itself (it reconnects forever, so the cause is fatal).
        """
        while True:
            event = await self._events.get()
            if event == "disconnected" and not self.closing:
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
                raise TransportUnavailableError(f"the nats connection closed: {self.cause()}")

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
        if not self.nc.is_closed:
            try:
                await self.nc.close()
            except Exception as exc:
                logger.warning(
                    "closing the nats connection failed: %s", redact_text(repr(exc), self._secrets)
                )
