"""The command line: spark-jobs on failed jobs, spark-worker's errors, and retry backoff."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import spark_bg
from spark_bg.worker import backoff_delay
from tests.jobs import StateJob
from tests.processes import REPOSITORY


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `spark-jobs ARGS` and capture its output."""
    return run_python("-c", "from spark_bg.cli import jobs; jobs()", *args)


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPOSITORY,
        check=False,
    )


def fail_two_jobs(url: str) -> list[str]:
    """Push two jobs and fail them through the backend, as a worker would."""

    async def main() -> list[str]:
        async with spark_bg.Queue(url) as queue:
            ids = [queue.push(StateJob(n)) for n in (1, 2)]
            await queue.flush()
            deliveries = await queue.backend.pop(
                ["default"], "cli-test", count=2, lease_s=30, timeout_s=2
            )
            for delivery in deliveries:
                await queue.backend.fail(
                    "cli-test", delivery, f"Traceback\nValueError: {delivery.id}"
                )
            return ids

    return asyncio.run(main())


def test_jobs_failed_lists_errors(redis_url: str) -> None:
    ids = fail_two_jobs(redis_url)

    result = run_cli("failed", "--url", redis_url)

    assert result.returncode == 0, result.stderr
    assert ids[0] in result.stdout
    assert ids[1] in result.stdout
    assert f"ValueError: {ids[0]}" in result.stdout
    assert "2 failed jobs shown" in result.stdout


def test_jobs_retry_one_then_all(redis_url: str) -> None:
    ids = fail_two_jobs(redis_url)

    one = run_cli("retry", "--url", redis_url, "--id", ids[0])
    counts_after_one = run_cli("counts", "--url", redis_url)
    rest = run_cli("retry", "--url", redis_url, "--all")
    counts_after_all = run_cli("counts", "--url", redis_url)

    assert one.stdout.strip() == "1 job requeued"
    assert "ready 1, delayed 0, active 0, failed 1" in counts_after_one.stdout
    assert rest.stdout.strip() == "1 job requeued"
    assert "ready 2, delayed 0, active 0, failed 0" in counts_after_all.stdout


def test_jobs_delete_all(redis_url: str) -> None:
    fail_two_jobs(redis_url)

    result = run_cli("delete", "--url", redis_url, "--all")
    counts = run_cli("counts", "--url", redis_url)

    assert result.stdout.strip() == "2 jobs deleted"
    assert "failed 0" in counts.stdout


def test_jobs_retry_needs_ids_or_all(redis_url: str) -> None:
    result = run_cli("retry", "--url", redis_url)

    assert result.returncode == 2
    assert "give --id JOB_ID (repeatable) or --all" in result.stderr


def test_jobs_delete_rejects_id_with_all(redis_url: str) -> None:
    fail_two_jobs(redis_url)

    result = run_cli("delete", "--url", redis_url, "--id", "x", "--all")
    counts = run_cli("counts", "--url", redis_url)

    assert result.returncode == 2
    assert "give either --id or --all, not both" in result.stderr
    assert "failed 2" in counts.stdout


def test_jobs_unreachable_backend_one_line(tmp_path: Path) -> None:
    # A directory that does not exist makes the SQLite backend fail to open.
    result = run_cli("counts", "--url", f"sqlite:///{tmp_path}/missing/jobs.db")

    assert result.returncode == 1
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr


def test_worker_bad_target_one_line() -> None:
    result = run_python("-m", "spark_bg", "nosuchmodule:app")

    assert result.returncode == 2
    assert "cannot import module 'nosuchmodule'" in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_bad_url_names_fix() -> None:
    result = run_python("-m", "spark_bg", "--url", "postgres://127.0.0.1/db")

    assert result.returncode == 2
    assert "unknown scheme 'postgres'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("attempt", [1, 2, 3, 8])
def test_backoff_within_jitter_band(attempt: int) -> None:
    ceiling = min(300.0, 0.01 * 2 ** (attempt - 1))

    delays = [backoff_delay(attempt, 0.01, 300.0) for _ in range(500)]

    assert min(delays) >= ceiling / 2
    assert max(delays) <= ceiling
    assert len(set(delays)) > 400


def test_backoff_capped() -> None:
    delays = [backoff_delay(30, 1.0, 60.0) for _ in range(100)]

    assert max(delays) <= 60.0
    assert min(delays) >= 30.0
