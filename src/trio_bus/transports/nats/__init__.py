"""The NATS JetStream transport: ``nats://host:port[,host:port...]``.

nats-py runs on an asyncio loop owned by the transport (through
:mod:`trio_bus.transports._bridge`); Trio code crosses to it once per batch.
The modules, each one role, lowest layer first:

* :mod:`.options` — the options classes and derived names;
* :mod:`.connection` — the nats-py client and the connection watch loop;
* :mod:`.streams` — topics to streams, per the topic strategy;
* :mod:`.bind` — durable pull consumers: create, resume, re-create;
* :mod:`.publish` — batches of JetStream publishes matched to their acks;
* :mod:`.settle` — acks, naks, in-progress acks and their confirmation;
* :mod:`.resume` — the ordered-resume barrier and resync plan (pure logic);
* :mod:`.pulls` — accounting of outstanding pull requests;
* :mod:`.puller` — one durable pull consumer and its lifetime loop;
* :mod:`.supervisor` — the task group owning every lifetime loop;
* :mod:`.partitions` — partition subjects, filters, HRW assignment (pure);
* :mod:`.leases` — a group's members and leases in a KV bucket;
* :mod:`.group` — a partitioned group's member: partitions under leases;
* :mod:`.rounds` — the Trio task running the lease rounds;
* :mod:`.transport` — the Trio side: transport, consumer, ``open_transport``.

docs/nats.md describes the mapping of topics to streams, the options, the
loops and their recovery policies, and which per-aggregate order guarantees
hold on redelivery and reconnection.
"""

from __future__ import annotations

try:
    import nats  # noqa: F401 - fail early with the extra to install
except ImportError as exc:  # pragma: no cover - depends on the environment
    from ...errors import MissingExtraError

    raise MissingExtraError(
        f'the NATS transport needs nats-py: pip install "trio-bus[nats]" ({exc})'
    ) from exc

from .options import (
    TOPIC_HEADER as TOPIC_HEADER,
)
from .options import (
    ConnectOptions as ConnectOptions,
)
from .options import (
    ConsumerOptions as ConsumerOptions,
)
from .options import (
    GroupOptions as GroupOptions,
)
from .options import (
    NatsOptions as NatsOptions,
)
from .options import (
    Placement as Placement,
)
from .options import (
    StreamOptions as StreamOptions,
)
from .options import (
    stream_name as stream_name,
)
from .transport import (
    NatsConsumer as NatsConsumer,
)
from .transport import (
    NatsTransport as NatsTransport,
)
from .transport import (
    open_transport as open_transport,
)

__all__ = [
    "ConnectOptions",
    "ConsumerOptions",
    "GroupOptions",
    "NatsConsumer",
    "NatsOptions",
    "NatsTransport",
    "Placement",
    "StreamOptions",
    "TOPIC_HEADER",
    "open_transport",
    "stream_name",
]
