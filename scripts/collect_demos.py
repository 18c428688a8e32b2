"""Collect (and cache) Meta-World scripted-expert demonstrations for the embedded benchmark.

    python scripts/collect_demos.py                                   # the tasks of drifting_vla/configs/data/metaworld.yaml
    python scripts/collect_demos.py --tasks reach-v3 push-v3 --episodes 20 --workers 2
    python scripts/collect_demos.py --cameras corner gripperPOV --image-size 96 --root ./data/metaworld

Needs the `sim` extra (metaworld, mujoco) and `MUJOCO_GL=egl` (or osmesa) on a headless machine.
Collection is deterministic for the settings and skipped for tasks already complete in the cache;
the training config must use the same settings to find the demos.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import yaml

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "drifting_vla" / "configs" / "data" / "metaworld.yaml"


def main() -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    from drifting_vla.data.metaworld_demos import ensure_metaworld_demos

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=pathlib.Path, default=CONFIG, help="data config to start from")
    parser.add_argument("--tasks", nargs="+", help="Meta-World task names, e.g. reach-v3")
    parser.add_argument("--cameras", nargs="+")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--episodes", type=int, help="seeds tried per task (train_seeds.count)")
    parser.add_argument("--seed-start", type=int, help="first reset seed (train_seeds.start)")
    parser.add_argument("--max-episode-steps", type=int)
    parser.add_argument("--workers", type=int, help="simulator processes")
    parser.add_argument("--root", help="cache folder")
    args = parser.parse_args()

    cfg = yaml.safe_load(args.config.read_text())
    overrides = {
        "tasks": args.tasks,
        "cameras": args.cameras,
        "image_size": args.image_size,
        "max_episode_steps": args.max_episode_steps,
        "collect_workers": args.workers,
        "root": args.root,
    }
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if args.episodes is not None:
        cfg["train_seeds"]["count"] = args.episodes
    if args.seed_start is not None:
        cfg["train_seeds"]["start"] = args.seed_start
    ensure_metaworld_demos(cfg)


if __name__ == "__main__":
    main()
