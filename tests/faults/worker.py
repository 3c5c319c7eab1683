"""Consumer and producer processes of the fault suite, built on the public
API only (``trio_bus.open_bus``). Every handler start and end and every
publish outcome goes to the SIGKILL-safe event log (:mod:`.events`).

    python -m tests.faults.worker consume URL TOPIC LOG --proc c1 [--trap-sigterm]
    python -m tests.faults.worker publish URL TOPIC LOG --proc p1 --count 2000

Exit status: 0 after leaving ``open_bus`` normally (end of a publish run,
or SIGTERM with ``--trap-sigterm``); an untrapped SIGINT propagates as
KeyboardInterrupt, so the process ends killed by SIGINT (-2).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from pathlib import Path

import trio

import trio_bus

from .events import EventLog

#: Handler behaviours (``--handler``), applied to every ``--bad-every``-th seq.
BEHAVIOURS = ("ok", "raise", "hang", "swallow")


def task_count() -> int:
    """Tasks alive in this Trio run."""

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(c) for n in task.child_nurseries for c in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


def leftover_threads() -> list[str]:
    """Threads still alive besides the main one and Trio's idle thread cache."""
    return [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.name.startswith("Trio thread")
    ]


def parse_body(message: trio_bus.Message) -> tuple[str, int]:
    envelope = message.envelope
    raw = bytes(envelope.payload) if envelope is not None else message.value
    body = json.loads(raw)
    return str(body["agg"]), int(body["seq"])


async def behave(args: argparse.Namespace, agg: str, seq: int) -> None:
    """The handler's body: work, or misbehave on every ``--bad-every``-th seq."""
    bad = args.bad_every and seq % args.bad_every == 0
    if bad and args.handler == "raise":
        raise RuntimeError(f"poison {agg}/{seq}")
    if bad and args.handler == "hang":
        await trio.sleep_forever()
    if bad and args.handler == "swallow":
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            pass  # the misbehaviour under test: returns as if it had succeeded
    elif args.work_ms:
        await trio.sleep(args.work_ms / 1000)  # simulated work, not synchronisation


def make_handler(
    args: argparse.Namespace, log: EventLog
) -> Callable[[trio_bus.Message], Awaitable[None]]:
    async def handle(message: trio_bus.Message) -> None:
        try:
            agg, seq = parse_body(message)
        except (ValueError, KeyError, TypeError):
            # Not one of ours: a malformed message reached a handler (U).
            log.write("start", agg="?", seq=-1, attempt=message.attempt, offset=message.offset)
            raise
        where = {
            "agg": agg,
            "seq": seq,
            "attempt": message.attempt,
            "partition": message.partition or 0,
            "offset": message.offset,
        }
        log.write("start", **where)
        try:
            await behave(args, agg, seq)
        except trio.Cancelled:
            # Cancelled at an await (timeout, shutdown, a lapsed lease): the
            # code after it never ran (the checker's frozen-member rule).
            log.write("end", outcome="cancelled", **where)
            raise
        except BaseException:
            log.write("end", outcome="fail", **where)
            raise
        log.write("end", outcome="ok", **where)

    return handle


def envelope_handler(
    handler: Callable[[trio_bus.Message], Awaitable[None]],
) -> Callable[[trio_bus.Envelope], Awaitable[None]]:
    """Adapt a Message handler for ``subscribe_envelope``."""

    async def handle(_: trio_bus.Envelope) -> None:
        await handler(trio_bus.current_message())

    return handle


def transport_options(args: argparse.Namespace) -> object | None:
    """NATS: the consumer's ``ack_wait`` (``--ack-wait``). A consumer that
    took over from one that died waits up to that long for the dead one's
    unacked messages before new ones (``ordered_resume``): the suite's 5 s
    instead of the 30 s default keeps kill scenarios from idling."""
    if not args.url.startswith("nats"):
        return None
    from trio_bus.transports.nats import ConsumerOptions, NatsOptions

    return NatsOptions(consumer=ConsumerOptions(ack_wait=args.ack_wait))


async def consume(args: argparse.Namespace, log: EventLog) -> None:
    tasks_before = task_count()
    try:
        with (
            trio.open_signal_receiver(signal.SIGTERM)
            if args.trap_sigterm
            else nullcontext() as sigs
        ):
            async with trio_bus.open_bus(
                args.url,
                client_id=args.group,
                shutdown_grace=args.shutdown_grace,
                handler_timeout=args.handler_timeout,
                retry=trio_bus.RetryPolicy(max_attempts=args.max_attempts, backoff=0.05),
                transport_options=transport_options(args),
            ) as bus:
                handler = make_handler(args, log)
                if args.envelope:
                    await bus.subscribe_envelope(
                        args.topic, envelope_handler(handler), start="earliest"
                    )
                else:
                    await bus.subscribe(args.topic, handler, start="earliest")
                log.write("ready", pid=os.getpid())
                if sigs is None:
                    await trio.sleep_forever()
                async for _ in sigs:
                    log.write("sigterm")
                    break  # leave open_bus normally: drain and commit
    finally:
        log.write("closed", tasks_left=task_count() - tasks_before, threads=leftover_threads())


