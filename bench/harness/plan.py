"""Systems, report rows and job counts of each run mode, for run.py."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SystemSpec:
    """One row of the report: a system, or one worker configuration of it."""

    key: str
    label: str
    env: str
    module: str
    variant: str = ""
    measures: tuple[str, ...] = ()
    peer: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    needs_spark: bool = False


SYSTEMS: list[SystemSpec] = [
    SystemSpec(
        "spark_bg",
        "spark_bg (async jobs)",
        "project",
        "adapters.spark_bench",
        "async",
        ("enqueue", "batch", "drain", "latency", "memory"),
        peer=False,
        needs_spark=True,
    ),
    SystemSpec(
        "spark_bg-sync",
        "spark_bg (sync jobs)",
        "project",
        "adapters.spark_bench",
        "sync",
        ("drain",),
        peer=False,
        needs_spark=True,
    ),
    SystemSpec(
        "raw",
        "raw redis-py",
        "project",
        "adapters.raw_redis",
        "",
        ("enqueue", "batch", "drain", "latency"),
        peer=False,
    ),
    SystemSpec(
        "rq-simple",
        "RQ SimpleWorker",
        "rq",
        "adapters.rq_bench",
        "simple",
        ("enqueue", "batch", "drain", "latency"),
    ),
    SystemSpec(
        "rq-fork",
        "RQ Worker (forks per job)",
        "rq",
        "adapters.rq_bench",
        "fork",
        ("drain", "latency"),
    ),
    SystemSpec(
        "arq",
        "arq (poll 0.5 s, default)",
        "arq",
        "adapters.arq_bench",
        "default",
        ("enqueue", "drain", "latency"),
    ),
    SystemSpec(
        "arq-poll10ms",
        "arq (poll 10 ms)",
        "arq",
        "adapters.arq_bench",
        "poll10ms",
        ("drain", "latency"),
    ),
    SystemSpec("saq", "SAQ", "saq", "adapters.saq_bench", "", ("enqueue", "drain", "latency")),
    SystemSpec(
        "dramatiq",
        "Dramatiq",
        "dramatiq",
        "adapters.dramatiq_bench",
        "",
        ("enqueue", "batch", "drain", "latency", "memory"),
    ),
    SystemSpec(
        "celery-prefork",
        "Celery prefork",
        "celery",
        "adapters.celery_bench",
        "prefork",
        ("enqueue", "batch", "drain", "latency"),
    ),
    SystemSpec(
        "celery-threads",
        "Celery threads",
        "celery",
        "adapters.celery_bench",
        "threads",
        ("drain", "latency"),
    ),
    SystemSpec(
        "huey",
        "huey",
        "huey",
        "adapters.huey_bench",
        "",
        ("enqueue", "batch", "drain", "latency", "memory"),
    ),
    SystemSpec(
        "taskiq-list",
        "taskiq ListQueueBroker",
        "taskiq",
        "adapters.taskiq_bench",
        "list",
        ("enqueue", "drain", "latency", "memory"),
        extra_env={"BENCH_TASKIQ_BROKER": "list"},
    ),
    SystemSpec(
        "taskiq-stream",
        "taskiq RedisStreamBroker",
        "taskiq",
        "adapters.taskiq_bench",
        "stream",
        ("enqueue", "drain", "latency"),
        extra_env={"BENCH_TASKIQ_BROKER": "stream"},
    ),
]

# Producer rows stand for the whole system: RQ, arq and Celery push the same way whatever the
# worker configuration.
PRODUCER_LABELS = {
    "rq-simple": "RQ",
    "arq": "arq",
    "celery-prefork": "Celery",
    "taskiq-list": "taskiq ListQueueBroker",
    "taskiq-stream": "taskiq RedisStreamBroker",
}

# Peers without a batch path, with the note that the report shows in place of a figure.
NO_BATCH_PATH = {
    "arq": "arq has no batch enqueue API",
    "saq": "SAQ has no batch enqueue API (Queue.batch() only cancels a group of jobs on error)",
    "taskiq-list": "taskiq has no batch kick API",
    "taskiq-stream": "taskiq has no batch kick API",
}

MIDDLEWARE_VARIANTS = ("plain", "middleware", "middleware_push", "background")
MIDDLEWARE_NEEDS_SPARK = {"middleware", "middleware_push"}
MIDDLEWARE_LABELS = {
    "plain": "no middleware",
    "middleware": "QueueMiddleware, no push",
    "middleware_push": "QueueMiddleware, one push per request",
    "background": "no middleware, one no-op Starlette BackgroundTask",
}


@dataclass(frozen=True)
class Sizes:
    """Job counts, durations and repeats of one run mode."""

    repeat: int
    jobs: int
    latency_jobs: int
    memory_first: int
    memory_second: int
    peer_memory_second: int
    wrk_seconds: float
    # Rounds of the middleware variants within each repeat. Each round is one paired sample.
    middleware_rounds: int
    redis_benchmark_requests: int
    # Smaller counts for configurations known to be very slow, per measure.
    slow_jobs: dict[str, dict[str, int]]
    # Idle gap (min, max seconds) before each pickup-latency push.
    gaps: dict[str, tuple[float, float]]


DEFAULT_GAP = (0.01, 0.05)

FULL = Sizes(
    repeat=3,
    jobs=10_000,
    latency_jobs=200,
    memory_first=1_000,
    memory_second=100_000,
    peer_memory_second=100_000,
    wrk_seconds=5.0,
    middleware_rounds=5,
    redis_benchmark_requests=50_000,
    slow_jobs={
        "drain": {"rq-simple": 2_000, "rq-fork": 500, "arq": 2_000},
        "latency": {"arq": 100},
    },
    # arq's default worker polls every 0.5 s, so the gap spans one poll period to push at a
    # random phase of the poll cycle.
    gaps={"arq": (0.01, 0.51)},
)

QUICK = Sizes(
    repeat=1,
    jobs=1_000,
    latency_jobs=30,
    memory_first=500,
    memory_second=5_000,
    peer_memory_second=0,
    wrk_seconds=2.0,
    middleware_rounds=1,
    redis_benchmark_requests=10_000,
    slow_jobs={
        "drain": {"rq-simple": 300, "rq-fork": 100, "arq": 300},
        "latency": {"arq": 10},
    },
    gaps={"arq": (0.01, 0.51)},
)


def job_count(sizes: Sizes, measure: str, key: str) -> int:
    """Return the number of jobs for ``measure`` of system ``key``."""
    default = sizes.latency_jobs if measure == "latency" else sizes.jobs
    return sizes.slow_jobs.get(measure, {}).get(key, default)


def systems_for(measure: str, selected: set[str] | None) -> list[SystemSpec]:
    """Return the systems that take part in ``measure``, limited to ``selected`` keys if given."""
    return [s for s in SYSTEMS if measure in s.measures and (selected is None or s.key in selected)]
