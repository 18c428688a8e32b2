"""Collect (and cache) scripted-expert demonstrations: Meta-World (the embedded benchmark) or ALOHA.

    python scripts/collect_demos.py                                   # the tasks of drifting_vla/configs/data/metaworld.yaml
    python scripts/collect_demos.py --data metaworld_multimodal       # another data config (here the two-route wall suite)
    python scripts/collect_demos.py --tasks reach-v3 push-v3 --episodes 20 --workers 2
    python scripts/collect_demos.py --cameras corner gripperPOV --image-size 96 --root ./data/metaworld
    python scripts/collect_demos.py --format lerobot --output ./data/metaworld_lerobot   # + a LeRobot v3.0 copy
    python scripts/collect_demos.py --data aloha_transfer_cube --format lerobot --output ./data/aloha_lerobot
                                      # ALOHA demos in LeRobot's ALOHA layout (train: data=aloha_lerobot data.root=...)

Needs the `sim` extra (metaworld, gym-aloha, mujoco) and `MUJOCO_GL=egl` (or osmesa) on a headless machine.
Collection is deterministic for the settings and skipped for tasks already complete in the cache;
the training config must use the same settings to find the demos. `--format lerobot` also writes
the demos as a LeRobotDataset v3.0 (AV1 video by default) for `data=lerobot data.root=<output>`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

from drifting_vla.configs import data_config


def main() -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    from drifting_vla.data.aloha_demos import ensure_aloha_demos, export_aloha_store
    from drifting_vla.data.lerobot_writer import VIDEO_CODECS, export_metaworld_store
    from drifting_vla.data.metaworld_demos import ensure_metaworld_demos

    suites = {"metaworld": (ensure_metaworld_demos, export_metaworld_store, "data=lerobot"),
              "aloha": (ensure_aloha_demos, export_aloha_store, "data=aloha_lerobot")}

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="metaworld", help="data config to start from (drifting_vla/configs/data/<name>.yaml)")
    parser.add_argument("--tasks", nargs="+", help="Meta-World task names, e.g. reach-v3")
    parser.add_argument("--cameras", nargs="+")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--episodes", type=int, help="seeds tried per task (train_seeds.count)")
    parser.add_argument("--seed-start", type=int, help="first reset seed (train_seeds.start)")
    parser.add_argument("--max-episode-steps", type=int)
    parser.add_argument("--workers", type=int, help="simulator processes")
    parser.add_argument("--root", help="cache folder")
    parser.add_argument("--format", choices=["store", "lerobot"], default="store",
                        help="lerobot: also export the demos as a LeRobotDataset v3.0 to --output")
    parser.add_argument("--output", type=pathlib.Path, help="the LeRobot dataset folder (new or empty)")
    parser.add_argument("--vcodec", choices=sorted(VIDEO_CODECS), default="libsvtav1",
                        help="video encoder of the LeRobot export: libsvtav1 (AV1, LeRobot's default) or libx264")
    args = parser.parse_args()
    if args.format == "lerobot" and args.output is None:
        parser.error("--format lerobot needs --output DIR")

    cfg = data_config(args.data)
    if cfg.get("name") not in suites:
        parser.error(f"--data {args.data}: collects demos of {sorted(suites)} only (its name is {cfg.get('name')!r})")
    ensure, export, train_with = suites[cfg["name"]]
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
    store = ensure(cfg)
    if args.format == "lerobot":
        start = time.perf_counter()
        out = export(store, args.output, cfg["tasks"], cfg["eval_seeds"], vcodec=args.vcodec)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"wrote LeRobot v3.0 dataset {out} ({size / 1e6:.1f} MB, {args.vcodec}) in {time.perf_counter() - start:.0f} s; "
              f"train with: python scripts/train.py {train_with} data.root={out}")


if __name__ == "__main__":
    main()
