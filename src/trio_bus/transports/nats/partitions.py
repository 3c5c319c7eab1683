"""Partitions of a topic and who owns them: pure logic, no I/O.

A partitioned topic (stream metadata ``trio_bus.partitions`` = N > 1) keeps
an aggregate's messages on one subject, ``<topic>.~.<p>`` with
``p = stable_hash(aggregate_id) % N`` -- a crc32 that is the same in every
process (:func:`trio_bus._names.stable_hash`), so one aggregate maps to one
partition in every process. Each (group, topic, partition) is one durable
pull consumer, ``<durable>_p<p>``, and one member of the group at a time
holds it (a lease in a KV bucket, see :mod:`.leases`).

Subjects a partition's consumer reads:

* ``<topic>.~.<p>`` and ``<topic>.~.<p>.>``: trio_bus publishes keyed
  messages to the first; a raw publisher that computes the partition may
  put the aggregate in a token after it (``orders.~.3.order-7``);
* partition 0 also reads bare ``<topic>`` (trio_bus publishes messages
  without an aggregate there) and ``<topic>.*`` (raw publishers using the
  subject-token convention, ``orders.order-7``; those have no order across
  members beyond partition 0's). Deeper raw subjects (``orders.a.b``) are
  read by no partition: see docs/scaling.md.

Assignment is rendezvous (highest random weight) hashing over the live
members with a bound on each member's load (:func:`assign`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import attrs
import trio

from ..._lease import Lease
from ..._message import Record
from ..._names import stable_hash
from .options import ConsumerOptions, GroupOptions

__all__ = [
    "PARTITIONS_METADATA",
    "Slot",
    "assign",
    "filters",
    "hrw_owner",
    "key_token",
    "partition_of",
    "partition_subject",
    "partitions_from_metadata",
    "slot_consumer_options",
]

#: Stream metadata key holding a topic's partition count.
PARTITIONS_METADATA = "trio_bus.partitions"
#: The subject token that marks partition subjects.
MARK = "~"


def partition_of(aggregate_id: str, partitions: int) -> int:
    """The partition of *aggregate_id* (the pool's stable crc32)."""
    return stable_hash(aggregate_id) % partitions


def partition_subject(topic: str, key: str | None, partitions: int) -> str:
    """The subject a trio_bus publisher uses: ``<topic>.~.<p>`` for an
    aggregate on a partitioned topic, else the bare topic."""
    if key is None or partitions <= 1:
        return topic
    return f"{topic}.{MARK}.{partition_of(key, partitions)}"


def filters(topic: str, partition: int) -> list[str]:
    """The filter subjects of *partition*'s consumer (see the module doc)."""
    mine = [f"{topic}.{MARK}.{partition}", f"{topic}.{MARK}.{partition}.>"]
    if partition == 0:
        mine += [topic, f"{topic}.*"]
    return mine


def partitions_from_metadata(metadata: object) -> int | None:
    """The partition count a stream's metadata names (None: none, or not a
    positive number)."""
    if not isinstance(metadata, dict):
        return None
    try:
        value = int(metadata[PARTITIONS_METADATA])
    except (KeyError, TypeError, ValueError):
        return None
    return value if value >= 1 else None


def _weight(member: str, partition: int) -> int:
    digest = hashlib.blake2b(f"{partition}/{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def hrw_owner(members: Iterable[str], partition: int) -> str | None:
    """The member with the highest weight for *partition* (None: nobody)."""
    return max(members, key=lambda m: (_weight(m, partition), m), default=None)


def assign(members: Iterable[str], partitions: int) -> dict[int, str]:
    """Partition -> owner: rendezvous hashing with bounded load.

    Each partition goes to its highest-weight member that has fewer than
    ``ceil(partitions / members)`` partitions yet (taken in partition
    order). Plain rendezvous hashing leaves a member of three with no
    partition of eight about one time in ten; the bound keeps every member
    within one of the mean and still moves few partitions when a member
    comes or goes. Every member computes the same result from the same
    live set.
    """
    live = sorted(set(members))
    if not live:
        return {}
    cap = -(-partitions // len(live))
    load = dict.fromkeys(live, 0)
    owners: dict[int, str] = {}
    for p in range(partitions):
        ranked = sorted(live, key=lambda m: (_weight(m, p), m), reverse=True)
        owner = next(m for m in ranked if load[m] < cap)
        owners[p] = owner
        load[owner] += 1
    return owners


def key_token(name: str) -> str:
    """*name* as one KV key token: letters, digits, ``-`` and ``_`` kept,
    anything else (``=``, ``.``, ...) as ``=HH``."""
    out = []
    for ch in name:
        if ch.isascii() and (ch.isalnum() or ch in "-_"):
            out.append(ch)
        else:
            out.extend(f"={b:02X}" for b in ch.encode())
    return "".join(out)


def slot_consumer_options(consumer: ConsumerOptions, groups: GroupOptions) -> ConsumerOptions:
    """Pulling for a partition: requests expire within half a lease, so a
    member that lost its lease has no request left on the server when a new
    owner starts; heartbeats fit into that."""
    expires = min(consumer.pull_expires, groups.lease_ttl / 2)
    heartbeat = min(consumer.idle_heartbeat, expires / 2)
    return attrs.evolve(consumer, pull_expires=expires, idle_heartbeat=heartbeat)


@attrs.define(eq=False)
class Slot:
    """One held partition, as its puller sees it.

    Attributes:
        partition: The partition number.
        suffix: Appended to the group's durable name (``_p<p>``).
        filters: The consumer's filter subjects.
        lease: The member's lease on it (renewed by the lease rounds).
        consumer: The pulling options (see :func:`slot_consumer_options`).
    """

    partition: int
    filters: list[str]
    lease: Lease
    consumer: ConsumerOptions
    suffix: str = ""
    #: Being given up: pull nothing, hand nothing more over (new arrivals
    #: are nak'd at close) while the handlers of what was fetched finish.
    draining: bool = False
    #: Records fetched by the bus and not settled yet.
    in_pool: int = 0
    #: Set when a draining slot's last fetched record is settled.
    drained: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self.suffix = self.suffix or f"_p{self.partition}"

    def may_pull(self) -> bool:
        """Whether a pull request issued now expires before the lease."""
        left = self.lease.expires - trio.current_time()
        return not (self.lease.revoked or self.draining) and left > self.consumer.pull_expires

    def owns(self, record: Record) -> bool:
        """Whether *record* was delivered under this slot's lease."""
        return record.lease is self.lease

    def settled(self) -> None:
        """A fetched record was settled."""
        self.in_pool = max(0, self.in_pool - 1)
        if self.draining and not self.in_pool:
            self.drained.set()

    def fenced(self) -> bool:
        """The lease is gone: send nothing more for this partition."""
        return not self.lease.held()
