"""`Queue`: the object handlers push jobs to, and where each push goes.

`push()` validates and encodes the job at once, so bad state raises in the caller, and returns
the job id. Where the job goes depends on where `push()` runs:

- during an HTTP request handled by `QueueMiddleware`: into the request's buffer, sent after
  the response by the middleware's flush policy;
- inside a job run by `spark-worker`: into the job's buffer, sent once `run()` returned
  without raising (a job that fails and is retried pushes again on its next attempt);
- elsewhere on a running event loop (a lifespan hook, a websocket handler, a script's
  `asyncio.run`): into the queue's own buffer, sent by a task scheduled at once; `await
  queue.flush()` waits until it is stored and raises if it could not be;
- with no running event loop (a plain script, a thread of your own): sent before `push()`
  returns, through a helper thread, and a failure raises from `push()`.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import logging
import os
import threading
from collections.abc import Sequence
from types import TracebackType

from spark_bg import encoding
from spark_bg.backends import Backend, FailedJob, Message, QueueCounts, from_url
from spark_bg.errors import BackendError, ConfigurationError
from spark_bg.job import Job, build_envelope, new_job_id

__all__ = ["DEFAULT_URL", "Buffer", "Queue", "current_queue"]

logger = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///spark_bg.sqlite3"
"""The embedded default: a SQLite file in the working directory of the web app and worker."""

URL_ENV = "SPARK_QUEUE_URL"

FLUSH_ATTEMPTS = 3
FLUSH_RETRY_DELAY_S = 0.2
"""First pause between flush attempts; it doubles after each, so a failing flush gives up
after about 0.6 s plus the attempts' own timeouts."""

SYNC_SEND_TIMEOUT_S = 30.0


class Buffer:
    """Jobs pushed within one request or one job run, sent together by one `flush()`."""

    __slots__ = ("always", "closed", "entries", "owner")

    def __init__(self, owner: Queue) -> None:
        self.owner = owner
        self.entries: list[Message] = []
        """Every job pushed, in push order."""
        self.always: list[Message] = []
        """The jobs pushed with `always=True`, which are sent even after a failure."""
        self.closed = False

    def messages(self, *, succeeded: bool) -> list[Message]:
        """Return the messages to send: all of them, or only `always` ones after a failure."""
        return self.entries if succeeded else self.always


# The buffer that `push()` adds to in the current context. `QueueMiddleware` sets one per request.
_current_buffer: contextvars.ContextVar[Buffer | None] = contextvars.ContextVar(
    "spark_bg_buffer", default=None
)


def resolve_url(url: str | None) -> str:
    """Return `url`, else `$SPARK_QUEUE_URL`, else the SQLite default."""
    if url:
        return url
    return os.environ.get(URL_ENV) or DEFAULT_URL


