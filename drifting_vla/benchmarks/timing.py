"""One way to time things, so every benchmark's ratio means the same."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Row:
    """One line of a benchmark table. `baseline` names the row this one is compared against;
    `seconds` is None for a row that was not measured (its notes say why: skipped, failed)."""

    case: str
    name: str
    seconds: float | None
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
    lines = [f"{'case':<8} {'name':<56} {'time':>12} {'speed-up':>10}  notes"]
    for r in rows:
        ratio = ""
        base = by_name[(r.case, r.baseline)] if r.baseline is not None else None
        if base is not None and base.seconds is not None and r.seconds is not None:
            ratio = f"{base.seconds / r.seconds:9.1f}x"
        notes = ", ".join(f"{k}={v}" for k, v in (r.extra or {}).items())
        lines.append(f"{r.case:<8} {r.name:<56} {_fmt_seconds(r.seconds):>12} {ratio:>10}  {notes}")
    return "\n".join(lines)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def reset_peak_memory(device: torch.device) -> None:
    """Start counting peak memory afresh (CUDA only: the CPU allocator keeps no such count)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    """A row's note of the peak allocated memory since `reset_peak_memory`; nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_mem_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
