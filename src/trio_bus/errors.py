"""The exceptions trio_bus raises.

One root, :class:`BusError`, then families: bad input raised at the call
(:class:`InvalidInputError`, which is also a :class:`ValueError`), resource
state (:class:`BusClosedError`), the outside world failing
(:class:`TransportError` and its leaves, :class:`AuthenticationError` among
them) and the bus's own supervision
(:class:`ActorCrashedError`). Errors of the underlying clients (aiokafka,
nats-py) are mapped at the transport boundary and chained as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "ActorCrashedError",
    "AuthenticationError",
    "BusClosedError",
    "BusError",
    "ConfigError",
    "EnvelopeError",
    "HeaderLimitError",
    "HandlerTimeout",
    "InvalidAggregateIDError",
    "InvalidInputError",
    "InvalidTopicError",
    "MissingExtraError",
    "NonRetryableError",
    "PayloadDecodeError",
    "PayloadTooLargeError",
    "PublishError",
    "PublishOutcomeUnknownError",
    "TopicConfigError",
    "TransportError",
    "TransportUnavailableError",
    "UnknownEventTypeError",
    "UnsupportedURLError",
]


class BusError(Exception):
    """Root of every error trio_bus raises on purpose."""


class InvalidInputError(BusError, ValueError):
    """An argument was rejected before anything was sent."""


class ConfigError(InvalidInputError):
    """A configuration value is invalid or inconsistent."""


class UnsupportedURLError(ConfigError):
    """The bus URL is malformed or names a scheme no transport handles."""


class InvalidTopicError(InvalidInputError):
    """A topic name is outside the subset portable to Kafka and NATS.

    Valid: 1-249 characters of ``[A-Za-z0-9._-]`` with no empty dot-separated
    token.
    """


class InvalidAggregateIDError(InvalidInputError):
    """An aggregate ID is empty, too long or has characters outside
    ``[A-Za-z0-9:_\\-./]``."""


class HeaderLimitError(InvalidInputError):
    """A message from the wire carries more headers, or more header bytes,
    than the bus accepts (``trio_bus._names.MAX_WIRE_HEADERS``,
    ``MAX_WIRE_HEADER_BYTES``): it is dead-lettered with this reason,
    without its original headers."""


class EnvelopeError(InvalidInputError):
    """An envelope failed to decode or validate."""


class PayloadTooLargeError(InvalidInputError):
    """A message is larger than the bus's ``max_message_bytes``."""


class BusClosedError(BusError):
    """The bus (or subscription) was closed by its owner and cannot be used."""


class HandlerTimeout(BusError, TimeoutError):  # noqa: N818 - reads as an event, like trio.TooSlowError
    """A handler call did not finish within its timeout.

    Counted as a failure like any other: retried, then dead-lettered.
    """


class NonRetryableError(BusError):
    """A handler failure that retrying cannot fix.

    Raise it (or raise any exception *from* it, or while handling it: the
    ``__cause__``/``__context__`` chain is searched) in a handler and the
    message goes to the dead-letter topic at once, without further attempts,
    with the error and its cause in the ``X-DLQ-*`` headers::

        async def handle(message: Message) -> None:
            try:
                order = parse(message.value)
            except ValueError as exc:
                raise NonRetryableError("not an order") from exc
    """


class PayloadDecodeError(NonRetryableError):
    """A typed handler's payload did not decode into its type (the decoder's
    error is the ``__cause__``)."""


class UnknownEventTypeError(NonRetryableError):
    """A :class:`~trio_bus.Router` has no handler for an envelope's
    ``event_type`` (and ``event_version``)."""


class ActorCrashedError(BusError):
    """An actor's own loop failed more often than ``max_restarts`` allows.

    The original exception is the ``__cause__``. Handler exceptions never
    cause this; only a bug in the bus or in a hook does.
    """


class TransportError(BusError):
    """The broker or the network failed; details in ``__cause__``."""


class TransportUnavailableError(TransportError):
    """The transport could not connect, or lost its connection for longer
    than it may wait."""


class AuthenticationError(TransportUnavailableError):
    """The connection's security handshake failed: the broker refused the
    client's credentials (user and password, token, SASL, client
    certificate), or the client refused the broker's TLS certificate.

    Retrying with the same settings cannot succeed, so it is raised at once
    instead of after reconnect attempts. As Kafka's Java client treats a
    failed TLS handshake as an ``SslAuthenticationException``, both
    directions are one error; ``mechanism`` tells them apart. The message
    names the broker (its URL with any userinfo redacted) and the
    mechanism, never a secret; the client library's error is the
    ``__cause__``::

        try:
            async with open_bus("nats://svc:wrong@127.0.0.1:4222") as bus: ...
        except AuthenticationError as exc:
            print(exc.broker, exc.mechanism)  # nats://svc:***@127.0.0.1:4222 user/password

    Args:
        broker: The broker (URL or ``host:port``), already redacted.
        mechanism: What failed: ``"user/password"``, ``"token"``,
            ``"SCRAM-SHA-512"``, ``"TLS"``, ``"TLS client certificate"``...
        detail: The broker's or the TLS library's reason, e.g.
            ``"Authorization Violation"`` (must not hold a secret).
    """

    def __init__(self, broker: str, mechanism: str, detail: str = "") -> None:
        super().__init__(broker, mechanism, detail)
        self.broker = broker
        self.mechanism = mechanism
        self.detail = detail

    def __str__(self) -> str:
        reason = f": {self.detail}" if self.detail else ""
        return f"authentication with {self.broker} failed ({self.mechanism}){reason}"


class PublishError(TransportError):
    """The broker refused the message: it was not stored."""


class PublishOutcomeUnknownError(PublishError):
    """No answer came from the broker in time: the message may or may not
    have been stored. Publishing it again may duplicate it (NATS deduplicates
    by message id within its duplicate window)."""


class TopicConfigError(TransportError):
    """A topic or stream on the broker does not match its configuration and
    the mismatch action is ``"fail"``, or creating it failed."""


class MissingExtraError(BusError, ImportError):
    """An optional client library is not installed; the message names the
    ``pip install`` command that adds it."""
