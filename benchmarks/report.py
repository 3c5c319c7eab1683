"""Turn runs into the JSON file, the Markdown tables and the PNG plot.

Medians are taken per (transport, scenario, system) over the repeats
(:func:`benchmarks.metrics.median_result`); every trio_bus figure is also
given as a ratio to each baseline of the same transport and scenario, and
the issue's targets are checked against the medians.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from .metrics import RunResult, median_result
from .workloads import SCENARIOS

__all__ = [
    "SEED_FLOOR",
    "Target",
    "check_targets",
    "compare",
    "load_json",
    "markdown",
    "medians",
    "plot",
    "save_json",
    "update_docs",
]

#: The seed system's measured figures: the historical floor.
SEED_FLOOR = {"kafka": 199.93, "nats": 22.7, "first_ms": 943.0}
#: Systems in report order.
SYSTEM_ORDER = (
    "trio_bus",
    "trio_bus-base",
    "raw",
    "trio-channels-nowait",
    "trio-channels",
    "faststream",
    "faststream-concurrent",
)
#: Systems measured against the baselines (this tree, and ``--base-src``'s).
SUBJECTS = ("trio_bus", "trio_bus-base")
#: The baseline each transport's ``--compare`` ratios are taken against.
COMPARE_BASELINE = {"memory": "trio-channels-nowait", "nats": "raw", "kafka": "raw"}
TRANSPORT_ORDER = ("memory", "nats", "kafka")
#: Scenarios whose end-to-end rate the throughput targets apply to.
THROUGHPUT_SCENARIOS = ("seed-3000", "bulk-noop", "bulk-1ms")


def _key(r: RunResult) -> tuple[int, int, int]:
    scenarios = list(SCENARIOS)
    return (
        TRANSPORT_ORDER.index(r.transport) if r.transport in TRANSPORT_ORDER else 99,
        scenarios.index(r.scenario) if r.scenario in scenarios else 99,
        SYSTEM_ORDER.index(r.system) if r.system in SYSTEM_ORDER else 99,
    )


def medians(runs: Iterable[RunResult]) -> list[RunResult]:
    """One median result per (transport, scenario, system), report order."""
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.transport, r.scenario, r.system), []).append(r)
    return sorted((median_result(g) for g in groups.values()), key=_key)


def save_json(path: Path, runs: Sequence[RunResult], meta: Mapping[str, Any]) -> None:
    """Every run, the medians, the ratios and the target checks."""
    meds = medians(runs)
    data = {
        "meta": dict(meta),
        "runs": [r.to_json() for r in runs],
        "medians": [r.to_json() for r in meds],
        "ratios": ratios(meds),
        "targets": [attrs.asdict(t) for t in check_targets(meds)],
    }
    path.write_text(json.dumps(data, indent=1, allow_nan=False))


def load_json(path: Path) -> tuple[list[RunResult], dict[str, Any]]:
    """Runs and meta of a file written by :func:`save_json`."""
    data = json.loads(path.read_text())
    return [RunResult.from_json(r) for r in data["runs"]], dict(data.get("meta", {}))


# ------------------------------------------------------------------ ratios

_RATIO_FIELDS = (
    "publish_rate",
    "e2e_rate",
    "p50_ms",
    "p99_ms",
    "first_ms",
    "peak_rss_mb",
    "peak_tasks",
    "cpu_us_per_msg",
)


def _ratio(a: float, b: float) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def ratios(meds: Sequence[RunResult]) -> list[dict[str, Any]]:
    """trio_bus / baseline for every figure, per transport and scenario.
    Above 1 is better for rates, worse for latencies, RSS and tasks."""
    index = {(r.transport, r.scenario, r.system): r for r in meds}
    out = []
    for r in meds:
        if r.system not in SUBJECTS:
            continue
        for (transport, scenario, system), base in index.items():
            if (transport, scenario) != (r.transport, r.scenario) or system in SUBJECTS:
                continue
            row: dict[str, Any] = {
                "transport": transport,
                "scenario": scenario,
                "system": r.system,
                "baseline": system,
            }
            for name in _RATIO_FIELDS:
                value = _ratio(float(getattr(r, name)), float(getattr(base, name)))
                row[name] = None if math.isnan(value) else value
            out.append(row)
    return out


# ----------------------------------------------------------------- targets


@attrs.frozen(kw_only=True)
class Target:
    """One of the issue's targets, checked against the medians."""

    name: str
    goal: str
    measured: str
    met: bool | None
    detail: str = ""


