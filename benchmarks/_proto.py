"""What the orchestrator and the worker processes say to each other.

A worker (``python -m benchmarks.worker consume|produce SPEC_JSON``) writes
one line per event to stdout: ``READY``, ``PROGRESS <handled>``,
``RESULT <json>`` or ``ERROR <text>``. A consumer stops early when a line
``STOP`` (or end of file) arrives on its stdin.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import attrs

from .workloads import Workload

__all__ = ["RunSpec", "emit", "watch_stdin"]

#: Seconds between PROGRESS lines (one per batch of messages, not per message).
PROGRESS_INTERVAL = 0.25
#: Concurrency of every keyed worker pool (trio_bus's default pool size).
POOL = 256


@attrs.frozen(kw_only=True)
class RunSpec:
    """One run of one system on one transport.

    Attributes:
        system: ``trio_bus``, ``raw``, ``trio-channels``, ``faststream`` or
            ``faststream-concurrent``.
        transport: ``memory``, ``nats`` or ``kafka``.
        address: ``host:port`` of the broker (empty for memory).
        workload: What to publish and how to handle it.
        run_id: Unique per run: topics and groups are fresh every run.
        kafka_params: URL query for trio_bus's Kafka transport (the same
            group timings are given to the other Kafka clients).
    """

    system: str
    transport: str
    address: str
    workload: Workload
    run_id: str
    # Tansu holds a JoinGroup for about half the session timeout: a short
    # session keeps each run's group join near 1 s (as in the tests).
    kafka_params: str = "session_timeout_ms=2000&heartbeat_interval_ms=200"

    @property
    def topics(self) -> list[str]:
        """The run's topics, indexed like :meth:`Workload.topic_index`."""
        return [f"bench-{self.run_id}-{j}" for j in range(self.workload.topics)]

    @property
    def group(self) -> str:
        """The run's consumer group."""
        return f"bench-{self.run_id}"

    def kafka_setting(self, name: str) -> int:
        """A numeric Kafka setting from :attr:`kafka_params`."""
        for part in self.kafka_params.split("&"):
            key, _, value = part.partition("=")
            if key == name:
                return int(value)
        raise KeyError(name)

    @property
    def bus_url(self) -> str:
        """The trio_bus URL of this run's broker."""
        if self.transport == "memory":
            return f"memory://bench-{self.run_id}"
        if self.transport == "kafka":
            return f"kafka://{self.address}?{self.kafka_params}"
        return f"nats://{self.address}"

    def to_json(self) -> str:
        """Serialise for a worker's command line."""
        data = attrs.asdict(self)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["workload"] = Workload(**data["workload"])
        return cls(**data)


def normalise_address(url: str) -> str:
    """``nats://h:p`` / ``kafka://h:p?...`` / ``h:p`` -> ``h:p``."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    return parts.netloc


def emit(kind: str, data: Any = None) -> None:
    """Write one protocol line to stdout."""
    line = kind if data is None else f"{kind} {json.dumps(data)}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def watch_stdin(on_stop: Callable[[], None]) -> None:
    """Call *on_stop* (from a daemon thread) when ``STOP`` or EOF arrives
    on stdin. *on_stop* must be thread-safe (``run_sync_soon`` /
    ``call_soon_threadsafe``)."""

    def watch() -> None:
        for line in sys.stdin:
            if line.strip() == "STOP":
                break
        on_stop()

    # A daemon thread: a blocked readline must never keep the process alive.
    threading.Thread(target=watch, name="bench-stdin", daemon=True).start()
