"""Benchmark spark_bg against the Python job queues that use Redis, on one machine.

Usage: python bench/run.py [--quick] [--repeat N] [--only KEYS] [--measures NAMES]

The run starts its own redis-server on a free loopback port and creates the peers' virtual
environments under bench/.venvs/ when they are missing. Every measurement runs in a subprocess
inside the system's environment, and systems interleave within each repeat. The results go to
bench/results/results.json, bench/results/benchmarks.png and docs/benchmarks.md, which also
describes each measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import envs, plan, procs, report
from harness.redis_server import RedisServer, run_redis_benchmark

CASE_TIMEOUTS = {
    "enqueue": 300,
    "batch": 300,
    "drain": 600,
    "latency": 600,
    "memory": 900,
    "middleware": 180,
    "raw": 180,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Runner:
    """Runs the cases of one benchmark run and collects their results."""

    def __init__(self, args: argparse.Namespace, sizes: plan.Sizes, out_dir: Path) -> None:
        self.args = args
        self.sizes = sizes
        self.out_dir = out_dir
        self.logs_dir = out_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.runs: list[dict] = []
        self.settings: dict[str, dict] = {}
        self.env_errors: dict[str, str] = {}
        self.spark_error: str | None = None
        self.server: RedisServer | None = None
        self.scratch_root = "/dev/shm" if os.path.isdir("/dev/shm") else None

    # Setup

    def prepare_envs(self, needed: set[str]) -> None:
        for env in sorted(needed):
            if self.args.skip_setup and env != envs.PROJECT_ENV:
                if not envs.python_path(env).exists():
                    self.env_errors[env] = (
                        f"environment {env} is missing and --skip-setup was given"
                    )
                continue
            try:
                envs.ensure_env(env, log)
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                self.env_errors[env] = str(exc)
                log(f"environment {env} failed: {exc}")
        if envs.PROJECT_ENV in needed and envs.PROJECT_ENV not in self.env_errors:
            self.spark_error = check_spark_bg()
            if self.spark_error:
                log(f"spark_bg cases will be skipped: {self.spark_error}")

    # Cases

    def run_case(
        self,
        spec: plan.SystemSpec,
        measure: str,
        repeat: int,
        jobs: int,
        extra: list[str],
        round_index: int | None = None,
    ) -> dict:
        entry: dict = {"repeat": repeat, "measure": measure, "system": spec.key}
        tag = f"r{repeat + 1}"
        if round_index is not None:
            entry["round"] = round_index
            tag += f".{round_index + 1}"
        error = self.env_errors.get(spec.env)
        if error is None and spec.needs_spark and self.spark_error:
            entry.update(ok=False, skipped=True, error=self.spark_error)
            self.runs.append(entry)
            return entry
        if error is not None:
            entry.update(ok=False, error=f"environment {spec.env} unavailable: {error}")
            self.runs.append(entry)
            log(f"{tag} {measure:<10} {spec.key:<15} FAILED: {entry['error'][:200]}")
            return entry

        assert self.server is not None
        self.server.flushall()
        timeout = CASE_TIMEOUTS[measure]
        workdir = tempfile.mkdtemp(prefix="spark-bench-", dir=self.scratch_root)
        log_path = self.logs_dir / f"{tag}-{measure}-{spec.key}.log"
        argv = [
            str(envs.python_path(spec.env)),
            "-m",
            "adapters.case",
            "--module",
            spec.module,
            "--variant",
            spec.variant,
            "--measure",
            measure,
            "--jobs",
            str(jobs),
            "--workdir",
            workdir,
            "--log",
            str(log_path),
            "--wait-timeout",
            str(timeout - 60),
            *extra,
        ]
        started = time.monotonic()
        source_before = spark_source_digest() if spec.env == envs.PROJECT_ENV else None
        with open(log_path, "ab") as stderr:
            process = subprocess.Popen(
                argv,
                env=envs.env_vars(spec.env, self.server.url, spec.extra_env),
                cwd=envs.BENCH_DIR,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
            try:
                stdout, _ = process.communicate(timeout=timeout)
                result = parse_case_output(stdout.decode(errors="replace"), process.returncode)
            except subprocess.TimeoutExpired:
                procs.stop_tree(process)
                result = {"ok": False, "error": f"timed out after {timeout} s"}
        shutil.rmtree(workdir, ignore_errors=True)
        entry.update(result)
        entry["wall_s"] = round(time.monotonic() - started, 2)
        if source_before is not None:
            entry["spark_source"] = source_before
            if spark_source_digest() != source_before:
                entry.setdefault("warnings", []).append(
                    "spark_bg's source files changed during this case"
                )
        if result.get("ok") and "settings" in result:
            self.settings[spec.key] = result.pop("settings")
            entry.pop("settings", None)
        self.runs.append(entry)
        log(f"{tag} {measure:<10} {spec.key:<15} {describe(entry)} ({entry['wall_s']:.0f} s)")
        for warning in entry.get("warnings", []):
            log(f"{tag} {measure:<10} {spec.key:<15} warning: {warning}")
        return entry

    def run_reference(self, repeat: int) -> None:
        """Run the raw redis-py figures and redis-benchmark against the same server."""
        raw = next(s for s in plan.SYSTEMS if s.key == "raw")
        self.run_case(raw, "raw", repeat, self.sizes.jobs, [])
        assert self.server is not None
        shapes = {
            "1 client, no pipeline": (1, 1),
            "50 clients, no pipeline": (50, 1),
            "1 client, pipeline 100": (1, 100),
        }
        for name, (clients, pipeline) in shapes.items():
            self.server.flushall()
            entry = {"repeat": repeat, "measure": "redis-benchmark", "system": name}
            try:
                rates = run_redis_benchmark(
                    self.server.port, self.sizes.redis_benchmark_requests, clients, pipeline
                )
                entry.update(ok=True, lpush=rates["lpush"], rpop=rates["rpop"])
            except (RuntimeError, subprocess.SubprocessError) as exc:
                entry.update(ok=False, error=str(exc))
            self.runs.append(entry)
            log(f"r{repeat + 1} redis-benchmark {name}: {describe(entry)}")

    def run_repeat(self, repeat: int, measures: list[str], selected: set[str] | None) -> None:
        sizes = self.sizes
        if "raw" in measures:
            self.run_reference(repeat)
        for measure in ("enqueue", "batch", "drain", "latency", "memory"):
            if measure not in measures:
                continue
            specs = plan.systems_for(measure, selected)
            if measure == "memory" and repeat > 0:
                # Peers are measured in the first repeat only: 100,000 jobs take minutes each.
                specs = [s for s in specs if not s.peer]
            if measure == "memory" and sizes.peer_memory_second == 0:
                specs = [s for s in specs if not s.peer]
            # Rotate the order each repeat so that no system always runs first or last.
            shift = repeat % len(specs) if specs else 0
            for spec in specs[shift:] + specs[:shift]:
                jobs = plan.job_count(sizes, measure, spec.key)
                extra: list[str] = []
                if measure == "latency":
                    gap_min, gap_max = sizes.gaps.get(spec.key, plan.DEFAULT_GAP)
                    extra = ["--gap-min", str(gap_min), "--gap-max", str(gap_max)]
                if measure == "memory":
                    second = sizes.memory_second if not spec.peer else sizes.peer_memory_second
                    extra = ["--jobs2", str(second)]
                    jobs = sizes.memory_first
                if measure == "batch" and spec.key in plan.NO_BATCH_PATH:
                    continue
                self.run_case(spec, measure, repeat, jobs, extra)
        if "middleware" in measures and (selected is None or "spark_bg" in selected):
            variants = list(plan.MIDDLEWARE_VARIANTS)
            extra = [
                "--duration",
                str(sizes.wrk_seconds),
                "--connections",
                str(self.args.connections),
            ]
            # Each round runs every variant back to back, and its ratios pair each variant
            # with the no-middleware app of the same round. wrk's figures on a shared machine
            # drift by several percent, so several rounds per repeat narrow the median.
            for round_index in range(sizes.middleware_rounds):
                shift = (repeat * sizes.middleware_rounds + round_index) % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    spec = plan.SystemSpec(
                        variant,
                        plan.MIDDLEWARE_LABELS[variant],
                        envs.PROJECT_ENV,
                        "adapters.spark_app",
                        variant,
                        peer=False,
                        needs_spark=variant in plan.MIDDLEWARE_NEEDS_SPARK,
                    )
                    self.run_case(spec, "middleware", repeat, 0, extra, round_index)


def spark_source_digest() -> str:
    """Return a short SHA-256 of spark_bg's source files, to spot edits during a run."""
    digest = hashlib.sha256()
    for path in sorted((envs.REPO_DIR / "spark_bg").rglob("*.py")):
        digest.update(str(path.relative_to(envs.REPO_DIR)).encode())
        try:
            digest.update(path.read_bytes())
        except FileNotFoundError:
            continue
    return digest.hexdigest()[:12]


