"""In-process job store for tests: `memory://NAME`.

Backends built from the same URL in one process share one store, so a worker started with
`clone()` on another thread or event loop sees the jobs that the app pushed. `memory://` alone
is the store named "default". Nothing is shared with other processes and nothing survives the
process. `MemoryBackend.reset()` empties stores between tests.

Due times and leases use `time.time()`. A ready job's place in its queue is the key
`(due_at, seq)`: jobs run in the order they became due, and jobs due at the same time run in
push order. `seq` comes from a counter that rises for each job queued at the back (push, retry,
`retry_failed`) and falls for each job put at the front (release, recovery), so a released job
goes ahead of every other job of its queue. The SQLite backend orders jobs the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from spark_bg.backends import failed_limits_from_options, reject_unknown_options
from spark_bg.backends.base import (
    Backend,
    Delivery,
    FailedJob,
    FailedStoreLimits,
    Message,
    QueueCounts,
)
from spark_bg.errors import BackendError, ConfigurationError

__all__ = ["MemoryBackend"]

logger = logging.getLogger(__name__)

DEFAULT_STORE_NAME = "default"

_JobState = Literal["ready", "active", "failed"]


@dataclass(slots=True)
class _StoredJob:
    id: str
    queue: str
    payload: bytes
    state: _JobState
    due_at: float
    seq: int
    attempt: int = 1
    deliveries: int = 0
    owner: str | None = None
    lease_until: float = 0.0
    error: str = ""
    failed_at: float = 0.0


# A pending `pop()`: the event loop it runs on and the future that wakes it.
_Waiter = tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class _Store:
    """Jobs of one `memory://NAME` URL, shared by every backend and thread of the process.

    Every attribute is guarded by `lock`. Each queue's ready jobs sit in a heap of
    `(due_at, seq, id)` entries. An entry goes stale when its job leaves the ready state or
    gets a new key, and stale entries are dropped when they reach the top.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, _StoredJob] = {}
        self.ready: dict[str, list[tuple[float, int, str]]] = {}
        self.last_seq = 0
        self.first_seq = 0
        self.waiters: list[_Waiter] = []

    def clear(self) -> None:
        self.jobs.clear()
        self.ready.clear()
        self.last_seq = 0
        self.first_seq = 0

    def next_seq(self) -> int:
        self.last_seq += 1
        return self.last_seq

    def make_ready(self, job: _StoredJob, due_at: float) -> None:
        """Queue `job` behind the jobs already due at `due_at`."""
        self._set_ready(job, due_at, self.next_seq())

    def make_ready_first(self, job: _StoredJob, now: float) -> None:
        """Queue `job` ahead of every ready job of its queue, due now."""
        head = self.peek(job.queue)
        due_at = now if head is None else min(head[0], now)
        self.first_seq -= 1
        self._set_ready(job, due_at, self.first_seq)

    def _set_ready(self, job: _StoredJob, due_at: float, seq: int) -> None:
        job.state = "ready"
        job.due_at = due_at
        job.seq = seq
        job.owner = None
        job.lease_until = 0.0
        heapq.heappush(self.ready.setdefault(job.queue, []), (due_at, seq, job.id))

    def peek(self, queue: str) -> tuple[float, int, str] | None:
        """Return the key of the first ready job of `queue`, dropping stale entries."""
        heap = self.ready.get(queue)
        while heap:
            _, seq, job_id = heap[0]
            job = self.jobs.get(job_id)
            if job is not None and job.state == "ready" and job.seq == seq:
                return heap[0]
            heapq.heappop(heap)
        return None

    def take_due(self, queue: str, now: float, limit: int) -> list[_StoredJob]:
        """Remove from the heap and return up to `limit` jobs of `queue` due at `now`."""
        taken: list[_StoredJob] = []
        heap = self.ready.get(queue)
        while heap and len(taken) < limit:
            head = self.peek(queue)
            if head is None or head[0] > now:
                break
            heapq.heappop(heap)
            taken.append(self.jobs[head[2]])
        return taken

    def held(self, job_id: str, worker_id: str) -> _StoredJob | None:
        """Return the job if `worker_id` holds its lease, else None."""
        job = self.jobs.get(job_id)
        if job is None or job.state != "active" or job.owner != worker_id:
            return None
        return job

    def failed_jobs(self, queue: str) -> list[_StoredJob]:
        """Return the failed jobs of `queue`, newest first."""
        failed = [job for job in self.jobs.values() if job.queue == queue and job.state == "failed"]
        failed.sort(key=lambda job: (job.failed_at, job.seq), reverse=True)
        return failed

    def trim_failed(self, queue: str, limits: FailedStoreLimits, now: float) -> None:
        """Drop the failed jobs of `queue` that are older or further down than `limits` allow."""
        oldest_kept = now - limits.max_age_s
        for index, job in enumerate(self.failed_jobs(queue)):
            if index >= limits.max_count or job.failed_at < oldest_kept:
                del self.jobs[job.id]

    def wake_waiters(self) -> None:
        """Wake every pending `pop()` of every event loop so that it looks for jobs again."""
        for loop, future in self.waiters:
            # A closed loop raises RuntimeError, and nothing awaits its future any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_set_result_if_pending, future)


