"""Run one measurement of one system and print its result as one JSON line on stdout.

Started by run.py inside the system's virtual environment, with PYTHONPATH set to bench/, as
``python -m adapters.case --module adapters.rq_bench --variant simple --measure drain ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import urllib.request

from harness import procs

from adapters import record
from adapters.base import System

BATCH_SIZE = 100
# Seconds a burst worker gets to exit after the last job before it is stopped.
BURST_EXIT_TIMEOUT = 30.0
# Seconds without a finished job after which a drain or memory case fails. It is well above the
# worker start-up times seen here, which stayed under 5 s.
STALL_TIMEOUT = 60.0


class WorkerProcess:
    """One worker process of the system under test, with its output in a log file."""

    def __init__(self, system: System, burst: bool, log_path: str) -> None:
        self.argv = system.worker_argv(burst)
        env = dict(os.environ, **system.worker_env())
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.log.write(f"$ {' '.join(self.argv)}\n".encode())
        self.log.flush()
        self.process = subprocess.Popen(
            self.argv, env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT
        )

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"worker exited with code {self.process.returncode}: {' '.join(self.argv)}"
                f" (see {self.log.name})"
            )

    def wait_exit(self, timeout: float) -> bool:
        try:
            self.process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        procs.stop_tree(self.process)
        self.log.close()


async def wait_for_marks(path: str, count: int, limit_s: float, worker: WorkerProcess) -> None:
    """Wait until the completion record contains ``count`` entries.

    Raises RuntimeError when the worker exits first, and TimeoutError after ``limit_s`` seconds
    or when no job finishes for STALL_TIMEOUT seconds.
    """
    deadline = time.monotonic() + limit_s
    last_count, last_progress = -1, time.monotonic()
    while (done := record.count_marks(path)) < count:
        now = time.monotonic()
        if done != last_count:
            last_count, last_progress = done, now
        # A burst worker may exit right after the last job, so the count is read again first.
        if worker.process.poll() is not None and record.count_marks(path) < count:
            raise RuntimeError(
                f"worker exited with code {worker.process.returncode} after "
                f"{record.count_marks(path)} of {count} jobs (see {worker.log.name})"
            )
        if now > deadline:
            raise TimeoutError(f"only {done} of {count} jobs finished within {limit_s:.0f} s")
        if now - last_progress > STALL_TIMEOUT:
            raise TimeoutError(
                f"no job finished for {STALL_TIMEOUT:.0f} s after {done} of {count} "
                f"jobs (see {worker.log.name})"
            )
        await asyncio.sleep(0.05)


async def prefill(system: System, count: int) -> None:
    """Push ``count`` no-op jobs as fast as the system allows: its batch path if it has one."""
    if system.batch_api is not None:
        for _ in range(count // BATCH_SIZE):
            await system.push_noop_many(BATCH_SIZE)
        for _ in range(count % BATCH_SIZE):
            await system.push_noop()
    else:
        for _ in range(count):
            await system.push_noop()


async def measure_enqueue(system: System, args: argparse.Namespace) -> dict:
    await system.open()
    try:
        for _ in range(min(200, args.jobs // 10)):
            await system.push_noop()
        start = time.perf_counter()
        for _ in range(args.jobs):
            await system.push_noop()
        elapsed = time.perf_counter() - start
    finally:
        await system.close()
    return {"rate": args.jobs / elapsed, "elapsed_s": elapsed, "jobs": args.jobs}


async def measure_batch(system: System, args: argparse.Namespace) -> dict:
    if system.batch_api is None:
        return {"skipped": "no batch path"}
    batches = args.jobs // BATCH_SIZE
    await system.open()
    try:
        await system.push_noop_many(BATCH_SIZE)
        start = time.perf_counter()
        for _ in range(batches):
            await system.push_noop_many(BATCH_SIZE)
        elapsed = time.perf_counter() - start
    finally:
        await system.close()
    jobs = batches * BATCH_SIZE
    return {
        "rate": jobs / elapsed,
        "elapsed_s": elapsed,
        "jobs": jobs,
        "batch_api": system.batch_api,
    }


async def measure_drain(system: System, args: argparse.Namespace) -> dict:
    await system.open()
    try:
        await prefill(system, args.jobs)
    finally:
        await system.close()
    warnings = []
    worker = WorkerProcess(system, burst=system.burst, log_path=args.log)
    try:
        await wait_for_marks(args.record, args.jobs, args.wait_timeout, worker)
        if system.burst and not worker.wait_exit(BURST_EXIT_TIMEOUT):
            warnings.append(
                f"the burst worker was still running {BURST_EXIT_TIMEOUT:.0f} s after "
                "the last job and was stopped with SIGTERM"
            )
    finally:
        worker.stop()
    marks = record.read_marks(args.record)
    if len(marks) > args.jobs:
        warnings.append(f"{len(marks) - args.jobs} of {args.jobs} jobs ran twice")
    elapsed = max(marks) - min(marks)
    return {
        "rate": (len(marks) - 1) / elapsed,
        "elapsed_s": elapsed,
        "jobs": args.jobs,
        "runs": len(marks),
        "burst": system.burst,
        "warnings": warnings,
    }


async def read_pickup(fifo_fd: int, t_push: float, limit_s: float) -> float:
    """Read FIFO messages until the one for ``t_push`` arrives; return its start time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"job pushed at {t_push:.6f} did not start within {limit_s:.0f} s")
        ready = asyncio.Event()
        loop.add_reader(fifo_fd, ready.set)
        try:
            await asyncio.wait_for(ready.wait(), remaining)
        except TimeoutError:
            continue
        finally:
            loop.remove_reader(fifo_fd)
        data = os.read(fifo_fd, record.PICKUP_SIZE)
        pushed, started = record.unpack_pickup(data)
        if pushed == t_push:
            return started


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values``."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


