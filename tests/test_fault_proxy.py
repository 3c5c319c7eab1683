"""The fault-injection TCP proxy itself: forwards, resets, blackholes, heals."""

from __future__ import annotations

import trio

from trio_bus.testing import FaultProxy


async def _echo_server(nursery: trio.Nursery) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(4096):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(trio.serve_tcp, echo, 0)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_forwards_resets_and_blackholes() -> None:
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery)
        proxy: FaultProxy = await nursery.start(FaultProxy("127.0.0.1", port).run)
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        async with stream:
            await _exercise(proxy, stream)
        nursery.cancel_scope.cancel()


async def _exercise(proxy: FaultProxy, stream: trio.SocketStream) -> None:
    await stream.send_all(b"ping")
    assert await stream.receive_some(4096) == b"ping"
    assert proxy.connections == 1

    proxy.blackhole()
    await stream.send_all(b"held")
    with trio.move_on_after(0.2) as scope:
        await stream.receive_some(4096)
    assert scope.cancelled_caught  # nothing moves while blackholed
    proxy.heal()
    with trio.fail_after(5):
        assert await stream.receive_some(4096) == b"held"  # and nothing was lost

    proxy.reset()
    with trio.fail_after(5):
        try:
            data = await stream.receive_some(4096)
        except trio.BrokenResourceError:
            data = b""
    assert data == b""
    assert proxy.resets == 1
