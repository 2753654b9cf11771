"""huey: calling a task, ``Task.map`` and ``huey_consumer`` with its defaults (1 worker thread)."""

from __future__ import annotations

import os

from huey import RedisHuey

from adapters import record
from adapters.base import System as BaseSystem
from adapters.base import venv_bin

huey = RedisHuey("bench", url=os.environ["BENCH_REDIS_URL"])


@huey.task()
def noop() -> None:
    record.mark()


@huey.task()
def pickup(t_push: float) -> None:
    record.pickup(t_push)


class System(BaseSystem):
    batch_api = "Task.map(): one enqueue round trip per task"

    async def close(self) -> None:
        huey.storage.conn.close()

    async def push_noop(self) -> None:
        noop()

    async def push_noop_many(self, count: int) -> None:
        noop.map([() for _ in range(count)])

    async def push_pickup(self, t_push: float) -> None:
        pickup(t_push)

    def worker_argv(self, burst: bool) -> list[str]:
        return [venv_bin("huey_consumer"), "adapters.huey_bench.huey", "--quiet"]

    def settings(self) -> dict[str, object]:
        return {
            "workers": "1 thread (default)",
            "storage": "RedisHuey, blocking dequeue (default)",
            "logging": "--quiet",
        }
