"""SASL SCRAM in front of a Kafka broker that cannot hold SCRAM users.

Tansu 0.6 (the broker of the test suite) requires SCRAM with
``--authentication`` but never keeps a user: its only built-in storage
engine (``memory://`` and ``s3://`` are both "dynostore") accepts
AlterUserScramCredentials and discards it, and finds no user at login
(docs/security.md, "Tansu"). A :class:`SASLTerminator` therefore does what a
Kafka broker's SASL listener does -- the SaslHandshake and SaslAuthenticate
exchange, SCRAM-SHA-256 and SCRAM-SHA-512 per RFC 5802 and RFC 7677 --
and relays everything after a successful login to a plaintext Tansu that
advertises the terminator's port::

    terminator = SASLTerminator("127.0.0.1", broker_port, listen_port=advertised)
    terminator.set_password("svc", "s3cret")
    async with trio.open_nursery() as nursery:
        await nursery.start(terminator.run)
        ...  # clients connect with SASL_PLAINTEXT to terminator.port

Like a Kafka broker it authenticates a connection once, at its start:
:meth:`SASLTerminator.set_password` changes what *new* connections must
present, and :meth:`SASLTerminator.drop_connections` closes the open ones,
as a broker restart after a credential rotation does. What this tests is
aiokafka's SASL client and trio_bus's handling of it, not a broker's SASL
stack. Fit for tests only: the passwords live in memory, one salt serves
every user.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct

import trio

from ._tls import _pump, serve_loopback

__all__ = ["SASLTerminator"]

_HANDSHAKE, _AUTHENTICATE, _API_VERSIONS = 17, 36, 18
_UNSUPPORTED_SASL_MECHANISM, _SASL_AUTHENTICATION_FAILED = 33, 58
_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
_ITERATIONS = 4096
_REFUSAL = "Authentication failed during authentication due to invalid credentials"


class _RefusedError(Exception):
    """The client's SCRAM exchange failed."""


