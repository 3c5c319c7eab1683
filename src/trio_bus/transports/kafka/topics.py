"""Persistence modes and ``bus.topics`` on Kafka (asyncio side).

Kafka always stores: an *ephemeral* topic is a topic created with a short
retention (``EPHEMERAL_RETENTION_MS`` unless its ``TopicConfig`` says
otherwise), still delivered at-least-once. ``auto`` keeps an existing topic
as it is and creates a missing one ephemeral. The strategy and mismatch
policy are the provisioner's (:mod:`.admin`); this module only decides
which ``TopicConfig`` applies and feeds it run-time changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import aiokafka.errors as kafka_errors
import attrs
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from ..._topics import PersistencePolicy, StoredAs, TopicDescription, TopicRequest
from ...errors import ConfigError, TopicConfigError
from .admin import TopicProvisioner
from .errors import transport_error
from .options import KafkaOptions, TopicConfig

__all__ = ["EPHEMERAL_RETENTION_MS", "Topics"]

#: ``retention.ms`` of an ephemeral topic without a TopicConfig of its own.
EPHEMERAL_RETENTION_MS = 60_000


class Topics(TopicProvisioner):
    """The provisioner, aware of persistence modes, plus ``bus.topics``."""

    def __init__(
        self, admin: AIOKafkaAdminClient, options: KafkaOptions, policy: PersistencePolicy
    ) -> None:
        super().__init__(admin, options)
        self._policy = policy
        self._modes: dict[str, StoredAs] = {}

    async def ensure(self, topics: set[str]) -> None:
        """Resolve each new topic's mode, then apply the topic strategy."""
        await self._resolve(topics)
        await super().ensure(topics)

    async def _resolve(self, topics: Iterable[str]) -> None:
        new = [t for t in topics if t not in self._modes]
        auto = [t for t in new if self._policy.of(t) == "auto"]
        known = set(await self._list()) if auto else set()
        for topic in new:
            wanted = self._policy.of(topic)
            if wanted == "auto":
                wanted = "persistent" if topic in known else "ephemeral"
            self._set_mode(topic, wanted)

    def _set_mode(self, topic: str, mode: StoredAs) -> None:
        self._modes[topic] = mode
        if mode == "ephemeral" and topic not in self.options.topics:
            short = attrs.evolve(
                self.options.topic_config(topic), retention_ms=EPHEMERAL_RETENTION_MS
            )
            self.options = attrs.evolve(self.options, topics={**self.options.topics, topic: short})

    async def _list(self) -> list[str]:
        try:
            names: list[str] = await self.admin.list_topics()
        except kafka_errors.KafkaError as exc:
            raise transport_error(exc, "listing topics") from exc
        return names

    # ------------------------------------------------------------ bus.topics

    async def configure(self, topic: str, request: TopicRequest) -> TopicDescription:
        """Apply *request* to *topic* and remember its TopicConfig."""
        config = request.options
        if config is not None and not isinstance(config, TopicConfig):
            raise ConfigError(
                f"kafka topic options must be a TopicConfig, not {type(config).__name__}"
            )
        strategy = request.strategy or self.options.topic_strategy
        exists = topic in await self._list()
        if strategy == "validate_only" and not exists:
            raise TopicConfigError(
                f"kafka topic {topic!r} does not exist (strategy validate_only never creates)"
            )
        before = self.options
        if config is not None:
            self.options = attrs.evolve(before, topics={**before.topics, topic: config})
        if request.persistence is None:
            await self._resolve([topic])
        elif request.persistence == "auto":
            self._set_mode(topic, "persistent" if exists else "ephemeral")
        else:
            self._set_mode(topic, request.persistence)
        once = TopicProvisioner(
            self.admin,
            attrs.evolve(
                self.options,
                topic_strategy=strategy,
                on_mismatch=request.on_mismatch or self.options.on_mismatch,
            ),
        )
        try:
            await once.ensure({topic})
        except BaseException:
            self.options = before  # refused: the topic keeps its old options
            raise
        self._ensured.add(topic)
        return await self.describe_topic(topic)

    async def describe_topic(self, topic: str) -> TopicDescription:
        """Partitions, replication factor and topic configs of *topic*."""
        await self._resolve([topic])
        mode = self._modes[topic]
        if topic not in await self._list():
            return TopicDescription(topic=topic, persistence=mode, exists=False)
        try:
            partitions, replicas = await self.describe(topic)
            responses = await self.admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)]
            )
        except kafka_errors.KafkaError as exc:
            raise transport_error(exc, f"describing topic {topic!r}") from exc
        config: dict[str, object] = {"partitions": partitions, "replication_factor": replicas}
        config.update(_configs(responses, topic))
        return TopicDescription(topic=topic, persistence=mode, exists=True, config=config)

    async def topic_names(self) -> list[str]:
        """The broker's topics, internal ones (``__consumer_offsets``) left out."""
        return [name for name in await self._list() if not name.startswith("__")]


def _configs(responses: Any, topic: str) -> Mapping[str, str]:
    for response in responses:
        for resource in response.resources:
            if resource[3] == topic:
                return {entry[0]: entry[1] for entry in resource[4]}
    return {}
