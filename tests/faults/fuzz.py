"""Fuzzed and malformed messages from raw clients (nats-py, aiokafka),
valid envelopes interleaved, each logged as a ``pub`` event with
``valid`` and the body digest ``sha``; run as a subprocess:

    python -m tests.faults.fuzz nats nats://127.0.0.1:4222 TOPIC LOG --count 20000

Malformed kinds: invalid JSON, an envelope with a missing field, a huge
aggregate ID, non-UTF-8 header bytes (Kafka; nats-py sends str headers
only), an empty key, an empty body, and more headers than the wire limit
(:data:`trio_bus._names.MAX_WIRE_HEADERS`) on a valid body.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio_bus
from trio_bus._names import MAX_WIRE_HEADERS

from .events import EventLog
from .probe import sha

#: (key, body, headers) of one message; headers as bytes for Kafka's sake.
Wire = tuple[bytes | None, bytes, list[tuple[str, bytes]]]
Send = Callable[[Wire], Awaitable[Any]]


def valid(agg: str, seq: int) -> bytes:
    """A valid envelope whose payload names ``agg``/``seq``."""
    env = trio_bus.Envelope.new(
        aggregate_id=agg, event_type="FaultTest", payload={"agg": agg, "seq": seq}
    )
    return trio_bus.encode_envelope(env)


def malformed(rng: random.Random, n: int, transport: str) -> tuple[str, Wire]:
    """The *n*-th malformed message: ``(kind, wire)``."""
    kinds = ["json", "missing", "huge_id", "empty_key", "empty_body", "headers"]
    if transport == "kafka":
        kinds.append("non_utf8_header")
    kind = kinds[n % len(kinds)]
    nonce = f"{n}-{rng.random()}".encode()  # makes every body distinct
    body: dict[str, Any] = json.loads(valid("x", 0))
    body["payload"] = {"nonce": nonce.decode()}  # never mistaken for one of ours
    if kind == "json":
        return kind, (b"k", b'{"agg": "' + nonce + bytes([rng.randrange(256)]), [])
    if kind == "missing":
        del body["event_type"]
        return kind, (b"k", json.dumps(body).encode(), [])
    if kind == "huge_id":
        body["aggregate_id"] = "h" * 100_000 + nonce.decode()
        return kind, (None, json.dumps(body).encode(), [])
    if kind == "non_utf8_header":
        return kind, (b"k", b"\xff" + nonce, [("X-Aggregate-ID", b"\xff\xfe\xfd")])
    if kind == "empty_key":
        return kind, (b"", b"not an envelope " + nonce, [])
    if kind == "empty_body":
        return kind, (b"k", b"", [("X-Nonce", nonce)])
    headers = [(f"X-H{i}", b"v") for i in range(MAX_WIRE_HEADERS + 10)]
    return kind, (b"k", json.dumps(body).encode(), headers)


async def run(send: Send, log: EventLog, count: int, transport: str) -> None:
    rng = random.Random(15)
    seqs: dict[str, int] = {}
    pending: list[tuple[dict[str, Any], Awaitable[Any]]] = []
    for n in range(count):
        if n % 2:  # half valid, interleaved
            agg = f"v{rng.randrange(50)}"
            seq = seqs[agg] = seqs.get(agg, -1) + 1
            wire: Wire = (agg.encode(), valid(agg, seq), [])
            fields: dict[str, Any] = {"agg": agg, "seq": seq, "valid": True}
        else:
            kind, wire = malformed(rng, n // 2, transport)
            fields = {"agg": "", "seq": -1, "valid": False, "kind": kind}
        fields["sha"] = sha(wire[1])
        pending.append((fields, await send(wire)))
        if len(pending) >= 200:
            await _settle(pending, log)
    await _settle(pending, log)
    log.write("done")


async def _settle(pending: list[tuple[dict[str, Any], Awaitable[Any]]], log: EventLog) -> None:
    outcomes = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
    for (fields, _), outcome in zip(pending, outcomes, strict=True):
        err = type(outcome).__name__ if isinstance(outcome, BaseException) else None
        log.write("pub", ok=err is None, err=err, **fields)
    pending.clear()


async def _main(args: argparse.Namespace) -> None:
    log = EventLog(Path(args.log), "fuzz")
    if args.transport == "nats":
        import nats

        nc = await nats.connect(args.address)
        js = nc.jetstream()

        async def send_nats(wire: Wire) -> Awaitable[Any]:
            key, body, headers = wire
            hdrs = {k: v.decode() for k, v in headers}
            if key is not None:
                hdrs.setdefault("X-Aggregate-ID", key.decode())
            return asyncio.ensure_future(js.publish(args.topic, body, headers=hdrs or None))

        try:
            await run(send_nats, log, args.count, "nats")
        finally:
            await nc.close()
        return
    import aiokafka

    producer = aiokafka.AIOKafkaProducer(bootstrap_servers=args.address)
    await producer.start()

    async def send_kafka(wire: Wire) -> Awaitable[Any]:
        key, body, headers = wire
        fut: Awaitable[Any] = await producer.send(args.topic, body, key=key, headers=headers)
        return fut

    try:
        await run(send_kafka, log, args.count, "kafka")
    finally:
        await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.fuzz")
    parser.add_argument("transport", choices=["nats", "kafka"])
    parser.add_argument("address")
    parser.add_argument("topic")
    parser.add_argument("log")
    parser.add_argument("--count", type=int, default=20000)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
