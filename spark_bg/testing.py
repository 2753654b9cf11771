"""Helpers for testing an app that pushes jobs, with no server and no worker process.

    queue = spark_bg.testing.TestQueue()
    app = Starlette(routes=..., middleware=[Middleware(spark_bg.QueueMiddleware, queue=queue)])
    ... send requests ...
    assert [type(job) for job in queue.pushed_jobs()] == [SendWelcomeEmail]
    await queue.run_all()        # runs every ready job in this process, as the worker would

`TestQueue` is a `Queue` on a fresh in-memory backend that also records every push, whether or
not the request's buffer was later sent.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

from spark_bg.backends.memory import MemoryBackend
from spark_bg.job import Job, JobLoader, parse_envelope
from spark_bg.queue import Queue
from spark_bg.worker import Worker, WorkerSettings

__all__ = ["PushedJob", "TestQueue"]


@dataclass(frozen=True, slots=True)
class PushedJob:
    """One recorded push: the job as the worker will rebuild it, and where it goes."""

    id: str
    job: Job
    queue: str


class TestQueue(Queue):
    """A `Queue` on its own in-memory store that records pushes and runs jobs in-process."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        super().__init__(MemoryBackend(f"test-{uuid.uuid4().hex}"))
        self.pushed: list[PushedJob] = []

    def push(
        self,
        job: Job,
        *,
        queue: str | None = None,
        delay: float | dt.timedelta | None = None,
        run_at: dt.datetime | None = None,
        always: bool = False,
        job_id: str | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Push as `Queue.push` does, and record the job as it was encoded."""
        pushed_id = super().push(
            job,
            queue=queue,
            delay=delay,
            run_at=run_at,
            always=always,
            job_id=job_id,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
        )
        message = self.build_message(job, queue=queue, job_id=pushed_id)
        rebuilt = JobLoader().rebuild(parse_envelope(message.payload))
        self.pushed.append(PushedJob(id=pushed_id, job=rebuilt, queue=message.queue))
        return pushed_id

    def pushed_jobs(self) -> list[Job]:
        """Return every job pushed so far, rebuilt from its stored state."""
        return [entry.job for entry in self.pushed]

    async def run_all(self, queues: tuple[str, ...] = ("default",)) -> Worker:
        """Run every job ready now in this process, as `spark-worker --burst` would.

        Returns the worker, whose `jobs_done` and `jobs_failed` count the outcome.
        """
        await self.flush()
        worker = Worker(self, WorkerSettings(queues=queues, burst=True, concurrency=4))
        await worker.run()
        return worker