def _find(
    meds: Sequence[RunResult], transport: str, scenario: str, system: str
) -> RunResult | None:
    for r in meds:
        if (r.transport, r.scenario, r.system) == (transport, scenario, system):
            return r
    return None


def check_targets(meds: Sequence[RunResult]) -> list[Target]:
    """The issue's targets; ``met=None`` where the run did not measure it."""
    out: list[Target] = []
    for transport in ("kafka", "nats"):
        for scenario in THROUGHPUT_SCENARIOS:
            mine = _find(meds, transport, scenario, "trio_bus")
            if mine is None:
                continue
            for baseline, goal in (("raw", 0.9), ("faststream", 10.0)):
                base = _find(meds, transport, scenario, baseline)
                if base is None:
                    continue
                value = _ratio(mine.e2e_rate, base.e2e_rate)
                note = (
                    f" (FastStream ran {base.messages:,} messages)"
                    if base.messages != mine.messages
                    else ""
                )
                out.append(
                    Target(
                        name=f"{transport} {scenario}: end to end vs {baseline}",
                        goal=f">= {goal:g}x",
                        measured=f"{value:.2f}x ({mine.e2e_rate:,.0f} / {base.e2e_rate:,.0f})",
                        met=None if math.isnan(value) else value >= goal,
                        detail=(
                            ""
                            if math.isnan(value) or value >= goal
                            else f"missed by {goal / value:.2f}x"
                        )
                        + note,
                    )
                )
    for transport in TRANSPORT_ORDER:
        # Single-topic live workloads; preloaded ones have no idle first
        # message, and topics-N is reported in its own rows.
        firsts = [
            r.first_ms
            for r in meds
            if r.transport == transport
            and r.system == "trio_bus"
            and r.scenario in SCENARIOS
            and SCENARIOS[r.scenario].family in ("seed", "bulk")
            and not math.isnan(r.first_ms)
        ]
        if firsts:
            worst = max(firsts)
            out.append(
                Target(
                    name=f"{transport}: first-message latency (worst seed/bulk median)",
                    goal="< 20 ms",
                    measured=f"{worst:.1f} ms",
                    met=worst < 20,
                    detail="" if worst < 20 else f"missed by {worst - 20:.1f} ms",
                )
            )
    for scenario, goal in (("pc-100", 1.0), ("pc-10000", 0.6)):
        mine = _find(meds, "kafka", scenario, "trio_bus")
        if mine is None:
            continue
        out.append(
            Target(
                name=f"kafka {scenario}: consumer time",
                goal=f"<= {goal:g} s (Confluent PC: {2.18 if scenario == 'pc-100' else 2.13} s)",
                measured=f"{mine.elapsed_s:.2f} s",
                met=mine.elapsed_s <= goal,
                detail="" if mine.elapsed_s <= goal else f"missed by {mine.elapsed_s / goal:.2f}x",
            )
        )
    for transport in TRANSPORT_ORDER:
        one = _find(meds, transport, "topics-1", "trio_bus")
        hundred = _find(meds, transport, "topics-100", "trio_bus")
        if one is None or hundred is None:
            continue
        value = _ratio(hundred.peak_rss_mb, one.peak_rss_mb)
        per_sub = (hundred.peak_tasks - one.peak_tasks) / 99
        out.append(
            Target(
                name=f"{transport}: RSS of 100 topics / 1 topic",
                goal="<= 1.1x",
                measured=f"{value:.2f}x ({hundred.peak_rss_mb:.0f} / {one.peak_rss_mb:.0f} MiB)",
                met=value <= 1.1,
                detail="" if value <= 1.1 else f"missed by {value / 1.1:.2f}x",
            )
        )
        out.append(
            Target(
                name=f"{transport}: tasks = pool + O(subscriptions)",
                goal="constant tasks per subscription",
                measured=(
                    f"{one.peak_tasks} (1 topic) -> {hundred.peak_tasks} (100 topics): "
                    f"{per_sub:.2f} per extra subscription"
                ),
                met=per_sub <= 2.0,
            )
        )
    bad = [r for r in meds if r.system == "trio_bus" and r.order_violations]
    out.append(
        Target(
            name="trio_bus per-aggregate order violations",
            goal="0 everywhere",
            measured=str(sum(r.order_violations for r in meds if r.system == "trio_bus")),
            met=not bad,
            detail=", ".join(f"{r.transport} {r.scenario}" for r in bad),
        )
    )
    return out


