"""The demo keeps working (the examples: test_examples.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trio_bus.__main__ import main
from trio_bus.demo import run


async def test_demo_shows_order_retry_and_dead_letter(capsys: pytest.CaptureFixture[str]) -> None:
    await run(orders=4, throughput_messages=200)
    out = capsys.readouterr().out
    assert (
        "order-00: OrderCreated -> ItemAdded -> ItemAdded -> PaymentCaptured -> OrderShipped" in out
    )
    assert "order-03: OrderCreated -> ItemAdded -> ItemAdded -> OrderShipped" in out
    assert "dead-lettered: 1" in out
    assert "after 3 attempts: RuntimeError" in out
    assert "msg/s end to end" in out


def test_cli_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--orders", "4", "--messages", "0"]) == 0
    assert "shipped after its payment was parked: True" in capsys.readouterr().out


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "trio_bus", "demo", "--orders", "2", "--messages", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "order-01: OrderCreated" in out
