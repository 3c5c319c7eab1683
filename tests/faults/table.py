"""Render ``$FAULTS_RESULTS`` lines as the docs/reliability.md results table:
``python -m tests.faults.table .nox/faults-results.jsonl``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ["published", "acked", "handled", "dead_lettered", "lost", "unexpected", "early_acks"]
COLUMNS += ["overlaps", "frozen_overlaps", "order_violations", "duplicates", "shutdown_max_s"]


def render(lines: list[dict[str, object]]) -> str:
    """One markdown row per scenario run."""
    head = ["scenario", "transport", *COLUMNS, "result"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in lines:
        if "published" not in row:  # the leak scenario reports growth instead
            growth = ", ".join(f"{k} {row[k]:+}" for k in ("fds", "threads", "tasks", "rss"))
            cells = [str(row["scenario"]), str(row["transport"]), f"growth: {growth}"]
            out.append("| " + " | ".join(cells + [""] * (len(head) - 4) + ["see growth"]) + " |")
            continue
        failed = row.get("failed") or []
        result = "**FAIL " + ",".join(map(str, failed)) + "**" if failed else "pass"  # type: ignore[call-overload]
        cells = [
            str(row["scenario"]),
            str(row["transport"]),
            *(str(row.get(c, "")) for c in COLUMNS),
            result,
        ]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    lines = [json.loads(x) for x in Path(sys.argv[1]).read_text().splitlines() if x.strip()]
    print(render(lines))


if __name__ == "__main__":
    main()
