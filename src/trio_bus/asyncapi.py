"""AsyncAPI 3.0 documents of a bus, and the ``trio-bus asyncapi`` command.

:meth:`Bus.asyncapi` describes what the bus does *now*: one channel per
topic, a receive operation per live subscription, a send operation per
dead-letter topic and per publication declared with
:meth:`Bus.declare_publication`. Messages are the JSON envelope; a
:class:`~trio_bus.Router`'s payload types (and declared ones) appear under
``components.schemas`` as ``msgspec.json.schema`` (pydantic:
``model_json_schema``) gives them. Nothing in the document comes from the
URL or transport options, so it carries no credentials.

The command loads ``MODULE:ATTR``: an ``async def setup(bus)`` that
subscribes and declares (run on a throwaway in-memory bus), or a ready
document (a dict)::

    trio-bus asyncapi myservice.app:setup --format json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import msgspec
import trio

from ._envelope import ENVELOPE_HEADERS
from ._router import Router, _is_pydantic
from .errors import ConfigError

if TYPE_CHECKING:
    from ._work import Route

__all__ = ["Publication", "build_document", "main"]

ASYNCAPI_VERSION = "3.0.0"
_SCHEMAS = "#/components/schemas/"
_ID_UNSAFE = re.compile(r"[^\w.\-]")


def _check_event_type(_: object, __: object, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("event_type must be a non-blank str")


def _check_version(_: object, __: object, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"event_version must be a positive int or None, not {value!r}")


@attrs.frozen(kw_only=True)
class Publication:
    """An envelope type this service publishes on a topic
    (:meth:`Bus.declare_publication`)."""

    topic: str
    event_type: str = attrs.field(validator=_check_event_type)
    payload: type[Any] | None = None
    event_version: int | None = attrs.field(default=None, validator=_check_version)
    description: str | None = None


def _safe(text: str) -> str:
    """A component key: AsyncAPI allows ``[\\w.-]`` only."""
    return _ID_UNSAFE.sub("_", text)


def _envelope_schema(event_type: str | None, payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON envelope (``_envelope._Wire``) around *payload*."""
    return {
        "type": "object",
        "required": ["event_id", "aggregate_id", "event_type", "event_version", "timestamp"],
        "properties": {
            "event_id": {"type": "string", "description": "Unique event id (UUIDv7)."},
            "aggregate_id": {
                "type": "string",
                "pattern": "^[A-Za-z0-9:_\\-./]{1,256}$",
                "description": "The entity the event belongs to; orders handling.",
            },
            "event_type": {"type": "string", **({"const": event_type} if event_type else {})},
            "event_version": {"type": "integer", "minimum": 1},
            "timestamp": {"type": "string", "format": "date-time"},
            "trace_id": {"type": "string"},
            "correlation_id": {"type": "string"},
            "tenant_id": {"type": "string"},
            "payload": payload,
        },
    }


_ENVELOPE_HEADERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {name: {"type": "string"} for name in ENVELOPE_HEADERS.values()},
}
_DEAD_LETTER_HEADERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["X-DLQ-Error-Type", "X-DLQ-Attempts", "X-DLQ-Original-Topic"],
    "properties": {
        name: {"type": "string"}
        for name in (
            "X-DLQ-Error-Type",
            "X-DLQ-Error-Message",
            "X-DLQ-Cause-Type",
            "X-DLQ-Cause-Message",
            "X-DLQ-Attempts",
            "X-DLQ-Original-Topic",
            "X-DLQ-Original-Offset",
            "X-DLQ-Original-Partition",
            "X-DLQ-Original-Subject",
            "X-DLQ-Original-Aggregate-ID",
        )
    },
}


