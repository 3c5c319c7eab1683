"""The trio_bus benchmark suite: trio_bus against the raw clients and
FastStream, same workloads, same brokers, same run.

Modules:

* :mod:`benchmarks.workloads`: the one workload definition every system runs.
* :mod:`benchmarks.metrics`: percentiles, order/duplicate counters, RSS and
  task counts, the per-run result record.
* :mod:`benchmarks.run_trio_bus`, :mod:`benchmarks.run_raw`,
  :mod:`benchmarks.run_faststream`: one consumer and one producer per system.
* :mod:`benchmarks.orchestrate`: runs one (system, transport, workload) in
  fresh processes (consumer, then producer in its own process).
* :mod:`benchmarks.report`: JSON, Markdown table, PNG plot.
* :mod:`benchmarks.cli`: the ``bench`` command (``python -m benchmarks``).
"""

from __future__ import annotations
