"""Testing tools for trio_bus and for users' own tests.

* :class:`FaultProxy`: a TCP proxy that resets or blackholes connections.
* Real brokers on free loopback ports, started as processes and stopped by
  PID (:class:`NatsServer`, :func:`run_tansu`, ...), NATS with TLS and
  credentials if asked; :class:`NatsCluster`: three routed JetStream servers;
  :class:`S3Server`: a local S3 endpoint for Tansu's ``s3://`` storage.
* :class:`TestCA`: throwaway certificates for TLS tests (needs trustme);
  :class:`TLSTerminator`: TLS in front of a plaintext broker;
  :class:`SASLTerminator`: SASL SCRAM logins in front of a Kafka broker.
* :mod:`trio_bus.testing.plugin`: the pytest plugin (fixtures
  ``trio_bus_memory_url``, ``trio_bus_nats_url``, ``trio_bus_kafka_url``),
  loaded by pytest automatically.
* :mod:`trio_bus.testing.contract`: the transport contract suite
  (:class:`TransportContract`) a transport, built-in or not, runs on itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._cluster import NatsCluster as NatsCluster
from ._proxy import FaultProxy as FaultProxy
from ._s3 import S3Server as S3Server
from ._sasl import SASLTerminator as SASLTerminator
from ._servers import NatsServer as NatsServer
from ._servers import TansuBroker as TansuBroker
from ._servers import find_nats_server as find_nats_server
from ._servers import free_port as free_port
from ._servers import run_tansu as run_tansu
from ._servers import stop_process as stop_process
from ._servers import tansu_binary as tansu_binary
from ._servers import wait_for_port as wait_for_port
from ._tls import TestCA as TestCA
from ._tls import TLSFiles as TLSFiles
from ._tls import TLSTerminator as TLSTerminator

if TYPE_CHECKING:
    from .contract import Capabilities as Capabilities
    from .contract import ContractTarget as ContractTarget
    from .contract import TransportContract as TransportContract
    from .contract import contract_settings as contract_settings
    from .plugin import KAFKA_URL_PARAMS as KAFKA_URL_PARAMS
    from .plugin import kafka_url as kafka_url

__all__ = [
    "KAFKA_URL_PARAMS",
    "Capabilities",
    "ContractTarget",
    "FaultProxy",
    "NatsCluster",
    "NatsServer",
    "S3Server",
    "SASLTerminator",
    "TLSFiles",
    "TLSTerminator",
    "TansuBroker",
    "TestCA",
    "TransportContract",
    "contract_settings",
    "find_nats_server",
    "free_port",
    "kafka_url",
    "run_tansu",
    "stop_process",
    "tansu_binary",
    "wait_for_port",
]


_CONTRACT_NAMES = {"Capabilities", "ContractTarget", "TransportContract", "contract_settings"}


def __getattr__(name: str) -> object:
    # The plugin's and the contract's names load lazily: they import pytest,
    # which users of the servers and the proxy (benchmarks, scripts) need not
    # have.
    if name in {"KAFKA_URL_PARAMS", "kafka_url"}:
        from . import plugin

        return getattr(plugin, name)
    if name in _CONTRACT_NAMES:
        from . import contract

        return getattr(contract, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
