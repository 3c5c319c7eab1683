"""Publishing a batch: every JetStream publish in flight at once.

The server's acks are matched in a dict through one wildcard reply
subscription (no future per message), and ``publish_batch`` returns when
all are answered: one bridge crossing per batch. Each message carries
``Nats-Msg-Id`` (the envelope's event id, or a fresh id) so a retried
publish is deduplicated by the server. A publish is reported stored only
on the server's ack; after a reconnection the unanswered ones are sent
again with the same id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping, Sequence

import attrs
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from ..._message import OutgoingMessage
from ..._names import AGGREGATE_ID_HEADER
from ...errors import PublishError, PublishOutcomeUnknownError, TransportError
from .connection import Connection
from .options import TOPIC_HEADER
from .partitions import partition_subject
from .streams import Streams, TopicInfo

__all__ = ["MSG_ID_HEADER", "Publisher"]

logger = logging.getLogger("trio_bus.nats")

MSG_ID_HEADER = "Nats-Msg-Id"


def publish_failure(exc: BaseException, subject: str) -> PublishError:
    """A failed publish as the bus's error type (the cause chained)."""
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


@attrs.define(eq=False)
class _AckBatch:
    """The publishes of one ``publish_batch`` call waiting for their acks."""

    done: asyncio.Future[None]
    outcomes: list[Exception | None]
    waiting: int = 0
    sealed: bool = False


class Publisher:
    """JetStream publishes of one transport (asyncio side)."""

    def __init__(self, conn: Connection, streams: Streams) -> None:
        self.conn = conn
        self.streams = streams
        self.options = conn.options
        self._prefix: str | None = None
        self._seq = 0
        #: reply subject -> (batch, index, subject, value, headers) of every
        #: publish waiting for its JetStream ack.
        self._waiters: dict[str, tuple[_AckBatch, int, str, bytes, dict[str, str]]] = {}
        conn.on_reconnect.append(self.resend_unacked)

    async def publish_many(self, records: Sequence[OutgoingMessage]) -> list[Exception | None]:
        """Publish *records*, all in flight at once; one outcome each."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.publish_timeout
        outcomes: list[Exception | None] = [None] * len(records)
        topics: dict[str, TopicInfo | Exception] = {}
        for record in records:
            if record.topic not in topics:
                topics[record.topic] = await self._where(record.topic)
        await self._publish(records, range(len(records)), topics, outcomes, deadline)
        # A stream deleted behind our back: forget it, recreate, try once more.
        missing = [
            i
            for i, o in enumerate(outcomes)
            if o is not None and isinstance(o.__cause__, nats.js.errors.NoStreamResponseError)
        ]
        if missing and self.options.topic_strategy != "skip":
            for topic in {records[i].topic for i in missing}:
                self.streams.forget(topic)
                topics[topic] = await self._where(topic)
            await self._publish(records, missing, topics, outcomes, deadline)
        return outcomes

    async def _where(self, topic: str) -> TopicInfo | Exception:
        try:
            return await self.streams.ensure(topic)
        except TransportError as exc:
            return exc

    async def _publish(
        self,
        records: Sequence[OutgoingMessage],
        indices: Sequence[int],
        topics: Mapping[str, TopicInfo | Exception],
        outcomes: list[Exception | None],
        deadline: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        if not await self.conn.wait_connected(max(0.0, deadline - loop.time())):
            for i in indices:
                if not isinstance(topics[records[i].topic], Exception):
                    outcomes[i] = PublishError(
                        f"not connected to nats for {self.options.publish_timeout}s: "
                        "the message was not sent"
                    )
        prefix = await self._ack_prefix()
        batch = _AckBatch(loop.create_future(), outcomes)
        sent: list[tuple[int, str]] = []
        nc = self.conn.nc
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
            self._seq += 1
            reply = f"{prefix}{self._seq}"
            # An aggregate of a partitioned topic goes to its partition's subject.
            subject = partition_subject(record.topic, record.key, where.partitions)
            self._waiters[reply] = (batch, i, subject, record.value, headers)
            batch.waiting += 1
            try:
                await nc.publish(subject, record.value, reply=reply, headers=headers)
            except Exception as exc:
                del self._waiters[reply]
                batch.waiting -= 1
                outcomes[i] = publish_failure(exc, record.topic)
            else:
                sent.append((i, reply))
        batch.sealed = True
        if batch.waiting > 0:
            await asyncio.wait({batch.done}, timeout=max(0.0, deadline - loop.time()))
        for i, reply in sent:
            if self._waiters.pop(reply, None) is not None:
                outcomes[i] = publish_failure(TimeoutError(), records[i].topic)

    async def _ack_prefix(self) -> str:
        """The reply-subject prefix of JetStream publish acks; subscribed
        once per connection.

        One wildcard subscription and a dict instead of nats-py's
        ``publish_async`` futures: under trio-asyncio every asyncio callback
        is a Trio scheduler round, and a future per message costs two.
        """
        if self._prefix is None:
            prefix = self.conn.nc.new_inbox() + "."
            await self.conn.nc.subscribe(prefix + "*", cb=self._on_ack)
            self._prefix = prefix
        return self._prefix

    async def resend_unacked(self) -> None:
        """After a reconnection: publish again what has no ack yet, with
        the same ``Nats-Msg-Id`` (the server drops a copy it already
        stored), so a short outage costs a delay, not an unknown outcome."""
        for reply, (_, _, subject, value, headers) in list(self._waiters.items()):
            try:
                await self.conn.nc.publish(subject, value, reply=reply, headers=headers)
            except Exception as exc:
                # Disconnected again: the next reconnection sends them.
                logger.debug("re-publishing after a reconnection failed: %r", exc)
                return

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._waiters.pop(msg.subject, None)
        if entry is None:
            return  # late: already reported as outcome unknown
        batch, index, topic = entry[:3]
        headers = msg.headers
        failure: Exception | None = None
        if headers and headers.get("Status") == "503":
            failure = nats.js.errors.NoStreamResponseError()
        elif b'"error"' in msg.data:
            try:
                nats.js.errors.APIError.from_error(json.loads(msg.data)["error"])
            except Exception as exc:  # from_error raises the mapped error
                failure = exc
        if failure is not None:
            batch.outcomes[index] = publish_failure(failure, topic)
        batch.waiting -= 1
        if batch.sealed and batch.waiting <= 0 and not batch.done.done():
            batch.done.set_result(None)
