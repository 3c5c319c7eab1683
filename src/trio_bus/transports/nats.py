"""The NATS JetStream transport: ``nats://host:port[,host:port...]``.

nats-py runs on an asyncio loop owned by the transport (through
:mod:`trio_bus.transports._bridge`); Trio code crosses to it once per batch:

* **publish**: :meth:`NatsTransport.publish_batch` sends every JetStream
  publish of a batch at once, matching the server's acks in a dict (no
  future per message), and returns when all are answered: one crossing.
  Each message carries ``Nats-Msg-Id`` (the envelope's event id, or a fresh
  id) so a retried publish is deduplicated by the server, and
  ``X-Aggregate-ID`` when it has a key.
* **consume**: a pull loop on the asyncio side keeps a bounded number of
  messages requested from a durable pull consumer (explicit ack), with idle
  heartbeats so a pull that went silent (server restart) is noticed and
  issued again. Deliveries wait in a bounded buffer that ``fetch`` reads
  directly: trio-asyncio runs asyncio callbacks in a Trio task of the same
  thread, so the hand-over is shared memory plus a parking lot, with no
  crossing at all. Acks and naks are queued by the synchronous
  ``ack``/``release`` and sent in batches by one flusher task (one crossing
  for every consumer's queue); every unsettled delivery gets an in-progress
  ack (``+WPI``) every ``ack_wait / 3`` so AckWait never expires under a
  queued, running or retried message.

Topics map to streams: topic ``orders.eu`` is stream ``orders_eu`` with
subjects ``orders.eu`` and ``orders.eu.>`` (a NATS stream name cannot
contain ``.``). docs/nats.md describes the mapping, the collision rules, the
options and exactly which per-aggregate order guarantees hold on
redelivery.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import attrs
import trio

from .._config import positive as _positive
from .._exceptions import unwrap_lone_exception
from .._message import OutgoingMessage, Record
from .._names import AGGREGATE_ID_HEADER
from ..errors import (
    BusClosedError,
    ConfigError,
    PublishError,
    PublishOutcomeUnknownError,
    TopicConfigError,
    TransportError,
    TransportUnavailableError,
)
from ._base import Consumer, ConsumerSpec, LaneState, Transport, TransportSettings
from ._bridge import Bridge, open_bridge

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client as _NatsClient
    from nats.aio.msg import Msg as _NatsMsg
    from nats.js import api as _api
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ..errors import MissingExtraError

    raise MissingExtraError(
        f'the NATS transport needs nats-py: pip install "trio-bus[nats]" ({exc})'
    ) from exc

__all__ = [
    "ConnectOptions",
    "ConsumerOptions",
    "NatsConsumer",
    "NatsOptions",
    "NatsTransport",
    "StreamOptions",
    "TOPIC_HEADER",
    "open_transport",
    "stream_name",
]

logger = logging.getLogger("trio_bus.nats")

#: Header naming the topic of a message stored in another topic's stream
#: (a nested topic such as ``orders.dlq`` inside stream ``orders``), so the
#: outer topic's consumers can skip it. See docs/nats.md, "Nested topics".
TOPIC_HEADER = "Trio-Bus-Topic"
MSG_ID_HEADER = "Nats-Msg-Id"

#: Seconds the shielded cleanup on exit may take (naks, flush, close).
CLOSE_TIMEOUT = 2.0
#: Seconds acks may wait before the flusher sends them (when no fetch
#: carries them sooner).
ACK_DELAY = 0.005
#: Acks queued that make the flusher send at once.
ACK_BATCH = 256
#: Seconds an ephemeral consumer (``ConsumerSpec.ephemeral``) outlives its
#: last activity on the server.
EPHEMERAL_INACTIVE = 60.0

_ACK = b"+ACK"
_NAK = b"-NAK"
_WPI = b"+WPI"

# JetStream API error codes this module reacts to.
_ERR_STREAM_NOT_FOUND = 10059
_ERR_CONSUMER_NOT_FOUND = 10014
_ERR_SUBJECTS_OVERLAP = 10065
_ERR_STREAM_NAME_IN_USE = 10058

Storage = Literal["file", "memory"]
Retention = Literal["limits", "interest", "workqueue"]
Discard = Literal["old", "new"]
TopicStrategy = Literal["create_only", "create_or_update", "validate_only", "skip"]
MismatchAction = Literal["warn", "fail"]


# ----------------------------------------------------------------- options


def _optional_positive(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None:
        _positive(_, attribute, value)


def _one_of(*choices: object) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            raise ConfigError(f"{attribute.name} must be one of {choices!r}, got {value!r}")

    return check


def _int_at_least(
    minimum: int,
) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{attribute.name} must be an int >= {minimum}, got {value!r}")

    return check


def _optional_int_at_least(
    minimum: int,
) -> Callable[[object, attrs.Attribute[Any], object], None]:
    inner = _int_at_least(minimum)

    def check(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            inner(_, attribute, value)

    return check


@attrs.frozen(kw_only=True)
class StreamOptions:
    """How a topic's JetStream stream is created (and validated).

    Attributes:
        storage: ``"file"`` (survives a server restart) or ``"memory"``.
        retention: ``"limits"``, ``"interest"`` or ``"workqueue"``.
        max_age: Seconds a message is kept (None: no limit).
        max_bytes: Stream size limit in bytes (None: no limit).
        max_msgs: Message count limit (None: no limit).
        replicas: Replica count (clustered servers).
        duplicate_window: Seconds the server remembers ``Nats-Msg-Id`` values
            to drop duplicate publishes.
        discard: What the server does at a limit: drop ``"old"`` messages or
            refuse ``"new"`` ones.
    """

    storage: Storage = attrs.field(default="file", validator=_one_of("file", "memory"))
    retention: Retention = attrs.field(
        default="limits", validator=_one_of("limits", "interest", "workqueue")
    )
    max_age: float | None = attrs.field(default=None, validator=_optional_positive)
    max_bytes: int | None = attrs.field(default=None, validator=_optional_int_at_least(1))
    max_msgs: int | None = attrs.field(default=None, validator=_optional_int_at_least(1))
    replicas: int = attrs.field(default=1, validator=_int_at_least(1))
    duplicate_window: float = attrs.field(default=120.0, validator=_positive)
    discard: Discard = attrs.field(default="old", validator=_one_of("old", "new"))


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

    ack_wait: float = attrs.field(default=30.0, validator=_positive)
    max_deliver: int = attrs.field(default=-1)
    max_ack_pending: int = attrs.field(default=10_000, validator=_int_at_least(1))
    in_progress_interval: float | None = attrs.field(default=None, validator=_optional_positive)
    prefetch: int | None = attrs.field(default=None, validator=_optional_int_at_least(1))
    idle_heartbeat: float = attrs.field(default=2.0, validator=_positive)
    pull_expires: float = attrs.field(default=30.0, validator=_positive)
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
        extra: Any other ``nats.connect`` keyword arguments.
    """

    user: str | None = None
    password: str | None = None
    token: str | None = None
    user_credentials: str | None = None
    nkeys_seed: str | None = None
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None
    name: str | None = None
    connect_timeout: float = attrs.field(default=2.0, validator=_positive)
    reconnect_time_wait: float = attrs.field(default=0.25, validator=_positive)
    ping_interval: float = attrs.field(default=5.0, validator=_positive)
    max_outstanding_pings: int = attrs.field(default=2, validator=_int_at_least(1))
    pending_size: int = attrs.field(default=8 * 1024 * 1024, validator=_int_at_least(0))
    extra: Mapping[str, Any] = attrs.field(factory=dict)


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
    topic_strategy: TopicStrategy = attrs.field(
        default="create_only",
        validator=_one_of("create_only", "create_or_update", "validate_only", "skip"),
    )
    on_mismatch: MismatchAction = attrs.field(default="warn", validator=_one_of("warn", "fail"))
    stream_prefix: str = ""
    publish_timeout: float = attrs.field(default=5.0, validator=_positive)
    request_timeout: float = attrs.field(default=5.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        for name, value, kind in (
            ("stream", self.stream, StreamOptions),
            ("consumer", self.consumer, ConsumerOptions),
            ("connect", self.connect, ConnectOptions),
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
        """The stream settings of *topic*."""
        return self.topics.get(topic, self.stream)


def stream_name(topic: str, prefix: str = "") -> str:
    """The JetStream stream name of *topic*: ``.`` becomes ``_`` because a
    stream name cannot contain dots (``orders.eu`` -> ``orders_eu``)."""
    return prefix + topic.replace(".", "_")


def _duplicate_window(s: StreamOptions) -> float:
    # The server refuses a duplicate window longer than max_age.
    return min(s.duplicate_window, s.max_age) if s.max_age else s.duplicate_window


def _durable_name(group: str, topic: str, nested: bool) -> str:
    # Consumer names cannot contain '.'; a nested topic shares its outer
    # topic's stream, so its consumers carry the topic to stay apart.
    name = group.replace(".", "_")
    if nested:
        name = f"{name}__{topic.replace('.', '_')}"
    return name


# ------------------------------------------------------------ error mapping


def _chain(error: TransportError, cause: BaseException) -> TransportError:
    error.__cause__ = cause
    return error


def _publish_failure(exc: BaseException, subject: str) -> PublishError:
    if isinstance(exc, asyncio.TimeoutError | nats.errors.TimeoutError):
        err: PublishError = PublishOutcomeUnknownError(
            f"no JetStream ack for a publish to {subject!r} in time"
        )
    elif isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        err = PublishError(f"no JetStream stream stores subject {subject!r} (or it is unavailable)")
    elif isinstance(exc, nats.js.errors.APIError):
        err = PublishError(f"JetStream refused a publish to {subject!r}: {exc}")
    else:
        err = PublishError(f"publishing to {subject!r} failed: {exc!r}")
    err.__cause__ = exc
    return err


# ---------------------------------------------------------- asyncio side


@attrs.define(slots=True, eq=False)
class _Delivery:
    """Ack handle of one delivery (``Record.token``)."""

    seq: int
    reply: str
    touched: float
    count: int = 1
    published: float | None = None
    settled: bool = False


@attrs.frozen(slots=True)
class _TopicInfo:
    topic: str
    stream: str
    nested: bool  # stored in another (outer) topic's stream


async def _publish_bulk(nc: _NatsClient, items: Sequence[tuple[str, bytes]]) -> bool:
    """Queue many bodyless-header publishes (acks) as one write; False when
    the fast path does not apply (then publish one by one).

    ``nc.publish`` costs several microseconds per call (validation, command
    formatting); acks are our own well-formed reply subjects, so they are
    formatted in one go. Relies on nats-py's ``_send_command`` /
    ``_flush_pending``, present since nats-py 2.0; checked, not assumed.
    """
    send = getattr(nc, "_send_command", None)
    flush = getattr(nc, "_flush_pending", None)
    if send is None or flush is None or not nc.is_connected:
        return False
    data = b"".join(
        b"PUB %s %d\r\n%s\r\n" % (reply.encode(), len(payload), payload) for reply, payload in items
    )
    await send(data)
    await flush()
    return True


def _parse_reply(reply: str) -> tuple[int, int, float | None]:
    """(delivery count, stream sequence, publish time in seconds since the
    epoch) from a JetStream ack subject."""
    tokens = reply.split(".")
    # v1: $JS.ACK.<stream>.<consumer>.<dc>.<sseq>.<cseq>.<ts>.<pending>
    # v2: $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<dc>.<sseq>.<cseq>.<ts>...
    base = 4 if len(tokens) == 9 else 6
    try:
        stamp: float | None = int(tokens[base + 3]) / 1e9
    except (IndexError, ValueError):
        stamp = None
    return int(tokens[base]), int(tokens[base + 1]), stamp


class _Client(_NatsClient):
    """nats-py's client with a cheaper header parser.

    nats-py checks each header name for whitespace with a generator over its
    characters: a few microseconds per message, a fifth of our per-message
    cost. Same result, computed with ``str.split`` (tests compare both).
    """

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if key and key.split() != [key]:
                continue  # whitespace inside the name: invalid, skipped
            out[key] = value.strip().decode("utf-8", "replace")
        return out


class _Conn:
    """The nats-py connection and everything shared by its users; lives on
    the asyncio side."""

    def __init__(self, options: NatsOptions) -> None:
        self.options = options
        self.nc: _NatsClient = _Client()
        self.connected = asyncio.Event()
        self.closing = False
        #: Set when the connection closed by itself; fetch raises it.
        self.broken: TransportError | None = None
        self.topics: dict[str, _TopicInfo] = {}
        self.pullers: set[_Puller] = set()
        self._topic_locks: dict[str, asyncio.Lock] = {}
        self._js: Any = None
        self._echo_inbox: str | None = None
        self._ack_prefix: str | None = None
        self._ack_seq = 0
        #: reply subject -> (batch, index, topic, value, headers) of every
        #: publish waiting for its JetStream ack.
        self._ack_waiters: dict[str, tuple[_AckBatch, int, str, bytes, dict[str, str]]] = {}
        self._echo_seq = 0
        self._echo_waiters: dict[bytes, asyncio.Future[None]] = {}

    @property
    def js(self) -> Any:
        """The JetStream context, for the management API (cached)."""
        if self._js is None:
            self._js = self.nc.jetstream(timeout=self.options.request_timeout)
        return self._js

    @property
    def jsm(self) -> Any:
        """The JetStream management API."""
        return self.js._jsm

    async def connect(self, servers: list[str], client_id: str) -> None:
        c = self.options.connect

        async def on_error(exc: Exception) -> None:
            logger.warning("nats connection error: %r", exc)

        async def on_disconnected() -> None:
            self.connected.clear()
            if not self.closing:
                logger.warning("disconnected from nats")

        async def on_closed() -> None:
            if not self.closing:
                # nats-py gave up on the connection (it retries forever, so
                # something fatal): make fetch fail loudly instead of waiting.
                logger.error("the nats connection closed: %r", self.nc.last_error)
                self.broken = TransportUnavailableError(
                    f"the nats connection closed: {self.nc.last_error!r}"
                )
                for puller in list(self.pullers):
                    puller._signal()

        async def on_reconnected() -> None:
            logger.warning("reconnected to nats at %s", self.nc.connected_url)
            self.connected.set()
            for puller in list(self.pullers):
                puller.on_reconnected()
            await self.resend_unacked_publishes()

        kwargs: dict[str, Any] = {
            "servers": servers,
            "name": c.name or client_id,
            "error_cb": on_error,
            "disconnected_cb": on_disconnected,
            "reconnected_cb": on_reconnected,
            "closed_cb": on_closed,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "connect_timeout": c.connect_timeout,
            "reconnect_time_wait": c.reconnect_time_wait,
            "ping_interval": c.ping_interval,
            "max_outstanding_pings": c.max_outstanding_pings,
            "pending_size": c.pending_size,
        }
        for key in (
            "user",
            "password",
            "token",
            "user_credentials",
            "nkeys_seed",
            "tls",
            "tls_hostname",
        ):
            value = getattr(c, key)
            if value is not None:
                kwargs[key] = value
        kwargs.update(c.extra)
        kwargs["no_echo"] = False  # ack confirmation echoes to itself
        # The first connection must work: one pass over the servers, then a
        # clear error (reconnects later retry forever).
        # (nats-py retries the first connection forever with -1.)
        kwargs["max_reconnect_attempts"] = 1
        try:
            await self.nc.connect(**kwargs)
        except Exception as exc:
            raise TransportUnavailableError(
                f"cannot connect to nats at {', '.join(servers)}: {exc!r}"
            ) from exc
        self.nc.options["max_reconnect_attempts"] = -1
        self.connected.set()

    async def round_trip(self, seconds: float) -> bool:
        """True once everything published before the call has been processed
        by the server; False after *seconds* or on a broken connection.

        A message to our own inbox comes back only after the server has
        handled what this connection sent before it. (nats-py's ``flush``
        PING can overtake buffered publishes, and cancelling it on a
        timeout breaks its read loop.)
        """
        nc = self.nc
        if nc.is_closed:
            return False
        loop = asyncio.get_running_loop()
        if self._echo_inbox is None:
            self._echo_inbox = nc.new_inbox()

            async def on_echo(msg: _NatsMsg) -> None:
                waiter = self._echo_waiters.pop(msg.data, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

            await nc.subscribe(self._echo_inbox, cb=on_echo)
        self._echo_seq += 1
        token = b"%d" % self._echo_seq
        waiter: asyncio.Future[None] = loop.create_future()
        self._echo_waiters[token] = waiter
        try:
            await nc.publish(self._echo_inbox, token)
            await asyncio.wait({waiter}, timeout=seconds)
        except Exception as exc:
            logger.debug("round trip failed: %r", exc)
        finally:
            self._echo_waiters.pop(token, None)
        return waiter.done()

    async def close(self) -> None:
        self.closing = True
        for puller in list(self.pullers):
            puller.stop_tasks()
        if not self.nc.is_closed:
            try:
                await self.nc.close()
            except Exception:
                logger.exception("closing the nats connection failed")

    async def wait_connected(self, seconds: float) -> bool:
        if self.nc.is_connected:
            return True
        try:
            await asyncio.wait_for(self.connected.wait(), seconds)
        except TimeoutError:
            return False
        return self.nc.is_connected

    # ------------------------------------------------------------ streams

    async def ensure_topic(self, topic: str) -> _TopicInfo:
        """Apply the topic strategy to *topic*'s stream once per transport;
        return where the topic lives."""
        info = self.topics.get(topic)
        if info is not None:
            return info
        lock = self._topic_locks.setdefault(topic, asyncio.Lock())
        async with lock:
            info = self.topics.get(topic)
            if info is None:
                info = await self._ensure_topic(topic)
                self.topics[topic] = info
            return info

    async def _ensure_topic(self, topic: str) -> _TopicInfo:
        opts = self.options
        name = stream_name(topic, opts.stream_prefix)
        if opts.topic_strategy == "skip":
            return _TopicInfo(topic, name, nested=False)
        jsm = self.jsm
        try:
            info = await jsm.stream_info(name)
        except nats.js.errors.NotFoundError:
            info = None
        except Exception as exc:
            raise _map_api_error(exc, f"reading stream {name!r} of topic {topic!r}") from exc
        if info is not None:
            return await self._check_existing(topic, name, info)
        outer = await self._outer_stream(topic)
        if outer is not None:
            return _TopicInfo(topic, outer, nested=True)
        if opts.topic_strategy == "validate_only":
            raise TopicConfigError(
                f"stream {name!r} for topic {topic!r} does not exist "
                "(topic_strategy='validate_only' never creates streams)"
            )
        config = self._stream_config(topic, name)
        try:
            await jsm.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _ERR_SUBJECTS_OVERLAP:
                raise TopicConfigError(
                    f"cannot create stream {name!r} for topic {topic!r}: its subjects "
                    f"{topic!r}/{topic + '.>'!r} overlap an existing stream (a topic "
                    f"nested inside {topic!r}, e.g. {topic + '.dlq'!r}, was created first). "
                    "See docs/nats.md, 'Nested topics'."
                ) from exc
            if exc.err_code == _ERR_STREAM_NAME_IN_USE:  # a racing creator won
                info = await jsm.stream_info(name)
                return await self._check_existing(topic, name, info)
            raise _map_api_error(exc, f"creating stream {name!r}") from exc
        except Exception as exc:
            raise _map_api_error(exc, f"creating stream {name!r}") from exc
        logger.info("created stream %s for topic %s", name, topic)
        return _TopicInfo(topic, name, nested=False)

    async def _outer_stream(self, topic: str) -> str | None:
        """The stream of an outer topic whose ``<outer>.>`` subject captures
        *topic*, or None."""
        try:
            found: str = await self.jsm.find_stream_name_by_subject(topic)
        except nats.js.errors.NotFoundError:
            return None
        except Exception as exc:
            raise _map_api_error(exc, f"looking up the stream of {topic!r}") from exc
        return found

    def _stream_config(self, topic: str, name: str) -> Any:
        s = self.options.stream_for(topic)
        return _api.StreamConfig(
            name=name,
            subjects=[topic, f"{topic}.>"],
            storage=_api.StorageType(s.storage),
            retention=_api.RetentionPolicy(s.retention),
            max_age=s.max_age or 0,
            max_bytes=s.max_bytes if s.max_bytes is not None else -1,
            max_msgs=s.max_msgs if s.max_msgs is not None else -1,
            num_replicas=s.replicas,
            duplicate_window=_duplicate_window(s),
            discard=_api.DiscardPolicy(s.discard),
        )

    async def _check_existing(self, topic: str, name: str, info: Any) -> _TopicInfo:
        cfg = info.config
        subjects = set(cfg.subjects or ())
        if topic not in subjects and f"{topic}.>" not in subjects:
            raise TopicConfigError(
                f"stream {name!r} exists but does not store topic {topic!r} "
                f"(its subjects: {sorted(subjects)}); two topics map to one stream name "
                "when they differ only in '.' vs '_' - rename one or set stream_prefix"
            )
        if self.options.topic_strategy == "skip":
            return _TopicInfo(topic, name, nested=False)
        diffs = self._differences(topic, cfg)
        if diffs:
            what = "; ".join(diffs)
            if self.options.topic_strategy == "create_or_update":
                wanted = self._stream_config(topic, name)
                wanted.subjects = sorted(subjects | {topic, f"{topic}.>"})
                try:
                    await self.jsm.update_stream(wanted)
                except Exception as exc:
                    self._mismatch(f"stream {name!r}: {what}; update refused: {exc}", exc)
                else:
                    logger.info("updated stream %s: %s", name, what)
            else:
                self._mismatch(f"stream {name!r} differs from its options: {what}", None)
        return _TopicInfo(topic, name, nested=False)

    def _mismatch(self, message: str, cause: BaseException | None) -> None:
        if self.options.on_mismatch == "fail":
            raise TopicConfigError(message) from cause
        logger.warning("%s", message)

    def _differences(self, topic: str, cfg: Any) -> list[str]:
        s = self.options.stream_for(topic)

        def enum_value(value: Any) -> Any:
            return getattr(value, "value", value)

        def limit(value: Any) -> int:
            return -1 if value is None or value <= 0 else int(value)

        pairs: list[tuple[str, Any, Any]] = [
            ("storage", s.storage, enum_value(cfg.storage)),
            ("retention", s.retention, enum_value(cfg.retention)),
            ("discard", s.discard, enum_value(cfg.discard)),
            ("replicas", s.replicas, cfg.num_replicas or 1),
            ("max_bytes", limit(s.max_bytes), limit(cfg.max_bytes)),
            ("max_msgs", limit(s.max_msgs), limit(cfg.max_msgs)),
        ]
        out = [f"{n}: wanted {w!r}, server has {h!r}" for n, w, h in pairs if w != h]
        for label, wanted, have in (
            ("max_age", s.max_age or 0.0, cfg.max_age or 0.0),
            ("duplicate_window", _duplicate_window(s), cfg.duplicate_window or 0.0),
        ):
            if abs(float(wanted) - float(have)) > 1e-3:
                out.append(f"{label}: wanted {wanted!r}s, server has {have!r}s")
        return out

    # ------------------------------------------------------------ publish

    async def publish_many(self, records: Sequence[OutgoingMessage]) -> list[Exception | None]:
        """Publish *records*, all in flight at once; one outcome each."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.publish_timeout
        outcomes: list[Exception | None] = [None] * len(records)
        topics: dict[str, _TopicInfo | Exception] = {}
        for record in records:
            if record.topic not in topics:
                try:
                    topics[record.topic] = await self.ensure_topic(record.topic)
                except TransportError as exc:
                    topics[record.topic] = exc
        await self._publish_indices(records, range(len(records)), topics, outcomes, deadline)
        # A stream deleted behind our back: forget it, recreate, try once more.
        missing = [
            i
            for i, o in enumerate(outcomes)
            if o is not None and isinstance(o.__cause__, nats.js.errors.NoStreamResponseError)
        ]
        if missing and self.options.topic_strategy != "skip":
            for i in missing:
                self.topics.pop(records[i].topic, None)
            for topic in {records[i].topic for i in missing}:
                try:
                    topics[topic] = await self.ensure_topic(topic)
                except TransportError as exc:
                    topics[topic] = exc
            await self._publish_indices(records, missing, topics, outcomes, deadline)
        return outcomes

    async def _publish_indices(
        self,
        records: Sequence[OutgoingMessage],
        indices: Sequence[int],
        topics: Mapping[str, _TopicInfo | Exception],
        outcomes: list[Exception | None],
        deadline: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        if not await self.wait_connected(max(0.0, deadline - loop.time())):
            for i in indices:
                if not isinstance(topics[records[i].topic], Exception):
                    outcomes[i] = PublishError(
                        f"not connected to nats for {self.options.publish_timeout}s: "
                        "the message was not sent"
                    )
        acks = await self._ack_inbox()
        batch = _AckBatch(loop.create_future(), outcomes)
        sent: list[tuple[int, str]] = []
        nc = self.nc
        for i in indices:
            record = records[i]
            where = topics[record.topic]
            if isinstance(where, Exception):
                # One fresh error per message (the core adds notes to it);
                # the topic's problem (TopicConfigError...) is the cause.
                failure = PublishError(f"not sent to {record.topic!r}: {where}")
                failure.__cause__ = where
                outcomes[i] = failure
                continue
            previous = outcomes[i]
            if previous is not None and not isinstance(
                previous.__cause__, nats.js.errors.NoStreamResponseError
            ):
                continue  # not connected: not sent
            outcomes[i] = None
            headers = dict(record.headers)
            headers[MSG_ID_HEADER] = record.message_id or uuid.uuid4().hex
            if record.key is not None:
                headers[AGGREGATE_ID_HEADER] = record.key
            if where.nested:
                headers[TOPIC_HEADER] = record.topic
            else:
                headers.pop(TOPIC_HEADER, None)
            self._ack_seq += 1
            reply = f"{acks}{self._ack_seq}"
            self._ack_waiters[reply] = (batch, i, record.topic, record.value, headers)
            batch.waiting += 1
            try:
                await nc.publish(record.topic, record.value, reply=reply, headers=headers)
            except Exception as exc:
                del self._ack_waiters[reply]
                batch.waiting -= 1
                outcomes[i] = _publish_failure(exc, record.topic)
            else:
                sent.append((i, reply))
        batch.sealed = True
        if batch.waiting > 0:
            await asyncio.wait({batch.done}, timeout=max(0.0, deadline - loop.time()))
        for i, reply in sent:
            if self._ack_waiters.pop(reply, None) is not None:
                outcomes[i] = _publish_failure(TimeoutError(), records[i].topic)

    async def _ack_inbox(self) -> str:
        """The reply-subject prefix of JetStream publish acks; subscribed
        once per connection.

        One wildcard subscription and a dict instead of nats-py's
        ``publish_async`` futures: under trio-asyncio every asyncio callback
        is a Trio scheduler round, and a future per message costs two.
        """
        if self._ack_prefix is None:
            prefix = self.nc.new_inbox() + "."
            await self.nc.subscribe(prefix + "*", cb=self._on_publish_ack)
            self._ack_prefix = prefix
        return self._ack_prefix

    async def resend_unacked_publishes(self) -> None:
        """After a reconnection: publish again what has no ack yet, with
        the same ``Nats-Msg-Id`` (the server drops a copy it already
        stored), so a short outage costs a delay, not an unknown outcome."""
        for reply, (_, _, topic, value, headers) in list(self._ack_waiters.items()):
            try:
                await self.nc.publish(topic, value, reply=reply, headers=headers)
            except Exception as exc:
                logger.debug("re-publishing after a reconnection failed: %r", exc)
                return

    async def _on_publish_ack(self, msg: _NatsMsg) -> None:
        entry = self._ack_waiters.pop(msg.subject, None)
        if entry is None:
            return  # late: already reported as outcome unknown
        batch, index, topic = entry[:3]
        headers = msg.headers
        if headers and headers.get("Status") == "503":
            failure: Exception | None = nats.js.errors.NoStreamResponseError()
        elif b'"error"' in msg.data:
            try:
                nats.js.errors.APIError.from_error(json.loads(msg.data)["error"])
            except Exception as exc:  # from_error raises the mapped error
                failure = exc
            else:
                failure = None
        else:
            failure = None
        if failure is not None:
            batch.outcomes[index] = _publish_failure(failure, topic)
        batch.waiting -= 1
        if batch.sealed and batch.waiting <= 0 and not batch.done.done():
            batch.done.set_result(None)


@attrs.define(eq=False)
class _AckBatch:
    """The publishes of one ``publish_batch`` call waiting for their acks."""

    done: asyncio.Future[None]
    outcomes: list[Exception | None]
    waiting: int = 0
    sealed: bool = False


def _map_api_error(exc: BaseException, doing: str) -> TransportError:
    if isinstance(exc, TransportError):
        return exc
    if isinstance(
        exc,
        asyncio.TimeoutError
        | nats.errors.TimeoutError
        | nats.errors.NoRespondersError
        | nats.errors.ConnectionClosedError
        | nats.js.errors.ServiceUnavailableError,
    ):
        return _chain(TransportUnavailableError(f"{doing}: JetStream unavailable ({exc!r})"), exc)
    return _chain(TopicConfigError(f"{doing} failed: {exc}"), exc)


class _Puller:
    """One durable pull consumer's delivery machinery (asyncio side)."""

    def __init__(self, conn: _Conn, spec: ConsumerSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.copts = conn.options.consumer
        prefetch = self.copts.prefetch or 2 * spec.max_batch
        self.prefetch = max(1, min(prefetch, self.copts.max_ack_pending))
        self.where: _TopicInfo | None = None
        self.durable = ""
        self.inbox = ""
        self.sub: Any = None
        self.buffer: collections.deque[tuple[_NatsMsg, _Delivery]] = collections.deque()
        self.unsettled: dict[int, _Delivery] = {}
        #: (reply subject, payload) waiting to be sent, in order.
        self.outbox: list[tuple[str, bytes]] = []
        #: acks sent but not yet confirmed by an echo round trip
        #: (Conn.round_trip); sent again after a reconnection (acks are
        #: idempotent).
        self.unconfirmed: list[str] = []
        self.generation = 0  # bumped by each reconnection
        self.requested = 0
        self.max_seq = 0  # highest stream sequence delivered to us
        self.last_activity = 0.0
        self.closed = False
        self.closing = False
        self.need_bind = False
        #: Trio tasks waiting in fetch; unparked from the asyncio side (same
        #: thread: trio-asyncio runs asyncio callbacks inside a Trio task).
        self.arrived = trio.lowlevel.ParkingLot()
        self.wake = asyncio.Event()
        self.confirm = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        # Ordered resume after an unclean stop (see ConsumerOptions).
        self.barrier_seq = 0
        self.barrier_left = 0
        self.barrier_deadline = 0.0
        self.held: list[tuple[_NatsMsg, _Delivery]] = []
        self.old: list[tuple[_NatsMsg, _Delivery]] = []

    # ---------------------------------------------------------- lifecycle

    async def start(self) -> None:
        conn = self.conn
        self.where = await conn.ensure_topic(self.spec.topic)
        self.durable = _durable_name(self.spec.group, self.spec.topic, self.where.nested)
        if self.spec.ephemeral:
            self.durable = f"{self.durable}_{uuid.uuid4().hex[:12]}"
        self.inbox = conn.nc.new_inbox()
        self.sub = await conn.nc.subscribe(
            self.inbox, cb=self._on_msg, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        info = await self._bind()
        loop = asyncio.get_running_loop()
        # Unacked deliveries and no live member pulling (a live member keeps
        # a pull request waiting): the previous holder died; see
        # ConsumerOptions.ordered_resume.
        live_here = any(p.where == self.where and p.durable == self.durable for p in conn.pullers)
        if (
            self.copts.ordered_resume
            and not self.spec.ephemeral
            and info.num_ack_pending
            and not info.num_waiting
            and not live_here
        ):
            self.barrier_seq = info.delivered.stream_seq or 0
            self.barrier_left = info.num_ack_pending
            self.barrier_deadline = (
                loop.time() + self.copts.ack_wait + 2 * self.copts.idle_heartbeat
            )
            logger.info(
                "%s/%s: %d deliveries of a previous holder are unacked; holding new "
                "messages until they are redelivered (<= %.1fs)",
                self.spec.topic,
                self.durable,
                self.barrier_left,
                self.barrier_deadline - loop.time(),
            )
        if self.closing:
            # close() ran while we were starting (a cancelled open_consumer:
            # trio-asyncio does not wait for the asyncio task to unwind).
            if self.sub is not None:
                with contextlib.suppress(Exception):
                    await self.sub.unsubscribe()
            return
        conn.pullers.add(self)
        self.last_activity = loop.time()
        self.tasks = [
            asyncio.ensure_future(self._pull_loop()),
            asyncio.ensure_future(self._confirm_loop()),
        ]
        # Bound: the first pull request is on its way before open_consumer
        # returns, so a message published right after is delivered.
        await self._maybe_pull()

    async def _bind(self, resume: Literal["", "consumer_lost", "stream_new"] = "") -> Any:
        """Create the durable consumer, or resume the existing one.

        *resume* says why we bind again while running: then a consumer
        that has to be created starts where this one was, not at
        ``spec.start``.
        """
        assert self.where is not None
        topic, copts = self.spec.topic, self.copts
        ephemeral = self.spec.ephemeral
        config = _api.ConsumerConfig(
            name=self.durable,
            # An ephemeral consumer has no durable name: the server deletes
            # it after inactive_threshold even if we die without cleaning up.
            durable_name=None if ephemeral else self.durable,
            inactive_threshold=EPHEMERAL_INACTIVE if ephemeral else None,
            deliver_policy=_api.DeliverPolicy.NEW
            if self.spec.start == "latest"
            else _api.DeliverPolicy.ALL,
            ack_policy=_api.AckPolicy.EXPLICIT,
            ack_wait=copts.ack_wait,
            max_deliver=copts.max_deliver,
            max_ack_pending=copts.max_ack_pending,
            filter_subjects=[topic, f"{topic}.>"] if self.where.nested else None,
        )
        jsm = self.conn.jsm
        stream = self.where.stream
        try:
            info = await jsm.consumer_info(stream, self.durable)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == _ERR_STREAM_NOT_FOUND:
                raise TopicConfigError(
                    f"stream {stream!r} of topic {topic!r} does not exist"
                ) from exc
            if resume == "consumer_lost" and self.max_seq:
                try:
                    state = (await jsm.stream_info(stream)).state
                except Exception as exc2:
                    raise _map_api_error(exc2, f"reading stream {stream!r}") from exc2
                if state.last_seq < self.max_seq:
                    resume = "stream_new"  # sequences restarted: a new stream
            if resume == "stream_new":
                # The stream itself was lost and created again: everything
                # in it is new to us.
                config.deliver_policy = _api.DeliverPolicy.ALL
            elif resume == "consumer_lost" and self.max_seq:
                # The consumer vanished, the stream did not: go on from the
                # oldest delivery not settled (at least once, no gap).
                config.deliver_policy = _api.DeliverPolicy.BY_START_SEQUENCE
                config.opt_start_seq = min(self.unsettled, default=self.max_seq + 1)
            try:
                return await jsm.add_consumer(stream, config)
            except Exception as exc2:
                raise _map_api_error(
                    exc2, f"creating consumer {self.durable!r} on {stream!r}"
                ) from exc2
        except Exception as exc:
            raise _map_api_error(exc, f"reading consumer {self.durable!r} on {stream!r}") from exc
        have = info.config
        if (
            abs((have.ack_wait or 0) - copts.ack_wait) > 1e-3
            or (have.max_deliver or -1) != copts.max_deliver
            or (have.max_ack_pending or 0) != copts.max_ack_pending
        ):
            # Those three may change on a live durable; the deliver policy
            # of an existing group is kept (it resumes where it acked).
            config.deliver_policy = have.deliver_policy
            config.opt_start_seq = have.opt_start_seq
            config.opt_start_time = have.opt_start_time
            try:
                info = await jsm.add_consumer(stream, config)
            except Exception as exc:
                logger.warning("could not update consumer %s on %s: %s", self.durable, stream, exc)
        return info

    async def _rebind(self) -> None:
        """Bind again after the pull went silent or the consumer vanished;
        a memory-storage stream lost in a server restart is created again
        (per the topic strategy)."""
        try:
            await self._bind(resume="consumer_lost")
        except TopicConfigError:
            if self.conn.options.topic_strategy in ("skip", "validate_only"):
                raise
            self.conn.topics.pop(self.spec.topic, None)
            where = await self.conn.ensure_topic(self.spec.topic)
            if where != self.where:
                raise TopicConfigError(
                    f"topic {self.spec.topic!r} moved to stream {where.stream!r}"
                ) from None
            await self._bind(resume="stream_new")

    async def info(self) -> Any:
        """The consumer's state on the server, or None when unreachable."""
        assert self.where is not None
        try:
            return await self.conn.jsm.consumer_info(self.where.stream, self.durable)
        except Exception as exc:
            logger.debug("consumer info of %s failed: %r", self.durable, exc)
            return None

    def stop_tasks(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.conn.pullers.discard(self)

    async def close(self) -> None:
        """Stop pulling, nak everything unsettled (lowest sequence first, so
        the next holder gets them back in order), flush."""
        if self.closed:
            return
        self.closing = True
        for task in self.tasks:
            task.cancel()
        self.conn.pullers.discard(self)
        nc = self.conn.nc
        if self.sub is not None and not nc.is_closed:
            # drain: unsubscribe, then still see (and nak) what the server
            # had already sent to this inbox.
            try:
                await self.sub.drain()
            except Exception as exc:
                logger.debug("draining the pull inbox failed: %r", exc)
        self.closed = True
        self.buffer.clear()
        self.held.clear()
        self.old.clear()
        self._signal()
        for seq in sorted(self.unsettled):
            delivery = self.unsettled[seq]
            delivery.settled = True
            self.outbox.append((delivery.reply, _NAK))
        self.unsettled.clear()
        await self.send_outbox(confirm=True)
        if self.spec.ephemeral and self.where is not None and not nc.is_closed:
            try:
                await self.conn.jsm.delete_consumer(self.where.stream, self.durable)
            except Exception as exc:
                logger.debug("deleting ephemeral consumer %s: %r", self.durable, exc)

    def on_reconnected(self) -> None:
        # Pull requests died with the old connection (or server); acks in
        # flight may be lost: send them again, then pull again.
        self.requested = 0
        self.generation += 1
        if self.unconfirmed:
            self.outbox[:0] = [(reply, _ACK) for reply in self.unconfirmed]
            self.unconfirmed.clear()
        self.wake.set()

    # ---------------------------------------------------------- receiving

    async def _on_msg(self, msg: _NatsMsg) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.last_activity = now
        headers = msg.headers
        if headers and not msg.data and "Status" in headers:
            self._on_status(headers)
            return
        reply = msg.reply
        if not reply:
            return
        if self.requested > 0:
            self.requested -= 1
        count, seq, stamp = _parse_reply(reply)
        if seq > self.max_seq:
            self.max_seq = seq
        delivery = _Delivery(seq, reply, now, count, stamp)
        if self.closing:
            # Draining at close: nak'd with the rest, in stream order.
            self.unsettled.setdefault(seq, delivery)
            return
        if headers and self.where is not None and not self.where.nested:
            owner = headers.get(TOPIC_HEADER)
            if owner is not None and owner != self.spec.topic:
                # A nested topic's message stored in this topic's stream.
                self.outbox.append((reply, _ACK))
                self.wake.set()
                return
        previous = self.unsettled.get(seq)
        if previous is not None:
            previous.settled = True  # superseded by this redelivery
        self.unsettled[seq] = delivery
        item = (msg, delivery)
        if self.barrier_left or self.held:
            self._through_barrier(item, count, now)
        else:
            self.buffer.append(item)
        self._signal()

    def _through_barrier(self, item: tuple[_NatsMsg, _Delivery], count: int, now: float) -> None:
        if item[1].seq <= self.barrier_seq and count > 1:
            self.old.append(item)
            self.barrier_left -= 1
        else:
            self.held.append(item)
        if self.barrier_left <= 0 or now >= self.barrier_deadline:
            self._lift_barrier()

    def _lift_barrier(self) -> None:
        self.old.sort(key=lambda item: item[1].seq)
        self.buffer.extend(self.old)
        self.buffer.extend(self.held)
        self.old.clear()
        self.held.clear()
        self.barrier_left = 0
        self._signal()

    def _on_status(self, headers: Mapping[str, str]) -> None:
        status = headers.get("Status")
        if status == "100":  # idle heartbeat
            return
        pending = headers.get("Nats-Pending-Messages")
        if status in ("404", "408", "409"):
            if pending is not None:
                self.requested = max(0, self.requested - int(pending))
            elif status != "409":
                self.requested = 0
            description = headers.get("Description", "")
            if status == "409":
                logger.info("pull request ended: 409 %s", description)
                if "Deleted" in description or not pending:
                    self.requested = 0
                if "Consumer Deleted" in description:
                    self.need_bind = True
        elif status == "503":
            # No responders: JetStream not ready yet (server restarting) or
            # the consumer/stream is gone.
            self.requested = 0
            self.need_bind = True
        else:
            logger.warning("unexpected pull status %s %s", status, headers.get("Description"))
            self.requested = 0
        self.wake.set()

    # ------------------------------------------------------------ pulling

    def _in_hand(self) -> int:
        return len(self.buffer) + (0 if self.barrier_left else len(self.held))

    def _pull_size(self) -> int:
        """Messages to request now: the free room, once it is at least half
        the prefetch window (or anything when nothing is requested)."""
        room = self.prefetch - self.requested - self._in_hand()
        if room <= 0 or (self.requested and room < max(1, self.prefetch // 2)):
            return 0
        return room

    async def _maybe_pull(self) -> None:
        if self.closing or not self.conn.nc.is_connected:
            return
        room = self._pull_size()
        if not room:
            return
        copts = self.copts
        request = b'{"batch":%d,"expires":%d,"idle_heartbeat":%d}' % (
            room,
            int(copts.pull_expires * 1e9),
            int(copts.idle_heartbeat * 1e9),
        )
        assert self.where is not None
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.where.stream}.{self.durable}"
        if not self.requested:
            self.last_activity = asyncio.get_running_loop().time()
        self.requested += room
        try:
            await self.conn.nc.publish(subject, request, reply=self.inbox)
        except Exception as exc:
            self.requested -= room
            logger.debug("pull request failed: %r", exc)

    async def _pull_loop(self) -> None:
        loop = asyncio.get_running_loop()
        copts = self.copts
        wpi_every = copts.wpi_interval
        tick = min(copts.idle_heartbeat, wpi_every / 2, 1.0)
        next_wpi = loop.time() + wpi_every / 2
        backoff = 0.05
        while True:
            try:
                if self.need_bind and self.conn.nc.is_connected:
                    try:
                        await self._rebind()
                    except TransportError as exc:
                        logger.warning("re-binding %s failed: %s; retrying", self.durable, exc)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
                        continue
                    self.need_bind = False
                    self.requested = 0
                    backoff = 0.05
                await self._send_outbox_if_any()
                await self._maybe_pull()
                try:
                    await asyncio.wait_for(self.wake.wait(), tick)
                except TimeoutError:
                    pass
                self.wake.clear()
                now = loop.time()
                if self.barrier_left and now >= self.barrier_deadline:
                    logger.info("%s: ordered-resume window over", self.durable)
                    self._lift_barrier()
                if self.requested and now - self.last_activity > 2 * copts.idle_heartbeat + 0.5:
                    # No message and no heartbeat: the pull is gone (server
                    # restart, lost connection). Issue a new one.
                    logger.info("pull on %s went silent; pulling again", self.durable)
                    self.requested = 0
                    self.need_bind = True
                if now >= next_wpi:
                    next_wpi = now + wpi_every / 2
                    self._queue_in_progress(now - wpi_every)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("nats pull loop of %s failed; continuing", self.durable)
                await asyncio.sleep(backoff)

    def _queue_in_progress(self, older_than: float) -> None:
        now = asyncio.get_running_loop().time()
        for delivery in self.unsettled.values():
            if delivery.touched <= older_than:
                delivery.touched = now
                self.outbox.append((delivery.reply, _WPI))

    # ------------------------------------------------------------- settling

    async def _send_outbox_if_any(self) -> None:
        if self.outbox:
            await self.send_outbox()

    async def send_outbox(self, *, confirm: bool = False) -> None:
        """Send queued acks/naks/in-progress acks now."""
        nc = self.conn.nc
        batch, self.outbox = self.outbox, []
        if not batch:
            pass
        elif await _publish_bulk(nc, batch):
            self.unconfirmed.extend(reply for reply, payload in batch if payload is _ACK)
            batch = []
        for i, (reply, payload) in enumerate(batch):
            try:
                await nc.publish(reply, payload)
            except Exception as exc:
                # Not connected and the reconnect buffer is full, or closed:
                # keep the rest for later (acks are never dropped silently).
                self.outbox[:0] = batch[i:]
                logger.debug("sending acks failed: %r", exc)
                break
            if payload is _ACK:
                self.unconfirmed.append(reply)
        if self.unconfirmed:
            self.confirm.set()
        if confirm and not nc.is_closed:
            count, generation = len(self.unconfirmed), self.generation
            if await self.conn.round_trip(CLOSE_TIMEOUT):
                self._confirmed(count, generation)

    def _confirmed(self, count: int, generation: int) -> None:
        if generation == self.generation:
            del self.unconfirmed[:count]

    async def _confirm_loop(self) -> None:
        while True:
            await self.confirm.wait()
            self.confirm.clear()
            count, generation = len(self.unconfirmed), self.generation
            if not count:
                continue
            if await self.conn.round_trip(max(1.0, self.conn.options.connect.ping_interval)):
                self._confirmed(count, generation)
            # else: kept; on_reconnected sends them again.

    # -------------------------------------------------------------- handing over

    def _signal(self) -> None:
        if self.arrived:
            self.arrived.unpark_all()

    def take_nowait(self, max_records: int) -> list[Record]:
        """Up to *max_records* buffered deliveries as Records (maybe none).

        Called from Trio: the buffer is plain memory shared in one thread,
        so handing a batch over costs no bridge crossing at all.
        """
        out: list[Record] = []
        topic = self.spec.topic
        buffer = self.buffer
        while buffer and len(out) < max_records:
            msg, delivery = buffer.popleft()
            if delivery.settled:
                continue  # superseded by a redelivery already queued
            out.append(
                Record(
                    topic=topic,
                    subject=msg.subject,
                    value=msg.data,
                    key=None,
                    headers=msg.headers or {},
                    partition=None,
                    offset=delivery.seq,
                    delivery_count=delivery.count,
                    token=delivery,
                    timestamp=delivery.published,
                )
            )
        # Room in the buffer: let the pull loop top up (asyncio call_soon
        # works from Trio code on trio-asyncio's loop). Only when it would
        # pull: each wake-up is a round of trio-asyncio's loop.
        if self._pull_size() and not self.wake.is_set():
            self.wake.set()
        return out


async def _send_outboxes(pullers: Sequence[_Puller]) -> None:
    for puller in pullers:
        if not puller.closed:
            await puller.send_outbox()


# ------------------------------------------------------------- trio side


class NatsConsumer(Consumer):
    """A durable JetStream pull consumer bound to one subscription."""

    def __init__(self, transport: NatsTransport, puller: _Puller) -> None:
        self._transport = transport
        self._puller = puller
        self._bridge = transport._bridge
        self._closed = False

    @property
    def stream(self) -> str:
        """The JetStream stream holding this consumer's topic."""
        assert self._puller.where is not None
        return self._puller.where.stream

    @property
    def durable(self) -> str:
        """The durable consumer name."""
        return self._puller.durable

    async def fetch(self, max_records: int) -> Sequence[Record]:
        puller = self._puller
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed or puller.closed or puller.closing:
                raise BusClosedError("the consumer is closed")
            broken = puller.conn.broken
            if broken is not None:
                raise TransportUnavailableError(str(broken)) from broken
            if puller.buffer:
                records = puller.take_nowait(max_records)
                if records:
                    # Yield without a cancellation point: taken records must
                    # reach the caller (else they would sit unsettled).
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return records
                continue
            await puller.arrived.park()

    def _settle(self, record: Record, payload: bytes) -> None:
        delivery = record.token
        if not isinstance(delivery, _Delivery) or self._closed:
            return
        puller = self._puller
        if not delivery.settled:
            delivery.settled = True
            if puller.unsettled.get(delivery.seq) is delivery:
                del puller.unsettled[delivery.seq]
        puller.outbox.append((delivery.reply, payload))
        self._transport._wake_flusher(len(puller.outbox))

    def ack(self, record: Record) -> None:
        self._settle(record, _ACK)

    def release(self, record: Record) -> None:
        self._settle(record, _NAK)

    async def flush(self) -> None:
        await self._bridge.call(self._puller.send_outbox, confirm=True)

    async def lanes(self) -> Sequence[LaneState]:
        """One lane: the whole consumer (NATS has no partitions). Asks the
        server for the consumer's state (one crossing)."""
        puller = self._puller
        if self._closed or puller.where is None:
            return ()
        info = await self._bridge.call(puller.info)
        in_flight = len(puller.unsettled)
        if info is None:
            return (LaneState(topic=puller.spec.topic, in_flight=in_flight),)
        return (
            LaneState(
                topic=puller.spec.topic,
                committed=info.ack_floor.stream_seq if info.ack_floor else None,
                lag=(info.num_pending or 0) + (info.num_ack_pending or 0),
                ack_pending=info.num_ack_pending,
                in_flight=in_flight,
            ),
        )

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._transport._consumers.discard(self)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CLOSE_TIMEOUT
            await self._bridge.call(self._puller.close)


class NatsTransport(Transport):
    """JetStream through nats-py on a trio-asyncio loop."""

    name = "nats"
    coalesce_publishes = True

    def __init__(self, bridge: Bridge, conn: _Conn, nursery: trio.Nursery) -> None:
        self._bridge = bridge
        self._conn = conn
        self._nursery = nursery
        self._consumers: set[NatsConsumer] = set()
        self._flush_wanted = trio.Event()

    def _wake_flusher(self, queued: int) -> None:
        if queued >= ACK_BATCH or not self._flush_wanted.is_set():
            self._flush_wanted.set()

    async def _flusher(self) -> None:
        # One task for all consumers: waits ACK_DELAY after the first queued
        # ack (or not at all once ACK_BATCH are queued), then sends every
        # consumer's queue in one crossing.
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            pullers = [c._puller for c in self._consumers]
            if sum(len(p.outbox) for p in pullers) < ACK_BATCH:
                await trio.sleep(ACK_DELAY)
            pullers = [p for p in pullers if p.outbox]
            if pullers:
                await self._bridge.call(_send_outboxes, pullers)

    @property
    def connected(self) -> bool:
        """Whether the nats connection is up right now."""
        return bool(self._conn.nc.is_connected)

    @property
    def options(self) -> NatsOptions:
        """The options in effect."""
        return self._conn.options

    async def publish_batch(self, records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
        if not records:
            await trio.lowlevel.checkpoint()
            return []
        return await self._bridge.call(self._conn.publish_many, records)

    async def open_consumer(self, spec: ConsumerSpec) -> NatsConsumer:
        puller = _Puller(self._conn, spec)
        try:
            await self._bridge.call(puller.start)
        except BaseException:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                await self._bridge.call(puller.close)
            raise
        consumer = NatsConsumer(self, puller)
        self._consumers.add(consumer)
        return consumer

    async def run_on_loop(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Run an asyncio coroutine function on the transport's loop (one
        crossing), e.g. to reach the nats-py client in tests and tools."""
        return await self._bridge.call(fn, *args)

    @property
    def client(self) -> Any:
        """The underlying ``nats.aio.client.Client`` (use it on the
        transport's loop only, through :meth:`run_on_loop`)."""
        return self._conn.nc


def _servers(settings: TransportSettings) -> list[str]:
    return [host if "://" in host else f"nats://{host}" for host in settings.hosts]


@asynccontextmanager
async def open_transport(settings: TransportSettings) -> AsyncIterator[NatsTransport]:
    """Connect to NATS; everything (loop, client, tasks) ends with the block.

    Raises:
        ConfigError: ``settings.options`` is not a :class:`NatsOptions`.
        TransportUnavailableError: no server could be reached.
    """
    # The loop's and our nurseries wrap what passes through them; raise a
    # lone exception as itself, as a plain context manager would.
    with unwrap_lone_exception():
        async with _open_transport(settings) as transport:
            yield transport


@asynccontextmanager
async def _open_transport(settings: TransportSettings) -> AsyncIterator[NatsTransport]:
    options = settings.options if settings.options is not None else NatsOptions()
    if not isinstance(options, NatsOptions):
        raise ConfigError(f"the nats transport takes NatsOptions, not {type(options).__name__}")
    servers = _servers(settings)
    if not servers:
        raise ConfigError("a nats:// URL needs at least one host:port")
    async with open_bridge("nats") as bridge:
        conn = _Conn(options)
        try:
            await bridge.call(conn.connect, servers, settings.client_id)
            async with trio.open_nursery() as nursery:
                transport = NatsTransport(bridge, conn, nursery)
                nursery.start_soon(transport._flusher, name="trio_bus.nats-acks")
                try:
                    yield transport
                finally:
                    with trio.CancelScope(shield=True) as scope:
                        scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                        for consumer in list(transport._consumers):
                            await consumer.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + CLOSE_TIMEOUT
                await bridge.call(conn.close)
