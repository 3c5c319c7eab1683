"""Event types shared by the routing and AsyncAPI tests: one of each kind of
payload class the Router accepts besides msgspec Structs."""

from __future__ import annotations

import dataclasses

import attrs


@dataclasses.dataclass
class OrderPaid:
    order_id: str
    amount: float


@attrs.define
class OrderShipped:
    order_id: str
    carrier: str
