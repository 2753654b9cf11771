"""End to end: real uvicorn and `spark-worker` processes on a real Redis server or SQLite file.

The app is `tests.apps:app` and the jobs are in `tests.e2e_jobs`. Both processes read the queue
URL from $SPARK_QUEUE_URL. Jobs append one JSON line per run to a results directory, which the
test reads to learn which jobs ran, how often and in what order. Every process is started
through a `Processes` fixture and stopped by pid after the test, whether it passed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import redis

import spark_bg
from spark_bg.backends import FailedJob, QueueCounts
from spark_bg.queue import URL_ENV
from tests.e2e_jobs import (
    BIG_STATE_INDEX,
    RESULTS_ENV,
    FailingJob,
    MarkJob,
    read_events,
    sample_state,
    state_digest,
)
from tests.processes import REPOSITORY, Process, start_worker, uvicorn_command, wait_for
from tests.servers import LOOPBACK, free_port

APP_TARGET = "tests.apps:app"
T = TypeVar("T")


class Processes:
    """Launcher of the uvicorn and `spark-worker` processes of one test.

    `stop_all()` stops each process it started by pid.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Process] = []

    def _log_path(self, name: str) -> Path:
        return self.directory / f"{len(self.started)}-{name}.log"

    def worker(
        self,
        env: dict[str, str],
        *options: str,
        target: str = APP_TARGET,
        cwd: Path = REPOSITORY,
    ) -> Process:
        """Start `spark-worker TARGET OPTIONS` without waiting for it."""
        # SIGABRT then makes the worker print every thread's stack before it dies.
        env = {"PYTHONFAULTHANDLER": "1", **env}
        process = start_worker(target, self._log_path("worker"), *options, env=env, cwd=cwd)
        self.started.append(process)
        return process

    def uvicorn(
        self, env: dict[str, str], *, target: str = APP_TARGET, cwd: Path = REPOSITORY
    ) -> tuple[Process, str]:
        """Start uvicorn on a free loopback port without waiting, and return it and its base URL."""
        port = free_port()
        process = Process(uvicorn_command(target, port), self._log_path("uvicorn"), env, cwd)
        self.started.append(process)
        return process, f"http://{LOOPBACK}:{port}"

    def server(
        self, env: dict[str, str], *, target: str = APP_TARGET, cwd: Path = REPOSITORY
    ) -> tuple[Process, str]:
        """Start uvicorn and wait until it accepts HTTP requests."""
        process, base_url = self.uvicorn(env, target=target, cwd=cwd)

        def accepts_requests() -> bool:
            if process.popen.poll() is not None:
                raise AssertionError(f"uvicorn exited at start; output:\n{process.output()}")
            try:
                httpx.get(base_url + "/", timeout=0.5)
            except httpx.TransportError:
                return False
            return True

        wait_for(accepts_requests, timeout_s=20.0)
        return process, base_url

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture(params=["redis", "sqlite"])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty queue: the session's Redis server, or a new SQLite file."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return url
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "results"
    directory.mkdir()
    return directory


@pytest.fixture
def env(queue_url: str, results_dir: Path) -> dict[str, str]:
    """Environment of the app and worker processes: the queue URL and the results directory."""
    return {URL_ENV: queue_url, RESULTS_ENV: str(results_dir)}


# Helpers


def with_queue(url: str, use: Callable[[spark_bg.Queue], Awaitable[T]]) -> T:
    """Run `use` on a `Queue` of `url` in a fresh event loop, then close the queue."""

    async def main() -> T:
        queue = spark_bg.Queue(url)
        try:
            return await use(queue)
        finally:
            await queue.aclose()

    return asyncio.run(main())


def push_jobs(url: str, pushes: Sequence[tuple[spark_bg.Job, str | None]]) -> list[str]:
    """Push each `(job, queue name or None)`, wait until all are stored, and return the ids."""

    async def push_all(queue: spark_bg.Queue) -> list[str]:
        ids = [queue.push(job, queue=name) for job, name in pushes]
        await queue.flush()
        return ids

    return with_queue(url, push_all)


def queue_counts(url: str, name: str = "default") -> QueueCounts:
    return with_queue(url, lambda queue: queue.counts(name))


def failed_jobs(url: str) -> list[FailedJob]:
    return with_queue(url, lambda queue: queue.failed())


def wait_for_ready(url: str, expected: int) -> None:
    """Wait until `expected` jobs are ready, as a request's jobs are stored after its response."""
    try:
        wait_for(lambda: queue_counts(url).ready == expected, timeout_s=10.0, interval_s=0.1)
    except TimeoutError:
        raise AssertionError(
            f"expected {expected} ready jobs, found {queue_counts(url)} after 10 s"
        ) from None


