"""Raw-client views of the broker, independent of trio_bus (plain asyncio
with nats-py or aiokafka), run as a subprocess by the harness:

* ``sample``: every ``--every`` seconds, log the group's ack floor (NATS
  consumer info ``ack_floor.stream_seq + 1``) or committed offsets (Kafka
  OffsetFetch) as ``floor`` events, then a ``tick`` with the ``backlog``
  (NATS: pending + ack pending; Kafka: end offsets - committed), until
  SIGTERM;
* ``readback``: write what the broker holds in the topic and its dead-letter
  topic as JSON (``{"held": [...], "dead": [...]}``) for the checker.

    python -m tests.faults.probe sample nats nats://127.0.0.1:4222 orders g events.log
    python -m tests.faults.probe readback kafka 127.0.0.1:9092 orders g out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from .events import EventLog

DLQ_REASON = "X-DLQ-Error-Message"
#: Header nested topics carry on NATS (the DLQ lives in its topic's stream).
NATS_TOPIC_HEADER = "Trio-Bus-Topic"


def identify(value: bytes) -> tuple[str | None, int | None]:
    """``(agg, seq)`` of one of our bodies (plain or inside an envelope's
    payload), else ``(None, None)``."""
    try:
        body = json.loads(value)
        body = body.get("payload", body)
        return str(body["agg"]), int(body["seq"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, None


def sha(value: bytes) -> str:
    """Digest identifying a body (fuzzed bodies have no agg/seq)."""
    return hashlib.sha256(value).hexdigest()


def _held(out: dict[str, list[Any]], value: bytes, partition: int, offset: int) -> None:
    agg, seq = identify(value)
    if agg is not None:
        out["held"].append({"agg": agg, "seq": seq, "partition": partition, "offset": offset})


def _dead(out: dict[str, list[Any]], value: bytes, headers: dict[str, str]) -> None:
    agg, seq = identify(value)
    out["dead"].append(
        {"agg": agg, "seq": seq, "reason": headers.get(DLQ_REASON, ""), "sha": sha(value)}
    )


_noted: set[str] = set()


def _note(exc: Exception) -> None:
    """Report each kind of sampling failure once (on stderr, the .out file)."""
    if type(exc).__name__ not in _noted:
        _noted.add(type(exc).__name__)
        print(f"sampling failed: {exc!r}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- NATS


async def nats_readback(url: str, topic: str) -> dict[str, list[Any]]:
    import nats
    from nats.js.api import DeliverPolicy

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = topic.replace(".", "_")
        info = await js.stream_info(stream)
        out: dict[str, list[Any]] = {"held": [], "dead": []}
        total = info.state.messages
        got: dict[int, Any] = {}
        done = asyncio.Event()

        async def collect(msg: Any) -> None:
            got[msg.metadata.sequence.stream] = msg
            if len(got) >= total:
                done.set()

        # Ordered push consumers over the topic and its nested subjects (the
        # dead-letter topic): the whole stream in a few round trips, where
        # one get per sequence took seconds for large streams.
        subs = [
            await js.subscribe(
                subject, cb=collect, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
            )
            for subject in (topic, f"{topic}.>")
        ]
        if total:
            await asyncio.wait_for(done.wait(), 120)
        for sub in subs:
            await sub.unsubscribe()
        for seq in sorted(got):
            msg = got[seq]
            headers = dict(msg.headers or {})
            if headers.get(NATS_TOPIC_HEADER, topic) != topic:
                _dead(out, msg.data or b"", headers)
            else:
                _held(out, msg.data or b"", 0, seq)
        return out
    finally:
        await nc.close()


async def nats_sample(url: str, topic: str, group: str, log: EventLog, every: float) -> None:
    import nats

    nc = await nats.connect(url, max_reconnect_attempts=-1)
    js = nc.jetstream()
    stream, durable = topic.replace(".", "_"), group.replace(".", "_")
    try:
        while True:
            backlog = None
            try:
                floor, backlog = await _nats_group_state(js, stream, durable)
                log.write("floor", partition=0, floor=floor, kind="ack")
            except Exception as exc:  # broker away or consumer not there yet: again later
                _note(exc)
            log.write("tick", backlog=backlog)
            await asyncio.sleep(every)  # the sampling period
    finally:
        await nc.close()


async def _nats_group_state(js: Any, stream: str, durable: str) -> tuple[int, int]:
    """``(floor, backlog)`` of a group over all its durables: the shared one
    (``partitions=1``) and the partitioned ``<durable>_p<p>`` ones.

    Every stream sequence below ``floor`` is acked: each durable's ack floor
    bounds its own filter, and a durable with nothing pending or unacked
    has acked all it filters up to the stream's last sequence, read first.
    """
    last = (await js.stream_info(stream)).state.last_seq
    infos = [
        info
        for info in await js.consumers_info(stream)
        if info.name == durable
        or (info.name.startswith(durable + "_p") and info.name[len(durable) + 2 :].isdigit())
    ]
    if not infos:
        raise LookupError(f"no durable of group {durable} on {stream} yet")
    floor, backlog = last + 1, 0
    for info in infos:
        pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
        backlog += pending
        if pending:
            floor = min(floor, info.ack_floor.stream_seq + 1)
    return floor, backlog


# --------------------------------------------------------------------- Kafka


#: Empty polls (0.5 s each) in a row after which a Kafka read-back stops.
STALL_POLLS = 10


async def kafka_readback(bootstrap: str, topic: str) -> dict[str, list[Any]]:
    import aiokafka

    out: dict[str, list[Any]] = {"held": [], "dead": []}
    for name, dead in ((topic, False), (f"{topic}.dlq", True)):
        consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(name) or await _kafka_partitions(
                bootstrap, name
            )
            tps = [aiokafka.TopicPartition(name, p) for p in sorted(partitions)]
            if not tps:
                continue
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            # Read to the end offsets, then on until a poll comes back empty
            # (Tansu's latest offset can be one short). A Tansu restarted
            # empty reports end offsets it then serves nothing below: give
            # up after STALL_POLLS empty polls in a row, and say so.
            batches: dict[Any, Any] = {None: True}
            empty = 0
            while batches or [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                batches = await consumer.getmany(timeout_ms=500, max_records=5000)
                empty = 0 if batches else empty + 1
                if empty >= STALL_POLLS:
                    short = {tp.partition: end[tp] for tp in tps}
                    print(f"read-back of {name} stalled short of {short}", file=sys.stderr)
                    break
                for tp, records in batches.items():
                    for r in records:
                        value = r.value or b""
                        if dead:
                            headers = {k: v.decode("utf-8", "replace") for k, v in r.headers}
                            _dead(out, value, headers)
                        else:
                            _held(out, value, tp.partition, r.offset)
        finally:
            await _stop(consumer)
    return out


async def _kafka_partitions(bootstrap: str, topic: str) -> set[int]:
    """*topic*'s partitions, asked for by name. A client's start-up metadata
    lists every topic, but Tansu leaves out a topic re-created after it
    restarted empty (the broker-restart scenario's read-back saw none)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return {
        p["partition"]
        for t in described
        if t["topic"] == topic and not t["error_code"]
        for p in t["partitions"]
    }


