"""Check the scripted ALOHA experts and publish their figures (as `verify_experts.py` does for
Meta-World).

    python scripts/verify_aloha_experts.py --data aloha_transfer_cube --episodes 50 --json docs/results/aloha_experts_transfer_cube.json
    python scripts/verify_aloha_experts.py --data aloha_insertion --episodes 50 --json docs/results/aloha_experts_insertion.json
    python scripts/verify_aloha_experts.py --data aloha_transfer_cube_bimodal --episodes 50 --json docs/results/aloha_experts_bimodal.json

Every episode is planned in end-effector space, turned into joint targets by inverse kinematics and
replayed in the joint-space task, as for the demonstrations; success is the task's reward reaching
4. With the two-route expert (`expert: routes`) every seed is run three ways: each route alone and
the per-step average of the two routes' joint targets. The two-route suite is sound when each
route succeeds alone and the average fails. The route label each replay earned (`mode`, from where
the cube was when the left gripper took it) is counted, which checks the labeller against the route
the expert was told to take. Seeds are the config's evaluation seeds, the ones policies are scored on.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
from tqdm import tqdm

from drifting_vla.configs import data_config
from drifting_vla.envs.aloha_experts import ROUTES
from drifting_vla.evaluation.results import wilson_interval

AVERAGE = "average"
_ENV = None


def _episode(job: tuple) -> dict:
    """Worker: one replay of `task` from `seed`, driven by `how` (scripted, a route, or the average)."""
    from drifting_vla.envs.aloha_env import AlohaEnv, run_expert_episode

    global _ENV
    task, seed, how, expert, image_size, max_steps = job
    if _ENV is None or _ENV.task != task:
        if _ENV is not None:
            _ENV.close()
        _ENV = AlohaEnv(task, image_size=image_size, max_episode_steps=max_steps, expert=expert)
    if how == AVERAGE:
        actions = np.mean([_ENV.expert_actions(seed, route) for route in ROUTES], axis=0)
    else:
        actions = _ENV.expert_actions(seed, how if how in ROUTES else None)
    episode = run_expert_episode(_ENV, seed, actions)
    return {"task": task, "seed": seed, "how": how, "success": bool(episode["success"]), "mode": episode["mode"],
            "max_reward": float(_ENV.max_reward)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="aloha_transfer_cube", help="an ALOHA data config name")
    parser.add_argument("--episodes", type=int, default=50, help="seeds per task and way (default: 50)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path, help="also write the table and every episode here")
    args = parser.parse_args()
    cfg = data_config(args.data)
    if cfg.get("name") != "aloha":
        parser.error(f"--data {args.data}: not an ALOHA config (name: {cfg.get('name')!r})")
    expert = str(cfg.get("expert", "scripted"))
    ways = [*ROUTES, AVERAGE] if expert == "routes" else ["scripted"]
    start = int(cfg["eval_seeds"]["start"])
    jobs = [(t, start + k, how, expert, int(cfg["image_size"]), int(cfg["max_episode_steps"]))
            for t in cfg["tasks"] for how in ways for k in range(args.episodes)]
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        episodes = list(tqdm(pool.imap(_episode, jobs), total=len(jobs), desc="expert episodes", unit="ep"))
    table = {}
    for task in cfg["tasks"]:
        table[task] = {}
        for how in ways:
            rows = [e for e in episodes if e["task"] == task and e["how"] == how]
            wins = sum(e["success"] for e in rows)
            modes = [str(e["mode"]) for e in rows]
            table[task][how] = {"success": wins / len(rows), "ci95": list(wilson_interval(wins, len(rows))),
                                "episodes": len(rows), "failed_seeds": [e["seed"] for e in rows if not e["success"]],
                                "modes": {m: modes.count(m) for m in sorted(set(modes))}}
    seconds = time.perf_counter() - started
    print(f"{'task':<16}" + "".join(f"{how:>24}" for how in ways))
    for task, cells in table.items():
        print(f"{task:<16}" + "".join(f"{c['success']:>8.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]  " for c in cells.values()))
    print(f"{len(episodes)} episodes in {seconds:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"data": args.data, "seeds": {"start": start, "count": args.episodes}, "seconds": seconds,
                  "table": table, "episodes": episodes}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