class Queue:
    """Jobs in, to one backend: `push()` them, `flush()` what is buffered.

    `target` is a URL (`redis://`, `rediss://`, `sqlite:///path`, `memory://`), a `Backend`,
    or `None` for `$SPARK_QUEUE_URL` and then the SQLite default. An invalid URL raises
    `ConfigurationError` here.
    """

    def __init__(
        self, target: str | Backend | None = None, *, jobs_from: Sequence[str] = ()
    ) -> None:
        if isinstance(target, Backend):
            self.backend = target
        elif target is None or isinstance(target, str):
            self.backend = from_url(resolve_url(target))
        else:
            raise ConfigurationError(
                f"invalid queue {target!r}: expected a URL string or a spark_bg Backend"
            )
        self.url = self.backend.url
        self.jobs_from = tuple(jobs_from)
        """Packages the worker may import job classes from, beside the app's own package."""
        self._opened = False
        self._closed = False
        self._open_lock: asyncio.Lock | None = None
        self._ambient: list[Message] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._soon: list[Message] = []
        self._soon_task: asyncio.Task[None] | None = None
        self._send_busy = False
        self._send_waiting: list[tuple[Sequence[Message], asyncio.Future[bool]]] = []
        self._sync_sender: _SyncSender | None = None

    def __repr__(self) -> str:
        return f"Queue({self.url!r})"

    # Opening and closing

    async def open(self) -> None:
        """Connect the backend; later calls do nothing. Raises `BackendError` on failure."""
        if self._opened:
            return
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if not self._opened:
                if self._closed:
                    # A closed backend cannot reopen; a fresh copy can, for a queue that is
                    # used again after `aclose()` (a test app started twice, say).
                    self.backend = self.backend.clone()
                    self._closed = False
                await self.backend.open()
                self._opened = True

    async def aclose(self) -> None:
        """Send what is buffered, then close the backend."""
        try:
            await self.flush()
        except BackendError:
            logger.exception("jobs buffered outside a request were not sent before closing")
        if self._sync_sender is not None:
            self._sync_sender.close()
            self._sync_sender = None
        if self._opened:
            self._opened = False
            self._closed = True
            await self.backend.close()

    async def __aenter__(self) -> Queue:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Pushing

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
        """Validate and encode `job`, hand it on (see the module docs), and return its id.

        `queue`, `max_attempts` and `timeout_s` override the job class's options. `delay`
        (seconds or a timedelta) or `run_at` (a timezone-aware datetime) defer the job.
        `always=True` sends it even when the request fails. `job_id` sets the id: pushing an
        id that is still pending stores nothing new.
        """
        message = _build_message(job, queue, delay, run_at, job_id, max_attempts, timeout_s)
        buffer = _current_buffer.get()
        if buffer is not None and buffer.owner is self and not buffer.closed:
            buffer.entries.append(message)
            if always:
                buffer.always.append(message)
            return message.id
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send_now([message])
            return message.id
        self._ambient.append(message)
        if len(self._ambient) == 1:
            # The send starts on the loop's next turn, so that an `await queue.flush()` right
            # after the push sends directly and pushes made in one turn go in one round trip.
            loop.call_soon(self._start_ambient_send, loop)
        return message.id

    def _start_ambient_send(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._ambient:
            return
        task = loop.create_task(self._send_ambient())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def build_message(
        self,
        job: Job,
        *,
        queue: str | None = None,
        delay: float | dt.timedelta | None = None,
        run_at: dt.datetime | None = None,
        job_id: str | None = None,
        max_attempts: int | None = None,
        timeout_s: float | None = None,
    ) -> Message:
        """Validate and encode `job` into the message that the backend stores."""
        return _build_message(job, queue, delay, run_at, job_id, max_attempts, timeout_s)

    async def flush(self) -> None:
        """Send the jobs pushed outside a request and wait until they are stored.

        Raises `BackendError` if they could not be stored; they are then dropped, and the
        error is logged with their ids.
        """
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        if self._ambient:
            await self._send_ambient(raise_errors=True)

    async def _send_ambient(self, *, raise_errors: bool = False) -> None:
        messages, self._ambient = self._ambient, []
        if not messages:
            return
        sent = await self.send(messages, context="outside a request")
        if not sent and raise_errors:
            raise BackendError(f"{len(messages)} jobs were not stored; see the error log")

    def send_soon(self, messages: Sequence[Message]) -> None:
        """Store `messages` from a background task, with the retries and logging of `send`.

        Messages handed over while that task runs go together in its next round trip.
        `flush()` and `aclose()` wait for the task.
        """
        self._soon.extend(messages)
        if self._soon_task is None:
            task = asyncio.get_running_loop().create_task(self._send_soon_loop())
            self._soon_task = task
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_soon_loop(self) -> None:
        try:
            while self._soon:
                batch, self._soon = self._soon, []
                await self.send(batch, context="after requests")
        finally:
            self._soon_task = None

    async def send(self, messages: Sequence[Message], *, context: str) -> bool:
        """Store `messages`, retrying briefly; log at ERROR with every job id if that fails.

        Returns whether they were stored, and never raises a backend error. While one send is
        in flight, later ones wait and then go together in one round trip, so concurrent
        requests share round trips instead of each paying for one.
        """
        if self._send_busy:
            waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._send_waiting.append((messages, waiter))
            return await waiter
        self._send_busy = True
        try:
            stored = await self._store(messages, context)
            await self._store_waiting()
        finally:
            self._send_busy = False
            if self._send_waiting:
                # This send was cancelled while others waited on it; a task takes over.
                self._send_busy = True
                task = asyncio.get_running_loop().create_task(self._take_over_waiting())
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
        return stored

    async def _take_over_waiting(self) -> None:
        try:
            await self._store_waiting()
        finally:
            self._send_busy = False

    async def _store_waiting(self) -> None:
        while self._send_waiting:
            group, self._send_waiting = self._send_waiting, []
            merged = [message for messages, _ in group for message in messages]
            stored = await self._store(merged, context=f"by {len(group)} concurrent flushes")
            for _, waiter in group:
                if not waiter.done():
                    waiter.set_result(stored)

    async def _store(self, messages: Sequence[Message], context: str) -> bool:
        delay_s = FLUSH_RETRY_DELAY_S
        for attempt in range(1, FLUSH_ATTEMPTS + 1):
            try:
                if not self._opened:
                    await self.open()
                await self.backend.enqueue(messages)
                return True
            except BackendError as exc:
                if attempt == FLUSH_ATTEMPTS:
                    logger.error(
                        "lost %d jobs pushed %s after %d attempts: %s; job ids: %s",
                        len(messages),
                        context,
                        attempt,
                        exc,
                        " ".join(message.id for message in messages),
                    )
                    return False
                logger.warning(
                    "flush of %d jobs failed (attempt %d of %d), retrying in %.1f s: %s",
                    len(messages),
                    attempt,
                    FLUSH_ATTEMPTS,
                    delay_s,
                    exc,
                )
                await asyncio.sleep(delay_s)
                delay_s *= 2
        return False

    def _send_now(self, messages: list[Message]) -> None:
        if self._sync_sender is None:
            self._sync_sender = _SyncSender(self.backend.clone())
        self._sync_sender.send(messages)

    # Buffers used by the middleware and the worker

    def open_buffer(self) -> tuple[Buffer, contextvars.Token[Buffer | None]]:
        """Make a fresh buffer the target of `push()` in the current context."""
        buffer = Buffer(self)
        return buffer, _current_buffer.set(buffer)

    @staticmethod
    def close_buffer(buffer: Buffer, token: contextvars.Token[Buffer | None]) -> None:
        """Stop `buffer` taking pushes and restore the previous target."""
        buffer.closed = True
        _current_buffer.reset(token)

    # Failed jobs and counts

    async def failed(self, queue: str = "default", limit: int = 100) -> list[FailedJob]:
        """Return up to `limit` failed jobs of `queue`, newest first."""
        await self.open()
        return await self.backend.list_failed(queue, limit)

    async def retry_failed(self, queue: str = "default", ids: Sequence[str] | None = None) -> int:
        """Requeue failed jobs of `queue` (all when `ids` is None); return how many."""
        await self.open()
        return await self.backend.retry_failed(queue, ids)

    async def delete_failed(self, queue: str = "default", ids: Sequence[str] | None = None) -> int:
        """Delete failed jobs of `queue` (all when `ids` is None); return how many."""
        await self.open()
        return await self.backend.delete_failed(queue, ids)

    async def counts(self, queue: str = "default") -> QueueCounts:
        """Return the number of jobs of `queue` in each state."""
        await self.open()
        return await self.backend.counts(queue)


def _build_message(
    job: Job,
    queue: str | None,
    delay: float | dt.timedelta | None,
    run_at: dt.datetime | None,
    job_id: str | None,
    max_attempts: int | None,
    timeout_s: float | None,
) -> Message:
    # Positional parameters: `push()` runs this on every request, where keywords cost time.
    exclusive = job_id is not None
    if job_id is None:
        job_id = new_job_id()
    elif not isinstance(job_id, str) or not 1 <= len(job_id) <= 200 or "\0" in job_id:
        raise ValueError(
            f"invalid job_id {job_id!r}: use a string of 1 to 200 characters without NUL"
        )
    envelope = build_envelope(job, job_id, queue, max_attempts, timeout_s)
    return Message(
        job_id,
        envelope["queue"],
        encoding.dumps(envelope),
        _delay_seconds(delay, run_at),
        run_at.timestamp() if run_at is not None else None,
        exclusive,
    )


def _delay_seconds(delay: float | dt.timedelta | None, run_at: dt.datetime | None) -> float | None:
    if delay is not None and run_at is not None:
        raise ValueError("push() takes delay or run_at, not both")
    if run_at is not None:
        if not isinstance(run_at, dt.datetime):
            raise TypeError(f"run_at must be a datetime, got {type(run_at).__qualname__}")
        if run_at.tzinfo is None or run_at.utcoffset() is None:
            raise ValueError(
                f"run_at={run_at.isoformat()} is a naive datetime; attach a timezone, "
                "e.g. datetime.now(timezone.utc) + timedelta(minutes=5)"
            )
        return None
    if delay is None:
        return None
    seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else float(delay)
    if seconds < 0:
        raise ValueError(f"delay must be 0 or more seconds, got {seconds}")
    return seconds


class _SyncSender:
    """A thread with its own event loop and backend, for pushes made with no running loop."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="spark_bg-sync-sender", daemon=True
        )
        self.thread.start()
        self._opened = False

    def send(self, messages: list[Message]) -> None:
        future = asyncio.run_coroutine_threadsafe(self._enqueue(messages), self.loop)
        future.result(SYNC_SEND_TIMEOUT_S)

    async def _enqueue(self, messages: list[Message]) -> None:
        if not self._opened:
            await self.backend.open()
            self._opened = True
        await self.backend.enqueue(messages)

    def close(self) -> None:
        async def shutdown() -> None:
            if self._opened:
                await self.backend.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(SYNC_SEND_TIMEOUT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(SYNC_SEND_TIMEOUT_S)
            self.loop.close()


def current_buffer() -> Buffer | None:
    """Return the buffer `push()` currently adds to, if any."""
    return _current_buffer.get()


def current_queue() -> Queue | None:
    """Return the queue of the request or job being handled, or `None` outside both.

    Inside a job run by the worker, `current_queue().push(...)` sends follow-up jobs once
    `run()` returned without raising.
    """
    buffer = _current_buffer.get()
    return buffer.owner if buffer is not None else None
