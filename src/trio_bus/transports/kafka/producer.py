"""Publishing (asyncio side): one ``AIOKafkaProducer`` per transport.

A batch crosses the bridge once; every record is ``send()``-ed (pipelined,
key = aggregate ID so an aggregate stays in one partition) and the delivery
futures are awaited together. The whole batch -- topic checks, sends,
answers -- is bounded by ``publish_timeout``: a record without the broker's
answer by then is reported :class:`PublishOutcomeUnknownError`, never
success.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aiokafka
import aiokafka.errors as kafka_errors

from ..._message import OutgoingMessage
from ...errors import PublishOutcomeUnknownError
from .admin import TopicProvisioner
from .errors import publish_error, retrieve_when_done
from .options import KafkaOptions, client_kwargs

__all__ = ["Producer"]

logger = logging.getLogger("trio_bus.transports.kafka")


class Producer:
    """The transport's producer, with the idempotence fallback.

    Attributes:
        idempotent: Whether the producer runs idempotent (known once started).
    """

    def __init__(
        self,
        options: KafkaOptions,
        hosts: tuple[str, ...],
        client_id: str,
        max_message_bytes: int,
        topics: TopicProvisioner,
    ) -> None:
        self.options = options
        self._hosts, self._client_id = hosts, client_id
        self._max_message_bytes = max_message_bytes
        self._topics = topics
        self.idempotent = False
        self.client: Any = None

    def _make(self, idempotent: bool) -> Any:
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
        kwargs.update(client_kwargs(opts, self._hosts, self._client_id))
        kwargs.update(opts.producer_args)
        return aiokafka.AIOKafkaProducer(**kwargs)

    async def start(self) -> None:
        """Start the producer; idempotent when the broker allows it."""
        opts = self.options
        want_idempotence = opts.idempotence is not False and opts.acks == "all"
        producer = self._make(want_idempotence)
        try:
            await producer.start()
            self.idempotent = want_idempotence
        except kafka_errors.KafkaError as exc:
            await producer.stop()
            if not want_idempotence or opts.idempotence is True:
                raise
            # The broker refused InitProducerId (Tansu 0.6 does): fall back
            # to a plain acks=all producer and say so once.
            logger.warning(
                "kafka broker %s does not support the idempotent producer "
                "(%s: %s); publishing with acks=all without idempotence: a "
                "retried send may be stored twice",
                ",".join(self._hosts),
                type(exc).__name__,
                exc,
            )
            producer = self._make(False)
            await producer.start()
        self.client = producer

    async def stop(self) -> None:
        """Flush and stop the producer (bounded by the caller)."""
        client, self.client = self.client, None
        if client is not None:
            await client.stop()

    async def publish(self, records: Sequence[OutgoingMessage]) -> list[Exception | None]:
        """Send *records*; one outcome per record within ``publish_timeout``."""
        timeout = self.options.publish_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        outcomes: list[Exception | None] = [None] * len(records)
        futures: dict[asyncio.Future[Any], int] = {}
        sent = 0
        try:
            async with asyncio.timeout_at(deadline):
                await self._topics.ensure({r.topic for r in records})
                producer = self.client
                for i, rec in enumerate(records):
                    try:
                        fut = await producer.send(
                            rec.topic,
                            rec.value,
                            key=rec.key.encode() if rec.key is not None else None,
                            headers=[(k, v.encode()) for k, v in rec.headers.items()],
                        )
                    except kafka_errors.KafkaError as exc:
                        outcomes[i] = publish_error(exc, rec.topic)
                    else:
                        futures[fut] = i
                    sent = i + 1
        except TimeoutError:
            for i in range(sent, len(records)):
                outcomes[i] = _unanswered(records[i].topic, timeout)
        if futures:
            done, pending = await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
            for fut in done:
                i = futures[fut]
                failure = fut.exception()
                if failure is not None:
                    outcomes[i] = publish_error(failure, records[i].topic)
            for fut in pending:
                i = futures[fut]
                outcomes[i] = _unanswered(records[i].topic, timeout)
                retrieve_when_done(fut)
        return outcomes


def _unanswered(topic: str, timeout: float) -> PublishOutcomeUnknownError:
    return PublishOutcomeUnknownError(
        f"no answer from the broker for a publish to {topic!r} within {timeout} s"
    )