async def publish(args: argparse.Namespace, log: EventLog) -> None:
    async with trio_bus.open_bus(args.url, client_id=f"{args.group}-pub") as bus:
        log.write("ready", pid=os.getpid())

        async def one_aggregate(agg: str) -> None:
            for seq in range(args.count // args.aggregates):
                body = json.dumps({"agg": agg, "seq": seq}).encode()
                # Before the send: a publish cut off by a signal has no
                # outcome, yet the broker may have stored it (U allows it).
                log.write("try", agg=agg, seq=seq)
                try:
                    await bus.publish(args.topic, body, key=agg)
                except trio_bus.errors.BusError as exc:
                    log.write("pub", agg=agg, seq=seq, ok=False, err=type(exc).__name__)
                except Exception as exc:  # not a typed error: the checker flags it (L)
                    log.write("pub", agg=agg, seq=seq, ok=False, err=None, raw=repr(exc))
                else:
                    log.write("pub", agg=agg, seq=seq, ok=True, err=None)
                if args.interval_ms:
                    await trio.sleep(args.interval_ms / 1000)  # pacing the load

        async with trio.open_nursery() as nursery:
            for a in range(args.aggregates):
                nursery.start_soon(one_aggregate, f"{args.proc}-a{a}")
    log.write("done")


def resources() -> dict[str, int]:
    """What a leak would grow: descriptors, threads, Trio tasks, RSS."""
    import psutil  # type: ignore[import-untyped]

    me = psutil.Process()
    return {
        "fds": me.num_fds(),
        "threads": len(leftover_threads()),
        "tasks": task_count(),
        "rss": me.memory_info().rss,
    }


async def cycles(args: argparse.Namespace, log: EventLog) -> None:
    """Open a bus, subscribe, publish and handle one message, close; many
    times. Log ``resources`` after the warm-up and at the end."""
    warmup = min(10, args.count // 2)
    for i in range(args.count):
        handled = trio.Event()

        async def handle(_: trio_bus.Message, handled: trio.Event = handled) -> None:
            handled.set()

        async with trio_bus.open_bus(args.url, client_id=args.group) as bus:
            await bus.subscribe(args.topic, handle)
            await bus.publish(args.topic, b"{}", key=f"k{i}")
            with trio.fail_after(30):
                await handled.wait()
        if i + 1 in (warmup, args.count):
            log.write("resources", cycle=i + 1, **resources())


def standby(url: str, log: EventLog) -> None:
    """Import everything the run needs, then wait for SIGUSR1: the harness
    starts the next consumer of a signal scenario while the current one
    runs, so the interpreter's start-up is not on the scenario's clock."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    transport = "nats" if url.startswith("nats") else "kafka"
    importlib.import_module(f"trio_bus.transports.{transport}")  # ahead of use
    log.write("standby")  # SIGUSR1 is blocked: the harness may send it now
    signal.sigwait({signal.SIGUSR1})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.worker")
    parser.add_argument("role", choices=["consume", "publish", "cycles"])
    parser.add_argument("url")
    parser.add_argument("topic")
    parser.add_argument("log", type=Path)
    parser.add_argument("--proc", required=True)
    parser.add_argument("--group", default="faults")
    parser.add_argument("--trap-sigterm", action="store_true")
    parser.add_argument("--envelope", action="store_true")
    parser.add_argument("--handler", choices=BEHAVIOURS, default="ok")
    parser.add_argument("--bad-every", type=int, default=0)
    parser.add_argument("--work-ms", type=float, default=0.0)
    parser.add_argument("--handler-timeout", type=float, default=2.0)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--shutdown-grace", type=float, default=5.0)
    parser.add_argument("--ack-wait", type=float, default=5.0, help="NATS consumers only")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--aggregates", type=int, default=20)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--standby", action="store_true", help="start on SIGUSR1")
    args = parser.parse_args()
    log = EventLog(args.log, args.proc)
    if args.standby:
        standby(args.url, log)
    run = {"consume": consume, "publish": publish, "cycles": cycles}[args.role]
    trio.run(run, args, log)
    sys.exit(0)


if __name__ == "__main__":
    main()
