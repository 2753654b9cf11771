"""`QueueMiddleware`: a pure ASGI middleware that sends a request's jobs after its response.

For each HTTP request it makes a fresh buffer the target of `request.app.state.queue.push()`;
async endpoints, sync endpoints (run in a thread with a copy of the context) and Starlette
BackgroundTasks all reach it. Once the app has returned, which under uvicorn is after the client
has the full response and after the BackgroundTasks ran, the buffer is flushed in one round trip
or dropped:

- response complete with a status below 400: every job is sent;
- the app raised, the response was incomplete, or the status is 400 or more: only the jobs
  pushed with `always=True` are sent.

The request's task hands the jobs to the queue's sender task and ends; jobs of requests that
finish while a send is in flight go together in its next round trip. A failed flush is retried
briefly, then logged at ERROR with every job id; it never raises into the server. The lifespan
opens the backend (an unreachable backend or an invalid URL fails startup) and, at shutdown,
waits for the sender, sends what is left and closes the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spark_bg.errors import ConfigurationError, SparkError
from spark_bg.queue import Buffer, Queue

__all__ = ["QueueMiddleware"]

logger = logging.getLogger(__name__)


class QueueMiddleware:
    """Give the app a job queue at `app.state.queue` and flush it after each response.

    `queue` is a URL (`redis://`, `rediss://`, `sqlite:///path`, `memory://`), a `Queue`, or
    `None` for `$SPARK_QUEUE_URL` and then the SQLite default.
    """

    def __init__(self, app: ASGIApp, queue: str | Queue | None = None) -> None:
        self.app = app
        self.queue: Queue | None = None
        self.error: ConfigurationError | None = None
        self._published_to: Any = None
        # Starlette builds the middleware stack inside the first ASGI call, where an exception
        # would not fail uvicorn's startup. So the lifespan reports the error instead.
        try:
            self.queue = queue if isinstance(queue, Queue) else Queue(queue)
        except ConfigurationError as exc:
            self.error = exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._call_other(scope, receive, send)
            return
        queue = self.queue
        if queue is None:
            queue = self._configured_queue()
        if scope.get("app") is not self._published_to:
            self._published_to = _publish(scope, queue)

        buffer, token = queue.open_buffer()
        status = 0
        complete = False

        # A plain function that returns the server's awaitable, because an `async def` wrapper
        # would add a coroutine to every message the app sends. This code runs on every
        # request, so it keeps to the few steps that the flush policy needs.
        def send_and_watch(message: Message) -> Awaitable[None]:
            nonlocal status, complete
            message_type = message["type"]
            if message_type == "http.response.start":
                status = message["status"]
            elif message_type == "http.response.body":
                complete = not message.get("more_body", False)
            elif message_type == "http.response.pathsend":
                complete = True
            return send(message)

        succeeded = False
        try:
            await self.app(scope, receive, send_and_watch)
            succeeded = complete and 0 < status < 400
        finally:
            Queue.close_buffer(buffer, token)
            if buffer.entries:
                _flush(queue, buffer, succeeded, status or None)

    async def _call_other(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        queue = self._configured_queue()
        self._published_to = _publish(scope, queue)
        # Websockets and other scopes get no buffer, so their pushes are sent at once.
        await self.app(scope, receive, send)

    def _configured_queue(self) -> Queue:
        if self.queue is None:
            assert self.error is not None
            raise self.error
        return self.queue

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        queue = self.queue
        if queue is not None:
            _publish(scope, queue)

        async def send_after_opening(message: Message) -> None:
            message_type = message["type"]
            if message_type == "lifespan.startup.complete":
                failure = await self._open()
                if failure is not None:
                    await send({"type": "lifespan.startup.failed", "message": failure})
                    return
            elif message_type == "lifespan.shutdown.complete" and queue is not None:
                await queue.aclose()
            await send(message)

        await self.app(scope, receive, send_after_opening)

    async def _open(self) -> str | None:
        """Open the backend; return a message for uvicorn if that failed."""
        if self.queue is None:
            assert self.error is not None
            logger.error("spark_bg QueueMiddleware: %s", self.error)
            return f"spark_bg QueueMiddleware: {self.error}"
        try:
            await self.queue.open()
        except SparkError as exc:
            logger.error("spark_bg QueueMiddleware cannot open %s: %s", self.queue.url, exc)
            return f"spark_bg QueueMiddleware cannot open {self.queue.url}: {exc}"
        logger.info("spark_bg queue open: %s", self.queue.url)
        return None


def _flush(queue: Queue, buffer: Buffer, succeeded: bool, status: int | None) -> None:
    """Hand the request's jobs to the queue's sender by the flush policy; log those dropped."""
    if succeeded:
        queue.send_soon(buffer.entries)
        return
    always = buffer.always
    always_objects = {id(message) for message in always}
    dropped = [message.id for message in buffer.entries if id(message) not in always_objects]
    if dropped:
        logger.info(
            "dropped %d jobs of a failed request (status %s): %s",
            len(dropped),
            status,
            " ".join(dropped),
        )
    if always:
        queue.send_soon(always)


def _publish(scope: Scope, queue: Queue) -> Any:
    """Make the queue reachable as `request.app.state.queue`, and return the app."""
    app: Any = scope.get("app")
    state = getattr(app, "state", None)
    if state is not None and getattr(state, "queue", None) is not queue:
        state.queue = queue
    return app
