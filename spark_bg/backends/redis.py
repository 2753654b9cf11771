"""Redis backend: the production store, shared by any number of web processes and workers.

Each change is one Lua script on one queue's keys (see `redis_scripts`), so it is atomic and
stays in one cluster slot. A flush is one round trip whatever the number of jobs; a worker takes
up to `count` jobs per round trip.

An idle worker waits with `BLMOVE ready inbox`, which moves the next job into a list of the
worker's own; the worker starts that job at once and its next claim takes it from the inbox. A
wait cut short (cancelled, timed out, connection lost) therefore never loses a job, and the
block lasts at most `BLOCK_S` seconds, well under redis-py's default 5 s socket timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from spark_bg import encoding
from spark_bg.backends import failed_limits_from_options, reject_unknown_options
from spark_bg.backends import redis_scripts as scripts
from spark_bg.backends.base import (
    Backend,
    Delivery,
    FailedJob,
    FailedStoreLimits,
    Message,
    QueueCounts,
)
from spark_bg.errors import BackendError, ConfigurationError
from spark_bg.job import check_queue_name

__all__ = ["RedisBackend"]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "spark"

BLOCK_S = 1.0
"""Maximum seconds of one blocking wait; a longer `pop()` timeout loops over several."""

# redis-py retries a command whose connection failed; keep that short, because the worker and
# the middleware retry on their own with logging.
_COMMAND_RETRIES = 2

ADOPT_DELAY_S = 0.0002
"""Pause before claiming a job that the blocking wait handed over, so the job starts first."""


# Settings a redis:// URL may carry beside those redis-py itself reads.
_OWN_OPTIONS = ("prefix",)
_CLIENT_OPTIONS = (
    "socket_timeout",
    "socket_connect_timeout",
    "health_check_interval",
    "max_connections",
    "client_name",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)


class RedisBackend(Backend):
    """Jobs in Redis 7.0 or later, under `prefix` with a hash tag per queue."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        failed_limits: FailedStoreLimits | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.failed_limits = failed_limits or FailedStoreLimits()
        self._client_url = url
        self._client: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._waiters: dict[str, asyncio.Future[Any]] = {}
        self._adopting: dict[str, asyncio.Future[tuple[list[Delivery], float | None]]] = {}
        self._adopt_pending: dict[str, int] = {}
        self._push_lock = asyncio.Lock()
        self._push_connection: Any = None
        self._registered: dict[str, str] = {}
        """Queue -> id of the worker whose inbox the claims of this backend registered.

        Kept until close, which empties those inboxes once the waits are cancelled."""
        self._keys: dict[str, list[str]] = {}
        self._scripts: dict[str, AsyncScript] = {}

    @classmethod
    def from_url(cls, url: str, options: dict[str, str]) -> RedisBackend:
        """Build from a `redis://` or `rediss://` URL and its parsed query settings."""
        limits = failed_limits_from_options(url, options)
        reject_unknown_options(url, options, _OWN_OPTIONS + _CLIENT_OPTIONS)
        prefix = options.pop("prefix", DEFAULT_PREFIX)
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"invalid prefix {prefix!r} in queue URL {url!r}: use a non-empty name "
                "without braces"
            )
        parts = urlsplit(url)
        client_url = urlunsplit(parts._replace(query=urlencode(options)))
        backend = cls(url, prefix=prefix, failed_limits=limits)
        backend._client_url = client_url
        return backend

    def clone(self) -> RedisBackend:
        """Return an unopened backend with the same settings."""
        twin = RedisBackend(self.url, prefix=self.prefix, failed_limits=self.failed_limits)
        twin._client_url = self._client_url
        return twin

    def _make_client(self, *, blocking: bool) -> aioredis.Redis:
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), _COMMAND_RETRIES)
        return aioredis.Redis.from_url(
            self._client_url,
            protocol=2,
            decode_responses=False,
            retry=retry,
            # A blocking wait lasts BLOCK_S; the socket timeout must exceed it.
            socket_timeout=BLOCK_S + 4.0 if blocking else 5.0,
        )

    async def open(self) -> None:
        """Connect and PING the server; raise `BackendError` if that fails."""
        if self._client is not None:
            return
        self._client = self._make_client(blocking=False)
        self._blocking = self._make_client(blocking=True)
        for name in (
            "PUSH",
            "CLAIM",
            "ACK",
            "RETRY",
            "FAIL",
            "RELEASE",
            "RENEW",
            "RECOVER",
            "RETRY_FAILED",
            "DELETE_FAILED",
            "COUNTS",
        ):
            self._scripts[name] = self._client.register_script(getattr(scripts, name))
        try:
            await self._client.ping()
        except RedisError as exc:
            await self.close()
            raise BackendError(f"cannot connect to Redis at {_safe_url(self.url)}: {exc}") from exc

    async def close(self) -> None:
        """Cancel waits in progress, empty this worker's inboxes, close the connection pools."""
        if self._adopting:
            await asyncio.wait(list(self._adopting.values()), timeout=5.0)
        for task in self._waiters.values():
            task.cancel()
        for task in self._waiters.values():
            with contextlib.suppress(BaseException):
                await task
        self._waiters.clear()
        for worker_id in set(self._registered.values()):
            try:
                await self.release(worker_id, [])
            except BackendError as exc:
                logger.warning(
                    "could not empty the inbox of worker %s; a sweep returns its jobs once "
                    "the registration lapses: %s",
                    worker_id,
                    exc,
                )
        if self._push_connection is not None:
            with contextlib.suppress(Exception):
                await self._push_connection.disconnect()
            self._push_connection = None
        for client in (self._client, self._blocking):
            if client is not None:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()
        self._client = None
        self._blocking = None

    def keys(self, queue: str) -> list[str]:
        """Return the keys of `queue`, in the order every script expects."""
        keys = self._keys.get(queue)
        if keys is None:
            check_queue_name(queue)
            keys = [f"{self.prefix}:{{{queue}}}:{name}" for name in scripts.KEY_NAMES]
            self._keys[queue] = keys
        return keys

    def _connected(self) -> aioredis.Redis:
        if self._client is None:
            raise BackendError("the Redis backend is not open; call `await backend.open()` first")
        return self._client

    def inbox_key(self, queue: str, worker_id: str) -> str:
        """Return the key of the list where `worker_id`'s blocking wait puts what it takes."""
        return f"{self.prefix}:{{{queue}}}:inbox:{worker_id}"

    async def _run(
        self, name: str, queue: str, args: Sequence[Any], inbox_of: str | None = None
    ) -> Any:
        self._connected()
        keys = self.keys(queue)[: scripts.KEYS_USED[name]]
        if inbox_of is not None:
            keys = [*keys, self.inbox_key(queue, inbox_of)]
        try:
            return await self._scripts[name](keys=keys, args=args)
        except RedisError as exc:
            raise BackendError(f"Redis {name.lower()} on queue {queue!r} failed: {exc}") from exc

    async def enqueue(self, messages: Sequence[Message]) -> None:
        """Store `messages` in one round trip.

        Jobs due now with a generated id go on the ready list with one LPUSH per queue; the
        others (delayed, or with a caller's id to check) go through the push script.
        """
        client = self._connected()
        items: dict[str, list[bytes]] = {}
        scripted: dict[str, list[Any]] = {}
        for message in messages:
            if message.delay_s is not None:
                args = scripted.setdefault(message.queue, [])
                args += (message.id, message.payload, "d", int(message.delay_s * 1000))
            elif message.run_at is not None:
                args = scripted.setdefault(message.queue, [])
                args += (message.id, message.payload, "a", int(message.run_at * 1000))
            elif message.exclusive:
                args = scripted.setdefault(message.queue, [])
                args += (message.id, message.payload, "n", 0)
            else:
                items.setdefault(message.queue, []).append(
                    message.id.encode() + b"\0" + message.payload
                )
        try:
            if not scripted and len(items) == 1 and not self._push_lock.locked():
                [(queue, batch)] = items.items()
                await self._lpush_direct(self.keys(queue)[0], batch)
                return
            if not scripted and not items:
                return
            async with client.pipeline(transaction=False) as pipe:
                for queue, batch in items.items():
                    pipe.lpush(self.keys(queue)[0], *batch)
                for queue, args in scripted.items():
                    keys = self.keys(queue)[: scripts.KEYS_USED["PUSH"]]
                    await self._scripts["PUSH"](keys=keys, args=args, client=pipe)
                await pipe.execute()
        except RedisError as exc:
            raise BackendError(f"Redis push of {len(messages)} jobs failed: {exc}") from exc

    async def _lpush_direct(self, key: str, items: list[bytes]) -> None:
        """LPUSH on a connection of its own, skipping the pool and retry layers of redis-py.

        That saves about a quarter of the client's time per push when a producer sends one
        job at a time. A connection error is retried once on a new connection: a resent LPUSH
        stores a copy that the claim drops.
        """
        async with self._push_lock:
            for attempt in (1, 2):
                connection = self._push_connection
                if connection is None:
                    pool = self._connected().connection_pool
                    connection = pool.make_connection()  # type: ignore[no-untyped-call]
                    self._push_connection = connection
                try:
                    # hiredis packs the items in C, while redis-py's own packer checks each
                    # argument in Python first. hiredis's type stub declares a 1-tuple.
                    command = hiredis.pack_command(("LPUSH", key, *items))  # type: ignore[arg-type]
                    await connection.send_packed_command(command, check_health=False)
                    await connection.read_response()
                    return
                except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
                    self._push_connection = None
                    with contextlib.suppress(Exception):
                        await connection.disconnect()
                    if attempt == 2:
                        raise

    async def _claim(
        self, queue: str, worker_id: str, count: int, lease_s: float, adopt_id: str = ""
    ) -> tuple[list[Delivery], float | None]:
        # While a job started from the blocking wait awaits its claim, other claims leave the
        # inbox alone, so that they cannot hand its item out a second time.
        take_inbox = "0" if self._adopt_pending.get(queue) else "1"
        args = (worker_id, count, int(lease_s * 1000), take_inbox, adopt_id)
        reply = await self._run("CLAIM", queue, args, inbox_of=worker_id)
        self._registered[queue] = worker_id
        if not reply:
            return [], 0.0
        if len(reply) == 1:
            next_due_ms = int(reply[0])
            return [], None if next_due_ms < 0 else next_due_ms / 1000
        deliveries = [
            Delivery(
                id=reply[i].decode(),
                queue=queue,
                payload=reply[i + 1],
                attempt=int(reply[i + 2]),
                deliveries=int(reply[i + 3]),
            )
            for i in range(0, len(reply), 4)
        ]
        return deliveries, None

    async def pop(
        self,
        queues: Sequence[str],
        worker_id: str,
        *,
        count: int,
        lease_s: float,
        timeout_s: float,
    ) -> list[Delivery]:
        """Claim up to `count` jobs, queues in priority order, waiting up to `timeout_s`.

        When the blocking wait itself hands over a new job (an item carrying its payload), the
        job is returned at once, without waiting for the claim round trip; the claim runs
        meanwhile, and every settlement of that job waits for it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            taken: list[Delivery] = []
            next_due_s: float | None = None
            for queue in queues:
                claimed, due_s = await self._claim_safely(
                    queue, worker_id, count - len(taken), lease_s, taken
                )
                taken += claimed
                if due_s is not None:
                    next_due_s = due_s if next_due_s is None else min(next_due_s, due_s)
                if len(taken) >= count:
                    break
            remaining = deadline - loop.time()
            if taken or remaining <= 0:
                return taken
            wait_s = remaining if next_due_s is None else min(remaining, next_due_s)
            handed = await self._wait_for_any(queues, worker_id, wait_s)
            adopted = [self._adopt(queue, worker_id, item, lease_s) for queue, item in handed]
            early = [delivery for delivery in adopted if delivery is not None]
            if early:
                return early

    def _adopt(self, queue: str, worker_id: str, item: bytes, lease_s: float) -> Delivery | None:
        """Return a new job that the blocking wait put in the inbox, and claim it meanwhile.

        Only an item carrying its payload is a job pushed once and never handed out, so its
        attempt and delivery count are 1. Other items wait for the next claim.
        """
        job_id, nul, payload = item.partition(b"\0")
        if not nul:
            return None
        delivery = Delivery(
            id=job_id.decode(), queue=queue, payload=payload, attempt=1, deliveries=1
        )
        loop = asyncio.get_running_loop()
        claim: asyncio.Future[tuple[list[Delivery], float | None]] = loop.create_future()
        self._adopting[delivery.id] = claim
        self._adopt_pending[queue] = self._adopt_pending.get(queue, 0) + 1

        def start_claim() -> None:
            task = asyncio.ensure_future(
                self._claim(queue, worker_id, 1, lease_s, adopt_id=delivery.id)
            )
            task.add_done_callback(lambda done: _copy_outcome(done, claim))

        # The claim starts a moment later, so that the worker starts the job first.
        loop.call_later(ADOPT_DELAY_S, start_claim)

        def claimed(done: asyncio.Future[tuple[list[Delivery], float | None]]) -> None:
            if self._adopting.get(delivery.id) is done:
                del self._adopting[delivery.id]
            self._adopt_pending[queue] -= 1
            if done.cancelled() or done.exception() is not None:
                logger.warning(
                    "job %s: claim after the blocking wait failed; it stays in the inbox of "
                    "worker %s and is claimed again by its next fetch",
                    delivery.id,
                    worker_id,
                )
                return
            ids = [other.id for other in done.result()[0]]
            if ids != [delivery.id]:
                logger.warning(
                    "job %s was started from the blocking wait, but the claim returned %s; "
                    "it may have been a resent copy of a job already running",
                    delivery.id,
                    ids,
                )

        claim.add_done_callback(claimed)
        return delivery

    async def _claimed(self, deliveries: Sequence[Delivery]) -> None:
        """Wait until jobs started from the blocking wait are claimed."""
        if not self._adopting:
            return
        pending = [self._adopting[d.id] for d in deliveries if d.id in self._adopting]
        if pending:
            await asyncio.wait(pending)

    async def _claim_safely(
        self, queue: str, worker_id: str, count: int, lease_s: float, taken: list[Delivery]
    ) -> tuple[list[Delivery], float | None]:
        """Claim, and if the caller is cancelled meanwhile, put every claimed job back."""
        claim = asyncio.ensure_future(self._claim(queue, worker_id, count, lease_s))
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            claimed: list[Delivery] = []
            with contextlib.suppress(Exception):
                claimed, _ = await claim
            with contextlib.suppress(Exception):
                await self.release(worker_id, taken + claimed)
            raise

    async def _wait_for_any(
        self, queues: Sequence[str], worker_id: str, timeout_s: float
    ) -> list[tuple[str, bytes]]:
        """Block until a ready list of `queues` has a job, or `timeout_s` passed.

        Each wait is `BLMOVE ready inbox`: what it takes lands in the worker's inbox, where
        the next claim finds it, so a wait cut short loses nothing. Returns the items that
        waits completing during this call took, for `_adopt`.
        """
        if timeout_s <= 0:
            return []
        blocking = self._blocking
        if blocking is None:
            raise BackendError("the Redis backend is not open; call `await backend.open()` first")
        for queue, task in list(self._waiters.items()):
            if task.done():
                # It completed before the last claim, which took its item from the inbox.
                del self._waiters[queue]
                if not task.cancelled():
                    task.exception()
        block_s = max(0.01, min(BLOCK_S, timeout_s))
        for queue in queues:
            if queue not in self._waiters:
                ready = self.keys(queue)[0]
                inbox = self.inbox_key(queue, worker_id)
                # Waits still running from an earlier call are reused: each keeps a connection.
                self._waiters[queue] = asyncio.ensure_future(
                    blocking.execute_command(  # type: ignore[no-untyped-call]
                        "BLMOVE", ready, inbox, "RIGHT", "LEFT", block_s
                    )
                )
        done, _ = await asyncio.wait(
            self._waiters.values(), timeout=block_s + 1.0, return_when=asyncio.FIRST_COMPLETED
        )
        handed: list[tuple[str, bytes]] = []
        for queue, task in list(self._waiters.items()):
            if task in done:
                del self._waiters[queue]
                error = task.exception()
                if error is not None:
                    raise BackendError(f"Redis wait on queue {queue!r} failed: {error}") from error
                item = task.result()
                if item is not None:
                    handed.append((queue, item))
        return handed

    async def ack(self, worker_id: str, deliveries: Sequence[Delivery]) -> list[str]:
        """Delete finished jobs, one script call per queue."""
        await self._claimed(deliveries)
        lost: list[str] = []
        for queue, ids in _ids_by_queue(deliveries).items():
            reply = await self._run("ACK", queue, [worker_id, *ids])
            lost += [item.decode() for item in reply]
        return lost

    async def retry(self, worker_id: str, delivery: Delivery, delay_s: float) -> bool:
        """Schedule the next attempt in `delay_s` seconds of the server's clock."""
        await self._claimed([delivery])
        args = (worker_id, delivery.id, int(delay_s * 1000))
        return bool(await self._run("RETRY", delivery.queue, args))

    async def fail(self, worker_id: str, delivery: Delivery, error: str) -> bool:
        """Move the job to the failed store, trimmed to its bounds."""
        await self._claimed([delivery])
        limits = self.failed_limits
        args = (worker_id, delivery.id, error, limits.max_count, int(limits.max_age_s * 1000))
        return bool(await self._run("FAIL", delivery.queue, args))

    async def release(self, worker_id: str, deliveries: Sequence[Delivery]) -> None:
        """Return jobs, and what the worker's inboxes hold, to the front of their queues.

        Their delivery is not charged. The worker's inbox registrations are removed too.
        """
        await self._claimed(deliveries)
        grouped = _ids_by_queue(deliveries)
        for queue, registered_worker in self._registered.items():
            if registered_worker == worker_id:
                grouped.setdefault(queue, [])
        for queue, ids in grouped.items():
            await self._run("RELEASE", queue, [worker_id, *ids], inbox_of=worker_id)

    async def renew(
        self, worker_id: str, deliveries: Sequence[Delivery], lease_s: float
    ) -> list[str]:
        """Push back the lease deadline of every job `worker_id` holds."""
        await self._claimed(deliveries)
        lost: list[str] = []
        for queue, ids in _ids_by_queue(deliveries).items():
            reply = await self._run("RENEW", queue, [worker_id, int(lease_s * 1000), *ids])
            lost += [item.decode() for item in reply]
        return lost

    async def recover(self, queues: Sequence[str], max_deliveries: int) -> list[str]:
        """Requeue or fail jobs whose lease expired, and promote due delayed jobs."""
        limits = self.failed_limits
        moved: list[str] = []
        for queue in queues:
            args = (max_deliveries, limits.max_count, int(limits.max_age_s * 1000))
            reply = await self._run("RECOVER", queue, args)
            moved += [item.decode() for item in reply]
        return moved

    async def list_failed(self, queue: str, limit: int = 100) -> list[FailedJob]:
        """Return up to `limit` failed jobs, newest first."""
        client = self._connected()
        keys = dict(zip(scripts.KEY_NAMES, self.keys(queue), strict=True))
        try:
            entries: Any = await client.zrange(
                keys["failed"], 0, limit - 1, desc=True, withscores=True
            )
            if not entries:
                return []
            ids = [member for member, _ in entries]
            payloads: Any = await client.hmget(keys["jobs"], ids)
            infos: Any = await client.hmget(keys["failinfo"], ids)
        except RedisError as exc:
            raise BackendError(f"Redis listing of failed jobs of {queue!r} failed: {exc}") from exc
        failed = []
        for (member, score), payload, info in zip(entries, payloads, infos, strict=True):
            details = encoding.loads(info) if info else {}
            failed.append(
                FailedJob(
                    id=member.decode(),
                    queue=queue,
                    payload=payload or b"",
                    error=str(details.get("error", "")),
                    attempts=int(details.get("attempts", 1)),
                    failed_at=score // 1000 / 1000,
                )
            )
        return failed

    async def retry_failed(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Requeue failed jobs with a fresh attempt count."""
        args = ["1"] if ids is None else ["0", *ids]
        return int(await self._run("RETRY_FAILED", queue, args))

    async def delete_failed(self, queue: str, ids: Sequence[str] | None = None) -> int:
        """Delete failed jobs and their payloads."""
        args = ["1"] if ids is None else ["0", *ids]
        return int(await self._run("DELETE_FAILED", queue, args))

    async def counts(self, queue: str) -> QueueCounts:
        """Return the number of jobs of `queue` in each state."""
        ready, delayed, active, failed = await self._run("COUNTS", queue, ())
        return QueueCounts(ready=ready, delayed=delayed, active=active, failed=failed)


def _copy_outcome(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


def _ids_by_queue(deliveries: Sequence[Delivery]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for delivery in deliveries:
        grouped.setdefault(delivery.queue, []).append(delivery.id)
    return grouped


def _safe_url(url: str) -> str:
    """Return `url` with any password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))
