"""Durable pull consumers: create, resume, update, re-create after a loss.

One durable per subscription group (``ConsumerSpec.ephemeral``: a
server-deleted consumer instead). An existing group resumes where it acked;
``ack_wait``, ``max_deliver`` and ``max_ack_pending`` are updated in place.
A consumer that vanished while running is re-created where this one was,
so nothing is skipped.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Literal

import nats.js.errors
from nats.js import api

from ...errors import TopicConfigError
from .._base import ConsumerSpec
from .connection import Connection
from .streams import ERR_STREAM_NOT_FOUND, TopicInfo, map_api_error

__all__ = ["EPHEMERAL_INACTIVE", "Resume", "bind"]

logger = logging.getLogger("trio_bus.nats")

#: Seconds an ephemeral consumer outlives its last activity on the server.
EPHEMERAL_INACTIVE = 60.0

#: Why a running consumer binds again: its consumer vanished, or its
#: stream was lost and created again.
Resume = Literal["", "consumer_lost", "stream_new"]


async def bind(
    conn: Connection,
    where: TopicInfo,
    durable: str,
    spec: ConsumerSpec,
    *,
    resume: Resume = "",
    max_seq: int = 0,
    oldest_unsettled: int | None = None,
    bound_at: datetime | None = None,
    filters: list[str] | None = None,
) -> Any:
    """Create the durable consumer *durable*, or resume the existing one;
    return its info.

    *resume* says why we bind again while running: then a consumer that has
    to be created starts where this one was (the oldest unsettled delivery,
    else after *max_seq*), not at ``spec.start``; unless the stream is new
    too (created after *bound_at*, when the lost consumer was created, or
    its sequences restarted): then from the stream's start.

    *filters*: the consumer's filter subjects (a partition's, see
    :mod:`.partitions`); None: the topic's whole subject space.

    Raises:
        TopicConfigError: the stream does not exist.
        TransportUnavailableError: JetStream did not answer.
    """
    topic, copts, ephemeral = spec.topic, conn.options.consumer, spec.ephemeral
    config = api.ConsumerConfig(
        name=durable,
        # An ephemeral consumer has no durable name: the server deletes
        # it after inactive_threshold even if we die without cleaning up.
        durable_name=None if ephemeral else durable,
        inactive_threshold=EPHEMERAL_INACTIVE if ephemeral else None,
        deliver_policy=api.DeliverPolicy.NEW if spec.start == "latest" else api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=copts.ack_wait,
        max_deliver=copts.max_deliver,
        max_ack_pending=copts.max_ack_pending,
        filter_subjects=filters or ([topic, f"{topic}.>"] if where.nested else None),
    )
    jsm, stream = conn.jsm, where.stream
    try:
        info = await jsm.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == ERR_STREAM_NOT_FOUND:
            raise TopicConfigError(f"stream {stream!r} of topic {topic!r} does not exist") from exc
        if resume == "consumer_lost" and max_seq:
            try:
                stream_info = await jsm.stream_info(stream)
            except Exception as exc2:
                raise map_api_error(exc2, f"reading stream {stream!r}") from exc2
            created = stream_info.created
            if stream_info.state.last_seq < max_seq or (
                created is not None and bound_at is not None and created > bound_at
            ):
                resume = "stream_new"  # created again (by a publish, maybe)
        if resume == "stream_new":
            # The stream itself was lost and created again: everything
            # in it is new to us.
            config.deliver_policy = api.DeliverPolicy.ALL
        elif resume == "consumer_lost" and max_seq:
            # The consumer vanished, the stream did not: go on from the
            # oldest delivery not settled (at least once, no gap).
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = oldest_unsettled or max_seq + 1
        try:
            return await jsm.add_consumer(stream, config)
        except Exception as exc2:
            doing = f"creating consumer {durable!r} on {stream!r}"
            raise map_api_error(exc2, doing) from exc2
    except Exception as exc:
        raise map_api_error(exc, f"reading consumer {durable!r} on {stream!r}") from exc
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
            logger.warning("could not update consumer %s on %s: %s", durable, stream, exc)
    return info
