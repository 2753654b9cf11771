"""Minimal Starlette apps for the middleware cost measurement, picked by ``BENCH_APP_VARIANT``.

- ``plain``: no middleware.
- ``background``: no middleware; the response carries one no-op Starlette BackgroundTask.
- ``middleware``: QueueMiddleware, no push.
- ``middleware_push``: QueueMiddleware, one job pushed per request.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

VARIANT = os.environ.get("BENCH_APP_VARIANT", "plain")
REDIS_URL = os.environ["BENCH_REDIS_URL"]


async def noop_task() -> None:
    return None


async def plain(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def background(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok", background=BackgroundTask(noop_task))


def build_app(variant: str) -> Starlette:
    if variant == "plain":
        return Starlette(routes=[Route("/", plain)])
    if variant == "background":
        return Starlette(routes=[Route("/", background)])

    # Imported here, once, so that the variants without spark_bg never load it.
    import spark_bg
    from adapters.spark_jobs import NoopJob

    async def push(request: Request) -> PlainTextResponse:
        request.app.state.queue.push(NoopJob())
        return PlainTextResponse("ok")

    middleware = [Middleware(spark_bg.QueueMiddleware, queue=REDIS_URL)]
    if variant == "middleware":
        return Starlette(routes=[Route("/", plain)], middleware=middleware)
    if variant == "middleware_push":
        return Starlette(routes=[Route("/", push)], middleware=middleware)
    raise ValueError(
        f"unknown BENCH_APP_VARIANT {variant!r}: "
        "expected plain, background, middleware or middleware_push"
    )


app = build_app(VARIANT)