def check_spark_bg() -> str | None:
    """Return why spark_bg cannot be measured, or None when its worker and API are importable."""
    script = (
        "import spark_bg, spark_bg.worker\n"
        "for name in ('Job', 'Queue', 'QueueMiddleware'):\n"
        "    getattr(spark_bg, name)\n"
    )
    completed = subprocess.run(
        [str(envs.python_path(envs.PROJECT_ENV)), "-c", script],
        env=envs.env_vars(envs.PROJECT_ENV, "redis://127.0.0.1:1/0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if completed.returncode != 0:
        return "spark_bg is not importable: " + (completed.stderr.strip().splitlines() or ["?"])[-1]
    return None


def parse_case_output(stdout: str, returncode: int) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {"ok": False, "error": f"case exited with code {returncode} and printed no result"}


def describe(entry: dict) -> str:
    if entry.get("skipped"):
        return f"skipped: {entry['error']}"
    if not entry.get("ok"):
        return f"FAILED: {entry.get('error', '?')[:300]}"
    if "rate" in entry:
        return f"{entry['rate']:,.0f} jobs/s"
    if "p50_ms" in entry:
        return f"p50 {entry['p50_ms']:.2f} ms, p99 {entry['p99_ms']:.2f} ms"
    if "growth_mb" in entry:
        return f"RSS {entry['rss_first_mb']:.1f} -> {entry['rss_second_mb']:.1f} MB"
    if "rps" in entry:
        return f"{entry['rps']:,.0f} requests/s"
    if "lpush" in entry:
        return f"LPUSH {entry['lpush']:,.0f}/s, RPOP {entry['rpop']:,.0f}/s"
    if "figures" in entry:
        return ", ".join(f"{k} {v:,.0f}/s" for k, v in entry["figures"].items())
    return "ok"


def ensure_wrk() -> str | None:
    """Install Debian's wrk when it is missing; return an error message if that fails."""
    if shutil.which("wrk"):
        return None
    if os.geteuid() != 0:
        return "wrk is not installed and installing it needs root: run 'apt-get install wrk'"
    log("installing wrk with apt-get")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        completed = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
        if completed.returncode != 0:
            return f"{' '.join(argv)} failed: {completed.stderr.strip()[-500:]}"
    return None


def machine_info() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark spark_bg against peer job queues on Redis."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 repeat and small job counts; writes bench/results/quick/ "
        "and leaves docs/benchmarks.md alone",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="rounds of every measurement (default 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated system keys to run, e.g. spark_bg,raw,huey (default: all)",
    )
    parser.add_argument(
        "--measures",
        default=",".join(report.ALL_MEASURES),
        help=f"comma-separated measurements (default: {','.join(report.ALL_MEASURES)})",
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="wrk connections for the middleware test"
    )
    parser.add_argument(
        "--skip-setup",
        action="store_true",
        help="use the existing virtual environments as they are; never create or update them",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rebuild the summary, plot and Markdown from the "
        "existing results.json",
    )
    parser.add_argument(
        "--docs",
        default=None,
        help="Markdown report to write (default: docs/benchmarks.md for a full run, "
        "none with --quick)",
    )
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    unknown = set(args.measures.split(",")) - set(report.ALL_MEASURES)
    if unknown:
        parser.error(
            f"unknown measurement(s) {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(report.ALL_MEASURES)}"
        )
    if args.only:
        keys = {s.key for s in plan.SYSTEMS}
        bad = set(args.only.split(",")) - keys
        if bad:
            parser.error(
                f"unknown system key(s) {', '.join(sorted(bad))}; "
                f"choose from {', '.join(sorted(keys))}"
            )
    return args


def measure_all(
    args: argparse.Namespace, sizes: plan.Sizes, out_dir: Path, argv: list[str]
) -> dict:
    """Prepare the environments, run every repeat against a fresh redis-server, and aggregate."""
    repeat = args.repeat or sizes.repeat
    selected = set(args.only.split(",")) if args.only else None
    measures = args.measures.split(",")
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)

    runner = Runner(args, sizes, out_dir)
    needed = {s.env for s in plan.SYSTEMS if selected is None or s.key in selected}
    needed |= {envs.PROJECT_ENV, "plot"}
    log(f"preparing environments: {', '.join(sorted(needed))}")
    runner.prepare_envs(needed)
    wrk_error = ensure_wrk() if "middleware" in measures else None
    if wrk_error:
        runner.env_errors["wrk"] = wrk_error
        log(wrk_error)

    runner.server = RedisServer(out_dir / "logs" / "redis-server.log")
    log(
        f"redis-server {runner.server.version} on {runner.server.url} "
        f"(pid {runner.server.process.pid})"
    )
    try:
        for index in range(repeat):
            log(f"repeat {index + 1} of {repeat}")
            if wrk_error and "middleware" in measures:
                runner.runs.append(
                    {
                        "repeat": index,
                        "measure": "middleware",
                        "system": "plain",
                        "ok": False,
                        "error": wrk_error,
                    }
                )
            run_measures = [m for m in measures if not (m == "middleware" and wrk_error)]
            runner.run_repeat(index, run_measures, selected)
    finally:
        redis_version = runner.server.version
        runner.server.stop()

    meta = {
        "date": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(time.monotonic() - started),
        "command": "python bench/run.py " + " ".join(argv),
        "mode": "quick" if args.quick else "full",
        "repeat": repeat,
        "sizes": report.sizes_dict(sizes),
        "machine": machine_info(),
        "redis_server": redis_version,
        "wrk_connections": args.connections,
        "versions": {
            env: envs.installed_versions(env) for env in sorted(needed - set(runner.env_errors))
        },
        "env_errors": runner.env_errors,
    }
    return report.build_results(meta, runner.settings, runner.runs)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sizes = plan.QUICK if args.quick else plan.FULL
    out_dir = envs.BENCH_DIR / "results" / ("quick" if args.quick else "")
    if args.docs:
        docs_path: Path | None = Path(args.docs)
    elif args.quick:
        docs_path = None
    else:
        docs_path = envs.REPO_DIR / "docs" / "benchmarks.md"

    results_path = out_dir / "results.json"
    if args.render_only:
        previous = json.loads(results_path.read_text())
        results = report.build_results(previous["meta"], previous["settings"], previous["runs"])
    else:
        results = measure_all(args, sizes, out_dir, argv)
        out_dir.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {results_path}")

    plot_path = out_dir / "benchmarks.png"
    plot_error = results["meta"]["env_errors"].get("plot")
    if plot_error is None and not envs.python_path("plot").exists():
        plot_error = f"plot environment {envs.python_path('plot').parent.parent} is missing"
    if plot_error is None:
        completed = subprocess.run(
            [
                str(envs.python_path("plot")),
                str(envs.BENCH_DIR / "plot.py"),
                str(results_path),
                str(plot_path),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if completed.returncode != 0:
            plot_error = completed.stderr.strip()[-1000:]
    if plot_error:
        log(f"plot failed: {plot_error}")
    else:
        log(f"wrote {plot_path}")

    text = report.render_markdown(results, plot_path if not plot_error else None, docs_path)
    if docs_path is not None:
        docs_path.parent.mkdir(parents=True, exist_ok=True)
        docs_path.write_text(text)
        log(f"wrote {docs_path}")
    print(report.render_console(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
