"""Job store in one SQLite file: `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`.

The web process and any number of worker processes on the same host share the file. Every
write runs in a `BEGIN IMMEDIATE` transaction, which takes the file's write lock before it
reads anything, so no job is handed to two workers.

`open()` switches the file to WAL mode, in which readers do not wait for the writer; where a
filesystem lacks WAL support, it logs a warning and keeps the old mode. It also sets
`synchronous=NORMAL`: in WAL mode the file stays consistent after any crash, but a power cut
can undo the last transactions committed before it.

Each backend has one connection, used from worker threads through `asyncio.to_thread`, so the
event loop never waits for the file. Due times and leases use `time.time()` of the host, which
all processes sharing the file read.

A ready job's place in its queue is the key `(due_at, seq)`: jobs run in the order they became
due, and jobs due at the same time run in push order. `seq` comes from a counter stored in the
file. A released or recovered job gets a key lower than the first ready job of its queue.

Query settings: `poll_interval_s` (seconds between checks of an idle `pop()`, default 0.05),
`failed_max_count` and `failed_max_age_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar
from urllib.parse import unquote, urlsplit

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

__all__ = ["SQLiteBackend"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
"""Layout of the tables, stored in the file's `PRAGMA user_version`."""

DEFAULT_POLL_INTERVAL_S = 0.05

BUSY_TIMEOUT_S = 30.0
"""Seconds SQLite waits for another connection's lock before it reports the file busy."""

BUSY_RETRY_MAX_S = BUSY_TIMEOUT_S
"""Seconds after which a statement that keeps finding the file busy raises `BackendError`."""

