"""The Kafka transport object, the Trio tasks that own its loops, and its
lifetime.

Task tree of one transport: every asyncio loop is awaited by one Trio task
of the transport's nursery through ``bridge.call``, so leaving the transport
cancels it, and whatever it raises leaves ``open_transport`` (and so
``open_bus``) as a :class:`~trio_bus.errors.TransportError`::

    open_transport
    └── bridge (trio-asyncio loop)
        └── transport nursery
            ├── connection watch   awaits KafkaTransport._watch_connection
            ├── <group> poll       awaits Group.poll_loop      } per group; cancelled
            └── <group> commit     awaits Committer.run        } when it closes

A group is stopped (final commit, LeaveGroup) by whoever ends it: its last
subscription's ``aclose``, a failed ``open_consumer``, or the transport's
exit; always shielded and bounded by ``close_timeout``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import aiokafka.errors as kafka_errors
import trio
from aiokafka.admin import AIOKafkaAdminClient

from ..._exceptions import unwrap_lone_exception
from ..._message import OutgoingMessage
from ..._secrets import warn_if_unverified
from ..._topics import TopicDescription, TopicRequest
from ...errors import AuthenticationError, BusClosedError, TransportError
from .._base import Consumer, ConsumerSpec, Transport, TransportSettings, open_all
from .._bridge import Bridge, open_bridge
from .._refusals import Refusals
from .consumer import KafkaConsumer
from .errors import connect_error, handshake_refusal, transport_error, try_handshake
from .group import Group
from .options import CONNECTION_CHECK_INTERVAL, KafkaOptions, client_kwargs, resolve_options
from .producer import Producer
from .topics import Topics

__all__ = ["KafkaTransport", "open_transport"]

logger = logging.getLogger("trio_bus.transports.kafka")


class _GroupTask:
    """The Trio side of one group: the cancel scopes of its loops' tasks."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.scopes: list[trio.CancelScope] = []
        self.running = 0
        self.ended = trio.Event()
        self.stopped = False
        # open_consumer calls under way: a failed one stops an idle group
        # only when no other one may still add to it.
        self.opening = 0


