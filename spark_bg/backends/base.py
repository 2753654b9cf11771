"""The backend interface: what a store must do for spark_bg to deliver jobs reliably.

A backend stores opaque payloads (the JSON envelope built by `spark_bg.job`) under job ids. It
never parses them. Its contract, which the conformance suite in tests/ checks for every backend:

- `enqueue()` stores a batch in one round trip. A message sent twice (a resend after a lost
  reply) is handed out once while the first copy is pending or running. With `exclusive` set,
  the second copy is not stored at all, so counts see one job.
- `pop()` hands a job to one worker at a time, under a lease that the worker renews. Until the
  worker settles it (`ack`, `retry`, `fail`, `release`), the job stays in the store.
- Settling checks ownership: a worker whose lease expired and whose job was handed to another
  worker gets `False` (or the id back) and changes nothing.
- `recover()` returns jobs whose lease expired to their queue, or fails them once they were
  handed out `max_deliveries` times without being settled.
- One clock judges due times and leases: the backend's own (the Redis server's time on Redis).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Backend", "Delivery", "FailedJob", "FailedStoreLimits", "Message", "QueueCounts"]


@dataclass(slots=True)
class Message:
    """A job on its way to the backend."""

    id: str
    queue: str
    payload: bytes
    delay_s: float | None = None
    """Seconds to wait before the job is due, measured on the backend's clock."""
    run_at: float | None = None
    """Absolute due time in Unix seconds; ignored when `delay_s` is set."""
    exclusive: bool = False
    """Store nothing if a job with this id is already pending, delayed or running.

    Set for ids chosen by the caller (`push(job_id=...)`). Generated ids are random, so a
    backend may skip the check for them and drop a resent copy when it is handed out instead.
    """


@dataclass(slots=True)
class Delivery:
    """A job handed to a worker by `pop()`."""

    id: str
    queue: str
    payload: bytes
    attempt: int
    """1 for the first run; `retry()` adds one, `release()` does not."""
    deliveries: int
    """Times the job was handed out since it was pushed or last retried, this one included.

    `release()` takes its hand-out back, so a job returned at a graceful shutdown does not
    move closer to `max_deliveries`; a lease that expired does count."""


@dataclass(slots=True)
class FailedJob:
    """A job kept in the failed-job store."""

    id: str
    queue: str
    payload: bytes
    error: str
    """The reason, usually the traceback of the last attempt."""
    attempts: int
    failed_at: float
    """Unix seconds on the backend's clock."""


@dataclass(slots=True)
class QueueCounts:
    """Number of jobs of one queue in each state."""

    ready: int = 0
    delayed: int = 0
    active: int = 0
    failed: int = 0


@dataclass(slots=True)
class FailedStoreLimits:
    """Bounds of the failed-job store; older entries are dropped past either."""

    max_count: int = 10_000
    max_age_s: float = 7 * 24 * 3600.0


class Backend(ABC):
    """A job store. Subclass it to add a store; `spark_bg.backends.from_url` picks one by URL.

    All methods are coroutines of one event loop: a backend is opened, used and closed on the
    same loop. `clone()` gives an unopened copy for another loop or thread.
    """

    url: str

    @abstractmethod
    def clone(self) -> Backend:
        """Return an unopened backend with the same settings."""

    @abstractmethod
    async def open(self) -> None:
        """Connect; called once before any other method. Raises `BackendError` on failure."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the backend cannot be used afterwards."""

    @abstractmethod
    async def enqueue(self, messages: Sequence[Message]) -> None:
        """Store `messages` in one round trip; see the module docs for resent messages."""

    @abstractmethod
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

        Waits up to `timeout_s` for the first job and returns `[]` if none came. Each job
        handed out is leased to `worker_id` for `lease_s` seconds.
        """

    @abstractmethod
    async def ack(self, worker_id: str, deliveries: Sequence[Delivery]) -> list[str]:
        """Delete finished jobs; return the ids that `worker_id` no longer held."""

    @abstractmethod
    async def retry(self, worker_id: str, delivery: Delivery, delay_s: float) -> bool:
        """Schedule another attempt after `delay_s`; `False` if the lease was lost."""

    @abstractmethod
    async def fail(self, worker_id: str, delivery: Delivery, error: str) -> bool:
        """Move the job to the failed-job store; `False` if the lease was lost."""

    @abstractmethod
    async def release(self, worker_id: str, deliveries: Sequence[Delivery]) -> None:
        """Return unfinished jobs to the front of their queue without using up an attempt."""

    @abstractmethod
    async def renew(
        self, worker_id: str, deliveries: Sequence[Delivery], lease_s: float
    ) -> list[str]:
        """Extend the leases of jobs `worker_id` holds; return the ids it no longer held."""

    @abstractmethod
    async def recover(self, queues: Sequence[str], max_deliveries: int) -> list[str]:
        """Requeue jobs whose lease expired, or fail those handed out `max_deliveries` times.

        Returns the ids of the jobs it moved.
        """

    @abstractmethod
    async def list_failed(self, queue: str, limit: int = 100) -> list[FailedJob]:
        """Return up to `limit` failed jobs of `queue`, newest first."""

    @abstractmethod
    async def retry_failed(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Requeue failed jobs (all of `queue` when `ids` is None) with a fresh attempt count."""

    @abstractmethod
    async def delete_failed(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Delete failed jobs (all of `queue` when `ids` is None); return how many."""

    @abstractmethod
    async def counts(self, queue: str) -> QueueCounts:
        """Return the number of jobs of `queue` in each state."""