async def measure_latency(system: System, args: argparse.Namespace) -> dict:
    os.mkfifo(args.fifo)
    # O_RDWR keeps a writer open, so reads never see end-of-file between jobs.
    fifo_fd = os.open(args.fifo, os.O_RDWR | os.O_NONBLOCK)
    worker = WorkerProcess(system, burst=False, log_path=args.log)
    latencies: list[float] = []
    try:
        await system.open()
        try:
            # The first job also waits for the worker to start.
            t_push = time.time()
            await system.push_pickup(t_push)
            await read_pickup(fifo_fd, t_push, args.wait_timeout)
            for index in range(args.jobs + 5):
                await asyncio.sleep(random.uniform(args.gap_min, args.gap_max))
                worker.check_alive()
                t_push = time.time()
                await system.push_pickup(t_push)
                started = await read_pickup(fifo_fd, t_push, 30)
                if index >= 5:
                    latencies.append((started - t_push) * 1000)
        finally:
            await system.close()
    finally:
        worker.stop()
        os.close(fifo_fd)
    return {
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "mean_ms": statistics.fmean(latencies),
        "max_ms": max(latencies),
        "jobs": len(latencies),
        "gap_s": [args.gap_min, args.gap_max],
    }


async def measure_memory(system: System, args: argparse.Namespace) -> dict:
    worker = WorkerProcess(system, burst=False, log_path=args.log)
    try:
        rss: dict[str, float] = {}
        pushed = 0
        for target in (args.jobs, args.jobs2):
            await system.open()
            try:
                await prefill(system, target - pushed)
            finally:
                await system.close()
            pushed = target
            await wait_for_marks(args.record, target, args.wait_timeout, worker)
            await asyncio.sleep(1.0)
            worker.check_alive()
            rss[str(target)] = procs.tree_rss_kib(worker.process.pid) / 1024
    finally:
        worker.stop()
    first, second = rss[str(args.jobs)], rss[str(args.jobs2)]
    return {
        "rss_first_mb": first,
        "rss_second_mb": second,
        "growth_mb": second - first,
        "jobs_first": args.jobs,
        "jobs_second": args.jobs2,
    }


async def measure_raw(system: System, args: argparse.Namespace) -> dict:
    from adapters.raw_redis import raw_figures

    return {"figures": await raw_figures(system.redis_url, args.jobs)}


