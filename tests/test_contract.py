"""The transport contract (:mod:`trio_bus.testing.contract`) on every
built-in transport, against real servers (one per session; each test uses
its own topics and groups).

Rules a transport breaks today are listed in ``KNOWN_DEFECTS``: those tests
are strict xfails, so a fix shows up as an unexpected pass.
"""

from __future__ import annotations

import pytest

from trio_bus.testing.contract import (
    Capabilities,
    ContractTarget,
    TransportContract,
    contract_settings,
)
from trio_bus.transports import resolve

from .conftest import TRANSPORTS

CAPABILITIES = {
    "memory": Capabilities(),
    "nats": Capabilities(partitions=True),
    "kafka": Capabilities(per_message_ack=False, delivery_count=False, partitions=True),
}

KNOWN_DEFECTS: dict[str, dict[str, str]] = {
    "memory": {},
    "nats": {
        "test_r07_released_comes_before_newer": (
            "nats: release NAKs the record and everything still queued in the "
            "hand-off (in order), but a message published after the release can be "
            "delivered by the outstanding pull before the server has processed the "
            "NAK: it overtakes the released one. (The bus releases only when a "
            "subscription closes, so no handler of that bus runs after it.)"
        ),
    },
    "kafka": {
        "test_r10_cancelled_open_consumer_leaves_nothing": (
            "kafka: an open_consumer cancelled while its JoinGroup is in flight leaves "
            "the broker a member that never completed its join; aiokafka leaves a "
            "group only after a completed join of generation > 0 (Tansu counts from "
            "0), so that ghost is assigned partitions nobody fetches until its session "
            "expires. (Sending LeaveGroup for it was tried: Tansu then never completed "
            "the next member's join.)"
        ),
    },
}

#: Known defects whose test is not run: it passes or fails by timing
#: (whether a cancellation lands while a JoinGroup is in flight), which a
#: strict xfail cannot express.
NOT_RUN = {"kafka": {"test_r10_cancelled_open_consumer_leaves_nothing"}}


class TestContract(TransportContract):
    @pytest.fixture(params=TRANSPORTS)
    def contract_target(self, request: pytest.FixtureRequest) -> ContractTarget:
        name: str = request.param
        url: str = request.getfixturevalue(f"{name}_bus_url")
        return ContractTarget.from_url(
            url,
            capabilities=CAPABILITIES[name],
            known_defects=KNOWN_DEFECTS[name],
            not_run=NOT_RUN.get(name, ()),
        )


def test_known_defects_must_name_contract_tests() -> None:
    settings = contract_settings("memory://x")
    with pytest.raises(ValueError, match="test_r99_nope"):
        ContractTarget(
            open_transport=resolve("memory"),
            settings=settings,
            known_defects={"test_r99_nope": "typo"},
        )


def test_contract_settings_parse_hosts() -> None:
    settings = contract_settings("kafka://h1:9092,h2:9093?linger_ms=0")
    assert settings.hosts == ("h1:9092", "h2:9093")
    assert settings.url.endswith("?linger_ms=0")
    assert contract_settings("memory://").hosts == ()
