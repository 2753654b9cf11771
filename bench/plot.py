"""Draw bench/results/benchmarks.png from results.json: each figure as a ratio to the best peer.

Usage: python plot.py RESULTS_JSON OUTPUT_PNG (run.py runs it in the bench/.venvs/plot environment).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

SPARK_COLOR = "#e4572e"
PEER_COLOR = "#4a6fa5"
RAW_COLOR = "#8a8a8a"

# (measure, metric, panel title, unit, higher is better, spark_bg target): the target is a
# ratio to the best peer for rates and an absolute latency in milliseconds for latencies.
PANELS = [
    ("enqueue", "rate", "Enqueue, one job per call", "jobs/s", True, 1.0),
    ("batch", "rate", "Enqueue, batches of 100", "jobs/s", True, 4.0),
    ("drain", "rate", "Drain a filled queue, one worker", "jobs/s", True, 3.5),
    ("latency", "p50_ms", "Pickup latency p50", "ms", False, 1.0),
    ("latency", "p99_ms", "Pickup latency p99", "ms", False, 2.0),
]


MIDDLEWARE_SHORT_LABELS = {
    "plain": "no middleware",
    "middleware": "QueueMiddleware",
    "middleware_push": "QueueMiddleware + push",
    "background": "BackgroundTask",
}

LOG_TICKS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30]


def format_value(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.3g} ms"
    return f"{value:,.0f}/s"


def speedups(
    results: dict, measure: str, metric: str, higher: bool, unit: str
) -> tuple[list[tuple[str, str, float, str]], str]:
    """Return (label, key, ratio, value text) rows; a ratio above 1 is better than the best peer."""
    summary = results["summary"].get(measure, {})
    best_key = results["best_peer"].get(measure, {}).get(metric)
    rows = []
    for key, entry in summary.items():
        ratio = entry["ratios"].get(metric, {}).get("best_peer")
        if ratio is None:
            continue
        value = ratio["median"] if higher else 1 / ratio["median"]
        rows.append(
            (entry["label"], key, value, format_value(entry["metrics"][metric]["median"], unit))
        )
    rows.sort(key=lambda row: row[2])
    if best_key is None:
        return rows, ""
    best = summary[best_key]["metrics"][metric]["median"]
    return rows, f"best peer: {summary[best_key]['label']}, {format_value(best, unit)}"


def color_of(key: str) -> str:
    if key.startswith("spark_bg"):
        return SPARK_COLOR
    if key == "raw":
        return RAW_COLOR
    return PEER_COLOR


def draw_ratio_panel(
    axis,
    rows: list,
    title: str,
    subtitle: str,
    target: float | None,
    target_label: str,
    xlabel: str,
) -> None:
    if not rows:
        axis.set_title(f"{title}\n(no data)", fontsize=11)
        axis.axis("off")
        return
    labels = [row[0] for row in rows]
    values = [row[2] for row in rows]
    positions = range(len(rows))
    axis.barh(positions, values, color=[color_of(row[1]) for row in rows], height=0.7)
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(FixedLocator(LOG_TICKS))
    axis.xaxis.set_major_formatter(lambda value, _: f"{value:g}x")
    axis.xaxis.set_minor_locator(NullLocator())
    axis.xaxis.set_minor_formatter(NullFormatter())
    axis.set_yticks(list(positions), labels, fontsize=9)
    axis.axvline(1.0, color="black", linewidth=1)
    if target is not None:
        axis.axvline(target, color=SPARK_COLOR, linewidth=1.2, linestyle="--")
        axis.text(
            target,
            len(rows) - 0.4,
            f" target {target_label}",
            color=SPARK_COLOR,
            fontsize=8,
            va="bottom",
        )
    low = min(min(values), 1.0) / 1.6
    high = max(max(values), target or 1.0) * 8
    axis.set_xlim(low, high)
    for position, row in zip(positions, rows, strict=True):
        axis.text(row[2] * 1.08, position, f"{row[2]:.2g}x  {row[3]}", va="center", fontsize=8)
    axis.set_title(f"{title}\n{subtitle}", fontsize=11)
    axis.set_xlabel(xlabel, fontsize=9)
    axis.grid(axis="x", which="both", alpha=0.2)


def draw_middleware_panel(axis, results: dict) -> None:
    summary = results["summary"].get("middleware", {})
    order = ["plain", "middleware", "middleware_push", "background"]
    rows = [
        (MIDDLEWARE_SHORT_LABELS[key], key, summary[key]["ratios"]["rps"]["plain"]["median"])
        for key in order
        if key in summary and summary[key]["ratios"].get("rps", {}).get("plain")
    ]
    if not rows:
        axis.set_title("Starlette app requests/s\n(no data)", fontsize=11)
        axis.axis("off")
        return
    positions = range(len(rows))
    colors = [SPARK_COLOR if key.startswith("middleware") else PEER_COLOR for _, key, _ in rows]
    axis.barh(positions, [row[2] for row in rows], color=colors, height=0.7)
    axis.set_yticks(list(positions), [row[0] for row in rows], fontsize=9)
    axis.invert_yaxis()
    axis.axvline(1.0, color="black", linewidth=1)
    for target in (0.95, 0.8):
        axis.axvline(target, color=SPARK_COLOR, linewidth=1.2, linestyle="--")
    axis.set_xlim(0, 1.45)
    for position, (_, key, value) in zip(positions, rows, strict=True):
        rps = summary[key]["metrics"]["rps"]["median"]
        axis.text(value + 0.02, position, f"{value:.2f}x  {rps:,.0f}/s", va="center", fontsize=8)
    plain = summary["plain"]["metrics"]["rps"]["median"] if "plain" in summary else 0
    axis.set_title(
        f"Starlette app requests/s under wrk\nno middleware: {plain:,.0f} requests/s", fontsize=11
    )
    axis.set_xlabel(
        "requests/s / no-middleware requests/s\n"
        "(targets 0.95x without push, 0.8x with push, dashed)",
        fontsize=9,
    )
    axis.grid(axis="x", alpha=0.2)


def main(results_path: str, output_path: str) -> None:
    with open(results_path) as f:
        results = json.load(f)
    figure, axes = plt.subplots(2, 3, figsize=(19, 11))
    for axis, (measure, metric, title, unit, higher, target) in zip(
        axes.flat, PANELS, strict=False
    ):
        rows, subtitle = speedups(results, measure, metric, higher, unit)
        if higher:
            xlabel = "jobs/s / best peer's jobs/s (log scale)"
            target_ratio, target_label = target, f"{target:g}x"
        else:
            xlabel = "best peer's latency / latency (log scale)"
            best_key = results["best_peer"].get(measure, {}).get(metric)
            best = (
                results["summary"][measure][best_key]["metrics"][metric]["median"]
                if best_key
                else None
            )
            target_ratio = best / target if best else None
            target_label = f"{target:g} ms"
        draw_ratio_panel(axis, rows, title, subtitle, target_ratio, target_label, xlabel)
    draw_middleware_panel(axes.flat[5], results)
    meta = results["meta"]
    machine = meta["machine"]
    repeats = (
        f"median of {meta['repeat']} interleaved repeats" if meta["repeat"] > 1 else "one repeat"
    )
    rounds = meta["sizes"].get("middleware_rounds", 1)
    if rounds > 1:
        repeats += f" ({rounds} rounds each for the middleware)"
    figure.suptitle(
        "spark_bg (orange), peer job queues (blue) and raw redis-py (grey) as a ratio to the "
        "best peer; right of the black line is better than the best peer\n"
        f"dashed: spark_bg's target; {repeats}",
        fontsize=12,
    )
    figure.text(
        0.5,
        0.005,
        f"{meta['date']}; {machine['cpu']}, {machine['cores']} cores; redis-server "
        f"{meta['redis_server']}; {meta['command'].strip()}",
        ha="center",
        fontsize=9,
        color="#555555",
    )
    figure.tight_layout(rect=(0, 0.02, 1, 0.96))
    figure.savefig(output_path, dpi=90)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python plot.py RESULTS_JSON OUTPUT_PNG")
    main(sys.argv[1], sys.argv[2])
