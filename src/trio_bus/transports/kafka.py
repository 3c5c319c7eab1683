"""The Kafka transport: ``kafka://host:port[,host:port...]``.

aiokafka runs on the bus's own asyncio loop (trio-asyncio, see
:mod:`._bridge`); everything that touches aiokafka runs on that side, and
the Trio side only crosses the bridge once per batch:

* **publish**: one crossing per batch; on the asyncio side every record is
  ``send()``-ed (pipelined, key = aggregate ID so an aggregate stays in one
  partition) and the delivery futures are awaited together.
* **consume**: one ``AIOKafkaConsumer`` per consumer *group* covers every
  topic subscribed in that group (the seed system's "unified consumer").
  Its poll loop (an asyncio task) calls ``getmany`` and appends records to
  the per-subscription buffers, waking the Trio fetcher with a
  ``trio.Event`` -- no crossing at all on the hot consume path, since
  trio-asyncio runs both loops in one thread.
* **commit**: ``ack``/``release`` are plain bookkeeping on a
  :class:`~._kafka_offsets.PartitionTrack`; a commit task sends the
  contiguous finished prefix of every partition each ``commit_interval``,
  and on ``flush``/``aclose``/revocation. Nothing is committed past an
  unfinished offset.

Kafka defaults that lose data are overridden: ``acks="all"``, idempotence
where the broker supports it, auto-commit off, offsets for new groups
resolved explicitly. See docs/kafka.md for the design and for where the
Tansu broker used in the tests differs from Apache Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import parse_qsl

import attrs
import trio

try:
    import aiokafka
    import aiokafka.errors as kafka_errors
    from aiokafka import TopicPartition
    from aiokafka.abc import ConsumerRebalanceListener
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
except ImportError as exc:  # pragma: no cover - depends on the install
    from ..errors import MissingExtraError

    raise MissingExtraError(
        f'the kafka transport needs aiokafka: pip install "trio-bus[kafka]" ({exc})'
    ) from exc

from .._config import positive as _positive
from .._exceptions import unwrap_lone_exception
from .._message import OutgoingMessage, Record
from ..errors import (
    BusClosedError,
    ConfigError,
    PublishError,
    PublishOutcomeUnknownError,
    TopicConfigError,
    TransportError,
    TransportUnavailableError,
)
from ._base import (
    Consumer,
    ConsumerSpec,
    LaneState,
    StartPosition,
    Transport,
    TransportSettings,
)
from ._bridge import Bridge, open_bridge
from ._kafka_offsets import PartitionTrack

__all__ = ["KafkaOptions", "KafkaTransport", "TopicConfig", "open_transport"]

logger = logging.getLogger("trio_bus.transports.kafka")

Compression = Literal["lz4", "zstd", "snappy", "gzip", "none"]
TopicStrategy = Literal["create_only", "create_or_update", "validate_only", "skip"]
MismatchAction = Literal["warn", "fail"]

#: Partitions of a topic the transport creates (enough for 8-way concurrency
#: across consumers of one group; never increased silently afterwards).
DEFAULT_PARTITIONS = 8
#: Producer linger: small, so a lone publish leaves within a few ms.
DEFAULT_LINGER_MS = 2
DEFAULT_MAX_BATCH_SIZE = 256 * 1024
#: Broker-side wait for an idle fetch. aiokafka's 500 ms default delays the
#: first message of a burst by up to that much (Tansu answers idle fetches
#: late); 10 ms gave 10-18 ms first-message latency.
DEFAULT_FETCH_MAX_WAIT_MS = 10
DEFAULT_MAX_POLL_RECORDS = 1000
DEFAULT_SESSION_TIMEOUT_MS = 10_000
DEFAULT_HEARTBEAT_INTERVAL_MS = 1_000
#: Seconds between periodic commits of finished offsets.
DEFAULT_COMMIT_INTERVAL = 0.5
#: Unsettled records per partition / per group before partitions pause.
DEFAULT_MAX_UNSETTLED_PER_PARTITION = 2_000
DEFAULT_MAX_UNSETTLED = 20_000
#: Seconds a revocation waits for in-flight handlers of revoked partitions.
DEFAULT_REBALANCE_GRACE = 10.0
#: Seconds open_consumer waits for the group join and assignment.
DEFAULT_JOIN_TIMEOUT = 60.0
#: Seconds a publish waits for the broker's answer before reporting an
#: unknown outcome.
DEFAULT_PUBLISH_TIMEOUT = 30.0
#: Seconds between checks of the broker connection (``connected``).
CONNECTION_CHECK_INTERVAL = 1.0
#: Seconds the shielded close of clients may take.
DEFAULT_CLOSE_TIMEOUT = 5.0

# Broker error codes seen in admin responses.
_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC = 3


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{attribute.name} must be a number >= 0, got {value!r}")


def _one_of(*choices: object) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            raise ConfigError(f"{attribute.name} must be one of {choices!r}, got {value!r}")

    return check


def _optional_positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _positive(_, attribute, value)


@attrs.frozen(kw_only=True)
class TopicConfig:
    """How a topic should look on the broker.

    Attributes:
        partitions: Partition count used when creating the topic, and
            checked against existing topics (never increased silently).
        replication_factor: Replicas per partition.
        retention_ms: ``retention.ms`` topic config, or None to leave the
            broker's default alone.
        configs: Further topic configs (``cleanup.policy``...), as strings.
    """

    partitions: int = attrs.field(default=DEFAULT_PARTITIONS, validator=_positive)
    replication_factor: int = attrs.field(default=1, validator=_positive)
    retention_ms: int | None = attrs.field(default=None, validator=_optional_positive)
    configs: Mapping[str, str] = attrs.field(factory=dict)

    def all_configs(self) -> dict[str, str]:
        """Topic configs to set, ``retention.ms`` included."""
        out = dict(self.configs)
        if self.retention_ms is not None:
            out["retention.ms"] = str(self.retention_ms)
        return out


@attrs.frozen(kw_only=True)
class KafkaOptions:
    """Options of the Kafka transport (``open_bus(transport_options=...)``).

    Numeric fields may also be given in the URL query, e.g.
    ``kafka://h:9092?session_timeout_ms=2000&linger_ms=0``; the URL wins.

    Attributes:
        acks: Producer acks; ``"all"`` (default) waits for every in-sync
            replica. ``1`` or ``0`` trade durability for latency.
        idempotence: ``"auto"`` (default) turns the idempotent producer on
            when the broker supports it and logs a warning when it does not;
            True requires it (ConfigError otherwise); False turns it off.
        compression: ``lz4`` (default), ``zstd``, ``snappy``, ``gzip`` or
            ``none``.
        linger_ms: How long the producer waits to fill a batch.
        max_batch_size: Bytes per partition batch.
        publish_timeout: Seconds a publish waits for the broker's answer;
            past it the outcome is reported unknown.
        fetch_max_wait_ms: Broker-side wait for an idle fetch.
        max_poll_records: Records per ``getmany``.
        session_timeout_ms: Group session timeout (a dead consumer's
            partitions move after it). Tansu also holds a new member's
            JoinGroup for about half of it.
        heartbeat_interval_ms: Heartbeat period (well under the session).
        max_poll_interval_ms: Upper bound between polls (the poll loop runs
            on its own, so this only catches a stuck loop).
        commit_interval: Seconds between periodic commits.
        max_unsettled_per_partition: Fetched, unsettled records of one
            partition before it is paused.
        max_unsettled: Same for the whole group consumer.
        rebalance_grace: Seconds a revocation waits for in-flight handlers
            of the revoked partitions before giving them up uncommitted.
        join_timeout: Seconds ``subscribe`` waits for the group to assign.
        close_timeout: Seconds the shielded close of clients may take.
        topic: Default :class:`TopicConfig` for every topic.
        topics: Per-topic :class:`TopicConfig` overriding ``topic``.
        topic_strategy: ``create_only`` (default: create missing topics,
            check existing ones), ``create_or_update`` (also update configs
            such as retention; never partitions), ``validate_only`` (only
            check) or ``skip`` (no admin calls).
        on_mismatch: ``warn`` (log) or ``fail`` (raise TopicConfigError)
            when a topic's real metadata differs from its config.
        security_protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or
            ``SASL_SSL`` (passed to aiokafka).
        ssl_context: TLS context for ``SSL``/``SASL_SSL``.
        sasl_mechanism: ``PLAIN``, ``SCRAM-SHA-256``, ``SCRAM-SHA-512``...
        sasl_plain_username: SASL user.
        sasl_plain_password: SASL password.
        client_args: Further keyword arguments for every aiokafka client
            (producer, consumers, admin), for what this class does not name.
        producer_args: Further keyword arguments for ``AIOKafkaProducer``.
        consumer_args: Further keyword arguments for ``AIOKafkaConsumer``
            (``max_partition_fetch_bytes``, ``isolation_level``...).
    """

    acks: Literal["all", 1, 0] = attrs.field(default="all", validator=_one_of("all", 1, 0))
    idempotence: Literal["auto"] | bool = attrs.field(
        default="auto", validator=_one_of("auto", True, False)
    )
    compression: Compression = attrs.field(
        default="lz4", validator=_one_of("lz4", "zstd", "snappy", "gzip", "none")
    )
    linger_ms: int = attrs.field(default=DEFAULT_LINGER_MS, validator=_non_negative)
    max_batch_size: int = attrs.field(default=DEFAULT_MAX_BATCH_SIZE, validator=_positive)
    publish_timeout: float = attrs.field(default=DEFAULT_PUBLISH_TIMEOUT, validator=_positive)
    fetch_max_wait_ms: int = attrs.field(default=DEFAULT_FETCH_MAX_WAIT_MS, validator=_non_negative)
    max_poll_records: int = attrs.field(default=DEFAULT_MAX_POLL_RECORDS, validator=_positive)
    session_timeout_ms: int = attrs.field(default=DEFAULT_SESSION_TIMEOUT_MS, validator=_positive)
    heartbeat_interval_ms: int = attrs.field(
        default=DEFAULT_HEARTBEAT_INTERVAL_MS, validator=_positive
    )
    max_poll_interval_ms: int = attrs.field(default=300_000, validator=_positive)
    commit_interval: float = attrs.field(default=DEFAULT_COMMIT_INTERVAL, validator=_positive)
    max_unsettled_per_partition: int = attrs.field(
        default=DEFAULT_MAX_UNSETTLED_PER_PARTITION, validator=_positive
    )
    max_unsettled: int = attrs.field(default=DEFAULT_MAX_UNSETTLED, validator=_positive)
    rebalance_grace: float = attrs.field(default=DEFAULT_REBALANCE_GRACE, validator=_non_negative)
    join_timeout: float = attrs.field(default=DEFAULT_JOIN_TIMEOUT, validator=_positive)
    close_timeout: float = attrs.field(default=DEFAULT_CLOSE_TIMEOUT, validator=_positive)
    topic: TopicConfig = attrs.field(factory=TopicConfig)
    topics: Mapping[str, TopicConfig] = attrs.field(factory=dict)
    topic_strategy: TopicStrategy = attrs.field(
        default="create_only",
        validator=_one_of("create_only", "create_or_update", "validate_only", "skip"),
    )
    on_mismatch: MismatchAction = attrs.field(default="warn", validator=_one_of("warn", "fail"))
    security_protocol: str = attrs.field(
        default="PLAINTEXT",
        validator=_one_of("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: str = "PLAIN"
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = attrs.field(default=None, repr=False)
    client_args: Mapping[str, Any] = attrs.field(factory=dict)
    producer_args: Mapping[str, Any] = attrs.field(factory=dict)
    consumer_args: Mapping[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ConfigError("heartbeat_interval_ms must be below session_timeout_ms")
        if self.acks != "all" and self.idempotence is True:
            raise ConfigError('idempotence=True needs acks="all"')

    def topic_config(self, topic: str) -> TopicConfig:
        """The configuration that applies to *topic*."""
        return self.topics.get(topic, self.topic)


#: Options settable in the URL query, with their converters.
_URL_FIELDS: dict[str, Callable[[str], int | float]] = {
    f.name: int if str(f.type) == "int" else float
    for f in attrs.fields(KafkaOptions)
    if str(f.type) in ("int", "float")
}


def resolve_options(settings: TransportSettings) -> KafkaOptions:
    """The effective options: ``settings.options`` (None: defaults) with the
    URL query's numeric overrides applied."""
    options = settings.options
    if options is None:
        options = KafkaOptions()
    elif not isinstance(options, KafkaOptions):
        raise ConfigError(f"the kafka transport takes KafkaOptions, got {type(options).__name__}")
    query = settings.url.split("?", 1)[1] if "?" in settings.url else ""
    overrides: dict[str, Any] = {}
    for name, raw in parse_qsl(query, keep_blank_values=True):
        kind = _URL_FIELDS.get(name)
        if kind is None:
            raise ConfigError(f"unknown kafka URL parameter {name!r}; known: {sorted(_URL_FIELDS)}")
        try:
            overrides[name] = kind(raw)
        except ValueError:
            raise ConfigError(f"kafka URL parameter {name}={raw!r} is not a number") from None
    return attrs.evolve(options, **overrides) if overrides else options


