"""Check a suite's scripted experts on the evaluation seeds and publish the figures
(drifting_vla/evaluation/expert_check.py says what is run and what makes a suite sound).

    python scripts/verify_experts.py --data metaworld_multimodal --episodes 25 --workers 1 --json docs/results/experts_multimodal.json
    python scripts/verify_experts.py --data metaworld_mt10 --episodes 50 --json experts_mt10.json
    python scripts/verify_experts.py --data aloha_transfer_cube --episodes 20 --workers 1 --json docs/results/aloha_experts_transfer_cube.json
    python scripts/verify_experts.py --data aloha_insertion --episodes 20 --workers 1 --json docs/results/aloha_experts_insertion.json
    python scripts/verify_experts.py --data aloha_transfer_cube_bimodal --episodes 20 --workers 1 --json docs/results/aloha_experts_bimodal.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

from drifting_vla.configs import data_config
from drifting_vla.evaluation.expert_check import CHECKS, check_experts, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="metaworld_multimodal", help="a Meta-World or ALOHA data config name")
    parser.add_argument("--episodes", type=int, default=50, help="seeds per task and way (default: 50)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path, help="also write the table and every episode here")
    args = parser.parse_args()
    cfg = data_config(args.data)
    if cfg.get("name") not in CHECKS:
        parser.error(f"--data {args.data}: its simulator {cfg.get('name')!r} has no scripted experts (checked: {sorted(CHECKS)})")
    report = check_experts(cfg, args.episodes, args.workers)
    print(format_table(report["table"]))
    print(f"{len(report['episodes'])} episodes in {report['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"data": args.data, **report}, indent=2))


if __name__ == "__main__":
    main()
