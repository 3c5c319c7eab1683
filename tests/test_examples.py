"""Every example runs, as a user would run it: a subprocess with a bounded
timeout, against real servers (URL as argument) where it needs one."""

from __future__ import annotations

import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio

EXAMPLES = Path(__file__).parent.parent / "examples"
#: Bound on one example run (real brokers on a shared 2-core machine).
TIMEOUT = 90


def run_example(name: str, *args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_every_example_has_a_test() -> None:
    source = Path(__file__).read_text()
    for example in sorted(EXAMPLES.glob("e[0-9][0-9]_*.py")):
        assert f'"{example.name}"' in source, f"{example.name} is not run by a test"


def test_e01_publish_subscribe() -> None:
    lines = run_example("e01_publish_subscribe.py").splitlines()
    # Per account, in publish order; accounts interleave freely.
    assert [line for line in lines if line.startswith("acc-1")] == [
        "acc-1: deposit 10",
        "acc-1: deposit -3",
    ]
    assert [line for line in lines if line.startswith("acc-2")] == [
        "acc-2: deposit 5",
        "acc-2: deposit 7",
    ]


def test_e02_orders_demo() -> None:
    out = run_example("e02_orders_demo.py")
    assert "dead-lettered: 1" in out
    assert "msg/s end to end" in out


def test_e03_kafka(kafka_bus_url: str) -> None:
    lines = run_example("e03_kafka.py", kafka_bus_url).splitlines()
    assert [line for line in lines if line.startswith("order-1")] == [
        "order-1: OrderPlaced",
        "order-1: OrderPaid",
    ]
    assert "order-2: OrderPlaced" in lines


def test_e04_nats(nats_bus_url: str) -> None:
    out = run_example("e04_nats.py", nats_bus_url)
    assert "payment-7: capture 12.50 EUR (attempt 2)" in out
    assert "attempts: [1, 2]" in out


def test_e05_publish_results() -> None:
    lines = run_example("e05_publish_results.py").splitlines()
    assert len(lines) == 3
    assert all(line.endswith(": success") for line in lines)


def test_e06_metrics_endpoint() -> None:
    out = run_example("e06_metrics_endpoint.py")
    assert "metrics on http://127.0.0.1:" in out
    assert 'memory_eventbus_billing_messages_published_total{topic="invoices"} 5.0' in out
    assert 'memory_eventbus_billing_messages_handled_total{topic="invoices"}' in out


def test_e07_typed_payloads() -> None:
    out = run_example("e07_typed_payloads.py")
    assert "ship order-1: book, pen (1250 cents)" in out
    assert "rejected order-2: Expected `int`, got `str` - at `$.total_cents`" in out


def test_e08_test_with_plugin(tmp_path: Path) -> None:
    # A pytest run of its own, from a directory without this project's
    # configuration, with the servers the plugin starts.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--trio-bus-require-servers",
            str(EXAMPLES / "e08_test_with_plugin.py"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


async def test_e09_graceful_shutdown_on_sigterm() -> None:
    # Jobs take 5 s, so SIGTERM surely lands while they are in flight.
    command = [sys.executable, str(EXAMPLES / "e09_graceful_shutdown.py"), "memory://", "5"]
    output = b""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            run = partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
            proc: trio.Process = await nursery.start(run)
            assert proc.stdout is not None
            while b"running as pid" not in output or b"started" not in output:
                chunk = await proc.stdout.receive_some()
                assert chunk, output
                output += chunk
            proc.send_signal(signal.SIGTERM)
            while chunk := await proc.stdout.receive_some():
                output += chunk
    assert proc.returncode == 0, output
    lines = output.decode().splitlines()
    assert lines[-1] == "stopped cleanly"
    started = {line.split()[1] for line in lines if line.startswith("started ")}
    finished_after_signal = {
        line.split()[1]
        for line in lines[lines.index("SIGTERM: finishing in-flight jobs") :]
        if line.startswith("finished ")
    }
    assert started
    assert finished_after_signal == started


def test_readme_usage_runs(tmp_path: Path) -> None:
    # The first Python block of the README is a complete program.
    readme = (EXAMPLES.parent / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "usage.py").write_text(code)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "usage.py")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "order-42 OrderPlaced {'total': 5}\n"
