"""Aggregate the runs into medians, ranges and ratios, check the targets, and write the reports."""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict
from pathlib import Path

from harness import plan

ALL_MEASURES = ["raw", "enqueue", "batch", "drain", "latency", "memory", "middleware"]

HIGHER, LOWER = "higher", "lower"

# The metrics of each measurement and which direction is better.
METRICS: dict[str, list[tuple[str, str]]] = {
    "enqueue": [("rate", HIGHER)],
    "batch": [("rate", HIGHER)],
    "drain": [("rate", HIGHER)],
    "latency": [("p50_ms", LOWER), ("p99_ms", LOWER)],
    "memory": [("growth_mb", LOWER), ("rss_first_mb", LOWER), ("rss_second_mb", LOWER)],
    "middleware": [("rps", HIGHER)],
    "redis-benchmark": [("lpush", HIGHER), ("rpop", HIGHER)],
}

RAW_FIGURE_LABELS = {
    "lpush_one_async": "LPUSH one at a time, asyncio client",
    "lpush_one_sync": "LPUSH one at a time, sync client",
    "lpush_pipeline_100_async": "LPUSH in pipelines of 100, asyncio client",
    "lpush_values_100_async": "LPUSH of 100 values per command, asyncio client",
    "lpush_pipeline_all_async": "LPUSH, all jobs in one pipeline, asyncio client",
    "lpush_pipeline_all_sync": "LPUSH, all jobs in one pipeline, sync client",
    "rpop_one_async": "RPOP one at a time, asyncio client",
}


def sizes_dict(sizes: plan.Sizes) -> dict:
    return asdict(sizes)


