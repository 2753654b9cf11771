"""The hello example: `GET /hello/{name}` answers at once and leaves the greeting to a worker.

    uvicorn examples.hello.app:app
    spark-worker examples.hello.app:app

The queue comes from $SPARK_QUEUE_URL, else the SQLite file spark_bg.sqlite3 in the working
directory, shared by both processes.
"""

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import spark_bg
from examples.hello.jobs import HelloWorldJob


async def hello(request: Request) -> PlainTextResponse:
    name = request.path_params["name"]
    job_id = request.app.state.queue.push(HelloWorldJob(name))
    return PlainTextResponse(f"queued job {job_id} for {name}\n")


app = Starlette(
    routes=[Route("/hello/{name}", hello)],
    middleware=[Middleware(spark_bg.QueueMiddleware)],
)
