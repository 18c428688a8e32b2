"""Speed benchmarks, each reported as a ratio against a baseline measured in the same run.

    python scripts/benchmark.py                 # every case
    python scripts/benchmark.py field model     # chosen cases

Cases live in `benchmarks/<case>.py` and expose `run(args) -> list[Row]`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.timing import format_table  # noqa: E402

CASES = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in {"__init__", "timing", "inputs"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*", help=f"any of {CASES} (default: all)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {CASES}")
    rows = []
    for case in args.cases or CASES:
        rows += importlib.import_module(f"benchmarks.{case}").run(args)
        print(format_table(rows), flush=True)
        print()
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