async def _stop(client: Any) -> None:
    # aiokafka's stop() right after start() can re-raise the CancelledError
    # of its own internal commit-reset task; the client is stopped anyway.
    with contextlib.suppress(asyncio.CancelledError):
        await client.stop()


async def _kafka_client(bootstrap: str, topic: str, group: str, log: EventLog, every: float) -> Any:
    """A started consumer client whose metadata knows *topic* (a client's
    metadata only covers topics that existed when it started)."""
    import aiokafka

    while True:
        client = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )
        try:
            await client.start()
            if client.partitions_for_topic(topic):
                return client
        except Exception as exc:  # broker not there yet
            _note(exc)
        await _stop(client)
        log.write("tick")
        await asyncio.sleep(every)  # the topic does not exist yet: look again later


async def kafka_sample(bootstrap: str, topic: str, group: str, log: EventLog, every: float) -> None:
    import aiokafka

    client = await _kafka_client(bootstrap, topic, group, log, every)
    try:
        partitions = sorted(client.partitions_for_topic(topic))
        tps = [aiokafka.TopicPartition(topic, p) for p in partitions]

        async def sample() -> int:
            ends = await client.end_offsets(tps)
            backlog = 0
            for tp in tps:
                offset = await client.committed(tp) or 0
                log.write("floor", partition=tp.partition, floor=offset, kind="commit")
                backlog += ends[tp] - offset
            return backlog

        while True:
            backlog: int | None = None
            try:
                # Bounded: after a broker restart aiokafka's offset lookup
                # waits its whole request timeout (40 s), and the harness
                # counts ticks.
                backlog = await asyncio.wait_for(sample(), max(2.0, 10 * every))
            except Exception as exc:  # broker away or slow: sample again later
                _note(exc)
            log.write("tick", backlog=backlog)
            await asyncio.sleep(every)  # the sampling period
    finally:
        await _stop(client)


async def _main(args: argparse.Namespace) -> None:
    if args.command == "readback":
        read = nats_readback if args.transport == "nats" else kafka_readback
        data = json.dumps(await read(args.address, args.topic))
        with open(args.out, "w") as f:  # noqa: ASYNC230 - the process's last act
            f.write(data)
        return
    log = EventLog(Path(args.out), "sampler")
    sample = nats_sample if args.transport == "nats" else kafka_sample
    task = asyncio.ensure_future(sample(args.address, args.topic, args.group, log, args.every))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.probe")
    parser.add_argument("command", choices=["sample", "readback"])
    parser.add_argument("transport", choices=["nats", "kafka"])
    parser.add_argument("address", help="NATS URL or Kafka bootstrap host:port")
    parser.add_argument("topic")
    parser.add_argument("group")
    parser.add_argument("out", help="sample: event log; readback: JSON file")
    parser.add_argument("--every", type=float, default=0.05)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
