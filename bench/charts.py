"""The charts BENCHMARKS.md shows, drawn from bench/results.json (matplotlib, `make bench`).

Each is drawn only when its section holds the raw figures it needs (a results file from
before they were kept has none), and returns the PNG's name under bench/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt

QUEUE_WAIT = "queue_wait_cdf.png"
NOISY = "noisy_neighbour.png"
CURVE = "throughput_curve.png"


def _cdf(axes: Any, waits: list[float], label: str) -> None:
    ordered = sorted(waits)
    shares = [(index + 1) / len(ordered) for index in range(len(ordered))]
    axes.step(ordered, shares, where="post", label=f"{label} (n={len(ordered)})")


def _cdfs(
    series: list[tuple[str, list[float]]],
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    goal: float | None = None,
) -> str:
    """Each series' cumulative distribution on a log time axis."""
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, waits in series:
        _cdf(axes, waits, label)
    if goal:
        axes.axvline(goal, color="grey", linestyle="--", label="goal: p95 ≤ 2 × L")
    axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right")
    return _save(figure, path)


def queue_wait(flood: dict[str, Any], directory: Path) -> str | None:
    rows = [row for row in flood.get("rows", []) if row.get("waits_s")]
    if len(rows) < 2:
        return None
    return _cdfs(
        [(row["config"], row["waits_s"]) for row in rows],
        directory / QUEUE_WAIT,
        "Enterprise jobs behind a burst of 400 free-tier jobs",
        "enterprise queue wait, s (log scale)",
        "share of enterprise jobs started",
    )


def noisy_neighbour(noisy: dict[str, Any], directory: Path) -> str | None:
    rows = [row for row in noisy.get("rows", []) if row.get("b_waits_s") and not row.get("slots_baseline")]
    if len(rows) < 2:
        return None
    latency = noisy.get("latency_s")
    return _cdfs(
        [(row["config"], row["b_waits_s"]) for row in rows],
        directory / NOISY,
        "Tenant B in the lane tenant A floods",
        "tenant B's queue wait, s (log scale)",
        "share of B's jobs started",
        goal=2 * latency if latency else None,
    )


def throughput_curve(curve: list[dict[str, Any]], directory: Path) -> str | None:
    if not isinstance(curve, list) or len(curve) < 2:
        return None
    offered = [point["offered_per_second"] for point in curve]
    figure, (rate, latency) = plt.subplots(1, 2, figsize=(10, 4))
    rate.plot(
        offered, [point["achieved_per_second"] for point in curve], marker="o", label="achieved, from cold"
    )
    if all("warm_achieved_per_second" in point for point in curve):
        rate.plot(
            offered,
            [point["warm_achieved_per_second"] for point in curve],
            marker="s",
            label="achieved, warm",
        )
    rate.plot(offered, offered, linestyle="--", color="grey", label="offered")
    rate.set_xlabel("jobs/s offered")
    rate.set_ylabel("jobs/s completed")
    rate.set_title("Sandbox throughput")
    rate.legend()
    rate.grid(True, alpha=0.3)
    latency.plot(offered, [point["submit_p50_ms"] for point in curve], marker="o", label="p50, from cold")
    latency.plot(offered, [point["submit_p99_ms"] for point in curve], marker="o", label="p99, from cold")
    if all("warm_submit_p99_ms" in point for point in curve):
        latency.plot(offered, [point["warm_submit_p50_ms"] for point in curve], marker="s", label="p50, warm")
        latency.plot(offered, [point["warm_submit_p99_ms"] for point in curve], marker="s", label="p99, warm")
        latency.axhline(100, linestyle=":", color="grey", label="goal: p99 100 ms at 20/s")
    latency.set_yscale("log")
    latency.set_xlabel("jobs/s offered")
    latency.set_ylabel("ms (log scale)")
    latency.set_title("Submit latency")
    latency.legend()
    latency.grid(True, which="both", alpha=0.3)
    return _save(figure, directory / CURVE)


def _save(figure: Any, path: Path) -> str:
    figure.tight_layout()
    # No timestamps in the file, so an unchanged chart stays byte-identical in git.
    figure.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return path.name


def draw(results: dict[str, Any], directory: Path) -> list[str]:
    drawn = [
        queue_wait(results.get("flood") or {}, directory),
        noisy_neighbour(results.get("noisy") or {}, directory),
        throughput_curve(results.get("curve") or [], directory),
    ]
    return [name for name in drawn if name]
