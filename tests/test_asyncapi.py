"""Bus.asyncapi() and ``trio-bus asyncapi``, validated against the official
AsyncAPI 3.0.0 JSON schema (tests/data/asyncapi/, from @asyncapi/specs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest

import trio_bus
from trio_bus import asyncapi

from ._events import OrderPaid, OrderShipped

# Not in the [test] extra yet (pyproject.toml is not this module's to change).
jsonschema = pytest.importorskip("jsonschema")
SCHEMA = json.loads((Path(__file__).parent / "data" / "asyncapi" / "3.0.0.json").read_text())


class OrderPlaced(msgspec.Struct):
    order_id: str
    total: int
    lines: list[Line]


class Line(msgspec.Struct):
    sku: str
    quantity: int


def validate(document: dict[str, Any]) -> None:
    """Fail on any schema violation and on any ``$ref`` that does not resolve."""
    errors = sorted(jsonschema.Draft7Validator(SCHEMA).iter_errors(document), key=str)
    assert errors == [], "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])

    def resolve(ref: str) -> object:
        assert ref.startswith("#/"), ref
        node: Any = document
        for part in ref[2:].split("/"):
            node = node[part]
        return node

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)


def orders_router() -> trio_bus.Router:
    router = trio_bus.Router()

    @router.on("OrderPlaced")
    async def placed(event: OrderPlaced, envelope: trio_bus.Envelope) -> None:
        pass

    @router.on("OrderPaid", version=2)
    async def paid(event: OrderPaid, envelope: trio_bus.Envelope) -> None:
        pass

    @router.on("OrderShipped")
    async def shipped(event: OrderShipped, envelope: trio_bus.Envelope) -> None:
        pass

    return router


async def setup(bus: trio_bus.Bus) -> None:
    """A service's wiring, as ``trio-bus asyncapi tests.test_asyncapi:setup`` loads it."""

    async def raw(message: trio_bus.Message) -> None:
        pass

    async def batch(messages: Sequence[trio_bus.Message]) -> None:
        pass

    await bus.subscribe_envelope("orders", orders_router(), group="billing")
    await bus.subscribe_batch("audit", batch, max_batch=50, max_wait=0.2)
    await bus.subscribe("raw.bytes", raw)
    bus.declare_publication(
        "invoices", event_type="InvoiceIssued", payload=OrderPaid, description="One per order."
    )
    bus.declare_publication("invoices", event_type="InvoiceVoided")


async def test_document_describes_subscriptions_and_publications(memory_bus_url: str) -> None:
    async with trio_bus.open_bus(memory_bus_url, client_id="orders-service") as bus:
        await setup(bus)
        document = bus.asyncapi(version="1.2.3")
    validate(document)
    assert document["asyncapi"] == "3.0.0"
    assert document["info"] == {"title": "orders-service", "version": "1.2.3"}
    channels = document["channels"]
    assert {c["address"] for c in channels.values()} == {
        "orders",
        "orders.dlq",
        "audit",
        "audit.dlq",
        "raw.bytes",
        "raw.bytes.dlq",
        "invoices",
    }
    assert set(channels["orders"]["messages"]) == {"OrderPlaced", "OrderPaid.v2", "OrderShipped"}
    operations = document["operations"]
    receive = operations["receive-orders-billing"]
    assert receive["action"] == "receive"
    assert receive["channel"] == {"$ref": "#/channels/orders"}
    assert operations["receive-audit-orders-service"]["x-trio-bus-batch"] == {
        "max_batch": 50,
        "max_wait": 0.2,
    }
    assert operations["dead-letter-orders"]["action"] == "send"
    sends = [op for op in operations.values() if op["channel"] == {"$ref": "#/channels/invoices"}]
    assert [op["action"] for op in sends] == ["send", "send"]

    messages = document["components"]["messages"]
    placed = messages["OrderPlaced"]["payload"]
    assert placed["properties"]["event_type"]["const"] == "OrderPlaced"
    assert placed["properties"]["payload"] == {"$ref": "#/components/schemas/OrderPlaced"}
    assert messages["OrderPaid.v2"]["payload"]["properties"]["event_version"]["const"] == 2
    schemas = document["components"]["schemas"]
    assert schemas["OrderPlaced"]["required"] == ["order_id", "total", "lines"]
    assert schemas["Line"]["properties"]["quantity"] == {"type": "integer"}
    assert schemas["OrderPaid"]["properties"]["amount"] == {"type": "number"}
    assert schemas["OrderShipped"]["properties"]["carrier"] == {"type": "string"}
    assert messages["InvoiceVoided"]["payload"]["properties"]["payload"] == {}
    assert "X-DLQ-Attempts" in messages["DeadLetter"]["headers"]["properties"]


