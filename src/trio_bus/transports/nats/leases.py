"""A group's members and partition leases in a JetStream KV bucket
(asyncio side).

Keys of one (group, topic) *scope* (tokens escaped by
:func:`.partitions.key_token`):

* ``<stream>.<durable>.m.<member>`` -- a member's heartbeat, rewritten every
  round; value ``{"inc": incarnation, "ttl": lease_ttl}``;
* ``<stream>.<durable>.p.<p>`` -- partition *p*'s lease; value
  ``{"owner": member, "inc": incarnation, "ttl": lease_ttl}``; deleted (a
  KV delete marker) when the owner gives it up.

Every write is a compare-and-set on the key's last revision
(``Nats-Expected-Last-Subject-Sequence``; 0: the key must not exist), so
of two members racing for a partition one wins, and a member whose lease
was taken over can no longer renew it.

:class:`Scope` keeps a view of the keys through an ordered push consumer
(last value per key, then every change); each entry records *when this
process first saw its revision*, on the Trio clock. That is no earlier
than the write, so "no new revision seen for ``ttl + grace``" implies the
owner's own lease (which it dates from before sending the write) has
expired: no clock has to agree with another, only run at about the same
rate (``lease_grace`` covers the difference).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import nats.js.errors
import trio
from nats.aio.msg import Msg
from nats.js import api

from ...errors import TransportUnavailableError
from .connection import Connection
from .streams import map_api_error

__all__ = ["Entry", "Scope", "Write"]

logger = logging.getLogger("trio_bus.nats")

_OP_HEADER = "KV-Operation"
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_ERR_WRONG_LAST = (10071, 10164)
#: Seconds an untouched key stays in the bucket (a dead member's leftovers).
BUCKET_MAX_AGE = 3600.0


@attrs.define(slots=True)
class Entry:
    """The last revision of one key this process saw."""

    revision: int
    value: dict[str, Any] | None  # None: deleted
    seen: float  # Trio time the revision was first seen


@attrs.frozen
class Write:
    """One compare-and-set: put *value* (None: delete) if *key* is still at
    revision *last* (0: absent; None: whatever it is, for heartbeats)."""

    key: str
    value: dict[str, Any] | None
    last: int | None


class Scope:
    """The KV keys of one group on one topic: a live view and CAS writes."""

    def __init__(
        self,
        conn: Connection,
        bucket: str,
        scope: str,
        on_change: Callable[[], None],
        *,
        timeout: float,
    ) -> None:
        self.conn = conn
        #: Seconds a write may take (a round must not outlast its period).
        self.timeout = timeout
        self.bucket = bucket
        self.prefix = f"$KV.{bucket}.{scope}."
        self.entries: dict[str, Entry] = {}
        self._on_change = on_change
        self._sub: Any = None
        self._seen: dict[int, asyncio.Future[None]] = {}
        self._high = 0

    # ------------------------------------------------------------- view

    def members(self, now: float) -> dict[str, dict[str, Any]]:
        """Members whose heartbeat was seen within their lease ttl."""
        live: dict[str, dict[str, Any]] = {}
        for key, entry in self.entries.items():
            value = entry.value
            if not key.startswith("m.") or value is None:
                continue
            if now - entry.seen < float(value.get("ttl", 0)):
                live[key[2:]] = value
        return live

    def lease(self, partition: int) -> Entry | None:
        """The last seen state of *partition*'s lease key."""
        return self.entries.get(f"p.{partition}")

    def _on_msg(self, msg: Msg) -> None:
        if not msg.subject.startswith(self.prefix):
            return
        key = msg.subject[len(self.prefix) :]
        try:
            revision = msg.metadata.sequence.stream
        except Exception:  # not a JetStream message (never expected)
            return
        op = (msg.headers or {}).get(_OP_HEADER)
        value: dict[str, Any] | None = None
        if op not in ("DEL", "PURGE"):
            try:
                loaded = json.loads(msg.data)
            except ValueError:
                loaded = None
            value = loaded if isinstance(loaded, dict) else None
        old = self.entries.get(key)
        # A member or lease that appears or goes away changes the assignment.
        changed = (old is None) != (value is None) or (old is not None and old.value is None)
        if old is None or old.revision < revision:
            self.entries[key] = Entry(revision, value, trio.current_time())
        else:
            changed = False
        self._high = max(self._high, revision)
        for rev in [r for r in self._seen if r <= self._high]:
            future = self._seen.pop(rev)
            if not future.done():
                future.set_result(None)
        if changed:
            self._on_change()

    async def _cb(self, msg: Msg) -> None:
        self._on_msg(msg)

    # ------------------------------------------------------------ writes

    async def open(self) -> None:
        """Create the bucket if missing; start the view (the keys' last
        values, then every change)."""
        js, jsm, stream = self.conn.js, self.conn.jsm, f"KV_{self.bucket}"
        try:
            await jsm.stream_info(stream)
        except nats.js.errors.NotFoundError:
            try:
                # As many replicas as the topics' streams: losing a server
                # must not stop the leases of streams that survive it.
                replicas = self.conn.options.stream.replicas
                await js.create_key_value(
                    bucket=self.bucket, history=1, ttl=BUCKET_MAX_AGE, replicas=replicas
                )
            except nats.js.errors.BadRequestError:
                pass  # created meanwhile by another bus
            except Exception as exc:
                raise map_api_error(exc, f"creating KV bucket {self.bucket!r}") from exc
        except Exception as exc:
            raise map_api_error(exc, f"reading KV bucket {self.bucket!r}") from exc
        try:
            self._sub = await js.subscribe(
                self.prefix + ">",
                stream=stream,
                cb=self._cb,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            )
        except Exception as exc:
            raise map_api_error(exc, f"watching KV bucket {self.bucket!r}") from exc

    async def wait_seen(self, revision: int, seconds: float) -> bool:
        """Wait until the view caught up with *revision* (one of our own
        writes: everything written before it is in the view then)."""
        if self._high >= revision:
            return True
        future = self._seen.get(revision)
        if future is None:
            future = self._seen[revision] = asyncio.get_running_loop().create_future()
        await asyncio.wait({future}, timeout=seconds)
        return self._high >= revision

    async def write(self, writes: Iterable[Write]) -> list[int | Exception | None]:
        """Send every write at once; per write: the new revision, None when
        the revision check failed (someone else wrote first), or the
        exception (unknown outcome: timeout, not connected)."""
        return list(await asyncio.gather(*(self._write(w) for w in writes)))

    async def _write(self, w: Write) -> int | Exception | None:
        headers = {} if w.last is None else {_EXPECTED_LAST: str(w.last)}
        if w.value is None:
            headers[_OP_HEADER] = "DEL"
        payload = b"" if w.value is None else json.dumps(w.value).encode()
        try:
            ack = await self.conn.js.publish(
                self.prefix + w.key, payload, timeout=self.timeout, headers=headers
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in _ERR_WRONG_LAST:
                return None
            return map_api_error(exc, f"writing {w.key!r} in KV bucket {self.bucket!r}")
        except Exception as exc:  # timeout, not connected: outcome unknown
            error = TransportUnavailableError(f"writing {w.key!r} in KV bucket: {exc!r}")
            error.__cause__ = exc
            return error
        revision: int = ack.seq
        return revision

    async def close(self) -> None:
        """Stop the view."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                logger.debug("unsubscribing the KV view: %r", exc)
        for future in self._seen.values():
            future.cancel()
        self._seen.clear()
