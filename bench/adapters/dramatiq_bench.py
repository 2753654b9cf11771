"""Dramatiq: ``Actor.send``, ``group(...).run()`` and ``dramatiq --processes 1`` (8 threads)."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from adapters import record
from adapters.base import System as BaseSystem
from adapters.base import venv_bin

QUEUE_NAME = "bench"

broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"])
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE_NAME)
def noop() -> None:
    record.mark()


@dramatiq.actor(queue_name=QUEUE_NAME)
def pickup(t_push: float) -> None:
    record.pickup(t_push)


class System(BaseSystem):
    batch_api = "group(messages).run(): one enqueue round trip per message"

    async def close(self) -> None:
        broker.close()

    async def push_noop(self) -> None:
        noop.send()

    async def push_noop_many(self, count: int) -> None:
        dramatiq.group([noop.message() for _ in range(count)]).run()

    async def push_pickup(self, t_push: float) -> None:
        pickup.send(t_push)

    def worker_argv(self, burst: bool) -> list[str]:
        return [
            venv_bin("dramatiq"),
            "adapters.dramatiq_bench",
            "--processes",
            "1",
            "--queues",
            QUEUE_NAME,
        ]

    def settings(self) -> dict[str, object]:
        return {"processes": 1, "threads": "8 (default)", "middleware": "default set"}
