"""One way to time things, so every benchmark's ratio means the same."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Row:
    """One line of a benchmark table. `baseline` names the row this one is compared against."""

    case: str
    name: str
    seconds: float
    baseline: str | None = None
    extra: dict | None = None


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10, min_seconds: float = 0.5) -> float:
    """Median wall time of `fn()` in seconds.

    Runs at least `repeats` times and at least `min_seconds` in total, so fast calls are not
    dominated by timer resolution; synchronizes CUDA so GPU work is counted.
    """
    for _ in range(warmup):
        fn()
    _sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 1000:
            break
    return statistics.median(samples)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def format_table(rows: list[Row]) -> str:
    """Rows as an aligned table with each row's speed-up over its baseline row (same run)."""
    by_name = {(r.case, r.name): r for r in rows}
    lines = [f"{'case':<8} {'name':<44} {'time':>12} {'speed-up':>10}  notes"]
    for r in rows:
        ratio = ""
        if r.baseline is not None:
            base = by_name[(r.case, r.baseline)]
            ratio = f"{base.seconds / r.seconds:9.1f}x"
        notes = ", ".join(f"{k}={v}" for k, v in (r.extra or {}).items())
        lines.append(f"{r.case:<8} {r.name:<44} {_fmt_seconds(r.seconds):>12} {ratio:>10}  {notes}")
    return "\n".join(lines)


def _fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"
