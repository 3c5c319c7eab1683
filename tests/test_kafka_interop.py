"""Interop with an independent Kafka client: kcat (librdkafka).

kcat is a Debian package (``apt-get install -y kcat``); CI installs it, and
these tests fail (rather than skip) without it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections import defaultdict

import pytest
import trio

import trio_bus
from trio_bus._envelope import Envelope, encode_envelope
from trio_bus.transports.kafka import KafkaOptions, TopicConfig

from ._kafka_broker import KafkaBroker
from .helpers import WAIT, Recorder

KCAT = shutil.which("kcat") or shutil.which("kafkacat")


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def kcat(*args: str, stdin: bytes = b"") -> bytes:
    # Part of the default suite, not skipped: CI installs kcat (.ci/run).
    if KCAT is None:
        pytest.fail("kcat is not installed: apt-get install -y kcat")
    with trio.fail_after(WAIT):
        done = await trio.run_process(
            [KCAT, *args], stdin=stdin, capture_stdout=True, capture_stderr=True
        )
    assert isinstance(done, subprocess.CompletedProcess)
    out: bytes = done.stdout
    return out


async def test_kcat_produces_keyed_messages_consumed_in_order(
    kafka_broker_for_librdkafka: KafkaBroker,
) -> None:
    kafka_broker = kafka_broker_for_librdkafka
    topic = _name("kcat-in")
    options = KafkaOptions(topics={topic: TopicConfig(partitions=4)})
    got: Recorder[tuple[str | None, int, str]] = Recorder()

    async def handler(message: trio_bus.Message) -> None:
        got.add((message.key, int(message.value.split(b":")[1]), message.headers["src"]))

    lines = b"".join(b"order-%d|order-%d:%d\n" % (i % 5, i % 5, i) for i in range(50))
    async with trio_bus.open_bus(kafka_broker.url, transport_options=options) as bus:
        await bus.subscribe(topic, handler, start="earliest")
        await kcat(
            "-P", "-b", kafka_broker.bootstrap, "-t", topic, "-K", "|", "-H", "src=kcat",
            stdin=lines,
        )  # fmt: skip
        await got.wait_for_count(50)
    by_key: dict[str | None, list[int]] = defaultdict(list)
    for key, seq, src in got.items:
        assert src == "kcat"
        by_key[key].append(seq)
    assert sorted(k for k in by_key if k is not None) == [f"order-{i}" for i in range(5)]
    for key, seqs in by_key.items():
        assert seqs == sorted(seqs), key
    assert sorted(s for seqs in by_key.values() for s in seqs) == list(range(50))


async def test_kcat_reads_an_envelope_published_by_trio_bus(
    kafka_broker_for_librdkafka: KafkaBroker,
) -> None:
    kafka_broker = kafka_broker_for_librdkafka
    topic = _name("kcat-out")
    env = Envelope.new(
        aggregate_id="order-42",
        event_type="OrderPlaced",
        payload={"total": 12.5, "items": ["a", "b"]},
        trace_id="trace-1",
        correlation_id="corr-1",
        tenant_id="tenant-1",
    )
    async with trio_bus.open_bus(kafka_broker.url) as bus:
        await bus.publish(topic, encode_envelope(env), key=env.aggregate_id, headers=env.headers())
    out = await kcat("-C", "-b", kafka_broker.bootstrap, "-t", topic, "-o", "beginning", "-e", "-J")
    records = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert len(records) == 1
    record = records[0]
    assert record["key"] == "order-42"
    body = json.loads(record["payload"])
    assert body["event_id"] == env.event_id
    assert body["aggregate_id"] == "order-42"
    assert body["event_type"] == "OrderPlaced"
    assert body["event_version"] == 1
    assert body["trace_id"] == "trace-1"
    assert body["correlation_id"] == "corr-1"
    assert body["tenant_id"] == "tenant-1"
    assert body["payload"] == {"total": 12.5, "items": ["a", "b"]}
    assert "timestamp" in body
    # kcat -J lists headers as a flat [name, value, name, value...] array.
    flat = record["headers"]
    headers = dict(zip(flat[::2], flat[1::2], strict=True))
    assert headers["X-Event-ID"] == env.event_id
    assert headers["X-Aggregate-ID"] == "order-42"
    assert headers["X-Event-Type"] == "OrderPlaced"
    assert headers["X-Event-Version"] == "1"
    assert headers["X-Trace-ID"] == "trace-1"
    assert headers["X-Correlation-ID"] == "corr-1"
    assert headers["X-Tenant-ID"] == "tenant-1"
