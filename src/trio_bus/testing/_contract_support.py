"""What the transport contract suite (:mod:`trio_bus.testing.contract`) is
given and uses: the target description and each test's helpers."""

from __future__ import annotations

import gc
import sys
import traceback
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from .._message import OutgoingMessage, Record
from ..transports import parse_url, resolve
from ..transports._base import (
    Consumer,
    ConsumerSpec,
    StartPosition,
    Transport,
    TransportFactory,
    TransportSettings,
)

__all__ = ["DEFAULT_WAIT", "Capabilities", "ContractTarget", "contract_settings"]

#: Default bound, in seconds, on any one wait of the suite.
DEFAULT_WAIT = 30.0


@attrs.frozen(kw_only=True)
class Capabilities:
    """Where a broker legitimately differs; the suite checks the variant.

    Attributes:
        per_message_ack: Each delivery is settled on its own (NATS, memory).
            False for a partitioned log: releasing a record rewinds its lane
            to it, so settled records after it come again too (Kafka).
        delivery_count: Records carry ``delivery_count`` (1, then 2 when
            delivered again). False: it is None.
        partitions: Lanes are partitions (``Record.partition`` set, records
            of one key stay in one lane); False: the consumer is one lane.
    """

    per_message_ack: bool = True
    delivery_count: bool = True
    partitions: bool = False


def _check_defects(_: object, __: attrs.Attribute[Any], value: Mapping[str, str]) -> None:
    from .contract import _rule_tests  # the suite's own module imports this one

    unknown = set(value) - set(_rule_tests())
    if unknown:
        raise ValueError(f"known_defects names no contract test: {sorted(unknown)}")


@attrs.frozen(kw_only=True)
class ContractTarget:
    """The transport under test, as one test of the suite opens it.

    Attributes:
        open_transport: The transport's ``open_transport(settings)``.
        settings: Settings for it; every test opens one or more transports
            with them, all on the same broker.
        capabilities: Its :class:`Capabilities`.
        known_defects: Test name -> defect, for rules the transport breaks
            today: those tests are expected to fail (strict xfail), so a fix
            shows up as an unexpected pass.
        not_run: Known defects whose test would disturb later tests (what
            it leaks outlives it): marked xfail without running.
        wait: Bound, in seconds, on any one wait of a test.
    """

    open_transport: TransportFactory
    settings: TransportSettings
    capabilities: Capabilities = attrs.field(factory=Capabilities)
    known_defects: Mapping[str, str] = attrs.field(factory=dict, validator=_check_defects)
    not_run: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    wait: float = DEFAULT_WAIT

    def __attrs_post_init__(self) -> None:
        if not self.not_run <= set(self.known_defects):
            raise ValueError("not_run names tests missing from known_defects")

    @classmethod
    def from_url(cls, url: str, *, options: object | None = None, **fields: Any) -> ContractTarget:
        """A target for a built-in transport, found by the URL's scheme;
        *fields* are the other attributes (``capabilities``...)."""
        scheme, _ = parse_url(url)
        settings = contract_settings(url, options=options)
        return cls(open_transport=resolve(scheme), settings=settings, **fields)


def contract_settings(url: str, *, options: object | None = None) -> TransportSettings:
    """:class:`TransportSettings` for *url* with a fresh client id; the
    ``host:port`` list is what follows ``scheme://`` up to ``/`` or ``?``."""
    netloc = url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    return TransportSettings(
        url=url,
        hosts=tuple(h for h in netloc.split(",") if h),
        client_id=_uid("contract"),
        options=options,
        max_message_bytes=1 << 20,
    )


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _values(records: Sequence[Record]) -> list[bytes]:
    return [r.value for r in records]


def _task_count() -> int:
    """Tasks of this trio run (a transport's background tasks among them)."""

    def count(task: trio.lowlevel.Task) -> int:
        nurseries = task.child_nurseries
        return 1 + sum(count(child) for n in nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


def _clear_frames(exc: BaseException | None, seen: set[int] | None = None) -> None:
    """Drop the locals of every frame in *exc*'s tracebacks, chained and
    grouped exceptions included."""
    seen = set() if seen is None else seen
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    if exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)
    for inner in (exc.__cause__, exc.__context__, *getattr(exc, "exceptions", ())):
        _clear_frames(inner, seen)


def _collect_leaks() -> list[str]:
    """Run the garbage collector; return what objects dropped unclosed said
    (ResourceWarnings from ``__del__``, which Python ignores by default)."""
    leaks: list[str] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: leaks.append(repr(unraisable.exc_value))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            while gc.collect():  # finalizers may free more
                pass
    finally:
        sys.unraisablehook = hook
    return leaks


@attrs.define(eq=False)
class _Case:
    """One test's view of the target: fresh names and bounded helpers."""

    target: ContractTarget
    topic: str = attrs.Factory(lambda: _uid("contract-t"))

    @asynccontextmanager
    async def transport(self) -> AsyncIterator[Transport]:
        async with self.target.open_transport(self.target.settings) as transport:
            yield transport

    def spec(self, group: str, start: StartPosition = "latest") -> ConsumerSpec:
        return ConsumerSpec(topic=self.topic, group=group, start=start, max_batch=100)

    def msgs(self, *labels: str | int, keys: int = 1) -> list[OutgoingMessage]:
        """Records labelled *labels*; label ``i`` gets key ``k{i % keys}``,
        a text label key ``k0``."""
        return [
            OutgoingMessage(
                topic=self.topic,
                value=str(label).encode(),
                key=f"k{label % keys if isinstance(label, int) else 0}",
            )
            for label in labels
        ]

    async def publish(self, transport: Transport, *labels: str | int, keys: int = 1) -> None:
        outcomes = await transport.publish_batch(self.msgs(*labels, keys=keys))
        assert list(outcomes) == [None] * len(labels), outcomes

    async def fetch(
        self,
        consumer: Consumer,
        until: Callable[[list[Record]], bool],
        *,
        ack: bool = True,
        max_records: int = 100,
    ) -> list[Record]:
        """Fetch (acking unless told not to) until *until(received)*."""
        got: list[Record] = []
        try:
            with trio.fail_after(self.target.wait):
                while not until(got):
                    batch = await consumer.fetch(max_records)
                    assert 1 <= len(batch) <= max_records, f"fetch returned {len(batch)}"
                    for record in batch:
                        if ack:
                            consumer.ack(record)
                    got.extend(batch)
        except trio.TooSlowError:
            pytest.fail(f"timed out after {self.target.wait} s; got {_values(got)}")
        return got

    async def fetch_to(self, consumer: Consumer, last: str | int, **kw: Any) -> list[Record]:
        """Fetch until the record labelled *last* arrives."""
        want = str(last).encode()
        return await self.fetch(consumer, lambda got: want in _values(got), **kw)

    def redelivered(self, record: Record) -> None:
        """Check *record* says it comes a second time, where it can say."""
        if self.target.capabilities.delivery_count:
            assert record.delivery_count == 2, (record.value, record.delivery_count)


def _b(*labels: str | int) -> list[bytes]:
    return [str(label).encode() for label in labels]
