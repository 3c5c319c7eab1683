"""The NATS transport when the network or its own machinery breaks.

A :class:`~trio_bus.testing.FaultProxy` sits between the bus and a real
nats-server: connections are reset mid-stream, or the network is blackholed
and healed. Properties checked:

* per aggregate, no message runs after a later one of its aggregate that
  was already handled, and first handlings follow publish order;
* nothing whose publish returned without error is lost, and a publish
  during an outage either waits for the server's ack or fails with a typed
  error within ``publish_timeout``;
* closing is bounded while the server is unreachable;
* a loop of the asyncio side that fails ends ``open_bus`` with a typed
  error; a failed login names the server's cause and never the password.
"""

from __future__ import annotations

import logging
import subprocess
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import pytest
import trio

import trio_bus
from trio_bus.errors import (
    PublishError,
    TopicConfigError,
    TransportError,
    TransportUnavailableError,
)
from trio_bus.testing import FaultProxy, contract_settings
from trio_bus.testing._servers import find_nats_server, free_port, stop_process, wait_for_port
from trio_bus.transports._base import ConsumerSpec, TransportSettings
from trio_bus.transports._bridge import UNWIND_TIMEOUT
from trio_bus.transports.nats import (
    ConnectOptions,
    ConsumerOptions,
    NatsConsumer,
    NatsOptions,
    open_transport,
)
from trio_bus.transports.nats import resync as resync_module
from trio_bus.transports.nats.puller import Puller
from trio_bus.transports.nats.transport import CLOSE_TIMEOUT

from ._nats_server import NatsServer
from .helpers import collect_unclosed

WAIT = 60.0

# nats-py leaks the socket of a connection attempt that timed out (during a
# blackhole) and of a close cut short: ignore their ResourceWarnings here...
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*(StreamWriter|_SelectorTransport|socket.socket)"
    ":pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(autouse=True)
def collect_leaked_sockets() -> Iterator[None]:
    """... and collect them before the test ends, so that their warning is
    not blamed on a later test."""
    yield
    collect_unclosed()


#: ack_wait is long on purpose: a lost delivery that waited for it would run
#: long after later messages of its aggregate, so a missing resync fails.
OPTIONS = NatsOptions(
    consumer=ConsumerOptions(ack_wait=20.0, idle_heartbeat=0.25, pull_expires=5.0),
    connect=ConnectOptions(ping_interval=0.5, max_outstanding_pings=2, reconnect_time_wait=0.1),
    publish_timeout=1.0,
)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def proxied(server: NatsServer) -> AsyncIterator[FaultProxy]:
    async with trio.open_nursery() as nursery:
        proxy: FaultProxy = await nursery.start(FaultProxy("127.0.0.1", server.port).run)
        yield proxy
        nursery.cancel_scope.cancel()


@attrs.define
class Ledger:
    """What the handler saw, and the order checks."""

    handled: list[tuple[str, int]] = attrs.field(factory=list)
    acked: set[int] = attrs.field(factory=set)
    running: set[str] = attrs.field(factory=set)
    overlaps: int = 0
    _lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)

    def changed(self) -> None:
        self._lot.unpark_all()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._lot.park()

    async def handler(self, message: trio_bus.Message) -> None:
        aggregate = message.aggregate_id
        assert aggregate is not None
        if aggregate in self.running:
            self.overlaps += 1
        self.running.add(aggregate)
        try:
            await trio.lowlevel.checkpoint()
            self.handled.append((aggregate, int(message.value.split(b" ", 1)[0])))
        finally:
            self.running.discard(aggregate)
        self.changed()

    async def wait_all_acked_handled(self, timeout: float = WAIT) -> None:
        await self.wait_until(lambda: self.acked <= {v for _, v in self.handled}, timeout)

    def check(self) -> None:
        assert self.overlaps == 0
        latest: dict[str, int] = {}
        late: list[tuple[str, int, int, bool]] = []
        first: dict[str, list[int]] = defaultdict(list)
        seen: set[int] = set()
        for aggregate, value in self.handled:
            if value < latest.get(aggregate, -1):
                late.append((aggregate, value, latest[aggregate], value in seen))
            latest[aggregate] = max(value, latest.get(aggregate, -1))
            if value not in seen:
                seen.add(value)
                first[aggregate].append(value)
        assert not late, (
            "ran after a later message of its aggregate "
            f"(aggregate, value, latest before, ran before): {late[:10]}"
        )
        for aggregate, values in first.items():
            assert values == sorted(values), aggregate


async def publish_until_acked(
    bus: trio_bus.Bus, topic: str, i: int, aggregates: int, ledger: Ledger, timeout: float
) -> None:
    """Publish message *i*; a failure must be typed and come within the
    publish timeout (+ scheduling margin); then publish again."""
    with trio.fail_after(WAIT):
        while True:
            started = trio.current_time()
            try:
                await bus.publish(topic, b"%d" % i, key=f"agg-{i % aggregates}")
            except PublishError:
                assert trio.current_time() - started < timeout + 1.5
                continue
            ledger.acked.add(i)
            return


