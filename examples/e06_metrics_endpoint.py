"""A Prometheus metrics endpoint for a bus (``trio_bus.metrics.serve_metrics``).

Each bus has its own registry (``bus.metrics_registry``); the endpoint runs
as a task of your nursery, on loopback by default. This example scrapes its
own endpoint once and prints a few series; a service would keep serving
until it shuts down.

Run: python examples/e06_metrics_endpoint.py [URL]   (default: memory://)
"""

from __future__ import annotations

import os
import sys

import trio

import trio_bus
from trio_bus.metrics import serve_metrics


async def scrape(port: int) -> str:
    """What Prometheus would fetch from ``http://127.0.0.1:<port>/metrics``."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = b""
        while chunk := await stream.receive_some():
            response += chunk
    return response.decode()


async def main(url: str) -> None:
    handled = trio.Semaphore(0)

    async def handle(message: trio_bus.Message) -> None:
        handled.release()

    async with trio_bus.open_bus(url, client_id="billing") as bus, trio.open_nursery() as nursery:
        # port=0 picks a free port; nursery.start returns it once listening.
        port = await nursery.start(serve_metrics, bus.metrics_registry)
        print(f"metrics on http://127.0.0.1:{port}/metrics")
        await bus.subscribe("invoices", handle)
        for n in range(5):
            await bus.publish("invoices", b"{}", key=f"invoice-{n}")
        with trio.fail_after(30):
            for _ in range(5):
                await handled.acquire()
        text = await scrape(port)
        nursery.cancel_scope.cancel(reason="example done")  # stops the endpoint
    for line in text.splitlines():
        if "_messages_handled_total{" in line or "_messages_published_total{" in line:
            print(line)


if __name__ == "__main__":
    trio.run(
        main, sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TRIO_BUS_URL", "memory://")
    )
