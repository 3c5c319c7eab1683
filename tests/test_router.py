"""Typed routing (trio_bus.Router) on the memory transport; the semantic
suite runs the routed path on every transport."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio

import trio_bus
from trio_bus.errors import ConfigError, PayloadDecodeError, UnknownEventTypeError

from ._events import OrderPaid, OrderShipped
from .helpers import Recorder, collect


class OrderPlaced(msgspec.Struct):
    order_id: str
    total: int


def envelope(event_type: str, payload: object, *, version: int = 1, agg: str = "o-1") -> Any:
    return trio_bus.Envelope.new(
        aggregate_id=agg, event_type=event_type, payload=payload, event_version=version
    )


async def test_routes_by_type_and_decodes_msgspec_dataclass_attrs() -> None:
    router = trio_bus.Router()
    seen: list[object] = []

    @router.on("OrderPlaced")
    async def placed(event: OrderPlaced, env: trio_bus.Envelope) -> None:
        seen.append(event)

    @router.on("OrderPaid")
    async def paid(event: OrderPaid, env: trio_bus.Envelope) -> None:
        seen.append(event)

    @router.on("OrderShipped")
    async def shipped(event: OrderShipped, env: trio_bus.Envelope) -> None:
        assert env.event_type == "OrderShipped"
        seen.append(event)

    await router(envelope("OrderPlaced", {"order_id": "o-1", "total": 5}))
    await router(envelope("OrderPaid", {"order_id": "o-1", "amount": 5.0}))
    await router(envelope("OrderShipped", {"order_id": "o-1", "carrier": "ups"}))
    assert seen == [
        OrderPlaced("o-1", 5),
        OrderPaid("o-1", 5.0),
        OrderShipped("o-1", "ups"),
    ]
    assert [r.payload for r in router.routes] == [OrderPlaced, OrderPaid, OrderShipped]


async def test_pydantic_models_when_installed() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Refunded(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        order_id: str
        amount: int

    router = trio_bus.Router()
    seen: list[Any] = []

    async def refunded(event: Any, env: trio_bus.Envelope) -> None:
        seen.append(event)

    router.add("Refunded", refunded, payload=Refunded)
    await router(envelope("Refunded", {"order_id": "o-1", "amount": 3}))
    assert seen == [Refunded(order_id="o-1", amount=3)]
    with pytest.raises(PayloadDecodeError) as info:
        await router(envelope("Refunded", {"order_id": "o-1", "amount": "lots"}))
    assert isinstance(info.value.__cause__, ValueError)


async def test_version_matching_prefers_exact_version() -> None:
    router = trio_bus.Router()
    calls: list[str] = []

    @router.on("OrderPlaced", version=2)
    async def v2(event: OrderPlaced, env: trio_bus.Envelope) -> None:
        calls.append("v2")

    @router.on("OrderPlaced")
    async def any_version(event: OrderPlaced, env: trio_bus.Envelope) -> None:
        calls.append("any")

    payload = {"order_id": "o", "total": 1}
    await router(envelope("OrderPlaced", payload, version=2))
    await router(envelope("OrderPlaced", payload, version=1))
    await router(envelope("OrderPlaced", payload, version=3))
    assert calls == ["v2", "any", "any"]

    only_v1 = trio_bus.Router()
    only_v1.add("OrderPlaced", any_version, version=1)
    with pytest.raises(UnknownEventTypeError, match="version 2"):
        await only_v1(envelope("OrderPlaced", payload, version=2))


async def test_unknown_event_policy() -> None:
    with pytest.raises(UnknownEventTypeError, match="'Nope'"):
        await trio_bus.Router()(envelope("Nope", {}))
    await trio_bus.Router(on_unknown="skip")(envelope("Nope", {}))
    with pytest.raises(ConfigError):
        trio_bus.Router(on_unknown="ignore")  # type: ignore[arg-type]


async def test_decode_errors_are_non_retryable_with_the_reason() -> None:
    router = trio_bus.Router()

    @router.on("OrderPlaced")
    async def placed(event: OrderPlaced, env: trio_bus.Envelope) -> None:
        raise AssertionError("not reached")

    with pytest.raises(PayloadDecodeError, match=r"Expected `int`, got `str` - at `\$.total`"):
        await router(envelope("OrderPlaced", {"order_id": "o", "total": "five"}))
    assert issubclass(PayloadDecodeError, trio_bus.errors.NonRetryableError)


def test_registration_errors() -> None:
    router = trio_bus.Router()

    async def untyped(event, env):  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(ConfigError, match="payload="):
        router.add("A", untyped)
    router.add("A", untyped, payload=OrderPlaced)
    with pytest.raises(ConfigError, match="already has a handler"):
        router.add("A", untyped, payload=OrderPlaced)
    with pytest.raises(ConfigError):
        router.add("", untyped, payload=OrderPlaced)
    with pytest.raises(ConfigError):
        router.add("B", untyped, payload=OrderPlaced, version=0)
    with pytest.raises(ConfigError, match="msgspec cannot decode"):
        router.add("C", untyped, payload=trio.Event)


async def test_router_on_a_bus_keeps_order_across_types(memory_bus_url: str) -> None:
    router = trio_bus.Router()
    seen: Recorder[tuple[str, str]] = Recorder()
    dlq: Recorder[trio_bus.Message] = Recorder()

    @router.on("OrderPlaced")
    async def placed(event: OrderPlaced, env: trio_bus.Envelope) -> None:
        await trio.sleep(0.01)  # slower than the next type: order must still hold
        seen.add((env.aggregate_id, "placed"))

    @router.on("OrderPaid")
    async def paid(event: OrderPaid, env: trio_bus.Envelope) -> None:
        seen.add((env.aggregate_id, "paid"))

    async with trio_bus.open_bus(memory_bus_url, pool_size=4) as bus:
        await bus.subscribe_envelope("orders", router)
        await bus.subscribe("orders.dlq", collect(dlq))
        for i in range(10):
            agg = f"o-{i}"
            await bus.publish_envelope(
                "orders", envelope("OrderPlaced", {"order_id": agg, "total": i}, agg=agg)
            )
            await bus.publish_envelope(
                "orders", envelope("OrderPaid", {"order_id": agg, "amount": i}, agg=agg)
            )
        await bus.publish_envelope("orders", envelope("OrderPlaced", {"total": "x"}, agg="bad"))
        await seen.wait_for_count(20)
        await dlq.wait_for_count(1)
    for i in range(10):
        mine = [kind for agg, kind in seen.items if agg == f"o-{i}"]
        assert mine == ["placed", "paid"]
    (dead,) = dlq.items
    assert dead.headers["X-DLQ-Error-Type"] == "PayloadDecodeError"
    assert dead.headers["X-DLQ-Cause-Type"] == "ValidationError"
    assert dead.headers["X-DLQ-Attempts"] == "1"


async def test_skip_policy_acks_unknown_types_on_a_bus(memory_bus_url: str) -> None:
    router = trio_bus.Router(on_unknown="skip")
    seen: Recorder[str] = Recorder()

    @router.on("OrderPlaced")
    async def placed(event: OrderPlaced, env: trio_bus.Envelope) -> None:
        seen.add(event.order_id)

    async with trio_bus.open_bus(memory_bus_url, client_id="svc") as bus:
        sub = await bus.subscribe_envelope("orders", router)
        await bus.publish_envelope("orders", envelope("Audited", {"by": "x"}))
        await bus.publish_envelope("orders", envelope("OrderPlaced", {"order_id": "o", "total": 1}))
        await seen.wait_for_count(1)
        await sub.close()
        stats = bus.statistics()
    assert (stats.handled, stats.failed, stats.dead_lettered) == (2, 0, 0)
    # Both were acked: the group gets nothing again.
    async with trio_bus.open_bus(memory_bus_url, client_id="svc") as bus:
        again: Recorder[trio_bus.Message] = Recorder()
        await bus.subscribe("orders", collect(again))
        await bus.publish("orders", b"marker", key="m")
        await again.wait_for_count(1)
    assert [m.value for m in again.items] == [b"marker"]
