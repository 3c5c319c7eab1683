"""A 3-node NATS JetStream cluster on loopback, for failover tests.

Three ``nats-server`` processes (the binary :class:`~trio_bus.testing.NatsServer`
uses), each with a free client port, a free cluster port, a free monitoring
port and a store directory of its own, routed to each other::

    with NatsCluster(tmp_path) as cluster:
        async with trio_bus.open_bus(cluster.url, ...) as bus: ...
        cluster.kill(cluster.stream_leader("orders"))   # SIGKILL the leader
        cluster.restart("n1")                           # same ports and store

Readiness is read from the servers themselves (the monitoring port's
``/jsz`` and ``/routez``), not waited for with sleeps: every running node is
routed to every other running node and all agree on one JetStream meta
leader. Blocking helpers for fixtures, outside any Trio run.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from ._servers import START_TIMEOUT, find_nats_server, free_port, stop_process

__all__ = ["ClusterNode", "NatsCluster", "js_request"]

#: The cluster's name (``--cluster_name``), which placement can name.
CLUSTER_NAME = "trio-bus-test"


def js_request(port: int, subject: str, body: bytes = b"", timeout: float = 2.0) -> dict[str, Any]:
    """One request over a raw NATS connection to ``127.0.0.1:port``
    (no auth, no TLS); the JSON reply.

    A raw socket keeps these helpers free of an event loop, so fixtures and
    test code outside any Trio run can call them.

    Raises:
        OSError: no connection, or no reply within *timeout*.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        buf = b""
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed before INFO")
            buf += chunk
        sock.sendall(
            b'CONNECT {"verbose":false,"headers":false}\r\n'
            + b"SUB _R.reply 1\r\n"
            + b"PUB %s _R.reply %d\r\n%s\r\n" % (subject.encode(), len(body), body)
        )
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            start = buf.find(b"MSG _R.reply ")
            if start >= 0 and b"\r\n" in buf[start:]:
                head, _, rest = buf[start:].partition(b"\r\n")
                size = int(head.split()[-1])
                if len(rest) >= size:
                    reply: dict[str, Any] = json.loads(rest[:size])
                    return reply
            if b"-ERR" in buf:
                raise OSError(f"server refused the request: {buf[-200:]!r}")
            if b"PING\r\n" in buf:
                sock.sendall(b"PONG\r\n")
                buf = buf.replace(b"PING\r\n", b"")
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed before the reply")
            buf += chunk
    raise OSError(f"no reply to {subject} within {timeout} s")


class ClusterNode:
    """One server of a :class:`NatsCluster`; its ports never change.

    Attributes:
        name: ``--server_name`` (``n1``...).
        port: Client port.
        cluster_port: Route port.
        monitor_port: HTTP monitoring port.
        store: JetStream store directory (the log goes there too).
        proc: The running process, or None.
    """

    def __init__(self, name: str, store: Path) -> None:
        self.name = name
        self.port = free_port()
        self.cluster_port = free_port()
        self.monitor_port = free_port()
        self.store = store
        self.log = store / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, path: str) -> dict[str, Any]:
        """GET ``/path`` from the monitoring port (raises ``OSError``)."""
        url = f"http://127.0.0.1:{self.monitor_port}/{path}"
        with urllib.request.urlopen(url, timeout=1.0) as response:
            data: dict[str, Any] = json.load(response)
            return data


