"""spark_bg: ``Queue.push`` with ``Queue.flush`` and the ``spark-worker`` command.

The variant picks the job kind: ``async`` (``async def run``) or ``sync`` (plain ``def run``).
"""

from __future__ import annotations

import os
import sys

import spark_bg
from adapters.base import System as BaseSystem
from adapters.base import venv_bin
from adapters.spark_jobs import NoopJob, PickupJob, SyncNoopJob

JOB_CLASSES = {"async": NoopJob, "sync": SyncNoopJob}


class System(BaseSystem):
    batch_api = "push() 100 times, then one flush(): one round trip per batch"
    burst = True

    async def open(self) -> None:
        self.job_class = JOB_CLASSES[self.variant]
        self.queue = spark_bg.Queue(self.redis_url)
        await self.queue.open()

    async def close(self) -> None:
        await self.queue.aclose()

    async def push_noop(self) -> None:
        self.queue.push(self.job_class())
        await self.queue.flush()

    async def push_noop_many(self, count: int) -> None:
        for _ in range(count):
            self.queue.push(self.job_class())
        await self.queue.flush()

    async def push_pickup(self, t_push: float) -> None:
        self.queue.push(PickupJob(t_push))
        await self.queue.flush()

    def worker_argv(self, burst: bool) -> list[str]:
        script = venv_bin("spark-worker")
        command = [script] if os.path.exists(script) else [sys.executable, "-m", "spark_bg"]
        # The worker imports job classes only from allowed packages; --url names no app package.
        argv = [
            *command,
            "--url",
            self.redis_url,
            "--jobs-from",
            "adapters",
            "--log-level",
            "warning",
        ]
        return argv + (["--burst"] if burst else [])

    def settings(self) -> dict[str, object]:
        return {
            "job kind": f"{self.variant} run()",
            "concurrency": "worker default",
            "log level": "warning",
        }