def wait_for_events(results_dir: Path, expected: int, worker: Process, timeout_s: float) -> None:
    try:
        wait_for(lambda: len(read_events(results_dir)) >= expected, timeout_s, interval_s=0.1)
    except TimeoutError:
        raise AssertionError(
            f"{len(read_events(results_dir))} of {expected} job events recorded after "
            f"{timeout_s} s; worker output:\n{worker.output()}"
        ) from None


def run_burst(processes: Processes, env: dict[str, str], *options: str) -> Process:
    """Run `spark-worker --burst OPTIONS` to its end and check that it exited with 0."""
    worker = processes.worker(env, "--burst", *options)
    try:
        code = worker.wait(10.0)
    except subprocess.TimeoutExpired:
        worker.signal(signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(3.0)
        raise AssertionError(
            f"burst worker still running after 10 s; output and stacks:\n{worker.output()}"
        ) from None
    assert code == 0, f"burst worker exited with code {code}; output:\n{worker.output()}"
    return worker


def labels(results_dir: Path) -> list[str]:
    return [event["label"] for event in read_events(results_dir)]


def store_raw(url: str, payloads: dict[str, bytes]) -> None:
    """Write `payloads` by id straight into the `default` queue's store, bypassing `push()`."""
    if url.startswith("redis://"):
        with redis.Redis.from_url(url) as client:
            for job_id, payload in payloads.items():
                client.hset("spark:{default}:jobs", job_id, payload)
                client.lpush("spark:{default}:ready", job_id)
        return
    # Opening a queue creates the file and its tables.
    queue_counts(url)
    path = url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as connection, connection:
        for job_id, payload in payloads.items():
            connection.execute("UPDATE spark_bg_meta SET value = value + 1 WHERE name = 'last_seq'")
            connection.execute(
                "INSERT INTO spark_bg_jobs (id, queue, payload, state, due_at, seq) "
                "SELECT ?, 'default', ?, 'ready', ?, value FROM spark_bg_meta "
                "WHERE name = 'last_seq'",
                (job_id, payload, time.time()),
            )


def envelope(job_id: str, class_name: str) -> bytes:
    """Return a well-formed job envelope of `class_name` with no state."""
    return json.dumps(
        {
            "v": 1,
            "id": job_id,
            "class": class_name,
            "state": {},
            "queue": "default",
            "attempt": 1,
            "max_attempts": 1,
            "enqueued_at": time.time(),
        }
    ).encode()


# The web process


def test_response_before_slow_job(
    processes: Processes, env: dict[str, str], results_dir: Path
) -> None:
    worker = processes.worker(env)
    _, base_url = processes.server(env)
    worker.wait_for_output("started: queues")

    started = time.monotonic()
    response = httpx.get(f"{base_url}/slow/slow?sleep_s=2.5", timeout=10.0)
    elapsed_s = time.monotonic() - started
    responded_at = time.time()
    done_before_response = [event for event in read_events(results_dir) if event["event"] == "done"]

    assert response.status_code == 200
    assert elapsed_s < 1.0
    assert done_before_response == []
    wait_for_events(results_dir, 2, worker, timeout_s=15.0)
    done = read_events(results_dir)[1]
    assert done["event"] == "done"
    assert done["id"] == response.text
    assert done["at"] - responded_at > 1.5


def test_each_job_once_with_state(
    processes: Processes, env: dict[str, str], queue_url: str, results_dir: Path
) -> None:
    worker = processes.worker(env, "--concurrency", "4")
    _, base_url = processes.server(env)
    count = 50

    with httpx.Client(base_url=base_url, timeout=10.0) as client:

        def push(index: int) -> httpx.Response:
            return client.get(f"/state/{index}")

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(push, range(count)))

    assert [response.status_code for response in responses] == [200] * count
    index_of = {response.text: index for index, response in enumerate(responses)}
    assert len(index_of) == count
    wait_for_events(results_dir, count, worker, timeout_s=30.0)
    code = worker.stop()
    assert code == 0, f"worker exited with code {code} after SIGTERM:\n{worker.output()}"

    events = read_events(results_dir)
    runs = Counter(event["id"] for event in events)
    assert sorted(runs) == sorted(index_of)
    assert [job_id for job_id, times in runs.items() if times != 1] == []
    for event in events:
        index = index_of[event["id"]]
        assert event["index"] == index
        assert event["digest"] == state_digest(sample_state(index)), event["repr_head"]
    big = [event for event in events if event["index"] == BIG_STATE_INDEX]
    assert len(big) == 1
    assert queue_counts(queue_url) == QueueCounts()


