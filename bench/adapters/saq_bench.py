"""SAQ: ``Queue.enqueue`` and one ``saq.Worker`` with its default concurrency (10).

Run as ``python -m adapters.saq_bench [--burst]`` to start a worker; this mirrors what the ``saq``
command does with a settings dictionary, without its logging setup.
"""

from __future__ import annotations

import asyncio
import os
import sys

from saq import Queue, Worker

from adapters import record
from adapters.base import System as BaseSystem

QUEUE_NAME = "bench"


async def noop(ctx: dict) -> None:
    record.mark()


async def pickup(ctx: dict, *, t_push: float) -> None:
    record.pickup(t_push)


class System(BaseSystem):
    burst = True

    async def open(self) -> None:
        self.queue = Queue.from_url(self.redis_url, name=QUEUE_NAME)
        await self.queue.connect()

    async def close(self) -> None:
        await self.queue.disconnect()

    async def push_noop(self) -> None:
        await self.queue.enqueue("noop")

    async def push_pickup(self, t_push: float) -> None:
        await self.queue.enqueue("pickup", t_push=t_push)

    def worker_argv(self, burst: bool) -> list[str]:
        return [sys.executable, "-m", "adapters.saq_bench"] + (["--burst"] if burst else [])

    def settings(self) -> dict[str, object]:
        return {
            "concurrency": "10 (default)",
            "burst dequeue_timeout": "1 s (burst mode requires one)",
        }


async def run_worker(burst: bool) -> None:
    queue = Queue.from_url(os.environ["BENCH_REDIS_URL"], name=QUEUE_NAME)
    options = {"burst": True, "dequeue_timeout": 1.0} if burst else {}
    worker = Worker(queue, functions=[noop, pickup], **options)
    await queue.connect()
    try:
        await worker.start()
    finally:
        await queue.disconnect()


if __name__ == "__main__":
    asyncio.run(run_worker("--burst" in sys.argv[1:]))
