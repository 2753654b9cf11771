"""RQ: ``Queue.enqueue``, ``Queue.enqueue_many`` and ``rq worker`` (SimpleWorker or Worker)."""

from __future__ import annotations

from redis import Redis
from rq import Queue

from adapters import jobs
from adapters.base import System as BaseSystem
from adapters.base import venv_bin

QUEUE_NAME = "bench"
WORKER_CLASSES = {"simple": "rq.worker.SimpleWorker", "fork": "rq.worker.Worker"}


class System(BaseSystem):
    batch_api = "Queue.enqueue_many(): one pipeline per call"
    burst = True

    async def open(self) -> None:
        self.connection = Redis.from_url(self.redis_url)
        self.queue = Queue(QUEUE_NAME, connection=self.connection)

    async def close(self) -> None:
        self.connection.close()

    async def push_noop(self) -> None:
        self.queue.enqueue(jobs.noop)

    async def push_noop_many(self, count: int) -> None:
        self.queue.enqueue_many([Queue.prepare_data(jobs.noop) for _ in range(count)])

    async def push_pickup(self, t_push: float) -> None:
        self.queue.enqueue(jobs.pickup, t_push)

    def worker_argv(self, burst: bool) -> list[str]:
        argv = [
            venv_bin("rq"),
            "worker",
            "--url",
            self.redis_url,
            "--worker-class",
            WORKER_CLASSES[self.variant],
            "--quiet",
        ]
        if burst:
            argv.append("--burst")
        return [*argv, QUEUE_NAME]

    def settings(self) -> dict[str, object]:
        return {"worker class": WORKER_CLASSES[self.variant], "logging": "--quiet (WARNING)"}
