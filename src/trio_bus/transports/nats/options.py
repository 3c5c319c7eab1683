"""Options of the NATS transport and the names it derives from them.

Validators and the topic strategy / mismatch policy are shared with the
Kafka transport (:mod:`trio_bus.transports._provisioning`).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from ..._config import positive
from ..._secrets import secret_field
from ...errors import ConfigError
from .._base import HEALTH_MAX_AGE, HEALTH_MAX_MESSAGES, HEALTH_TOPIC
from .._provisioning import (
    MISMATCH_ACTIONS,
    TOPIC_STRATEGIES,
    MismatchAction,
    TopicStrategy,
    int_at_least,
    non_negative,
    one_of,
    optional,
    optional_positive,
)
from .._refusals import AUTH_FAILURE_GRACE

__all__ = [
    "ConnectOptions",
    "ConsumerOptions",
    "GroupOptions",
    "NatsOptions",
    "Placement",
    "StreamOptions",
    "TOPIC_HEADER",
    "duplicate_window",
    "durable_name",
    "stream_name",
]

#: Header naming the topic of a message stored in another topic's stream
#: (a nested topic such as ``orders.dlq`` inside stream ``orders``), so the
#: outer topic's consumers can skip it. See docs/nats.md, "Nested topics".
TOPIC_HEADER = "Trio-Bus-Topic"

Storage = Literal["file", "memory"]
Retention = Literal["limits", "interest", "workqueue"]
Discard = Literal["old", "new"]


def _tags(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):  # a lone tag would become one tag per letter
        raise ConfigError(f"placement tags must be a sequence of strings, not {value!r}")
    return tuple(value)


@attrs.frozen(kw_only=True)
class Placement:
    """Where JetStream puts a stream's replicas: a cluster, servers with
    tags (``server_tags`` in their config), or both.

    ::

        StreamOptions(replicas=3, placement=Placement(cluster="east", tags=("ssd",)))

    Attributes:
        cluster: Cluster name (``cluster { name: ... }``; None: the one the
            creating request reached).
        tags: Every replica's server must carry all of these tags.
    """

    cluster: str | None = None
    tags: tuple[str, ...] = attrs.field(default=(), converter=_tags)

    def __attrs_post_init__(self) -> None:
        if self.cluster is None and not self.tags:
            raise ConfigError("a Placement needs a cluster, tags or both")


@attrs.frozen(kw_only=True)
class StreamOptions:
    """How a topic's JetStream stream is created (and validated).

    Attributes:
        storage: ``"file"`` (survives a server restart) or ``"memory"``.
        retention: ``"limits"``, ``"interest"`` or ``"workqueue"``.
        max_age: Seconds a message is kept (None: no limit).
        max_bytes: Stream size limit in bytes (None: no limit).
        max_msgs: Message count limit (None: no limit).
        replicas: Replica count (clustered servers; at most the number of
            servers, else :class:`~trio_bus.errors.TopicConfigError`).
        placement: Which cluster / tagged servers hold the replicas (None:
            the server decides). See docs/nats.md, "Clusters, replicas and
            placement".
        duplicate_window: Seconds the server remembers ``Nats-Msg-Id`` values
            to drop duplicate publishes.
        discard: What the server does at a limit: drop ``"old"`` messages or
            refuse ``"new"`` ones.
    """

    storage: Storage = attrs.field(default="file", validator=one_of("file", "memory"))
    retention: Retention = attrs.field(
        default="limits", validator=one_of("limits", "interest", "workqueue")
    )
    max_age: float | None = attrs.field(default=None, validator=optional_positive)
    max_bytes: int | None = attrs.field(default=None, validator=optional(int_at_least(1)))
    max_msgs: int | None = attrs.field(default=None, validator=optional(int_at_least(1)))
    replicas: int = attrs.field(default=1, validator=int_at_least(1))
    placement: Placement | None = attrs.field(default=None)
    duplicate_window: float = attrs.field(default=120.0, validator=positive)
    discard: Discard = attrs.field(default="old", validator=one_of("old", "new"))

    @placement.validator
    def _check_placement(self, _: object, value: object) -> None:
        if value is not None and not isinstance(value, Placement):
            raise ConfigError(f"placement must be a Placement, not {type(value).__name__}")


#: The stream of the health-probe topic: in memory, short-lived, bounded.
HEALTH_STREAM = StreamOptions(
    storage="memory", max_age=HEALTH_MAX_AGE, max_msgs=HEALTH_MAX_MESSAGES, duplicate_window=10.0
)


@attrs.frozen(kw_only=True)
class ConsumerOptions:
    """Durable pull consumers (one per subscription group) and pulling.

    Attributes:
        ack_wait: Seconds the server waits for an ack before redelivering.
            Unsettled deliveries get in-progress acks every
            ``in_progress_interval`` so this never expires under a message
            the bus still holds.
        max_deliver: Deliveries after which the server gives up on a message
            (-1: never; the bus dead-letters failing messages itself).
        max_ack_pending: Unacked messages the server lets the group hold;
            delivery pauses at the limit (server-side backpressure).
        in_progress_interval: Seconds between in-progress acks of a held
            delivery (None: ``ack_wait / 3``).
        prefetch: Messages requested ahead of ``fetch`` (None: twice the
            subscription's batch), bounded by ``max_ack_pending``.
        idle_heartbeat: Seconds between server heartbeats on an idle pull;
            two missed ones mean the pull is lost (server restart) and it is
            issued again.
        pull_expires: Seconds one pull request lives on the server.
        ordered_resume: After an unclean stop (the previous holder died
            without releasing), hold new messages back until the old
            holder's unacked ones are redelivered (at most ``ack_wait`` plus
            a margin), then hand those over first in stream order. See
            docs/nats.md, "Order on redelivery".
    """

    ack_wait: float = attrs.field(default=30.0, validator=positive)
    max_deliver: int = attrs.field(default=-1)
    max_ack_pending: int = attrs.field(default=10_000, validator=int_at_least(1))
    in_progress_interval: float | None = attrs.field(default=None, validator=optional_positive)
    prefetch: int | None = attrs.field(default=None, validator=optional(int_at_least(1)))
    idle_heartbeat: float = attrs.field(default=2.0, validator=positive)
    pull_expires: float = attrs.field(default=30.0, validator=positive)
    ordered_resume: bool = True

    @max_deliver.validator
    def _check_max_deliver(self, _: object, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise ConfigError(f"max_deliver must be -1 or an int >= 1, got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.idle_heartbeat * 2 > self.pull_expires:
            raise ConfigError("idle_heartbeat must be at most half of pull_expires")

    @property
    def wpi_interval(self) -> float:
        """Seconds between in-progress acks of one held delivery."""
        if self.in_progress_interval is not None:
            return self.in_progress_interval
        return self.ack_wait / 3


@attrs.frozen(kw_only=True)
class ConnectOptions:
    """Connection settings passed through to ``nats.connect``.

    Attributes:
        user: User name (or put ``user:password@`` in the URL).
        password: Password.
        token: Auth token.
        user_credentials: Path to a ``.creds`` file (JWT + nkey).
        nkeys_seed: Path to an nkey seed file.
        tls: An :class:`ssl.SSLContext` for TLS connections.
        tls_hostname: Server name to verify when it differs from the URL's.
        name: Connection name shown by the server (default: the client id).
        connect_timeout: Seconds per connection attempt.
        reconnect_time_wait: Seconds between reconnection attempts.
        ping_interval: Seconds between client pings; with
            ``max_outstanding_pings`` bounds how long a dead connection goes
            unnoticed.
        max_outstanding_pings: Unanswered pings that mark the connection dead.
        pending_size: Bytes buffered while reconnecting.
        auth_failure_grace: Seconds the server may go on refusing our
            credentials while the bus runs (revoked, expired, changed
            password) before the transport fails with
            :class:`~trio_bus.errors.AuthenticationError`; meanwhile health
            reports the refusal. See docs/security.md, "Credentials revoked
            while running".
        extra: Any other ``nats.connect`` keyword arguments.
    """

    user: str | None = None
    password: str | None = secret_field()
    token: str | None = secret_field()
    user_credentials: str | None = None
    nkeys_seed: str | None = None
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None
    name: str | None = None
    connect_timeout: float = attrs.field(default=2.0, validator=positive)
    reconnect_time_wait: float = attrs.field(default=0.25, validator=positive)
    ping_interval: float = attrs.field(default=5.0, validator=positive)
    max_outstanding_pings: int = attrs.field(default=2, validator=int_at_least(1))
    pending_size: int = attrs.field(default=8 * 1024 * 1024, validator=int_at_least(0))
    auth_failure_grace: float = attrs.field(default=AUTH_FAILURE_GRACE, validator=positive)
    extra: Mapping[str, Any] = attrs.field(factory=dict)


_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")
_BUCKET_RE = re.compile(r"[A-Za-z0-9_-]+")


def _member_id(_: object, __: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not _TOKEN_RE.fullmatch(value)):
        raise ConfigError(f"member_id must be letters, digits, '-' or '_', got {value!r}")


def _bucket(_: object, __: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not _BUCKET_RE.fullmatch(value):
        raise ConfigError(f"groups_bucket must be letters, digits, '-' or '_', got {value!r}")


@attrs.frozen(kw_only=True)
class GroupOptions:
    """Partitioned consumer groups (docs/scaling.md): several buses in one
    group share a topic's partitions, one member per partition at a time.

    Attributes:
        partitions: Partitions of a topic whose stream this bus creates
            (stored in the stream's metadata ``trio_bus.partitions``, which
            every bus then follows); 1 turns partitioning off: one durable
            per group, members share messages one by one, bare subjects.
        lease_ttl: Seconds a partition lease lasts without renewal; renewed
            every ``lease_ttl / 3``. A crashed member's partitions move
            after about ``lease_ttl + lease_grace``.
        lease_grace: Extra seconds a new owner waits after a lease expired
            (clock-rate and scheduling slack).
        member_id: This bus's member name in the group (letters, digits,
            ``-``, ``_``); None: unique per bus.
        groups_bucket: The JetStream KV bucket holding members and leases.
    """

    partitions: int = attrs.field(default=8, validator=int_at_least(1))
    lease_ttl: float = attrs.field(default=5.0, validator=positive)
    lease_grace: float = attrs.field(default=1.0, validator=non_negative)
    member_id: str | None = attrs.field(default=None, validator=_member_id)
    groups_bucket: str = attrs.field(default="trio_bus_groups", validator=_bucket)

    def __attrs_post_init__(self) -> None:
        if self.partitions > 1024:
            raise ConfigError(f"partitions must be at most 1024, got {self.partitions}")


@attrs.frozen(kw_only=True)
class NatsOptions:
    """Options of the NATS transport: ``open_bus(url, transport_options=...)``.

    ::

        options = NatsOptions(
            stream=StreamOptions(storage="file", max_age=7 * 86400),
            consumer=ConsumerOptions(ack_wait=60),
            topic_strategy="create_or_update",
        )
        async with trio_bus.open_bus("nats://127.0.0.1:4222",
                                     transport_options=options) as bus: ...

    Attributes:
        stream: Stream settings for every topic.
        topics: Per-topic stream settings overriding ``stream``.
        consumer: Durable pull consumer and pulling settings.
        connect: Connection settings.
        groups: Partitioned consumer groups (partitions, leases).
        topic_strategy: ``"create_only"``: create a missing stream, never
            change an existing one (differences: ``on_mismatch``);
            ``"create_or_update"``: also update an existing stream whose
            settings differ; ``"validate_only"``: never create or change,
            a missing stream is an error; ``"skip"``: touch nothing.
        on_mismatch: ``"warn"`` (log, keep going) or ``"fail"``
            (:class:`~trio_bus.errors.TopicConfigError`) when the server's
            stream differs from ``stream`` (and could not be updated).
        stream_prefix: Prefix of every stream name (e.g. ``"APP_"``).
        publish_timeout: Seconds a publish may wait for the server's ack,
            including waiting for a reconnection.
        request_timeout: Seconds a JetStream API request may take.
    """

    stream: StreamOptions = attrs.field(factory=StreamOptions)
    topics: Mapping[str, StreamOptions] = attrs.field(factory=dict)
    consumer: ConsumerOptions = attrs.field(factory=ConsumerOptions)
    connect: ConnectOptions = attrs.field(factory=ConnectOptions)
    groups: GroupOptions = attrs.field(factory=GroupOptions)
    topic_strategy: TopicStrategy = attrs.field(
        default="create_only",
        validator=one_of(*TOPIC_STRATEGIES),
    )
    on_mismatch: MismatchAction = attrs.field(default="warn", validator=one_of(*MISMATCH_ACTIONS))
    stream_prefix: str = ""
    publish_timeout: float = attrs.field(default=5.0, validator=positive)
    request_timeout: float = attrs.field(default=5.0, validator=positive)

    def __attrs_post_init__(self) -> None:
        for name, value, kind in (
            ("stream", self.stream, StreamOptions),
            ("consumer", self.consumer, ConsumerOptions),
            ("connect", self.connect, ConnectOptions),
            ("groups", self.groups, GroupOptions),
        ):
            if not isinstance(value, kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, not {type(value).__name__}")
        for topic, value in self.topics.items():
            if not isinstance(value, StreamOptions):
                raise ConfigError(f"topics[{topic!r}] must be a StreamOptions")
        if any(c in self.stream_prefix for c in ". *>/\\\t\r\n"):
            raise ConfigError(
                f"stream_prefix {self.stream_prefix!r} is not a valid stream name part"
            )

    def stream_for(self, topic: str) -> StreamOptions:
        """The stream settings of *topic* (the health-probe topic gets a
        small memory stream unless ``topics`` configures it)."""
        configured = self.topics.get(topic)
        if configured is not None:
            return configured
        if topic == HEALTH_TOPIC:
            return HEALTH_STREAM
        return self.stream


def stream_name(topic: str, prefix: str = "") -> str:
    """The JetStream stream name of *topic*: ``.`` becomes ``_`` because a
    stream name cannot contain dots (``orders.eu`` -> ``orders_eu``)."""
    return prefix + topic.replace(".", "_")


def duplicate_window(s: StreamOptions) -> float:
    # The server refuses a duplicate window longer than max_age.
    return min(s.duplicate_window, s.max_age) if s.max_age else s.duplicate_window


def durable_name(group: str, topic: str, nested: bool) -> str:
    # Consumer names cannot contain '.'; a nested topic shares its outer
    # topic's stream, so its consumers carry the topic to stay apart.
    name = group.replace(".", "_")
    if nested:
        name = f"{name}__{topic.replace('.', '_')}"
    return name
