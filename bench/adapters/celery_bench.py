"""Celery: ``Task.delay``, ``group(...).apply_async()`` and ``celery worker`` (prefork, threads)."""

from __future__ import annotations

import os

from celery import Celery, group

from adapters import record
from adapters.base import System as BaseSystem
from adapters.base import venv_bin

app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


@app.task
def noop() -> None:
    record.mark()


@app.task
def pickup(t_push: float) -> None:
    record.pickup(t_push)


class System(BaseSystem):
    batch_api = "group(signatures).apply_async(): one publish per task"

    async def open(self) -> None:
        # Connect before timing: the first publish otherwise pays for the connection.
        app.connection_for_write().ensure_connection()

    async def close(self) -> None:
        app.close()

    async def push_noop(self) -> None:
        noop.delay()

    async def push_noop_many(self, count: int) -> None:
        group(noop.s() for _ in range(count)).apply_async()

    async def push_pickup(self, t_push: float) -> None:
        pickup.delay(t_push)

    def worker_argv(self, burst: bool) -> list[str]:
        return [
            venv_bin("celery"),
            "-A",
            "adapters.celery_bench",
            "worker",
            "--pool",
            self.variant,
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]

    def settings(self) -> dict[str, object]:
        return {
            "pool": self.variant,
            "concurrency": "number of CPUs (default)",
            "prefetch multiplier": "4 (default)",
            "task_ignore_result": True,
            "flags": "--without-gossip --without-mingle --without-heartbeat --loglevel WARNING",
        }
