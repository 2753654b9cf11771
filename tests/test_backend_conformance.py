"""The backend contract of `spark_bg.backends.base.Backend`, run against every backend.

Each test runs three times: on `memory://`, on a SQLite file in the test's temp directory and on
the session's throwaway redis-server under a key prefix of its own. Backends come from
`spark_bg.backends.from_url`, as the app and the worker build them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlencode

import pytest
import pytest_asyncio

from spark_bg.backends import Backend, Delivery, FailedJob, Message, QueueCounts, from_url
from spark_bg.errors import ConfigurationError

pytestmark = pytest.mark.asyncio

T = TypeVar("T")

QUEUE = "jobs"
WORKER = "worker-1"
OTHER_WORKER = "worker-2"
LONG_LEASE_S = 30.0
SHORT_LEASE_S = 0.3
MAX_DELIVERIES = 5

# A backend call that should return at once may take this long before the test fails, so a
# hung call reports a failure instead of blocking the run.
CALL_GUARD_S = 10.0
# Deadline for a condition that depends on a lease or delay of well under a second.
WAIT_DEADLINE_S = 5.0
# Allowed scheduling and clock slack when checking that a job was not handed out early.
CLOCK_SLACK_S = 0.05


class BackendFactory:
    """Open backends of one kind for a test and close them all afterwards."""

    def __init__(self, make_url: Callable[[dict[str, str]], str]) -> None:
        self._make_url = make_url
        self._opened: list[Backend] = []

    async def open(self, **options: str) -> Backend:
        """Build a backend with extra URL settings, such as `failed_max_count="3"`, and open it."""
        backend = from_url(self._make_url(options))
        await backend.open()
        self._opened.append(backend)
        return backend

    async def open_clone(self, backend: Backend) -> Backend:
        """Clone `backend` and open the clone."""
        clone = backend.clone()
        await clone.open()
        self._opened.append(clone)
        return clone

    async def close_all(self) -> None:
        for backend in reversed(self._opened):
            await backend.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[dict[str, str]], str]:
    """Build the URL of a fresh store of one backend kind, with extra query settings."""
    kind: str = request.param
    unique = uuid.uuid4().hex
    settings: dict[str, str]

    if kind == "memory":
        base, settings = f"memory://{unique}", {}
    elif kind == "sqlite":
        base, settings = f"sqlite:///{tmp_path}/jobs.db", {}
    else:
        # Requested only here, so the memory and SQLite runs need no redis-server.
        redis_url: str = request.getfixturevalue("redis_url")
        base, settings = redis_url, {"prefix": f"test-{unique}"}

    def build(options: dict[str, str]) -> str:
        query = urlencode({**settings, **options})
        return f"{base}?{query}" if query else base

    return build


@pytest_asyncio.fixture
async def backends(
    make_url: Callable[[dict[str, str]], str],
) -> AsyncIterator[BackendFactory]:
    """Opener of backends of the test's kind, which closes them after the test."""
    factory = BackendFactory(make_url)
    try:
        yield factory
    finally:
        await factory.close_all()


@pytest_asyncio.fixture
async def backend(backends: BackendFactory) -> Backend:
    """An open backend of the test's kind on a fresh store."""
    return await backends.open()


def message(
    queue: str = QUEUE,
    *,
    delay_s: float | None = None,
    run_at: float | None = None,
    payload: bytes | None = None,
    exclusive: bool = False,
) -> Message:
    """Return a message with a fresh id and a payload that names it."""
    job_id = uuid.uuid4().hex
    return Message(
        id=job_id,
        queue=queue,
        payload=payload if payload is not None else f"payload of {job_id}".encode(),
        delay_s=delay_s,
        run_at=run_at,
        exclusive=exclusive,
    )


async def pop(
    backend: Backend,
    queues: Sequence[str] = (QUEUE,),
    worker_id: str = WORKER,
    *,
    count: int = 1,
    lease_s: float = LONG_LEASE_S,
    timeout_s: float = 0.05,
) -> list[Delivery]:
    """Call `backend.pop()`, failing the test if it outlives its timeout by `CALL_GUARD_S`."""
    return await asyncio.wait_for(
        backend.pop(queues, worker_id, count=count, lease_s=lease_s, timeout_s=timeout_s),
        timeout=timeout_s + CALL_GUARD_S,
    )


