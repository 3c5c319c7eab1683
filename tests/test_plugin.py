"""The user-facing pytest plugin (:mod:`trio_bus.testing.plugin`): its
fixtures here, its skip messages in a pytest subprocess, and the built wheel
in a fresh virtualenv running a user's test file against real servers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from trio_bus.testing import KAFKA_URL_PARAMS, NatsServer, TansuBroker

USER_TESTS = Path(__file__).parent.parent / "examples" / "e08_test_with_plugin.py"

_memory_urls: list[str] = []


@pytest.mark.parametrize("run", [1, 2])
def test_memory_url_is_fresh_for_each_test(trio_bus_memory_url: str, run: int) -> None:
    assert trio_bus_memory_url.startswith("memory://")
    assert trio_bus_memory_url not in _memory_urls
    _memory_urls.append(trio_bus_memory_url)


def test_server_urls_point_at_the_session_servers(
    trio_bus_nats_url: str,
    trio_bus_nats_server: NatsServer,
    trio_bus_kafka_url: str,
    trio_bus_kafka_broker: TansuBroker,
) -> None:
    assert trio_bus_nats_url == f"nats://127.0.0.1:{trio_bus_nats_server.port}"
    assert trio_bus_nats_server.running
    assert trio_bus_kafka_url == f"kafka://{trio_bus_kafka_broker.bootstrap}?{KAFKA_URL_PARAMS}"


# A conftest that makes the session look as if an extra were not installed:
# find_spec() answers None for a module whose sys.modules entry is None.
HIDE_AIOKAFKA = "import sys\nsys.modules['aiokafka'] = None\n"
HIDE_NATS_SERVER = """
import trio_bus.testing.plugin as plugin

def missing() -> str:
    raise RuntimeError("not installed")

plugin.find_nats_server = missing
"""
NEEDS_BROKERS = """
def test_kafka(trio_bus_kafka_url): pass
def test_nats(trio_bus_nats_url): pass
"""


@pytest.mark.parametrize(
    ("conftest", "reason"),
    [
        (HIDE_AIOKAFKA, 'aiokafka is not installed: pip install "trio-bus[kafka]"'),
        (HIDE_NATS_SERVER, 'nats-server is not installed: pip install "trio-bus[test]"'),
    ],
)
def test_missing_extra_skips_naming_it(
    pytester: pytest.Pytester, conftest: str, reason: str
) -> None:
    pytester.makeconftest(conftest)
    pytester.makepyfile(NEEDS_BROKERS)
    skipped = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider")
    skipped.assert_outcomes(passed=1, skipped=1)
    assert f": {reason}" in skipped.stdout.str()  # in the SKIPPED summary line

    failed = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--trio-bus-require-servers")
    failed.assert_outcomes(passed=1, errors=1)
    assert reason in failed.stdout.str()


def test_wheel_in_a_fresh_virtualenv(installed_wheel: Path, tmp_path: Path) -> None:
    """What a user gets from ``pip install trio-bus[test,nats,kafka]``: the
    entry point loads the plugin and its fixtures start real servers."""
    done = subprocess.run(
        [
            installed_wheel / "python",
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--trio-bus-require-servers",
            USER_TESTS,
        ],
        cwd=tmp_path,  # no project configuration, as in a user's repository
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
