"""Topics map to JetStream streams: provisioning per the topic strategy.

Topic ``orders.eu`` is stream ``orders_eu`` with subjects ``orders.eu`` and
``orders.eu.>``; a topic captured by an outer topic's ``<outer>.>`` subject
(``orders.dlq``) lives in the outer stream ("nested"). The strategy and
mismatch policy are the shared ones of :mod:`.._provisioning`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import attrs
import nats.errors
import nats.js.errors
from nats.js import api

from ...errors import TopicConfigError, TransportError, TransportUnavailableError
from .._provisioning import mismatch
from .connection import Connection
from .options import StreamOptions, duplicate_window, stream_name
from .partitions import PARTITIONS_METADATA, partitions_from_metadata

__all__ = ["ERR_STREAM_NOT_FOUND", "Streams", "TopicInfo", "map_api_error"]

logger = logging.getLogger("trio_bus.nats")

# JetStream API error codes this package reacts to.
ERR_STREAM_NOT_FOUND = 10059
_ERR_SUBJECTS_OVERLAP = 10065
_ERR_STREAM_NAME_IN_USE = 10058
# No servers for the replicas: too many replicas, or placement unmatched.
_ERR_NO_PEERS = 10005
_ERR_REPLICAS_UNCLUSTERED = 10074


@attrs.frozen(slots=True)
class TopicInfo:
    """Where a topic lives."""

    topic: str
    stream: str
    #: Stored in another (outer) topic's stream.
    nested: bool
    #: Partitions of the stream (its metadata; 1: not partitioned).
    partitions: int = 1


def map_api_error(exc: BaseException, doing: str) -> TransportError:
    """A JetStream API failure as a typed error: unavailable (retry later)
    or a topic configuration problem."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(
        exc,
        asyncio.TimeoutError
        | nats.errors.TimeoutError
        | nats.errors.NoRespondersError
        | nats.errors.ConnectionClosedError
        | nats.js.errors.ServiceUnavailableError,
    ):
        error: TransportError = TransportUnavailableError(
            f"{doing}: JetStream unavailable ({exc!r})"
        )
    else:
        error = TopicConfigError(f"{doing} failed: {exc}")
    error.__cause__ = exc
    return error


def _placement(s: StreamOptions) -> Any:
    if s.placement is None:
        return None
    return api.Placement(cluster=s.placement.cluster, tags=list(s.placement.tags) or None)


