"""The worker: takes jobs from the backend and runs them, with leases, retries and shutdown.

One asyncio loop fetches jobs (up to `concurrency + prefetch` held at once), runs async jobs as
tasks and sync jobs in a pool of threads (or a child process, see `Job.run_in_process`), and
acknowledges finished jobs in batches. A separate heartbeat thread, with its own event loop and
backend connection, renews the leases of every job the worker holds and returns jobs of dead
workers to their queue, so neither depends on job code giving the loop a turn.

A job is acknowledged only after `run()` returned. A job that raises is retried with
exponential backoff and jitter until `max_attempts`, then moved to the failed-job store with its
traceback. On stop the worker takes no new jobs, gives running ones `grace_s` seconds, then
cancels async ones and returns every unfinished job to its queue without using up an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import random
import socket
import time
import traceback
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spark_bg.backends import Backend, Delivery
from spark_bg.errors import BackendError, CancelJob, JobLoadError, RetryJob
from spark_bg.heartbeat import Heartbeat
from spark_bg.job import (
    Job,
    JobContext,
    JobLoader,
    _current_job,
    class_path,
    parse_envelope,
)
from spark_bg.process import run_in_child
from spark_bg.queue import Queue
from spark_bg.threads import JobThreads

__all__ = ["Worker", "WorkerSettings", "backoff_delay"]

logger = logging.getLogger(__name__)

ACK_FLUSH_TIMEOUT_S = 15.0
"""On stop, how long the worker waits for acknowledgements still to be sent."""


@dataclass(slots=True)
class WorkerSettings:
    """Worker options; every duration is in seconds."""

    queues: Sequence[str] = ("default",)
    """Queues to take jobs from, highest priority first."""
    concurrency: int = 16
    """Jobs run at the same time."""
    prefetch: int = 0
    """Jobs taken ahead of a free slot. They cut round trips for short jobs, but a job held
    beside one that kills its worker is charged a delivery too, toward `max_deliveries`."""
    burst: bool = False
    """Exit once no job is ready and none is running."""
    lease_s: float = 30.0
    """How long a job stays assigned without a heartbeat; renewed every third of it."""
    sweep_interval_s: float = 15.0
    """How often expired leases of dead workers are looked for."""
    grace_s: float = 30.0
    """On stop, how long running jobs may go on before they are returned to their queue."""
    max_deliveries: int = 5
    """Times a job may be handed out without finishing before it is failed as a crasher."""
    reconnect_max_s: float = 10.0
    """Upper bound of the wait between attempts to reach a backend that failed."""
    jobs_from: Sequence[str] = ()
    """Packages job classes may be imported from."""


CLAIM_GATHER_S = 0.0005
"""Seconds a claim waits while jobs run and fewer than half the slots are free, so that one
round trip fills several slots. An idle worker claims at once."""

ACK_GATHER_S = 0.0005
"""Seconds the acknowledgement of fewer than `ACK_GATHER_COUNT` jobs waits while other jobs
run, so that one round trip acknowledges several."""

ACK_GATHER_COUNT = 8


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Return the delay before retrying after failed `attempt` (1 for the first run).

    The delay doubles per attempt up to `max_s`, and a uniform jitter keeps it between half
    and all of that, so it is never zero for a positive base and jobs that failed together
    spread out.
    """
    ceiling = min(max_s, base_s * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


class Worker:
    """Runs jobs from `queue`'s backend until stopped (or, in burst mode, until idle)."""

    def __init__(self, queue: Queue, settings: WorkerSettings | None = None) -> None:
        self.queue = queue
        self.settings = settings or WorkerSettings()
        if self.settings.concurrency < 1:
            raise ValueError(f"concurrency must be 1 or more, got {self.settings.concurrency}")
        self.backend: Backend = queue.backend
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.loader = JobLoader(tuple(self.settings.jobs_from) + tuple(queue.jobs_from))
        self.held: dict[str, Delivery] = {}
        """Jobs leased to this worker: waiting, running, or finished and not yet acknowledged."""
        self.jobs_done = 0
        self.jobs_failed = 0
        self._local: deque[Delivery] = deque()
        self._running: dict[asyncio.Future[None], Delivery] = {}
        self._to_ack: list[Delivery] = []
        self._settling: set[str] = set()
        self._acks_closing = False
        self._ack_wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopping = False
        self._threads: JobThreads | None = None
        self._heartbeat: Heartbeat | None = None

    # Control

    def stop(self) -> None:
        """Stop taking jobs; `run()` then finishes running ones within `grace_s` and returns."""
        if not self._stopping:
            self._stopping = True
            logger.info("worker %s stopping: no new jobs are taken", self.worker_id)
        self._stop.set()

    async def run(self) -> None:
        """Run jobs until `stop()` (or, in burst mode, until no job is left)."""
        settings = self.settings
        await self._open_backend()
        # Opening may replace a backend that was closed before with a fresh copy.
        self.backend = self.queue.backend
        self._threads = JobThreads(settings.concurrency, asyncio.get_running_loop())
        self._heartbeat = Heartbeat(self)
        self._heartbeat.start()
        acker = asyncio.create_task(self._ack_loop())
        logger.info(
            "worker %s started: queues %s, concurrency %d, backend %s",
            self.worker_id,
            ",".join(settings.queues),
            settings.concurrency,
            self.queue.url,
        )
        try:
            await self._consume()
            await self._drain_running()
        finally:
            await self._flush_acks_until_done(acker)
            self._heartbeat.stop()
            await self._release_local()
            self._threads.shutdown()
            await self.queue.aclose()
            logger.info(
                "worker %s stopped: %d jobs done, %d failed",
                self.worker_id,
                self.jobs_done,
                self.jobs_failed,
            )

    async def _open_backend(self) -> None:
        delay_s = 0.5
        attempt = 1
        while True:
            try:
                await self.queue.open()
                return
            except BackendError as exc:
                if self._stopping:
                    raise
                logger.warning(
                    "cannot reach the backend (attempt %d), retrying in %.1f s: %s",
                    attempt,
                    delay_s,
                    exc,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay_s)
                delay_s = min(delay_s * 2, self.settings.reconnect_max_s)
                attempt += 1

    # Fetching

    async def _consume(self) -> None:
        settings = self.settings
        capacity = settings.concurrency + settings.prefetch
        pop_task: asyncio.Task[list[Delivery]] | None = None
        failures = 0
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while not self._stopping:
                while self._local and len(self._running) < settings.concurrency:
                    self._start(self._local.popleft())
                free = capacity - len(self._running) - len(self._local)
                if pop_task is None and free > 0:
                    pop_task = asyncio.create_task(self._fetch(capacity, free))
                self._slot_freed.clear()
                waiting: set[asyncio.Future[Any]] = {stop_wait}
                if pop_task is not None:
                    waiting.add(pop_task)
                if self._running:
                    waiting.add(asyncio.ensure_future(self._slot_freed.wait()))
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for future in waiting:
                    if future is not pop_task and future is not stop_wait and not future.done():
                        future.cancel()
                if pop_task is not None and pop_task in done:
                    finished, pop_task = pop_task, None
                    try:
                        deliveries = finished.result()
                    except BackendError as exc:
                        failures += 1
                        await self._pause_after_failure("fetch", failures, exc)
                        continue
                    failures = 0
                    for delivery in deliveries:
                        self.held[delivery.id] = delivery
                    self._local.extend(deliveries)
                    idle = not deliveries and not self._running and not self._local
                    if settings.burst and idle:
                        logger.info("worker %s: no job left, burst mode ends", self.worker_id)
                        return
        finally:
            stop_wait.cancel()
            if pop_task is not None:
                pop_task.cancel()
                with contextlib.suppress(BaseException):
                    deliveries = await pop_task
                    for delivery in deliveries:
                        self.held[delivery.id] = delivery
                    self._local.extend(deliveries)

    async def _fetch(self, capacity: int, free: int) -> list[Delivery]:
        """Claim jobs for the `free` slots, after a short wait when few are free."""
        settings = self.settings
        if self._running and free * 2 < settings.concurrency:
            # Few slots are free while jobs run. Waiting a moment for more to finish lets one
            # round trip claim jobs for several slots.
            await asyncio.sleep(CLAIM_GATHER_S)
            free = capacity - len(self._running) - len(self._local)
            if free <= 0:
                return []
        return await self.backend.pop(
            settings.queues,
            self.worker_id,
            count=free,
            lease_s=settings.lease_s,
            timeout_s=0.0 if settings.burst else 1.0,
        )

    async def _pause_after_failure(self, what: str, failures: int, exc: Exception) -> None:
        delay_s = min(self.settings.reconnect_max_s, 0.25 * 2 ** (failures - 1))
        delay_s = random.uniform(delay_s / 2, delay_s)
        logger.warning(
            "%s from the backend failed (attempt %d), retrying in %.2f s: %s",
            what,
            failures,
            delay_s,
            exc,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay_s)

    # Running

    def _start(self, delivery: Delivery) -> None:
        task = asyncio.ensure_future(self._execute(delivery))
        self._running[task] = delivery
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._running.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("internal error while running a job", exc_info=task.exception())

    async def _execute(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        try:
            envelope = parse_envelope(delivery.payload)
            job = self.loader.rebuild(envelope)
        except (JobLoadError, KeyError, TypeError, ValueError) as exc:
            logger.error("job %s on %s cannot be loaded: %s", delivery.id, delivery.queue, exc)
            await self._settle_failed(delivery, f"cannot load job: {exc}", "?", started, log=False)
            return
        cls = type(job)
        name = class_path(cls)
        max_attempts = int(envelope.get("max_attempts", cls.max_attempts))
        timeout_s = envelope.get("timeout_s", cls.timeout_s)
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "job %s %s started on %s, attempt %d of %d",
                delivery.id,
                name,
                delivery.queue,
                delivery.attempt,
                max_attempts,
            )
        context = JobContext(
            id=delivery.id,
            queue=delivery.queue,
            attempt=delivery.attempt,
            max_attempts=max_attempts,
            enqueued_at=float(envelope.get("enqueued_at", 0.0)),
        )
        buffer, token = self.queue.open_buffer()
        job_token = _current_job.set(context)
        try:
            await self._run_job(job, delivery, timeout_s)
        except asyncio.CancelledError:
            raise
        except RetryJob as request:
            await self._after_failure(
                delivery, name, max_attempts, started, request, delay_s=request.delay_s
            )
            return
        except BaseException as exc:
            final = isinstance(exc, (CancelJob, *cls.fail_on))
            if not isinstance(exc, Exception):
                # SystemExit or KeyboardInterrupt raised by job code fails the attempt only.
                final = False
            await self._after_failure(delivery, name, max_attempts, started, exc, final=final)
            return
        finally:
            _current_job.reset(job_token)
            Queue.close_buffer(buffer, token)
        messages = buffer.messages(succeeded=True)
        if messages and not await self.queue.send(messages, context=f"by job {delivery.id}"):
            error = BackendError(f"the {len(messages)} jobs it pushed could not be stored")
            await self._after_failure(delivery, name, max_attempts, started, error)
            return
        self.jobs_done += 1
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "job %s %s done on %s in %.3f s",
                delivery.id,
                name,
                delivery.queue,
                time.perf_counter() - started,
            )
        self._to_ack.append(delivery)
        self._ack_wakeup.set()

    async def _run_job(self, job: Job, delivery: Delivery, timeout_s: float | None) -> None:
        cls = type(job)
        run = job.run
        if inspect.iscoroutinefunction(run):
            async with asyncio.timeout(timeout_s):
                await run()
            return
        if cls.run_in_process:
            await run_in_child(delivery.payload, tuple(self.loader.packages), timeout_s)
            return
        assert self._threads is not None
        context = contextvars.copy_context()
        if timeout_s is None:
            result = await self._threads.submit(context.run, run)
        else:
            result = await self._run_in_thread_with_timeout(context, run, timeout_s)
        if result is not None and inspect.isawaitable(result):
            async with asyncio.timeout(timeout_s):
                await result

    async def _run_in_thread_with_timeout(
        self, context: contextvars.Context, run: Any, timeout_s: float
    ) -> Any:
        assert self._threads is not None
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()

        def run_in_thread() -> Any:
            loop.call_soon_threadsafe(_resolve, started)
            return context.run(run)

        future = self._threads.submit(run_in_thread)
        # The timeout counts from the start of run(), not from the wait for a free thread.
        await asyncio.wait({started, future}, return_when=asyncio.FIRST_COMPLETED)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise TimeoutError(
                f"timed out after {timeout_s} s; the thread running it cannot be stopped and "
                "goes on in the background (set run_in_process = True to kill it instead)"
            ) from None

    async def _after_failure(
        self,
        delivery: Delivery,
        name: str,
        max_attempts: int,
        started: float,
        exc: BaseException,
        *,
        delay_s: float | None = None,
        final: bool = False,
    ) -> None:
        error = "".join(traceback.format_exception(exc))
        duration = time.perf_counter() - started
        if final or delivery.attempt >= max_attempts:
            logger.error(
                "job %s %s failed on %s in %.3f s, attempt %d of %d, no retry left: %r",
                delivery.id,
                name,
                delivery.queue,
                duration,
                delivery.attempt,
                max_attempts,
                exc,
            )
            await self._settle_failed(delivery, error, name, started, log=False)
            return
        if delay_s is None:
            cls = self.loader.load_class(name)
            delay_s = backoff_delay(delivery.attempt, cls.backoff_base_s, cls.backoff_max_s)
        logger.warning(
            "job %s %s failed on %s in %.3f s, attempt %d of %d, retry in %.2f s: %r",
            delivery.id,
            name,
            delivery.queue,
            duration,
            delivery.attempt,
            max_attempts,
            delay_s,
            exc,
        )
        await self._settle(
            delivery, "retry", lambda: self.backend.retry(self.worker_id, delivery, delay_s)
        )

    async def _settle_failed(
        self, delivery: Delivery, error: str, name: str, started: float, *, log: bool = True
    ) -> None:
        self.jobs_failed += 1
        if log:
            logger.error(
                "job %s %s failed on %s in %.3f s: %s",
                delivery.id,
                name,
                delivery.queue,
                time.perf_counter() - started,
                error.splitlines()[-1] if error else "",
            )
        await self._settle(
            delivery, "fail", lambda: self.backend.fail(self.worker_id, delivery, error)
        )

    async def _settle(self, delivery: Delivery, what: str, call: Any) -> None:
        """Run a settlement, retrying while the backend is unreachable."""
        failures = 0
        self._settling.add(delivery.id)
        try:
            while True:
                try:
                    held = await call()
                    break
                except BackendError as exc:
                    failures += 1
                    if self._stopping and failures >= 3:
                        logger.error(
                            "job %s: %s not recorded, the backend is unreachable; its lease "
                            "will expire and it will run again: %s",
                            delivery.id,
                            what,
                            exc,
                        )
                        self.held.pop(delivery.id, None)
                        return
                    await self._pause_after_failure(f"{what} of job {delivery.id}", failures, exc)
            self.held.pop(delivery.id, None)
        finally:
            self._settling.discard(delivery.id)
        if not held:
            logger.warning(
                "job %s: %s not recorded, this worker lost its lease (it was returned to "
                "the queue, and another worker may run it)",
                delivery.id,
                what,
            )

    # Acknowledging

    async def _ack_loop(self) -> None:
        """Acknowledge finished jobs in batches until `_acks_closing` is set and none is left.

        It is stopped by the flag, never cancelled, so an acknowledgement in flight completes.
        """
        failures = 0
        while True:
            if not self._to_ack:
                if self._acks_closing:
                    return
                await self._ack_wakeup.wait()
                self._ack_wakeup.clear()
                continue
            if len(self._to_ack) < ACK_GATHER_COUNT and self._running and not self._acks_closing:
                # Other jobs are about to finish. Waiting a moment lets one round trip
                # acknowledge several.
                await asyncio.sleep(ACK_GATHER_S)
            batch, self._to_ack = self._to_ack, []
            self._settling.update(delivery.id for delivery in batch)
            try:
                lost = await self.backend.ack(self.worker_id, batch)
                for delivery in batch:
                    self.held.pop(delivery.id, None)
            except BackendError as exc:
                self._to_ack[:0] = batch
                failures += 1
                if self._acks_closing and failures >= 3:
                    return
                await self._pause_after_failure(f"ack of {len(batch)} jobs", failures, exc)
                continue
            finally:
                self._settling.difference_update(delivery.id for delivery in batch)
            failures = 0
            for job_id in lost:
                logger.warning(
                    "job %s finished, but this worker had lost its lease: it was returned "
                    "to the queue and another worker may run it again",
                    job_id,
                )

    async def _flush_acks_until_done(self, acker: asyncio.Task[None]) -> None:
        self._acks_closing = True
        self._ack_wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(acker), ACK_FLUSH_TIMEOUT_S)
        except TimeoutError:
            acker.cancel()
        if self._to_ack:
            logger.error(
                "%d finished jobs were not acknowledged; their leases will expire and they "
                "will run again: %s",
                len(self._to_ack),
                " ".join(delivery.id for delivery in self._to_ack),
            )

    # Stopping

    async def _drain_running(self) -> None:
        if not self._running:
            return
        grace_s = self.settings.grace_s
        logger.info(
            "worker %s waiting up to %.1f s for %d running jobs",
            self.worker_id,
            grace_s,
            len(self._running),
        )
        _, pending = await asyncio.wait(list(self._running), timeout=grace_s)
        if not pending:
            return
        unfinished = [self._running[task] for task in pending if task in self._running]
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
        for delivery in unfinished:
            logger.warning(
                "job %s on %s still running after the %.1f s grace period: returned to the "
                "queue without using up an attempt",
                delivery.id,
                delivery.queue,
                grace_s,
            )
        await self._release(unfinished)

    async def _release_local(self) -> None:
        waiting = list(self._local)
        self._local.clear()
        await self._release(waiting)

    async def _release(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        try:
            await self.backend.release(self.worker_id, deliveries)
        except BackendError as exc:
            logger.error(
                "could not return %d jobs to their queue; their leases will expire and they "
                "will run again: %s; job ids: %s",
                len(deliveries),
                exc,
                " ".join(delivery.id for delivery in deliveries),
            )
        for delivery in deliveries:
            self.held.pop(delivery.id, None)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
