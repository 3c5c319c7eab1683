"""``python -m benchmarks``: the ``bench`` command (see :mod:`benchmarks.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