class SASLTerminator:
    """Authenticate Kafka clients with SASL SCRAM on a loopback port, then
    relay their connection to ``host:port``.

    Attributes:
        port: The listening port (*listen_port*, or a free one once
            :meth:`run` started).
        logins: Successful logins so far.
        refused: Failed logins so far (wrong or unknown user, bad proof).
    """

    def __init__(self, host: str, port: int, *, listen_port: int = 0) -> None:
        self.target = (host, port)
        self.port = listen_port
        self.logins = 0
        self.refused = 0
        self._passwords: dict[str, str] = {}
        self._salt = os.urandom(16)
        self._connections: set[trio.CancelScope] = set()

    def set_password(self, user: str, password: str | None) -> None:
        """Give *user* this password (None: remove the user) for the logins
        from now on; open connections stay logged in."""
        if password is None:
            self._passwords.pop(user, None)
        else:
            self._passwords[user] = password

    def drop_connections(self) -> None:
        """Close every open connection, as a broker restart does."""
        for scope in list(self._connections):
            scope.cancel()

    async def run(
        self, *, task_status: trio.TaskStatus[SASLTerminator] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; ``nursery.start`` returns it."""
        await serve_loopback(self, self._serve, task_status)

    async def _serve(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                async with client:
                    await _Connection(self, client).run()
            except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, OSError):
                pass
            finally:
                self._connections.discard(scope)

    def _keys(self, user: str, mechanism: str) -> tuple[bytes, bytes] | None:
        # (StoredKey, ServerKey) of RFC 5802, or None for an unknown user.
        password = self._passwords.get(user)
        if password is None:
            return None
        name = _HASHES[mechanism]
        salted = hashlib.pbkdf2_hmac(name, password.encode(), self._salt, _ITERATIONS)
        client_key = hmac.digest(salted, b"Client Key", name)
        stored_key = hashlib.new(name, client_key).digest()
        return stored_key, hmac.digest(salted, b"Server Key", name)


class _Connection:
    """One client connection: SASL first, then a plain relay."""

    def __init__(self, terminator: SASLTerminator, client: trio.SocketStream) -> None:
        self.terminator = terminator
        self.client = client
        self.buffer = b""
        self.upstream: trio.SocketStream | None = None
        self.mechanism: str | None = None
        self.scram: _ScramServer | None = None
        self.raw = b""  # the last frame read, as received
        self.pumping = False  # whether upstream answers are relayed already

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                try:
                    logged_in = await self._login(nursery)
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    logged_in = False
                if not logged_in or self.upstream is None:
                    nursery.cancel_scope.cancel()
                    return
                # Logged in: relay bytes both ways, unparsed, until either ends.
                upstream = self.upstream
                try:
                    await upstream.send_all(self.buffer)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()
                    return
                if not self.pumping:
                    nursery.start_soon(_pump, upstream, self.client, nursery.cancel_scope)
                nursery.start_soon(_pump, self.client, upstream, nursery.cancel_scope)
        finally:
            if self.upstream is not None:
                await trio.aclose_forcefully(self.upstream)

    async def _login(self, nursery: trio.Nursery) -> bool:
        """The exchange before a login; True once logged in, False when the
        client sent something else (Kafka closes the connection too)."""
        while True:
            api_key, version, correlation, body = await self._frame()
            if api_key == _API_VERSIONS and self.mechanism is None:
                await self._forward(nursery)
            elif api_key == _HANDSHAKE and version <= 1 and self.mechanism is None:
                await self._handshake(correlation, body)
            elif api_key == _AUTHENTICATE and version <= 1 and self.scram is not None:
                if await self._authenticate(version, correlation, body):
                    return True
            else:
                return False

    async def _frame(self) -> tuple[int, int, int, bytes]:
        size = struct.unpack(">i", await self._read(4))[0]
        frame = await self._read(size)
        api_key, version, correlation, client_id_len = struct.unpack(">hhih", frame[:10])
        body = frame[10 + max(client_id_len, 0) :]
        self.raw = struct.pack(">i", size) + frame
        return api_key, version, correlation, body

    async def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = await self.client.receive_some(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def _reply(self, correlation: int, body: bytes) -> None:
        await self.client.send_all(struct.pack(">ii", len(body) + 4, correlation) + body)

    async def _forward(self, nursery: trio.Nursery) -> None:
        # ApiVersions: the broker's own answer (the versions it speaks).
        if self.upstream is None:
            self.upstream = await trio.open_tcp_stream(*self.terminator.target)
            # aiokafka awaits each answer before its next login request, so
            # the broker's ApiVersions answer and ours never interleave.
            nursery.start_soon(_pump, self.upstream, self.client, nursery.cancel_scope)
            self.pumping = True
        await self.upstream.send_all(self.raw)

    async def _handshake(self, correlation: int, body: bytes) -> None:
        (length,) = struct.unpack(">h", body[:2])
        mechanism = body[2 : 2 + length].decode()
        offered = list(_HASHES)
        error = 0 if mechanism in offered else _UNSUPPORTED_SASL_MECHANISM
        names = b"".join(struct.pack(">h", len(m)) + m.encode() for m in offered)
        await self._reply(correlation, struct.pack(">hi", error, len(offered)) + names)
        if not error:
            self.mechanism = mechanism
            self.scram = _ScramServer(self.terminator, mechanism)

    async def _authenticate(self, version: int, correlation: int, body: bytes) -> bool:
        """One SaslAuthenticate round; True once the login succeeded."""
        assert self.scram is not None
        (length,) = struct.unpack(">i", body[:4])
        try:
            answer = self.scram.step(body[4 : 4 + length])
            error, message = 0, b""
        except (_RefusedError, ValueError, KeyError, UnicodeDecodeError):  # a malformed one too
            self.terminator.refused += 1
            answer, error, message = b"", _SASL_AUTHENTICATION_FAILED, _REFUSAL.encode()
        reply = struct.pack(">hh", error, len(message)) + message
        reply += struct.pack(">i", len(answer)) + answer
        if version >= 1:
            reply += struct.pack(">q", 0)  # session_lifetime_ms: no re-authentication
        await self._reply(correlation, reply)
        if error:
            raise EOFError  # Kafka closes the connection after a refusal
        if self.scram.done:
            self.terminator.logins += 1
            if self.upstream is None:
                self.upstream = await trio.open_tcp_stream(*self.terminator.target)
            return True
        return False


class _ScramServer:
    """The server side of one SCRAM exchange (RFC 5802 section 5)."""

    def __init__(self, terminator: SASLTerminator, mechanism: str) -> None:
        self.terminator = terminator
        self.mechanism = mechanism
        self.hash = _HASHES[mechanism]
        self.keys: tuple[bytes, bytes] | None = None
        self.auth_message = ""
        self.nonce = ""
        self.done = False

    def step(self, message: bytes) -> bytes:
        text = message.decode()
        if not self.auth_message:
            return self._first(text)
        return self._final(text)

    def _first(self, text: str) -> bytes:
        bare = text.partition(",,")[2]  # "n,,n=user,r=nonce": no channel binding
        fields = dict(part.split("=", 1) for part in bare.split(","))
        user = fields["n"].replace("=2C", ",").replace("=3D", "=")
        self.keys = self.terminator._keys(user, self.mechanism)
        if self.keys is None:
            raise _RefusedError
        self.nonce = fields["r"] + base64.b64encode(os.urandom(18)).decode()
        salt = base64.b64encode(self.terminator._salt).decode()
        server_first = f"r={self.nonce},s={salt},i={_ITERATIONS}"
        self.auth_message = f"{bare},{server_first}"
        return server_first.encode()

    def _final(self, text: str) -> bytes:
        without_proof, _, proof = text.rpartition(",p=")
        fields = dict(part.split("=", 1) for part in without_proof.split(","))
        if fields.get("r") != self.nonce or self.keys is None:
            raise _RefusedError
        stored_key, server_key = self.keys
        auth = f"{self.auth_message},{without_proof}".encode()
        signature = hmac.digest(stored_key, auth, self.hash)
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
        if not hmac.compare_digest(hashlib.new(self.hash, client_key).digest(), stored_key):
            raise _RefusedError
        self.done = True
        verifier = base64.b64encode(hmac.digest(server_key, auth, self.hash)).decode()
        return f"v={verifier}".encode()