# ---------------------------------------------------------------- markdown


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def markdown(meds: Sequence[RunResult], meta: Mapping[str, Any]) -> str:
    """The Markdown report: figures, ratios, targets."""
    lines: list[str] = []
    lines.append(
        f"Medians of {meta.get('repeat', '?')} runs unless the runs column says otherwise "
        "(correctness columns: the worst run). "
        "Rates in msg/s, latencies in ms (publish time in a header -> handler start), "
        "1st ack = the producer's share of the first message (stamped -> acknowledged), "
        "RSS in MiB (consumer process), tasks = peak Trio tasks (trio_bus, trio-channels) "
        "or asyncio tasks (raw, FastStream), cpu = consumer CPU µs per message "
        "(getrusage, from going live to the last handler's end)."
    )
    lines.append("")
    header = (
        "| transport | scenario | system | msgs | publish | e2e | p50 | p95 | p99 | first "
        "| 1st ack | success | order viol. | dups | RSS | tasks | crossings/msg | cpu | runs |"
    )
    lines.append(header)
    lines.append("|" + "---|" * 19)
    for r in meds:
        err = " ⚠" if r.error else ""
        lines.append(
            f"| {r.transport} | {r.scenario} | {r.system}{err} | {r.messages:,} "
            f"| {_fmt(r.publish_rate)} | {_fmt(r.e2e_rate)} | {_fmt(r.p50_ms, 1)} "
            f"| {_fmt(r.p95_ms, 1)} | {_fmt(r.p99_ms, 1)} | {_fmt(r.first_ms, 1)} "
            f"| {_fmt(r.first_ack_ms, 1)} "
            f"| {r.success_ratio:.3f} | {r.order_violations:,} | {r.duplicates:,} "
            f"| {_fmt(r.peak_rss_mb, 1)} | {r.peak_tasks} "
            f"| {'-' if r.crossings_per_msg is None else f'{r.crossings_per_msg:.4f}'} "
            f"| {_fmt(r.cpu_us_per_msg, 1)} | {r.runs} |"
        )
    errors = [r for r in meds if r.error]
    if errors:
        lines.append("")
        lines.append("⚠ runs with errors:")
        lines.extend(f"- {r.transport} {r.scenario} {r.system}: {r.error}" for r in errors)
    rows = ratios(meds)
    if rows:
        lines.append("")
        lines.append("trio_bus / baseline (rates: higher is better; the rest: lower is better):")
        lines.append("")
        lines.append(
            "| transport | scenario | system | baseline | publish | e2e | p50 | p99 | first "
            "| RSS | tasks | cpu |"
        )
        lines.append("|" + "---|" * 12)
        lines.extend(
            f"| {row['transport']} | {row['scenario']} | {row['system']} | {row['baseline']} "
            + " ".join(f"| {_ratio_cell(row[name])}" for name in _RATIO_FIELDS)
            + " |"
            for row in rows
        )
    seed = [r for r in meds if r.system == "trio_bus" and r.scenario.startswith("seed-")]
    if any(r.transport in SEED_FLOOR for r in seed):
        lines.append("")
        lines.append(
            "Against the seed system's historical floor (Kafka 199.93 msg/s, NATS 22.7 msg/s "
            "end to end, first message 943 ms):"
        )
        lines.append("")
        lines.append("| transport | scenario | trio_bus e2e | x floor | first ms | x faster |")
        lines.append("|---|---|---|---|---|---|")
        for r in seed:
            if r.transport not in SEED_FLOOR:
                continue
            lines.append(
                f"| {r.transport} | {r.scenario} | {_fmt(r.e2e_rate)} "
                f"| {_ratio_cell(_ratio(r.e2e_rate, SEED_FLOOR[r.transport]))} "
                f"| {_fmt(r.first_ms, 1)} "
                f"| {_ratio_cell(_ratio(SEED_FLOOR['first_ms'], r.first_ms))} |"
            )
    targets = check_targets(meds)
    if targets:
        lines.append("")
        lines.append("| target | goal | measured | met |")
        lines.append("|---|---|---|---|")
        for t in targets:
            met = "n/a" if t.met is None else ("yes" if t.met else f"**no** {t.detail}".strip())
            lines.append(f"| {t.name} | {t.goal} | {t.measured} | {met} |")
    return "\n".join(lines) + "\n"


