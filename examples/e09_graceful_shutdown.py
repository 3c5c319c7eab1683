"""Graceful shutdown on SIGTERM and Ctrl-C: stop taking work, let in-flight
handlers finish, then exit 0.

The signals are received with ``trio.open_signal_receiver``; on the first,
the ``async with open_bus(...)`` block is left normally, which stops
fetching, gives in-flight handlers ``shutdown_grace`` seconds, acks what
finished and leaves the rest to be redelivered. (Cancelling instead, e.g. by
an uncaught KeyboardInterrupt, stops handlers at once.) Kubernetes, systemd
and Docker send SIGTERM, then SIGKILL after their own grace period: keep
``shutdown_grace`` below it.

Run: python examples/e09_graceful_shutdown.py [URL [WORK_SECONDS]]
(default: memory:// and 1 s per job), then press Ctrl-C or ``kill -TERM <pid>``.
"""

from __future__ import annotations

import os
import signal
import sys

import trio

import trio_bus


async def main(url: str, work_seconds: float) -> None:
    async def handle(message: trio_bus.Message) -> None:
        job = message.value.decode()
        print(f"started {job}", flush=True)
        await trio.sleep(work_seconds)  # stands for real work: a database write, a call...
        print(f"finished {job}", flush=True)

    # Before anything starts: a signal arriving early is then handled too.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio_bus.open_bus(url, client_id="worker", shutdown_grace=10) as bus:
            await bus.subscribe("jobs", handle)
            for n in range(3):
                await bus.publish("jobs", f"job-{n}".encode(), key=f"customer-{n}")
            print(f"running as pid {os.getpid()}", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: finishing in-flight jobs", flush=True)
                break
        # Leaving open_bus waited for the handlers that had started.
    print("stopped cleanly", flush=True)


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TRIO_BUS_URL", "memory://")
    work_seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    trio.run(main, url, work_seconds)
