"""aiokafka's errors mapped to trio_bus's, at the boundary, chained."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiokafka.errors as kafka_errors
from aiokafka.conn import create_conn

from ..._secrets import redact_text, redact_url
from ...errors import (
    AuthenticationError,
    PublishError,
    PublishOutcomeUnknownError,
    TransportError,
    TransportUnavailableError,
)
from .options import KafkaOptions

__all__ = [
    "connect_error",
    "handshake_refusal",
    "is_retriable",
    "refusal",
    "try_handshake",
    "publish_error",
    "retrieve_when_done",
    "transport_error",
]

#: Delivery failures after which the record may or may not be stored.
_UNKNOWN_OUTCOME = (
    kafka_errors.KafkaTimeoutError,
    kafka_errors.RequestTimedOutError,
    kafka_errors.NotEnoughReplicasAfterAppendError,
    kafka_errors.KafkaConnectionError,
)


def publish_error(exc: BaseException, topic: str) -> PublishError:
    """Map an aiokafka delivery failure to trio_bus's error, chained."""
    cls = PublishOutcomeUnknownError if isinstance(exc, _UNKNOWN_OUTCOME) else PublishError
    err = cls(f"publish to {topic!r} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def transport_error(exc: BaseException, what: str) -> TransportError:
    """Map a client failure to :class:`TransportUnavailableError` (the broker
    cannot be reached) or :class:`TransportError`, chained; trio_bus's own
    transport errors pass unchanged."""
    if isinstance(exc, TransportError):
        return exc
    cls = (
        TransportUnavailableError
        if isinstance(exc, kafka_errors.KafkaConnectionError | OSError)
        else TransportError
    )
    err = cls(f"{what}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def is_retriable(exc: BaseException) -> bool:
    """Whether a failed fetch may simply be tried again: aiokafka marks
    transient broker errors ``retriable``; a lost connection is reopened by
    the client itself."""
    return bool(getattr(exc, "retriable", False)) or isinstance(
        exc, kafka_errors.KafkaConnectionError
    )


def retrieve_when_done(future: asyncio.Future[Any]) -> None:
    """Mark *future*'s error as seen once it ends: for an abandoned request
    (its answer came too late). An error nobody retrieves is reported when
    the future is collected, and trio-asyncio raises it into the loop."""
    future.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


#: aiokafka's errors for a refused SASL login.
_SASL_REFUSED = (
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.IllegalSaslStateError,
    kafka_errors.UnsupportedSaslMechanismError,
)
#: Seconds one diagnostic connection may take.
_DIAGNOSE_TIMEOUT = 5.0


def _where(hosts: Sequence[str]) -> str:
    return redact_url(",".join(hosts))


def refusal(exc: BaseException, options: KafkaOptions) -> tuple[str, str] | None:
    """``(mechanism, detail)`` when *exc* says the broker refused our
    credentials or we refused its certificate; None otherwise. The detail
    holds no secret."""
    if isinstance(exc, ssl.SSLError):
        return "TLS", getattr(exc, "verify_message", None) or exc.reason or str(exc)
    if not options.security_protocol.startswith("SASL"):
        return None
    mechanism = options.sasl_mechanism
    # aiokafka 0.14's SCRAM client raises KeyError('v') when the broker
    # answers its final message with an error ('e=...', as Tansu does).
    if isinstance(exc, KeyError) and mechanism.startswith("SCRAM"):
        return mechanism, "credentials refused"
    if isinstance(exc, _SASL_REFUSED):
        secrets = [options.sasl_plain_password] if options.sasl_plain_password else []
        return mechanism, redact_text(str(exc), secrets)
    return None


async def try_handshake(hosts: Sequence[str], options: KafkaOptions) -> AuthenticationError | bool:
    """Open one connection with the clients' security settings, trying
    *hosts* in turn (asyncio side): the error when a broker refuses our
    credentials or we refuse its certificate, True when one accepts us,
    False when none can be reached.

    This is how the transport learns *why* it cannot connect: aiokafka
    only logs a refused TLS handshake or SASL login (a failed bootstrap
    says "Unable to bootstrap", a lost broker is just "not ready"), and
    its log records are shared by every client of the process, so a
    handler on them could not tell whose login failed. One connection of
    our own, made only while no broker is ready, raises the real exception.
    """
    for host in hosts:
        name, _, port = host.rpartition(":")
        try:
            conn = await asyncio.wait_for(
                create_conn(
                    name,
                    int(port),
                    request_timeout_ms=int(_DIAGNOSE_TIMEOUT * 1000),
                    security_protocol=options.security_protocol,
                    ssl_context=options.ssl_context or ssl.create_default_context(),
                    sasl_mechanism=options.sasl_mechanism,
                    sasl_plain_username=options.sasl_plain_username,
                    sasl_plain_password=options.sasl_plain_password,
                ),
                _DIAGNOSE_TIMEOUT,
            )
        except Exception as exc:  # whatever it is: refusal() sorts it out
            found = refusal(exc, options)
            if found is not None:
                return AuthenticationError(_where(hosts), *found)
            continue
        conn.close()
        return True
    return False


async def handshake_refusal(
    hosts: Sequence[str], options: KafkaOptions
) -> AuthenticationError | None:
    """The refusal :func:`try_handshake` finds, if any (asyncio side)."""
    outcome = await try_handshake(hosts, options)
    return outcome if isinstance(outcome, AuthenticationError) else None


async def connect_error(
    exc: Exception,
    hosts: Sequence[str],
    options: KafkaOptions,
    diagnose: Callable[[], Awaitable[AuthenticationError | None]],
) -> TransportError | None:
    """trio_bus's error for a failed start of the clients (None: not ours).

    A refused login or certificate is an
    :class:`~trio_bus.errors.AuthenticationError` naming the broker and the
    mechanism, never a secret; when aiokafka hides it behind a failed
    bootstrap, *diagnose* (:func:`handshake_refusal`) finds it.
    """
    found = refusal(exc, options)
    if found is not None:
        return AuthenticationError(_where(hosts), *found)
    if options.security_protocol != "PLAINTEXT" and isinstance(
        exc, kafka_errors.KafkaConnectionError
    ):
        refused = await diagnose()
        if refused is not None:
            return refused
    if isinstance(exc, kafka_errors.KafkaError):
        return transport_error(exc, f"cannot connect to kafka at {_where(hosts)}")
    return None
