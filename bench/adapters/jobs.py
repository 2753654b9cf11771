"""Job functions that RQ runs by import path (the other peers register their own)."""

from __future__ import annotations

from adapters import record


def noop() -> None:
    record.mark()


def pickup(t_push: float) -> None:
    record.pickup(t_push)
