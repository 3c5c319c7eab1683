"""Testing tools for trio_bus and for users' own tests.

* :class:`FaultProxy`: a TCP proxy that resets or blackholes connections.
* Real brokers on free loopback ports, started as processes and stopped by
  PID (:class:`NatsServer`, :func:`run_tansu`, ...).
"""

from __future__ import annotations

from ._proxy import FaultProxy as FaultProxy
from ._servers import NatsServer as NatsServer
from ._servers import TansuBroker as TansuBroker
from ._servers import find_nats_server as find_nats_server
from ._servers import free_port as free_port
from ._servers import run_tansu as run_tansu
from ._servers import stop_process as stop_process
from ._servers import tansu_binary as tansu_binary
from ._servers import wait_for_port as wait_for_port

__all__ = [
    "FaultProxy",
    "NatsServer",
    "TansuBroker",
    "find_nats_server",
    "free_port",
    "run_tansu",
    "stop_process",
    "tansu_binary",
    "wait_for_port",
]