def compare(meds: Sequence[RunResult]) -> str:
    """The ``--compare`` table: per transport and scenario, each system's
    msg/s, p50 and consumer CPU per message, and their ratios to the
    transport's baseline (:data:`COMPARE_BASELINE`)."""
    index = {(r.transport, r.scenario, r.system): r for r in meds}
    lines = [
        "| transport | scenario | system | e2e msg/s | p50 ms | cpu µs/msg "
        "| e2e ratio | p50 ratio | cpu ratio |",
        "|" + "---|" * 9,
    ]
    for r in meds:
        base = index.get((r.transport, r.scenario, COMPARE_BASELINE.get(r.transport, "")))
        cells = ["-", "-", "-"]
        if base is not None and base is not r:
            cells = [
                _ratio_cell(_ratio(r.e2e_rate, base.e2e_rate)),
                _ratio_cell(_ratio(r.p50_ms, base.p50_ms)),
                _ratio_cell(_ratio(r.cpu_us_per_msg, base.cpu_us_per_msg)),
            ]
        lines.append(
            f"| {r.transport} | {r.scenario} | {r.system} | {_fmt(r.e2e_rate)} "
            f"| {_fmt(r.p50_ms, 1)} | {_fmt(r.cpu_us_per_msg, 1)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- plot


def plot(meds: Sequence[RunResult], path: Path) -> None:
    """End-to-end msg/s per scenario and system, one panel per transport
    (log scale), as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transports = [t for t in TRANSPORT_ORDER if any(r.transport == t for r in meds)]
    if not transports:
        return
    fig, axes = plt.subplots(
        1, len(transports), figsize=(4.2 * len(transports), 4.2), squeeze=False, dpi=80
    )
    colours = {
        "trio_bus": "#1f77b4",
        "raw": "#ff7f0e",
        "trio-channels": "#ff7f0e",
        "faststream": "#2ca02c",
        "faststream-concurrent": "#98df8a",
    }
    for ax, transport in zip(axes[0], transports, strict=True):
        rows = [r for r in meds if r.transport == transport and not math.isnan(r.e2e_rate)]
        scenarios = [s for s in SCENARIOS if any(r.scenario == s for r in rows)]
        systems = [s for s in SYSTEM_ORDER if any(r.system == s for r in rows)]
        height = 0.8 / max(len(systems), 1)
        for j, system in enumerate(systems):
            ys, xs = [], []
            for i, scenario in enumerate(scenarios):
                found = _find(rows, transport, scenario, system)
                if found is not None:
                    ys.append(i + j * height)
                    xs.append(found.e2e_rate)
            ax.barh(ys, xs, height=height, label=system, color=colours.get(system))
        if transport in SEED_FLOOR:
            ax.axvline(SEED_FLOOR[transport], color="#d62728", linestyle="--", linewidth=1)
            ax.text(
                SEED_FLOOR[transport],
                -0.6,
                " seed system",
                color="#d62728",
                fontsize=6,
                va="bottom",
            )
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(scenarios))])
        ax.set_yticklabels(scenarios, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end msg/s (log)", fontsize=8)
        ax.set_title(transport, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="lower center",
        ncol=len(handles),
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


START_MARK = "<!-- bench:results:start -->"
END_MARK = "<!-- bench:results:end -->"


def update_docs(doc: Path, meds: Sequence[RunResult], meta: Mapping[str, Any], png: Path) -> None:
    """Replace the results section of *doc* (between the bench markers) with
    the latest table, command and machine; copy the plot next to it."""
    text = doc.read_text()
    if START_MARK not in text or END_MARK not in text:
        raise ValueError(f"{doc} has no {START_MARK} ... {END_MARK} section")
    image = doc.parent / "benchmarks.png"
    if png.exists():
        image.write_bytes(png.read_bytes())
    overrides = ", ".join(meta.get("repeat_overrides", [])) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in dict(meta.get("versions", {})).items())
    body = "\n".join(
        [
            START_MARK,
            "",
            f"Measured {meta.get('date', '?')} with:",
            "",
            "```sh",
            *[str(c) for c in meta.get("commands", [meta.get("command", "?")])],
            "```",
            "",
            f"Machine: {meta.get('machine', '?')}; shared with other workloads.",
            f"Versions: {versions}. Repeat overrides: {overrides}.",
            "",
            f"![end-to-end throughput per scenario]({image.name})",
            "",
            markdown(meds, meta),
            END_MARK,
        ]
    )
    head, _, rest = text.partition(START_MARK)
    _, _, tail = rest.partition(END_MARK)
    doc.write_text(head + body + tail)
