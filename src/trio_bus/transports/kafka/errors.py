"""aiokafka's errors mapped to trio_bus's, at the boundary, chained."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiokafka.errors as kafka_errors

from ..._secrets import redact_url
from ...errors import (
    AuthenticationError,
    PublishError,
    PublishOutcomeUnknownError,
    TransportError,
    TransportUnavailableError,
)

__all__ = [
    "connect_error",
    "is_retriable",
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


async def tls_refusal(hosts: Sequence[str], context: ssl.SSLContext) -> ssl.SSLError | None:
    """The TLS error of one handshake with the first bootstrap host, if any
    (asyncio side): aiokafka only logs it and reports "Unable to bootstrap"."""
    host, _, port = hosts[0].rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=context), 5.0
        )
    except ssl.SSLError as exc:
        return exc
    except (OSError, TimeoutError, ValueError):
        return None
    writer.close()
    return None


async def connect_error(
    exc: Exception,
    hosts: Sequence[str],
    *,
    security_protocol: str,
    sasl_mechanism: str,
    ssl_context: ssl.SSLContext | None,
    diagnose_tls: Callable[[Sequence[str], ssl.SSLContext], Awaitable[ssl.SSLError | None]],
) -> TransportError | None:
    """trio_bus's error for a failed start of the clients (None: not ours).

    A refused login or certificate is an
    :class:`~trio_bus.errors.AuthenticationError` naming the broker and the
    mechanism, never a secret.
    """
    where = redact_url(",".join(hosts))
    if security_protocol.startswith("SASL"):
        # aiokafka 0.14's SCRAM client raises KeyError('v') when the broker
        # answers its final message with an error ('e=...').
        scram_refused = isinstance(exc, KeyError) and sasl_mechanism.startswith("SCRAM")
        if scram_refused or isinstance(exc, _SASL_REFUSED):
            detail = "credentials refused" if scram_refused else str(exc)
            return AuthenticationError(where, sasl_mechanism, detail)
    if security_protocol.endswith("SSL") and isinstance(exc, kafka_errors.KafkaConnectionError):
        refusal = await diagnose_tls(hosts, ssl_context or ssl.create_default_context())
        if refusal is not None:
            reason = getattr(refusal, "verify_message", None) or refusal.reason or str(refusal)
            return AuthenticationError(where, "TLS", reason)
    if isinstance(exc, kafka_errors.KafkaError):
        return transport_error(exc, f"cannot connect to kafka at {where}")
    return None