def test_keepalive_isolates_buffer(
    processes: Processes, env: dict[str, str], queue_url: str, results_dir: Path
) -> None:
    _, base_url = processes.server(env)

    with httpx.Client(base_url=base_url, timeout=10.0) as client:
        failed = client.get("/fail/failed-request")
        size = client.get("/buffer-size")
        control = client.get("/mark/after-failure")

    assert failed.status_code == 500
    assert size.status_code == 200
    assert size.text == "0"
    # The same client port shows that both requests used one keep-alive connection.
    assert size.headers["x-client-port"] == failed.headers["x-client-port"]
    assert control.status_code == 200
    wait_for_ready(queue_url, 1)
    run_burst(processes, env)
    assert labels(results_dir) == ["after-failure"]


def test_flush_policy_over_http(
    processes: Processes, env: dict[str, str], queue_url: str, results_dir: Path
) -> None:
    _, base_url = processes.server(env)
    requests = [
        ("/mark/sent-200", 200),
        ("/mark/sent-302?status=302", 302),
        ("/mark/dropped-404?status=404", 404),
        ("/mark/dropped-500?status=500", 500),
        ("/mark/always-500?status=500&always=1", 500),
        ("/crash/dropped-crash", 500),
        ("/crash/always-crash?always=1", 500),
    ]

    # One connection per request, because uvicorn closes a connection whose app raised, and
    # a client that reused it for the next request would read a reset.
    statuses = [
        (path, httpx.get(base_url + path, timeout=10.0).status_code) for path, _ in requests
    ]

    assert statuses == requests
    wait_for_ready(queue_url, 4)
    run_burst(processes, env)
    assert sorted(labels(results_dir)) == ["always-500", "always-crash", "sent-200", "sent-302"]


@pytest.mark.parametrize("case", ["unknown-scheme", "unreachable-redis", "missing-sqlite-dir"])
def test_startup_fails_for_bad_url(case: str, processes: Processes, tmp_path: Path) -> None:
    # A socket bound without listen() owns the port, so a connection to it is refused.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed_port:
        closed_port.bind((LOOPBACK, 0))
        port = closed_port.getsockname()[1]
        url, message = {
            "unknown-scheme": ("amqp://127.0.0.1/jobs", "unknown scheme 'amqp'"),
            "unreachable-redis": (
                f"redis://{LOOPBACK}:{port}/0",
                f"cannot connect to Redis at redis://{LOOPBACK}:{port}/0",
            ),
            "missing-sqlite-dir": (
                f"sqlite:///{tmp_path / 'missing' / 'jobs.db'}",
                "does not exist",
            ),
        }[case]
        server, _ = processes.uvicorn({URL_ENV: url})
        try:
            code = server.wait(20.0)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"uvicorn still runs 20 s after starting with {url}; output:\n{server.output()}"
            ) from None

    output = server.output()
    assert code != 0
    assert message in output, output
    assert "Application startup failed" in output, output


# The worker process


def test_burst_exits_after_draining(
    processes: Processes, env: dict[str, str], queue_url: str, results_dir: Path
) -> None:
    # Several rounds, because the end of a burst can race with the last acknowledgement.
    pushed: list[str] = []
    for round_number in range(5):
        jobs = [(MarkJob(f"burst-{round_number}-{index}"), None) for index in range(5)]
        pushed += push_jobs(queue_url, jobs)

        worker = run_burst(processes, env)

        assert sorted(event["id"] for event in read_events(results_dir)) == sorted(pushed)
        assert queue_counts(queue_url) == QueueCounts(), f"round {round_number}:\n{worker.output()}"
        assert "burst mode ends" in worker.output()


def test_sigterm_stops_idle_worker(processes: Processes, env: dict[str, str]) -> None:
    worker = processes.worker(env)
    worker.wait_for_output("started: queues")

    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    try:
        code = worker.wait(10.0)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker still runs 10 s after SIGTERM:\n{worker.output()}") from None
    elapsed_s = time.monotonic() - started

    assert code == 0, worker.output()
    assert elapsed_s < 3.0
    assert "stopped: 0 jobs done, 0 failed" in worker.output()


