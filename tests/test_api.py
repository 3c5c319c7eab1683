"""The public API: exports, typed errors at the call, open_bus unwrapping."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import trio

import trio_bus
from trio_bus import errors
from trio_bus._names import stable_hash, validate_topic
from trio_bus.transports import parse_url


def test_every_public_name_is_exported() -> None:
    for name in trio_bus.__all__:
        assert hasattr(trio_bus, name), name
    for name in errors.__all__:
        error = getattr(errors, name)
        assert issubclass(error, errors.BusError)


def test_stable_hash_is_process_independent() -> None:
    # crc32 of the UTF-8 bytes: the same in every process and version.
    assert stable_hash("order-42") == 0x57F706DE
    assert stable_hash("") == 0


@pytest.mark.parametrize("topic", ["", ".a", "a.", "a..b", "a b", "a/b", "a*", "x" * 250, "ä"])
def test_invalid_topics(topic: str) -> None:
    with pytest.raises(errors.InvalidTopicError):
        validate_topic(topic)


@pytest.mark.parametrize("topic", ["a", "orders.v1", "A-b_c.9", "x" * 249])
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


def test_parse_url() -> None:
    assert parse_url("kafka://h1:9092,h2:9093") == ("kafka", ("h1:9092", "h2:9093"))
    assert parse_url("memory://") == ("memory", ())
    assert parse_url("NATS://h:4222") == ("nats", ("h:4222",))
    with pytest.raises(errors.UnsupportedURLError, match="memory://, kafka://, nats://"):
        parse_url("redis://h:1")
    with pytest.raises(errors.UnsupportedURLError):
        parse_url("kafka://")
    with pytest.raises(errors.UnsupportedURLError):
        parse_url("nonsense")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"url": "amqp://h:1"}, errors.UnsupportedURLError),
        ({"pool_size": 0}, errors.ConfigError),
        ({"inbox_size": 1.5}, errors.ConfigError),
        ({"handler_timeout": -1}, errors.ConfigError),
        ({"shutdown_grace": float("nan")}, errors.ConfigError),
        ({"client_id": "bad id"}, errors.InvalidTopicError),
        ({"dead_letter": "no-placeholder"}, errors.ConfigError),
        ({"retry": 3}, errors.ConfigError),
    ],
)
async def test_setup_errors_leave_open_bus_unwrapped(
    kwargs: dict[str, Any], error: type[Exception], memory_bus_url: str
) -> None:
    kwargs.setdefault("url", memory_bus_url)
    url = kwargs.pop("url")
    with pytest.raises(error):
        async with trio_bus.open_bus(url, **kwargs):
            pass  # pragma: no cover


def test_retry_policy_validation() -> None:
    with pytest.raises(errors.ConfigError):
        trio_bus.RetryPolicy(max_attempts=0)
    with pytest.raises(errors.ConfigError):
        trio_bus.RetryPolicy(multiplier=0.5)
    policy = trio_bus.RetryPolicy(backoff=0.1, multiplier=3, max_backoff=0.5)
    assert [policy.delay(n) for n in (1, 2, 3)] == [0.1, pytest.approx(0.3), 0.5]


async def test_user_exception_passes_through_unchanged(memory_bus_url: str) -> None:
    class Mine(Exception):
        pass

    original = Mine("from the user's block")
    with pytest.raises(Mine) as info:
        async with trio_bus.open_bus(memory_bus_url) as bus:
            await bus.subscribe("t", _noop)
            raise original
    assert info.value is original
    assert not isinstance(info.value, BaseExceptionGroup)


async def _noop(message: trio_bus.Message) -> None:
    pass


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda bus: bus.publish("bad topic", b"x"), errors.InvalidTopicError),
        (lambda bus: bus.publish("t", "text"), errors.InvalidInputError),
        (lambda bus: bus.publish("t", b"x", key=""), errors.InvalidAggregateIDError),
        (lambda bus: bus.publish("t", b"x", key="a b"), errors.InvalidAggregateIDError),
        (lambda bus: bus.publish("t", b"x" * 2000), errors.PayloadTooLargeError),
        (lambda bus: bus.publish("t", b"x", headers={"a:b": "v"}), errors.InvalidInputError),
        (lambda bus: bus.publish("t", b"x", headers={"a": "v\n"}), errors.InvalidInputError),
        (lambda bus: bus.publish_envelope("t", b"{}"), errors.InvalidInputError),
        (lambda bus: bus.subscribe("t..x", _noop), errors.InvalidTopicError),
        (lambda bus: bus.subscribe("t", _noop, group="a b"), errors.InvalidTopicError),
        (lambda bus: bus.subscribe("t", _noop, start="middle"), errors.InvalidInputError),
        (lambda bus: bus.subscribe("t", _noop, handler_timeout=0), errors.ConfigError),
        (lambda bus: bus.subscribe("x" * 249, _noop), errors.InvalidTopicError),  # DLQ name
        (lambda bus: bus.subscribe("t", "not callable"), errors.InvalidInputError),
    ],
)
async def test_bad_arguments_raise_at_the_call_and_send_nothing(
    call: Any, error: type[Exception], memory_bus_url: str
) -> None:
    async with trio_bus.open_bus(memory_bus_url, max_message_bytes=1000) as bus:
        with pytest.raises(error):
            await call(bus)
        assert bus.statistics().published == 0
        assert bus.statistics().subscriptions == 0


async def test_closed_bus_and_subscription(memory_bus_url: str) -> None:
    async with trio_bus.open_bus(memory_bus_url) as bus:
        sub = await bus.subscribe("t", _noop)
        await sub.close()
        await sub.close()  # idempotent
        assert bus.statistics().subscriptions == 0
    with pytest.raises(errors.BusClosedError):
        await bus.publish("t", b"x")
    with pytest.raises(errors.BusClosedError):
        await bus.subscribe("t", _noop)


async def test_missing_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from trio_bus import transports

    monkeypatch.setitem(sys.modules, "trio_bus.transports.kafka", None)
    with pytest.raises(errors.MissingExtraError, match=r'pip install "trio-bus\[kafka\]"'):
        transports.resolve("kafka")
    with pytest.raises(ImportError):
        transports.resolve("kafka")


async def test_publish_many_validates_everything_first(memory_bus_url: str) -> None:
    async with trio_bus.open_bus(memory_bus_url) as bus:
        good = trio_bus.OutgoingMessage(topic="t", value=b"1")
        bad = trio_bus.OutgoingMessage(topic="t", value=b"2", key="bad key")
        with pytest.raises(errors.InvalidAggregateIDError):
            await bus.publish_many([good, bad])
        assert bus.statistics().published == 0
        env = trio_bus.Envelope.new(aggregate_id="a", event_type="T", payload=1)
        await bus.publish_many([good, ("t", env)])
        assert bus.statistics().published == 2


async def test_current_message_outside_handler() -> None:
    with pytest.raises(LookupError):
        trio_bus.current_message()
    await trio.lowlevel.checkpoint()


async def test_a_plain_function_handler_is_refused_at_subscribe(memory_bus_url: str) -> None:
    def not_async(message: trio_bus.Message) -> None:
        pass

    async with trio_bus.open_bus(memory_bus_url) as bus:
        with pytest.raises(TypeError, match="async def"):
            await bus.subscribe("t", not_async)  # type: ignore[arg-type]
        assert bus.statistics().subscriptions == 0


async def test_statistics_repr_is_readable(memory_bus_url: str) -> None:
    async with trio_bus.open_bus(memory_bus_url, pool_size=256) as bus:
        text = repr(bus.statistics())
    assert "inbox_depths" not in text
    assert "max_inbox_depth=0" in text
    assert len(text) < 400


async def test_probe_publishes_stay_out_of_the_result_stream(memory_bus_url: str) -> None:
    async with trio_bus.open_bus(memory_bus_url) as bus:
        results = bus.open_publish_results()
        for _ in range(3):
            await bus.probe()
        await bus.publish("t", b"x")
        with trio.fail_after(5):
            result = await results.receive()
        assert result.topic == "t"
        with pytest.raises(trio.WouldBlock):
            results.receive_nowait()


async def test_a_plain_function_batch_handler_is_refused(memory_bus_url: str) -> None:
    def not_async(messages: object) -> None:
        pass

    async with trio_bus.open_bus(memory_bus_url) as bus:
        with pytest.raises(TypeError, match="async def"):
            await bus.subscribe_batch("t", not_async)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidInputError):
            await bus.subscribe_batch("t", "nope")  # type: ignore[arg-type]


async def test_subscribe_many_returns_live_subscriptions_in_order(bus_url: str) -> None:
    """subscribe_many works on every transport: all live when it returns,
    one subscription per pair, in order, each getting its own topic."""
    tag = uuid.uuid4().hex[:8]
    topics = [f"many-{tag}-{i}" for i in range(3)]
    got: dict[str, list[bytes]] = {}
    done = trio.Event()

    async def handler(message: trio_bus.Message) -> None:
        got.setdefault(message.topic, []).append(message.value)
        if len(got) == len(topics):
            done.set()

    async with trio_bus.open_bus(bus_url, client_id=f"many-{tag}") as bus:
        subs = await bus.subscribe_many([(t, handler) for t in topics])
        assert [s.topic for s in subs] == topics
        assert all(s.live for s in subs)
        await bus.publish_many(trio_bus.OutgoingMessage(topic=t, value=t.encode()) for t in topics)
        with trio.fail_after(30):
            await done.wait()
        assert got == {t: [t.encode()] for t in topics}


async def test_subscribe_many_envelopes_and_all_or_none(memory_bus_url: str) -> None:
    seen: list[str] = []
    handled = trio.Event()

    async def on_envelope(envelope: trio_bus.Envelope) -> None:
        seen.append(envelope.event_type)
        handled.set()

    async with trio_bus.open_bus(memory_bus_url, client_id="many") as bus:
        with pytest.raises(errors.InvalidTopicError):
            await bus.subscribe_many({"ok": on_envelope, "not ok": on_envelope}, envelope=True)
        assert bus.subscriptions() == ()
        (sub,) = await bus.subscribe_many({"orders": on_envelope}, envelope=True)
        await bus.publish_envelope(
            "orders", trio_bus.Envelope.new(aggregate_id="o-1", event_type="Placed", payload={})
        )
        with trio.fail_after(10):
            await handled.wait()
        assert seen == ["Placed"]
        await sub.close()
