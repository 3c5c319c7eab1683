"""``trio-bus topics URL [TOPIC]``: list the topics a broker stores, or
describe one (as JSON), through ``bus.topics``."""

from __future__ import annotations

import json
from collections.abc import Sequence

import attrs
import trio

TOPICS_HELP = "list the topics a broker stores, or describe one as JSON"
TOPICS_DESCRIPTION = """\
Opens a bus on URL and prints the topics the broker stores, one per line,
or, given TOPIC, the broker's description of it as JSON: persistence mode,
whether and where it is stored, its real configuration. Nothing is created
or changed."""
TOPICS_EPILOG = """\
exit status:
  0  listed or described
  2  could not connect (or the URL is invalid), or the broker refused

examples:
  trio-bus topics nats://127.0.0.1:4222
  trio-bus topics kafka://127.0.0.1:9092 orders"""


async def run_topics(
    url: str,
    topic: str | None,
    seconds: float,
    options: object | None = None,
    secrets: Sequence[str] = (),
) -> int:
    """Print the list or the description; return the exit status. Error
    texts are redacted like ``trio-bus check``'s."""
    from . import open_bus
    from ._secrets import redact_text, redact_url
    from .errors import BusError

    try:
        with trio.fail_after(seconds):
            async with open_bus(
                url, client_id="trio-bus-topics", monitoring=None, transport_options=options
            ) as bus:
                if topic is None:
                    for name in await bus.topics.list():
                        print(name)
                else:
                    description = await bus.topics.describe(topic)
                    print(json.dumps(attrs.asdict(description), indent=2, default=str))
                return 0
    except (BusError, OSError, trio.TooSlowError) as exc:
        detail = redact_text(f"{type(exc).__name__}: {exc}", secrets)
        print(f"trio-bus topics {redact_url(url)}: {detail}")
        return 2