async def pop_one(
    backend: Backend,
    queues: Sequence[str] = (QUEUE,),
    worker_id: str = WORKER,
    *,
    lease_s: float = LONG_LEASE_S,
) -> Delivery:
    """Pop exactly one job that is expected to be ready."""
    deliveries = await pop(backend, queues, worker_id, lease_s=lease_s, timeout_s=2.0)
    assert len(deliveries) == 1, f"expected one ready job, pop returned {deliveries}"
    return deliveries[0]


async def wait_until(
    probe: Callable[[], Awaitable[T]], condition: str, timeout_s: float = WAIT_DEADLINE_S
) -> T:
    """Call `probe` until it returns a truthy value, and return that value.

    Fails the test after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting until {condition}")
        await asyncio.sleep(0.02)


async def expire_and_recover(
    backend: Backend, job_id: str, max_deliveries: int = MAX_DELIVERIES
) -> list[str]:
    """Wait until `recover()` moves the job, whose short lease is running out."""
    recovered = await wait_until(
        lambda: backend.recover([QUEUE], max_deliveries), f"recover() moves job {job_id}"
    )
    return recovered


def ids(items: Sequence[Delivery] | Sequence[FailedJob]) -> list[str]:
    return [item.id for item in items]


def ids_of(messages: Sequence[Message]) -> list[str]:
    return [item.id for item in messages]


# enqueue and pop


async def test_from_url_rejects_unknown_setting(
    make_url: Callable[[dict[str, str]], str],
) -> None:
    url = make_url({"no_such_setting": "1"})

    with pytest.raises(ConfigurationError) as caught:
        from_url(url)

    assert "no_such_setting" in str(caught.value)


async def test_pop_returns_enqueued(backend: Backend) -> None:
    job = message()
    await backend.enqueue([job])

    delivery = await pop_one(backend)

    assert delivery.id == job.id
    assert delivery.queue == QUEUE
    assert delivery.payload == job.payload
    assert delivery.attempt == 1
    assert delivery.deliveries == 1


async def test_pop_payload_opaque(backend: Backend) -> None:
    payload = bytes(range(256)) * 400
    job = message(payload=payload)
    await backend.enqueue([job])

    delivery = await pop_one(backend)

    assert delivery.payload == payload


async def test_enqueue_empty_batch(backend: Backend) -> None:
    await backend.enqueue([])

    assert await backend.counts(QUEUE) == QueueCounts()


async def test_pop_fifo(backend: Backend) -> None:
    first_batch = [message() for _ in range(3)]
    second_batch = [message() for _ in range(2)]
    await backend.enqueue(first_batch)
    await backend.enqueue(second_batch)

    popped = [(await pop_one(backend)).id for _ in range(5)]

    assert popped == ids_of(first_batch + second_batch)


async def test_pop_queue_priority(backend: Backend) -> None:
    low = message("low")
    high = message("high")
    await backend.enqueue([low])
    await backend.enqueue([high])

    first = await pop_one(backend, ["high", "low"])
    second = await pop_one(backend, ["high", "low"])

    assert first.id == high.id
    assert first.queue == "high"
    assert second.id == low.id
    assert second.queue == "low"


async def test_pop_priority_with_count(backend: Backend) -> None:
    low = [message("low") for _ in range(2)]
    high = message("high")
    await backend.enqueue(low)
    await backend.enqueue([high])

    popped = ids(await pop(backend, ["high", "low"], count=3, timeout_s=2.0))

    assert popped, "pop returned no job although three were ready"
    assert popped == ids_of([high, *low])[: len(popped)]


async def test_pop_unlisted_queue_ignored(backend: Backend) -> None:
    await backend.enqueue([message("other")])

    assert await pop(backend, [QUEUE]) == []
    assert (await backend.counts("other")).ready == 1


async def test_pop_count_limit(backend: Backend) -> None:
    jobs = [message() for _ in range(5)]
    await backend.enqueue(jobs)

    first = await pop(backend, count=3, timeout_s=2.0)
    rest = await pop(backend, count=10, timeout_s=2.0)

    assert ids(first) == ids_of(jobs[:3])
    assert ids(rest) == ids_of(jobs[3:])
    assert (await backend.counts(QUEUE)).active == 5


async def test_pop_timeout_empty(backend: Backend) -> None:
    started = time.monotonic()
    deliveries = await pop(backend, timeout_s=0.2)
    elapsed = time.monotonic() - started

    assert deliveries == []
    assert elapsed < 2.0


async def test_pop_zero_timeout(backend: Backend) -> None:
    started = time.monotonic()
    deliveries = await pop(backend, timeout_s=0.0)
    elapsed = time.monotonic() - started

    assert deliveries == []
    assert elapsed < 1.0


@pytest.mark.parametrize("producer", ["same", "clone"])
async def test_pop_wakes_on_enqueue(
    backends: BackendFactory, backend: Backend, producer: str
) -> None:
    sender = backend if producer == "same" else await backends.open_clone(backend)
    waiting = asyncio.create_task(pop(backend, timeout_s=10.0))
    try:
        done, _ = await asyncio.wait({waiting}, timeout=0.3)
        assert not done, "pop() returned before any job was enqueued"

        job = message()
        sent_at = time.monotonic()
        await sender.enqueue([job])
        deliveries = await asyncio.wait_for(asyncio.shield(waiting), timeout=5.0)
        latency = time.monotonic() - sent_at
    finally:
        waiting.cancel()

    assert ids(deliveries) == [job.id]
    assert latency < 0.5, f"pop() woke {latency:.3f} s after the enqueue"


async def test_enqueue_exclusive_idempotent(backend: Backend) -> None:
    job = message(exclusive=True)

    await backend.enqueue([job])
    await backend.enqueue([job])

    assert (await backend.counts(QUEUE)).ready == 1
    assert ids(await pop(backend, count=10, timeout_s=2.0)) == [job.id]


async def test_enqueue_exclusive_duplicate_in_batch(backend: Backend) -> None:
    job = message(exclusive=True)

    await backend.enqueue([job, job])

    assert (await backend.counts(QUEUE)).ready == 1
    assert ids(await pop(backend, count=10, timeout_s=2.0)) == [job.id]


async def test_enqueue_exclusive_while_active(backend: Backend) -> None:
    job = message(exclusive=True)
    await backend.enqueue([job])
    delivery = await pop_one(backend)

    await backend.enqueue([job])

    counts = await backend.counts(QUEUE)
    assert counts.ready == 0
    assert counts.active == 1
    assert await pop(backend, OTHER_WORKER) == []
    assert await backend.ack(WORKER, [delivery]) == []


async def test_resent_copy_handed_out_once(backend: Backend) -> None:
    job = message()
    later = message()

    await backend.enqueue([job])
    await backend.enqueue([job, later])

    handed = ids(await pop(backend, count=10, timeout_s=2.0))
    assert handed.count(job.id) == 1
    assert later.id in handed
    assert await pop(backend, OTHER_WORKER) == []


async def test_resent_copy_while_active_dropped(backend: Backend) -> None:
    job = message()
    await backend.enqueue([job])
    delivery = await pop_one(backend)

    await backend.enqueue([job])

    assert await pop(backend, OTHER_WORKER) == []
    assert await backend.ack(WORKER, [delivery]) == []
    assert (await backend.counts(QUEUE)).active == 0


async def test_enqueue_duplicate_while_delayed(backend: Backend) -> None:
    job = message(delay_s=60.0)

    await backend.enqueue([job])
    await backend.enqueue([job])

    counts = await backend.counts(QUEUE)
    assert counts.delayed == 1
    assert counts.ready == 0


async def test_counts_per_queue(backend: Backend) -> None:
    await backend.enqueue([message("a"), message("a"), message("a", delay_s=60.0)])
    await backend.enqueue([message("b")])
    await pop_one(backend, ["a"])

    assert await backend.counts("a") == QueueCounts(ready=1, delayed=1, active=1, failed=0)
    assert await backend.counts("b") == QueueCounts(ready=1)
    assert await backend.counts("unknown") == QueueCounts()


# due times


async def test_delay_not_due_before(backend: Backend) -> None:
    delay_s = 0.5
    job = message(delay_s=delay_s)
    enqueued_at = time.monotonic()
    await backend.enqueue([job])

    early = await pop(backend, timeout_s=0.0)
    counts = await backend.counts(QUEUE)
    delivery = (await wait_until(lambda: pop(backend), "the delayed job is handed out"))[0]
    waited = time.monotonic() - enqueued_at

    assert early == []
    assert counts.delayed == 1
    assert counts.ready == 0
    assert delivery.id == job.id
    assert delivery.attempt == 1
    assert waited >= delay_s - CLOCK_SLACK_S


async def test_run_at_not_due_before(backend: Backend) -> None:
    run_at = time.time() + 0.5
    job = message(run_at=run_at)
    await backend.enqueue([job])

    early = await pop(backend, timeout_s=0.0)
    counts = await backend.counts(QUEUE)
    delivery = (await wait_until(lambda: pop(backend), "the scheduled job is handed out"))[0]
    popped_at = time.time()

    assert early == []
    assert counts.delayed == 1
    assert delivery.id == job.id
    assert popped_at >= run_at - CLOCK_SLACK_S


async def test_run_at_past_ready(backend: Backend) -> None:
    job = message(run_at=time.time() - 60.0)
    await backend.enqueue([job])

    delivery = await pop_one(backend)

    assert delivery.id == job.id


async def test_delay_overrides_run_at(backend: Backend) -> None:
    job = message(delay_s=0.2, run_at=time.time() + 3600.0)
    await backend.enqueue([job])

    deliveries = await wait_until(lambda: pop(backend), "the job due by its delay_s is handed out")

    assert ids(deliveries) == [job.id]


async def test_pop_skips_delayed(backend: Backend) -> None:
    delayed = message(delay_s=60.0)
    ready = message()
    await backend.enqueue([delayed])
    await backend.enqueue([ready])

    delivery = await pop_one(backend)

    assert delivery.id == ready.id
    assert await pop(backend) == []


# settling


async def test_ack_removes(backend: Backend) -> None:
    await backend.enqueue([message()])
    delivery = await pop_one(backend)

    lost = await backend.ack(WORKER, [delivery])

    assert lost == []
    assert await backend.counts(QUEUE) == QueueCounts()
    assert await pop(backend) == []


async def test_ack_batch(backend: Backend) -> None:
    await backend.enqueue([message() for _ in range(3)])
    deliveries = await pop(backend, count=3, timeout_s=2.0)

    lost = await backend.ack(WORKER, deliveries)

    assert len(deliveries) == 3
    assert lost == []
    assert await backend.counts(QUEUE) == QueueCounts()


async def test_ack_twice_reports_lost(backend: Backend) -> None:
    await backend.enqueue([message()])
    delivery = await pop_one(backend)
    await backend.ack(WORKER, [delivery])

    lost = await backend.ack(WORKER, [delivery])

    assert lost == [delivery.id]


async def test_ack_other_worker(backend: Backend) -> None:
    await backend.enqueue([message()])
    delivery = await pop_one(backend)

    lost = await backend.ack(OTHER_WORKER, [delivery])

    assert lost == [delivery.id]
    assert (await backend.counts(QUEUE)).active == 1
    assert await backend.ack(WORKER, [delivery]) == []
    assert (await backend.counts(QUEUE)).active == 0


async def test_retry_other_worker(backend: Backend) -> None:
    await backend.enqueue([message()])
    delivery = await pop_one(backend)

    accepted = await backend.retry(OTHER_WORKER, delivery, 0.0)

    assert accepted is False
    assert await backend.counts(QUEUE) == QueueCounts(active=1)
    assert await backend.ack(WORKER, [delivery]) == []


async def test_fail_other_worker(backend: Backend) -> None:
    await backend.enqueue([message()])
    delivery = await pop_one(backend)

    accepted = await backend.fail(OTHER_WORKER, delivery, "boom")

    assert accepted is False
    assert await backend.counts(QUEUE) == QueueCounts(active=1)
    assert await backend.list_failed(QUEUE) == []
    assert await backend.ack(WORKER, [delivery]) == []


async def test_release_other_worker(backend: Backend) -> None:
    await backend.enqueue([message()])
    delivery = await pop_one(backend)

    await backend.release(OTHER_WORKER, [delivery])

    assert await backend.counts(QUEUE) == QueueCounts(active=1)
    assert await backend.ack(WORKER, [delivery]) == []


async def test_renew_other_worker(backend: Backend) -> None:
    await backend.enqueue([message()])
    delivery = await pop_one(backend)

    lost = await backend.renew(OTHER_WORKER, [delivery], LONG_LEASE_S)

    assert lost == [delivery.id]
    assert await backend.ack(WORKER, [delivery]) == []


async def test_retry_immediate(backend: Backend) -> None:
    job = message()
    await backend.enqueue([job])
    first = await pop_one(backend)

    accepted = await backend.retry(WORKER, first, 0.0)
    second = await pop_one(backend)

    assert accepted is True
    assert second.id == job.id
    assert second.payload == job.payload
    assert second.attempt == 2
    assert second.deliveries == 1


async def test_retry_delay(backend: Backend) -> None:
    delay_s = 0.5
    await backend.enqueue([message()])
    first = await pop_one(backend)

    retried_at = time.monotonic()
    accepted = await backend.retry(WORKER, first, delay_s)
    early = await pop(backend, timeout_s=0.0)
    counts = await backend.counts(QUEUE)
    second = (await wait_until(lambda: pop(backend), "the retried job is handed out"))[0]
    waited = time.monotonic() - retried_at

    assert accepted is True
    assert early == []
    assert counts.delayed == 1
    assert counts.active == 0
    assert second.id == first.id
    assert second.attempt == 2
    assert waited >= delay_s - CLOCK_SLACK_S


async def test_retry_resets_deliveries(backend: Backend) -> None:
    job = message()
    await backend.enqueue([job])
    await pop_one(backend, lease_s=SHORT_LEASE_S)
    await expire_and_recover(backend, job.id)
    redelivered = await pop_one(backend, worker_id=OTHER_WORKER)

    accepted = await backend.retry(OTHER_WORKER, redelivered, 0.0)
    retried = await pop_one(backend)

    assert redelivered.deliveries == 2
    assert accepted is True
    assert retried.attempt == 2
    assert retried.deliveries == 1


async def test_release_to_front(backend: Backend) -> None:
    first_job, second_job = message(), message()
    await backend.enqueue([first_job, second_job])
    delivery = await pop_one(backend)

    await backend.release(WORKER, [delivery])
    counts = await backend.counts(QUEUE)
    again = await pop_one(backend)

    assert delivery.id == first_job.id
    assert counts == QueueCounts(ready=2)
    assert again.id == first_job.id
    assert again.attempt == 1


async def test_release_takes_delivery_back(backend: Backend) -> None:
    # A release (graceful shutdown) takes its hand-out back, so it never moves a job
    # toward max_deliveries; the hand-out after it counts as the first again.
    await backend.enqueue([message()])
    first = await pop_one(backend)

    await backend.release(WORKER, [first])
    again = await pop_one(backend)

    assert first.deliveries == 1
    assert again.deliveries == 1


async def test_release_keeps_attempt(backend: Backend) -> None:
    job = message()
    await backend.enqueue([job])
    await backend.retry(WORKER, await pop_one(backend), 0.0)
    second_attempt = await pop_one(backend)
    later_job = message()
    await backend.enqueue([later_job])

    await backend.release(WORKER, [second_attempt])
    again = await pop_one(backend)

    assert second_attempt.attempt == 2
    assert again.id == job.id
    assert again.attempt == 2


# leases and recovery


async def test_recover_before_expiry(backend: Backend) -> None:
    await backend.enqueue([message()])
    await pop_one(backend)

    recovered = await backend.recover([QUEUE], MAX_DELIVERIES)

    assert recovered == []
    assert await backend.counts(QUEUE) == QueueCounts(active=1)


async def test_recover_after_expiry(backend: Backend) -> None:
    job = message()
    await backend.enqueue([job])
    first = await pop_one(backend, lease_s=SHORT_LEASE_S)

    recovered = await expire_and_recover(backend, job.id)
    counts = await backend.counts(QUEUE)
    second = await pop_one(backend, worker_id=OTHER_WORKER)

    assert first.deliveries == 1
    assert recovered == [job.id]
    assert counts == QueueCounts(ready=1)
    assert second.id == job.id
    assert second.attempt == 1
    assert second.deliveries == 2


async def test_stale_worker_cannot_settle(backend: Backend) -> None:
    job = message()
    await backend.enqueue([job])
    stale = await pop_one(backend, lease_s=SHORT_LEASE_S)
    await expire_and_recover(backend, job.id)
    current = await pop_one(backend, worker_id=OTHER_WORKER)

    assert await backend.ack(WORKER, [stale]) == [job.id]
    assert await backend.retry(WORKER, stale, 0.0) is False
    assert await backend.fail(WORKER, stale, "stale") is False
    assert await backend.renew(WORKER, [stale], LONG_LEASE_S) == [job.id]
    await backend.release(WORKER, [stale])
    assert await backend.counts(QUEUE) == QueueCounts(active=1)
    assert await backend.ack(OTHER_WORKER, [current]) == []


async def test_recover_listed_queues_only(backend: Backend) -> None:
    other = message("other")
    control = message()
    await backend.enqueue([other])
    await pop_one(backend, ["other"], lease_s=SHORT_LEASE_S)
    await backend.enqueue([control])
    await pop_one(backend, lease_s=SHORT_LEASE_S)

    # The control job's lease started last, so once it is recovered both leases ran out.
    recovered_listed = await expire_and_recover(backend, control.id)
    other_counts = await backend.counts("other")
    recovered_other = await backend.recover(["other"], MAX_DELIVERIES)

    assert recovered_listed == [control.id]
    assert other_counts == QueueCounts(active=1)
    assert recovered_other == [other.id]


async def test_renew_extends_lease(backend: Backend) -> None:
    renewed, expiring = message(), message()
    await backend.enqueue([renewed, expiring])
    deliveries = await pop(backend, count=2, lease_s=SHORT_LEASE_S, timeout_s=2.0)
    by_id = {delivery.id: delivery for delivery in deliveries}

    lost = await backend.renew(WORKER, [by_id[renewed.id]], LONG_LEASE_S)
    recovered = await expire_and_recover(backend, expiring.id)
    counts = await backend.counts(QUEUE)

    assert lost == []
    assert recovered == [expiring.id]
    assert counts == QueueCounts(ready=1, active=1)
    assert await backend.ack(WORKER, [by_id[renewed.id]]) == []


async def test_recover_max_deliveries(backend: Backend) -> None:
    job = message()
    await backend.enqueue([job])

    await pop_one(backend, lease_s=SHORT_LEASE_S)
    requeued = await expire_and_recover(backend, job.id, max_deliveries=2)
    after_first = await backend.counts(QUEUE)
    second = await pop_one(backend, lease_s=SHORT_LEASE_S)
    failed_ids = await expire_and_recover(backend, job.id, max_deliveries=2)
    after_second = await backend.counts(QUEUE)
    failed = await backend.list_failed(QUEUE)

    assert requeued == [job.id]
    assert after_first == QueueCounts(ready=1)
    assert second.deliveries == 2
    assert failed_ids == [job.id]
    assert after_second == QueueCounts(failed=1)
    assert ids(failed) == [job.id]
    assert "deliver" in failed[0].error.lower()
    assert failed[0].attempts == 1
    assert failed[0].payload == job.payload


# failed-job store


async def test_fail_lists_failed(backend: Backend) -> None:
    job = message()
    await backend.enqueue([job])
    delivery = await pop_one(backend)

    before = time.time()
    accepted = await backend.fail(WORKER, delivery, "Traceback: boom")
    after = time.time()
    failed = await backend.list_failed(QUEUE)

    assert accepted is True
    assert len(failed) == 1
    assert failed[0].id == job.id
    assert failed[0].queue == QUEUE
    assert failed[0].payload == job.payload
    assert failed[0].error == "Traceback: boom"
    assert failed[0].attempts == 1
    assert before - 5.0 <= failed[0].failed_at <= after + 5.0
    assert await backend.counts(QUEUE) == QueueCounts(failed=1)
    assert await pop(backend) == []
    assert await backend.list_failed("other") == []


async def test_fail_counts_attempts(backend: Backend) -> None:
    await backend.enqueue([message()])
    await backend.retry(WORKER, await pop_one(backend), 0.0)
    second = await pop_one(backend)

    await backend.fail(WORKER, second, "boom")
    failed = await backend.list_failed(QUEUE)

    assert len(failed) == 1
    assert failed[0].attempts == 2


async def fail_jobs(backend: Backend, count: int) -> list[str]:
    """Push `count` jobs, fail them one after another and return their ids, oldest first."""
    failed_ids = []
    for number in range(count):
        job = message()
        await backend.enqueue([job])
        delivery = await pop_one(backend)
        assert await backend.fail(WORKER, delivery, f"error {number}") is True
        failed_ids.append(job.id)
    return failed_ids


async def test_list_failed_newest_first(backend: Backend) -> None:
    failed_ids = await fail_jobs(backend, 3)

    listed = await backend.list_failed(QUEUE)
    limited = await backend.list_failed(QUEUE, limit=2)

    assert ids(listed) == failed_ids[::-1]
    assert ids(limited) == failed_ids[::-1][:2]


async def test_retry_failed_one(backend: Backend) -> None:
    first_id, second_id = await fail_jobs(backend, 2)

    requeued = await backend.retry_failed(QUEUE, [first_id])
    counts = await backend.counts(QUEUE)
    delivery = await pop_one(backend)

    assert requeued == 1
    assert counts == QueueCounts(ready=1, failed=1)
    assert delivery.id == first_id
    assert delivery.attempt == 1
    assert delivery.deliveries == 1
    assert ids(await backend.list_failed(QUEUE)) == [second_id]


async def test_retry_failed_all(backend: Backend) -> None:
    job = message()
    await backend.enqueue([job])
    await backend.retry(WORKER, await pop_one(backend), 0.0)
    await backend.fail(WORKER, await pop_one(backend), "second attempt failed")
    other_ids = await fail_jobs(backend, 1)

    requeued = await backend.retry_failed(QUEUE)
    deliveries = await pop(backend, count=10, timeout_s=2.0)

    assert requeued == 2
    assert sorted(ids(deliveries)) == sorted([job.id, *other_ids])
    assert [delivery.attempt for delivery in deliveries] == [1, 1]
    assert await backend.list_failed(QUEUE) == []
    assert (await backend.counts(QUEUE)).failed == 0


async def test_retry_failed_unknown(backend: Backend) -> None:
    await fail_jobs(backend, 1)

    assert await backend.retry_failed(QUEUE, [uuid.uuid4().hex]) == 0
    assert await backend.retry_failed("other") == 0
    assert (await backend.counts(QUEUE)).failed == 1


async def test_delete_failed(backend: Backend) -> None:
    first_id, second_id = await fail_jobs(backend, 2)

    deleted_one = await backend.delete_failed(QUEUE, [first_id])
    remaining = await backend.list_failed(QUEUE)
    deleted_unknown = await backend.delete_failed(QUEUE, [uuid.uuid4().hex])
    deleted_rest = await backend.delete_failed(QUEUE)

    assert deleted_one == 1
    assert ids(remaining) == [second_id]
    assert deleted_unknown == 0
    assert deleted_rest == 1
    assert await backend.list_failed(QUEUE) == []
    assert await backend.counts(QUEUE) == QueueCounts()
    assert await pop(backend) == []


async def test_failed_store_max_count(backends: BackendFactory) -> None:
    backend = await backends.open(failed_max_count="3")

    failed_ids = await fail_jobs(backend, 5)
    listed = await backend.list_failed(QUEUE)

    assert ids(listed) == failed_ids[::-1][:3]
    assert (await backend.counts(QUEUE)).failed == 3


# several workers


async def test_clone_shares_store(backends: BackendFactory, backend: Backend) -> None:
    clone = backend.clone()
    assert clone is not backend
    assert clone.url == backend.url
    clone = await backends.open_clone(backend)
    job = message()

    await backend.enqueue([job])
    delivery = await pop_one(clone)
    lost = await clone.ack(WORKER, [delivery])

    assert delivery.id == job.id
    assert lost == []
    assert await backend.counts(QUEUE) == QueueCounts()


async def test_concurrent_pop_unique(backends: BackendFactory, backend: Backend) -> None:
    jobs = [message() for _ in range(200)]
    await backend.enqueue(jobs)
    workers = [await backends.open_clone(backend) for _ in range(4)]

    async def drain(worker: Backend, worker_id: str) -> list[str]:
        popped: list[str] = []
        while True:
            batch = await pop(worker, worker_id=worker_id, count=7, timeout_s=0.05)
            if not batch:
                return popped
            popped.extend(ids(batch))
            lost = await worker.ack(worker_id, batch)
            assert lost == [], f"{worker_id} lost jobs it had just popped: {lost}"

    results = await asyncio.wait_for(
        asyncio.gather(*(drain(worker, f"worker-{n}") for n, worker in enumerate(workers))),
        timeout=60.0,
    )
    popped = [job_id for result in results for job_id in result]
    repeated = [job_id for job_id, seen in Counter(popped).items() if seen > 1]

    assert repeated == []
    assert sorted(popped) == sorted(ids_of(jobs))
    assert await backend.counts(QUEUE) == QueueCounts()
