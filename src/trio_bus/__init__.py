"""trio_bus: a Trio structured-concurrency event bus.

Per-aggregate ordered, concurrent, at-least-once event handling on Kafka,
NATS JetStream or an embedded in-memory transport::

    import trio, trio_bus

    async def handle(message: trio_bus.Message) -> None:
        print(message.aggregate_id, message.value)

    async def main() -> None:
        async with trio_bus.open_bus("memory://") as bus:
            await bus.subscribe("orders", handle)
            await bus.publish("orders", b'{"total": 5}', key="order-1")

Layers, each importing only from those above it: ``errors`` -> ``_names``,
``_envelope``, ``_message``, ``_config``, ``_stats`` -> ``_ratelimit``,
``_topics``, ``transports._base`` -> ``_pool``, ``_publisher`` -> ``_subscription`` ->
``health``, ``metrics`` -> ``_bus`` -> ``_open``. Concrete transports are imported lazily by URL
scheme; only they and ``transports._bridge`` import trio-asyncio.
"""

from __future__ import annotations

import logging as _logging

from . import errors as errors
from . import metrics as metrics
from ._bus import Bus as Bus
from ._config import RateLimit as RateLimit
from ._config import RetryPolicy as RetryPolicy
from ._envelope import Envelope as Envelope
from ._envelope import decode_envelope as decode_envelope
from ._envelope import encode_envelope as encode_envelope
from ._message import Message as Message
from ._message import OutgoingMessage as OutgoingMessage
from ._open import open_bus as open_bus
from ._pool import current_message as current_message
from ._results import PublishResult as PublishResult
from ._router import EventRoute as EventRoute
from ._router import Router as Router
from ._stats import BusStatistics as BusStatistics
from ._stats import RunningHandler as RunningHandler
from ._stats import TopicStatistics as TopicStatistics
from ._subscription import Subscription as Subscription
from ._topics import Persistence as Persistence
from ._topics import TopicAdmin as TopicAdmin
from ._topics import TopicDescription as TopicDescription
from .health import BacklogEvent as BacklogEvent
from .health import HealthReport as HealthReport
from .health import Monitoring as Monitoring
from .health import Stall as Stall

__all__ = [
    "BacklogEvent",
    "Bus",
    "BusStatistics",
    "Envelope",
    "EventRoute",
    "HealthReport",
    "Message",
    "Monitoring",
    "OutgoingMessage",
    "Persistence",
    "PublishResult",
    "RateLimit",
    "RetryPolicy",
    "Router",
    "RunningHandler",
    "Stall",
    "Subscription",
    "TopicAdmin",
    "TopicDescription",
    "TopicStatistics",
    "current_message",
    "decode_envelope",
    "encode_envelope",
    "errors",
    "metrics",
    "open_bus",
]

__version__ = "0.1.0.dev0"

# A library logs, the application decides where it goes.
_logging.getLogger("trio_bus").addHandler(_logging.NullHandler())
