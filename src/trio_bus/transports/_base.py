"""The small interface every transport implements.

Three operations carry everything: publish a batch, fetch a batch, settle
(ack / release) deliveries. A partitioned log (Kafka: settle moves a
per-partition watermark over contiguous finished offsets) and a per-message
ack stream (NATS JetStream, the memory transport) both fit it.

Rules for implementers:

* ``publish_batch`` returns only when the broker has answered for every
  record of the batch, with one outcome per record, in order: None when the
  broker durably accepted it, else a :class:`~trio_bus.errors.PublishError`
  (:class:`~trio_bus.errors.PublishOutcomeUnknownError` when no answer came
  in time). It raises only when the whole transport is unusable. Cross the
  trio-asyncio bridge once per batch. Transports with a per-call cost set
  ``coalesce_publishes = True`` and the bus merges concurrent
  ``publish()`` calls into shared batches for them.
* ``Consumer.fetch`` waits for at least one delivery and returns up to
  ``max_records``; one bridge crossing per call.
* ``ack`` and ``release`` are synchronous and cheap: they record the outcome;
  the transport sends acks/commits in batches (``flush``, and on its own
  schedule). ``release`` means "not handled: deliver again as soon as
  possible" (NATS: nak without delay; Kafka: do not commit past it).
* ``Consumer.aclose`` releases every delivery not acked and leaves the
  group; it must be safe to call from a shielded scope while cancelled.

The contract, checked on every transport by :mod:`trio_bus.testing.contract`
(test ``test_rNN_*`` checks rule NN; a third-party transport runs the same
suite). A *lane* is the unit of order: a Kafka partition (one key stays in
one), else the whole consumer. Where a broker legitimately differs, the
transport declares it in :class:`~trio_bus.testing.contract.Capabilities`.
Every test also checks that nothing was left unclosed once the transport's
context exited.

1. ``publish_batch`` gives one outcome per record, in order; None means the
   record is stored (a consumer can fetch it). An empty batch gives ``[]``.
2. Within a lane a record published later is fetched later, across batches
   too. ``fetch`` waits for a delivery and returns 1..max_records.
3. A new group starts at ``"latest"`` (only what is published after
   ``open_consumer`` returned) or ``"earliest"`` (the retained log).
4. An existing group ignores ``start``: it resumes after what it acked, and
   what it did not ack comes again.
5. ``fetch`` is cancel-atomic: it returns deliveries or raises Cancelled
   having taken none. However often fetches are cancelled, every record
   still comes exactly once before any redelivery.
6. Settling is idempotent: a second ack or release of a record, or a release
   after its ack, changes nothing.
7. A released record comes again before newer records of its lane, without
   waiting for ``flush``. Without ``per_message_ack`` (a partitioned log) the
   lane rewinds to it: settled records after it come again too.
8. ``aclose`` releases everything unsettled (the group's next consumer gets
   it first), works in a shielded scope while cancelled, may be repeated;
   ``fetch`` afterwards raises :class:`~trio_bus.errors.BusClosedError`.
9. ``flush`` returns once acks are on the broker: a member joining later, on
   another connection, is not given acked records.
10. A cancelled ``open_consumer`` leaves nothing behind: no group member, no
    task still running once it raised, no unclosed socket; a later open of
    the group gets every record.
11. Every group gets every record; the members of one group share them, each
    record going to one member.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Literal, Protocol, TypeVar

import attrs
import trio

from .._exceptions import unwrap_lone_exception
from .._message import OutgoingMessage, Record
from .._topics import PersistencePolicy, TopicDescription, TopicRequest
from ..errors import TopicConfigError

__all__ = [
    "HEALTH_TOPIC",
    "Consumer",
    "ConsumerSpec",
    "LaneState",
    "Transport",
    "TransportFactory",
    "TransportSettings",
]

StartPosition = Literal["latest", "earliest"]

#: The topic health probes travel on by default (``Monitoring.probe_topic``).
#: Broker transports give it small, short-lived storage unless the options
#: configure it explicitly: probes must not pile up.
HEALTH_TOPIC = "trio-bus.health"
#: Seconds a probe message is kept, and how many are kept at most.
HEALTH_MAX_AGE = 60.0
HEALTH_MAX_MESSAGES = 1000


@attrs.frozen(kw_only=True)
class TransportSettings:
    """What the bus tells a transport when opening it.

    Attributes:
        url: The full bus URL, e.g. ``"kafka://127.0.0.1:9092,127.0.0.1:9093"``.
        hosts: The ``host:port`` list parsed from the URL (empty for memory).
        client_id: The bus's client id (default consumer group, client name).
        options: The transport-specific options object passed to
            ``open_bus(transport_options=...)``, or None for defaults.
        max_message_bytes: Largest body the bus accepts.
        persistence: Each topic's persistence mode (see
            :mod:`trio_bus._topics`); transports without storage-less
            delivery may treat every mode as ``"persistent"``.
    """

    url: str
    hosts: tuple[str, ...]
    client_id: str
    options: object | None
    max_message_bytes: int
    persistence: PersistencePolicy = attrs.field(factory=PersistencePolicy)


@attrs.frozen(kw_only=True)
class ConsumerSpec:
    """One subscription as a transport sees it.

    Attributes:
        topic: Validated topic name.
        group: Consumer group: members share the work; groups each get all.
        start: Where a *new* group starts; an existing group resumes from
            where it acked/committed.
        max_batch: Upper bound on one ``fetch``.
    """

    topic: str
    group: str
    start: StartPosition = "latest"
    max_batch: int = 500
    #: The group is private to this consumer and its state should not
    #: outlive it (health probes): no durable broker state where avoidable.
    ephemeral: bool = False


@attrs.frozen(kw_only=True)
class LaneState:
    """Progress of one lane: a Kafka partition, or a whole NATS/memory
    consumer. Fields a transport cannot tell are None.

    Attributes:
        topic: The topic.
        partition: Kafka partition, else None.
        committed: Kafka committed offset; NATS ack floor (stream sequence);
            memory ack floor (log index). Stall detection watches it.
        lag: Messages of the lane not yet committed/acked by the group
            (Kafka: end offset - committed; NATS: pending; memory: pending).
        ack_pending: Delivered and not yet acked (NATS, memory).
        in_flight: Deliveries this consumer holds unsettled.
    """

    topic: str
    partition: int | None = None
    committed: int | None = None
    lag: int | None = None
    ack_pending: int | None = None
    in_flight: int = 0


class Consumer(abc.ABC):
    """The consuming side of one subscription."""

    @abc.abstractmethod
    async def fetch(self, max_records: int) -> Sequence[Record]:
        """Wait for deliveries and return 1..max_records of them."""

    @abc.abstractmethod
    def ack(self, record: Record) -> None:
        """The handler finished (or the record was dead-lettered)."""

    @abc.abstractmethod
    def release(self, record: Record) -> None:
        """The record was not handled; have it delivered again."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Send pending acks/commits/naks now."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release what is unsettled, flush, leave the group."""

    async def lanes(self) -> Sequence[LaneState]:
        """Progress per lane, for metrics, backlog and stall detection.

        May ask the broker (one bridge crossing); called every few seconds.
        """
        return ()


class Transport(abc.ABC):
    """A connection to one broker (or the embedded memory broker)."""

    #: Scheme name, used in metrics and errors.
    name: str
    #: Whether the bus should merge concurrent publishes into one batch.
    coalesce_publishes: bool = False

    @property
    def connected(self) -> bool:
        """Whether the connection to the broker is up right now."""
        return True

    @property
    def problem(self) -> str | None:
        """Why the transport is failing in a way waiting will not mend (e.g.
        the broker refuses its credentials), for health reports; never a
        secret. None when there is none."""
        return None

    @abc.abstractmethod
    async def publish_batch(self, records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
        """Publish *records* in order; return one outcome per record once the
        broker has answered for all of them (None = durably stored)."""

    @abc.abstractmethod
    async def open_consumer(self, spec: ConsumerSpec) -> Consumer:
        """Join *spec.group* on *spec.topic*; return once deliveries can flow
        (the group is joined and positions are assigned)."""

    # Topic administration (``bus.topics``). Optional: a transport that
    # cannot do it says so with a TopicConfigError.

    async def configure_topic(self, topic: str, request: TopicRequest) -> TopicDescription:
        """Create or update *topic* as *request* says (the transport's
        strategy and mismatch action unless it overrides them); remember its
        options and persistence for later use; describe the result."""
        raise TopicConfigError(f"the {self.name} transport cannot configure topics")

    async def describe_topic(self, topic: str) -> TopicDescription:
        """The broker's view of *topic*."""
        raise TopicConfigError(f"the {self.name} transport cannot describe topics")

    async def list_topics(self) -> Sequence[str]:
        """The topics the broker stores."""
        raise TopicConfigError(f"the {self.name} transport cannot list topics")

    async def open_consumers(self, specs: Sequence[ConsumerSpec]) -> Sequence[Consumer]:
        """Open a consumer per spec, in order; return once all are live. On
        failure or cancellation none is left open.

        This default opens them concurrently with :meth:`open_consumer`. A
        transport where each subscription costs a group-wide step (Kafka: a
        rebalance) overrides it to take that step once for all of them.
        """

        async def open_one(i: int, spec: ConsumerSpec, opened: dict[int, Consumer]) -> None:
            opened[i] = await self.open_consumer(spec)

        return await open_all(
            len(specs), [functools.partial(open_one, i, spec) for i, spec in enumerate(specs)]
        )


C = TypeVar("C", bound=Consumer)


async def open_all(
    count: int, jobs: Iterable[Callable[[dict[int, C]], Awaitable[None]]]
) -> list[C]:
    """Run *jobs* concurrently, each putting the consumers it opened into
    the shared dict by index; return the *count* consumers in index order.

    All or none: on failure or cancellation every consumer opened so far is
    closed (shielded) before the error propagates.
    """
    opened: dict[int, C] = {}
    try:
        with unwrap_lone_exception():
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(job, opened)
    except BaseException:
        with trio.CancelScope(shield=True):
            for consumer in opened.values():
                await consumer.aclose()
        raise
    return [opened[i] for i in range(count)]


class TransportFactory(Protocol):
    """``open_transport(settings)``: an async context manager owning every
    task, thread and socket of the transport; leaving it closes them all."""

    def __call__(self, settings: TransportSettings) -> AbstractAsyncContextManager[Transport]: ...