class _Builder:
    def __init__(self, payloads: Iterable[type[Any]]) -> None:
        self.channels: dict[str, dict[str, Any]] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, Any] = {}
        self._refs: dict[type[Any], dict[str, Any]] = {}
        # One msgspec call for every type, so same-named classes of
        # different modules get distinct component names.
        plain = [t for t in dict.fromkeys(payloads) if not _is_pydantic(t)]
        refs, components = msgspec.json.schema_components(plain, ref_template=_SCHEMAS + "{name}")
        self._refs.update(zip(plain, refs, strict=True))
        self.schemas.update(components)

    def payload_schema(self, payload: type[Any] | None) -> dict[str, Any]:
        if payload is None:
            return {}
        ref = self._refs.get(payload)
        if ref is None:  # a pydantic model
            schema = payload.model_json_schema(ref_template=_SCHEMAS + "{model}")
            self.schemas.update(schema.pop("$defs", {}))
            name = _safe(schema.get("title", payload.__name__))
            self.schemas[name] = schema
            ref = self._refs[payload] = {"$ref": _SCHEMAS + name}
        return ref

    def message(
        self,
        name: str,
        *,
        payload: dict[str, Any],
        headers: dict[str, Any],
        content_type: str = "application/json",
        summary: str | None = None,
    ) -> str:
        key = _safe(name)
        message: dict[str, Any] = {
            "name": name,
            "contentType": content_type,
            "headers": headers,
            "payload": payload,
        }
        if summary:
            message["summary"] = summary
        # Two channels may carry different messages of one name.
        base, n = key, 2
        while self.messages.setdefault(key, message) != message:
            key, n = f"{base}-{n}", n + 1
        return key

    def envelope_message(
        self, event_type: str | None, version: int | None, payload: type[Any] | None
    ) -> str:
        name = event_type or "Envelope"
        if version is not None:
            name += f".v{version}"
        schema = _envelope_schema(event_type, self.payload_schema(payload))
        if version is not None:
            schema["properties"]["event_version"] = {"type": "integer", "const": version}
        return self.message(name, payload=schema, headers=_ENVELOPE_HEADERS_SCHEMA)

    def operation(
        self, action: str, topic: str, messages: Iterable[str], op_id: str, **extra: Any
    ) -> None:
        channel = self.channels.setdefault(_safe(topic), {"address": topic, "messages": {}})
        refs = []
        for key in messages:
            channel["messages"][key] = {"$ref": f"#/components/messages/{key}"}
            refs.append({"$ref": f"#/channels/{_safe(topic)}/messages/{key}"})
        base, n = _safe(op_id), 2
        op_id = base
        while op_id in self.operations:
            op_id, n = f"{base}-{n}", n + 1
        self.operations[op_id] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{_safe(topic)}"},
            "messages": refs,
            **extra,
        }

    def subscription(self, route: Route) -> None:
        source = route.source
        if isinstance(source, Router):
            keys = [
                self.envelope_message(r.event_type, r.event_version, r.payload)
                for r in source.routes
            ]
        elif route.wants_envelope:
            keys = [self.envelope_message(None, None, None)]
        else:
            keys = [
                self.message(
                    "Message",
                    payload={"type": "string", "format": "binary"},
                    headers={"type": "object", "additionalProperties": {"type": "string"}},
                    content_type="application/octet-stream",
                    summary="Any body; ordered by key / X-Aggregate-ID header.",
                )
            ]
        extra: dict[str, Any] = {"x-trio-bus-group": route.group}
        if route.batch is not None:
            extra["x-trio-bus-batch"] = {
                "max_batch": route.batch.max_batch,
                "max_wait": route.batch.max_wait,
            }
        op_id = f"receive-{route.topic}-{route.group}"
        self.operation("receive", route.topic, keys, op_id, **extra)
        dead = self.message(
            "DeadLetter",
            payload={"type": "string", "format": "binary"},
            headers=_DEAD_LETTER_HEADERS_SCHEMA,
            content_type="application/octet-stream",
            summary="The original body and headers, with the X-DLQ-* headers.",
        )
        self.operation("send", route.dead_letter_topic, [dead], f"dead-letter-{route.topic}")


def build_document(
    *,
    title: str,
    version: str,
    routes: Iterable[Route],
    publications: Iterable[Publication],
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document for *routes* (receive) and *publications*
    (send). :meth:`Bus.asyncapi` calls it with the bus's own."""
    routes = sorted(routes, key=lambda r: (r.topic, r.group))
    publications = list(publications)
    payloads = [p.payload for p in publications if p.payload is not None]
    for route in routes:
        if isinstance(route.source, Router):
            payloads.extend(r.payload for r in route.source.routes)
    builder = _Builder(payloads)
    for route in routes:
        builder.subscription(route)
    for pub in publications:
        key = builder.envelope_message(pub.event_type, pub.event_version, pub.payload)
        extra = {"summary": pub.description} if pub.description else {}
        builder.operation("send", pub.topic, [key], f"send-{pub.topic}-{pub.event_type}", **extra)
    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {"title": title, "version": version},
        "defaultContentType": "application/json",
        "channels": builder.channels,
        "operations": builder.operations,
        "components": {"messages": builder.messages, "schemas": builder.schemas},
    }
    return document


# ---------------------------------------------------------------- command


def _load(target: str) -> object:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"expected MODULE:ATTR, got {target!r}")
    # Like uvicorn: the application's modules are found from the current
    # directory, which a console script does not put on sys.path.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"cannot load {target}: {exc}") from None
    return obj


async def _document_of(setup: Callable[[Any], Awaitable[object]], title: str | None) -> Any:
    # setup takes the Bus; typed Any so this module need not import _bus
    # (which imports it: no import circle).
    from ._open import open_bus

    async with open_bus(f"memory://asyncapi-{uuid.uuid4().hex}", monitoring=None) as bus:
        await setup(bus)
        return bus.asyncapi(title=title)


def render(document: Mapping[str, Any], fmt: str) -> str:
    """*document* as ``"json"`` or ``"yaml"`` text (YAML needs PyYAML)."""
    if fmt == "json":
        return json.dumps(document, indent=2)
    try:
        yaml = importlib.import_module("yaml")  # optional, untyped
    except ImportError:
        raise SystemExit(
            "YAML output needs PyYAML (pip install pyyaml); or use --format json"
        ) from None
    text: str = yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """``trio-bus asyncapi MODULE:ATTR [--format yaml|json] [--title T]``."""
    parser = argparse.ArgumentParser(
        prog="trio-bus asyncapi", description="print the AsyncAPI 3.0 document of a service"
    )
    parser.add_argument(
        "target",
        help="MODULE:ATTR: an async function taking a Bus (it subscribes and declares), "
        "or a document dict",
    )
    parser.add_argument("--format", choices=("yaml", "json"), default="yaml")
    parser.add_argument("--title", help="info.title (default: the bus's client_id)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    obj = _load(args.target)
    if isinstance(obj, Mapping):
        document: Mapping[str, Any] = obj
    elif callable(obj):
        document = trio.run(_document_of, obj, args.title)
    else:
        raise SystemExit(f"{args.target} is neither a setup function nor a document")
    print(render(document, args.format))
    return 0
