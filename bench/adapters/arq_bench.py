"""arq: ``ArqRedis.enqueue_job`` and ``arq.worker.run_worker``, default or short poll delay.

Run as ``python -m adapters.arq_bench POLL_DELAY [--burst]`` to start a worker. The worker runs
without a logging configuration, as ``run_worker`` leaves it, so arq's per-job INFO lines are off.
"""

from __future__ import annotations

import os
import sys

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import run_worker

from adapters import record
from adapters.base import System as BaseSystem

POLL_DELAYS = {"default": 0.5, "poll10ms": 0.01}


async def noop(ctx: dict) -> None:
    record.mark()


async def pickup(ctx: dict, t_push: float) -> None:
    record.pickup(t_push)


class WorkerSettings:
    functions = (noop, pickup)
    redis_settings = RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"])


class System(BaseSystem):
    burst = True

    async def open(self) -> None:
        self.pool = await create_pool(RedisSettings.from_dsn(self.redis_url))

    async def close(self) -> None:
        await self.pool.aclose()

    async def push_noop(self) -> None:
        await self.pool.enqueue_job("noop")

    async def push_pickup(self, t_push: float) -> None:
        await self.pool.enqueue_job("pickup", t_push)

    def worker_argv(self, burst: bool) -> list[str]:
        argv = [sys.executable, "-m", "adapters.arq_bench", str(POLL_DELAYS[self.variant])]
        return argv + (["--burst"] if burst else [])

    def settings(self) -> dict[str, object]:
        return {"poll_delay": f"{POLL_DELAYS[self.variant]} s", "max_jobs": "10 (default)"}


if __name__ == "__main__":
    run_worker(WorkerSettings, poll_delay=float(sys.argv[1]), burst="--burst" in sys.argv[2:])
