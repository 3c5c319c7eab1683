"""The one workload definition every system and transport runs.

A :class:`Workload` is a pure description: message ``i`` goes to topic
``i % topics`` with key ``agg-<i % keys>`` and is the ``i // keys``-th
message of that key. Producers and consumers of any system, in any
process, derive the same plan from the workload alone, so a consumer can
check per-key order and duplicates from two small headers (publish time and
global index) without any shared state.

Scenarios (``SCENARIOS``):

* ``seed-300`` .. ``seed-3000``: the seed documents' light / medium / heavy /
  extreme runs, 1 KiB over 100 aggregates, no-op handler;
* ``bulk-noop`` / ``bulk-1ms``: 100,000 x 1 KiB over 100 aggregates, handler
  no-op or sleeping 1 ms;
* ``pc-1`` .. ``pc-10000``: Confluent Parallel Consumer's workload, 10,000
  messages, 0-5 ms of random work each (uniform, seeded), per-key order,
  1 / 10 / 100 / 10,000 keys; published first, then the consumer is timed
  alone, as Parallel Consumer's benchmark does;
* ``topics-1`` / ``topics-10`` / ``topics-100``: the same 10,000 x 1 KiB
  over 100 aggregates spread over 1, 10 or 100 subscribed topics (for RSS
  and task counts).
"""

from __future__ import annotations

import functools
import random
from typing import Literal

import attrs

__all__ = [
    "AGGREGATE_HEADER",
    "FAMILIES",
    "INDEX_HEADER",
    "SCENARIOS",
    "TS_HEADER",
    "Workload",
    "WorkKind",
    "by_name",
]

WorkKind = Literal["none", "fixed", "random"]

#: Header carrying the publish time (``time.time_ns()``, decimal).
TS_HEADER = "bench-ts"
#: Header carrying the message's global index in the workload.
INDEX_HEADER = "bench-idx"
#: The aggregate-ID header raw NATS producers send (trio_bus sends the same).
AGGREGATE_HEADER = "X-Aggregate-ID"

#: Kafka partitions of every benchmark topic (all systems alike).
PARTITIONS = 8


@attrs.frozen(kw_only=True)
class Workload:
    """A benchmark workload.

    Attributes:
        name: Scenario name (``seed-3000``...).
        family: ``seed``, ``bulk``, ``pc`` or ``topics``.
        messages: Messages published in total.
        keys: Distinct aggregate IDs (message ``i`` has key ``i % keys``).
        topics: Subscribed topics (message ``i`` goes to ``i % topics``).
        payload_bytes: Body size.
        work: Handler work: none, a fixed sleep, or a random sleep.
        work_ms: The fixed sleep, or the upper bound of the random one.
        partitions: Kafka partitions per topic.
        seed: Seed of the random work times.
        preload: Publish everything before the consumer starts and time the
            consumer alone, from its subscription going live to the last
            handler's end (Parallel Consumer's method); else the producer
            runs against a live consumer and the clock starts at the first
            publish.
    """

    name: str
    family: str
    messages: int = attrs.field(validator=attrs.validators.ge(1))
    keys: int = attrs.field(validator=attrs.validators.ge(1))
    topics: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    payload_bytes: int = 1024
    work: WorkKind = "none"
    work_ms: float = 0.0
    partitions: int = PARTITIONS
    seed: int = 20_240_905
    preload: bool = False

    def key(self, index: int) -> str:
        """The aggregate ID of message *index*."""
        return f"agg-{index % self.keys}"

    def topic_index(self, index: int) -> int:
        """Which of the workload's topics message *index* goes to."""
        return index % self.topics

    def seq(self, index: int) -> int:
        """Position of message *index* among its key's messages (0-based)."""
        return index // self.keys

    def payload(self) -> bytes:
        """The body every message carries."""
        return b"x" * self.payload_bytes

    def work_seconds(self, index: int) -> float:
        """Seconds the handler of message *index* sleeps."""
        if self.work == "none":
            return 0.0
        if self.work == "fixed":
            return self.work_ms / 1000
        return _random_work(self.messages, self.work_ms, self.seed)[index]

    def total_work_seconds(self) -> float:
        """Sum of every handler's sleep: the serial time."""
        return sum(self.work_seconds(i) for i in range(self.messages))

    def scaled(self, messages: int) -> Workload:
        """The same workload with *messages* messages (tiny smoke runs, or a
        cap for slow baselines); keys and topics stay."""
        return attrs.evolve(self, messages=messages)

    def describe(self) -> str:
        """One line for tables."""
        work = {
            "none": "no-op",
            "fixed": f"{self.work_ms:g} ms",
            "random": f"0-{self.work_ms:g} ms random",
        }[self.work]
        topics = f", {self.topics} topics" if self.topics > 1 else ""
        return (
            f"{self.messages:,} x {self.payload_bytes} B, {self.keys:,} keys, "
            f"handler {work}{topics}"
        )


@functools.cache
def _random_work(messages: int, work_ms: float, seed: int) -> tuple[float, ...]:
    # Seeded, so every process derives the same sleeps for the same message.
    rng = random.Random(seed)
    return tuple(rng.uniform(0, work_ms) / 1000 for _ in range(messages))


def _scenarios() -> dict[str, Workload]:
    out: dict[str, Workload] = {}
    for n in (300, 800, 1500, 3000):
        out[f"seed-{n}"] = Workload(name=f"seed-{n}", family="seed", messages=n, keys=100)
    out["bulk-noop"] = Workload(name="bulk-noop", family="bulk", messages=100_000, keys=100)
    out["bulk-1ms"] = Workload(
        name="bulk-1ms", family="bulk", messages=100_000, keys=100, work="fixed", work_ms=1.0
    )
    for keys in (1, 10, 100, 10_000):
        out[f"pc-{keys}"] = Workload(
            name=f"pc-{keys}",
            family="pc",
            messages=10_000,
            keys=keys,
            work="random",
            work_ms=5.0,
            preload=True,
        )
    for topics in (1, 10, 100):
        out[f"topics-{topics}"] = Workload(
            name=f"topics-{topics}", family="topics", messages=10_000, keys=100, topics=topics
        )
    return out


#: Every scenario by name, in report order.
SCENARIOS: dict[str, Workload] = _scenarios()
#: Scenario families, in report order.
FAMILIES = ("seed", "bulk", "pc", "topics")


def by_name(names: str) -> list[Workload]:
    """Scenarios from a comma-separated list of names or family names
    (``seed``, ``bulk``, ``pc``, ``topics``, ``all``)."""
    chosen: list[Workload] = []
    for raw in names.split(","):
        name = raw.strip()
        if not name:
            continue
        if name == "all":
            found = list(SCENARIOS.values())
        elif name in FAMILIES:
            found = [w for w in SCENARIOS.values() if w.family == name]
        elif name in SCENARIOS:
            found = [SCENARIOS[name]]
        else:
            raise ValueError(
                f"unknown scenario {name!r}; known: all, {', '.join(FAMILIES)}, "
                + ", ".join(SCENARIOS)
            )
        chosen.extend(w for w in found if w not in chosen)
    return chosen
