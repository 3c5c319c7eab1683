"""The benchmark suite's own tests: the workload generator, the order and
duplicate counters, the percentile maths, the report, and a smoke run of
every scenario at tiny size on every transport, so the suite cannot rot.

The smoke runs are small on purpose (tens of messages): they prove the
code paths, not the speed.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import attrs
import pytest
import trio
from benchmarks import orchestrate, report, run_raw, run_trio_bus
from benchmarks._proto import RunSpec, normalise_address
from benchmarks.metrics import OrderChecker, Recorder, RunResult, median_result, percentile
from benchmarks.workloads import FAMILIES, SCENARIOS, Workload, by_name

#: Messages per smoke run.
TINY = 24
#: Bound of one smoke test (real brokers on a shared 2-core machine).
SMOKE_TIMEOUT = 90


# ----------------------------------------------------------------- workloads


def test_workload_plan_is_round_robin_over_keys_and_topics() -> None:
    wl = Workload(name="w", family="seed", messages=10, keys=3, topics=2)
    assert [wl.key(i) for i in range(6)] == ["agg-0", "agg-1", "agg-2"] * 2
    assert [wl.seq(i) for i in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [wl.topic_index(i) for i in range(4)] == [0, 1, 0, 1]
    assert wl.payload() == b"x" * 1024


def test_each_key_stays_in_one_topic_in_topic_scaling() -> None:
    # Per-key order is only defined within one topic.
    for topics in (1, 10, 100):
        wl = SCENARIOS[f"topics-{topics}"]
        seen: dict[str, int] = {}
        for i in range(1000):
            assert seen.setdefault(wl.key(i), wl.topic_index(i)) == wl.topic_index(i)


def test_random_work_is_seeded_and_bounded() -> None:
    wl = SCENARIOS["pc-100"]
    times = [wl.work_seconds(i) for i in range(wl.messages)]
    assert times == [wl.work_seconds(i) for i in range(wl.messages)]
    assert all(0 <= t <= 0.005 for t in times)
    # Uniform 0-5 ms: the mean is near 2.5 ms.
    assert 0.0024 < sum(times) / len(times) < 0.0026
    assert SCENARIOS["bulk-1ms"].work_seconds(7) == 0.001
    assert SCENARIOS["bulk-noop"].work_seconds(7) == 0.0


def test_scenarios_match_the_issue() -> None:
    assert [SCENARIOS[f"seed-{n}"].messages for n in (300, 800, 1500, 3000)] == [
        300,
        800,
        1500,
        3000,
    ]
    assert SCENARIOS["bulk-noop"].messages == 100_000
    assert SCENARIOS["bulk-noop"].keys == 100
    assert SCENARIOS["bulk-noop"].partitions == 8
    assert [SCENARIOS[f"pc-{k}"].keys for k in (1, 10, 100, 10_000)] == [1, 10, 100, 10_000]
    assert all(SCENARIOS[f"pc-{k}"].preload for k in (1, 10, 100, 10_000))
    totals = {SCENARIOS[f"topics-{t}"].messages for t in (1, 10, 100)}
    assert totals == {10_000}  # same total load


def test_by_name_accepts_names_families_and_all() -> None:
    assert [w.name for w in by_name("seed-300,pc")] == [
        "seed-300",
        "pc-1",
        "pc-10",
        "pc-100",
        "pc-10000",
    ]
    assert len(by_name("all")) == len(SCENARIOS)
    assert {w.family for w in by_name("all")} == set(FAMILIES)
    assert [w.name for w in by_name("seed-300,seed")][:2] == ["seed-300", "seed-800"]
    with pytest.raises(ValueError, match="unknown scenario"):
        by_name("nope")


def test_spec_round_trips_through_json() -> None:
    spec = RunSpec(
        system="raw",
        transport="kafka",
        address="127.0.0.1:9",
        workload=SCENARIOS["pc-10"],
        run_id="abc",
    )
    again = RunSpec.from_json(spec.to_json())
    assert again == spec
    assert again.topics == ["bench-abc-0"]
    assert again.kafka_setting("session_timeout_ms") > 0
    assert normalise_address("kafka://127.0.0.1:9?x=1") == "127.0.0.1:9"
    assert normalise_address("127.0.0.1:9") == "127.0.0.1:9"


# ------------------------------------------------------------------- metrics


def test_percentile_interpolates_linearly() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([10.0], 99) == 10.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_order_checker_counts_violations_and_duplicates() -> None:
    checker = OrderChecker()
    for index, (key, seq) in enumerate([("a", 0), ("b", 0), ("a", 1), ("b", 1)]):
        assert checker.start(key, seq, index)
        checker.finish(key)
    assert (checker.violations, checker.duplicates, checker.distinct) == (0, 0, 4)

    # A redelivery of an older message is a duplicate, not a violation.
    assert not checker.start("a", 0, 0)
    checker.finish("a")
    assert (checker.violations, checker.duplicates) == (0, 1)

    # A first delivery behind a later one of its key is a violation.
    assert checker.start("c", 1, 11)
    checker.finish("c")
    assert checker.start("c", 0, 10)
    checker.finish("c")
    assert checker.violations == 1


def test_order_checker_counts_two_handlers_of_one_key_at_once() -> None:
    checker = OrderChecker()
    checker.start("a", 0, 0)
    checker.start("a", 1, 1)  # still running the first one
    assert checker.violations == 1
    checker.finish("a")
    checker.finish("a")
    checker.start("a", 2, 2)
    assert checker.violations == 1


def test_recorder_measures_latency_and_calls_done_once() -> None:
    wl = Workload(name="w", family="seed", messages=2, keys=1)
    done: list[bool] = []
    rec = Recorder(wl, on_done=lambda: done.append(True))
    key, work = rec.started({"bench-ts": "0", "bench-idx": "0"}, "agg-0")
    assert (key, work) == ("agg-0", 0.0)
    rec.finished(key)
    assert not done
    key, _ = rec.started({"bench-ts": "1", "bench-idx": "1"}, "agg-0")
    rec.finished(key)
    rec.finished(rec.started({"bench-ts": "1", "bench-idx": "1"}, "agg-0")[0])  # duplicate
    rec.started({}, None)  # not a benchmark message
    assert done == [True]
    figures = rec.figures(peak_tasks=3, crossings=None)
    assert figures.handled == 2
    assert figures.duplicates == 1
    assert figures.unknown == 1
    assert figures.order_violations == 0
    assert figures.first_ms > 0
    assert figures.peak_rss_mb > 1


def _result(rate: float, violations: int = 0, ratio: float = 1.0) -> RunResult:
    return RunResult(
        system="trio_bus",
        transport="memory",
        scenario="seed-300",
        messages=300,
        publish_rate=rate,
        e2e_rate=rate,
        p50_ms=1.0,
        p95_ms=2.0,
        p99_ms=3.0,
        first_ms=4.0,
        success_ratio=ratio,
        order_violations=violations,
        duplicates=0,
        peak_rss_mb=40.0,
        peak_tasks=260,
        crossings_per_msg=None,
        elapsed_s=0.1,
        first_ack_ms=2.0,
        cpu_us_per_msg=5.0,
    )


def test_median_takes_the_median_of_speed_and_the_worst_of_correctness() -> None:
    combined = median_result(
        [_result(100.0), _result(300.0, violations=2), _result(200.0, ratio=0.5)]
    )
    assert combined.e2e_rate == 200.0
    assert combined.order_violations == 2
    assert combined.success_ratio == 0.5
    assert combined.runs == 3


def test_compare_gives_cpu_rate_and_latency_ratios_to_the_baseline() -> None:
    mine = attrs.evolve(_result(100.0), cpu_us_per_msg=30.0, p50_ms=20.0)
    base = attrs.evolve(
        _result(50.0), system="trio-channels-nowait", cpu_us_per_msg=10.0, p50_ms=10.0
    )
    text = report.compare(report.medians([mine, base]))
    assert "| memory | seed-300 | trio_bus | 100 | 20.0 | 30.0 | 2.00 | 2.00 | 3.00 |" in text
    assert "| memory | seed-300 | trio-channels-nowait | 50 | 10.0 | 10.0 | - | - | - |" in text


def test_recorder_counts_cpu_from_going_live_only() -> None:
    wl = Workload(name="w", family="seed", messages=2, keys=1, topics=1)
    recorder = Recorder(wl)
    sum(range(2_000_000))  # setup: not counted
    recorder.mark_live()
    for i in range(2):
        key, _ = recorder.started({"bench-ts": "0", "bench-idx": str(i)}, None)
        recorder.finished(key)
    figures = recorder.figures(peak_tasks=1, crossings=None)
    assert recorder.cpu_live is not None
    assert recorder.cpu_end is not None
    assert 0 <= figures.cpu_us_per_msg < 10_000


def test_report_writes_json_markdown_and_png(tmp_path: Path) -> None:
    runs = [_result(100.0), attrs.evolve(_result(50.0), system="trio-channels")]
    meta = {"repeat": 1, "command": "x"}
    report.save_json(tmp_path / "r.json", runs, meta)
    loaded, meta_again = report.load_json(tmp_path / "r.json")
    assert loaded == runs
    assert meta_again == meta
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["ratios"][0]["e2e_rate"] == 2.0
    text = report.markdown(report.medians(runs), meta)
    assert "| memory | seed-300 | trio_bus |" in text
    assert "| memory | seed-300 | trio_bus | trio-channels | 2.00 | 2.00 |" in text
    report.plot(report.medians(runs), tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


# -------------------------------------------------------------- smoke runs


def _spec(system: str, transport: str, address: str, workload: Workload) -> RunSpec:
    return RunSpec(
        system=system,
        transport=transport,
        address=address,
        workload=workload.scaled(TINY),
        run_id=uuid.uuid4().hex[:10],
    )


def _check(handled: int, violations: int, expected: int = TINY) -> None:
    assert handled == expected
    assert violations == 0


async def _smoke_trio_bus_every_scenario(transport: str, address: str) -> None:
    # All scenarios at once on one broker: each run has its own bus, topics
    # and group, and publishes from its own bus (no producer process).
    async def one(workload: Workload) -> None:
        if transport != "memory":
            # The smoke proves each scenario's path, not its scale: on a
            # broker, topics-100 is 100 subscriptions (800 partition durables
            # on NATS) at once with the other runs, which took over the
            # timeout on a slow CI machine. Two topics prove the multi-topic
            # path; the scale runs in the benchmarks and group tests.
            workload = attrs.evolve(workload, topics=min(workload.topics, 2))
        outcome = await run_trio_bus.run_consumer(
            _spec("trio_bus", transport, address, workload), produce_here=True
        )
        _check(outcome.consumer.handled, outcome.consumer.order_violations)
        assert outcome.producer is not None
        assert outcome.producer.published == TINY

    with trio.fail_after(SMOKE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            for workload in SCENARIOS.values():
                nursery.start_soon(one, workload)


async def test_smoke_memory_every_scenario() -> None:
    await _smoke_trio_bus_every_scenario("memory", "")
    with trio.fail_after(SMOKE_TIMEOUT):
        for workload in SCENARIOS.values():
            for nowait in (False, True):
                consumer, producer = await run_raw.run_trio_channels(
                    _spec("trio-channels", "memory", "", workload), nowait=nowait
                )
                _check(consumer.handled, consumer.order_violations)
                assert producer.published == TINY


async def test_smoke_memory_through_worker_processes(tmp_path: Path) -> None:
    # The orchestrator path: one fresh process per run, the line protocol.
    with trio.fail_after(SMOKE_TIMEOUT):
        result = await trio.to_thread.run_sync(
            lambda: orchestrate.run_one(
                "trio_bus",
                "memory",
                "",
                SCENARIOS["pc-10"].scaled(TINY),
                log_dir=tmp_path,
            )
        )
    assert result.error is None
    assert result.success_ratio == 1.0
    assert result.order_violations == 0
    assert result.peak_tasks >= 256


async def _smoke_baselines(transport: str, address: str, log_dir: Path) -> None:
    # One tiny run per baseline, in worker processes, all at once.
    results: dict[str, RunResult] = {}

    async def one(system: str) -> None:
        results[system] = await trio.to_thread.run_sync(
            lambda: orchestrate.run_one(
                system,
                transport,
                address,
                SCENARIOS["seed-300"].scaled(TINY),
                log_dir=log_dir,
            )
        )

    with trio.fail_after(SMOKE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            # trio_bus too: every consumer is fed by the same (raw) producer.
            for system in ("trio_bus", "raw", "faststream", "faststream-concurrent"):
                nursery.start_soon(one, system)
    for system, result in results.items():
        assert result.error is None, (system, result.error)
        assert result.success_ratio == 1.0, system
        assert result.cpu_us_per_msg > 0, system
    assert results["raw"].order_violations == 0
    assert results["trio_bus"].order_violations == 0


async def test_smoke_nats_every_scenario(nats_bus_url: str, tmp_path: Path) -> None:
    address = normalise_address(nats_bus_url)
    await _smoke_trio_bus_every_scenario("nats", address)
    await _smoke_baselines("nats", address, tmp_path)


async def test_smoke_kafka_every_scenario(kafka_bus_url: str, tmp_path: Path) -> None:
    address = normalise_address(kafka_bus_url)
    await _smoke_trio_bus_every_scenario("kafka", address)
    await _smoke_baselines("kafka", address, tmp_path)
