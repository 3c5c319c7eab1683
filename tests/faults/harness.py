"""The scenario harness: starts worker and probe processes, waits on their
event logs, sends signals, reads the broker back and runs the checker.

Waiting is on log contents with bounded timeouts: the logs are files other
processes append to, so the harness re-reads them every ``POLL`` seconds
(no notification exists across processes without extra plumbing).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from trio_bus.testing import FaultProxy

from .checker import CheckParams, DeadLetter, Held, Report, check
from .events import Event, EventLog, LogReader, now_ns

#: Seconds between two reads of the event logs while waiting.
POLL = 0.05
#: Default bound on one wait.
WAIT = 60.0
REPO = Path(__file__).resolve().parents[2]
QUICK = os.environ.get("FAULTS_QUICK", "") not in ("", "0")


def scale(full: int, quick: int) -> int:
    """*full* in a normal run, *quick* with ``FAULTS_QUICK=1``."""
    return quick if QUICK else full


@attrs.define(eq=False)
class Worker:
    """One worker process."""

    proc: str
    process: trio.Process
    exited: trio.Event = attrs.Factory(trio.Event)

    @property
    def running(self) -> bool:
        return not self.exited.is_set()


@attrs.define(eq=False)
class Harness:
    """One scenario on one broker: a fresh topic and group, logs in *dir*.

    Attributes:
        transport: ``"nats"`` or ``"kafka"``.
        url: The trio_bus URL workers use.
        address: What the raw probe clients use (NATS URL, Kafka bootstrap).
    """

    dir: Path
    transport: str
    url: str
    address: str
    nursery: trio.Nursery
    topic: str = attrs.Factory(lambda: f"f{uuid.uuid4().hex[:10]}")
    group: str = "faults"
    #: The FaultProxy between workers and broker, if the scenario has one.
    proxy: FaultProxy | None = None
    log: EventLog = attrs.field(init=False)
    workers: list[Worker] = attrs.Factory(list)
    _reader: LogReader = attrs.Factory(LogReader)
    _count: int = 0

    def __attrs_post_init__(self) -> None:
        self.log = EventLog(self.dir / "harness.log", "harness")

    def events(self) -> list[Event]:
        """Every event of the run so far."""
        return self._reader.read(sorted(self.dir.glob("*.log")))

    async def wait_for(
        self, predicate: Callable[[list[Event]], bool], what: str, timeout: float = WAIT
    ) -> list[Event]:
        """Wait until *predicate* holds over the events; fail after *timeout*."""
        with trio.move_on_after(timeout):
            while True:
                events = self.events()
                if predicate(events):
                    return events
                await trio.sleep(POLL)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    async def count(
        self, ev: str, n: int, *, proc: str | None = None, timeout: float = WAIT
    ) -> None:
        """Wait for *n* events of kind *ev* (of *proc*, if given)."""

        def enough(events: list[Event]) -> bool:
            return sum(bool(e["ev"] == ev and proc in (None, e["proc"])) for e in events) >= n

        await self.wait_for(enough, f"{n} {ev} events of {proc or 'any'}", timeout)

    async def spawn(self, role: str, proc: str, *args: str) -> Worker:
        """Start ``python -m tests.faults.worker ROLE ...``; log its exit."""
        cmd = [sys.executable, "-m", "tests.faults.worker", role, self.url, self.topic]
        cmd += [str(self.dir / f"{proc}.log"), "--proc", proc, "--group", self.group, *args]
        return await self._start(proc, cmd)

    async def _start(self, proc: str, cmd: Sequence[str]) -> Worker:
        with (self.dir / f"{proc}.out").open("ab") as out:
            process = await trio.lowlevel.open_process(
                list(cmd), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        worker = Worker(proc, process)
        self.workers.append(worker)
        self.nursery.start_soon(self._reap, worker)
        return worker

    async def _reap(self, worker: Worker) -> None:
        rc = await worker.process.wait()
        self.log.write("exit", proc=worker.proc, rc=rc)
        worker.exited.set()

    async def consumer(self, proc: str, *args: str, standby: Worker | None = None) -> Worker:
        """Start a consumer and wait until its subscription is live; with
        *standby* (from :meth:`standby`, same *proc* and *args*), wake that
        already started process instead."""
        before = sum(e["ev"] == "ready" and e["proc"] == proc for e in self.events())
        if standby is None:
            worker = await self.spawn("consume", proc, *args)
        else:
            worker = standby
            await self.count("standby", 1, proc=proc)  # before, SIGUSR1 would kill it
            worker.process.send_signal(signal.SIGUSR1)
        await self.count("ready", before + 1, proc=proc)
        return worker

    async def standby(self, proc: str, *args: str) -> Worker:
        """Start a consumer process that imports what it needs and waits;
        :meth:`consumer` with ``standby=`` wakes it."""
        return await self.spawn("consume", proc, *args, "--standby")

    async def publisher(self, proc: str, count: int, *args: str) -> Worker:
        """Start a publisher of *count* messages (``--aggregates`` in *args*)."""
        return await self.spawn("publish", proc, "--count", str(count), *args)

    async def fuzzer(self, count: int) -> Worker:
        """Start the raw-client fuzzer (:mod:`.fuzz`) publishing *count* messages."""
        cmd = [sys.executable, "-m", "tests.faults.fuzz", self.transport, self.address]
        cmd += [self.topic, str(self.dir / "fuzz.log"), "--count", str(count)]
        return await self._start("fuzz", cmd)

    async def sampler(self) -> Worker:
        """Start the ack-floor sampler (stopped by :meth:`finish`)."""
        every = "0.05" if self.transport == "nats" else "0.1"
        worker = await self._probe("sample", str(self.dir / "sampler.log"), "--every", every)
        await self.count("tick", 1)
        return worker

    async def _probe(self, command: str, out: str, *args: str) -> Worker:
        cmd = [sys.executable, "-m", "tests.faults.probe", command, self.transport]
        cmd += [self.address, self.topic, self.group, out, *args]
        self._count += 1
        return await self._start(f"probe-{command}-{self._count}", cmd)

    async def signal(self, worker: Worker, sig: int, *, timeout: float = 30.0) -> int | None:
        """Send *sig*; wait up to *timeout* for the exit (SIGKILL after that,
        which the checker reports under T). Return the exit status."""
        self.log.write("signal", proc=worker.proc, sig=int(sig))
        worker.process.send_signal(sig)
        with trio.move_on_after(timeout):
            await worker.exited.wait()
            return worker.process.returncode
        worker.process.kill()
        await worker.exited.wait()
        return None

    def freeze(self, worker: Worker) -> None:
        """SIGSTOP *worker*; the ``freeze`` event is written after the signal
        was sent, so it is no earlier than the stop (the checker's
        frozen-member rule ends cancelled calls there)."""
        worker.process.send_signal(signal.SIGSTOP)
        self.log.write("freeze", proc=worker.proc)

    def thaw(self, worker: Worker) -> None:
        """SIGCONT a worker frozen by :meth:`freeze`."""
        self.log.write("thaw", proc=worker.proc)
        worker.process.send_signal(signal.SIGCONT)

    async def stop_quietly(self, worker: Worker) -> None:
        """SIGTERM a worker as the harness's own control step (a publisher
        that has run long enough): no ``signal`` event, so T ignores it."""
        if worker.running:
            worker.process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            await worker.exited.wait()

    async def settle_published(self, timeout: float = WAIT, *, since: int = 0) -> int:
        """Wait until every publish acked after *since* (the shared clock,
        ns; default: all) finished at least once; return how many that is."""
        acked: set[tuple[str, int]] = set()

        def done(events: list[Event]) -> bool:
            acked.clear()
            acked.update(
                (e["agg"], e["seq"])
                for e in events
                if e["ev"] == "pub" and e["ok"] and e.get("valid", True) and e["t"] > since
            )
            ended = {(e["agg"], e["seq"]) for e in events if e["ev"] == "end"}
            return acked <= ended

        await self.wait_for(done, "every acked publish handled", timeout)
        return len(acked)

    async def settle_backlog(self, timeout: float = WAIT) -> None:
        """Wait for a sample, taken from now on, in which the group has
        nothing pending or unacked (needs :meth:`sampler`)."""
        since = now_ns()

        def idle(events: list[Event]) -> bool:
            return any(
                e["ev"] == "tick" and e["t"] > since and _idle(e.get("backlog")) for e in events
            )

        await self.wait_for(idle, "an empty backlog", timeout)

    async def wait_exit(self, worker: Worker, timeout: float = WAIT) -> int:
        """Wait for a worker that ends by itself (a publisher)."""
        with trio.fail_after(timeout):
            await worker.exited.wait()
        rc = worker.process.returncode
        assert rc is not None
        return rc

    async def settle(self, expected: int, timeout: float = WAIT) -> None:
        """Wait until *expected* distinct messages finished at least once."""

        def done(events: list[Event]) -> bool:
            return len({(e["agg"], e["seq"]) for e in events if e["ev"] == "end"}) >= expected

        await self.wait_for(done, f"{expected} handled messages", timeout)

    async def readback(self) -> tuple[list[Held], list[DeadLetter]]:
        """What the broker holds, read by a raw client."""
        out = self.dir / f"readback-{self._count + 1}.json"
        worker = await self._probe("readback", str(out))
        rc = await self.wait_exit(worker, timeout=120)
        assert rc == 0, (self.dir / f"{worker.proc}.out").read_text()
        data = json.loads(out.read_text())
        held = [Held(**h) for h in data["held"]]
        dead = [DeadLetter(**d) for d in data["dead"]]
        return held, dead

    async def finish(self, scenario: str, params: CheckParams | None = None) -> Report:
        """Stop what still runs (SIGTERM, then SIGKILL), read back, check,
        and append the result to ``$FAULTS_RESULTS`` if set."""
        ticks = sum(e["ev"] == "tick" for e in self.events())
        if ticks:  # one more complete sample of the final ack floor
            await self.count("tick", ticks + 2)
        running = [w for w in self.workers if w.running]
        for worker in running:  # all at once: they drain in parallel
            worker.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(15):
            for worker in running:
                await worker.exited.wait()
        for worker in running:
            if worker.running:
                worker.process.kill()
                await worker.exited.wait()
        held, dead = await self.readback()
        # The harness's own stop signals are not part of what is checked.
        events = [
            e for e in self.events() if not (e["ev"] == "exit" and e["proc"].startswith("probe"))
        ]
        report = check(events, held, dead, params)
        results = os.environ.get("FAULTS_RESULTS")
        if results:
            line = {
                "scenario": scenario,
                "transport": self.transport,
                "quick": QUICK,
                **_row(report),
            }
            with open(results, "a") as f:  # noqa: ASYNC230 - one line at the end
                f.write(json.dumps(line) + "\n")
        return report


def _idle(backlog: object) -> bool:
    # Tansu's latest offset can lag a commit by one: a negative lag is idle.
    return isinstance(backlog, int) and backlog <= 0


def _row(report: Report) -> dict[str, object]:
    return {
        "published": report.published,
        "acked": report.acked,
        "handled": report.handled,
        "dead_lettered": report.dead_lettered,
        "lost": report.lost,
        "unexpected": report.unexpected,
        "early_acks": report.early_acks,
        "order_violations": report.order_violations,
        "overlaps": report.overlaps,
        "frozen_overlaps": report.frozen_overlaps,
        "duplicates": report.duplicates,
        "shutdown_max_s": round(report.shutdown_max_s, 2),
        "failed": report.failed(),
        "violations": {k: v[:5] for k, v in report.violations.items() if v},
    }
