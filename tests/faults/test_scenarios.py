"""Fault scenarios on real brokers and separate processes (``nox -s faults``;
``FAULTS_QUICK=1`` for a short local run). Each ends in the checker; a
scenario fails when any property it enforces fails (docs/reliability.md)."""

from __future__ import annotations

import random
import signal

import pytest

from .checker import CheckParams, Report
from .harness import Harness, scale

pytestmark = pytest.mark.faults

#: Shutdown grace the consumers run with; the documented bound is grace + 4 s.
GRACE = 5.0
PARAMS = CheckParams(shutdown_bound_s=GRACE + 4)


def assert_holds(report: Report) -> None:
    assert report.ok, f"{report.summary()}\n{dict(report.violations)}"


async def test_baseline_no_faults(harness: Harness) -> None:
    """No fault: every property holds, duplicates included; SIGTERM at the
    end of a trapping consumer exits 0 within the bound."""
    n = scale(4000, 800)
    await harness.sampler()
    consumer = await harness.consumer("c1", "--trap-sigterm", "--shutdown-grace", str(GRACE))
    await harness.wait_exit(await harness.publisher("p1", n, "--aggregates", "40"))
    await harness.settle(n)
    await harness.signal(consumer, signal.SIGTERM)
    report = await harness.finish(
        "baseline", CheckParams(expect_no_duplicates=True, shutdown_bound_s=GRACE + 4)
    )
    assert_holds(report)


async def test_consumer_sigkill_and_restart(harness: Harness) -> None:
    """SIGKILL a consumer mid-stream, restart it: nothing lost, order kept,
    nothing acked before its handler finished."""
    n = scale(4000, 800)
    await harness.sampler()
    await harness.consumer("c1", "--work-ms", "2")
    publisher = await harness.publisher("p1", n, "--aggregates", "40", "--interval-ms", "5")
    for round_ in range(scale(3, 1)):
        await harness.count("start", (round_ + 1) * n // 5)
        victim = next(w for w in harness.workers if w.proc == f"c{round_ + 1}")
        victim.process.kill()
        await victim.exited.wait()
        await harness.consumer(f"c{round_ + 2}", "--work-ms", "2")
    await harness.wait_exit(publisher, timeout=120)
    await harness.settle(n, timeout=120)
    assert_holds(await harness.finish("consumer SIGKILL+restart", PARAMS))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_signal_at_random_moments(harness: Harness, sig: signal.Signals) -> None:
    """SIGINT (untrapped: KeyboardInterrupt) or SIGTERM (trapped, leave
    open_bus normally) at a random moment of a consumer under load, many
    times: each exit within grace + 4 s with the documented status, and the
    checker's properties over the whole run."""
    tries = scale(30, 5) if sig == signal.SIGINT else scale(10, 3)
    rng = random.Random(int(sig))
    n = tries * 200
    trap = ["--trap-sigterm"] if sig == signal.SIGTERM else []
    args = [*trap, "--work-ms", "3", "--shutdown-grace", str(GRACE)]
    await harness.sampler()
    publisher = await harness.publisher("p1", n, "--aggregates", "20", "--interval-ms", "10")
    for i in range(tries):
        worker = await harness.consumer(f"c{i}", *args)
        await harness.count("start", rng.randint(1, 150), proc=f"c{i}", timeout=60)
        await harness.signal(worker, sig, timeout=GRACE + 20)
    await harness.consumer("final", *args)
    await harness.wait_exit(publisher, timeout=180)
    await harness.settle(n, timeout=120)
    assert_holds(await harness.finish(f"{sig.name} at random moments", PARAMS))