BUSY_BACKOFF_FIRST_S = 0.01
BUSY_BACKOFF_MAX_S = 0.5

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS spark_bg_jobs (
        id TEXT PRIMARY KEY,
        queue TEXT NOT NULL,
        payload BLOB NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('ready', 'active', 'failed')),
        due_at REAL NOT NULL,
        seq INTEGER NOT NULL,
        lease_until REAL,
        owner TEXT,
        attempt INTEGER NOT NULL DEFAULT 1,
        deliveries INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        failed_at REAL
    )
    """,
    # Partial indexes: a query uses one only if its WHERE clause has the same literal
    # `state = '...'` test, so the queries below never bind the state as a parameter.
    """
    CREATE INDEX IF NOT EXISTS spark_bg_jobs_ready
    ON spark_bg_jobs (queue, due_at, seq) WHERE state = 'ready'
    """,
    """
    CREATE INDEX IF NOT EXISTS spark_bg_jobs_active
    ON spark_bg_jobs (queue, lease_until) WHERE state = 'active'
    """,
    """
    CREATE INDEX IF NOT EXISTS spark_bg_jobs_failed
    ON spark_bg_jobs (queue, failed_at, seq) WHERE state = 'failed'
    """,
    """
    CREATE TABLE IF NOT EXISTS spark_bg_meta (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )
    """,
    "INSERT OR IGNORE INTO spark_bg_meta (name, value) VALUES ('last_seq', 0)",
)

_OWN_TABLES = frozenset({"spark_bg_jobs", "spark_bg_meta"})

_HELD = "id = ? AND owner = ? AND state = 'active'"
"""WHERE clause of a job that the worker still holds: its id and the worker id as parameters."""

TransactionMode = Literal["read", "write", "none"]


class SQLiteBackend(Backend):
    """Job store in one SQLite file, shared by the processes of one host.

    Build it with `sqlite:///relative/path.db` or `sqlite:////absolute/path.db`; a relative
    path is resolved against the current directory when the backend is built.
    """

    def __init__(
        self,
        path: str,
        *,
        url: str | None = None,
        failed_limits: FailedStoreLimits | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        self.path = os.path.abspath(path)
        self.url = url if url is not None else f"sqlite:///{self.path}"
        self.failed_limits = failed_limits if failed_limits is not None else FailedStoreLimits()
        self.poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._closed = False
        self._background: set[asyncio.Future[None]] = set()

    @classmethod
    def from_url(cls, url: str, options: dict[str, str]) -> SQLiteBackend:
        """Build an unopened backend from a `sqlite:///...` URL; `options` is the parsed query.

        Raises `ConfigurationError` for a URL without a file path, with a host part, or with
        an unknown or invalid setting.
        """
        options = dict(options)
        limits = failed_limits_from_options(url, options)
        poll_interval_s = _parse_poll_interval(url, options.pop("poll_interval_s", None))
        reject_unknown_options(url, options, ("poll_interval_s",))
        _validate_failed_limits(url, limits)
        path = _path_from_url(url)
        return cls(path, url=url, failed_limits=limits, poll_interval_s=poll_interval_s)

    def clone(self) -> SQLiteBackend:
        """Return an unopened backend on the same file with the same settings."""
        return SQLiteBackend(
            self.path,
            url=self.url,
            failed_limits=replace(self.failed_limits),
            poll_interval_s=self.poll_interval_s,
        )

    # Connection

    async def open(self) -> None:
        """Open the file, switch it to WAL mode and create the tables if they are missing.

        Raises `ConfigurationError` if the file's directory does not exist or the file
        contains tables of another program, and `BackendError` if SQLite cannot open or set
        it up. Opening an open backend does nothing.
        """
        if self._closed:
            raise BackendError(f"backend {self.url} is closed: build a new one with clone()")
        if self._connection is not None:
            return
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise ConfigurationError(
                f"directory {directory!r} of the SQLite queue file {self.path!r} does not "
                "exist: create it, or change the path in the queue URL"
            )
        try:
            connection = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise BackendError(
                f"cannot open the SQLite queue file {self.path!r}: {exc}; "
                "check that the path is a file that this process may read and write"
            ) from exc

        with self._lock:
            self._connection = connection
        try:
            self._execute(self._configure, mode="none")
            self._execute(self._create_schema, mode="write")
        except BaseException:
            with self._lock:
                self._connection = None
            connection.close()
            raise
        logger.debug("opened SQLite queue file %s", self.path)

    def _configure(self, connection: sqlite3.Connection) -> None:
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        (journal_mode,) = connection.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(journal_mode).lower() != "wal":
            # SQLite keeps the old mode where WAL is unavailable, for example on some
            # network filesystems. Jobs stay safe, but readers then wait for writers.
            logger.warning(
                "SQLite queue file %s stays in journal mode %r because WAL mode is not "
                "available there; put it on a local filesystem for concurrent access",
                self.path,
                journal_mode,
            )
        connection.execute("PRAGMA synchronous = NORMAL")

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise BackendError(
                f"SQLite queue file {self.path!r} has schema version {version}, newer than "
                f"version {SCHEMA_VERSION} of this spark_bg: upgrade spark_bg in this process"
            )
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {name for (name,) in rows if not name.startswith("sqlite_")}
        foreign = sorted(tables - _OWN_TABLES)
        if foreign:
            # The queue stores its schema version in PRAGMA user_version, which another
            # program may use too, and its writes would contend with that program's.
            raise ConfigurationError(
                f"SQLite file {self.path!r} contains tables that spark_bg did not create "
                f"({', '.join(foreign[:5])}): give the job queue a file of its own, "
                "for example sqlite:///spark_bg_jobs.db"
            )
        for statement in _SCHEMA:
            connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def close(self) -> None:
        """Wait for pending writes, then close the connection; closing twice does nothing."""
        self._closed = True
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _execute(self, operation: Callable[[sqlite3.Connection], T], *, mode: TransactionMode) -> T:
        """Run `operation` on the connection, in one transaction unless `mode` is "none".

        A "write" transaction starts with `BEGIN IMMEDIATE`, so it holds the write lock from
        its first statement. While another connection holds the lock, SQLite itself waits up
        to `BUSY_TIMEOUT_S`. Some busy errors skip that wait, so the whole transaction is
        retried with a growing pause, for at most `BUSY_RETRY_MAX_S`. Runs in a worker thread.
        """
        with self._lock:
            connection = self._connection
            if connection is None:
                state = "closed" if self._closed else "not open: call open() first"
                raise BackendError(f"backend {self.url} is {state}")

            started = time.monotonic()
            pause_s = BUSY_BACKOFF_FIRST_S
            retries = 0
            while True:
                try:
                    return _run_transaction(connection, operation, mode)
                except sqlite3.OperationalError as exc:
                    elapsed_s = time.monotonic() - started
                    if not _is_busy(exc):
                        raise BackendError(_describe_error(self.path, exc)) from exc
                    if elapsed_s >= BUSY_RETRY_MAX_S:
                        raise BackendError(
                            f"SQLite queue file {self.path!r} stayed locked by another "
                            f"connection for {elapsed_s:.1f} s ({retries} retries, {exc}): "
                            "look for a process that keeps a transaction open, "
                            "or move the file to a faster local disk"
                        ) from exc
                    retries += 1
                    jittered_s = pause_s * random.uniform(0.5, 1.0)
                    logger.debug(
                        "SQLite queue file %s is busy (%s); retry %d in %.3f s",
                        self.path,
                        exc,
                        retries,
                        jittered_s,
                    )
                    time.sleep(jittered_s)
                    pause_s = min(pause_s * 2, BUSY_BACKOFF_MAX_S)
                except sqlite3.Error as exc:
                    raise BackendError(_describe_error(self.path, exc)) from exc

    async def _run(
        self, operation: Callable[[sqlite3.Connection], T], *, mode: TransactionMode
    ) -> T:
        return await asyncio.to_thread(self._execute, operation, mode=mode)

    # Jobs

    async def enqueue(self, messages: Sequence[Message]) -> None:
        """Store `messages` in one transaction, skipping ids already in the file."""
        if not messages:
            return
        await self._run(lambda connection: _insert(connection, messages), mode="write")

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

        While no job is due, checks the file every `poll_interval_s` seconds until
        `timeout_s` passes. If the call is cancelled while a claim is in flight, the claimed
        jobs are released again, so they do not wait for their lease to expire.
        """
        if count < 1:
            raise ValueError(f"pop() count must be 1 or more, got {count}")
        queue_names = _unique(queues)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        while True:
            deliveries = await self._claim(queue_names, worker_id, count, lease_s)
            remaining_s = deadline - loop.time()
            if deliveries or remaining_s <= 0:
                return deliveries
            await asyncio.sleep(min(self.poll_interval_s, remaining_s))

    async def _claim(
        self, queues: list[str], worker_id: str, count: int, lease_s: float
    ) -> list[Delivery]:
        """Claim due jobs in a worker thread; hand them back if the caller is cancelled."""
        handoff = _ClaimHandoff()

        def claim_in_thread() -> list[Delivery]:
            # Reading first keeps idle polls from taking the write lock.
            if not self._execute(lambda connection: _any_due(connection, queues), mode="none"):
                return []
            with handoff.lock:
                if handoff.cancelled:
                    return []
            deliveries = self._execute(
                lambda connection: _claim_due(connection, queues, worker_id, count, lease_s),
                mode="write",
            )
            with handoff.lock:
                if not handoff.cancelled:
                    handoff.deliveries = deliveries
                    return deliveries
            self._execute(
                lambda connection: _release(connection, worker_id, deliveries), mode="write"
            )
            logger.debug("released %d jobs claimed by a cancelled pop()", len(deliveries))
            return []

        try:
            return await asyncio.to_thread(claim_in_thread)
        except asyncio.CancelledError:
            with handoff.lock:
                handoff.cancelled = True
                claimed = handoff.deliveries
            if claimed:
                # The thread finished its claim before the cancellation arrived.
                self._release_in_background(worker_id, claimed)
            raise

    def _release_in_background(self, worker_id: str, deliveries: list[Delivery]) -> None:
        future = asyncio.ensure_future(self.release(worker_id, deliveries))
        self._background.add(future)

        def forget(done: asyncio.Future[None]) -> None:
            self._background.discard(done)
            if not done.cancelled() and done.exception() is not None:
                logger.error(
                    "failed to release jobs %s claimed by a cancelled pop(): %s; "
                    "they run again once their lease expires",
                    [delivery.id for delivery in deliveries],
                    done.exception(),
                )

        future.add_done_callback(forget)

    async def ack(self, worker_id: str, deliveries: Sequence[Delivery]) -> list[str]:
        """Delete finished jobs; return the ids that `worker_id` no longer held."""
        if not deliveries:
            return []

        def delete(connection: sqlite3.Connection) -> list[str]:
            lost: list[str] = []
            for delivery in deliveries:
                cursor = connection.execute(
                    f"DELETE FROM spark_bg_jobs WHERE {_HELD}", (delivery.id, worker_id)
                )
                if cursor.rowcount == 0:
                    lost.append(delivery.id)
            return lost

        return await self._run(delete, mode="write")

    async def retry(self, worker_id: str, delivery: Delivery, delay_s: float) -> bool:
        """Queue another attempt, due after `delay_s`; `False` if the lease was lost."""

        def requeue(connection: sqlite3.Connection) -> bool:
            seq = _reserve_seq(connection, 1)
            cursor = connection.execute(
                "UPDATE spark_bg_jobs SET state = 'ready', due_at = ?, seq = ?, "
                "attempt = attempt + 1, deliveries = 0, owner = NULL, lease_until = NULL "
                f"WHERE {_HELD}",
                (time.time() + max(delay_s, 0.0), seq, delivery.id, worker_id),
            )
            return cursor.rowcount == 1

        return await self._run(requeue, mode="write")

    async def fail(self, worker_id: str, delivery: Delivery, error: str) -> bool:
        """Move the job to the failed-job store; `False` if the lease was lost."""
        limits = self.failed_limits

        def move_to_failed(connection: sqlite3.Connection) -> bool:
            now = time.time()
            cursor = connection.execute(
                "UPDATE spark_bg_jobs SET state = 'failed', error = ?, failed_at = ?, "
                f"owner = NULL, lease_until = NULL WHERE {_HELD}",
                (error, now, delivery.id, worker_id),
            )
            if cursor.rowcount == 0:
                return False
            _trim_failed(connection, delivery.queue, limits, now)
            return True

        return await self._run(move_to_failed, mode="write")

    async def release(self, worker_id: str, deliveries: Sequence[Delivery]) -> None:
        """Return unfinished jobs to the front of their queue without using up an attempt.

        The jobs keep their order: the first of `deliveries` runs first. Jobs that
        `worker_id` no longer holds are left alone.
        """
        if not deliveries:
            return
        await self._run(
            lambda connection: _release(connection, worker_id, deliveries), mode="write"
        )

    async def renew(
        self, worker_id: str, deliveries: Sequence[Delivery], lease_s: float
    ) -> list[str]:
        """Extend the leases of jobs `worker_id` holds; return the ids it no longer held."""
        if not deliveries:
            return []

        def extend(connection: sqlite3.Connection) -> list[str]:
            lease_until = time.time() + lease_s
            lost: list[str] = []
            for delivery in deliveries:
                cursor = connection.execute(
                    f"UPDATE spark_bg_jobs SET lease_until = ? WHERE {_HELD}",
                    (lease_until, delivery.id, worker_id),
                )
                if cursor.rowcount == 0:
                    lost.append(delivery.id)
            return lost

        return await self._run(extend, mode="write")

    async def recover(self, queues: Sequence[str], max_deliveries: int) -> list[str]:
        """Requeue jobs whose lease expired, or fail those handed out `max_deliveries` times.

        Requeued jobs go to the front of their queue in their original order. This also
        drops failed jobs of `queues` that are past the failed-store limits.
        """
        queue_names = _unique(queues)
        limits = self.failed_limits
        moved, failed = await self._run(
            lambda connection: _recover(connection, queue_names, max_deliveries, limits),
            mode="write",
        )
        for job_id, queue, deliveries in failed:
            logger.warning(
                "failed job %s of queue %r: delivered %d times without finishing",
                job_id,
                queue,
                deliveries,
            )
        requeued = len(moved) - len(failed)
        if requeued:
            logger.info("requeued %d jobs whose lease expired", requeued)
        return moved

    # Failed-job store

    async def list_failed(self, queue: str, limit: int = 100) -> list[FailedJob]:
        """Return up to `limit` failed jobs of `queue`, newest first."""

        def select(connection: sqlite3.Connection) -> list[FailedJob]:
            rows = connection.execute(
                "SELECT id, queue, payload, error, attempt, failed_at FROM spark_bg_jobs "
                "WHERE queue = ? AND state = 'failed' ORDER BY failed_at DESC, seq DESC LIMIT ?",
                (queue, max(limit, 0)),
            )
            return [
                FailedJob(job_id, job_queue, bytes(payload), error or "", attempt, failed_at)
                for job_id, job_queue, payload, error, attempt, failed_at in rows
            ]

        return await self._run(select, mode="read")

    async def retry_failed(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Requeue failed jobs (all of `queue` when `ids` is None) with a fresh attempt count.

        Returns how many jobs were requeued. Ids that are not failed jobs of `queue` are
        skipped. All of a queue is requeued oldest failure first.
        """

        def requeue(connection: sqlite3.Connection) -> int:
            if ids is None:
                rows = connection.execute(
                    "SELECT id FROM spark_bg_jobs WHERE queue = ? AND state = 'failed' "
                    "ORDER BY failed_at, seq",
                    (queue,),
                )
                job_ids = [job_id for (job_id,) in rows]
            else:
                job_ids = _unique(ids)
            if not job_ids:
                return 0

            now = time.time()
            first_seq = _reserve_seq(connection, len(job_ids))
            requeued = 0
            for offset, job_id in enumerate(job_ids):
                cursor = connection.execute(
                    "UPDATE spark_bg_jobs SET state = 'ready', due_at = ?, seq = ?, attempt = 1, "
                    "deliveries = 0, error = NULL, failed_at = NULL "
                    "WHERE id = ? AND queue = ? AND state = 'failed'",
                    (now, first_seq + offset, job_id, queue),
                )
                requeued += cursor.rowcount
            return requeued

        return await self._run(requeue, mode="write")

    async def delete_failed(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Delete failed jobs (all of `queue` when `ids` is None); return how many."""

        def delete(connection: sqlite3.Connection) -> int:
            if ids is None:
                cursor = connection.execute(
                    "DELETE FROM spark_bg_jobs WHERE queue = ? AND state = 'failed'", (queue,)
                )
                return cursor.rowcount
            deleted = 0
            for job_id in _unique(ids):
                cursor = connection.execute(
                    "DELETE FROM spark_bg_jobs WHERE id = ? AND queue = ? AND state = 'failed'",
                    (job_id, queue),
                )
                deleted += cursor.rowcount
            return deleted

        return await self._run(delete, mode="write")

    async def counts(self, queue: str) -> QueueCounts:
        """Return the number of jobs of `queue` in each state; `ready` counts the due ones."""

        def count(connection: sqlite3.Connection) -> QueueCounts:
            now = time.time()

            def scalar(sql: str, *parameters: object) -> int:
                (value,) = connection.execute(sql, parameters).fetchone()
                return int(value)

            return QueueCounts(
                ready=scalar(
                    "SELECT COUNT(*) FROM spark_bg_jobs "
                    "WHERE queue = ? AND state = 'ready' AND due_at <= ?",
                    queue,
                    now,
                ),
                delayed=scalar(
                    "SELECT COUNT(*) FROM spark_bg_jobs "
                    "WHERE queue = ? AND state = 'ready' AND due_at > ?",
                    queue,
                    now,
                ),
                active=scalar(
                    "SELECT COUNT(*) FROM spark_bg_jobs WHERE queue = ? AND state = 'active'",
                    queue,
                ),
                failed=scalar(
                    "SELECT COUNT(*) FROM spark_bg_jobs WHERE queue = ? AND state = 'failed'",
                    queue,
                ),
            )

        return await self._run(count, mode="read")


@dataclass
class _ClaimHandoff:
    """Passes claimed jobs from the worker thread to `pop()`, or marks `pop()` as cancelled.

    Under `lock`, exactly one side acts: the thread stores the jobs while `pop()` still
    waits, or `pop()` marks itself cancelled first and the thread releases them.
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    cancelled: bool = False
    deliveries: list[Delivery] = field(default_factory=list)


def _run_transaction(
    connection: sqlite3.Connection,
    operation: Callable[[sqlite3.Connection], T],
    mode: TransactionMode,
) -> T:
    if mode == "none":
        return operation(connection)
    connection.execute("BEGIN IMMEDIATE" if mode == "write" else "BEGIN")
    try:
        result = operation(connection)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
        raise
    return result


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Return whether `exc` reports a lock held by another connection."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return True
    message = str(exc).lower()
    return "locked" in message or "busy" in message


_ERROR_HINTS = {
    "SQLITE_NOTADB": "point the queue URL at a new file or at one created by spark_bg",
    "SQLITE_CORRUPT": "restore the file from a backup or start a new one",
    "SQLITE_READONLY": "check that this process may write the file and its directory",
    "SQLITE_CANTOPEN": "check that the file and its directory exist and are accessible",
    "SQLITE_FULL": "free space on the disk that holds the file",
    "SQLITE_IOERR": "check the disk that holds the file",
}


def _describe_error(path: str, exc: sqlite3.Error) -> str:
    """Return a message for a failed statement, with a fix where the error code suggests one."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    hint = next((text for code, text in _ERROR_HINTS.items() if name.startswith(code)), None)
    message = f"SQLite statement on queue file {path!r} failed: {exc}"
    return f"{message}; {hint}" if hint else message


def _reserve_seq(connection: sqlite3.Connection, count: int) -> int:
    """Reserve `count` consecutive `seq` values above every one given out; return the first."""
    connection.execute(
        "UPDATE spark_bg_meta SET value = value + ? WHERE name = 'last_seq'", (count,)
    )
    (last,) = connection.execute(
        "SELECT value FROM spark_bg_meta WHERE name = 'last_seq'"
    ).fetchone()
    return int(last) - count + 1


def _front_key(connection: sqlite3.Connection, queue: str, now: float) -> tuple[float, int]:
    """Return a `(due_at, seq)` key, due at `now`, that sorts before every ready job of `queue`."""
    row = connection.execute(
        "SELECT due_at, seq FROM spark_bg_jobs WHERE queue = ? AND state = 'ready' "
        "ORDER BY due_at, seq LIMIT 1",
        (queue,),
    ).fetchone()
    if row is None:
        return now, 0
    due_at, seq = row
    return min(float(due_at), now), int(seq) - 1


def _insert(connection: sqlite3.Connection, messages: Sequence[Message]) -> None:
    now = time.time()
    first_seq = _reserve_seq(connection, len(messages))
    connection.executemany(
        "INSERT OR IGNORE INTO spark_bg_jobs (id, queue, payload, state, due_at, seq) "
        "VALUES (?, ?, ?, 'ready', ?, ?)",
        [
            (message.id, message.queue, message.payload, _due_at(message, now), first_seq + offset)
            for offset, message in enumerate(messages)
        ],
    )


def _due_at(message: Message, now: float) -> float:
    """Return when `message` is due; a due time in the past means now, behind the jobs due."""
    if message.delay_s is not None:
        return now + max(message.delay_s, 0.0)
    if message.run_at is not None:
        return max(message.run_at, now)
    return now


def _any_due(connection: sqlite3.Connection, queues: list[str]) -> bool:
    now = time.time()
    for queue in queues:
        row = connection.execute(
            "SELECT 1 FROM spark_bg_jobs WHERE queue = ? AND state = 'ready' AND due_at <= ? "
            "LIMIT 1",
            (queue, now),
        ).fetchone()
        if row is not None:
            return True
    return False


def _claim_due(
    connection: sqlite3.Connection, queues: list[str], worker_id: str, count: int, lease_s: float
) -> list[Delivery]:
    """Lease up to `count` due jobs to `worker_id`; call inside a write transaction."""
    now = time.time()
    deliveries: list[Delivery] = []
    for queue in queues:
        if len(deliveries) >= count:
            break
        rows = connection.execute(
            "SELECT id, payload, attempt, deliveries FROM spark_bg_jobs "
            "WHERE queue = ? AND state = 'ready' AND due_at <= ? ORDER BY due_at, seq LIMIT ?",
            (queue, now, count - len(deliveries)),
        ).fetchall()
        connection.executemany(
            "UPDATE spark_bg_jobs SET state = 'active', owner = ?, lease_until = ?, "
            "deliveries = deliveries + 1 WHERE id = ?",
            [(worker_id, now + lease_s, job_id) for job_id, _, _, _ in rows],
        )
        deliveries.extend(
            Delivery(job_id, queue, bytes(payload), attempt, delivered + 1)
            for job_id, payload, attempt, delivered in rows
        )
    return deliveries


def _release(
    connection: sqlite3.Connection, worker_id: str, deliveries: Sequence[Delivery]
) -> None:
    now = time.time()
    # Each job goes ahead of the previous one, so walk the list backwards.
    for delivery in reversed(deliveries):
        row = connection.execute(
            f"SELECT queue FROM spark_bg_jobs WHERE {_HELD}", (delivery.id, worker_id)
        ).fetchone()
        if row is None:
            continue
        due_at, seq = _front_key(connection, row[0], now)
        connection.execute(
            "UPDATE spark_bg_jobs SET state = 'ready', due_at = ?, seq = ?, "
            "deliveries = MAX(deliveries - 1, 0), owner = NULL, lease_until = NULL WHERE id = ?",
            (due_at, seq, delivery.id),
        )


def _recover(
    connection: sqlite3.Connection,
    queues: list[str],
    max_deliveries: int,
    limits: FailedStoreLimits,
) -> tuple[list[str], list[tuple[str, str, int]]]:
    """Requeue or fail jobs whose lease expired; call inside a write transaction.

    Returns the moved ids, and the id, queue and delivery count of each job it failed.
    """
    now = time.time()
    moved: list[str] = []
    failed: list[tuple[str, str, int]] = []
    for queue in queues:
        # Each requeued job goes ahead of the previous one, so take the last first.
        rows = connection.execute(
            "SELECT id, deliveries FROM spark_bg_jobs "
            "WHERE queue = ? AND state = 'active' AND lease_until < ? "
            "ORDER BY due_at DESC, seq DESC",
            (queue, now),
        ).fetchall()
        for job_id, deliveries in rows:
            moved.append(job_id)
            if deliveries >= max_deliveries:
                connection.execute(
                    "UPDATE spark_bg_jobs SET state = 'failed', error = ?, failed_at = ?, "
                    "owner = NULL, lease_until = NULL WHERE id = ?",
                    (_too_many_deliveries(deliveries), now, job_id),
                )
                failed.append((job_id, queue, deliveries))
            else:
                due_at, seq = _front_key(connection, queue, now)
                connection.execute(
                    "UPDATE spark_bg_jobs SET state = 'ready', due_at = ?, seq = ?, "
                    "owner = NULL, lease_until = NULL WHERE id = ?",
                    (due_at, seq, job_id),
                )
        _trim_failed(connection, queue, limits, now)
    return moved, failed


def _trim_failed(
    connection: sqlite3.Connection, queue: str, limits: FailedStoreLimits, now: float
) -> None:
    """Delete the failed jobs of `queue` that are older or further down than `limits` allow."""
    connection.execute(
        "DELETE FROM spark_bg_jobs WHERE queue = ? AND state = 'failed' AND failed_at < ?",
        (queue, now - limits.max_age_s),
    )
    connection.execute(
        "DELETE FROM spark_bg_jobs WHERE id IN ("
        "SELECT id FROM spark_bg_jobs WHERE queue = ? AND state = 'failed' "
        "ORDER BY failed_at DESC, seq DESC LIMIT -1 OFFSET ?)",
        (queue, limits.max_count),
    )


def _too_many_deliveries(deliveries: int) -> str:
    return f"delivered {deliveries} times without finishing; the job may crash its worker"


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _path_from_url(url: str) -> str:
    """Return the file path of a `sqlite:///...` URL, relative or absolute as written."""
    parts = urlsplit(url)
    if parts.netloc:
        raise ConfigurationError(
            f"invalid SQLite queue URL {url!r}: {parts.netloc!r} is read as a host name; "
            "write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    # The path after the third slash: "/jobs.db" is relative, "//srv/jobs.db" absolute.
    path = unquote(parts.path)[1:] if parts.path.startswith("/") else ""
    if not path or path.endswith("/"):
        raise ConfigurationError(
            f"invalid SQLite queue URL {url!r}: missing file name; "
            "write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    if path == ":memory:":
        raise ConfigurationError(
            f"invalid SQLite queue URL {url!r}: an in-memory SQLite database is not shared "
            "with workers; use memory:// for tests or a file path"
        )
    return path


def _parse_poll_interval(url: str, raw: str | None) -> float:
    if raw is None:
        return DEFAULT_POLL_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigurationError(
            f"invalid poll_interval_s={raw!r} in queue URL {url!r}: "
            "expected a number of seconds greater than 0, for example 0.05"
        )
    return value


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
