"""The Starlette app served by uvicorn in the end-to-end tests.

Its queue comes from $SPARK_QUEUE_URL, as `spark-worker tests.apps:app` reads it too. Every
response carries the client's TCP port in `x-client-port`, so a test can tell whether two
requests shared one keep-alive connection.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

import spark_bg
from spark_bg.queue import current_buffer
from tests.e2e_jobs import EchoStateJob, MarkJob, SlowJob, sample_state


def client_port(request: Request) -> dict[str, str]:
    port = request.client.port if request.client is not None else 0
    return {"x-client-port": str(port)}


def wants_always(request: Request) -> bool:
    return request.query_params.get("always") == "1"


async def ready(request: Request) -> Response:
    return PlainTextResponse("ready")


async def push_slow(request: Request) -> Response:
    sleep_s = float(request.query_params.get("sleep_s", "2.5"))
    job_id = request.app.state.queue.push(SlowJob(request.path_params["label"], sleep_s))
    return PlainTextResponse(job_id)


async def push_state(request: Request) -> Response:
    index = int(request.path_params["index"])
    job_id = request.app.state.queue.push(EchoStateJob(**sample_state(index)))
    return PlainTextResponse(job_id)


async def push_mark(request: Request) -> Response:
    """Push a `MarkJob`, then respond with the status given as `?status=`."""
    status = int(request.query_params.get("status", "200"))
    job = MarkJob(request.path_params["label"])
    job_id = request.app.state.queue.push(job, always=wants_always(request))
    return PlainTextResponse(job_id, status_code=status, headers=client_port(request))


async def push_then_http_error(request: Request) -> Response:
    """Push a `MarkJob`, then fail with a 500 that Starlette turns into a plain response."""
    job = MarkJob(request.path_params["label"])
    request.app.state.queue.push(job, always=wants_always(request))
    raise HTTPException(500, detail="failed after pushing", headers=client_port(request))


async def push_then_crash(request: Request) -> Response:
    """Push a `MarkJob`, then raise an unhandled exception."""
    job = MarkJob(request.path_params["label"])
    request.app.state.queue.push(job, always=wants_always(request))
    raise RuntimeError("handler crashed after pushing")


async def buffer_size(request: Request) -> Response:
    """Respond with the number of jobs in this request's buffer, which starts empty."""
    buffer = current_buffer()
    size = "no buffer" if buffer is None else str(len(buffer.entries))
    return PlainTextResponse(size, headers=client_port(request))


app = Starlette(
    routes=[
        Route("/", ready),
        Route("/slow/{label}", push_slow),
        Route("/state/{index:int}", push_state),
        Route("/mark/{label}", push_mark),
        Route("/fail/{label}", push_then_http_error),
        Route("/crash/{label}", push_then_crash),
        Route("/buffer-size", buffer_size),
    ],
    middleware=[Middleware(spark_bg.QueueMiddleware)],
)
