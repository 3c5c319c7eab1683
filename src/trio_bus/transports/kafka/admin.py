"""Topic provisioning on Kafka (asyncio side).

The policy -- strategy, mismatch action -- is the one every broker
transport shares (:mod:`.._provisioning`); this module only knows how to
read and change Kafka topics with the admin client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiokafka.errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from ...errors import TopicConfigError
from .._provisioning import mismatch
from .errors import transport_error
from .options import KafkaOptions

__all__ = ["TopicProvisioner"]

logger = logging.getLogger("trio_bus.transports.kafka")

# Broker error codes seen in admin responses.
_TOPIC_ALREADY_EXISTS = 36
_UNKNOWN_TOPIC = 3


class TopicProvisioner:
    """Checks (and creates or updates) each topic once per transport, before
    the first publish or subscription naming it. Lives on the asyncio side.

    Attributes:
        admin: The admin client (started by the transport).
    """

    def __init__(self, admin: AIOKafkaAdminClient, options: KafkaOptions) -> None:
        self.admin = admin
        self.options = options
        self._ensured: set[str] = set()
        self._lock = asyncio.Lock()

    async def ensure(self, topics: set[str]) -> None:
        """Apply the topic strategy to the topics not seen yet."""
        todo = topics - self._ensured
        if not todo:
            return
        if self.options.topic_strategy == "skip":
            self._ensured |= todo
            return
        async with self._lock:
            todo -= self._ensured
            if todo:
                await self._apply_topic_configs(sorted(todo))
                self._ensured |= todo

    def _mismatch(self, message: str) -> None:
        mismatch(self.options.on_mismatch, message, logger=logger)

    async def describe(self, topic: str) -> tuple[int, int]:
        """``(partitions, replication_factor)`` of *topic* on the broker."""
        (meta,) = await self.admin.describe_topics([topic])
        parts = meta["partitions"]
        return len(parts), len(parts[0]["replicas"]) if parts else 0

    async def _apply_topic_configs(self, names: list[str]) -> None:
        opts, admin = self.options, self.admin
        try:
            # List first: a metadata request naming a missing topic makes
            # brokers with auto-creation (Tansu, Kafka's default) create it
            # with *their* defaults.
            known = set(await admin.list_topics())
            present = [n for n in names if n in known]
            described = await admin.describe_topics(present) if present else []
        except kafka_errors.KafkaError as exc:
            raise transport_error(exc, f"describing topics {names}") from exc
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
        opts, admin = self.options, self.admin
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
            raise transport_error(exc, "describing topic configs") from exc
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
