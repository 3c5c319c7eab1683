"""The fault-injection suite (``nox -s faults``): worker processes, a
broker read-back, and one checker with named properties (docs/reliability.md)."""
