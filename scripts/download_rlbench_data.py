"""Download RLBench 18-task data in PerAct's format from the Hugging Face hub.

    python scripts/download_rlbench_data.py --tasks close_jar open_drawer --split train --output ./data/rlbench
    python scripts/download_rlbench_data.py --tasks all --split test --output ./data/rlbench

Resumable (re-run the same command), skips tasks already unpacked, verifies each zip, unpacks to
<output>/<split>/<task>/all_variations/episodes/. About 116 GB for all tasks and splits.
"""

from __future__ import annotations

import argparse
import sys

from drifting_vla.data.rlbench_dataset import RLBENCH_TASKS
from drifting_vla.data.rlbench_download import REPO_ID, SPLITS, DownloadError, download_rlbench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", required=True, help=f"'all' or any of: {' '.join(RLBENCH_TASKS)}")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("--output", default="./data/rlbench")
    parser.add_argument("--repo-id", default=REPO_ID)
    args = parser.parse_args(argv)
    tasks = list(RLBENCH_TASKS) if args.tasks == ["all"] else args.tasks
    try:
        download_rlbench(tasks, args.split, args.output, repo_id=args.repo_id)
    except (ValueError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
