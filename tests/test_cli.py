"""The ``trio-bus`` command: help written for people, ``--version``, and
``bench`` from a checkout or, installed from a wheel, a clear refusal."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from importlib import metadata
from pathlib import Path

import pytest
import trio

import trio_bus
from trio_bus.__main__ import main


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    code = exit_info.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().out


def test_help_describes_the_tool_and_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_main(capsys, "--help")
    assert code == 0
    assert "The ``trio-bus`` command" not in out  # the module docstring
    assert "event bus for domain events on Kafka, NATS JetStream or in" in out
    for command, summary in [
        ("demo", "run the orders demo"),
        ("check", "round-trip a probe message"),
        ("bench", "benchmark trio_bus"),
        ("topics", "list the topics a broker stores"),
    ]:
        assert f"    {command}  " in out
        assert summary in out
    assert 'Run "trio-bus COMMAND --help"' in out


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("demo", ["--orders N", "number of orders (default: 8)", "0 skips it"]),
        ("check", ["kafka://HOST:PORT", "--timeout SECONDS", "exit status:", "2  could not"]),
        ("topics", ["[topic]", "describe this topic", "as JSON", "--tls-ca"]),
    ],
)
def test_each_command_has_its_own_help(
    capsys: pytest.CaptureFixture[str], command: str, expected: list[str]
) -> None:
    code, out = run_main(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: trio-bus {command} ")
    for text in expected:
        assert text in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "--version") == (0, f"trio-bus {metadata.version('trio-bus')}\n")


def test_bench_help_works_from_any_directory(tmp_path: Path) -> None:
    # The suite is found beside the sources of this (editable) install, not
    # in the current directory.
    done = subprocess.run(
        [sys.executable, "-m", "trio_bus", "bench", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Usage: trio-bus bench [OPTIONS]" in done.stdout
    assert "--start-brokers" in done.stdout


def test_bench_bad_option_is_a_usage_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert "No such option" in err
    assert "Traceback" not in err


def test_installed_bench_says_it_needs_a_source_checkout(
    installed_wheel: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [installed_wheel / "trio-bus", "bench", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "benchmarks/ directory of a" in done.stderr
    assert "source checkout" in done.stderr
    assert 'pip install -e ".[bench]"' in done.stderr


def test_topics_lists_and_describes(
    capsys: pytest.CaptureFixture[str], trio_bus_nats_url: str
) -> None:
    topic = f"cli-{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        async with trio_bus.open_bus(trio_bus_nats_url, monitoring=None) as bus:
            await bus.topics.configure(topic)

    trio.run(create)
    assert main(["topics", trio_bus_nats_url]) == 0
    assert topic in capsys.readouterr().out.split()
    assert main(["topics", trio_bus_nats_url, topic]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["topic"] == topic
    assert description["exists"] is True
    assert description["location"] == topic
    assert main(["topics", "nats://127.0.0.1:1", topic, "--timeout", "3"]) == 2
    assert "trio-bus topics nats://127.0.0.1:1" in capsys.readouterr().out
