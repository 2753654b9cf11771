"""Reliability under faults: real redis-server and SQLite, real `spark-worker` processes.

Each test starts its workers as subprocesses with short leases (`--lease 2 --sweep-interval
0.5`), so a job of a dead worker is back in its queue within about 2.5 s. Jobs come from
tests/reliability_jobs.py and append one line per event (start, end, fail, ...) to a record
file, which is how the tests see what ran where and how often. Faults are real: SIGKILL,
SIGTERM, SIGSTOP, a redis-server stopped and started again, jobs that kill their worker.

Every worker and redis-server a test starts is stopped by pid in the test's teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil  # type: ignore[import-untyped]
import pytest
import redis

from spark_bg import Job, Queue
from spark_bg.backends import FailedJob, QueueCounts
from tests import reliability_jobs as jobs
from tests.processes import Process, wait_for
from tests.servers import RedisServer

T = TypeVar("T")

LEASE_S = 2.0
SWEEP_INTERVAL_S = 0.5
WORKER_OPTIONS = (
    "--jobs-from",
    "tests",
    "--lease",
    str(LEASE_S),
    "--sweep-interval",
    str(SWEEP_INTERVAL_S),
    "--grace",
    "1",
)
"""Options of every test worker; a test's own options come later and override these."""

READY_LINE = "started: queues"
"""Text of the INFO line a worker logs once it takes jobs."""

EMPTY = QueueCounts(ready=0, delayed=0, active=0, failed=0)

OUTAGE_S = 3.0
"""How long the idle Redis restart test keeps the server down."""

CHAOS_JOBS = 2000
CHAOS_DURATION_S = 20.0
CHAOS_KILL_EVERY_S = 0.5


# Helpers


