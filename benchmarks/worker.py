"""A worker process of one benchmark run: ``python -m benchmarks.worker
consume|produce SPEC_JSON``.

The protocol goes to the original stdout; everything else the libraries
print (FastStream, aiokafka warnings) is moved to stderr, so a stray line
can never be read as a protocol line.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import traceback

import attrs
import trio

from ._proto import RunSpec, emit

__all__ = ["TRIO_BUS_SYSTEMS", "main"]

#: trio_bus consumers: this tree's, and ``trio_bus-base`` run with another
#: tree's ``src`` first on PYTHONPATH (``--base-src``, before/after runs).
TRIO_BUS_SYSTEMS = ("trio_bus", "trio_bus-base")


def _claim_stdout() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = proto


def consume(spec: RunSpec) -> None:
    """Run the consumer of *spec.system*."""
    if spec.system in TRIO_BUS_SYSTEMS:
        from . import run_trio_bus

        trio.run(run_trio_bus.consume, spec)
    elif spec.system.startswith("trio-channels"):
        from . import run_raw

        async def channels() -> None:
            emit("READY")
            consumer, producer = await run_raw.run_trio_channels(
                spec,
                progress=lambda n: emit("PROGRESS", n),
                nowait=spec.system == "trio-channels-nowait",
            )
            emit("RESULT", {"consumer": attrs.asdict(consumer), "producer": attrs.asdict(producer)})

        trio.run(channels)
    elif spec.system == "raw":
        from . import run_raw

        asyncio.run(run_raw.consume(spec))
    elif spec.system.startswith("faststream"):
        from . import run_faststream

        asyncio.run(run_faststream.consume(spec))
    else:
        raise ValueError(f"unknown system {spec.system!r}")


def _wait_for_go() -> None:
    # Started together with the consumer so that imports overlap its setup;
    # publishing starts when the orchestrator says the consumer is live.
    emit("WAITING")
    for line in sys.stdin:
        if line.strip() == "GO":
            return
    raise SystemExit("stdin closed before GO")


def produce(spec: RunSpec, *, wait: bool = False) -> None:
    """Run the producer of a run (never for memory: in-process); with
    *wait*, import everything first and start on a ``GO`` line.

    Every system is fed by the same producer (the raw client's, see
    :mod:`.run_raw`): a fair comparison of consumers, not of producers.
    """
    from . import run_raw

    importlib.import_module("aiokafka" if spec.transport == "kafka" else "nats")
    if wait:
        _wait_for_go()
    figures = asyncio.run(run_raw.produce(spec))
    emit("RESULT", attrs.asdict(figures))


def main(argv: list[str]) -> int:
    """Entry point."""
    _claim_stdout()
    role, text = argv
    spec = RunSpec.from_json(text)
    try:
        if role == "consume":
            consume(spec)
        else:
            produce(spec, wait=role == "produce-on-go")
    except BaseException as exc:
        traceback.print_exc()
        emit("ERROR", f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
