"""Scale-out of one consumer group: throughput with 1, 2 and 3 member
processes, and failover time after a member's SIGKILL (issue 10, "Measure").

Workload: the bulk scenario of :mod:`benchmarks.workloads` (``bulk-noop``:
1 KiB messages over 100 aggregates, no-op handler), scaled with
``--messages`` (default 20,000; the scenario's own size is 100,000). Each
member is a process of its own (``python -m benchmarks.group_scale member
...``) with one ``subscribe`` in the group; every handler start is one line
``<CLOCK_MONOTONIC ns> <aggregate>`` in the member's log.

* ``throughput``: start N members, wait until all are live, publish the
  workload from this process with ``publish_many``; msg/s = messages / (first
  publish -> last handler start seen in any member). Duplicates (none are
  expected: no rebalance during the run) would count too.
* ``failover``: three members under a paced load (~500 msg/s); SIGKILL one;
  failover = from the kill to the first handler start, in a survivor, of an
  aggregate the killed member handled in the second before the kill. On
  Kafka that is session timeout + rebalance (the URL's
  ``session_timeout_ms``; :data:`trio_bus.testing.plugin.KAFKA_URL_PARAMS`
  by default: 2 s).

Run::

    python -m benchmarks.group_scale --transport kafka --members 1 2 3 --json
    python -m benchmarks.group_scale --url kafka://127.0.0.1:9092 --messages 100000

Without ``--url`` it starts its own broker (Tansu with memory storage, or
nats-server). All processes share the machine: on 2 cores more members
cannot add CPU, so expect little gain; the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

import trio_bus
from trio_bus.testing.plugin import KAFKA_URL_PARAMS

from .workloads import SCENARIOS, Workload

ROOT = Path(__file__).resolve().parent.parent
#: Seconds to wait for members to go live, and for a run to be handled.
LIVE_TIMEOUT = 120.0
RUN_TIMEOUT = 600.0
POLL = 0.1


# ------------------------------------------------------------------ member


async def member(url: str, topic: str, group: str, log: Path) -> None:
    """One group member: log every handler start; ``ready`` once live."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def handle(message: trio_bus.Message) -> None:
        # One write per line, so a SIGKILL leaves whole lines only.
        where = f"{message.partition or 0}:{message.offset}"
        os.write(
            fd, f"{time.monotonic_ns()} {message.aggregate_id or message.key} {where}\n".encode()
        )

    async with trio_bus.open_bus(url, client_id=group) as bus:
        await bus.subscribe(topic, handle, group=group, start="earliest")
        os.write(fd, f"{time.monotonic_ns()} ready\n".encode())
        await trio.sleep_forever()


# ------------------------------------------------------------ orchestrator


async def until(condition: Callable[[], bool], within: float = LIVE_TIMEOUT) -> None:
    """Wait for *condition* over the members' logs (files other processes
    write: no notification to wait on), re-checked every ``POLL / 5`` s."""
    with trio.fail_after(within):
        while True:
            if condition():
                return
            await trio.sleep(POLL / 5)


class Members:
    """Member processes of one group, each with its log."""

    def __init__(self, url: str, topic: str, group: str, workdir: Path) -> None:
        self.url, self.topic, self.group, self.dir = url, topic, group, workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        cmd = [sys.executable, "-m", "benchmarks.group_scale", "member", self.url, self.topic]
        cmd += [self.group, str(self.dir / f"{name}.log")]
        with (self.dir / f"{name}.out").open("ab") as out:
            self.procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=out)

    def lines(self, name: str) -> list[tuple[int, str, str]]:
        """``(time, aggregate or "ready", partition:offset)`` of each line."""
        path = self.dir / f"{name}.log"
        if not path.exists():
            return []
        out = []
        for raw in path.read_text().splitlines():
            t, _, rest = raw.partition(" ")
            what, _, where = rest.partition(" ")
            if what:
                out.append((int(t), what, where))
        return out

    def handled(self, name: str) -> int:
        return sum(k != "ready" for _, k, _ in self.lines(name))

    def distinct(self, names: list[str]) -> dict[str, int]:
        """partition:offset -> first handler start, over *names*."""
        first: dict[str, int] = {}
        for name in names:
            for t, k, where in self.lines(name):
                if k != "ready" and t < first.get(where, 2**63):
                    first[where] = t
        return first

    async def live(self, names: list[str]) -> None:
        await until(lambda: all(any(w == "ready" for _, w, _ in self.lines(n)) for n in names))

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _message(w: Workload, topic: str, i: int) -> trio_bus.OutgoingMessage:
    return trio_bus.OutgoingMessage(topic=topic, value=w.payload(), key=w.key(i))