def wait_until(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    """Wait for `condition()` to be true; fail with `what` after `timeout_s` seconds."""
    try:
        wait_for(condition, timeout_s, interval_s=0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


def events(
    records: list[dict[str, Any]], event: str, label: str | None = None
) -> list[dict[str, Any]]:
    """Return the records of `event`, only those of `label` if given, oldest first."""
    return [
        entry
        for entry in records
        if entry["event"] == event and (label is None or entry["label"] == label)
    ]


def warning_lines(process: Process) -> list[str]:
    """Return the WARNING lines a worker logged so far."""
    return [line for line in process.output().splitlines() if " WARNING " in line]


class Cluster:
    """The workers of one test on one queue URL, all writing to one record file."""

    def __init__(self, url: str, directory: Path) -> None:
        self.url = url
        self.directory = directory
        self.record_dir = directory / "records"
        self.record_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[Process] = []

    @property
    def env(self) -> dict[str, str]:
        return {jobs.RECORD_DIR_ENV: str(self.record_dir)}

    def start_worker(
        self, *options: str, concurrency: int = 4, log_name: str | None = None, ready: bool = True
    ) -> Process:
        """Start `spark-worker --url URL` with the test options, then `options`.

        With `ready`, wait until the worker logged that it takes jobs.
        """
        name = log_name or f"worker-{len(self.processes)}"
        args = [
            sys.executable,
            "-m",
            "spark_bg",
            "--url",
            self.url,
            "--concurrency",
            str(concurrency),
            *WORKER_OPTIONS,
            *options,
        ]
        process = Process(args, self.directory / f"{name}.log", env=self.env)
        self.processes.append(process)
        if ready:
            process.wait_for_output(READY_LINE, timeout_s=20.0)
        return process

    def stop_all(self) -> None:
        """Stop every worker by pid: resume a stopped one, SIGTERM, SIGKILL after 5 s."""
        for process in self.processes:
            process.signal(signal.SIGCONT)
            process.stop(timeout_s=5.0)

    def records(self) -> list[dict[str, Any]]:
        path = self.record_dir / jobs.RECORD_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def ended(self, labels: list[str]) -> bool:
        """Return whether every job in `labels` recorded an end."""
        done = {entry["label"] for entry in events(self.records(), "end")}
        return done.issuperset(labels)

    def with_queue(self, operation: Callable[[Queue], Awaitable[T]]) -> T:
        """Open a queue on the cluster's URL, run `operation` on it, close it."""

        async def main() -> T:
            async with Queue(self.url) as queue:
                return await operation(queue)

        return asyncio.run(main())

    def push(self, *jobs_and_options: Job | tuple[Job, dict[str, Any]]) -> list[str]:
        """Push jobs, each alone or with its `push()` options, and return their ids."""

        async def operation(queue: Queue) -> list[str]:
            ids = []
            for item in jobs_and_options:
                job, options = item if isinstance(item, tuple) else (item, {})
                ids.append(queue.push(job, **options))
            await queue.flush()
            return ids

        return self.with_queue(operation)

    def counts(self) -> QueueCounts:
        return self.with_queue(lambda queue: queue.counts())

    def failed(self) -> list[FailedJob]:
        return self.with_queue(lambda queue: queue.failed(limit=1000))


@pytest.fixture
def cluster(redis_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster on the session's Redis server, emptied before the test."""
    workers = Cluster(redis_url, tmp_path)
    try:
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture(params=["redis", "sqlite"])
def any_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster on Redis, then on a fresh SQLite file."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = f"sqlite:///{tmp_path}/jobs.sqlite3"
    workers = Cluster(url, tmp_path)
    try:
        yield workers
    finally:
        workers.stop_all()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, which it may stop and start; stopped by pid after."""
    server = RedisServer(tmp_path / "own-redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Crashes


@pytest.mark.parametrize("other", ["beside", "after"])
def test_kill9_job_runs_elsewhere(any_cluster: Cluster, other: str) -> None:
    """A worker killed with SIGKILL mid-job: another worker finishes the job once.

    `beside`: the other worker runs before the kill; `after`: it starts after the kill.
    """
    cluster = any_cluster
    victim = cluster.start_worker(concurrency=1)
    [job_id] = cluster.push(jobs.FirstRunSlowJob("k", first_s=60.0, later_s=0.2))
    wait_until(lambda: events(cluster.records(), "start", "k"), 10.0, "the first run to start")

    rescuer = cluster.start_worker(concurrency=1) if other == "beside" else None
    victim.signal(signal.SIGKILL)
    killed_at = time.time()
    victim.wait(10.0)
    if rescuer is None:
        rescuer = cluster.start_worker(concurrency=1)
    wait_until(lambda: cluster.ended(["k"]), 15.0, "the job to finish on the other worker")

    records = cluster.records()
    starts = events(records, "start", "k")
    ends = events(records, "end", "k")
    print(f"kill -9 ({other}): job rerun {starts[-1]['t'] - killed_at:.2f} s after the kill")
    assert [entry["pid"] for entry in starts] == [victim.pid, rescuer.pid]
    assert [entry["pid"] for entry in ends] == [rescuer.pid]
    assert [entry["id"] for entry in ends] == [job_id]
    wait_until(lambda: cluster.counts() == EMPTY, 5.0, "the acknowledged job to leave the store")
    assert cluster.failed() == []


def test_chaos_kill_restart(
    any_cluster: Cluster, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """2,000 jobs, 3 workers, one killed with SIGKILL and restarted every 0.5 s for 20 s.

    No job may be lost; a job may complete twice (at-least-once delivery), which the test
    counts and reports in `chaos-BACKEND.json` in pytest's base temp directory. Takes about
    25 s per backend: the 20 s of kills, then the drain.
    """
    cluster = any_cluster
    backend = request.node.callspec.params["any_cluster"]
    labels = [f"c{i}" for i in range(CHAOS_JOBS)]
    steady = [cluster.start_worker(log_name=f"steady-{i}", concurrency=8) for i in range(2)]
    cluster.push(*(jobs.SleepJob(label, 0.2) for label in labels))

    kills = 0
    victims: list[Process] = []
    chaos_end = time.monotonic() + CHAOS_DURATION_S
    while time.monotonic() < chaos_end:
        victim = cluster.start_worker(concurrency=8, log_name="victim", ready=False)
        victims.append(victim)
        time.sleep(CHAOS_KILL_EVERY_S)  # schedules the fault; correctness waits below
        victim.signal(signal.SIGKILL)
        victim.wait(10.0)
        kills += 1
    finished_at_end_of_chaos = len({entry["label"] for entry in events(cluster.records(), "end")})

    drain_started = time.monotonic()
    with contextlib.suppress(AssertionError):
        wait_until(lambda: cluster.ended(labels), 120.0, "every chaos job to finish")
    drain_s = time.monotonic() - drain_started
    with contextlib.suppress(AssertionError):
        wait_until(lambda: cluster.counts() == EMPTY, 10.0, "the store to empty")

    records = cluster.records()
    ends = Counter(entry["label"] for entry in events(records, "end"))
    starts = Counter(entry["label"] for entry in events(records, "start"))
    victim_pids = {victim.pid for victim in victims}
    finished_runs = {(entry["pid"], entry["label"]) for entry in events(records, "end")}
    cut_runs = sum(
        1
        for entry in events(records, "start")
        if entry["pid"] in victim_pids and (entry["pid"], entry["label"]) not in finished_runs
    )
    failed = cluster.failed()
    figures = {
        "jobs": CHAOS_JOBS,
        "kills": kills,
        "lost": sum(1 for label in labels if ends[label] == 0),
        "duplicates": sum(1 for label in labels if ends[label] > 1),
        "started_more_than_once": sum(1 for label in labels if starts[label] > 1),
        "runs_cut_by_kill": cut_runs,
        "failed": len(failed),
        "finished_during_chaos": finished_at_end_of_chaos,
        "drain_s": round(drain_s, 2),
        "counts_after": str(cluster.counts()),
    }
    figures["backend"] = backend
    report = tmp_path_factory.getbasetemp() / f"chaos-{backend}.json"
    report.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"chaos figures written to {report}: {figures}")
    print(
        f"chaos: jobs={figures['jobs']} kills={kills} lost={figures['lost']} "
        f"duplicates={figures['duplicates']} backend={backend}"
    )

    for process in steady:
        assert process.popen.poll() is None, f"a steady worker died:\n{process.output()}"
    assert figures["lost"] == 0, f"jobs never finished: {figures}"
    assert figures["failed"] == 0, f"jobs failed: {[job.error for job in failed[:3]]}"
    assert cluster.counts() == EMPTY


@pytest.mark.parametrize(
    "job_class",
    [jobs.FirstRunSlowJob, jobs.FirstRunSlowThreadJob, jobs.FirstRunSlowProcessJob],
    ids=["async", "thread", "process"],
)
def test_sigterm_returns_job(cluster: Cluster, job_class: type[Job]) -> None:
    """SIGTERM with `--grace 0.5` during a long job: exit 0, job back in its queue unused.

    A new worker then runs it once to completion, still as attempt 1.
    """
    worker = cluster.start_worker("--grace", "0.5", concurrency=1)
    [job_id] = cluster.push(job_class("t", first_s=60.0, later_s=0.2))  # type: ignore[call-arg]
    wait_until(lambda: events(cluster.records(), "start", "t"), 15.0, "the first run to start")

    worker.signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = worker.wait(15.0)
    exit_s = time.monotonic() - signalled
    print(f"SIGTERM with grace 0.5 s during a {job_class.__name__}: exit in {exit_s:.2f} s")
    assert code == 0, worker.output()
    assert exit_s < 5.0
    assert "returned to the queue without using up an attempt" in worker.output()
    assert cluster.counts() == QueueCounts(ready=1, delayed=0, active=0, failed=0)
    first_pid = events(cluster.records(), "start", "t")[0]["pid"]
    if job_class.run_in_process:
        # The job ran in a child process, which the worker kills when it cancels the job.
        assert not psutil.pid_exists(first_pid)

    rescuer = cluster.start_worker(concurrency=1)
    wait_until(lambda: cluster.ended(["t"]), 15.0, "the returned job to finish")
    records = cluster.records()
    assert len(events(records, "start", "t")) == 2
    assert len(events(records, "end", "t")) == 1
    rescuer.wait_for_output(f"job {job_id} {job_class.__module__}:{job_class.__name__} started")
    assert f"started on default, attempt 1 of {job_class.max_attempts}" in rescuer.output()
    wait_until(lambda: cluster.counts() == EMPTY, 5.0, "the finished job to leave the store")
    assert cluster.failed() == []


def test_sigterm_acks_jobs_done_in_grace(any_cluster: Cluster) -> None:
    """SIGTERM while jobs run that finish within the grace period: exit 0, all acknowledged."""
    cluster = any_cluster
    worker = cluster.start_worker("--grace", "10", concurrency=4)
    labels = [f"g{i}" for i in range(4)]
    cluster.push(*(jobs.SleepJob(label, 0.3) for label in labels))
    wait_until(lambda: len(events(cluster.records(), "start")) == 4, 10.0, "4 jobs to start")

    worker.signal(signal.SIGTERM)
    signalled = time.monotonic()
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(8.0)
    exit_s = time.monotonic() - signalled
    assert worker.popen.returncode == 0, (
        f"exit code {worker.popen.returncode} {exit_s:.1f} s after SIGTERM (None: still "
        f"running):\n{worker.output()}"
    )
    assert "stopped: 4 jobs done" in worker.output()
    assert cluster.counts() == EMPTY


def test_sigterm_backend_down_logs_unacked(own_redis: RedisServer, tmp_path: Path) -> None:
    """SIGTERM while Redis is down and finished jobs wait for their acknowledgement.

    The worker gives up after a few attempts and exits, and it logs the ids of the jobs it
    could not acknowledge, which will run again once their leases expire.
    """
    cluster = Cluster(own_redis.url, tmp_path)
    try:
        worker = cluster.start_worker(concurrency=2)
        job_ids = cluster.push(jobs.SleepJob("u0", 0.5), jobs.SleepJob("u1", 0.5))
        wait_until(lambda: len(events(cluster.records(), "start")) == 2, 10.0, "2 jobs to start")
        own_redis.stop()
        wait_until(lambda: cluster.ended(["u0", "u1"]), 10.0, "both jobs to finish")
        wait_until(lambda: "ack of 2 jobs" in worker.output(), 10.0, "a failed acknowledgement")

        worker.signal(signal.SIGTERM)
        code = worker.wait(30.0)
        assert code == 0, worker.output()
        unacked = [line for line in worker.output().splitlines() if "not acknowledged" in line]
        assert len(unacked) == 1, worker.output()
        assert all(job_id in unacked[0] for job_id in job_ids)
    finally:
        cluster.stop_all()


def test_sigstop_past_lease(cluster: Cluster) -> None:
    """A worker frozen with SIGSTOP past its lease, then resumed with SIGCONT.

    Another worker recovers the job, runs it and acknowledges it. The frozen worker's run
    also finishes once resumed, so `run()` completes twice (at-least-once delivery). Its
    acknowledgement is rejected, because the lease now belongs to the other worker or the job
    is gone, so it logs that it lost its lease. The other worker, whose acknowledgement
    deleted the job, logs no such warning. The store ends empty with no failed job.
    """
    frozen = cluster.start_worker(concurrency=1)
    [job_id] = cluster.push(jobs.SleepJob("s", 3.0))
    wait_until(lambda: events(cluster.records(), "start", "s"), 10.0, "the first run to start")
    frozen.signal(signal.SIGSTOP)
    stopped_at = time.time()

    rescuer = cluster.start_worker(concurrency=1)
    wait_until(
        lambda: events(cluster.records(), "end", "s"), LEASE_S + 10.0, "the rescuer's run to end"
    )
    print(
        "SIGSTOP: job finished by the rescuer "
        f"{events(cluster.records(), 'end', 's')[0]['t'] - stopped_at:.2f} s after the stop"
    )
    frozen.signal(signal.SIGCONT)
    wait_until(
        lambda: any(job_id in line and "lost its lease" in line for line in warning_lines(frozen)),
        10.0,
        "the resumed worker to report its lost lease",
    )

    records = cluster.records()
    assert [entry["pid"] for entry in events(records, "start", "s")] == [frozen.pid, rescuer.pid]
    assert sorted(entry["pid"] for entry in events(records, "end", "s")) == sorted(
        [frozen.pid, rescuer.pid]
    )
    assert not any("lost its lease" in line for line in warning_lines(rescuer))
    assert cluster.counts() == EMPTY
    with redis.Redis.from_url(cluster.url) as client:
        assert client.hexists("spark:{default}:jobs", job_id) == 0
    assert cluster.failed() == []
    assert frozen.popen.poll() is None


def test_poison_job_fails_after_max_deliveries(any_cluster: Cluster) -> None:
    """A job that kills its worker on every run is failed after `--max-deliveries` hand-outs.

    The test plays a supervisor that starts a new worker whenever the last one died.
    """
    cluster = any_cluster
    options = ("--max-deliveries", "3", "--lease", "1", "--sweep-interval", "0.2")
    [job_id] = cluster.push(jobs.PoisonJob("p"))
    worker = cluster.start_worker(*options, concurrency=1, ready=False)
    restarts = 0
    deadline = time.monotonic() + 40.0
    while not cluster.failed() and time.monotonic() < deadline:
        if worker.popen.poll() is not None:
            worker.stop()
            worker = cluster.start_worker(*options, concurrency=1, ready=False)
            restarts += 1
        time.sleep(0.1)  # the supervisor's polling interval

    failed = cluster.failed()
    print(f"poison job: failed after {restarts} worker restarts")
    assert [job.id for job in failed] == [job_id]
    assert "delivered 3 times without finishing" in failed[0].error
    assert len(events(cluster.records(), "start", "p")) == 3
    assert cluster.counts() == QueueCounts(ready=0, delayed=0, active=0, failed=1)


def test_poison_spares_waiting_job(any_cluster: Cluster) -> None:
    """A job waiting behind a poison job is not failed as a crasher with it.

    With `--concurrency 1` and no prefetch (the default) a worker holds only the job it runs.
    The ids make both backends hand the two out poison first on every delivery.
    """
    cluster = any_cluster
    options = ("--max-deliveries", "3", "--lease", "1", "--sweep-interval", "0.2")
    cluster.push(
        (jobs.PoisonJob("p"), {"job_id": "b-poison"}),
        (jobs.SleepJob("innocent"), {"job_id": "a-innocent"}),
    )
    worker = cluster.start_worker(*options, concurrency=1, ready=False)
    deadline = time.monotonic() + 40.0
    while not (cluster.failed() and cluster.ended(["innocent"])):
        if time.monotonic() > deadline:
            break
        if worker.popen.poll() is not None:
            worker.stop()
            worker = cluster.start_worker(*options, concurrency=1, ready=False)
        time.sleep(0.1)  # the supervisor's polling interval

    worker.stop()
    assert [job.id for job in cluster.failed()] == ["b-poison"]
    assert cluster.ended(["innocent"])


# Backend faults


def test_redis_restart_idle(own_redis: RedisServer, tmp_path: Path) -> None:
    """Redis stopped for 3 s and started while the workers wait: they reconnect, run new jobs.

    The server keeps no data across this restart, so the jobs are pushed after it. A restart
    shorter than redis-py's own command retries (about 1 s) goes unnoticed. A longer outage
    makes each worker log a WARNING per failed attempt while it retries.
    """
    cluster = Cluster(own_redis.url, tmp_path)
    try:
        workers = [cluster.start_worker() for _ in range(2)]
        own_redis.stop()
        time.sleep(OUTAGE_S)  # the fault: the server stays down this long
        own_redis.start()
        for worker in workers:
            wait_until(
                functools.partial(warning_lines, worker), 10.0, "a warning about the lost server"
            )

        labels = [f"r{i}" for i in range(50)]
        cluster.push(*(jobs.SleepJob(label, 0.01) for label in labels))
        wait_until(lambda: cluster.ended(labels), 30.0, "every job pushed after the restart")
        for worker in workers:
            assert worker.popen.poll() is None, worker.output()
        for worker in workers:
            print(f"worker {worker.pid} warnings: {warning_lines(worker)}")
            assert all("attempt" in line for line in warning_lines(worker))
        ends = Counter(entry["label"] for entry in events(cluster.records(), "end"))
        assert [label for label in labels if ends[label] != 1] == []
    finally:
        cluster.stop_all()


def test_redis_quick_restart_idle(own_redis: RedisServer, tmp_path: Path) -> None:
    """Redis restarted at once while the workers wait: they go on and run new jobs once each.

    The server keeps no data across this restart, so the jobs are pushed after it.
    """
    cluster = Cluster(own_redis.url, tmp_path)
    try:
        workers = [cluster.start_worker() for _ in range(2)]
        own_redis.restart()
        labels = [f"q{i}" for i in range(20)]
        cluster.push(*(jobs.SleepJob(label, 0.01) for label in labels))
        wait_until(lambda: cluster.ended(labels), 30.0, "every job pushed after the restart")

        for worker in workers:
            assert worker.popen.poll() is None, worker.output()
        ends = Counter(entry["label"] for entry in events(cluster.records(), "end"))
        assert [label for label in labels if ends[label] != 1] == []
    finally:
        cluster.stop_all()


def test_worker_waits_for_redis(own_redis: RedisServer, tmp_path: Path) -> None:
    """A worker started while Redis is down retries with a WARNING each time, then runs jobs."""
    own_redis.stop()
    cluster = Cluster(own_redis.url, tmp_path)
    try:
        worker = cluster.start_worker(ready=False)
        worker.wait_for_output("cannot reach the backend (attempt 2)", timeout_s=10.0)
        own_redis.start()
        worker.wait_for_output(READY_LINE, timeout_s=15.0)
        cluster.push(jobs.SleepJob("w"))
        wait_until(lambda: cluster.ended(["w"]), 10.0, "the job to run")
        assert worker.popen.poll() is None
    finally:
        cluster.stop_all()


def test_redis_restart_busy(own_redis: RedisServer, tmp_path: Path) -> None:
    """Redis stopped and started while the workers run jobs: every job completes.

    A Redis without persistence loses every job at a restart, which no client can prevent,
    so this test restarts with a snapshot written at shutdown and loaded at start, as a
    production Redis with RDB or AOF persistence would. Jobs running during the outage
    finish, and their acknowledgements are retried until the server is back.
    """
    cluster = Cluster(own_redis.url, tmp_path)
    try:
        workers = [cluster.start_worker(concurrency=8) for _ in range(2)]
        labels = [f"b{i}" for i in range(300)]
        cluster.push(*(jobs.SleepJob(label, 0.05) for label in labels))
        wait_until(lambda: len(events(cluster.records(), "end")) >= 50, 20.0, "50 jobs to finish")
        restart_began = time.monotonic()
        own_redis.restart(keep_data=True)
        print(f"Redis restart with its snapshot took {time.monotonic() - restart_began:.2f} s")
        wait_until(lambda: cluster.ended(labels), 60.0, "every job to finish after the restart")
        wait_until(lambda: cluster.counts() == EMPTY, 10.0, "the store to empty")

        for worker in workers:
            assert worker.popen.poll() is None, worker.output()
        assert any(warning_lines(worker) for worker in workers)
        ends = Counter(entry["label"] for entry in events(cluster.records(), "end"))
        print(f"Redis restart while busy: {sum(1 for n in ends.values() if n > 1)} duplicates")
        assert cluster.failed() == []
    finally:
        cluster.stop_all()


def test_redis_paused_busy(own_redis: RedisServer, tmp_path: Path) -> None:
    """Redis frozen with SIGSTOP for 7 s while jobs run: a silent connection, no reset.

    Commands wait for the 5 s socket timeout, the workers log and retry, and once the server
    is resumed every job completes. Leases kept running on the server's clock meanwhile, so
    some jobs may be recovered and run twice.
    """
    cluster = Cluster(own_redis.url, tmp_path)
    try:
        workers = [cluster.start_worker(concurrency=4) for _ in range(2)]
        labels = [f"z{i}" for i in range(100)]
        cluster.push(*(jobs.SleepJob(label, 0.05) for label in labels))
        wait_until(lambda: len(events(cluster.records(), "end")) >= 20, 20.0, "20 jobs to finish")
        assert own_redis.pid is not None
        os.kill(own_redis.pid, signal.SIGSTOP)
        try:
            time.sleep(7.0)  # the fault: a server that does not reply for longer than timeouts
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)
        wait_until(lambda: cluster.ended(labels), 60.0, "every job to finish after the pause")
        wait_until(lambda: cluster.counts() == EMPTY, 10.0, "the store to empty")

        for worker in workers:
            assert worker.popen.poll() is None, worker.output()
        assert any(warning_lines(worker) for worker in workers)
        ends = Counter(entry["label"] for entry in events(cluster.records(), "end"))
        print(f"Redis paused while busy: {sum(1 for n in ends.values() if n > 1)} duplicates")
        assert cluster.failed() == []
    finally:
        cluster.stop_all()


# Retries, delays and failures


def test_failing_jobs_retry_with_jitter(any_cluster: Cluster) -> None:
    """100 jobs that always fail run 3 times each, with jittered backoff, then sit in failed.

    `AlwaysFailJob` has a 0.2 s backoff base: the retry after attempt 1 waits 0.1 to 0.2 s,
    the one after attempt 2 waits 0.2 to 0.4 s.
    """
    cluster = any_cluster
    for _ in range(2):
        cluster.start_worker(concurrency=50)
    labels = [f"f{i}" for i in range(100)]
    cluster.push(*(jobs.AlwaysFailJob(label) for label in labels))
    wait_until(lambda: cluster.counts().failed == 100, 30.0, "100 jobs in the failed store")

    records = cluster.records()
    attempts_by_label = {
        label: [entry["attempt"] for entry in events(records, "start", label)] for label in labels
    }
    assert {label: a for label, a in attempts_by_label.items() if a != [1, 2, 3]} == {}

    first_gaps = []
    second_gaps = []
    for label in labels:
        fails = events(records, "fail", label)
        starts = events(records, "start", label)
        first_gaps.append(starts[1]["t"] - fails[0]["t"])
        second_gaps.append(starts[2]["t"] - fails[1]["t"])
    second_starts = [events(records, "start", label)[1]["t"] for label in labels]
    spread_s = max(second_starts) - min(second_starts)
    print(
        f"retry gaps: attempt 1->2 {min(first_gaps):.3f}..{max(first_gaps):.3f} s, "
        f"attempt 2->3 {min(second_gaps):.3f}..{max(second_gaps):.3f} s, "
        f"attempt-2 starts spread over {spread_s:.3f} s"
    )
    # Delays are stored in whole milliseconds, so a retry may start up to 1 ms early.
    assert min(first_gaps) >= 0.1 - 0.002
    assert min(second_gaps) >= 0.2 - 0.002
    assert statistics.pstdev(first_gaps) > 0.01
    assert spread_s > 0.05

    failed = cluster.failed()
    assert sorted(job.id for job in failed) == sorted(
        {entry["id"] for entry in events(records, "start")}
    )
    assert {job.attempts for job in failed} == {3}
    assert all("Traceback" in job.error for job in failed)
    assert all("AlwaysFailJob" in job.error for job in failed)


def test_retry_job_delay_honoured(any_cluster: Cluster) -> None:
    """`RetryJob(1.0)`: the second attempt starts no sooner than 1 s later, and finishes."""
    cluster = any_cluster
    cluster.start_worker()
    cluster.push(jobs.RetryOnceJob("d", 1.0))
    wait_until(lambda: cluster.ended(["d"]), 15.0, "the second attempt to finish")

    records = cluster.records()
    starts = events(records, "start", "d")
    gap_s = starts[1]["t"] - events(records, "retry", "d")[0]["t"]
    print(f"RetryJob(1.0): second attempt {gap_s:.3f} s after the first raised")
    assert [entry["attempt"] for entry in starts] == [1, 2]
    assert gap_s >= 1.0 - 0.002
    assert gap_s < 1.0 + 2.0
    wait_until(lambda: cluster.counts() == EMPTY, 5.0, "the finished job to leave the store")


@pytest.mark.parametrize(
    "job_class", [jobs.CancelledJob, jobs.FailOnJob], ids=["cancel_job", "fail_on"]
)
def test_final_error_fails_at_once(any_cluster: Cluster, job_class: type[Job]) -> None:
    """`CancelJob` and an exception listed in `fail_on` fail the job after one run."""
    cluster = any_cluster
    cluster.start_worker()
    [job_id] = cluster.push(job_class("x"))  # type: ignore[call-arg]
    wait_until(lambda: cluster.counts().failed == 1, 10.0, "the job in the failed store")

    failed = cluster.failed()
    assert [job.id for job in failed] == [job_id]
    assert failed[0].attempts == 1
    assert len(events(cluster.records(), "start", "x")) == 1
    assert cluster.counts() == QueueCounts(ready=0, delayed=0, active=0, failed=1)


def test_delayed_jobs_run_once_when_due(any_cluster: Cluster) -> None:
    """Jobs pushed with `delay=` or `run_at=` run once each, never before they are due.

    The backend is on this host, so the test compares due times with its own clock. Delays
    are stored in whole milliseconds, so a job may start up to 1 ms early.
    """
    cluster = any_cluster
    for _ in range(3):
        cluster.start_worker()
    rng = random.Random(7)
    pushed_at = time.time()
    due: dict[str, float] = {}
    items: list[tuple[Job, dict[str, Any]]] = []
    for i in range(20):
        delay_s = rng.uniform(0.2, 3.0)
        label = f"delay{i}"
        due[label] = pushed_at + delay_s
        items.append((jobs.SleepJob(label), {"delay": delay_s}))
    for i in range(20):
        run_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=rng.uniform(0.2, 3.0))
        label = f"at{i}"
        due[label] = run_at.timestamp()
        items.append((jobs.SleepJob(label), {"run_at": run_at}))
    cluster.push(*items)
    wait_until(lambda: cluster.ended(list(due)), 20.0, "every delayed job to run")
    # Once every job is acknowledged and deleted, no further run can start.
    wait_until(lambda: cluster.counts() == EMPTY, 5.0, "the finished jobs to leave the store")

    records = cluster.records()
    starts = Counter(entry["label"] for entry in events(records, "start"))
    lateness = {
        entry["label"]: entry["t"] - due[entry["label"]] for entry in events(records, "start")
    }
    print(
        f"delayed jobs: lateness {min(lateness.values()):.3f}..{max(lateness.values()):.3f} s, "
        f"run by {len({entry['pid'] for entry in events(records, 'start')})} workers"
    )
    assert {label: n for label, n in starts.items() if n != 1} == {}
    assert {label: late for label, late in lateness.items() if late < -0.002} == {}
    assert max(lateness.values()) < 2.0


# Timeouts


def test_async_timeout_cancels(cluster: Cluster) -> None:
    """An async job past `timeout_s` is cancelled, and each time counts as a failed attempt."""
    cluster.start_worker()
    [job_id] = cluster.push(jobs.AsyncTimeoutJob("a"))
    wait_until(lambda: cluster.counts().failed == 1, 15.0, "the job in the failed store")

    records = cluster.records()
    assert len(events(records, "start", "a")) == 2
    assert len(events(records, "cancelled", "a")) == 2
    assert events(records, "end", "a") == []
    failed = cluster.failed()
    assert [job.id for job in failed] == [job_id]
    assert failed[0].attempts == 2
    assert "TimeoutError" in failed[0].error


def test_process_timeout_kills_child(cluster: Cluster) -> None:
    """A sync job with `run_in_process = True` past its timeout: its child process is killed."""
    cluster.start_worker()
    [job_id] = cluster.push(jobs.ProcessTimeoutJob("c"))
    wait_until(lambda: cluster.counts().failed == 1, 15.0, "the job in the failed store")

    [start] = events(cluster.records(), "start", "c")
    wait_until(lambda: not psutil.pid_exists(start["pid"]), 5.0, "the child process to be gone")
    failed = cluster.failed()
    assert [job.id for job in failed] == [job_id]
    assert "child process was killed" in failed[0].error
    assert events(cluster.records(), "end", "c") == []


def test_thread_timeout_fails_attempt(cluster: Cluster) -> None:
    """A sync job in a thread past its timeout fails, but its thread runs on to the end.

    Python cannot stop a thread from outside, so the worker only stops waiting for it: the
    job's `end` record appears after the job is already in the failed store.
    """
    worker = cluster.start_worker()
    [job_id] = cluster.push(jobs.ThreadTimeoutJob("h", 2.0))
    wait_until(lambda: cluster.counts().failed == 1, 15.0, "the job in the failed store")
    failed_at = time.time()

    failed = cluster.failed()
    assert [job.id for job in failed] == [job_id]
    assert "the thread running it cannot be stopped" in failed[0].error
    assert events(cluster.records(), "end", "h") == []
    wait_until(lambda: events(cluster.records(), "end", "h"), 10.0, "the thread to finish")
    assert events(cluster.records(), "end", "h")[0]["t"] > failed_at
    assert worker.popen.poll() is None


def test_stuck_thread_keeps_pool_usable(cluster: Cluster) -> None:
    """After a sync job's thread outlives its timeout, the next sync job still runs.

    The stuck thread occupies the only thread of the `--concurrency 1` pool for 4 s. The
    next job must start once a thread is free, not time out while it waits for one.
    """
    cluster.start_worker(concurrency=1)
    cluster.push(jobs.ThreadTimeoutJob("h", 4.0))
    wait_until(lambda: cluster.counts().failed == 1, 10.0, "the stuck job in the failed store")
    [next_id] = cluster.push(jobs.QuickThreadJob("q"))
    wait_until(
        lambda: cluster.ended(["q"]) or len(cluster.failed()) == 2, 15.0, "the next job to settle"
    )

    errors = [job.error.splitlines()[-1] for job in cluster.failed() if job.id == next_id]
    assert events(cluster.records(), "start", "q") != [], f"failed without running: {errors}"
    assert errors == []


# Shutdown


def test_idle_sigterm_exits_fast(any_cluster: Cluster) -> None:
    """An idle worker exits with code 0 within 1 s of SIGTERM (1.5 s allowed for teardown)."""
    worker = any_cluster.start_worker()
    time.sleep(0.3)  # lets the worker settle into its idle wait before the signal
    worker.signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = worker.wait(10.0)
    exit_s = time.monotonic() - signalled
    print(f"idle worker exited {exit_s:.3f} s after SIGTERM")
    assert code == 0, worker.output()
    assert exit_s < 1.5


def test_second_sigint_exits_at_once(cluster: Cluster) -> None:
    """A second SIGINT while the worker waits for a running job ends it at once, with code 1."""
    worker = cluster.start_worker("--grace", "60", concurrency=1)
    cluster.push(jobs.FirstRunSlowJob("i", first_s=60.0))
    wait_until(lambda: events(cluster.records(), "start", "i"), 10.0, "the job to start")
    worker.signal(signal.SIGINT)
    worker.wait_for_output("stopping: no new jobs are taken", timeout_s=5.0)

    worker.signal(signal.SIGINT)
    signalled = time.monotonic()
    code = worker.wait(10.0)
    exit_s = time.monotonic() - signalled
    print(f"worker exited {exit_s:.3f} s after the second SIGINT")
    assert code == 1
    assert exit_s < 1.5
    assert "second interrupt: exiting at once" in worker.output()


# The failed-job store


def test_failed_list_retry_delete(any_cluster: Cluster) -> None:
    """List failed jobs, retry one, retry the rest, delete one and then all, from Python."""
    cluster = any_cluster
    cluster.start_worker()
    ids = cluster.push(*(jobs.FailFirstRunsJob(f"l{i}", failures=1) for i in range(3)))
    wait_until(lambda: cluster.counts().failed == 3, 10.0, "3 jobs in the failed store")
    failed = cluster.failed()
    assert sorted(job.id for job in failed) == sorted(ids)
    assert all("fails run 1 on purpose" in job.error for job in failed)

    assert cluster.with_queue(lambda queue: queue.retry_failed(ids=[ids[0]])) == 1
    wait_until(lambda: cluster.ended(["l0"]), 10.0, "the retried job to succeed")
    assert sorted(job.id for job in cluster.failed()) == sorted(ids[1:])

    assert cluster.with_queue(lambda queue: queue.retry_failed()) == 2
    wait_until(lambda: cluster.ended(["l1", "l2"]), 10.0, "the other retried jobs to succeed")
    wait_until(lambda: cluster.counts() == EMPTY, 5.0, "the store to empty")

    doomed = cluster.push(*(jobs.FailFirstRunsJob(f"m{i}", failures=5) for i in range(3)))
    wait_until(lambda: cluster.counts().failed == 3, 10.0, "3 new jobs in the failed store")
    assert cluster.with_queue(lambda queue: queue.delete_failed(ids=[doomed[0]])) == 1
    assert sorted(job.id for job in cluster.failed()) == sorted(doomed[1:])
    assert cluster.with_queue(lambda queue: queue.delete_failed()) == 2
    assert cluster.failed() == []
    assert cluster.counts() == EMPTY
    assert cluster.with_queue(lambda queue: queue.retry_failed(ids=[doomed[0]])) == 0
