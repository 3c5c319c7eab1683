"""What a refused connection to NATS means, said without secrets.

nats-py reports the real cause of a refused connection only to its error
callback (``nats: 'Authorization Violation'``, an ``ssl.SSLError`` from the
handshake); ``connect`` itself raises a bare ``NoServersError``. The
connection records what the callback saw and maps it here: a refused login
or certificate is an :class:`~trio_bus.errors.AuthenticationError` naming
the servers (redacted) and the mechanism, never the secret. The same
mapping serves credentials refused while the bus runs (revoked, expired:
:meth:`.Connection.watch`).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from ..._secrets import redact_text, redact_url, url_secrets
from ...errors import AuthenticationError, TransportUnavailableError
from .options import ConnectOptions

__all__ = [
    "AUTH_REFUSALS",
    "auth_failure",
    "authentication_error",
    "connect_bound",
    "connect_error",
    "secrets_of",
    "shown",
]

#: What nats-server says (``-ERR '...'``, any letter case) when it refuses
#: a client's credentials: wrong or removed ones, an expired or a revoked
#: JWT.
AUTH_REFUSALS = (
    "authorization violation",
    "authentication expired",
    "authentication revoked",
)


def secrets_of(c: ConnectOptions, servers: Sequence[str]) -> list[str]:
    """Every secret the connection knows: options and URL userinfo."""
    found = [s for s in (c.password, c.token) if s]
    for server in servers:
        found += url_secrets(server)
    return found


def shown(servers: Sequence[str]) -> str:
    """The servers as an error message may show them."""
    return ", ".join(redact_url(server) for server in servers)


def connect_bound(c: ConnectOptions, servers: Sequence[str]) -> float:
    """Seconds one pass over *servers* may take. nats-py 2.16 hangs after a
    failed TLS handshake (it awaits the close of the broken transport), so
    the first connect is bounded by this."""
    return (c.connect_timeout + c.reconnect_time_wait) * (2 * len(servers)) + 1.0


def auth_failure(seen: Sequence[BaseException]) -> BaseException | None:
    """The first of *seen* that says our credentials (or the TLS handshake)
    were refused, or None."""
    for exc in seen:
        text = str(exc).lower()
        if isinstance(exc, ssl.SSLError) or any(refusal in text for refusal in AUTH_REFUSALS):
            return exc
    return None


def _mechanism(c: ConnectOptions, servers: Sequence[str], exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "TLS"
    if isinstance(exc, ssl.SSLError):
        return "TLS client certificate" if "CERTIFICATE_REQUIRED" in str(exc) else "TLS"
    if c.user_credentials or c.nkeys_seed:
        return "JWT/nkey"
    if c.token:
        return "token"
    if c.user:
        return "user/password"
    for server in servers:  # credentials in the URL
        userinfo, at, _ = server.partition("://")[2].partition("/")[0].rpartition("@")
        if at:
            return "user/password" if ":" in userinfo else "token"
    return "no credentials"


def authentication_error(
    c: ConnectOptions, servers: Sequence[str], failure: BaseException
) -> AuthenticationError:
    """*failure* (see :func:`auth_failure`) as the typed error: the servers
    and the mechanism, the server's reason, no secret."""
    detail = getattr(failure, "verify_message", None) or getattr(failure, "reason", None)
    text = str(detail or failure).removeprefix("nats: ").strip("'")
    return AuthenticationError(
        shown(servers), _mechanism(c, servers, failure), redact_text(text, secrets_of(c, servers))
    )


def connect_error(
    c: ConnectOptions, servers: Sequence[str], seen: Sequence[BaseException]
) -> tuple[TransportUnavailableError, BaseException]:
    """The error for a first connect that failed after nats-py reported
    *seen* (last: what ``connect`` raised), and the cause to chain."""
    secrets = secrets_of(c, servers)
    failure = auth_failure(seen)
    if failure is not None:
        return authentication_error(c, servers, failure), failure
    last = seen[-1]
    text = str(last).strip() or type(last).__name__
    error = TransportUnavailableError(
        f"cannot connect to nats at {shown(servers)}: {redact_text(text, secrets)}"
    )
    return error, last
