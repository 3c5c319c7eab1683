"""Options of the Kafka transport, and their URL query overrides."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal
from urllib.parse import parse_qsl

import attrs

from ..._config import positive
from ..._secrets import secret_field
from ...errors import ConfigError
from .._base import HEALTH_MAX_AGE, HEALTH_TOPIC, TransportSettings
from .._provisioning import (
    MISMATCH_ACTIONS,
    TOPIC_STRATEGIES,
    MismatchAction,
    TopicStrategy,
    non_negative,
    one_of,
    optional,
    optional_positive,
)
from .._refusals import AUTH_FAILURE_GRACE

__all__ = ["KafkaOptions", "TopicConfig", "client_kwargs", "resolve_options"]

Compression = Literal["lz4", "zstd", "snappy", "gzip", "none"]

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

    partitions: int = attrs.field(default=DEFAULT_PARTITIONS, validator=positive)
    replication_factor: int = attrs.field(default=1, validator=positive)
    retention_ms: int | None = attrs.field(default=None, validator=optional_positive)
    configs: Mapping[str, str] = attrs.field(factory=dict)

    def all_configs(self) -> dict[str, str]:
        """Topic configs to set, ``retention.ms`` included."""
        out = dict(self.configs)
        if self.retention_ms is not None:
            out["retention.ms"] = str(self.retention_ms)
        return out


#: The health-probe topic: one partition, kept a minute.
HEALTH_TOPIC_CONFIG = TopicConfig(partitions=1, retention_ms=int(HEALTH_MAX_AGE * 1000))


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
        lease_margin_ms: How much earlier than the coordinator can expire
            the member its partition leases end (see docs/kafka.md,
            "Rebalances"); None (default): a tenth of the session timeout.
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
        auth_failure_grace: Seconds the brokers may go on refusing our
            credentials (or certificate) while the bus runs before the
            transport fails with :class:`~trio_bus.errors.AuthenticationError`;
            meanwhile health reports the refusal. See docs/security.md,
            "Credentials revoked while running".
        client_args: Further keyword arguments for every aiokafka client
            (producer, consumers, admin), for what this class does not name.
        producer_args: Further keyword arguments for ``AIOKafkaProducer``.
        consumer_args: Further keyword arguments for ``AIOKafkaConsumer``
            (``max_partition_fetch_bytes``, ``isolation_level``...).
    """

    acks: Literal["all", 1, 0] = attrs.field(default="all", validator=one_of("all", 1, 0))
    idempotence: Literal["auto"] | bool = attrs.field(
        default="auto", validator=one_of("auto", True, False)
    )
    compression: Compression = attrs.field(
        default="lz4", validator=one_of("lz4", "zstd", "snappy", "gzip", "none")
    )
    linger_ms: int = attrs.field(default=DEFAULT_LINGER_MS, validator=non_negative)
    max_batch_size: int = attrs.field(default=DEFAULT_MAX_BATCH_SIZE, validator=positive)
    publish_timeout: float = attrs.field(default=DEFAULT_PUBLISH_TIMEOUT, validator=positive)
    fetch_max_wait_ms: int = attrs.field(default=DEFAULT_FETCH_MAX_WAIT_MS, validator=non_negative)
    max_poll_records: int = attrs.field(default=DEFAULT_MAX_POLL_RECORDS, validator=positive)
    session_timeout_ms: int = attrs.field(default=DEFAULT_SESSION_TIMEOUT_MS, validator=positive)
    heartbeat_interval_ms: int = attrs.field(
        default=DEFAULT_HEARTBEAT_INTERVAL_MS, validator=positive
    )
    max_poll_interval_ms: int = attrs.field(default=300_000, validator=positive)
    commit_interval: float = attrs.field(default=DEFAULT_COMMIT_INTERVAL, validator=positive)
    max_unsettled_per_partition: int = attrs.field(
        default=DEFAULT_MAX_UNSETTLED_PER_PARTITION, validator=positive
    )
    max_unsettled: int = attrs.field(default=DEFAULT_MAX_UNSETTLED, validator=positive)
    rebalance_grace: float = attrs.field(default=DEFAULT_REBALANCE_GRACE, validator=non_negative)
    lease_margin_ms: int | None = attrs.field(default=None, validator=optional(non_negative))
    join_timeout: float = attrs.field(default=DEFAULT_JOIN_TIMEOUT, validator=positive)
    close_timeout: float = attrs.field(default=DEFAULT_CLOSE_TIMEOUT, validator=positive)
    topic: TopicConfig = attrs.field(factory=TopicConfig)
    topics: Mapping[str, TopicConfig] = attrs.field(factory=dict)
    topic_strategy: TopicStrategy = attrs.field(
        default="create_only",
        validator=one_of(*TOPIC_STRATEGIES),
    )
    on_mismatch: MismatchAction = attrs.field(default="warn", validator=one_of(*MISMATCH_ACTIONS))
    security_protocol: str = attrs.field(
        default="PLAINTEXT",
        validator=one_of("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: str = "PLAIN"
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = secret_field()
    auth_failure_grace: float = attrs.field(default=AUTH_FAILURE_GRACE, validator=positive)
    client_args: Mapping[str, Any] = attrs.field(factory=dict)
    producer_args: Mapping[str, Any] = attrs.field(factory=dict)
    consumer_args: Mapping[str, Any] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ConfigError("heartbeat_interval_ms must be below session_timeout_ms")
        if self.acks != "all" and self.idempotence is True:
            raise ConfigError('idempotence=True needs acks="all"')
        if self.lease_margin_ms is not None and self.lease_margin_ms >= self.session_timeout_ms:
            raise ConfigError("lease_margin_ms must be below session_timeout_ms")

    @property
    def rebalance_timeout_ms(self) -> int:
        """How long the coordinator waits for members to rejoin a rebalance:
        the session, or the revocation's grace plus time to commit."""
        return max(self.session_timeout_ms, int(self.rebalance_grace * 1000) + 5_000)

    @property
    def lease_margin(self) -> float:
        """Seconds partition leases end before the member's session can."""
        if self.lease_margin_ms is None:
            return self.session_timeout_ms / 10_000
        return self.lease_margin_ms / 1000

    def topic_config(self, topic: str) -> TopicConfig:
        """The configuration that applies to *topic* (the health-probe topic
        gets one partition and a short retention unless ``topics``
        configures it)."""
        configured = self.topics.get(topic)
        if configured is not None:
            return configured
        if topic == HEALTH_TOPIC:
            return HEALTH_TOPIC_CONFIG
        return self.topic


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


def client_kwargs(options: KafkaOptions, hosts: Sequence[str], client_id: str) -> dict[str, Any]:
    """Connection keyword arguments shared by every aiokafka client."""
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
