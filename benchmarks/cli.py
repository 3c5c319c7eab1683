"""Run the benchmark suite and write JSON, Markdown and a PNG plot.

Examples::

    python -m benchmarks --transport all --scenario all --repeat 3 --start-brokers --out out/
    python -m benchmarks --transport kafka --kafka-url 127.0.0.1:9092 --scenario seed
    python -m benchmarks --render-only --merge out/a/results.json --merge out/b/results.json
    python -m benchmarks --transport kafka --scenario bulk --messages 20000 --start-brokers \
        --compare --base-src /path/to/main/src    # before/after, ratios to raw

Each (scenario, repeat) runs every system back to back, so slow drifts of a
shared machine hit all systems alike. Results are written after every run,
so an interrupted suite keeps what it measured.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from . import report
from ._brokers import Broker, start_kafka, start_nats
from ._proto import normalise_address
from .metrics import RunResult
from .orchestrate import BASE_SRC_ENV, plan, run_one, workload_for
from .workloads import FAMILIES, by_name

__all__ = ["main"]

_PACKAGES = ("trio", "trio-asyncio", "aiokafka", "nats-py", "faststream", "trio-bus")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _machine() -> str:
    return (
        f"{os.cpu_count()} cores ({platform.machine()}), {platform.system()} "
        f"{platform.release()}, load average at start {os.getloadavg()[0]:.2f}"
    )


def write_outputs(out: Path, runs: Sequence[RunResult], meta: dict[str, Any]) -> None:
    """results.json, results.md, results.png in *out*."""
    out.mkdir(parents=True, exist_ok=True)
    report.save_json(out / "results.json", runs, meta)
    meds = report.medians(runs)
    (out / "results.md").write_text(report.markdown(meds, meta))
    report.plot(meds, out / "results.png")


@click.command(name="bench", help=__doc__.split("\n\n")[0] if __doc__ else None)
@click.option(
    "--transport",
    type=click.Choice(["memory", "nats", "kafka", "all"]),
    multiple=True,
    default=["memory"],
    show_default=True,
    help="Transport(s) to measure; repeatable.",
)
@click.option(
    "--scenario",
    default="all",
    show_default=True,
    help="Comma-separated scenario or family names (seed, bulk, pc, topics, all).",
)
@click.option("--system", "systems", multiple=True, help="Only these systems (repeatable).")
@click.option("--repeat", type=click.IntRange(1), default=3, show_default=True)
@click.option(
    "--repeat-override",
    "overrides",
    multiple=True,
    metavar="SCENARIO=N",
    help="Repeat one scenario N times instead (e.g. pc-1=1: 25 s of serial work a run).",
)
@click.option(
    "--messages",
    type=click.IntRange(1),
    default=None,
    help="Override every scenario's message count (smoke runs).",
)
@click.option("--start-brokers", is_flag=True, help="Start nats-server / Tansu on free ports.")
@click.option("--nats-url", default=None, help="Use this NATS server (host:port or nats://).")
@click.option("--kafka-url", default=None, help="Use this Kafka broker (host:port or kafka://).")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-out"),
    show_default=True,
)
@click.option(
    "--merge",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    multiple=True,
    help="Include the runs of an earlier results.json in the report.",
)
@click.option("--render-only", is_flag=True, help="Measure nothing; render --merge'd runs.")
@click.option(
    "--docs",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Also write the results into this page (docs/benchmarks.md) and its plot.",
)
@click.option(
    "--compare",
    "compare_only",
    is_flag=True,
    help="Print only the ratio table (msg/s, p50, CPU per message against raw, or "
    "the non-blocking trio fan-out on memory).",
)
@click.option(
    "--base-src",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Also run trio_bus from this src directory (system trio_bus-base), interleaved.",
)
def main(
    transport: tuple[str, ...],
    scenario: str,
    systems: tuple[str, ...],
    repeat: int,
    overrides: tuple[str, ...],
    messages: int | None,
    start_brokers: bool,
    nats_url: str | None,
    kafka_url: str | None,
    out: Path,
    merge: tuple[Path, ...],
    render_only: bool,
    docs: Path | None,
    compare_only: bool,
    base_src: Path | None,
) -> None:
    """Run the benchmark suite."""
    console = Console(stderr=True)
    if base_src is not None:
        os.environ[BASE_SRC_ENV] = str(base_src.resolve())
    runs: list[RunResult] = []
    meta: dict[str, Any] = {}
    commands: list[str] = []
    for path in merge:
        more, meta = report.load_json(path)
        runs.extend(more)
        commands.extend(meta.get("commands", [meta.get("command", "?")]))
    if not render_only:
        commands.append("python -m benchmarks " + shlex.join(sys.argv[1:]))
    transports = (
        ["memory", "nats", "kafka"] if "all" in transport else list(dict.fromkeys(transport))
    )
    try:
        workloads = by_name(scenario)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--scenario") from None
    if messages is not None:
        workloads = [w.scaled(messages) for w in workloads]
    meta = {
        **meta,
        "command": commands[-1] if commands else "?",
        "commands": commands,
        "machine": meta.get("machine", _machine()),
        "versions": meta.get("versions", _versions()),
        "date": meta.get("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
        "repeat": repeat if not render_only else meta.get("repeat", repeat),
        "repeat_overrides": list(overrides) or meta.get("repeat_overrides", []),
    }
    if render_only:
        write_outputs(out, runs, meta)
        if docs is not None:
            report.update_docs(docs, report.medians(runs), meta, out / "results.png")
        console.print(f"wrote {out}/results.json, results.md, results.png")
        return

    brokers: list[Broker] = []
    addresses: dict[str, str] = {"memory": ""}
    try:
        for name, url in (("nats", nats_url), ("kafka", kafka_url)):
            if name not in transports:
                continue
            if url:
                addresses[name] = normalise_address(url)
            elif start_brokers:
                with console.status(f"starting {name} broker"):
                    broker = start_nats() if name == "nats" else start_kafka()
                brokers.append(broker)
                addresses[name] = broker.address
            else:
                raise click.UsageError(f"{name} needs --{name}-url or --start-brokers")
        todo = plan(transports, workloads, list(systems) or None)
        _measure(todo, repeat, _overrides(overrides), addresses, out, runs, meta, console)
    finally:
        for broker in brokers:
            broker.stop()
    if docs is not None:
        report.update_docs(docs, report.medians(runs), meta, out / "results.png")
    meds = report.medians(runs)
    click.echo(report.compare(meds) if compare_only else report.markdown(meds, meta))
    console.print(f"wrote {out}/results.json, results.md, results.png")


def _overrides(raw: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in raw:
        name, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            raise click.BadParameter(f"{item!r} is not SCENARIO=N", param_hint="--repeat-override")
        out[name] = int(count)
    return out


def _measure(
    todo: list[tuple[str, Any, str]],
    repeat: int,
    overrides: dict[str, int],
    addresses: dict[str, str],
    out: Path,
    runs: list[RunResult],
    meta: dict[str, Any],
    console: Console,
) -> None:
    # Group so each (transport, scenario, repeat) runs every system back to
    # back; families outermost, so the headline scenarios finish first.
    groups: dict[tuple[str, str, str], list[tuple[str, Any, str]]] = {}
    for item in sorted(todo, key=lambda item: FAMILIES.index(item[1].family)):
        groups.setdefault((item[1].family, item[0], item[1].name), []).append(item)
    total = sum(len(items) * overrides.get(name, repeat) for (_, _, name), items in groups.items())
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        overall = progress.add_task("runs", total=total)
        for (_, _, name), items in groups.items():
            for attempt in range(overrides.get(name, repeat)):
                for transport, workload, system in items:
                    size = workload_for(system, workload).messages
                    current = progress.add_task(
                        f"{transport} {workload.name} {system} #{attempt + 1}", total=size
                    )

                    def advance(handled: int, task: TaskID = current) -> None:
                        # One update per PROGRESS line, i.e. per batch.
                        progress.update(task, completed=handled)

                    result = run_one(
                        system,
                        transport,
                        addresses[transport],
                        workload,
                        log_dir=out / "logs",
                        progress=advance,
                    )
                    progress.remove_task(current)
                    if result.error:
                        console.print(
                            f"[yellow]{transport} {workload.name} {system}: {result.error}"
                        )
                    runs.append(result)
                    progress.advance(overall)
                    write_outputs(out, runs, meta)


if __name__ == "__main__":
    main()
