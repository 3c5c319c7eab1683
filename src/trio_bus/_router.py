"""Typed routing: one envelope subscription, a typed handler per event type.

A :class:`Router` is an envelope handler, so per-aggregate order holds
across all its event types: they share one subscription and the actors.
"""

from __future__ import annotations

import inspect
import logging
import sys
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import attrs
import msgspec

from ._envelope import Envelope
from .errors import ConfigError, PayloadDecodeError, UnknownEventTypeError

__all__ = ["EventRoute", "Router", "TypedHandler", "UnknownPolicy"]

logger = logging.getLogger("trio_bus.router")

T = TypeVar("T")
TypedHandler = Callable[[Any, Envelope], Awaitable[None]]
H = TypeVar("H", bound=TypedHandler)
#: What a router does with an envelope it has no handler for.
UnknownPolicy = Literal["dead_letter", "skip"]


def _is_pydantic(payload: object) -> bool:
    # pydantic is optional: a model class can only exist if it is imported.
    pydantic = sys.modules.get("pydantic")
    return (
        pydantic is not None
        and isinstance(payload, type)
        and issubclass(payload, pydantic.BaseModel)
    )


def _decoder(payload: type[Any]) -> Callable[[bytes], Any]:
    if _is_pydantic(payload):
        return payload.model_validate_json  # type: ignore[no-any-return]
    try:
        return msgspec.json.Decoder(payload).decode
    except (TypeError, NameError) as exc:  # NameError: unresolvable annotations
        raise ConfigError(f"msgspec cannot decode into {payload!r}: {exc}") from None


@attrs.frozen(kw_only=True)
class EventRoute:
    """One typed handler of a :class:`Router`.

    Attributes:
        event_type: The envelope ``event_type`` it handles.
        event_version: The ``event_version`` it handles; None: any.
        payload: The payload type (msgspec Struct, dataclass, attrs class,
            pydantic model, or any type msgspec decodes).
        handler: ``async def handler(event, envelope) -> None``.
    """

    event_type: str
    event_version: int | None
    payload: type[Any]
    handler: TypedHandler
    _decode: Callable[[bytes], Any] = attrs.field(alias="decode", repr=False)


class Router:
    """Calls a typed handler per envelope ``event_type`` (and version).

    Subscribe it like any envelope handler::

        router = trio_bus.Router()

        @router.on("OrderPlaced")
        async def placed(event: OrderPlaced, envelope: trio_bus.Envelope) -> None: ...

        await bus.subscribe_envelope("orders", router)

    The payload type comes from the handler's first parameter annotation
    (or ``payload=``). A payload that does not decode raises
    :class:`~trio_bus.errors.PayloadDecodeError`, which is non-retryable:
    the message is dead-lettered at once with the reason.

    Args:
        on_unknown: An envelope no handler matches: ``"dead_letter"`` (the
            default) raises :class:`~trio_bus.errors.UnknownEventTypeError`,
            so it is dead-lettered at once; ``"skip"`` acks it unhandled.
    """

    def __init__(self, *, on_unknown: UnknownPolicy = "dead_letter") -> None:
        if on_unknown not in ("dead_letter", "skip"):
            raise ConfigError(f"on_unknown must be 'dead_letter' or 'skip', not {on_unknown!r}")
        self.on_unknown: UnknownPolicy = on_unknown
        #: (event_type, event_version or None) -> route.
        self._routes: dict[tuple[str, int | None], EventRoute] = {}

    @property
    def routes(self) -> tuple[EventRoute, ...]:
        """Every registered route, in registration order."""
        return tuple(self._routes.values())

    def on(
        self,
        event_type: str,
        *,
        version: int | None = None,
        payload: type[Any] | None = None,
    ) -> Callable[[H], H]:
        """Decorator form of :meth:`add`; returns the handler unchanged."""

        def register(handler: H) -> H:
            self.add(event_type, handler, version=version, payload=payload)
            return handler

        return register

    def add(
        self,
        event_type: str,
        handler: TypedHandler,
        *,
        version: int | None = None,
        payload: type[Any] | None = None,
    ) -> None:
        """Route envelopes of *event_type* (of *version* only, when given;
        an exact version wins over a handler for any version) to *handler*.

        Raises:
            ConfigError: no payload type, a type msgspec cannot decode, or a
                handler already registered for this type and version.
        """
        if not isinstance(event_type, str) or not event_type.strip():
            raise ConfigError("event_type must be a non-blank str")
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version <= 0
        ):
            raise ConfigError(f"version must be a positive int or None, not {version!r}")
        if not callable(handler):
            raise ConfigError("handler must be an async callable")
        if payload is None:
            payload = _payload_type(handler)
        key = (event_type, version)
        if key in self._routes:
            which = "any version" if version is None else f"version {version}"
            raise ConfigError(f"{event_type!r} ({which}) already has a handler")
        self._routes[key] = EventRoute(
            event_type=event_type,
            event_version=version,
            payload=payload,
            handler=handler,
            decode=_decoder(payload),
        )

    def match(self, envelope: Envelope) -> EventRoute | None:
        """The route for *envelope*, or None."""
        routes = self._routes
        return routes.get((envelope.event_type, envelope.event_version)) or routes.get(
            (envelope.event_type, None)
        )

    async def __call__(self, envelope: Envelope) -> None:
        """Decode the payload and call the matching handler."""
        route = self.match(envelope)
        if route is None:
            if self.on_unknown == "skip":
                logger.debug("skipped %s v%d", envelope.event_type, envelope.event_version)
                return
            raise UnknownEventTypeError(
                f"no handler for event_type {envelope.event_type!r} "
                f"version {envelope.event_version}"
            )
        try:
            event = route._decode(envelope.payload)
        except (msgspec.DecodeError, ValueError) as exc:  # pydantic's error is a ValueError
            raise PayloadDecodeError(
                f"payload of {envelope.event_type!r} does not decode as "
                f"{route.payload.__name__}: {exc}"
            ) from exc
        await route.handler(event, envelope)


def _payload_type(handler: Callable[..., object]) -> type[Any]:
    try:
        first = next(iter(inspect.signature(handler).parameters))
        hints = typing.get_type_hints(handler)
    except (StopIteration, NameError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the payload type of {handler!r} ({exc!r}); pass payload="
        ) from None
    if first not in hints:
        raise ConfigError(f"annotate the first parameter of {handler!r} or pass payload=")
    hint: type[Any] = hints[first]
    return hint