class NatsCluster:
    """Three routed ``nats-server -js`` processes (``n1``..``n3``) on
    loopback, cluster name :data:`CLUSTER_NAME`.

    Args:
        root: Directory for the three store directories and logs.
        size: Number of servers (3 for a cluster that survives one loss).
    """

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.nodes = {f"n{i}": ClusterNode(f"n{i}", root / f"n{i}") for i in range(1, size + 1)}
        # Servers stopped on purpose: the others exiting is an error.
        self._killed: set[str] = set(self.nodes)

    @property
    def urls(self) -> list[str]:
        """Every server's client URL."""
        return [node.url for node in self.nodes.values()]

    @property
    def url(self) -> str:
        """A bus URL naming every server: ``nats://h:p1,h:p2,h:p3``."""
        return "nats://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes.values())

    def start(self) -> None:
        """Start every server; return once the cluster is ready (bounded)."""
        for name in self.nodes:
            self._spawn(name)
        self.wait_ready()

    def _spawn(self, name: str) -> None:
        node = self.nodes[name]
        assert not node.running, f"{name} is running"
        node.store.mkdir(parents=True, exist_ok=True)
        self._killed.discard(name)
        routes = ",".join(
            f"nats://127.0.0.1:{other.cluster_port}"
            for other in self.nodes.values()
            if other is not node
        )
        with node.log.open("ab") as log:
            node.proc = subprocess.Popen(
                [
                    find_nats_server(),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(node.port),
                    "-m",
                    str(node.monitor_port),
                    "-js",
                    "-sd",
                    str(node.store),
                    "--server_name",
                    name,
                    "--cluster_name",
                    CLUSTER_NAME,
                    "--cluster",
                    f"nats://127.0.0.1:{node.cluster_port}",
                    "--routes",
                    routes,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def running(self) -> list[str]:
        """Names of the servers whose process is alive."""
        return [name for name, node in self.nodes.items() if node.running]

    def _ready(self) -> bool:
        up = self.running()
        leaders = set()
        for name in up:
            node = self.nodes[name]
            try:
                routed = {r.get("remote_name") for r in node.monitor("routez").get("routes") or ()}
                meta = node.monitor("jsz").get("meta_cluster") or {}
            except (OSError, ValueError):
                return False
            peers = {r["name"] for r in meta.get("replicas") or () if r.get("current")}
            if not set(up) - {name} <= routed:
                return False
            if meta.get("leader") == name and not set(up) - {name} <= peers:
                return False  # the meta leader has not caught every peer up
            leaders.add(meta.get("leader") or "")
        return len(leaders) == 1 and "" not in leaders and leaders <= set(up)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every running server is routed to every other one,
        all agree on a JetStream meta leader among them, and that leader
        reports every other running server current."""
        self.wait_for(self._ready, "cluster ready", timeout)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll *condition* (a question to the servers) until true; raise
        ``RuntimeError`` with the servers' log tails after *timeout*."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while not condition():
            dead = [n for n in self.nodes if n not in self._killed and not self.nodes[n].running]
            if dead or time.monotonic() > deadline:
                tails = "\n".join(
                    f"--- {n}:\n" + node.log.read_text(errors="replace")[-1500:]
                    for n, node in self.nodes.items()
                    if node.log.exists()
                )
                raise RuntimeError(f"NATS cluster: {what} not reached (exited: {dead}):\n{tails}")
            time.sleep(delay)  # polling processes, outside any Trio run
            delay = min(delay * 2, 0.1)

    def stream_info(self, stream: str) -> dict[str, Any]:
        """``$JS.API.STREAM.INFO.<stream>`` asked of any running server."""
        last: Exception | None = None
        for name in self.running():
            try:
                return js_request(self.nodes[name].port, f"$JS.API.STREAM.INFO.{stream}")
            except OSError as exc:
                last = exc
        raise OSError(f"no running server answered for stream {stream}: {last}")

    def stream_leader(self, stream: str) -> str:
        """The server name currently leading *stream* (``""`` during an
        election, when no server answers)."""
        try:
            info = self.stream_info(stream)
        except OSError:
            return ""
        leader: str = (info.get("cluster") or {}).get("leader") or ""
        return leader

    def current_replicas(self, stream: str) -> int:
        """How many copies of *stream* are current: the leader plus the
        replicas it reports current (0 when no server answers)."""
        try:
            cluster = self.stream_info(stream).get("cluster") or {}
        except OSError:
            return 0
        if not cluster.get("leader"):
            return 0
        return 1 + sum(1 for r in cluster.get("replicas") or () if r.get("current"))

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal server *name* by PID (SIGKILL: a crash) and reap it."""
        self._killed.add(name)
        proc = self.nodes[name].proc
        if proc is not None:
            stop_process(proc, sig)

    def restart(self, name: str, timeout: float = START_TIMEOUT) -> None:
        """Start server *name* again (same ports, same store) after
        :meth:`kill`; return once it has rejoined the cluster (within
        *timeout*)."""
        if self.nodes[name].running:
            self.kill(name, signal.SIGTERM)
        self._spawn(name)
        self.wait_ready(timeout)

    def stop(self) -> None:
        """Stop every server by PID."""
        for name in self.nodes:
            self.kill(name, signal.SIGTERM)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
