"""Throwaway certificate authorities for tests of TLS connections.

A :class:`TestCA` writes PEM files into a directory: its own certificate
(what a client trusts) and, per :meth:`TestCA.issue`, a certificate chain
and private key (what a server, or a client doing mutual TLS, presents).
The keys come from `trustme <https://trustme.readthedocs.io>`_, a
python-trio project, imported only when a CA is made so that
:mod:`trio_bus.testing` imports without it::

    ca = TestCA(tmp_path / "pki")
    server_files = ca.issue("server", "127.0.0.1", "localhost")
    with NatsServer(tmp_path / "nats", tls=server_files) as server:
        options = NatsOptions(connect=ConnectOptions(tls=ca.client_context()))

A :class:`TLSTerminator` puts TLS in front of a plaintext broker, as a
TLS-terminating load balancer does: how the Kafka tests get TLS with
Tansu 0.6, which cannot serve it itself (docs/security.md, "Tansu").

Nothing here is fit for production: the keys are generated in-process and
the CA exists only for the test.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

if TYPE_CHECKING:
    import trustme

__all__ = ["TLSFiles", "TLSTerminator", "TestCA"]

#: Names a certificate is valid for unless the test says otherwise.
DEFAULT_IDENTITIES = ("127.0.0.1", "localhost")


@attrs.frozen
class TLSFiles:
    """PEM files of one issued certificate.

    Attributes:
        ca: The issuing CA's certificate (the trust anchor to verify it).
        cert: The certificate chain, leaf first.
        key: The leaf's private key.
    """

    ca: Path
    cert: Path
    key: Path


class TestCA:
    """A certificate authority of the test's own, its files under *directory*.

    Args:
        directory: Where the PEM files go (created if missing).
        name: File name stem of the CA certificate (``<name>.pem``).

    Raises:
        ImportError: trustme is not installed (``pip install "trio-bus[test]"``).
    """

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, directory: Path, name: str = "ca") -> None:
        try:
            import trustme
        except ImportError as exc:  # an optional test dependency
            raise ImportError(
                f'TestCA needs trustme: pip install "trio-bus[test]" ({exc})'
            ) from exc
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._ca: trustme.CA = trustme.CA()
        self.ca_file = directory / f"{name}.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str, *identities: str) -> TLSFiles:
        """Issue a certificate for *identities* (default: 127.0.0.1 and
        localhost) and write ``<name>.pem`` (chain) and ``<name>.key``.

        trustme's leaf certificates carry both the server and the client
        authentication usages, so one may serve either side.
        """
        leaf = self._ca.issue_cert(*(identities or DEFAULT_IDENTITIES))
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return TLSFiles(ca=self.ca_file, cert=cert, key=key)

    def client_context(self, client_cert: TLSFiles | None = None) -> ssl.SSLContext:
        """A verifying client context that trusts this CA (and only it),
        presenting *client_cert* for mutual TLS when given."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert is not None:
            context.load_cert_chain(client_cert.cert, client_cert.key)
        return context


class TLSTerminator:
    """Accept TLS on a loopback port and forward the plaintext to
    ``host:port``, presenting *files* (and, with *verify_clients*, asking
    for a client certificate issued by ``files.ca``)::

        terminator = TLSTerminator(server_files, "127.0.0.1", broker_port)
        async with trio.open_nursery() as nursery:
            await nursery.start(terminator.run)
            ...  # clients connect with TLS to terminator.port

    Attributes:
        port: The TLS port (*listen_port*, or a free one once :meth:`run`
            started).
        handshakes: TLS handshakes that succeeded.
        refused: Connections whose handshake failed (client distrust, a
            missing client certificate...).
    """

    def __init__(
        self,
        files: TLSFiles,
        host: str,
        port: int,
        *,
        listen_port: int = 0,
        verify_clients: bool = False,
    ) -> None:
        self.target = (host, port)
        self.port = listen_port
        self.handshakes = 0
        self.refused = 0
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(files.cert, files.key)
        if verify_clients:
            self._context.load_verify_locations(cafile=str(files.ca))
            self._context.verify_mode = ssl.CERT_REQUIRED

    async def run(
        self, *, task_status: trio.TaskStatus[TLSTerminator] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and forward until cancelled; ``nursery.start`` returns it."""
        await serve_loopback(self, self._serve, task_status)

    async def _serve(self, client: trio.SocketStream) -> None:
        tls = trio.SSLStream(client, self._context, server_side=True)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.refused += 1
            await trio.aclose_forcefully(tls)
            return
        self.handshakes += 1
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await trio.aclose_forcefully(tls)
            return
        async with tls, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, tls, upstream, nursery.cancel_scope)
            nursery.start_soon(_pump, upstream, tls, nursery.cancel_scope)


async def serve_loopback(
    server: Any,
    serve: Callable[[trio.SocketStream], Awaitable[None]],
    task_status: trio.TaskStatus[Any],
) -> None:
    """Listen on ``server.port`` of 127.0.0.1 (0: a free one, written back),
    report *server* started, and run *serve* per connection until
    cancelled (the terminators' ``run``)."""
    listeners = await trio.open_tcp_listeners(server.port, host="127.0.0.1")
    server.port = listeners[0].socket.getsockname()[1]
    task_status.started(server)
    await trio.serve_listeners(serve, listeners)


async def _pump(source: trio.abc.Stream, sink: trio.abc.Stream, link: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    # One side ended: end the other, as a real peer would see.
    link.cancel()