class Streams:
    """Applies the topic strategy once per topic and transport (asyncio side)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.options = conn.options
        self._topics: dict[str, TopicInfo] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def forget(self, topic: str) -> None:
        """Look *topic* up again next time (its stream vanished)."""
        self._topics.pop(topic, None)

    async def ensure(self, topic: str) -> TopicInfo:
        """Where *topic* lives, creating or checking its stream first."""
        info = self._topics.get(topic)
        if info is not None:
            return info
        async with self._locks.setdefault(topic, asyncio.Lock()):
            info = self._topics.get(topic)
            if info is None:
                info = await self._ensure(topic)
                self._topics[topic] = info
            return info

    async def _ensure(self, topic: str) -> TopicInfo:
        opts = self.options
        name = stream_name(topic, opts.stream_prefix)
        if opts.topic_strategy == "skip":
            return TopicInfo(topic, name, nested=False, partitions=opts.groups.partitions)
        jsm = self.conn.jsm
        try:
            info = await jsm.stream_info(name)
        except nats.js.errors.NotFoundError:
            info = None
        except Exception as exc:
            raise map_api_error(exc, f"reading stream {name!r} of topic {topic!r}") from exc
        if info is not None:
            return await self._check_existing(topic, name, info)
        outer = await self._outer_stream(topic)
        if outer is not None:
            try:
                outer_info = await jsm.stream_info(outer)
            except Exception as exc:
                raise map_api_error(exc, f"reading stream {outer!r}") from exc
            partitions = partitions_from_metadata(outer_info.config.metadata)
            return TopicInfo(topic, outer, nested=True, partitions=partitions or 1)
        if opts.topic_strategy == "validate_only":
            raise TopicConfigError(
                f"stream {name!r} for topic {topic!r} does not exist "
                "(topic_strategy='validate_only' never creates streams)"
            )
        try:
            await jsm.add_stream(self._config(topic, name))
        except nats.js.errors.APIError as exc:
            if exc.err_code == _ERR_SUBJECTS_OVERLAP:
                raise TopicConfigError(
                    f"cannot create stream {name!r} for topic {topic!r}: its subjects "
                    f"{topic!r}/{topic + '.>'!r} overlap an existing stream (a topic "
                    f"nested inside {topic!r}, e.g. {topic + '.dlq'!r}, was created first). "
                    "See docs/nats.md, 'Nested topics'."
                ) from exc
            if exc.err_code in (_ERR_NO_PEERS, _ERR_REPLICAS_UNCLUSTERED):
                s = opts.stream_for(topic)
                raise TopicConfigError(
                    f"cannot create stream {name!r} for topic {topic!r} with replicas="
                    f"{s.replicas}, placement={s.placement}: the server says "
                    f"{exc.description!r} (more replicas than servers that match?)"
                ) from exc
            if exc.err_code == _ERR_STREAM_NAME_IN_USE:  # a racing creator won
                info = await jsm.stream_info(name)
                return await self._check_existing(topic, name, info)
            raise map_api_error(exc, f"creating stream {name!r}") from exc
        except Exception as exc:
            raise map_api_error(exc, f"creating stream {name!r}") from exc
        logger.info("created stream %s for topic %s", name, topic)
        return TopicInfo(topic, name, nested=False, partitions=opts.groups.partitions)

    async def _outer_stream(self, topic: str) -> str | None:
        """The stream of an outer topic whose ``<outer>.>`` subject captures
        *topic*, or None."""
        try:
            found: str = await self.conn.jsm.find_stream_name_by_subject(topic)
        except nats.js.errors.NotFoundError:
            return None
        except Exception as exc:
            raise map_api_error(exc, f"looking up the stream of {topic!r}") from exc
        return found

    def _config(self, topic: str, name: str) -> Any:
        s = self.options.stream_for(topic)
        return api.StreamConfig(
            name=name,
            subjects=[topic, f"{topic}.>"],
            storage=api.StorageType(s.storage),
            retention=api.RetentionPolicy(s.retention),
            max_age=s.max_age or 0,
            max_bytes=s.max_bytes if s.max_bytes is not None else -1,
            max_msgs=s.max_msgs if s.max_msgs is not None else -1,
            num_replicas=s.replicas,
            placement=_placement(s),
            duplicate_window=duplicate_window(s),
            discard=api.DiscardPolicy(s.discard),
            metadata={PARTITIONS_METADATA: str(self.options.groups.partitions)},
        )

    async def _check_existing(self, topic: str, name: str, info: Any) -> TopicInfo:
        cfg = info.config
        subjects = set(cfg.subjects or ())
        if topic not in subjects and f"{topic}.>" not in subjects:
            raise TopicConfigError(
                f"stream {name!r} exists but does not store topic {topic!r} "
                f"(its subjects: {sorted(subjects)}); two topics map to one stream name "
                "when they differ only in '.' vs '_' - rename one or set stream_prefix"
            )
        diffs = self._differences(topic, cfg)
        if diffs:
            what = "; ".join(diffs)
            action = self.options.on_mismatch
            if self.options.topic_strategy == "create_or_update":
                wanted = self._config(topic, name)
                wanted.subjects = sorted(subjects | {topic, f"{topic}.>"})
                wanted.metadata = {**wanted.metadata, **(cfg.metadata or {})}  # keep N
                try:
                    await self.conn.jsm.update_stream(wanted)
                except Exception as exc:
                    message = f"stream {name!r}: {what}; update refused: {exc}"
                    mismatch(action, message, logger=logger, cause=exc)
                else:
                    logger.info("updated stream %s: %s", name, what)
            else:
                message = f"stream {name!r} differs from its options: {what}"
                mismatch(action, message, logger=logger)
        return TopicInfo(topic, name, nested=False, partitions=await self._partitions(cfg))

    async def _partitions(self, cfg: Any) -> int:
        """The stream's partition count; a stream without one (created
        before partitioned groups, or by a raw client) gets ours written to
        its metadata unless the strategy forbids changes."""
        found = partitions_from_metadata(cfg.metadata)
        if found is not None:
            return found
        wanted = self.options.groups.partitions
        if self.options.topic_strategy == "validate_only":
            return wanted
        cfg.metadata = {**(cfg.metadata or {}), PARTITIONS_METADATA: str(wanted)}
        try:
            info = await self.conn.jsm.update_stream(cfg)
        except Exception as exc:
            raise map_api_error(exc, f"setting the partitions of stream {cfg.name!r}") from exc
        # A racing bus may have written another count first: the server's wins.
        return partitions_from_metadata(info.config.metadata) or wanted

    def _differences(self, topic: str, cfg: Any) -> list[str]:
        s = self.options.stream_for(topic)

        def enum_value(value: Any) -> Any:
            return getattr(value, "value", value)

        def limit(value: Any) -> int:
            return -1 if value is None or value <= 0 else int(value)

        pairs: list[tuple[str, Any, Any]] = [
            ("storage", s.storage, enum_value(cfg.storage)),
            ("retention", s.retention, enum_value(cfg.retention)),
            ("discard", s.discard, enum_value(cfg.discard)),
            ("replicas", s.replicas, cfg.num_replicas or 1),
            ("max_bytes", limit(s.max_bytes), limit(cfg.max_bytes)),
            ("max_msgs", limit(s.max_msgs), limit(cfg.max_msgs)),
        ]
        if s.placement is not None:  # unset: whatever the server chose
            have = cfg.placement
            pairs.append(
                (
                    "placement",
                    (s.placement.cluster, sorted(s.placement.tags)),
                    (getattr(have, "cluster", None), sorted(getattr(have, "tags", None) or ())),
                )
            )
        out = [f"{n}: wanted {w!r}, server has {h!r}" for n, w, h in pairs if w != h]
        for label, wanted, have in (
            ("max_age", s.max_age or 0.0, cfg.max_age or 0.0),
            ("duplicate_window", duplicate_window(s), cfg.duplicate_window or 0.0),
        ):
            if abs(float(wanted) - float(have)) > 1e-3:
                out.append(f"{label}: wanted {wanted!r}s, server has {have!r}s")
        return out
