"""A Trio TCP proxy that injects network faults between a client and a broker.

Put it between a bus and its broker (``open_bus(f"nats://127.0.0.1:{proxy.port}")``)
and, while traffic flows, :meth:`FaultProxy.reset` every connection (both
ends get a TCP RST, as when a NAT box or a load balancer drops them) or
:meth:`FaultProxy.blackhole` the network: bytes stop moving in both
directions and new connections hang, as in a partition where TCP keeps
retransmitting; :meth:`FaultProxy.heal` lets everything flow again, nothing
lost on connections both ends still hold.

    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(FaultProxy("127.0.0.1", broker_port).run)
        ...
        proxy.reset()
"""

from __future__ import annotations

import socket
import struct

import trio

__all__ = ["FaultProxy"]

_CHUNK = 65536


class FaultProxy:
    """Forward TCP connections from a loopback port to ``host:port``.

    Attributes:
        port: The port it listens on (known once :meth:`run` started).
        accepted: Connections accepted so far.
        resets: Times :meth:`reset` ran.
    """

    def __init__(self, host: str, port: int, *, listen_port: int = 0) -> None:
        self.target = (host, port)
        self.port = listen_port
        self.accepted = 0
        self.resets = 0
        self._links: set[_Link] = set()
        self._flowing = trio.Event()
        self._flowing.set()

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return len(self._links)

    @property
    def blackholed(self) -> bool:
        """Whether bytes are held back right now."""
        return not self._flowing.is_set()

    async def run(
        self, *, task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and forward until cancelled; ``nursery.start`` returns the proxy."""
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    def reset(self) -> None:
        """Abort every open connection with a TCP RST on both sides."""
        self.resets += 1
        for link in list(self._links):
            link.abort()

    def blackhole(self) -> None:
        """Stop moving bytes (both directions, all connections, new ones too)."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    def heal(self) -> None:
        """Let bytes move again after :meth:`blackhole`."""
        self._flowing.set()

    async def _wait_flowing(self) -> None:
        while not self._flowing.is_set():
            await self._flowing.wait()

    async def _serve(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        link = _Link(client)
        self._links.add(link)
        try:
            await self._wait_flowing()
            with link.scope:
                try:
                    upstream = await trio.open_tcp_stream(*self.target)
                except OSError:
                    return
                link.upstream = upstream
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, link)
                    nursery.start_soon(self._pump, upstream, client, link)
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, link: _Link) -> None:
        try:
            while True:
                data = await source.receive_some(_CHUNK)
                await self._wait_flowing()
                if not data:
                    break
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        # One side closed or broke: so does the other, as a real peer would see.
        link.scope.cancel()


class _Link:
    """One proxied connection: the client side and (once open) the upstream."""

    def __init__(self, client: trio.SocketStream) -> None:
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.scope = trio.CancelScope()

    def abort(self) -> None:
        for stream in (self.client, self.upstream):
            if stream is None:
                continue
            try:
                # Linger 0: close() sends RST instead of FIN.
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            except OSError:
                pass
            stream.socket.close()
        self.scope.cancel()