def _stats(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _label(key: str) -> str:
    for spec in plan.SYSTEMS:
        if spec.key == key:
            return spec.label
    return plan.MIDDLEWARE_LABELS.get(key, key)


def _is_peer(key: str) -> bool:
    return any(spec.key == key and spec.peer for spec in plan.SYSTEMS)


def _values_by_repeat(runs: list[dict]) -> dict:
    """Return {measure: {system: {metric: {repeat: value}}}} for the successful runs."""
    table: dict = {}
    for run in runs:
        if not run.get("ok"):
            continue
        measure, system = run["measure"], run["system"]
        if measure == "raw":
            for name, value in run["figures"].items():
                table.setdefault("raw", {}).setdefault("raw", {}).setdefault(name, {})[
                    run["repeat"]
                ] = value
            continue
        # Middleware runs carry a round within their repeat, and each round is one sample.
        sample = run["repeat"] if "round" not in run else f"{run['repeat']}.{run['round']}"
        for metric, _ in METRICS.get(measure, []):
            if metric in run:
                table.setdefault(measure, {}).setdefault(system, {}).setdefault(metric, {})[
                    sample
                ] = run[metric]
    return table


def _ratio_stats(values: dict[int, float], reference: dict[int, float]) -> dict | None:
    """Return stats of value / reference over the repeats that have both."""
    ratios = [values[r] / reference[r] for r in values if reference.get(r)]
    return _stats(ratios) if ratios else None


def build_results(meta: dict, settings: dict, runs: list[dict]) -> dict:
    """Return the whole results document: metadata, raw runs, summary, ratios and targets."""
    by_repeat = _values_by_repeat(runs)
    summary: dict = {}
    best_peer: dict = {}
    for measure, systems in by_repeat.items():
        metric_list = METRICS.get(measure) or [
            (name, HIGHER) for name in next(iter(systems.values()))
        ]
        for metric, direction in metric_list:
            peers = {
                key: statistics.median(per_metric[metric].values())
                for key, per_metric in systems.items()
                if _is_peer(key) and metric in per_metric
            }
            if peers:
                choose = max if direction == HIGHER else min
                best_peer.setdefault(measure, {})[metric] = choose(peers, key=peers.get)
        for key, per_metric in systems.items():
            entry = summary.setdefault(measure, {}).setdefault(
                key, {"label": _label(key), "metrics": {}, "ratios": {}}
            )
            for metric, values in per_metric.items():
                entry["metrics"][metric] = {**_stats(list(values.values())), "by_repeat": values}
                ratios: dict = {}
                best = best_peer.get(measure, {}).get(metric)
                if best is not None:
                    ratios["best_peer"] = _ratio_stats(values, systems[best][metric])
                    ratios["best_peer_key"] = best
                if (
                    measure in ("enqueue", "batch", "drain", "latency")
                    and "raw" in systems
                    and metric in systems["raw"]
                ):
                    ratios["raw"] = _ratio_stats(values, systems["raw"][metric])
                if measure == "middleware" and "plain" in systems:
                    ratios["plain"] = _ratio_stats(values, systems["plain"]["rps"])
                entry["ratios"][metric] = ratios
    failures = [run for run in runs if not run.get("ok")]
    results = {
        "meta": meta,
        "settings": settings,
        "best_peer": best_peer,
        "summary": summary,
        "failures": failures,
        "runs": runs,
    }
    results["targets"] = evaluate_targets(results)
    return results


def _get(
    results: dict, measure: str, system: str, metric: str, ratio: str | None = None
) -> dict | None:
    entry = results["summary"].get(measure, {}).get(system)
    if entry is None or metric not in entry["metrics"]:
        return None
    if ratio is None:
        return entry["metrics"][metric]
    return entry["ratios"].get(metric, {}).get(ratio)


def evaluate_targets(results: dict) -> list[dict]:
    """Check spark_bg's targets against the medians; a target without data is 'not measured'."""
    checks = [
        (
            "drain, async no-op jobs",
            ">= 3.5x best peer",
            ("drain", "spark_bg", "rate", "best_peer"),
            3.5,
            HIGHER,
            "x",
        ),
        (
            "drain, sync no-op jobs",
            ">= 2x best peer",
            ("drain", "spark_bg-sync", "rate", "best_peer"),
            2.0,
            HIGHER,
            "x",
        ),
        (
            "enqueue one at a time",
            ">= 1x best peer",
            ("enqueue", "spark_bg", "rate", "best_peer"),
            1.0,
            HIGHER,
            "x",
        ),
        (
            "enqueue one at a time",
            ">= 0.8x raw redis-py LPUSH",
            ("enqueue", "spark_bg", "rate", "raw"),
            0.8,
            HIGHER,
            "x",
        ),
        (
            "batch of 100",
            ">= 4x best peer",
            ("batch", "spark_bg", "rate", "best_peer"),
            4.0,
            HIGHER,
            "x",
        ),
        (
            "pickup latency p50",
            "<= 1 ms",
            ("latency", "spark_bg", "p50_ms", None),
            1.0,
            LOWER,
            " ms",
        ),
        (
            "pickup latency p99",
            "<= 2 ms",
            ("latency", "spark_bg", "p99_ms", None),
            2.0,
            LOWER,
            " ms",
        ),
        (
            "middleware, no push",
            ">= 0.95x no-middleware requests/s",
            ("middleware", "middleware", "rps", "plain"),
            0.95,
            HIGHER,
            "x",
        ),
        (
            "middleware, one push per request",
            ">= 0.8x no-middleware requests/s",
            ("middleware", "middleware_push", "rps", "plain"),
            0.8,
            HIGHER,
            "x",
        ),
        (
            "worker memory growth",
            "< 5 MB from 1,000 to 100,000 jobs",
            ("memory", "spark_bg", "growth_mb", None),
            5.0,
            "below",
            " MB",
        ),
    ]
    targets = []
    for name, goal, where, threshold, direction, unit in checks:
        stats = _get(results, *where)
        if stats is None:
            targets.append({"name": name, "goal": goal, "measured": None, "status": "not measured"})
            continue
        value = stats["median"]
        if direction == HIGHER:
            passed = value >= threshold
        elif direction == LOWER:
            passed = value <= threshold
        else:
            passed = value < threshold
        measured = f"{value:.2f}{unit} ({stats['min']:.2f}-{stats['max']:.2f})"
        targets.append(
            {
                "name": name,
                "goal": goal,
                "value": value,
                "measured": measured,
                "status": "pass" if passed else "miss",
            }
        )
    if results["meta"]["sizes"]["memory_second"] != 100_000:
        for target in targets:
            if target["name"] == "worker memory growth" and target["measured"]:
                target["status"] += " (smaller job count than the target's)"
    return targets


# Formatting


def _num(value: float, digits: int | None = None) -> str:
    if digits is None:
        if abs(value) >= 100:
            digits = 0
        elif abs(value) >= 10:
            digits = 1
        else:
            digits = 2
    return f"{value:,.{digits}f}"


def _cell(stats: dict | None, digits: int | None = None) -> str:
    if stats is None:
        return "-"
    if stats["n"] == 1:
        return _num(stats["median"], digits)
    low, high = _num(stats["min"], digits), _num(stats["max"], digits)
    return f"{_num(stats['median'], digits)} ({low}-{high})"


def _ratio(stats: dict | None) -> str:
    if stats is None:
        return "-"
    if stats["n"] == 1:
        return f"{stats['median']:.2f}x"
    return f"{stats['median']:.2f}x ({stats['min']:.2f}-{stats['max']:.2f})"


def _failure_note(results: dict, measure: str, system: str) -> str | None:
    for run in results["failures"]:
        if run["measure"] == measure and run["system"] == system:
            return ("skipped: " if run.get("skipped") else "failed: ") + run.get("error", "?")
    return None


def _row_cells(
    results: dict, measure: str, system: str, metric: str, digits: int | None = None
) -> list[str]:
    stats = _get(results, measure, system, metric)
    if stats is None:
        note = _failure_note(results, measure, system)
        return [note[:80] if note else "-", "-", "-"]
    return [
        _cell(stats, digits),
        _ratio(_get(results, measure, system, metric, "best_peer")),
        _ratio(_get(results, measure, system, metric, "raw")),
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return lines


def _best_label(results: dict, measure: str, metric: str) -> str:
    key = results["best_peer"].get(measure, {}).get(metric)
    return _label(key) if key else "none measured"


def render_tables(results: dict) -> list[str]:
    """Return the Markdown tables of all measurements."""
    lines: list[str] = []
    batch_api: dict[str, str] = {}
    jobs_by_system: dict[tuple[str, str], set] = {}
    for run in results["runs"]:
        if run.get("ok") and run["measure"] == "batch":
            batch_api[run["system"]] = run.get("batch_api", "")
        if run.get("ok") and "jobs" in run:
            jobs_by_system.setdefault((run["measure"], run["system"]), set()).add(run["jobs"])

    def jobs(measure: str, key: str) -> str:
        counts = sorted(jobs_by_system.get((measure, key), ()))
        return "/".join(f"{c:,}" for c in counts) or "-"

    lines += [
        "### Enqueue and batch (producer)",
        "",
        f"Best peer: enqueue {_best_label(results, 'enqueue', 'rate')}, "
        f"batch {_best_label(results, 'batch', 'rate')}. Jobs per second, median (min-max); "
        "ratios are per repeat against the same repeat's figure, higher is better.",
        "",
    ]
    rows = []
    for spec in plan.SYSTEMS:
        if not {"enqueue", "batch"} & set(spec.measures):
            continue
        label = (
            "spark_bg" if spec.key == "spark_bg" else plan.PRODUCER_LABELS.get(spec.key, spec.label)
        )
        if "batch" not in spec.measures:
            batch_cells = [plan.NO_BATCH_PATH.get(spec.key, "-"), "-", "-", "-"]
        else:
            batch_cells = [
                *_row_cells(results, "batch", spec.key, "rate"),
                batch_api.get(spec.key, ""),
            ]
        rows.append([label, *_row_cells(results, "enqueue", spec.key, "rate"), *batch_cells])
    lines += _table(
        [
            "system",
            "enqueue jobs/s",
            "x best peer",
            "x raw LPUSH",
            "batch of 100 jobs/s",
            "x best peer",
            "x raw pipeline",
            "batch path",
        ],
        rows,
    )

    lines += [
        "",
        "### Drain (one worker, queue filled beforehand)",
        "",
        f"Best peer: {_best_label(results, 'drain', 'rate')}. "
        "Jobs per second from the first job's end to the last job's end; "
        "`x raw` compares with one asyncio BRPOP loop (one round trip per job).",
        "",
    ]
    rows = [
        [spec.label, jobs("drain", spec.key), *_row_cells(results, "drain", spec.key, "rate")]
        for spec in plan.SYSTEMS
        if "drain" in spec.measures
    ]
    lines += _table(["worker", "jobs", "jobs/s", "x best peer", "x raw BRPOP loop"], rows)

    lines += [
        "",
        "### Pickup latency (idle worker, one job at a time)",
        "",
        f"Best peer: p50 {_best_label(results, 'latency', 'p50_ms')}, "
        f"p99 {_best_label(results, 'latency', 'p99_ms')}. "
        "Milliseconds from just before the push call to the start of `run()`; ratios are "
        "value / reference, so lower is better.",
        "",
    ]
    rows = []
    for spec in plan.SYSTEMS:
        if "latency" not in spec.measures:
            continue
        p50 = _row_cells(results, "latency", spec.key, "p50_ms", 2)
        p99 = _row_cells(results, "latency", spec.key, "p99_ms", 2)
        rows.append(
            [spec.label, jobs("latency", spec.key), p50[0], p50[1], p50[2], p99[0], p99[1], p99[2]]
        )
    lines += _table(
        [
            "worker",
            "jobs",
            "p50 ms",
            "p50 / best peer",
            "p50 / raw",
            "p99 ms",
            "p99 / best peer",
            "p99 / raw",
        ],
        rows,
    )

    if results["meta"]["sizes"].get("peer_memory_second", 1):
        peers_note = "Peers are measured in the first repeat only."
    else:
        peers_note = "This mode skips the peers' memory measurement."
    lines += [
        "",
        "### Worker memory",
        "",
        "Resident memory (VmRSS summed over the worker process and its children) after the "
        f"first and the second job count. {peers_note}",
        "",
    ]
    rows = []
    for spec in plan.SYSTEMS:
        if "memory" not in spec.measures:
            continue
        first = _get(results, "memory", spec.key, "rss_first_mb")
        second = _get(results, "memory", spec.key, "rss_second_mb")
        growth = _get(results, "memory", spec.key, "growth_mb")
        counts = [
            (run["jobs_first"], run["jobs_second"])
            for run in results["runs"]
            if run.get("ok") and run["measure"] == "memory" and run["system"] == spec.key
        ]
        if growth is None:
            note = _failure_note(results, "memory", spec.key) or "not measured"
            rows.append([spec.label, "-", note[:80], "-", "-"])
            continue
        steps = f"{counts[0][0]:,} -> {counts[0][1]:,}"
        rows.append([spec.label, steps, _cell(first, 1), _cell(second, 1), _cell(growth, 1)])
    lines += _table(["worker", "jobs", "RSS first MB", "RSS second MB", "growth MB"], rows)

    lines += ["", "### Middleware cost (uvicorn, one process, wrk on loopback)", ""]
    plain = _get(results, "middleware", "plain", "rps")
    if plain is not None:
        rounds = results["meta"]["sizes"].get("middleware_rounds", 1)
        lines += [
            f"Requests per second, median (min-max) of {plain['n']} samples "
            f"({rounds} rounds per repeat); each ratio pairs a variant with the "
            "no-middleware app of the same round.",
            "",
        ]
    rows = []
    for variant in plan.MIDDLEWARE_VARIANTS:
        stats = _get(results, "middleware", variant, "rps")
        extra = ""
        pushes = [
            run
            for run in results["runs"]
            if run.get("ok") and run["system"] == variant and run["measure"] == "middleware"
        ]
        if variant == "middleware_push" and pushes:
            lost = sum(run.get("jobs_lost", 0) for run in pushes)
            warnings = sum(run.get("flush_warnings", 0) for run in pushes)
            extra = f"{lost} jobs lost, {warnings} flush retries logged"
        if stats is None:
            note = _failure_note(results, "middleware", variant) or "-"
            rows.append([plan.MIDDLEWARE_LABELS[variant], note[:80], "-", ""])
            continue
        rows.append(
            [
                plan.MIDDLEWARE_LABELS[variant],
                _cell(stats),
                _ratio(_get(results, "middleware", variant, "rps", "plain")),
                extra,
            ]
        )
    lines += _table(["app", "requests/s", "x no middleware", "notes"], rows)

    lines += ["", "### Ceiling: raw redis-py and redis-benchmark on the same server", ""]
    rows = []
    raw = results["summary"].get("raw", {}).get("raw", {}).get("metrics", {})
    for name, label in RAW_FIGURE_LABELS.items():
        if name in raw:
            rows.append([f"redis-py: {label}", _cell(raw[name])])
    for name, entry in results["summary"].get("redis-benchmark", {}).items():
        for metric in ("lpush", "rpop"):
            if metric in entry["metrics"]:
                rows.append(
                    [f"redis-benchmark {metric.upper()}, {name}", _cell(entry["metrics"][metric])]
                )
    lines += _table(["figure", "operations/s"], rows)
    return lines


METHOD = """\
## How each figure is measured

Every measurement runs in its own subprocess inside the system's virtual environment
(`python -m adapters.case`, see `bench/adapters/case.py`), against a redis-server that the run
starts on a free loopback port with `--save "" --appendonly no`. The run empties Redis
(FLUSHALL) before each case. Within each repeat, every system runs once per measurement before
the next measurement starts, and the order of systems rotates from repeat to repeat. Each ratio
is computed per repeat against the reference's figure from the same repeat. The tables give
the median of those ratios with the min-max range. Absolute rates on this shared 2-core virtual
machine swing from run to run, so the ratios are the figures to compare.

- **enqueue**: one producer pushes {jobs:,} no-op jobs one call at a time, after a warm-up of
  200 pushes. Each call returns once the system reports the job stored. spark_bg's call is
  `queue.push(job)` followed by `await queue.flush()`, so every job is its own round trip.
- **batch**: the same jobs pushed 100 at a time through each system's batch path (table
  column "batch path"). Where the batch API sends one message per job, the table notes it.
- **drain**: {jobs:,} no-op jobs are queued first (through the batch path where there is one),
  then one worker process starts with its default concurrency. The rate is (jobs - 1) divided
  by the time between the first and the last job's end. Each job appends its end time (8 bytes)
  to a file in /dev/shm opened with O_APPEND. That is one write() call per job, the same for
  all systems, and worker start-up falls outside the measured span. Workers with a burst mode
  use it, and the others are stopped with SIGTERM once all jobs are recorded.
- **pickup latency**: an idle worker. The producer waits a random {gap_min:g}-{gap_max:g} s, records
  `time.time()`, pushes one job carrying that time, and blocks on a FIFO until the job's `run()`
  writes its own `time.time()` as its first statement. After a first job that waits for the
  worker to start and 5 warm-up jobs, {latency_jobs} jobs are measured. p50 and p99 are
  nearest-rank percentiles.
- **worker memory**: one worker runs {memory_first:,} jobs, then more up to {memory_second:,}.
  After each step the run waits 1 s and sums VmRSS from /proc over the worker and its child
  processes.
- **middleware cost**: `uvicorn adapters.spark_app:app` (one process, `--no-access-log`,
  `--log-level warning`) serves `GET /` with a plain-text response. `wrk -t1 -c{connections}`
  runs 1 s of warm-up, then {wrk_seconds:g} s of load. The variants are: no middleware;
  QueueMiddleware without a push; QueueMiddleware with one
  `request.app.state.queue.push(NoopJob())` per request; no middleware with one no-op async
  Starlette BackgroundTask per response. Each repeat runs the four variants back to back in
  {middleware_rounds} rounds, and each round gives one sample. Its ratios divide by the
  no-middleware figure of the same round, because wrk's figures on a shared machine drift by
  several percent from minute to minute. After the push variant the run compares the jobs
  stored in Redis with the requests served.
- **ceiling**: raw redis-py in the project's environment (asyncio client unless noted, 64-byte
  payload) and `redis-benchmark -t lpush,rpop -n {redis_benchmark_requests:,}` with 1 client,
  50 clients, and 1 client with `-P 100`.

Configurations known to be very slow run fewer jobs or wait longer between pushes:

{slow}
"""

SETTINGS_NOTES = """\
## Settings

Each system runs with its usual settings for no-op jobs. Only logging is turned down to
WARNING (or the system's quiet flag) where the worker would otherwise log a line per job,
for spark_bg as for the peers. The settings that each adapter reports:
"""

CAVEATS = """\
## Caveats

- One shared 2-core virtual machine runs the producer or worker, Redis and the harness at the
  same time. A round trip is much cheaper while another process keeps a CPU busy, because
  waking an idle CPU dominates an idle round trip. Absolute rates therefore move between runs,
  so compare ratios within one run.
- "Best peer" is the peer with the best median for that figure; its configuration may differ
  from measurement to measurement (for example the fastest enqueue and the fastest drain come
  from different systems).
- Peers push with their own client libraries and redis-py versions (see "Versions"); redis-py
  8.x pipelines cost more per command than 5.x.
- Celery's, Dramatiq's and huey's batch APIs send one message per job. They are listed so that
  the batch figure has a peer reference, not because they pipeline.
- The drain figure starts at the first job's end, so it leaves out worker start-up and the
  first fetch. A system that prefetches many jobs gains nothing from that here.
"""


def _render_header(meta: dict, plot_path: Path | None, docs_path: Path | None) -> list[str]:
    machine = meta["machine"]
    lines = [
        "# Benchmarks",
        "",
        "spark_bg against RQ, arq, SAQ, Dramatiq, Celery, huey and taskiq on one machine, with raw "
        "redis-py and redis-benchmark on the same Redis as the ceiling. `python bench/run.py` "
        "generates this page; rerun it to refresh the figures.",
        "",
        f"- Date: {meta['date']}; "
        f"run time {meta['duration_s'] // 60} min {meta['duration_s'] % 60} s.",
        f"- Command: `{meta['command'].strip()}` ({meta['mode']} mode, {meta['repeat']} repeats).",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']}, "
        f"redis-server {meta['redis_server']}.",
        "- Flags: `--quick` (1 repeat, small job counts, writes bench/results/quick/ only), "
        "`--repeat N` (default 3), `--only KEYS`, `--measures NAMES`, `--skip-setup`, "
        "`--connections N`, `--render-only` (rebuild this page and the plot from results.json), "
        "`--docs PATH`. `python bench/run.py --help` describes them.",
        "",
    ]
    if plot_path is not None:
        target = os.path.relpath(plot_path, docs_path.parent) if docs_path else str(plot_path)
        lines += [f"![Ratios to the best peer]({target})", ""]
    return lines


def _render_method(meta: dict) -> list[str]:
    sizes = meta["sizes"]
    measure_names = {"drain": "drain", "latency": "pickup latency"}
    items = [
        f"- {measure_names.get(measure, measure)} of {_label(key)}: {count:,} jobs"
        for measure, counts in sizes["slow_jobs"].items()
        for key, count in counts.items()
    ]
    items += [
        f"- pickup latency of {_label(key)}: a random {low:g}-{high:g} s wait before each push, "
        "one poll period, so that pushes fall at random points of the poll cycle"
        for key, (low, high) in sizes["gaps"].items()
    ]
    slow = "\n".join(items)
    text = METHOD.format(
        jobs=sizes["jobs"],
        gap_min=plan.DEFAULT_GAP[0],
        gap_max=plan.DEFAULT_GAP[1],
        latency_jobs=sizes["latency_jobs"],
        memory_first=sizes["memory_first"],
        memory_second=sizes["memory_second"],
        connections=meta["wrk_connections"],
        wrk_seconds=sizes["wrk_seconds"],
        middleware_rounds=sizes.get("middleware_rounds", 1),
        redis_benchmark_requests=sizes["redis_benchmark_requests"],
        slow=slow,
    )
    return [text.rstrip(), ""]


def _render_settings_and_versions(results: dict) -> list[str]:
    meta = results["meta"]
    lines = [SETTINGS_NOTES]
    rows = [
        [_label(key), "; ".join(f"{name}: {value}" for name, value in settings.items())]
        for key, settings in sorted(results["settings"].items(), key=lambda item: _label(item[0]))
    ]
    lines += _table(["system", "settings"], rows)
    lines += ["", "## Versions", ""]
    rows = [
        [env, ", ".join(f"{name} {version}" for name, version in versions.items())]
        for env, versions in meta["versions"].items()
    ]
    lines += _table(["environment", "packages"], rows)
    if meta["env_errors"]:
        lines += [
            "",
            "Environments that could not be prepared: "
            + "; ".join(f"{env}: {error}" for env, error in meta["env_errors"].items()),
        ]
    return lines


def source_versions(results: dict) -> list[str]:
    """Return one line per spark_bg source version measured, when the run saw more than one."""
    versions: dict[str, set[int]] = {}
    for run in results["runs"]:
        if "spark_source" in run:
            versions.setdefault(run["spark_source"], set()).add(run["repeat"] + 1)
    if len(versions) < 2:
        return []
    return [
        f"source digest {digest}: repeats {', '.join(map(str, sorted(repeats)))}"
        for digest, repeats in versions.items()
    ]


# Hand-written reading of the targets (why a miss is a miss), kept beside the generator and
# copied into the report under the targets table.
ANALYSIS_PATH = Path(__file__).resolve().parent.parent / "analysis.md"


def render_markdown(results: dict, plot_path: Path | None, docs_path: Path | None) -> str:
    """Return the Markdown report; ``docs_path`` makes the plot link relative to it."""
    lines = _render_header(results["meta"], plot_path, docs_path)
    changed = source_versions(results)
    if changed:
        lines += [
            "**spark_bg's source changed during this run**, so its figures mix code versions "
            f"({'; '.join(changed)}). Rerun for figures of one version.",
            "",
        ]
    lines += ["## Targets", "", "spark_bg's targets, checked against the medians of this run.", ""]
    lines += _table(
        ["figure", "target", "measured median (min-max)", "result"],
        [[t["name"], t["goal"], t["measured"] or "-", t["status"]] for t in results["targets"]],
    )

    analysis = ANALYSIS_PATH.read_text(encoding="utf-8").strip() if ANALYSIS_PATH.exists() else ""
    if analysis:
        lines += ["", analysis]

    lines += ["", "## Results", ""]
    lines += render_tables(results)
    lines += ["", "## Failed, skipped and warned cases", ""]
    lines += render_problems(results) or ["None."]

    lines += ["", *_render_method(results["meta"])]
    lines += _render_settings_and_versions(results)
    lines += ["", CAVEATS]
    return "\n".join(lines).rstrip() + "\n"


def render_problems(results: dict) -> list[str]:
    """Return one Markdown list item per failed or skipped case and per warning."""
    lines = []
    for run in results["runs"]:
        where = f"repeat {run['repeat'] + 1}, {run['measure']}, {_label(run['system'])}"
        if not run.get("ok"):
            kind = "skipped" if run.get("skipped") else "failed"
            lines.append(f"- {where}: {kind}: {run.get('error', '?')}")
        for warning in run.get("warnings", []):
            lines.append(f"- {where}: warning: {warning} (the figure is kept)")
    return lines


def render_console(results: dict) -> str:
    lines = ["", "Targets:"]
    for target in results["targets"]:
        lines.append(
            f"  {target['status']:<14} {target['name']}: {target['goal']}; "
            f"measured {target['measured'] or '-'}"
        )
    lines.append("")
    lines += render_tables(results)
    changed = source_versions(results)
    if changed:
        lines += ["", "spark_bg's source changed during this run: " + "; ".join(changed)]
    problems = render_problems(results)
    if problems:
        lines += ["", "Failed, skipped and warned cases:", *problems]
    return "\n".join(lines)
