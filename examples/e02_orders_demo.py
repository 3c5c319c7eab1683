"""The orders demo (the same as ``trio-bus demo``): concurrent orders,
ordered events per order, a failing event retried then dead-lettered.

Run: python examples/e02_orders_demo.py
"""

from __future__ import annotations

import trio

from trio_bus.demo import run

if __name__ == "__main__":
    trio.run(run)
