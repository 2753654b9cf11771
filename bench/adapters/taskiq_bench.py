"""taskiq with taskiq-redis: ``Task.kiq`` and ``taskiq worker --workers 1``.

The broker class comes from ``BENCH_TASKIQ_BROKER`` (``list`` or ``stream``), because the worker
imports this module by name.
"""

from __future__ import annotations

import os

from taskiq_redis import ListQueueBroker, RedisStreamBroker

from adapters import record
from adapters.base import System as BaseSystem
from adapters.base import venv_bin

QUEUE_NAME = "bench"
BROKERS = {"list": ListQueueBroker, "stream": RedisStreamBroker}

broker = BROKERS[os.environ.get("BENCH_TASKIQ_BROKER", "list")](
    os.environ["BENCH_REDIS_URL"], queue_name=QUEUE_NAME
)


@broker.task
async def noop() -> None:
    record.mark()


@broker.task
async def pickup(t_push: float) -> None:
    record.pickup(t_push)


class System(BaseSystem):
    async def open(self) -> None:
        # RedisStreamBroker.startup() creates the consumer group, so jobs pushed before the worker
        # starts are delivered.
        await broker.startup()

    async def close(self) -> None:
        await broker.shutdown()

    async def push_noop(self) -> None:
        await noop.kiq()

    async def push_pickup(self, t_push: float) -> None:
        await pickup.kiq(t_push)

    def worker_argv(self, burst: bool) -> list[str]:
        return [
            venv_bin("taskiq"),
            "worker",
            "adapters.taskiq_bench:broker",
            "--workers",
            "1",
            "--log-level",
            "WARNING",
        ]

    def worker_env(self) -> dict[str, str]:
        return {"BENCH_TASKIQ_BROKER": self.variant}

    def settings(self) -> dict[str, object]:
        return {
            "broker": BROKERS[self.variant].__name__,
            "workers": 1,
            "max async tasks": "100 (default)",
            "log level": "WARNING",
        }
