"""``open_bus``: builds a :class:`Bus` and owns every task it runs.

The task tree (docs/architecture.md): the transport's context (its asyncio
loop and client tasks for Kafka/NATS) wraps the bus nursery, which runs the
actor pool, the publish coalescer, the monitor and one fetch task per
subscription. Leaving the block drains (normal exit) or cancels (error,
cancellation, Ctrl-C) the subscriptions, then closes everything in a
shielded, bounded scope.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

import trio
from opentelemetry.trace import TracerProvider

from ._bus import Bus
from ._config import (
    CANCEL_FLUSH_TIMEOUT,
    DEFAULT_CLIENT_ID,
    DEFAULT_DEAD_LETTER,
    DEFAULT_HANDLER_TIMEOUT,
    DEFAULT_INBOX_SIZE,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_RESTARTS,
    DEFAULT_POOL_SIZE,
    DEFAULT_RESTART_WINDOW,
    DEFAULT_SHUTDOWN_GRACE,
    BusConfig,
    RateLimit,
    RetryPolicy,
)
from ._exceptions import lone_exception, raise_as_is
from ._signals import sigint_cancels
from ._topics import Persistence, PersistencePolicy
from ._tracing import tracer_for
from .errors import ConfigError
from .health import Monitoring
from .transports import parse_url, resolve
from .transports._base import TransportSettings

__all__ = ["open_bus"]

DEFAULT_MONITORING = Monitoring()


async def _run_scoped(
    fn: Callable[..., Awaitable[None]],
    scope: trio.CancelScope,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        with scope:
            await fn(task_status=task_status)
    finally:
        done.set()


def _is_cancellation(exc: BaseException | None) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(trio.Cancelled)[1]
        return rest is None
    return False


def _collapse(
    group: BaseExceptionGroup[BaseException], user_exc: BaseException | None
) -> BaseException:
    """Pick the one exception ``open_bus`` should raise out of *group*."""
    if user_exc is not None and not _is_cancellation(user_exc):
        if isinstance(user_exc, BaseExceptionGroup):
            return user_exc
        matched, _ = group.split(lambda e: e is user_exc)
        if matched is not None:
            return user_exc
    _, rest = group.split(trio.Cancelled)
    if rest is None:
        return group
    return lone_exception(rest) or rest


@asynccontextmanager
async def open_bus(
    url: str = "memory://",
    *,
    client_id: str = DEFAULT_CLIENT_ID,
    pool_size: int = DEFAULT_POOL_SIZE,
    inbox_size: int = DEFAULT_INBOX_SIZE,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    restart_window: float = DEFAULT_RESTART_WINDOW,
    handler_timeout: float | None = DEFAULT_HANDLER_TIMEOUT,
    retry: RetryPolicy | None = None,
    dead_letter: str | Callable[[str], str] = DEFAULT_DEAD_LETTER,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    transport_options: object | None = None,
    monitoring: Monitoring | None = DEFAULT_MONITORING,
    tracing: bool | TracerProvider | None = None,
    publish_rate: RateLimit | None = None,
    publish_rates: Mapping[str, RateLimit | None] | None = None,
    persistence: Persistence | Mapping[str, Persistence] = "persistent",
) -> AsyncIterator[Bus]:
    """Open an event bus for the duration of an ``async with`` block.

    The URL scheme picks the transport: ``memory://`` (embedded, the
    default; ``memory://name`` for a separate broker), ``kafka://h:p[,h:p]``,
    ``nats://h:p[,h:p]``::

        async with trio_bus.open_bus("memory://") as bus:
            await bus.subscribe("orders", handle)
            await bus.publish("orders", b"{}", key="order-1")

    Leaving the block stops fetching, gives in-flight handlers
    ``shutdown_grace`` seconds, acks what finished and leaves the rest for
    redelivery; on cancellation handlers stop at once and only the acks of
    finished messages are flushed (shielded, bounded). Nothing the bus
    started outlives the block.

    Args:
        url: Transport URL.
        client_id: Client name; the default consumer group.
        pool_size: Actors in the global pool (concurrency across aggregates).
        inbox_size: Bounded inbox per actor; dispatch waits when full.
        max_restarts: Restarts of one actor allowed within
            ``restart_window`` seconds after its own loop crashed; one more
            and the error leaves ``open_bus``.
        restart_window: See ``max_restarts``.
        handler_timeout: Default seconds per handler call (None: no limit).
        retry: Retry policy for failing handler calls.
        dead_letter: Dead-letter topic template (``"{topic}.dlq"``) or a
            function of the topic.
        shutdown_grace: Seconds in-flight handlers get on a normal close.
        max_message_bytes: Largest accepted body.
        transport_options: Transport-specific options object (e.g.
            ``KafkaOptions``, ``NatsOptions``).
        monitoring: Settings of the monitor task (lag, backlog, stalls,
            probe); None: no monitor task (``health()`` still works).
        tracing: OpenTelemetry spans and trace context in headers; None:
            on when an OpenTelemetry SDK tracer provider is installed; a
            ``TracerProvider``: use that one.
        publish_rate: A :class:`RateLimit` shared by the ``publish``,
            ``publish_envelope`` and ``publish_many`` calls of every topic
            not in *publish_rates*; over it publishers wait, first come
            first served (nothing is dropped). None: not limited.
            Dead-letter copies and health probes are never limited.
        publish_rates: Per-topic limits, each replacing *publish_rate* for
            its topic (its own bucket; None: that topic is not limited),
            e.g. ``{"orders": RateLimit(per_second=50, burst=10)}``.
        persistence: ``"persistent"`` (stored, at-least-once: the default),
            ``"ephemeral"`` (no storage where the broker allows it,
            at-most-once) or ``"auto"`` (persistent if the broker already
            stores the topic) for every topic, or a mapping of topics to
            modes (the others persistent). See docs/topics.md.

    Raises:
        ConfigError, UnsupportedURLError: bad configuration.
        MissingExtraError: the transport's client library is not installed.
        TransportError: the transport could not connect.
        ActorCrashedError: an actor crashed past ``max_restarts``.
        KeyboardInterrupt: Ctrl-C (SIGINT) arrived while the bus was open:
            the bus was cancelled, closed (acks of finished handlers
            flushed, the rest left for redelivery), and then this is
            raised. See docs/architecture.md, "Ctrl-C".
    """
    if monitoring is not None and not isinstance(monitoring, Monitoring):
        raise ConfigError(f"monitoring must be a Monitoring, not {type(monitoring).__name__}")
    config = BusConfig(
        client_id=client_id,
        pool_size=pool_size,
        inbox_size=inbox_size,
        max_restarts=max_restarts,
        restart_window=restart_window,
        handler_timeout=handler_timeout,
        retry=RetryPolicy() if retry is None else retry,
        dead_letter=dead_letter,
        shutdown_grace=shutdown_grace,
        max_message_bytes=max_message_bytes,
        publish_rate=publish_rate,
        publish_rates={} if publish_rates is None else publish_rates,
        persistence=PersistencePolicy.parse(persistence),
    )
    scheme, hosts = parse_url(url)
    factory = resolve(scheme)
    settings = TransportSettings(
        url=url,
        hosts=hosts,
        client_id=client_id,
        options=transport_options,
        max_message_bytes=max_message_bytes,
        persistence=config.persistence,
    )
    # Ctrl-C cancels this scope (see _signals.py): the body and a graceful
    # drain stop, the shielded shutdown still runs, then KeyboardInterrupt.
    run_scope = trio.CancelScope()
    with sigint_cancels(run_scope.cancel) as interrupt, run_scope:
        user_exc: BaseException | None = None
        try:
            async with factory(settings) as transport, trio.open_nursery() as nursery:
                bus = Bus(
                    config,
                    transport,
                    nursery,
                    monitoring=monitoring or Monitoring(),
                    tracer=tracer_for(tracing),
                )
                pool_scope, pool_done = trio.CancelScope(), trio.Event()
                await nursery.start(_run_scoped, bus._pool.run, pool_scope, pool_done)
                publisher_scope = trio.CancelScope()
                coalescer = bus._publisher.coalescer
                if coalescer is not None:
                    await nursery.start(_run_scoped, coalescer.run, publisher_scope, trio.Event())
                monitor_scope = trio.CancelScope()
                if monitoring is not None:
                    await nursery.start(_run_scoped, bus._monitor.run, monitor_scope, trio.Event())
                try:
                    yield bus
                except BaseException as exc:
                    user_exc = exc
                    raise
                finally:
                    monitor_scope.cancel()
                    try:
                        if not _is_cancellation(user_exc) and not pool_done.is_set():
                            await bus._subscriptions.drain()
                    finally:
                        await _shutdown(bus, pool_scope, pool_done)
                        publisher_scope.cancel()
        except BaseExceptionGroup as group:
            chosen = _collapse(group, user_exc)
            if chosen is group:
                raise
            raise_as_is(chosen)
    if interrupt.received:
        raise KeyboardInterrupt


async def _shutdown(bus: Bus, pool_scope: trio.CancelScope, pool_done: trio.Event) -> None:
    """The bounded, shielded part of closing: stop the actors, release what
    they held, flush and close every consumer, stop the publisher."""
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + CANCEL_FLUSH_TIMEOUT
        bus._subscriptions.stop_fetching()
        pool_scope.cancel()
        await pool_done.wait()
        await bus._subscriptions.close_consumers()
        bus._publisher.close()