#: Padding so that a burst of deliveries fills the socket buffers: a reset
#: or a blackhole then loses deliveries in transit.
PAD = b" " + b"x" * 2048


async def publish_bulk(
    url: str,
    topic: str,
    values: range,
    aggregates: int,
    ledger: Ledger,
    *,
    after_batch: Callable[[int], None] = lambda _: None,
) -> None:
    """Publish *values* in batches of 100 from a bus of its own, straight to
    the server, so deliveries stream while the consumer's connection breaks;
    *after_batch(k)* runs after batch k was acked (deliveries in flight)."""
    async with trio_bus.open_bus(url, client_id="producer") as producer:
        for k, start in enumerate(range(values.start, values.stop, 100)):
            batch = range(start, min(start + 100, values.stop))
            await producer.publish_many(
                trio_bus.OutgoingMessage(
                    topic=topic, value=b"%d%s" % (i, PAD), key=f"agg-{i % aggregates}"
                )
                for i in batch
            )
            ledger.acked.update(batch)
            ledger.changed()
            after_batch(k)


async def test_connection_resets_keep_per_aggregate_order(nats_bus_url: str) -> None:
    """The backlog streams at the consumer (a large prefetch) while its
    connection is reset five times: deliveries in transit are lost, and
    must not run after later ones of their aggregate."""
    server_port = int(nats_bus_url.rsplit(":", 1)[1])
    topic = uid("t")
    n, aggregates = 2000, 50
    ledger = Ledger()
    options = attrs.evolve(OPTIONS, consumer=attrs.evolve(OPTIONS.consumer, prefetch=1000))
    await publish_bulk(nats_bus_url, topic, range(n), aggregates, ledger)
    async with trio.open_nursery() as nursery:
        proxy: FaultProxy = await nursery.start(FaultProxy("127.0.0.1", server_port).run)
        url = f"nats://127.0.0.1:{proxy.port}"

        async def resetter() -> None:
            # Five resets, each of a connection made since the previous one,
            # while the backlog streams.
            connection = 0
            for _ in range(5):
                mark = len(ledger.handled)
                await ledger.wait_until(
                    lambda: len(ledger.handled) >= mark + 100 and proxy.accepted > connection  # noqa: B023
                )
                connection = proxy.accepted
                proxy.reset()

        async with trio_bus.open_bus(
            url, transport_options=options, pool_size=64, client_id="svc"
        ) as bus:
            await bus.subscribe(topic, ledger.handler, start="earliest")
            nursery.start_soon(resetter)
            # More keeps coming while the resets happen (until all five did:
            # a fast consumer can finish a fixed backlog before the last).
            total = n
            for _ in range(20):
                await publish_bulk(nats_bus_url, topic, range(total, total + n), aggregates, ledger)
                total += n
                if proxy.resets == 5:
                    break
            await ledger.wait_all_acked_handled()
        nursery.cancel_scope.cancel()
    assert proxy.resets == 5
    assert ledger.acked == set(range(total))
    ledger.check()


