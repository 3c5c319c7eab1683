"""The demo and the examples keep working."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from trio_bus.__main__ import main
from trio_bus.demo import run

EXAMPLES = Path(__file__).parent.parent / "examples"


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


def test_example_publish_subscribe(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "e01_publish_subscribe.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    # Per account, in publish order; accounts interleave freely.
    assert [line for line in lines if line.startswith("acc-1")] == [
        "acc-1: deposit 10",
        "acc-1: deposit -3",
    ]
    assert [line for line in lines if line.startswith("acc-2")] == [
        "acc-2: deposit 5",
        "acc-2: deposit 7",
    ]