def _set_result_if_pending(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


def _get_store(name: str) -> _Store:
    with _stores_lock:
        store = _stores.get(name)
        if store is None:
            store = _stores[name] = _Store()
        return store


def _due_at(message: Message, now: float) -> float:
    """Return when `message` is due; a due time in the past means now, behind the jobs due."""
    if message.delay_s is not None:
        return now + max(message.delay_s, 0.0)
    if message.run_at is not None:
        return max(message.run_at, now)
    return now


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


class MemoryBackend(Backend):
    """Job store in this process's memory, for tests. Build it with `memory://NAME`.

    It keeps the same contract as the Redis and SQLite backends, so tests that pass on it
    exercise the same job life cycle. Backends of one NAME share their jobs, across threads
    and event loops of the process.
    """

    def __init__(
        self,
        name: str = DEFAULT_STORE_NAME,
        *,
        failed_limits: FailedStoreLimits | None = None,
        url: str | None = None,
    ) -> None:
        self.name = name
        self.url = url if url is not None else f"memory://{name}"
        self.failed_limits = failed_limits if failed_limits is not None else FailedStoreLimits()
        self._store = _get_store(name)
        self._opened = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str, options: dict[str, str]) -> MemoryBackend:
        """Build an unopened backend from `memory://NAME`; `options` is the parsed query.

        Accepted settings: `failed_max_count` and `failed_max_age_s`.
        """
        options = dict(options)
        limits = failed_limits_from_options(url, options)
        reject_unknown_options(url, options, ())
        _validate_failed_limits(url, limits)

        rest = url.split("://", 1)[1]
        name = rest.split("?", 1)[0].split("#", 1)[0].strip("/")
        return cls(name or DEFAULT_STORE_NAME, failed_limits=limits, url=url)

    @classmethod
    def reset(cls, name: str | None = None) -> None:
        """Delete every job of the store `name`, or of every store when `name` is None.

        Backends that are open keep working on the emptied store.
        """
        with _stores_lock:
            stores = list(_stores.values()) if name is None else [_stores.get(name)]
        for store in stores:
            if store is not None:
                with store.lock:
                    store.clear()

    def clone(self) -> MemoryBackend:
        """Return an unopened backend on the same store with the same settings."""
        return MemoryBackend(self.name, failed_limits=replace(self.failed_limits), url=self.url)

    async def open(self) -> None:
        """Mark the backend open; the store itself needs no connection."""
        if self._closed:
            raise BackendError(f"backend {self.url} is closed: build a new one with clone()")
        self._opened = True

    async def close(self) -> None:
        """Mark the backend closed. The jobs stay in the store for other backends of NAME."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"backend {self.url} is closed: build a new one with clone()")
        if not self._opened:
            raise BackendError(f"backend {self.url} is not open: call open() first")

    async def enqueue(self, messages: Sequence[Message]) -> None:
        """Store `messages`, skipping ids already in the store."""
        self._check_open()
        store = self._store
        with store.lock:
            now = time.time()
            for message in messages:
                if message.id in store.jobs:
                    continue
                job = _StoredJob(
                    id=message.id,
                    queue=message.queue,
                    payload=message.payload,
                    state="ready",
                    due_at=now,
                    seq=0,
                )
                store.jobs[job.id] = job
                store.make_ready(job, _due_at(message, now))
            store.wake_waiters()

    async def pop(
        self,
        queues: Sequence[str],
        worker_id: str,
        *,
        count: int,
        lease_s: float,
        timeout_s: float,
    ) -> list[Delivery]:
        """Hand out up to `count` due jobs, taking `queues` in priority order.

        Waits up to `timeout_s` for the first job without polling: every change that makes
        a job ready wakes the waiting calls, and a call whose next delayed job comes due
        before the timeout wakes itself at that time.
        """
        self._check_open()
        if count < 1:
            raise ValueError(f"pop() count must be 1 or more, got {count}")
        queue_names = _unique(queues)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        store = self._store

        while True:
            with store.lock:
                now = time.time()
                deliveries = self._claim(queue_names, worker_id, count, lease_s, now)
                remaining_s = deadline - loop.time()
                if deliveries or remaining_s <= 0:
                    return deliveries

                wait_s = remaining_s
                for queue in queue_names:
                    head = store.peek(queue)
                    if head is not None:
                        wait_s = min(wait_s, max(head[0] - now, 0.0))
                future: asyncio.Future[None] = loop.create_future()
                waiter = (loop, future)
                store.waiters.append(waiter)

            try:
                await asyncio.wait({future}, timeout=wait_s)
            finally:
                future.cancel()
                with store.lock:
                    store.waiters.remove(waiter)

    def _claim(
        self, queues: list[str], worker_id: str, count: int, lease_s: float, now: float
    ) -> list[Delivery]:
        deliveries: list[Delivery] = []
        for queue in queues:
            for job in self._store.take_due(queue, now, count - len(deliveries)):
                job.state = "active"
                job.owner = worker_id
                job.lease_until = now + lease_s
                job.deliveries += 1
                deliveries.append(
                    Delivery(job.id, job.queue, job.payload, job.attempt, job.deliveries)
                )
        return deliveries

    async def ack(self, worker_id: str, deliveries: Sequence[Delivery]) -> list[str]:
        """Delete finished jobs; return the ids that `worker_id` no longer held."""
        self._check_open()
        lost: list[str] = []
        with self._store.lock:
            for delivery in deliveries:
                if self._store.held(delivery.id, worker_id) is None:
                    lost.append(delivery.id)
                else:
                    del self._store.jobs[delivery.id]
        return lost

    async def retry(self, worker_id: str, delivery: Delivery, delay_s: float) -> bool:
        """Queue another attempt, due after `delay_s`; `False` if the lease was lost."""
        self._check_open()
        store = self._store
        with store.lock:
            job = store.held(delivery.id, worker_id)
            if job is None:
                return False
            job.attempt += 1
            job.deliveries = 0
            store.make_ready(job, time.time() + max(delay_s, 0.0))
            store.wake_waiters()
        return True

    async def fail(self, worker_id: str, delivery: Delivery, error: str) -> bool:
        """Move the job to the failed-job store; `False` if the lease was lost."""
        self._check_open()
        store = self._store
        with store.lock:
            job = store.held(delivery.id, worker_id)
            if job is None:
                return False
            now = time.time()
            self._mark_failed(job, error, now)
            store.trim_failed(job.queue, self.failed_limits, now)
        return True

    def _mark_failed(self, job: _StoredJob, error: str, now: float) -> None:
        job.state = "failed"
        job.error = error
        job.failed_at = now
        job.owner = None
        job.lease_until = 0.0

    async def release(self, worker_id: str, deliveries: Sequence[Delivery]) -> None:
        """Return unfinished jobs to the front of their queue without using up an attempt.

        The jobs keep their order: the first of `deliveries` runs first. Jobs that
        `worker_id` no longer holds are left alone.
        """
        self._check_open()
        store = self._store
        with store.lock:
            now = time.time()
            # Each job goes ahead of the previous one, so walk the list backwards.
            for delivery in reversed(deliveries):
                job = store.held(delivery.id, worker_id)
                if job is not None:
                    job.deliveries = max(job.deliveries - 1, 0)
                    store.make_ready_first(job, now)
            store.wake_waiters()

    async def renew(
        self, worker_id: str, deliveries: Sequence[Delivery], lease_s: float
    ) -> list[str]:
        """Extend the leases of jobs `worker_id` holds; return the ids it no longer held."""
        self._check_open()
        lost: list[str] = []
        with self._store.lock:
            lease_until = time.time() + lease_s
            for delivery in deliveries:
                job = self._store.held(delivery.id, worker_id)
                if job is None:
                    lost.append(delivery.id)
                else:
                    job.lease_until = lease_until
        return lost

    async def recover(self, queues: Sequence[str], max_deliveries: int) -> list[str]:
        """Requeue jobs whose lease expired, or fail those handed out `max_deliveries` times.

        Requeued jobs go to the front of their queue in their original order. This also
        drops failed jobs of `queues` that are past the failed-store limits.
        """
        self._check_open()
        store = self._store
        moved: list[str] = []
        requeued = 0
        with store.lock:
            now = time.time()
            for queue in _unique(queues):
                expired = [
                    job
                    for job in store.jobs.values()
                    if job.queue == queue and job.state == "active" and job.lease_until < now
                ]
                # Each requeued job goes ahead of the previous one, so take the last first.
                expired.sort(key=lambda job: (job.due_at, job.seq), reverse=True)
                for job in expired:
                    moved.append(job.id)
                    if job.deliveries >= max_deliveries:
                        logger.warning(
                            "failed job %s of queue %r: delivered %d times without finishing",
                            job.id,
                            queue,
                            job.deliveries,
                        )
                        self._mark_failed(job, _too_many_deliveries(job.deliveries), now)
                    else:
                        store.make_ready_first(job, now)
                        requeued += 1
                store.trim_failed(queue, self.failed_limits, now)
            if requeued:
                store.wake_waiters()
        if requeued:
            logger.info("requeued %d jobs whose lease expired", requeued)
        return moved

    async def list_failed(self, queue: str, limit: int = 100) -> list[FailedJob]:
        """Return up to `limit` failed jobs of `queue`, newest first."""
        self._check_open()
        with self._store.lock:
            failed = self._store.failed_jobs(queue)[: max(limit, 0)]
            return [
                FailedJob(job.id, job.queue, job.payload, job.error, job.attempt, job.failed_at)
                for job in failed
            ]

    async def retry_failed(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Requeue failed jobs (all of `queue` when `ids` is None) with a fresh attempt count.

        Returns how many jobs were requeued. Ids that are not failed jobs of `queue` are
        skipped. All of a queue is requeued oldest failure first.
        """
        self._check_open()
        store = self._store
        with store.lock:
            if ids is None:
                jobs = list(reversed(store.failed_jobs(queue)))
            else:
                jobs = [store.jobs[job_id] for job_id in _unique(ids) if job_id in store.jobs]
            jobs = [job for job in jobs if job.queue == queue and job.state == "failed"]

            now = time.time()
            for job in jobs:
                job.attempt = 1
                job.deliveries = 0
                job.error = ""
                job.failed_at = 0.0
                store.make_ready(job, now)
            if jobs:
                store.wake_waiters()
        return len(jobs)

    async def delete_failed(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Delete failed jobs (all of `queue` when `ids` is None); return how many."""
        self._check_open()
        store = self._store
        with store.lock:
            if ids is None:
                jobs = store.failed_jobs(queue)
            else:
                jobs = [store.jobs[job_id] for job_id in _unique(ids) if job_id in store.jobs]
                jobs = [job for job in jobs if job.queue == queue and job.state == "failed"]
            for job in jobs:
                del store.jobs[job.id]
        return len(jobs)

    async def counts(self, queue: str) -> QueueCounts:
        """Return the number of jobs of `queue` in each state; `ready` counts the due ones."""
        self._check_open()
        counts = QueueCounts()
        with self._store.lock:
            now = time.time()
            for job in self._store.jobs.values():
                if job.queue != queue:
                    continue
                if job.state == "active":
                    counts.active += 1
                elif job.state == "failed":
                    counts.failed += 1
                elif job.due_at <= now:
                    counts.ready += 1
                else:
                    counts.delayed += 1
        return counts


def _too_many_deliveries(deliveries: int) -> str:
    return f"delivered {deliveries} times without finishing; the job may crash its worker"


def _validate_failed_limits(url: str, limits: FailedStoreLimits) -> None:
    """Raise `ConfigurationError` if the failed-store limits of `url` are out of range."""
    if limits.max_count < 0:
        raise ConfigurationError(
            f"invalid failed_max_count={limits.max_count} in queue URL {url!r}: "
            "expected 0 or more jobs"
        )
    if not limits.max_age_s > 0:
        raise ConfigurationError(
            f"invalid failed_max_age_s={limits.max_age_s} in queue URL {url!r}: "
            "expected a number of seconds greater than 0"
        )
