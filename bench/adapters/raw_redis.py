"""Raw redis-py on the same Redis, the ceiling for the job queues.

The producer side LPUSHes a constant 64-byte payload with the asyncio client. The worker, started
as ``python -m adapters.raw_redis``, is one BRPOP loop with one round trip per job, so its drain
rate is what any worker that fetches jobs one at a time can reach. ``raw_figures`` times the
extra rates in the report: sync and async LPUSH one at a time, pipelines of 100 and of all
jobs, and LPUSH with 100 values per command.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import redis
import redis.asyncio

from adapters import record
from adapters.base import System as BaseSystem

KEY = "bench:raw"
NOOP_PAYLOAD = b"noop:" + b"x" * 59
PICKUP_PREFIX = b"pickup:"


class System(BaseSystem):
    batch_api = "pipeline(transaction=False) of LPUSH, one execute() per batch"
    burst = True

    async def open(self) -> None:
        self.client = redis.asyncio.Redis.from_url(self.redis_url)
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()

    async def push_noop(self) -> None:
        await self.client.lpush(KEY, NOOP_PAYLOAD)

    async def push_noop_many(self, count: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for _ in range(count):
            pipe.lpush(KEY, NOOP_PAYLOAD)
        await pipe.execute()

    async def push_pickup(self, t_push: float) -> None:
        await self.client.lpush(KEY, PICKUP_PREFIX + repr(t_push).encode())

    def worker_argv(self, burst: bool) -> list[str]:
        return [sys.executable, "-m", "adapters.raw_redis"] + (["--burst"] if burst else [])

    def settings(self) -> dict[str, object]:
        return {"client": f"redis-py {redis.__version__}", "payload": "64 bytes"}


async def raw_figures(redis_url: str, count: int) -> dict[str, float]:
    """Return the rates (operations per second) of the raw redis-py reference figures."""
    figures: dict[str, float] = {}
    client = redis.asyncio.Redis.from_url(redis_url)
    await client.ping()

    start = time.perf_counter()
    for _ in range(count):
        await client.lpush(KEY, NOOP_PAYLOAD)
    figures["lpush_one_async"] = count / (time.perf_counter() - start)

    start = time.perf_counter()
    for _ in range(count // 100):
        pipe = client.pipeline(transaction=False)
        for _ in range(100):
            pipe.lpush(KEY, NOOP_PAYLOAD)
        await pipe.execute()
    figures["lpush_pipeline_100_async"] = (count // 100 * 100) / (time.perf_counter() - start)

    start = time.perf_counter()
    values = [NOOP_PAYLOAD] * 100
    for _ in range(count // 100):
        await client.lpush(KEY, *values)
    figures["lpush_values_100_async"] = (count // 100 * 100) / (time.perf_counter() - start)

    start = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for _ in range(count):
        pipe.lpush(KEY, NOOP_PAYLOAD)
    await pipe.execute()
    figures["lpush_pipeline_all_async"] = count / (time.perf_counter() - start)

    start = time.perf_counter()
    for _ in range(count):
        await client.rpop(KEY)
    figures["rpop_one_async"] = count / (time.perf_counter() - start)
    await client.delete(KEY)
    await client.aclose()

    sync_client = redis.Redis.from_url(redis_url)
    sync_client.ping()
    start = time.perf_counter()
    for _ in range(count):
        sync_client.lpush(KEY, NOOP_PAYLOAD)
    figures["lpush_one_sync"] = count / (time.perf_counter() - start)

    start = time.perf_counter()
    pipe = sync_client.pipeline(transaction=False)
    for _ in range(count):
        pipe.lpush(KEY, NOOP_PAYLOAD)
    pipe.execute()
    figures["lpush_pipeline_all_sync"] = count / (time.perf_counter() - start)
    sync_client.delete(KEY)
    sync_client.close()
    return figures


async def run_worker(burst: bool) -> None:
    client = redis.asyncio.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    try:
        while True:
            item = await client.brpop([KEY], timeout=1 if burst else 0)
            if item is None:
                return
            payload = item[1]
            if payload.startswith(PICKUP_PREFIX):
                record.pickup(float(payload[len(PICKUP_PREFIX) :]))
            else:
                record.mark()
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(run_worker("--burst" in sys.argv[1:]))