def parse_wrk(output: str) -> dict:
    """Extract requests/s and error counts from wrk's report."""
    match = re.search(r"Requests/sec:\s+([0-9.]+)", output)
    if match is None:
        raise RuntimeError(f"wrk printed no Requests/sec line: {output[-500:]!r}")
    requests = re.search(r"(\d+) requests in", output)
    result = {
        "rps": float(match.group(1)),
        "requests": int(requests.group(1)) if requests else 0,
        "non_2xx": 0,
        "socket_errors": 0,
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        result["non_2xx"] = int(non_2xx.group(1))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors:
        result["socket_errors"] = sum(int(value) for value in errors.groups())
    return result


def run_wrk(port: int, seconds: float, connections: int) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk not found: install Debian's wrk package (apt-get install wrk)")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", f"http://127.0.0.1:{port}/"]
    completed = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if completed.returncode != 0:
        raise RuntimeError(
            f"wrk exited with code {completed.returncode}: {completed.stderr.strip()}"
        )
    return parse_wrk(completed.stdout)


async def count_spark_jobs(redis_url: str) -> int:
    """Return the number of jobs in spark_bg's default queue, in any state."""
    import spark_bg

    queue = spark_bg.Queue(redis_url)
    await queue.open()
    try:
        counts = await queue.counts()
    finally:
        await queue.aclose()
    return counts.ready + counts.delayed + counts.active + counts.failed


def measure_middleware(args: argparse.Namespace) -> dict:
    port = procs.free_port()
    env = dict(os.environ, BENCH_APP_VARIANT=args.variant)
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "adapters.spark_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    with open(args.log, "ab") as log:
        log.write(f"$ BENCH_APP_VARIANT={args.variant} {' '.join(argv)}\n".encode())
        log.flush()
        server = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            procs.wait_for_port(port, 30, server)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
                if response.status != 200:
                    raise RuntimeError(f"GET / returned status {response.status}")
            warmup = run_wrk(port, 1, args.connections)
            result = run_wrk(port, args.duration, args.connections)
        finally:
            procs.stop_tree(server)
    if result["non_2xx"] or result["socket_errors"]:
        raise RuntimeError(
            f"wrk saw {result['non_2xx']} non-2xx responses "
            f"and {result['socket_errors']} socket errors"
        )
    result.update(
        duration_s=args.duration,
        connections=args.connections,
        server="uvicorn, 1 process, --no-access-log",
    )
    if args.variant == "middleware_push":
        # One job per request, including the check request and the warm-up run.
        expected = 1 + warmup["requests"] + result["requests"]
        stored = asyncio.run(count_spark_jobs(os.environ["BENCH_REDIS_URL"]))
        # wrk does not count the requests still in flight when it stops, so stored may exceed
        # expected.
        result.update(
            jobs_expected=expected, jobs_stored=stored, jobs_lost=max(0, expected - stored)
        )
    with open(args.log, errors="replace") as log:
        server_output = log.read()
    result["flush_warnings"] = server_output.count("flush of ")
    result["flush_errors"] = len(re.findall(r"lost \d+ jobs", server_output))
    return result


MEASURES = {
    "enqueue": measure_enqueue,
    "batch": measure_batch,
    "drain": measure_drain,
    "latency": measure_latency,
    "memory": measure_memory,
    "raw": measure_raw,
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--module", required=True, help="adapter module, e.g. adapters.rq_bench")
    parser.add_argument("--variant", default="", help="adapter variant, e.g. simple or fork for RQ")
    parser.add_argument("--measure", required=True, choices=sorted([*MEASURES, "middleware"]))
    parser.add_argument(
        "--jobs", type=int, required=True, help="number of jobs (first step for memory)"
    )
    parser.add_argument(
        "--jobs2", type=int, default=0, help="jobs after the second step of the memory measurement"
    )
    parser.add_argument(
        "--gap-min",
        type=float,
        default=0.01,
        help="minimum idle seconds before each pickup-latency push",
    )
    parser.add_argument(
        "--gap-max",
        type=float,
        default=0.05,
        help="maximum idle seconds before each pickup-latency push",
    )
    parser.add_argument(
        "--wait-timeout", type=float, default=120.0, help="seconds to wait for the worker"
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds of load per wrk run (middleware)"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (middleware)")
    parser.add_argument(
        "--workdir", required=True, help="scratch directory for the record file and FIFO"
    )
    parser.add_argument("--log", required=True, help="file that receives the worker's output")
    return parser.parse_args(argv)


def run_measure(args: argparse.Namespace) -> dict:
    if args.measure == "middleware":
        return measure_middleware(args)
    module = importlib.import_module(args.module)
    system = module.System(args.variant, os.environ["BENCH_REDIS_URL"])
    result = asyncio.run(MEASURES[args.measure](system, args))
    return {**result, "settings": system.settings()}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.record = os.path.join(args.workdir, "record.bin")
    args.fifo = os.path.join(args.workdir, "pickup.fifo")
    os.environ[record.RECORD_ENV] = args.record
    os.environ[record.FIFO_ENV] = args.fifo
    try:
        result = {"ok": True, **run_measure(args)}
    except Exception as exc:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
