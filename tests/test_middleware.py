"""QueueMiddleware in-process: flush policy, sync endpoints, BackgroundTasks, failures.

httpx's ASGITransport awaits the whole ASGI call, flush included, before returning the
response, so each test can read the store right after its request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import spark_bg
from spark_bg.queue import current_buffer
from spark_bg.testing import TestQueue
from tests.jobs import RecordJob, StateJob
from tests.servers import free_port


async def push_ok(request: Request) -> Response:
    request.app.state.queue.push(RecordJob("ok"))
    return PlainTextResponse("ok")


async def push_then_raise(request: Request) -> Response:
    request.app.state.queue.push(RecordJob("raised"))
    request.app.state.queue.push(RecordJob("raised-always"), always=True)
    raise RuntimeError("handler failed after pushing")


async def push_then_http_error(request: Request) -> Response:
    request.app.state.queue.push(RecordJob("http-error"))
    request.app.state.queue.push(RecordJob("http-error-always"), always=True)
    raise HTTPException(status_code=409, detail="conflict")


async def push_then_400(request: Request) -> Response:
    request.app.state.queue.push(RecordJob("bad-request"))
    return PlainTextResponse("bad", status_code=400)


async def push_then_302(request: Request) -> Response:
    request.app.state.queue.push(RecordJob("redirect"))
    return Response(status_code=302, headers={"location": "/ok"})


def push_sync(request: Request) -> Response:
    request.app.state.queue.push(RecordJob("sync"))
    return PlainTextResponse("sync")


async def push_in_background(request: Request) -> Response:
    queue = request.app.state.queue

    def later() -> None:
        queue.push(RecordJob("background-sync"))

    async def later_async() -> None:
        queue.push(RecordJob("background-async"))

    response = PlainTextResponse("accepted")
    response.background = BackgroundTask(later)
    await later_async()
    return response


async def buffer_size(request: Request) -> Response:
    buffer = current_buffer()
    assert buffer is not None
    return PlainTextResponse(str(len(buffer.entries)))


async def push_bad_state(request: Request) -> Response:
    request.app.state.queue.push(StateJob({1, 2}))
    return PlainTextResponse("unreachable")


async def websocket_push(websocket: WebSocket) -> None:
    await websocket.accept()
    websocket.app.state.queue.push(RecordJob("websocket"))
    await websocket.app.state.queue.flush()
    await websocket.send_text("pushed")
    await websocket.close()


ROUTES = [
    Route("/ok", push_ok),
    Route("/raise", push_then_raise),
    Route("/http-error", push_then_http_error),
    Route("/bad-request", push_then_400),
    Route("/redirect", push_then_302),
    Route("/sync", push_sync),
    Route("/background", push_in_background),
    Route("/buffer-size", buffer_size),
    Route("/bad-state", push_bad_state),
    WebSocketRoute("/ws", websocket_push),
]


def make_app(queue: spark_bg.Queue | str) -> Starlette:
    return Starlette(routes=ROUTES, middleware=[Middleware(spark_bg.QueueMiddleware, queue=queue)])


@pytest.fixture
def queue() -> TestQueue:
    return TestQueue()


@pytest_asyncio.fixture
async def client(queue: TestQueue) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(queue), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client
    await queue.aclose()


async def stored_labels(queue: TestQueue) -> list[str]:
    RecordJob.seen.clear()
    await queue.run_all()
    return sorted(RecordJob.seen)


@pytest.mark.asyncio
async def test_success_flushes(client: httpx.AsyncClient, queue: TestQueue) -> None:
    response = await client.get("/ok")
    assert response.status_code == 200
    assert await stored_labels(queue) == ["ok"]


@pytest.mark.asyncio
async def test_redirect_flushes(client: httpx.AsyncClient, queue: TestQueue) -> None:
    response = await client.get("/redirect")
    assert response.status_code == 302
    assert await stored_labels(queue) == ["redirect"]


@pytest.mark.asyncio
async def test_raise_drops_all_but_always(client: httpx.AsyncClient, queue: TestQueue) -> None:
    response = await client.get("/raise")
    assert response.status_code == 500
    assert await stored_labels(queue) == ["raised-always"]


@pytest.mark.asyncio
async def test_http_exception_drops(client: httpx.AsyncClient, queue: TestQueue) -> None:
    response = await client.get("/http-error")
    assert response.status_code == 409
    assert await stored_labels(queue) == ["http-error-always"]


@pytest.mark.asyncio
async def test_status_400_drops(client: httpx.AsyncClient, queue: TestQueue) -> None:
    response = await client.get("/bad-request")
    assert response.status_code == 400
    assert await stored_labels(queue) == []


@pytest.mark.asyncio
async def test_sync_endpoint_reaches_buffer(client: httpx.AsyncClient, queue: TestQueue) -> None:
    response = await client.get("/sync")
    assert response.status_code == 200
    assert await stored_labels(queue) == ["sync"]


@pytest.mark.asyncio
async def test_background_tasks_flushed(client: httpx.AsyncClient, queue: TestQueue) -> None:
    response = await client.get("/background")
    assert response.status_code == 200
    assert await stored_labels(queue) == ["background-async", "background-sync"]


@pytest.mark.asyncio
async def test_fresh_buffer_per_request(client: httpx.AsyncClient, queue: TestQueue) -> None:
    await client.get("/raise")
    await client.get("/ok")
    response = await client.get("/buffer-size")
    assert response.text == "0"
    assert current_buffer() is None


@pytest.mark.asyncio
async def test_bad_state_raises_in_handler(client: httpx.AsyncClient, queue: TestQueue) -> None:
    response = await client.get("/bad-state")
    assert response.status_code == 500
    assert queue.pushed == []


@pytest.mark.asyncio
async def test_push_records_job(client: httpx.AsyncClient, queue: TestQueue) -> None:
    await client.get("/ok")
    assert [type(job) for job in queue.pushed_jobs()] == [RecordJob]
    assert queue.pushed[0].queue == "default"


@pytest.mark.asyncio
async def test_flush_failure_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on this loopback port, so every flush attempt fails to connect.
    queue = spark_bg.Queue(f"redis://127.0.0.1:{free_port()}/0")
    transport = httpx.ASGITransport(app=make_app(queue), raise_app_exceptions=True)
    caplog.set_level(logging.WARNING, logger="spark_bg")
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/ok")
    await queue.flush()
    assert response.status_code == 200
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "lost 1 jobs" in errors[0].getMessage()
    retries = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(retries) >= 1


@pytest.mark.asyncio
async def test_flush_failure_names_job_ids(caplog: pytest.LogCaptureFixture) -> None:
    queue = spark_bg.Queue(f"redis://127.0.0.1:{free_port()}/0")
    pushed: list[str] = []

    async def push_two(request: Request) -> Response:
        pushed.append(request.app.state.queue.push(RecordJob("a")))
        pushed.append(request.app.state.queue.push(RecordJob("b")))
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/two", push_two)],
        middleware=[Middleware(spark_bg.QueueMiddleware, queue=queue)],
    )
    caplog.set_level(logging.ERROR, logger="spark_bg")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/two")
    await queue.flush()
    assert response.status_code == 200
    message = caplog.records[-1].getMessage()
    assert pushed[0] in message
    assert pushed[1] in message


@pytest.mark.asyncio
async def test_push_outside_request_sent(queue: TestQueue) -> None:
    job_id = queue.push(RecordJob("outside"))
    await queue.flush()
    counts = await queue.counts()
    assert counts.ready == 1
    assert len(job_id) == 32


@pytest.mark.asyncio
async def test_push_in_job_sent_after_run(queue: TestQueue) -> None:
    from tests.jobs import ChildPushJob

    queue.push(ChildPushJob("child-ok"))
    queue.push(ChildPushJob("child-of-failure", fail=True), max_attempts=1)
    RecordJob.seen.clear()
    worker = await queue.run_all()
    # The burst run also takes the job pushed by the successful run.
    assert worker.jobs_done == 2
    assert worker.jobs_failed == 1
    assert RecordJob.seen == ["child-ok"]


def test_push_without_loop_sends_at_once(redis_url: str) -> None:
    queue = spark_bg.Queue(redis_url)
    job_id = queue.push(RecordJob("script"))

    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        [item] = client.lrange("spark:{default}:ready", 0, -1)
        assert item.startswith(job_id.encode() + b"\0")
    finally:
        client.close()
        if queue._sync_sender is not None:
            queue._sync_sender.close()


def test_invalid_url_names_the_fix() -> None:
    with pytest.raises(spark_bg.ConfigurationError, match="expected one of"):
        spark_bg.Queue("amqp://127.0.0.1/")


def test_unknown_url_setting_rejected() -> None:
    with pytest.raises(spark_bg.ConfigurationError, match="unknown setting 'prefx'"):
        spark_bg.Queue("redis://127.0.0.1:1/0?prefx=app")


def test_naive_run_at_rejected(queue: TestQueue) -> None:
    import datetime as dt

    with pytest.raises(ValueError, match="naive datetime"):
        queue.push(RecordJob("late"), run_at=dt.datetime(2030, 1, 1))


@pytest.mark.asyncio
async def test_lifespan_invalid_url_fails_startup() -> None:
    app = make_app("nosuch://x")
    sent: list[dict[str, object]] = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, object]:
        return next(messages)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await app(scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "unknown scheme 'nosuch'" in str(sent[0]["message"])


@pytest.mark.asyncio
async def test_lifespan_unreachable_backend_fails_startup() -> None:
    app = make_app(f"redis://127.0.0.1:{free_port()}/0")
    sent: list[dict[str, object]] = []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, object]:
        return next(messages)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await app(scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "cannot connect to Redis" in str(sent[0]["message"])


def test_websocket_and_lifespan_pushes_sent() -> None:
    import asyncio
    import contextlib

    from starlette.testclient import TestClient

    queue = TestQueue()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.queue.push(RecordJob("lifespan"))
        yield

    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(spark_bg.QueueMiddleware, queue=queue)],
        lifespan=lifespan,
    )
    with TestClient(app) as client, client.websocket_connect("/ws") as websocket:
        assert websocket.receive_text() == "pushed"
    RecordJob.seen.clear()
    asyncio.run(queue.run_all())
    assert sorted(RecordJob.seen) == ["lifespan", "websocket"]