@pytest.mark.parametrize(
    "short_resync",
    [pytest.param(False, id="defaults"), pytest.param(True, id="resync-short")],
)
async def test_blackhole_then_heal_keeps_order_and_loses_nothing(
    nats_bus_url: str, short_resync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the outage every partition resyncs (hundreds of redeliveries
    each). Found in a clean-clone run under load: a resync released what it
    held at its deadline while redeliveries were still coming, so they ran
    after newer messages of their aggregates. ``resync-short``: a resync
    deadline far shorter than the redeliveries take, as on a loaded
    machine: the pullers must ask again rather than release what they hold
    (the old code failed it every time)."""
    if short_resync:
        monkeypatch.setattr(resync_module, "RESYNC_TIMEOUT", 0.02)
        monkeypatch.setattr(resync_module, "RESYNC_ROUNDS", 10_000)
    server_port = int(nats_bus_url.rsplit(":", 1)[1])
    topic = uid("t")
    n, trickle, aggregates = 1500, 60, 20
    ledger = Ledger()
    async with trio.open_nursery() as nursery:
        proxy: FaultProxy = await nursery.start(FaultProxy("127.0.0.1", server_port).run)
        url = f"nats://127.0.0.1:{proxy.port}"
        async with trio_bus.open_bus(
            url, transport_options=OPTIONS, pool_size=32, client_id="svc"
        ) as bus:
            await bus.subscribe(topic, ledger.handler)

            def blackhole(k: int) -> None:
                if k == 3:
                    proxy.blackhole()

            nursery.start_soon(
                partial(publish_bulk, after_batch=blackhole),
                nats_bus_url,
                topic,
                range(n),
                aggregates,
                ledger,
            )
            await ledger.wait_until(lambda: proxy.blackholed)

            async def heal_later() -> None:
                await trio.sleep(10)  # the outage itself, not synchronisation
                proxy.heal()

            nursery.start_soon(heal_later)
            # Publishes through the blackholed connection: each waits for the
            # server's ack or fails typed within publish_timeout.
            for i in range(n, n + trickle):
                await publish_until_acked(
                    bus, topic, i, aggregates, ledger, OPTIONS.publish_timeout
                )
            await ledger.wait_until(lambda: len(ledger.acked) == n + trickle)
            await ledger.wait_all_acked_handled()
        nursery.cancel_scope.cancel()
    assert ledger.acked == set(range(n + trickle))
    ledger.check()


def settings(url: str, options: object | None = None) -> TransportSettings:
    return contract_settings(url, options=options)


async def test_close_is_bounded_while_blackholed(nats_bus_url: str) -> None:
    server = NatsServer.__new__(NatsServer)  # only for the port
    server.port = int(nats_bus_url.rsplit(":", 1)[1])
    topic = uid("t")
    bound = CLOSE_TIMEOUT + UNWIND_TIMEOUT + 1.0
    async with proxied(server) as proxy:
        started = 0.0
        with trio.fail_after(WAIT):
            async with open_transport(settings(f"nats://127.0.0.1:{proxy.port}", OPTIONS)) as t:
                consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
                other = await t.open_durable(ConsumerSpec(topic=topic, group="h"))
                records = trio_bus.OutgoingMessage(topic=topic, value=b"x", key="k")
                assert await t.publish_batch([records, records]) == [None, None]
                got = await consumer.fetch(10)
                assert got  # held unsettled: aclose has naks to send
                proxy.blackhole()
                began = trio.current_time()
                await consumer.aclose()
                assert trio.current_time() - began < bound
                del other  # closed by the transport's exit
                started = trio.current_time()
        assert trio.current_time() - started < bound
        proxy.heal()


async def checkpoint_handler(message: trio_bus.Message) -> None:
    await trio.lowlevel.checkpoint()


async def test_a_failing_loop_ends_open_bus_with_a_typed_error(
    nats_bus_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = uid("t")

    async def broken(self: Puller) -> None:
        raise RuntimeError("injected fault in the pull machinery")

    with trio.fail_after(WAIT), pytest.raises(TransportError) as caught:
        async with trio_bus.open_bus(nats_bus_url, transport_options=OPTIONS) as bus:
            await bus.subscribe(topic, checkpoint_handler)
            monkeypatch.setattr(Puller, "_maybe_pull", broken)
            await bus.publish(topic, b"wake the loop", key="k")
            await trio.sleep_forever()
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "injected" in str(caught.value)


AUTH = ("--user", "svc", "--pass", "secret")


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[str]:
    """A nats-server that wants user ``svc`` with password ``secret``."""
    port = free_port()
    log = tmp_path / "auth-nats.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [find_nats_server(), "-a", "127.0.0.1", "-p", str(port), *AUTH],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_port(proc, port, log)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


async def test_failed_login_names_the_cause_not_the_password(
    auth_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"nats://svc:hunter2@{auth_server}"
    with trio.fail_after(WAIT), pytest.raises(TransportUnavailableError) as caught:
        async with open_transport(settings(url, OPTIONS)):
            pass
    text = str(caught.value)
    assert "hunter2" not in text
    assert "svc:***@" in text
    assert "authorization violation" in text.lower()
    assert "hunter2" not in caplog.text
    for cause in (caught.value.__cause__, caught.value.__context__):
        assert cause is None or "hunter2" not in str(cause)


async def fetch_value(consumer: NatsConsumer, value: bytes) -> None:
    with trio.fail_after(WAIT):
        while True:
            for record in await consumer.fetch(10):
                consumer.ack(record)
                if record.value == value:
                    return


async def test_a_deleted_consumer_is_bound_again(nats_bus_url: str) -> None:
    topic = uid("t")
    message = trio_bus.OutgoingMessage(topic=topic, value=b"0", key="k")
    async with open_transport(settings(nats_bus_url, OPTIONS)) as t:
        consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
        assert await t.publish_batch([message]) == [None]
        await fetch_value(consumer, b"0")
        await consumer.flush()
        await t.run_on_loop(t._conn.jsm.delete_consumer, consumer.stream, consumer.durable)
        assert await t.publish_batch([attrs.evolve(message, value=b"1")]) == [None]
        await fetch_value(consumer, b"1")


async def test_a_stream_gone_for_good_ends_the_transport(nats_bus_url: str) -> None:
    topic = uid("t")
    async with open_transport(settings(nats_bus_url, OPTIONS)) as t:
        assert await t.publish_batch([trio_bus.OutgoingMessage(topic=topic, value=b"0")]) == [None]
    options = attrs.evolve(OPTIONS, topic_strategy="validate_only")
    with trio.fail_after(WAIT), pytest.raises(TopicConfigError, match="does not exist"):
        async with open_transport(settings(nats_bus_url, options)) as t:
            consumer = await t.open_durable(ConsumerSpec(topic=topic, group="g"))
            await t.run_on_loop(t._conn.jsm.delete_stream, consumer.stream)
            await trio.sleep_forever()
