"""``bus.topics`` on NATS (asyncio side): streams configured, described and
listed at run time with the transport's strategy and mismatch policy
(:mod:`.streams` applies them; this module only feeds it other options)."""

from __future__ import annotations

from typing import Any

import attrs
import nats.js.errors

from ..._topics import StoredAs, TopicDescription, TopicRequest
from ...errors import ConfigError
from .connection import Connection
from .ephemeral import Modes, stored
from .options import StreamOptions, stream_name
from .streams import Streams, map_api_error

__all__ = ["TopicAdmin"]


class TopicAdmin:
    """Run-time topic administration of one NATS transport."""

    def __init__(self, conn: Connection, streams: Streams, modes: Modes) -> None:
        self.conn = conn
        self.streams = streams
        self.modes = modes

    async def configure(self, topic: str, request: TopicRequest) -> TopicDescription:
        """Apply *request* to *topic*'s stream and remember its options."""
        options = request.options
        if options is not None and not isinstance(options, StreamOptions):
            raise ConfigError(
                f"nats topic options must be a StreamOptions, not {type(options).__name__}"
            )
        current = self.conn.options
        kept = current
        if options is not None:
            kept = attrs.evolve(current, topics={**current.topics, topic: options})
        mode: StoredAs
        if request.persistence == "auto":
            mode = "persistent" if await stored(self.conn, topic) else "ephemeral"
        elif request.persistence is not None:
            mode = request.persistence
        else:
            mode = await self.modes.of(topic)
        if mode == "persistent":
            # This call's strategy and mismatch action, the topic's new options.
            once = Streams(self.conn)
            once.options = attrs.evolve(
                kept,
                topic_strategy=request.strategy or kept.topic_strategy,
                on_mismatch=request.on_mismatch or kept.on_mismatch,
            )
            await once.ensure(topic)
        # From now on the transport's own provisioning sees the new options.
        self.conn.options = kept
        self.streams.options = kept
        self.streams.forget(topic)
        self.modes.set(topic, mode)
        return await self.describe(topic)

    async def describe(self, topic: str) -> TopicDescription:
        """The stream that stores *topic* (its own or an outer one), if any."""
        mode = await self.modes.of(topic)
        jsm = self.conn.jsm
        name = stream_name(topic, self.conn.options.stream_prefix)
        try:
            info = await jsm.stream_info(name)
        except nats.js.errors.NotFoundError:
            info = None
        except Exception as exc:
            raise map_api_error(exc, f"describing topic {topic!r}") from exc
        if info is None and await stored(self.conn, topic):
            try:
                name = await jsm.find_stream_name_by_subject(topic)
                info = await jsm.stream_info(name)
            except Exception as exc:
                raise map_api_error(exc, f"describing topic {topic!r}") from exc
        if info is None:
            return TopicDescription(topic=topic, persistence=mode, exists=False)
        return TopicDescription(
            topic=topic,
            persistence=mode,
            exists=True,
            location=info.config.name,
            config=_plain(info.config.as_dict()),
            messages=info.state.messages,
        )

    async def list(self) -> list[str]:
        """Topics stored in streams named with this transport's prefix: the
        literal subjects of each stream (``orders`` of ``orders``/``orders.>``)."""
        prefix = self.conn.options.stream_prefix
        try:
            infos = await self.conn.jsm.streams_info()
        except Exception as exc:
            raise map_api_error(exc, "listing streams") from exc
        topics: list[str] = []
        for info in infos:
            if not info.config.name.startswith(prefix):
                continue
            subjects = info.config.subjects or ()
            topics.extend(s for s in subjects if "*" not in s and ">" not in s)
        return topics


def _plain(config: dict[str, Any]) -> dict[str, object]:
    # nats-py leaves enums in as_dict(); report their wire values.
    return {k: getattr(v, "value", v) for k, v in config.items()}
