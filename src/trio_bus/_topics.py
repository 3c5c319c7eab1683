"""Topics at run time: persistence modes and the ``bus.topics`` admin API.

Every transport stores topics its own way (a JetStream stream, a Kafka
topic, an in-process log); this module is the transport-neutral face of
it. Persistence modes (see docs/topics.md):

* ``"persistent"`` (the default): stored with the configured retention;
  at-least-once, acked after the handler.
* ``"ephemeral"``: no storage where the broker allows it (NATS: Core NATS
  subjects; memory: no log), at-most-once, for high-rate signals where loss
  on a restart is acceptable. Kafka always stores: there it means a short
  retention.
* ``"auto"``: persistent if the broker already stores the topic (a stream
  captures its subject, the Kafka topic exists, the memory log exists),
  else ephemeral. trio_bus never creates storage for an ``auto`` topic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Self

import attrs

from ._names import validate_topic
from .errors import ConfigError

if TYPE_CHECKING:
    from .transports._base import Transport
    from .transports._provisioning import MismatchAction, TopicStrategy

__all__ = [
    "PERSISTENCE_MODES",
    "Persistence",
    "PersistencePolicy",
    "StoredAs",
    "TopicAdmin",
    "TopicDescription",
    "TopicRequest",
]

Persistence = Literal["persistent", "ephemeral", "auto"]
#: What ``auto`` resolves to.
StoredAs = Literal["persistent", "ephemeral"]
PERSISTENCE_MODES: tuple[Persistence, ...] = ("persistent", "ephemeral", "auto")


def check_persistence(value: object, what: str = "persistence") -> Persistence:
    """*value* if it is a persistence mode, else :class:`ConfigError`."""
    for mode in PERSISTENCE_MODES:
        if value == mode:
            return mode
    raise ConfigError(f"{what} must be one of {PERSISTENCE_MODES!r}, got {value!r}")


@attrs.define
class PersistencePolicy:
    """The persistence mode of each topic: ``topics`` overrides ``default``.

    ``open_bus(persistence="ephemeral")`` sets the default;
    ``open_bus(persistence={"signals": "ephemeral"})`` sets single topics.
    Dead-letter topics are persistent unless named in ``topics`` (see
    :meth:`keep`): parking a message where nothing is stored would lose it.
    """

    default: Persistence = "persistent"
    topics: dict[str, Persistence] = attrs.field(factory=dict)

    @classmethod
    def parse(cls, value: Persistence | Mapping[str, Persistence] | PersistencePolicy) -> Self:
        """The policy ``open_bus(persistence=value)`` means."""
        if isinstance(value, PersistencePolicy):
            return cls(value.default, dict(value.topics))
        if isinstance(value, Mapping):
            return cls(
                topics={
                    validate_topic(t): check_persistence(m, f"persistence[{t!r}]")
                    for t, m in value.items()
                }
            )
        return cls(check_persistence(value))

    def of(self, topic: str) -> Persistence:
        """The mode configured for *topic*."""
        return self.topics.get(topic, self.default)

    def keep(self, topic: str) -> None:
        """Make *topic* (a dead-letter topic) persistent unless it was
        configured explicitly."""
        if self.default != "persistent":
            self.topics.setdefault(topic, "persistent")


@attrs.frozen(kw_only=True)
class TopicRequest:
    """What ``bus.topics.configure`` asks a transport for.

    Attributes:
        options: The transport's per-topic options (NATS
            :class:`~trio_bus.transports.nats.StreamOptions`, Kafka
            :class:`~trio_bus.transports.kafka.TopicConfig`, memory
            :class:`~trio_bus.transports.memory.MemoryRetention`), or None
            to keep what applies now.
        persistence: A new persistence mode, or None to keep it.
        strategy: Overrides the transport's ``topic_strategy`` for this call.
        on_mismatch: Overrides the transport's ``on_mismatch`` for this call.
    """

    options: object | None = None
    persistence: Persistence | None = None
    strategy: TopicStrategy | None = None
    on_mismatch: MismatchAction | None = None


@attrs.frozen(kw_only=True)
class TopicDescription:
    """A topic as the broker holds it (``bus.topics.describe``).

    Attributes:
        topic: The topic.
        persistence: ``"persistent"`` or ``"ephemeral"`` (``auto`` resolved).
        exists: Whether the broker stores it (always False for an ephemeral
            NATS or memory topic: nothing is stored).
        location: Where it is stored: the JetStream stream name (the outer
            stream for a nested topic), else None.
        config: The broker's real configuration of it, as the broker names
            things (JetStream stream config fields; Kafka ``partitions``,
            ``replication_factor`` and topic configs; memory retention).
        messages: Messages stored now, where the broker says cheaply.
    """

    topic: str
    persistence: StoredAs
    exists: bool
    location: str | None = None
    config: Mapping[str, object] = attrs.field(factory=dict)
    messages: int | None = None


class TopicAdmin:
    """``bus.topics``: configure, describe and list topics while running.

    The options objects are the ones ``open_bus(transport_options=...)``
    takes per topic, and the strategy and mismatch action are the
    transport's unless a call overrides them::

        await bus.topics.configure("orders", StreamOptions(max_age=86400))
        description = await bus.topics.describe("orders")
        names = await bus.topics.list()

    Errors: :class:`~trio_bus.errors.InvalidTopicError` for a bad name,
    :class:`~trio_bus.errors.ConfigError` for options of the wrong kind,
    :class:`~trio_bus.errors.TopicConfigError` when the broker refuses or
    the topic differs and the mismatch action is ``"fail"``.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def configure(
        self,
        topic: str,
        options: object | None = None,
        *,
        persistence: Persistence | None = None,
        strategy: TopicStrategy | None = None,
        on_mismatch: MismatchAction | None = None,
    ) -> TopicDescription:
        """Create or update *topic* per the strategy, remember *options* for
        it from now on, and return the broker's view of it."""
        validate_topic(topic)
        request = TopicRequest(
            options=options,
            persistence=None if persistence is None else check_persistence(persistence),
            strategy=strategy,
            on_mismatch=on_mismatch,
        )
        _check_policy(request)
        return await self._transport.configure_topic(topic, request)

    async def describe(self, topic: str) -> TopicDescription:
        """The broker's view of *topic* (``exists=False`` if it has none)."""
        return await self._transport.describe_topic(validate_topic(topic))

    async def list(self) -> Sequence[str]:
        """The topics the broker stores, sorted (ephemeral ones are not
        stored, so not listed)."""
        return sorted(await self._transport.list_topics())


def _check_policy(request: TopicRequest) -> None:
    # Imported here: _config (below the transports) imports this module.
    from .transports._provisioning import MISMATCH_ACTIONS, TOPIC_STRATEGIES

    if request.strategy is not None and request.strategy not in TOPIC_STRATEGIES:
        raise ConfigError(f"strategy must be one of {TOPIC_STRATEGIES!r}, got {request.strategy!r}")
    if request.on_mismatch is not None and request.on_mismatch not in MISMATCH_ACTIONS:
        raise ConfigError(
            f"on_mismatch must be one of {MISMATCH_ACTIONS!r}, got {request.on_mismatch!r}"
        )
