"""Transports: the embedded memory broker, Kafka and NATS JetStream.

The core never imports a transport module directly; :func:`resolve` maps a
URL scheme to its module, imported lazily so the optional clients (aiokafka,
nats-py, trio-asyncio) are needed only by the transports that use them.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from ..errors import MissingExtraError, UnsupportedURLError
from ._base import TransportFactory

__all__ = ["SCHEMES", "parse_url", "resolve"]

#: scheme -> (module, pip extra that provides its client library or None)
SCHEMES: dict[str, tuple[str, str | None]] = {
    "memory": ("trio_bus.transports.memory", None),
    "kafka": ("trio_bus.transports.kafka", "kafka"),
    "nats": ("trio_bus.transports.nats", "nats"),
}


def parse_url(url: str) -> tuple[str, tuple[str, ...]]:
    """Split a bus URL into its scheme and its ``host:port`` list.

    ``kafka://h1:9092,h2:9092`` -> ``("kafka", ("h1:9092", "h2:9092"))``;
    ``memory://name`` -> ``("memory", ("name",))``.
    """
    if not isinstance(url, str) or "://" not in url:
        raise UnsupportedURLError(
            f"bus URL {url!r} has no scheme; use one of " + ", ".join(f"{s}://" for s in SCHEMES)
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UnsupportedURLError(
            f"unsupported bus URL scheme {parts.scheme!r}; supported: "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    netloc = url.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    hosts = tuple(h for h in netloc.split(",") if h)
    if scheme != "memory" and not hosts:
        raise UnsupportedURLError(f"bus URL {url!r} names no host:port")
    return scheme, hosts


def resolve(scheme: str) -> TransportFactory:
    """Import the transport for *scheme* and return its ``open_transport``."""
    module_name, extra = SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None or isinstance(exc, MissingExtraError):
            raise
        raise MissingExtraError(
            f'the {scheme} transport needs extra packages: pip install "trio-bus[{extra}]"  ({exc})'
        ) from exc
    factory: TransportFactory = module.open_transport
    return factory
