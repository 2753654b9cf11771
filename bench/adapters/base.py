"""The interface that every system adapter implements for the measurement protocols in case.py."""

from __future__ import annotations

import os
import sys


def venv_bin(name: str) -> str:
    """Return the path of a console script in the virtual environment running this process."""
    return os.path.join(os.path.dirname(sys.executable), name)


class System:
    """A job queue as its users drive it: a producer API and a worker command.

    Subclasses set ``batch_api`` to a short description of the batch path they use (or leave it
    None when the system has none), and ``burst`` when the worker can drain and exit by itself.
    """

    batch_api: str | None = None
    burst = False

    def __init__(self, variant: str, redis_url: str) -> None:
        self.variant = variant
        self.redis_url = redis_url

    async def open(self) -> None:
        """Connect the producer."""

    async def close(self) -> None:
        """Disconnect the producer."""

    async def push_noop(self) -> None:
        """Enqueue one no-op job and return once the system reports it enqueued."""
        raise NotImplementedError

    async def push_noop_many(self, count: int) -> None:
        """Enqueue ``count`` no-op jobs through the system's batch path."""
        raise NotImplementedError

    async def push_pickup(self, t_push: float) -> None:
        """Enqueue one job that reports its pickup latency, carrying the push time."""
        raise NotImplementedError

    def worker_argv(self, burst: bool) -> list[str]:
        """Return the command that starts one worker process with its default concurrency."""
        raise NotImplementedError

    def worker_env(self) -> dict[str, str]:
        """Return extra environment variables for the worker process."""
        return {}

    def settings(self) -> dict[str, object]:
        """Return the settings that differ from the system's defaults, for the report."""
        return {}