class KafkaTransport(Transport):
    """The transport over aiokafka; created by :func:`open_transport`.

    Attributes:
        options: The effective :class:`KafkaOptions`.
        hosts: The bootstrap servers.
        client_id: The bus's client id.
        bridge: The boundary to the asyncio side.
    """

    name = "kafka"
    coalesce_publishes = True

    def __init__(
        self,
        settings: TransportSettings,
        options: KafkaOptions,
        bridge: Bridge,
        nursery: trio.Nursery,
    ) -> None:
        self.options = options
        self.hosts = settings.hosts
        self.client_id = settings.client_id
        self.bridge = bridge
        self._max_message_bytes = settings.max_message_bytes
        self._nursery = nursery
        self._group_tasks: dict[str, _GroupTask] = {}
        self._group_lock = trio.Lock()
        # Written by the asyncio side only (the connection watch).
        self._connected = True
        self._admin: Any = None
        self._topics: Topics | None = None
        self._persistence = settings.persistence
        self._producer: Producer | None = None
        self._refusals = Refusals("kafka", options.auth_failure_grace, logger)

    @property
    def groups(self) -> dict[str, Group]:
        """The open consumer groups by name."""
        return {name: task.group for name, task in self._group_tasks.items()}

    @property
    def idempotent(self) -> bool:
        """Whether the producer runs idempotent."""
        return self._producer is not None and self._producer.idempotent

    @property
    def connected(self) -> bool:
        """Whether a broker answered the last connection check (every
        ``CONNECTION_CHECK_INTERVAL`` seconds)."""
        return self._connected

    @property
    def problem(self) -> str | None:
        """The brokers refusing our credentials (see ``auth_failure_grace``)."""
        return self._refusals.problem

    # -- asyncio side ----------------------------------------------------

    async def _aio_start(self) -> None:
        opts = self.options
        warn_if_unverified(opts.ssl_context, ",".join(self.hosts))
        try:
            self._admin = AIOKafkaAdminClient(
                request_timeout_ms=int(opts.publish_timeout * 1000),
                **client_kwargs(opts, self.hosts, self.client_id),
            )
            await self._admin.start()
            self._topics = Topics(self._admin, opts, self._persistence)
            self._producer = Producer(
                opts, self.hosts, self.client_id, self._max_message_bytes, self._topics
            )
            await self._producer.start()
        except BaseException:
            await self._aio_close()
            raise

    async def _aio_close(self) -> None:
        producer, admin = self._producer, self._admin
        self._producer = self._admin = None
        try:
            if producer is not None:
                await producer.stop()
        finally:
            if admin is not None:
                await admin.close()

    async def _watch_connection(self) -> NoReturn:
        """Keep ``connected`` current: can a broker be reached right now?

        Recovery policy: an unreachable broker is a state (``connected`` is
        False, health reports it), not a failure; aiokafka reconnects.
        Refused credentials are different (see :mod:`.._refusals`): while
        no broker is ready, one diagnostic connection
        (:func:`.errors.try_handshake`) tells whether a broker refuses
        us; if still refused after ``auth_failure_grace`` seconds, this
        raises :class:`~trio_bus.errors.AuthenticationError`, which ends
        the transport. Kafka authenticates a connection once (aiokafka 0.14
        does not re-authenticate, KIP-368), so a revoked credential shows
        only when a connection is opened again.
        """
        assert self._producer is not None
        client = self._producer.client.client
        secured = self.options.security_protocol != "PLAINTEXT"
        while True:
            ok = await _any_broker_ready(client)
            if ok:
                self._refusals.accepted()
            elif secured:
                # A broker that cannot be reached neither ends an episode
                # of refusals nor starts one.
                outcome = await try_handshake(self.hosts, self.options)
                if isinstance(outcome, AuthenticationError):
                    self._refusals.refused(outcome)
                elif outcome:
                    self._refusals.accepted()
            if ok != self._connected:
                logger.log(
                    logging.INFO if ok else logging.WARNING,
                    "kafka broker %s",
                    "reachable again" if ok else "unreachable",
                )
            self._connected = ok
            expired = self._refusals.expired()
            if expired is not None:
                raise expired
            remaining = self._refusals.remaining()
            await asyncio.sleep(
                CONNECTION_CHECK_INTERVAL
                if remaining is None
                else min(CONNECTION_CHECK_INTERVAL, remaining)
            )

    # -- Trio side: owned loops ------------------------------------------

    async def _own(self, loop: Callable[[], Awaitable[NoReturn]], what: str) -> None:
        """Await an asyncio lifetime loop; it may only end by cancellation.
        Anything it raises leaves as a TransportError."""
        try:
            await self.bridge.call(loop)
        except TransportError:
            raise
        except Exception as exc:
            raise transport_error(exc, what) from exc
        raise TransportError(f"{what} ended")  # pragma: no cover - loops never return

    async def _run_loop(
        self,
        task: _GroupTask,
        loop: Callable[[], Awaitable[NoReturn]],
        what: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # One of a group's loops, a task of the transport's nursery: its
        # failure cancels the transport.
        task.running += 1
        try:
            with trio.CancelScope() as scope:
                task.scopes.append(scope)
                task_status.started()
                await self._own(loop, f"kafka consumer group {task.group.name!r}: {what}")
        finally:
            task.running -= 1
            if not task.running:
                task.ended.set()

    async def _stop_group(self, task: _GroupTask) -> None:
        """Cancel the group's loops, then commit and leave; shielded and
        bounded by ``close_timeout``."""
        if task.stopped:
            return
        task.stopped = True
        group = task.group
        stopped = False
        try:
            with trio.move_on_after(self.options.close_timeout) as bound:
                bound.shield = True
                for scope in task.scopes:
                    scope.cancel()
                if task.running:
                    await task.ended.wait()
                try:
                    await self.bridge.call(group.stop)
                    stopped = True
                except TransportError as exc:  # the loop is gone: nothing to leave
                    logger.warning("stopping consumer group %r: %s", group.name, exc)
        finally:
            if not stopped and group.consumer is not None:
                # Cut short (close_timeout: leaving waits for a join under
                # way), aiokafka's stop never reached closing the consumer's
                # connections, and its tasks may reopen them until the loop
                # ends: close them then.
                self.bridge.at_teardown(group.consumer._client.close)
        if bound.cancelled_caught:
            logger.warning("stopping consumer group %r timed out", group.name)
        if self._group_tasks.get(group.name) is task:
            del self._group_tasks[group.name]

    async def _close_group(self, name: str) -> None:
        task = self._group_tasks.get(name)
        if task is not None:
            await self._stop_group(task)

    async def _stop_groups(self) -> None:
        """Stop every group concurrently (at the transport's exit)."""
        async with trio.open_nursery() as nursery:
            for task in list(self._group_tasks.values()):
                nursery.start_soon(self._stop_group, task)

    async def _group(self, spec: ConsumerSpec) -> _GroupTask:
        """The running group *spec.group*, started when new, with one more
        ``opening``."""
        # One lock for all groups: starting one takes a few ms, and a lock
        # per group name would pile up (health probes use fresh groups).
        async with self._group_lock:
            task = self._group_tasks.get(spec.group)
            if task is not None and not task.stopped:
                task.opening += 1
                return task
            group = Group(
                spec.group, self.options, self.hosts, self.client_id, ephemeral=spec.ephemeral
            )
            task = _GroupTask(group)
            self._group_tasks[spec.group] = task
            try:
                await self.bridge.call(group.start)
                await self._nursery.start(self._run_loop, task, group.poll_loop, "poll")
                await self._nursery.start(self._run_loop, task, group.commits.run, "commit")
            except BaseException:
                await self._stop_group(task)
                raise
            task.opening += 1
            return task

    # -- Trio side: the interface ------------------------------------------

    async def publish_batch(self, records: Sequence[OutgoingMessage]) -> Sequence[Exception | None]:
        """Send *records* (one bridge crossing); one outcome per record."""
        if not records:
            await trio.lowlevel.checkpoint()
            return []
        assert self._producer is not None
        try:
            return await self.bridge.call(self._producer.publish, records)
        except kafka_errors.KafkaError as exc:
            raise transport_error(exc, "publishing") from exc

    async def open_consumer(self, spec: ConsumerSpec) -> Consumer:
        """Join *spec.group* with *spec.topic*; return once its partitions are
        assigned and their positions resolved."""
        (consumer,) = await self.open_consumers([spec])
        return consumer

    async def open_consumers(self, specs: Sequence[ConsumerSpec]) -> Sequence[Consumer]:
        """Open every subscription of *specs* with one topic check for all of
        them and **one rejoin per group**: each group's consumer subscribes
        to all its new topics at once. Return once every topic is assigned;
        on failure or cancellation none is left open."""
        assert self._topics is not None
        if not specs:
            await trio.lowlevel.checkpoint()
            return []
        by_group: dict[str, list[int]] = {}
        for i, spec in enumerate(specs):
            by_group.setdefault(spec.group, []).append(i)
        await self.bridge.call(self._topics.ensure, {spec.topic for spec in specs})
        return await open_all(
            len(specs),
            [
                functools.partial(self._open_in_group, specs, indices)
                for indices in by_group.values()
            ],
        )

    async def _open_in_group(
        self, specs: Sequence[ConsumerSpec], indices: list[int], opened: dict[int, KafkaConsumer]
    ) -> None:
        """Add ``specs[i]`` for *indices* (one group) in one join; the
        consumers go into *opened* by index."""
        specs = [specs[i] for i in indices]
        try:
            task = await self._group(specs[0])
            group = task.group
            consumers = [
                KafkaConsumer(group, spec, self.bridge, close_group=self._close_group)
                for spec in specs
            ]
            try:
                await self.bridge.call(group.add, consumers)
            except BaseException:
                # Failed or cancelled: a group left without subscriptions
                # stops, rather than stay a member with a half-joined topic.
                task.opening -= 1
                if not task.opening:
                    with trio.move_on_after(self.options.close_timeout) as scope:
                        scope.shield = True
                        if await self.bridge.call(_idle, group):
                            await self._stop_group(task)
                raise
            task.opening -= 1
        except (TransportError, BusClosedError):
            raise
        except kafka_errors.KafkaError as exc:
            raise transport_error(exc, f"joining consumer group {specs[0].group!r}") from exc
        opened.update(zip(indices, consumers, strict=True))

    async def configure_topic(self, topic: str, request: TopicRequest) -> TopicDescription:
        """``bus.topics.configure``: see :mod:`.topics`."""
        assert self._topics is not None
        result: TopicDescription = await self.bridge.call(self._topics.configure, topic, request)
        return result

    async def describe_topic(self, topic: str) -> TopicDescription:
        """``bus.topics.describe``: partitions, replicas and topic configs."""
        assert self._topics is not None
        result: TopicDescription = await self.bridge.call(self._topics.describe_topic, topic)
        return result

    async def list_topics(self) -> Sequence[str]:
        """``bus.topics.list``: the broker's topics but internal ones."""
        assert self._topics is not None
        result: list[str] = await self.bridge.call(self._topics.topic_names)
        return result

    async def topic_metadata(self, topic: str) -> tuple[int, int]:
        """``(partitions, replication_factor)`` of *topic* as the broker
        reports it (one crossing; for tools and tests)."""
        assert self._topics is not None
        return await self.bridge.call(self._topics.describe, topic)


async def _any_broker_ready(client: Any) -> bool:
    # Asyncio side: whether aiokafka has (or can open) a connection to a
    # broker. Any failure counts as "no": aiokafka lets some escape, e.g.
    # its SCRAM client's KeyError at a refused login.
    for broker in client.cluster.brokers():
        try:
            if await asyncio.wait_for(client.ready(broker.nodeId), 2.0):
                return True
        except Exception as exc:
            logger.debug("kafka broker %s not ready: %r", broker.nodeId, exc)
    return False


async def _idle(group: Group) -> bool:
    # Asyncio side: whether *group* has no subscription left.
    return not group.routes


@asynccontextmanager
async def open_transport(settings: TransportSettings) -> AsyncIterator[KafkaTransport]:
    """Open the Kafka transport: an asyncio loop, a producer, an admin client
    and the Trio tasks that own its loops; consumers are added by
    ``open_consumer``.

    Leaving the block -- normally, by cancellation, or because a loop
    failed (then as that :class:`~trio_bus.errors.TransportError`) --
    commits what finished, leaves every group and closes every client,
    shielded: each group within ``close_timeout``, then the producer and
    admin client within ``close_timeout``, even when the broker is gone.
    """
    options = resolve_options(settings)
    # Nurseries wrap whatever leaves the block; give callers the one
    # exception they would expect.
    with unwrap_lone_exception():
        async with open_bridge("kafka") as bridge:
            started = False
            try:
                async with trio.open_nursery() as nursery:
                    transport = KafkaTransport(settings, options, bridge, nursery)
                    try:
                        await bridge.call(transport._aio_start)
                    except Exception as exc:
                        mapped = await connect_error(
                            exc,
                            settings.hosts,
                            options,
                            lambda: bridge.call(handshake_refusal, settings.hosts, options),
                        )
                        if mapped is None:
                            raise
                        raise mapped from exc
                    started = True
                    # aiokafka closes a client's connections only at the end
                    # of its producer's (admin client's) stop: one cut short
                    # at close_timeout, or a connection reopened meanwhile by
                    # a task that outlived its cancellation, would be left
                    # open. Closed once every asyncio task has ended.
                    producer = transport._producer
                    assert producer is not None
                    for client in (producer.client.client, transport._admin._client):
                        bridge.at_teardown(client.close)
                    nursery.start_soon(
                        transport._own, transport._watch_connection, "kafka connection watch"
                    )
                    try:
                        yield transport
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                if started:
                    # Shielded inside: each group commits and leaves in time.
                    await transport._stop_groups()
                    with trio.move_on_after(options.close_timeout) as scope:
                        scope.shield = True
                        await bridge.call(transport._aio_close)
                    if scope.cancelled_caught:
                        logger.warning("closing the kafka producer timed out")