def test_worker_logs_job_events(processes: Processes, env: dict[str, str], queue_url: str) -> None:
    mark_id, failing_id = push_jobs(queue_url, [(MarkJob("logged"), None), (FailingJob(), None)])

    output = run_burst(processes, env).output()

    mark_lines = [line for line in output.splitlines() if mark_id in line]
    failing_lines = [line for line in output.splitlines() if failing_id in line]
    prefix = r" INFO +spark_bg\.worker: job "
    assert len(mark_lines) == 2, output
    assert re.search(
        rf"{prefix}{mark_id} tests\.e2e_jobs:MarkJob started on default, attempt 1 of 1$",
        mark_lines[0],
    ), mark_lines[0]
    assert re.search(
        rf"{prefix}{mark_id} tests\.e2e_jobs:MarkJob done on default in \d+\.\d{{3}} s$",
        mark_lines[1],
    ), mark_lines[1]
    assert len(failing_lines) == 2, output
    assert re.search(
        rf"{prefix}{failing_id} tests\.e2e_jobs:FailingJob started on default, attempt 1 of 1$",
        failing_lines[0],
    ), failing_lines[0]
    assert re.search(
        rf" ERROR +spark_bg\.worker: job {failing_id} tests\.e2e_jobs:FailingJob failed on "
        r"default in \d+\.\d{3} s, attempt 1 of 1, no retry left: "
        r"ValueError\('FailingJob failed on purpose'\)$",
        failing_lines[1],
    ), failing_lines[1]


def test_invalid_payloads_fail(
    processes: Processes, env: dict[str, str], queue_url: str, results_dir: Path
) -> None:
    reasons = {
        "not-json": (b"{not json", "payload is not valid JSON"),
        "unknown-class": (
            envelope("unknown-class", "tests.e2e_jobs:NoSuchJob"),
            "'tests.e2e_jobs:NoSuchJob' does not name a spark_bg.Job subclass",
        ),
        "not-a-job": (
            envelope("not-a-job", "tests.e2e_jobs:PlainClass"),
            "'tests.e2e_jobs:PlainClass' does not name a spark_bg.Job subclass",
        ),
        "outside-packages": (
            envelope("outside-packages", "os.path:join"),
            "module 'os.path' is outside the packages",
        ),
    }
    store_raw(queue_url, {job_id: payload for job_id, (payload, _) in reasons.items()})
    push_jobs(queue_url, [(MarkJob("after-invalid"), None)])

    run_burst(processes, env, "--concurrency", "1")

    assert labels(results_dir) == ["after-invalid"]
    failed = {job.id: job for job in failed_jobs(queue_url)}
    assert sorted(failed) == sorted(reasons)
    for job_id, (_, reason) in reasons.items():
        assert reason in failed[job_id].error, failed[job_id].error
        assert failed[job_id].error.startswith("cannot load job: "), failed[job_id].error


def test_raising_job_fails_with_traceback(
    processes: Processes, env: dict[str, str], queue_url: str
) -> None:
    [job_id] = push_jobs(queue_url, [(FailingJob(), None)])

    run_burst(processes, env)

    failed = failed_jobs(queue_url)
    assert [job.id for job in failed] == [job_id]
    assert failed[0].attempts == 1
    assert failed[0].error.startswith("Traceback (most recent call last):"), failed[0].error
    assert "e2e_jobs.py" in failed[0].error
    assert failed[0].error.rstrip().endswith("ValueError: FailingJob failed on purpose")
    assert queue_counts(queue_url) == QueueCounts(failed=1)


def test_queues_taken_by_priority(
    processes: Processes, env: dict[str, str], queue_url: str, results_dir: Path
) -> None:
    pushes: list[tuple[spark_bg.Job, str | None]] = []
    for index in range(1, 4):
        pushes.append((MarkJob(f"low-{index}"), "low"))
        pushes.append((MarkJob(f"high-{index}"), "high"))
    push_jobs(queue_url, pushes)

    run_burst(processes, env, "--queues", "high,low", "--concurrency", "1")

    events = read_events(results_dir)
    assert [event["label"] for event in events] == [
        "high-1",
        "high-2",
        "high-3",
        "low-1",
        "low-2",
        "low-3",
    ]
    assert [event["queue"] for event in events] == ["high"] * 3 + ["low"] * 3


# The hello example


def test_hello_example_sqlite(processes: Processes, tmp_path: Path) -> None:
    workdir = tmp_path / "hello"
    workdir.mkdir()
    example_env = {"HELLO_SLEEP_S": "0.5"}
    target = "examples.hello.app:app"
    worker = processes.worker(example_env, target=target, cwd=workdir)
    _, base_url = processes.server(example_env, target=target, cwd=workdir)

    response = httpx.get(f"{base_url}/hello/John%20Doe", timeout=10.0)

    assert response.status_code == 200
    assert response.text.startswith("queued job ")
    worker.wait_for_output("Hello World John Doe!", timeout_s=20.0)
    # Neither process was given a URL, so both used the default SQLite file in their cwd.
    assert (workdir / "spark_bg.sqlite3").exists()
    job_id = response.text.split()[2]
    worker.wait_for_output(f"job {job_id} examples.hello.jobs:HelloWorldJob done on default")
    assert uuid.UUID(hex=job_id).hex == job_id