async def throughput(url: str, w: Workload, n_members: int, workdir: Path) -> dict[str, Any]:
    """Handle *w* with *n_members* member processes; msg/s."""
    tag = uuid.uuid4().hex[:8]
    (workdir / tag).mkdir()
    members = Members(url, f"scale-{tag}", f"scale-{tag}", workdir / tag)
    names = [f"m{i}" for i in range(n_members)]
    try:
        async with trio_bus.open_bus(url, client_id=f"scale-pub-{tag}") as bus:
            for name in names:
                members.start(name)
            await members.live(names)
            started = time.monotonic_ns()
            for low in range(0, w.messages, 1000):
                batch = range(low, min(low + 1000, w.messages))
                await bus.publish_many(_message(w, members.topic, i) for i in batch)
            published = time.monotonic_ns()
            await until(lambda: len(members.distinct(names)) >= w.messages, RUN_TIMEOUT)
        first = members.distinct(names)
        handled = sum(map(members.handled, names))
        seconds = (max(first.values()) - started) / 1e9
        return {
            "case": "throughput",
            "members": n_members,
            "messages": w.messages,
            "handled": handled,
            # Handler starts beyond the first of each message (a rebalance
            # during the run redelivers what was not committed yet).
            "duplicates": handled - len(first),
            "seconds": round(seconds, 2),
            "msg_per_s": round(w.messages / seconds),
            "publish_s": round((published - started) / 1e9, 2),
            "per_member": {n: members.handled(n) for n in names},
        }
    finally:
        members.stop()


async def failover(url: str, w: Workload, workdir: Path) -> dict[str, Any]:
    """SIGKILL one of three members under load; seconds until a survivor
    starts one of its aggregates."""
    tag = uuid.uuid4().hex[:8]
    (workdir / tag).mkdir()
    members = Members(url, f"fail-{tag}", f"fail-{tag}", workdir / tag)
    names = ["m0", "m1", "m2"]
    try:
        async with trio_bus.open_bus(url, client_id=f"fail-pub-{tag}") as bus:
            for name in names:
                members.start(name)
            await members.live(names)
            async with trio.open_nursery() as nursery:

                async def load() -> None:
                    for i in range(10**9):
                        await bus.publish_many(
                            _message(w, members.topic, i * 10 + j) for j in range(10)
                        )
                        await trio.sleep(0.02)  # pacing the load, ~500 msg/s

                nursery.start_soon(load)

                def recent() -> set[str]:
                    """Aggregates m0 handled in the last second."""
                    since = time.monotonic_ns() - 10**9
                    return {k for t, k, _ in members.lines("m0") if k != "ready" and t > since}

                await until(lambda: members.handled("m0") >= 200 and bool(recent()))
                killed = time.monotonic_ns()
                members.kill("m0")
                moving = recent()

                def moved() -> list[int]:
                    return [
                        t
                        for n in names[1:]
                        for t, k, _ in members.lines(n)
                        if k in moving and t > killed
                    ]

                await until(lambda: bool(moved()))
                after = moved()
                nursery.cancel_scope.cancel()
        return {
            "case": "failover",
            "members": 3,
            "failover_s": round((min(after) - killed) / 1e9, 2),
            "aggregates_moved": len(moving),
        }
    finally:
        members.stop()


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    w = SCENARIOS["bulk-noop"].scaled(args.messages)
    workdir = Path(tempfile.mkdtemp(prefix="group-scale-"))
    results = []
    for _ in range(args.repeat):
        for n in args.members:
            results.append(await throughput(args.url, w, n, workdir))
            _show(results[-1], args.json)
        if args.failover:
            results.append(await failover(args.url, w, workdir))
            _show(results[-1], args.json)
    return results


def _show(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result), flush=True)
    elif result["case"] == "throughput":
        print(
            f"members={result['members']} {result['messages']} msgs in {result['seconds']} s: "
            f"{result['msg_per_s']} msg/s, {result['duplicates']} duplicates "
            f"(handler starts per member {result['per_member']})",
            flush=True,
        )
    else:
        print(f"failover after SIGKILL: {result['failover_s']} s", flush=True)


def cli(argv: list[str] | None = None) -> None:
    """``member`` (internal) or the benchmark itself."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "member":
        url, topic, group, log = argv[1:5]
        trio.run(member, url, topic, group, Path(log))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=["kafka", "nats"], default="kafka")
    parser.add_argument("--url", help="broker URL (default: start a broker)")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-failover", dest="failover", action="store_false")
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    args = parser.parse_args(argv)
    from ._brokers import broker_url

    with broker_url(args.transport, args.url, KAFKA_URL_PARAMS) as args.url:
        trio.run(main, args)


if __name__ == "__main__":
    cli()
