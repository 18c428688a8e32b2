"""Speed benchmarks, each reported as a ratio against a baseline measured in the same run.

    python scripts/benchmark.py                 # every case but gpu
    python scripts/benchmark.py field model     # chosen cases
    python scripts/benchmark.py gpu --json gpu.json [--quickstart]   # the one-run GPU figures (docs/performance.md)
    python scripts/benchmark.py gpu --smoke --device cpu             # its every code path, tiny, on a CPU

Cases live in `benchmarks/<case>.py` and expose `run(args) -> list[Row]`. The exit status is 1
when a row failed (the gpu case reports a failed section as a row and goes on).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys

from drifting_vla.benchmarks.timing import format_table

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
CASES = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in {"__init__", "timing", "inputs"})
DEFAULT_CASES = [case for case in CASES if case != "gpu"]  # gpu is sized for a GPU lease: run it by name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help=f"any of {CASES} (default: {DEFAULT_CASES})")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows to this JSON file")
    gpu = parser.add_argument_group("gpu case")
    gpu.add_argument("--budget-s", type=float, default=450.0, help="seconds the sections may take in all (default: 450)")
    gpu.add_argument("--quickstart", action="store_true", help="also run the quickstart end to end (Meta-World)")
    gpu.add_argument("--smoke", action="store_true", help="tiny sizes: every code path in well under a minute")
    args = parser.parse_args()
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {CASES}")
    rows = []
    for case in args.cases or DEFAULT_CASES:
        rows += importlib.import_module(f"drifting_vla.benchmarks.{case}").run(args)
        print(format_table(rows), flush=True)
        print()
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    if any("failed" in (r.extra or {}) for r in rows):
        sys.exit(1)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
