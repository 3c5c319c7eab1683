"""The Kafka transport: ``kafka://host:port[,host:port...]``.

aiokafka runs on the transport's own asyncio loop (trio-asyncio, see
:mod:`trio_bus.transports._bridge`). The subpackage is split by role, each
module importing only from those listed before it:

* :mod:`.options` -- :class:`KafkaOptions`, :class:`TopicConfig`, URL query;
* :mod:`.errors` -- aiokafka errors mapped to :mod:`trio_bus.errors`;
* :mod:`.offsets` -- :class:`PartitionTrack`, per-partition commit points;
* :mod:`.admin` -- topic provisioning (policy in ``_provisioning``);
* :mod:`.producer` -- publishing batches;
* :mod:`.group` -- consumer groups: membership, rebalances, positions;
* :mod:`.transport` -- :class:`KafkaTransport`, :func:`open_transport`.

See docs/kafka.md for the design.
"""

from __future__ import annotations

try:
    import aiokafka  # noqa: F401 - fail early with the extra to install
except ImportError as exc:  # pragma: no cover - depends on the install
    from ...errors import MissingExtraError

    raise MissingExtraError(
        f'the kafka transport needs aiokafka: pip install "trio-bus[kafka]" ({exc})'
    ) from exc

from .offsets import PartitionTrack as PartitionTrack
from .options import KafkaOptions as KafkaOptions
from .options import TopicConfig as TopicConfig
from .options import resolve_options as resolve_options
from .transport import KafkaTransport as KafkaTransport
from .transport import open_transport as open_transport

__all__ = [
    "KafkaOptions",
    "KafkaTransport",
    "PartitionTrack",
    "TopicConfig",
    "open_transport",
    "resolve_options",
]
