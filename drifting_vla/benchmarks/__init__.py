"""Benchmark cases for `scripts/benchmark.py`: each module exposes `run(args) -> list[Row]`."""
