"""The command line: `spark-worker` runs jobs, `spark-jobs` inspects queues and failed jobs.

`spark-worker` parses options, configures logging, builds the worker and runs it.

`spark-worker TARGET` imports TARGET (`module:attribute`, looked up from the working
directory) and uses its queue: a `spark_bg.Queue`, a backend, or a Starlette app whose
`QueueMiddleware` names one. `--url` names a backend directly instead.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from typing import Any

import click

from spark_bg.backends import Backend
from spark_bg.errors import JobLoadError, SparkError
from spark_bg.job import check_queue_name, parse_envelope
from spark_bg.middleware import QueueMiddleware
from spark_bg.queue import URL_ENV, Queue
from spark_bg.worker import Worker, WorkerSettings

__all__ = ["jobs", "load_queue", "main"]

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def import_target(target: str) -> Any:
    """Import `module:attribute` (dots allowed in the attribute) and return the object."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise click.UsageError(
            f"invalid TARGET {target!r}: expected 'module:attribute', e.g. 'myapp.main:app'"
        )
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.UsageError(f"cannot import module {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise click.UsageError(
                f"module {module_name!r} has no attribute {attribute!r}"
            ) from None
    return obj


def load_queue(obj: Any) -> Queue:
    """Return the queue that `obj` (a Queue, a Backend or a Starlette app) is configured with."""
    if isinstance(obj, Queue):
        return obj
    if isinstance(obj, Backend):
        return Queue(obj)
    if isinstance(obj, QueueMiddleware):
        if obj.queue is None:
            raise click.UsageError(str(obj.error))
        return obj.queue
    for middleware in getattr(obj, "user_middleware", None) or ():
        if getattr(middleware, "cls", None) is QueueMiddleware:
            options = dict(middleware.kwargs)
            configured = options.get("queue", middleware.args[0] if middleware.args else None)
            return configured if isinstance(configured, Queue) else Queue(configured)
    raise click.UsageError(
        f"TARGET is a {type(obj).__qualname__}, not a spark_bg.Queue nor a Starlette app with "
        "QueueMiddleware; point it at one, or pass --url"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", required=False)
@click.option(
    "--url",
    help="Backend URL (redis://, rediss://, sqlite:///, memory://), used instead of TARGET's "
    f"queue. With neither, ${URL_ENV} is read.",
)
@click.option(
    "--queues",
    "-q",
    default="default",
    show_default=True,
    help="Comma-separated queues, highest priority first.",
)
@click.option(
    "--concurrency",
    "-c",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Jobs run at the same time.",
)
@click.option(
    "--prefetch",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Jobs taken ahead of a free slot; faster for short jobs, but a job held beside one "
    "that kills the worker is charged a delivery too.",
)
@click.option("--burst", is_flag=True, help="Run the jobs ready now, then exit.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option(
    "--lease",
    "lease_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=1.0),
    help="Seconds a job stays assigned without a heartbeat before it can be recovered.",
)
@click.option(
    "--sweep-interval",
    "sweep_interval_s",
    default=15.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between checks for jobs of dead workers.",
)
@click.option(
    "--grace",
    "grace_s",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="Seconds running jobs get on shutdown before they are returned to their queue.",
)
@click.option(
    "--max-deliveries",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Times a job may be handed out without finishing before it is failed.",
)
@click.option(
    "--jobs-from",
    multiple=True,
    help="Package job classes may be imported from (repeatable); TARGET's package is included.",
)
def main(
    target: str | None,
    url: str | None,
    queues: str,
    concurrency: int,
    prefetch: int,
    burst: bool,
    log_level: str,
    lease_s: float,
    sweep_interval_s: float,
    grace_s: float,
    max_deliveries: int,
    jobs_from: tuple[str, ...],
) -> None:
    """Run background jobs from the queue that TARGET (module:attribute) is configured with."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    packages = list(jobs_from)
    url = _url_or_environment(target, url)
    try:
        if target is not None:
            obj = import_target(target)
            packages.append(target.partition(":")[0].split(".")[0])
            queue = Queue(url) if url else load_queue(obj)
        else:
            queue = Queue(url)
    except SparkError as exc:
        raise click.UsageError(str(exc)) from exc
    names = [name.strip() for name in queues.split(",") if name.strip()]
    try:
        for name in names:
            check_queue_name(name)
    except SparkError as exc:
        raise click.BadParameter(str(exc), param_hint="--queues") from exc
    settings = WorkerSettings(
        queues=names,
        concurrency=concurrency,
        prefetch=prefetch,
        burst=burst,
        lease_s=lease_s,
        sweep_interval_s=sweep_interval_s,
        grace_s=grace_s,
        max_deliveries=max_deliveries,
        jobs_from=packages,
    )
    worker = Worker(queue, settings)
    try:
        asyncio.run(_serve(worker))
    except SparkError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    logging.shutdown()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()[1:]):
        # A sync job thread outlived the grace period; its job was returned to the queue.
        os._exit(0)


async def _serve(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            logger.warning("second interrupt: exiting at once; leases will recover running jobs")
            logging.shutdown()
            os._exit(1)
        worker.stop()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    await worker.run()


def _url_or_environment(target: str | None, url: str | None) -> str | None:
    """Return `url`; with no TARGET either, `$SPARK_QUEUE_URL`, or raise a usage error.

    A TARGET's own configuration wins over the environment, so a variable left in a shell
    never points the worker at another backend than the app's.
    """
    if url or target is not None:
        return url
    from_environment = os.environ.get(URL_ENV)
    if not from_environment:
        raise click.UsageError(
            f"give a TARGET such as 'myapp.main:app', or --url, or set ${URL_ENV}"
        )
    return from_environment


def _admin_queue(target: str | None, url: str | None) -> Queue:
    url = _url_or_environment(target, url)
    try:
        if target is not None:
            obj = import_target(target)
            return Queue(url) if url else load_queue(obj)
        return Queue(url)
    except SparkError as exc:
        raise click.UsageError(str(exc)) from exc


def _run_admin(operation: Any) -> Any:
    """Run an admin coroutine; a backend failure becomes one `Error:` line and exit code 1."""
    try:
        return asyncio.run(operation)
    except SparkError as exc:
        raise click.ClickException(str(exc)) from exc


def _job_class(payload: bytes) -> str:
    try:
        return str(parse_envelope(payload)["class"])
    except JobLoadError:
        return "(invalid payload)"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _check_selection(ids: tuple[str, ...], every: bool) -> None:
    if not ids and not every:
        raise click.UsageError("give --id JOB_ID (repeatable) or --all")
    if ids and every:
        raise click.UsageError("give either --id or --all, not both")


_target_argument = click.argument("target", required=False)
_url_option = click.option(
    "--url", help=f"Backend URL, used instead of TARGET's queue. With neither, ${URL_ENV} is read."
)
_queue_option = click.option("--queue", "-q", "queue_name", default="default", show_default=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def jobs() -> None:
    """Inspect queues and manage failed jobs."""


@jobs.command("counts")
@_target_argument
@_url_option
@_queue_option
def counts_command(target: str | None, url: str | None, queue_name: str) -> None:
    """Print how many jobs of a queue are ready, delayed, active and failed."""

    async def show() -> None:
        async with _admin_queue(target, url) as queue:
            counts = await queue.counts(queue_name)
        click.echo(
            f"{queue_name}: ready {counts.ready}, delayed {counts.delayed}, "
            f"active {counts.active}, failed {counts.failed}"
        )

    _run_admin(show())


@jobs.command("failed")
@_target_argument
@_url_option
@_queue_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--traceback", "show_traceback", is_flag=True, help="Print each full error.")
def failed_command(
    target: str | None, url: str | None, queue_name: str, limit: int, show_traceback: bool
) -> None:
    """List failed jobs of a queue, newest first."""

    async def show() -> None:
        async with _admin_queue(target, url) as queue:
            failed = await queue.failed(queue_name, limit)
        for job in failed:
            lines = job.error.strip().splitlines() or [""]
            when = datetime.fromtimestamp(job.failed_at, UTC).isoformat(timespec="seconds")
            click.echo(f"{job.id}  {when}  {_job_class(job.payload)}  attempts={job.attempts}")
            click.echo(f"    {lines[-1]}")
            if show_traceback:
                click.echo(job.error)
        click.echo(f"{_plural(len(failed), 'failed job')} shown")

    _run_admin(show())


@jobs.command("retry")
@_target_argument
@_url_option
@_queue_option
@click.option("--id", "ids", multiple=True, help="Job id to retry (repeatable).")
@click.option("--all", "retry_all", is_flag=True, help="Retry every failed job of the queue.")
def retry_command(
    target: str | None, url: str | None, queue_name: str, ids: tuple[str, ...], retry_all: bool
) -> None:
    """Requeue failed jobs with a fresh attempt count."""
    _check_selection(ids, retry_all)

    async def retry() -> int:
        async with _admin_queue(target, url) as queue:
            return await queue.retry_failed(queue_name, None if retry_all else list(ids))

    click.echo(f"{_plural(_run_admin(retry()), 'job')} requeued")


@jobs.command("delete")
@_target_argument
@_url_option
@_queue_option
@click.option("--id", "ids", multiple=True, help="Job id to delete (repeatable).")
@click.option("--all", "delete_all", is_flag=True, help="Delete every failed job of the queue.")
def delete_command(
    target: str | None, url: str | None, queue_name: str, ids: tuple[str, ...], delete_all: bool
) -> None:
    """Delete failed jobs."""
    _check_selection(ids, delete_all)

    async def delete() -> int:
        async with _admin_queue(target, url) as queue:
            return await queue.delete_failed(queue_name, None if delete_all else list(ids))

    click.echo(f"{_plural(_run_admin(delete()), 'job')} deleted")
