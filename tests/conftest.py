"""Shared fixtures. Every semantic test takes ``bus_url`` and so runs on
every transport listed in ``TRANSPORTS``; each transport provides a fixture
``<name>_bus_url`` returning a URL to a live broker (real servers for Kafka
and NATS, started from PyPI wheels on free loopback ports by the project's
own pytest plugin, :mod:`trio_bus.testing.plugin`)."""

from __future__ import annotations

import gc
import importlib.metadata
import subprocess
import sys
import uuid
import venv
from pathlib import Path

import pytest

# The plugin normally loads through its pytest11 entry point; an editable
# install made before the entry point existed lacks it, so load it here then.
_PLUGIN_BY_ENTRY_POINT = any(
    ep.name == "trio_bus" for ep in importlib.metadata.entry_points(group="pytest11")
)
pytest_plugins: list[str] = [
    *([] if _PLUGIN_BY_ENTRY_POINT else ["trio_bus.testing.plugin"]),
    "pytester",
    "tests._kafka_broker",
    "tests._nats_cluster",
    "tests._nats_server",
]

#: Transports the semantic suite runs on.
TRANSPORTS = ["memory", "nats", "kafka"]


def pytest_configure(config: pytest.Config) -> None:
    # The brokers come from the [test] extra and are part of the default
    # suite: a missing one is an error here, not a skip.
    config.option.trio_bus_require_servers = True


@pytest.fixture
def memory_bus_url(trio_bus_memory_url: str) -> str:
    """A fresh named memory broker per test: no state leaks between tests."""
    return trio_bus_memory_url


@pytest.fixture(params=TRANSPORTS)
def bus_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_bus_url")
    return url


@pytest.fixture
def topic() -> str:
    """A topic name no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"


#: The repository's top directory.
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel built from this checkout installed
    with ``[test,nats,kafka]``, as a user gets it; returns its ``bin/``.

    Dependencies come from the index pip is configured with, trio-bus only
    from the wheel just built.
    """
    tmp = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", tmp / "dist", ROOT], check=True)
    (wheel,) = (tmp / "dist").glob("trio_bus-*.whl")
    venv.create(tmp / "venv", with_pip=True)
    bin_dir = tmp / "venv" / "bin"
    subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "-q", f"{wheel}[test,nats,kafka]"],
        check=True,
        timeout=600,
    )
    return bin_dir


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Collect garbage once the test's fixtures are torn down.

    pytest turns unraisable exceptions (an unclosed socket, a task never
    awaited) into errors of the phase in which they surface; with CPython
    collecting cycles at random, that is whichever later test happens to
    trigger a collection. Collecting here, just before pytest's own check
    (also ``trylast``, registered earlier, so called after this one), blames
    the test that leaked."""
    gc.collect()