async def test_pydantic_payloads_get_their_schema(memory_bus_url: str) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Refund(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        order_id: str
        amount: int

    class Refunded(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        refunds: list[Refund]

    async with trio_bus.open_bus(memory_bus_url) as bus:
        bus.declare_publication("refunds", event_type="Refunded", payload=Refunded)
        document = bus.asyncapi()
    validate(document)
    schemas = document["components"]["schemas"]
    assert schemas["Refunded"]["properties"]["refunds"]["items"] == {
        "$ref": "#/components/schemas/Refund"
    }
    assert schemas["Refund"]["required"] == ["order_id", "amount"]


async def test_document_holds_no_credentials() -> None:
    async with trio_bus.open_bus("memory://admin:hunter2@creds-test") as bus:
        await setup(bus)
        text = json.dumps(bus.asyncapi())
    assert "hunter2" not in text
    assert "admin" not in text


async def test_the_document_follows_live_subscriptions(memory_bus_url: str) -> None:
    async with trio_bus.open_bus(memory_bus_url) as bus:
        sub = await bus.subscribe_envelope("orders", orders_router())
        assert "orders" in bus.asyncapi()["channels"]
        await sub.close()
        document = bus.asyncapi()
    validate(document)
    assert document["channels"] == {}


async def test_same_names_on_different_topics_stay_apart(memory_bus_url: str) -> None:
    class OrderPlaced(msgspec.Struct):  # same name, other shape
        legacy_id: int

    legacy = trio_bus.Router()
    legacy.add("OrderPlaced", orders_router().routes[0].handler, payload=OrderPlaced)
    async with trio_bus.open_bus(memory_bus_url) as bus:
        await bus.subscribe_envelope("orders", orders_router())
        await bus.subscribe_envelope("legacy", legacy)
        document = bus.asyncapi()
    validate(document)
    messages = document["components"]["messages"]
    schemas = document["components"]["schemas"]

    def payload_schema(channel: str) -> Any:
        (key,) = [k for k in document["channels"][channel]["messages"] if "OrderPlaced" in k]
        ref = messages[key]["payload"]["properties"]["payload"]["$ref"]
        return key, schemas[ref.rsplit("/", 1)[1]]

    legacy_key, legacy_schema = payload_schema("legacy")
    orders_key, orders_schema = payload_schema("orders")
    assert {legacy_key, orders_key} == {"OrderPlaced", "OrderPlaced-2"}
    assert list(legacy_schema["properties"]) == ["legacy_id"]
    assert "total" in orders_schema["properties"]


async def test_bad_declarations_fail_at_the_call(memory_bus_url: str) -> None:
    async with trio_bus.open_bus(memory_bus_url) as bus:
        with pytest.raises(trio_bus.errors.ConfigError):
            bus.declare_publication("t", event_type=" ")
        with pytest.raises(trio_bus.errors.ConfigError):
            bus.declare_publication("t", event_type="A", event_version=0)
        with pytest.raises(trio_bus.errors.InvalidTopicError):
            bus.declare_publication("bad topic", event_type="A")
        assert bus.asyncapi()["operations"] == {}


DOCUMENT = {"asyncapi": "3.0.0", "info": {"title": "static", "version": "1"}}


def test_command_prints_yaml_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert asyncapi.main(["tests.test_asyncapi:setup", "--format", "json", "--title", "svc"]) == 0
    from_json = json.loads(capsys.readouterr().out)
    validate(from_json)
    assert from_json["info"]["title"] == "svc"
    assert "receive-orders-billing" in from_json["operations"]

    yaml = pytest.importorskip("yaml")
    assert asyncapi.main(["tests.test_asyncapi:setup", "--title", "svc"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == from_json

    assert asyncapi.main(["tests.test_asyncapi:DOCUMENT", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == DOCUMENT
    with pytest.raises(SystemExit, match="MODULE:ATTR"):
        asyncapi.main(["no-colon"])
    with pytest.raises(SystemExit, match=r"cannot load tests\.test_asyncapi:nothing"):
        asyncapi.main(["tests.test_asyncapi:nothing"])