def _client_kwargs(options: KafkaOptions, hosts: Sequence[str], client_id: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "bootstrap_servers": list(hosts),
        "client_id": client_id,
        "security_protocol": options.security_protocol,
        "ssl_context": options.ssl_context,
        "sasl_mechanism": options.sasl_mechanism,
        "sasl_plain_username": options.sasl_plain_username,
        "sasl_plain_password": options.sasl_plain_password,
    }
    kwargs.update(options.client_args)
    return kwargs


_UNKNOWN_OUTCOME = (
    kafka_errors.KafkaTimeoutError,
    kafka_errors.RequestTimedOutError,
    kafka_errors.NotEnoughReplicasAfterAppendError,
    kafka_errors.KafkaConnectionError,
)


def _publish_error(exc: BaseException, topic: str) -> PublishError:
    """Map an aiokafka delivery failure to trio_bus's error, chained."""
    cls = PublishOutcomeUnknownError if isinstance(exc, _UNKNOWN_OUTCOME) else PublishError
    err = cls(f"publish to {topic!r} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _transport_error(exc: BaseException, what: str) -> TransportError:
    cls = (
        TransportUnavailableError
        if isinstance(exc, kafka_errors.KafkaConnectionError | OSError)
        else TransportError
    )
    err = cls(f"{what}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _decode_headers(raw: Sequence[tuple[str, bytes | None]]) -> dict[str, str]:
    return {
        name: (value.decode("utf-8", "replace") if value is not None else "") for name, value in raw
    }


class _Subscription(Consumer):
    """One subscription's view of its group's consumer."""

    def __init__(self, group: _Group, spec: ConsumerSpec) -> None:
        self._group = group
        self.spec = spec
        self.topic = spec.topic
        # Records fetched for this subscription and not handed out yet.
        self.buffer: deque[Record] = deque()
        self._ready: trio.Event | None = None
        self.closed = False
        # Handed out and not settled; released on close.
        self._held: set[Record] = set()

    def wake(self) -> None:
        """Wake a waiting fetch (called from the asyncio poll loop)."""
        ready = self._ready
        if ready is not None:
            self._ready = None
            ready.set()

    async def fetch(self, max_records: int) -> Sequence[Record]:
        """Wait for records of this subscription; return up to *max_records*."""
        group = self._group
        while True:
            if self.closed:
                raise BusClosedError("subscription closed")
            if group.error is not None:
                raise _transport_error(group.error, f"consumer group {group.name!r} failed")
            out = self._take(max_records)
            if out:
                await trio.lowlevel.checkpoint()
                return out
            ready = self._ready = trio.Event()
            await ready.wait()

    def _take(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        buffer, held = self.buffer, self._held
        while buffer and len(out) < max_records:
            record = buffer.popleft()
            track = record.token
            assert isinstance(track, PartitionTrack)
            if not track.live or track.revoking:
                continue  # its partition moved on; the next owner gets it
            track.handed_out += 1
            held.add(record)
            out.append(record)
        return out

    def ack(self, record: Record) -> None:
        """Mark *record* finished; its partition's commit point may pass it."""
        if record in self._held:
            self._held.discard(record)
            self._group.settle(record, finished=True)

    def release(self, record: Record) -> None:
        """Mark *record* not handled: never committed past; redelivered."""
        if record in self._held:
            self._held.discard(record)
            self._group.settle(record, finished=False)

    async def lanes(self) -> Sequence[LaneState]:
        """Per assigned partition of this topic: committed offset, lag (the
        last fetch's high watermark minus committed) and records with
        handlers. Reads local state only: no bridge crossing."""
        await trio.lowlevel.checkpoint()
        group = self._group
        consumer = group.consumer
        out: list[LaneState] = []
        for tp, track in sorted(group.tracks.items()):
            if tp.topic != self.topic or consumer is None:
                continue
            highwater = consumer.highwater(tp)
            out.append(
                LaneState(
                    topic=tp.topic,
                    partition=tp.partition,
                    committed=track.committed,
                    lag=max(0, highwater - track.committed) if highwater is not None else None,
                    in_flight=track.handed_out,
                )
            )
        return out

    async def flush(self) -> None:
        """Commit the finished prefix of every partition of the group now."""
        await self._group.transport.bridge.call(self._group.commit)

    async def aclose(self) -> None:
        """Release unsettled records, commit the finished prefix and leave
        the group when this was its last subscription. Shield-safe, bounded
        by ``close_timeout``."""
        if self.closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self.closed = True
        self.wake()
        for record in list(self._held):
            self.release(record)
        self.buffer.clear()
        group = self._group
        with trio.move_on_after(group.options.close_timeout) as scope:
            scope.shield = True
            try:
                await group.transport.bridge.call(group.remove, self)
            except Exception:
                logger.exception("closing the subscription to %r failed", self.topic)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, group: _Group) -> None:
        self._group = group

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._group.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._group.on_assigned(set(assigned))


class _Group:
    """One consumer group: one aiokafka consumer for all of its topics.

    Lives on the asyncio side; the Trio side only calls the synchronous
    :meth:`settle` (through ``ack``/``release``) and reads buffers.
    """

    def __init__(self, transport: KafkaTransport, name: str, *, ephemeral: bool = False) -> None:
        self.transport = transport
        # A private, throw-away group (health probes): commit nothing.
        self.ephemeral = ephemeral
        self.options = transport.options
        self.name = name
        self.routes: dict[str, list[_Subscription]] = {}
        self._starts: dict[str, StartPosition] = {}
        self.tracks: dict[TopicPartition, PartitionTrack] = {}
        self.error: BaseException | None = None
        self._unsettled = 0
        self._paused_all = False
        self._consumer: Any = None
        self._listener = _Listener(self)
        self._tasks: list[asyncio.Task[None]] = []
        self._wake: asyncio.Future[None] | None = None
        self._revoke_wait: asyncio.Future[None] | None = None
        self._commit_lock = asyncio.Lock()
        # Group-join bookkeeping: subscribe() bumps _sub_seq; a join that
        # started (revoke callback) after it carries the new topic set.
        self._sub_seq = 0
        self._prepare_seq = 0
        self._assign_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._stopped = False
        self._consumer_stopped = False

    @property
    def consumer(self) -> Any:
        """The group's AIOKafkaConsumer (None before start)."""
        return self._consumer

    # -- lifetime (asyncio side) ---------------------------------------

    async def start(self) -> None:
        opts = self.options
        kwargs: dict[str, Any] = {
            "group_id": self.name,
            "enable_auto_commit": False,
            # Positions of new partitions are set explicitly in on_assigned;
            # this only applies when a committed offset fell out of
            # retention, where replaying beats skipping.
            "auto_offset_reset": "earliest",
            "fetch_max_wait_ms": opts.fetch_max_wait_ms,
            "max_poll_records": opts.max_poll_records,
            "session_timeout_ms": opts.session_timeout_ms,
            "heartbeat_interval_ms": opts.heartbeat_interval_ms,
            "max_poll_interval_ms": opts.max_poll_interval_ms,
            "rebalance_timeout_ms": max(
                opts.session_timeout_ms, int(opts.rebalance_grace * 1000) + 5_000
            ),
        }
        kwargs.update(_client_kwargs(opts, self.transport.hosts, self.transport.client_id))
        kwargs.update(opts.consumer_args)
        self._consumer = aiokafka.AIOKafkaConsumer(**kwargs)
        await self._consumer.start()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._poll_loop()),
            loop.create_task(self._commit_loop()),
        ]

    async def add(self, sub: _Subscription) -> None:
        """Route *sub*'s topic here; return once the group assigned it."""
        topic = sub.topic
        new_topic = topic not in self.routes
        self.routes.setdefault(topic, []).append(sub)
        self._starts.setdefault(topic, sub.spec.start)
        if not new_topic:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = (self._sub_seq + 1, done)
        try:
            await self._wait_partitions_known(topic)
            self._sub_seq += 1
            self._assign_waiters.append(waiter)
            self._consumer.subscribe(topics=sorted(self.routes), listener=self._listener)
            try:
                await asyncio.wait_for(asyncio.shield(done), self.options.join_timeout)
            except TimeoutError:
                raise TransportUnavailableError(
                    f"consumer group {self.name!r} did not assign {topic!r} within "
                    f"{self.options.join_timeout} s"
                ) from None
        except BaseException:
            # Failed or cancelled: no orphan route may hold records nobody
            # fetches (their partitions' commit points would never move).
            if waiter in self._assign_waiters:
                self._assign_waiters.remove(waiter)
            if self._drop_route(sub) and self.routes and not self._stopped:
                self._consumer.subscribe(topics=sorted(self.routes), listener=self._listener)
            raise

    async def _wait_partitions_known(self, topic: str) -> None:
        """Wait until this consumer's metadata lists *topic*'s partitions.

        The group leader assigns from its own metadata: joining with a topic
        it does not know yet (just created) assigns none of its partitions,
        and the later rejoin would resolve "latest" after messages published
        in between -- skipping them.
        """
        client = self._consumer._client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.join_timeout
        while not client.cluster.partitions_for_topic(topic):
            if loop.time() > deadline:
                raise TransportUnavailableError(
                    f"no partition metadata for kafka topic {topic!r} within "
                    f"{self.options.join_timeout} s"
                )
            await client.add_topic(topic)
            if not client.cluster.partitions_for_topic(topic):
                await asyncio.sleep(0.05)  # metadata not there yet: ask again
                await client.force_metadata_update()

    def _drop_route(self, sub: _Subscription) -> bool:
        """Forget *sub*; True when its topic has no subscription left."""
        subs = self.routes.get(sub.topic, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self.routes.pop(sub.topic, None)
            self._starts.pop(sub.topic, None)
            return True
        return False

    async def remove(self, sub: _Subscription) -> None:
        """Close *sub*: commit, then leave the group or drop its topic."""
        topic_gone = self._drop_route(sub)
        await self.commit()
        if not self.routes:
            await self.stop()
            self.transport.groups.pop(self.name, None)
        elif topic_gone:
            # Re-subscribe without the topic; the rebalance revokes its
            # partitions (committing their finished prefix) in the background.
            self._consumer.subscribe(topics=sorted(self.routes), listener=self._listener)

    async def stop(self) -> None:
        """Commit what finished and leave the group (bounded by the caller)."""
        if self._stopped:
            return
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("kafka consumer task failed")
        try:
            await self.commit()
        finally:
            for track in self.tracks.values():
                track.live = False
            self.tracks.clear()
            try:
                self._consumer_stopped = True
                await self._consumer.stop()
            finally:
                for subs in self.routes.values():
                    for s in subs:
                        s.closed = True
                        s.wake()
                for _, fut in self._assign_waiters:
                    if not fut.done():
                        fut.set_exception(BusClosedError("transport closed"))
                self._assign_waiters.clear()

    # -- rebalance (asyncio side, called by aiokafka's coordinator) ------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        self._prepare_seq = self._sub_seq
        tracks = [t for tp in revoked if (t := self.tracks.get(tp)) is not None]
        for track in tracks:
            track.revoking = True
        self._drop_buffered(lambda r: r.token in tracks)
        if any(t.handed_out for t in tracks) and self.options.rebalance_grace > 0:
            self._revoke_wait = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._revoke_wait), self.options.rebalance_grace
                )
            except TimeoutError:
                logger.warning(
                    "group %r: handlers of revoked partitions still running after "
                    "%s s; their records are left uncommitted (redelivered)",
                    self.name,
                    self.options.rebalance_grace,
                )
            finally:
                self._revoke_wait = None
        await self.commit()
        for tp in revoked:
            gone = self.tracks.pop(tp, None)
            if gone is not None:
                self._unsettled -= gone.unsettled
                gone.live = False

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        ours = sorted(tp for tp in assigned if tp.topic in self.routes)
        for attempt in range(4):
            try:
                await self._resolve_positions(ours)
                break
            except kafka_errors.KafkaError as exc:
                if attempt == 3:
                    # Without positions these partitions would silently not be
                    # consumed: fail the group loudly instead.
                    self._fail(exc)
                    return
                logger.warning("group %r: resolving positions failed: %s", self.name, exc)
                await asyncio.sleep(0.1 * 2**attempt)
        if self._consumer.assignment() == assigned:
            for seq, fut in list(self._assign_waiters):
                if seq <= self._prepare_seq:
                    self._assign_waiters.remove((seq, fut))
                    if not fut.done():
                        fut.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        logger.error("group %r failed: %r", self.name, exc)
        for subs in self.routes.values():
            for sub in subs:
                sub.wake()
        for _, fut in self._assign_waiters:
            if not fut.done():
                fut.set_exception(_transport_error(exc, f"consumer group {self.name!r}"))
        self._assign_waiters.clear()

    async def _resolve_positions(self, ours: list[TopicPartition]) -> None:
        """Seek every assigned partition to its committed offset, or to where
        its subscription starts when the group has none (and anchor that)."""
        consumer = self._consumer
        committed = await asyncio.gather(*(consumer.committed(tp) for tp in ours))
        need: dict[StartPosition, list[TopicPartition]] = {"earliest": [], "latest": []}
        positions: dict[TopicPartition, int] = {}
        for tp, offset in zip(ours, committed, strict=True):
            if offset is None:
                need[self._starts.get(tp.topic, "latest")].append(tp)
            else:
                positions[tp] = offset
        fresh: dict[TopicPartition, int] = {}
        if need["earliest"]:
            fresh.update(await consumer.beginning_offsets(need["earliest"]))
        if need["latest"]:
            fresh.update(await consumer.end_offsets(need["latest"]))
        positions.update(fresh)
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
            old = self.tracks.pop(tp, None)
            if old is not None:
                old.live = False
                self._unsettled -= old.unsettled
            self.tracks[tp] = PartitionTrack(offset, committed=None if tp in fresh else offset)
        if fresh and not self.ephemeral:
            # Anchor a new group where it starts: a crash before the first
            # periodic commit must not move "latest" past unhandled records.
            try:
                await consumer.commit(fresh)
                for tp, offset in fresh.items():
                    self.tracks[tp].committed = offset
            except kafka_errors.KafkaError as exc:
                logger.warning("group %r: anchoring start offsets failed: %s", self.name, exc)

    def _drop_buffered(self, dropped: Callable[[Record], bool]) -> None:
        for subs in self.routes.values():
            for sub in subs:
                if any(dropped(r) for r in sub.buffer):
                    sub.buffer = deque(r for r in sub.buffer if not dropped(r))

    # -- consuming (asyncio side) ----------------------------------------

    async def _poll_loop(self) -> None:
        consumer = self._consumer
        opts = self.options
        loop = asyncio.get_running_loop()
        getter: asyncio.Task[Any] | None = None
        backoff = 0.05
        try:
            while True:
                self._flow()
                if getter is None:
                    getter = loop.create_task(
                        consumer.getmany(timeout_ms=200, max_records=opts.max_poll_records)
                    )
                wake = self._wake = loop.create_future()
                await asyncio.wait((getter, wake), return_when=asyncio.FIRST_COMPLETED)
                self._wake = None
                if not getter.done():
                    continue
                task, getter = getter, None
                try:
                    batches = task.result()
                except kafka_errors.KafkaError as exc:
                    if not getattr(exc, "retriable", False) and not isinstance(
                        exc, kafka_errors.KafkaConnectionError
                    ):
                        raise
                    logger.warning("group %r: fetch failed, retrying: %s", self.name, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.05
                if batches:
                    self._deliver(batches)
        except asyncio.CancelledError:
            if getter is not None:
                getter.cancel()
            raise
        except BaseException as exc:
            self._fail(exc)
            raise

    def _deliver(self, batches: Mapping[TopicPartition, Sequence[Any]]) -> None:
        woken: set[_Subscription] = set()
        for tp, messages in batches.items():
            track = self.tracks.get(tp)
            subs = self.routes.get(tp.topic)
            if track is None or not subs or track.revoking or track.released is not None:
                continue  # not ours any more, or about to be sought back
            sub = subs[tp.partition % len(subs)]
            buffer = sub.buffer
            topic, partition = tp.topic, tp.partition
            added = 0
            for msg in messages:
                if not track.add(msg.offset):
                    continue
                key = msg.key
                buffer.append(
                    Record(
                        topic=topic,
                        subject=topic,
                        value=msg.value if msg.value is not None else b"",
                        key=key.decode("utf-8", "replace") if key is not None else None,
                        headers=_decode_headers(msg.headers) if msg.headers else {},
                        partition=partition,
                        offset=msg.offset,
                        token=track,
                        timestamp=msg.timestamp / 1000 if msg.timestamp is not None else None,
                    )
                )
                added += 1
            if added:
                self._unsettled += added
                woken.add(sub)
        for sub in woken:
            sub.wake()

    def _flow(self) -> None:
        """Pause partitions over their bound, resume drained ones, and seek
        back partitions with released records once nothing is in flight."""
        opts = self.options
        consumer = self._consumer
        limit, part_limit = opts.max_unsettled, opts.max_unsettled_per_partition
        if self._unsettled >= limit:
            self._paused_all = True
        elif self._paused_all and self._unsettled <= limit // 2:
            self._paused_all = False
        for tp, track in list(self.tracks.items()):
            if track.released is not None and track.handed_out == 0 and not track.revoking:
                self._seek_back(tp, track)
                continue
            want_pause = (
                self._paused_all
                or track.released is not None  # refetched after the seek anyway
                or track.unsettled >= part_limit
                or (track.paused and track.unsettled > part_limit // 2)
            )
            if want_pause and not track.paused:
                track.paused = True
                consumer.pause(tp)
            elif not want_pause and track.paused:
                track.paused = False
                consumer.resume(tp)

    def _seek_back(self, tp: TopicPartition, old: PartitionTrack) -> None:
        """Redeliver from the first released record: a fresh track starts
        there (records after it that finished are delivered again)."""
        point = old.point
        old.live = False
        self._unsettled -= old.unsettled
        self._drop_buffered(lambda r: r.token is old)
        track = PartitionTrack(point, committed=old.committed)
        self.tracks[tp] = track
        self._consumer.seek(tp, point)
        if old.paused:
            self._consumer.resume(tp)

    def settle(self, record: Record, *, finished: bool) -> None:
        """Ack or release bookkeeping (Trio side, synchronous)."""
        track = record.token
        assert isinstance(track, PartitionTrack)
        if not track.live:
            return  # revoked or reset: a later owner redelivers it
        ok = track.finish(record.offset) if finished else track.release(record.offset)
        if not ok:
            return
        track.handed_out -= 1
        self._unsettled -= 1
        if track.revoking:
            if (
                self._revoke_wait is not None
                and not self._revoke_wait.done()
                and not any(t.revoking and t.handed_out for t in self.tracks.values())
            ):
                self._revoke_wait.set_result(None)
            return
        opts = self.options
        if (
            not finished
            or (track.paused and track.unsettled <= opts.max_unsettled_per_partition // 2)
            or (self._paused_all and self._unsettled <= opts.max_unsettled // 2)
        ):
            self._poke()

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    # -- committing (asyncio side) ---------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.commit_interval)
            await self.commit()

    async def commit(self) -> None:
        """Commit every partition's finished prefix that moved."""
        async with self._commit_lock:
            due = {
                tp: point
                for tp, track in self.tracks.items()
                if (point := track.commit_due()) is not None
            }
            if not due or self.ephemeral or self._consumer is None or self._consumer_stopped:
                return
            try:
                await self._consumer.commit(due)
            except (kafka_errors.KafkaError, kafka_errors.IllegalStateError) as exc:
                # Rebalancing or not a member any more: what was not committed
                # is redelivered to the next owner (at-least-once).
                logger.warning("group %r: commit failed: %s", self.name, exc)
                return
            for tp, point in due.items():
                track = self.tracks.get(tp)
                if track is not None and point > track.committed:
                    track.committed = point


class KafkaTransport(Transport):
    """The transport over aiokafka; created by :func:`open_transport`.

    Attributes:
        options: The effective :class:`KafkaOptions`.
        idempotent: Whether the producer runs idempotent (known once open).
    """

    name = "kafka"
    coalesce_publishes = True

    def __init__(self, settings: TransportSettings, options: KafkaOptions, bridge: Bridge) -> None:
        self.options = options
        self.hosts = settings.hosts
        self.client_id = settings.client_id
        self.bridge = bridge
        self.idempotent = False
        self.groups: dict[str, _Group] = {}
        self._max_message_bytes = settings.max_message_bytes
        self._producer: Any = None
        self._admin: Any = None
        self._ensured: set[str] = set()
        self._ensure_lock: asyncio.Lock | None = None
        self._join_locks: dict[str, asyncio.Lock] = {}
        self._connected = True
        self._watcher: asyncio.Task[None] | None = None

    # -- asyncio side ----------------------------------------------------

    def _make_producer(self, idempotent: bool) -> Any:
        opts = self.options
        kwargs: dict[str, Any] = {
            "acks": opts.acks,
            "enable_idempotence": idempotent,
            "compression_type": None if opts.compression == "none" else opts.compression,
            "linger_ms": opts.linger_ms,
            "max_batch_size": opts.max_batch_size,
            "max_request_size": max(1024 * 1024, self._max_message_bytes + 64 * 1024),
            "request_timeout_ms": int(opts.publish_timeout * 1000),
        }
        kwargs.update(_client_kwargs(opts, self.hosts, self.client_id))
        kwargs.update(opts.producer_args)
        return aiokafka.AIOKafkaProducer(**kwargs)

    async def _aio_start(self) -> None:
        self._ensure_lock = asyncio.Lock()
        opts = self.options
        try:
            self._admin = AIOKafkaAdminClient(
                request_timeout_ms=int(opts.publish_timeout * 1000),
                **_client_kwargs(opts, self.hosts, self.client_id),
            )
            await self._admin.start()
            want_idempotence = opts.idempotence is not False and opts.acks == "all"
            producer = self._make_producer(want_idempotence)
            try:
                await producer.start()
                self.idempotent = want_idempotence
            except kafka_errors.KafkaError as exc:
                await producer.stop()
                if not want_idempotence or opts.idempotence is True:
                    raise
                # The broker refused InitProducerId (Tansu 0.6 does): fall
                # back to a plain acks=all producer and say so once.
                logger.warning(
                    "kafka broker %s does not support the idempotent producer "
                    "(%s: %s); publishing with acks=all without idempotence: a "
                    "retried send may be stored twice",
                    ",".join(self.hosts),
                    type(exc).__name__,
                    exc,
                )
                producer = self._make_producer(False)
                await producer.start()
            self._producer = producer
            self._watcher = asyncio.get_running_loop().create_task(self._watch_connection())
        except BaseException:
            await self._aio_close()
            raise

    async def _watch_connection(self) -> None:
        """Keep ``connected`` current: can a broker be reached right now?"""
        client = self._producer.client
        while True:
            ok = False
            for broker in client.cluster.brokers():
                try:
                    ok = await asyncio.wait_for(client.ready(broker.nodeId), 2.0)
                except (TimeoutError, kafka_errors.KafkaError, OSError):
                    ok = False
                if ok:
                    break
            if ok != self._connected:
                logger.log(
                    logging.INFO if ok else logging.WARNING,
                    "kafka broker %s",
                    "reachable again" if ok else "unreachable",
                )
            self._connected = ok
            await asyncio.sleep(CONNECTION_CHECK_INTERVAL)

    async def _aio_close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except BaseException:  # cancelled or failed: either way it is done
                pass
            self._watcher = None
        for group in list(self.groups.values()):
            try:
                await group.stop()
            except Exception:
                logger.exception("closing consumer group %r failed", group.name)
        self.groups.clear()
        for client in (self._producer, self._admin):
            if client is None:
                continue
            try:
                await (client.stop() if client is self._producer else client.close())
            except Exception:
                logger.exception("closing a kafka client failed")
        self._producer = self._admin = None

    async def _aio_publish(self, records: Sequence[OutgoingMessage]) -> list[Exception | None]:
        await self._ensure_topics({r.topic for r in records})
        producer = self._producer
        outcomes: list[Exception | None] = [None] * len(records)
        futures: dict[asyncio.Future[Any], int] = {}
        for i, rec in enumerate(records):
            try:
                fut = await producer.send(
                    rec.topic,
                    rec.value,
                    key=rec.key.encode() if rec.key is not None else None,
                    headers=[(k, v.encode()) for k, v in rec.headers.items()],
                )
            except kafka_errors.KafkaError as exc:
                outcomes[i] = _publish_error(exc, rec.topic)
            else:
                futures[fut] = i
        if futures:
            done, pending = await asyncio.wait(futures, timeout=self.options.publish_timeout)
            for fut in done:
                i = futures[fut]
                failure = fut.exception()
                if failure is not None:
                    outcomes[i] = _publish_error(failure, records[i].topic)
            for fut in pending:
                i = futures[fut]
                outcomes[i] = PublishOutcomeUnknownError(
                    f"no answer from the broker for a publish to {records[i].topic!r} "
                    f"within {self.options.publish_timeout} s"
                )
        return outcomes

    async def _aio_open_consumer(self, spec: ConsumerSpec) -> _Subscription:
        await self._ensure_topics({spec.topic})
        # One join at a time per group; groups join concurrently.
        lock = self._join_locks.setdefault(spec.group, asyncio.Lock())
        async with lock:
            group = self.groups.get(spec.group)
            if group is None:
                group = _Group(self, spec.group, ephemeral=spec.ephemeral)
                await group.start()
                self.groups[spec.group] = group
            sub = _Subscription(group, spec)
            try:
                await group.add(sub)
            except BaseException:
                if not group.routes:
                    self.groups.pop(spec.group, None)
                    await group.stop()
                raise
        return sub

    # -- topics ------------------------------------------------------------

    async def _ensure_topics(self, topics: set[str]) -> None:
        todo = topics - self._ensured
        if not todo:
            return
        if self.options.topic_strategy == "skip":
            self._ensured |= todo
            return
        assert self._ensure_lock is not None
        async with self._ensure_lock:
            todo -= self._ensured
            if todo:
                await self._apply_topic_configs(sorted(todo))
                self._ensured |= todo

    def _mismatch(self, message: str) -> None:
        if self.options.on_mismatch == "fail":
            raise TopicConfigError(message)
        logger.warning("%s", message)

    async def _apply_topic_configs(self, names: list[str]) -> None:
        opts, admin = self.options, self._admin
        try:
            # List first: a metadata request naming a missing topic makes
            # brokers with auto-creation (Tansu, Kafka's default) create it
            # with *their* defaults.
            known = set(await admin.list_topics())
            present = [n for n in names if n in known]
            described = await admin.describe_topics(present) if present else []
        except kafka_errors.KafkaError as exc:
            raise _transport_error(exc, f"describing topics {names}") from exc
        existing = {
            d["topic"]: d
            for d in described
            if d.get("error_code", 0) != _UNKNOWN_TOPIC and d.get("partitions")
        }
        missing = [n for n in names if n not in existing]
        if missing and opts.topic_strategy == "validate_only":
            for name in missing:
                self._mismatch(
                    f"kafka topic {name!r} does not exist (topic_strategy=validate_only)"
                )
        elif missing:
            new = [
                NewTopic(
                    name,
                    (cfg := opts.topic_config(name)).partitions,
                    cfg.replication_factor,
                    topic_configs=cfg.all_configs(),
                )
                for name in missing
            ]
            try:
                response = await admin.create_topics(new)
            except kafka_errors.KafkaError as exc:
                raise TopicConfigError(f"creating topics {missing} failed: {exc}") from exc
            for item in response.topic_errors:
                topic, code = item[0], item[1]
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise TopicConfigError(
                        f"creating topic {topic!r} failed: error {code}: {item[-1]}"
                    )
        if existing:
            await self._check_existing(existing)

    async def _check_existing(self, existing: Mapping[str, Mapping[str, Any]]) -> None:
        opts, admin = self.options, self._admin
        for name, meta in existing.items():
            cfg = opts.topic_config(name)
            partitions = meta["partitions"]
            if len(partitions) != cfg.partitions:
                self._mismatch(
                    f"kafka topic {name!r} has {len(partitions)} partitions, its "
                    f"configuration says {cfg.partitions} (trio_bus never changes "
                    "partition counts: that would move aggregates between partitions)"
                )
            replicas = len(partitions[0].get("replicas", ())) if partitions else 0
            if replicas != cfg.replication_factor:
                self._mismatch(
                    f"kafka topic {name!r} has replication factor {replicas}, its "
                    f"configuration says {cfg.replication_factor}"
                )
        wanted = {n: opts.topic_config(n).all_configs() for n in existing}
        wanted = {n: c for n, c in wanted.items() if c}
        if not wanted:
            return
        try:
            responses = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, n) for n in wanted]
            )
        except kafka_errors.KafkaError as exc:
            raise _transport_error(exc, "describing topic configs") from exc
        actual: dict[str, dict[str, str]] = {}
        for response in responses:
            for res in response.resources:
                actual[res[3]] = {entry[0]: entry[1] for entry in res[4]}
        to_update: dict[str, dict[str, str]] = {}
        for name, configs in wanted.items():
            have = actual.get(name, {})
            diff = {k: v for k, v in configs.items() if have.get(k) != v}
            if not diff:
                continue
            if opts.topic_strategy == "create_or_update":
                to_update[name] = diff
            else:
                self._mismatch(
                    f"kafka topic {name!r} configs differ: want {diff}, broker has "
                    f"{ {k: have.get(k) for k in diff} }"
                )
        if to_update:
            try:
                await admin.alter_configs(
                    [
                        ConfigResource(
                            ConfigResourceType.TOPIC,
                            n,
                            configs={**actual.get(n, {}), **c},
                        )
                        for n, c in to_update.items()
                    ]
                )
            except kafka_errors.KafkaError as exc:
                raise TopicConfigError(f"updating topic configs {to_update} failed: {exc}") from exc

    # -- Trio side ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a broker answered the last connection check (every
        ``CONNECTION_CHECK_INTERVAL`` seconds)."""
        return self._connected

    async def publish_batch(self, records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
        """Send *records* (one bridge crossing); one outcome per record."""
        if not records:
            await trio.lowlevel.checkpoint()
            return []
        try:
            return await self.bridge.call(self._aio_publish, records)
        except (TopicConfigError, TransportError):
            raise
        except kafka_errors.KafkaError as exc:
            raise _transport_error(exc, "publishing") from exc

    async def open_consumer(self, spec: ConsumerSpec) -> Consumer:
        """Join *spec.group* with *spec.topic*; return once its partitions are
        assigned and their positions resolved."""
        try:
            return await self.bridge.call(self._aio_open_consumer, spec)
        except (TopicConfigError, TransportError, BusClosedError):
            raise
        except kafka_errors.KafkaError as exc:
            raise _transport_error(exc, f"joining consumer group {spec.group!r}") from exc

    async def topic_metadata(self, topic: str) -> tuple[int, int]:
        """``(partitions, replication_factor)`` of *topic* as the broker
        reports it (one crossing; for tools and tests)."""

        async def describe() -> tuple[int, int]:
            (meta,) = await self._admin.describe_topics([topic])
            parts = meta["partitions"]
            return len(parts), len(parts[0]["replicas"]) if parts else 0

        return await self.bridge.call(describe)


@asynccontextmanager
async def open_transport(settings: TransportSettings) -> AsyncIterator[KafkaTransport]:
    """Open the Kafka transport: an asyncio loop, a producer and an admin
    client; consumers are added by ``open_consumer``. Leaving the block
    commits what finished, leaves every group and closes every client, also
    when cancelled (shielded, bounded by ``close_timeout``)."""
    options = resolve_options(settings)
    # trio-asyncio's loop nursery wraps whatever leaves the block; give
    # callers the one exception they would expect.
    with unwrap_lone_exception():
        async with _open(settings, options) as transport:
            yield transport


@asynccontextmanager
async def _open(
    settings: TransportSettings, options: KafkaOptions
) -> AsyncIterator[KafkaTransport]:
    async with open_bridge("kafka") as bridge:
        transport = KafkaTransport(settings, options, bridge)
        try:
            await bridge.call(transport._aio_start)
        except kafka_errors.KafkaError as exc:
            raise _transport_error(
                exc, f"cannot connect to kafka at {','.join(settings.hosts)}"
            ) from exc
        started = time.monotonic()
        try:
            yield transport
        finally:
            with trio.move_on_after(options.close_timeout * 2) as scope:
                scope.shield = True
                await bridge.call(transport._aio_close)
            if scope.cancelled_caught:
                logger.warning(
                    "closing the kafka transport took over %s s (open %.1f s)",
                    options.close_timeout * 2,
                    time.monotonic() - started,
                )
