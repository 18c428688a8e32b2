"""Check that a suite's scripted experts do what its demonstrations claim, and publish the figures.

    python scripts/verify_experts.py --data metaworld_multimodal --episodes 50 --json docs/results/experts_multimodal.json
    python scripts/verify_experts.py --data metaworld_mt10 --episodes 50 --json docs/results/experts_mt10.json

With the route experts (`expert: routes`) every task is run three ways on the same seeds: the left
route alone, the right route alone, and the per-step average of the two (both experts queried at
the current state, their actions averaged): a multimodal suite is sound when each route succeeds
alone (>= 0.95) and the average fails. With the stock experts it reports each task's success,
which bounds what a policy imitating them can reach. Seeds are the config's evaluation seeds, the
ones policies are scored on. The label of the way each episode got past the wall (`mode`) is
counted too, so the labeller is checked against the route the expert was told to take.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from drifting_vla.configs import data_config  # noqa: E402
from drifting_vla.envs.metaworld_routes import ROUTES, RouteExpert  # noqa: E402
from drifting_vla.evaluation.results import wilson_interval

AVERAGE = "average"


def _episode(job: tuple) -> dict:
    """Worker: one episode of `task` from `seed`, driven by `how` (stock, a route, or the average)."""
    from drifting_vla.envs.metaworld_env import MetaWorldEnv

    task, seed, how, max_steps = job
    global _ENV
    if _ENV is None or _ENV.task != task:
        if _ENV is not None:
            _ENV.close()
        _ENV = MetaWorldEnv(task, cameras=("corner",), image_size=16, max_episode_steps=max_steps)
    env = _ENV
    env.reset(seed)
    experts = {route: RouteExpert(task, route) for route in ROUTES}
    success, steps, mode = False, 0, None
    while steps < max_steps and not success:
        steps += 1
        if how == "stock":
            action = env.expert_action()
        elif how == AVERAGE:
            action = np.mean([experts[r].get_action(env.state) for r in ROUTES], axis=0)
        else:
            action = experts[how].get_action(env.state)
        result = env.step(action)
        mode, success = result.info.get("mode", mode), result.success
    return {"task": task, "seed": seed, "how": how, "success": success, "steps": steps, "mode": mode}


_ENV = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="metaworld_multimodal", help="a Meta-World data config name")
    parser.add_argument("--episodes", type=int, default=50, help="seeds per task and way (default: 50)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=pathlib.Path, help="also write the table and every episode here")
    args = parser.parse_args()
    cfg = data_config(args.data)
    if cfg.get("name") != "metaworld":
        parser.error(f"--data {args.data}: not a Meta-World config (name: {cfg.get('name')!r})")
    ways = [*ROUTES, AVERAGE] if cfg.get("expert") == "routes" else ["stock"]
    start = int(cfg["eval_seeds"]["start"])
    max_steps = int(cfg["max_episode_steps"])
    jobs = [(t, start + k, how, max_steps) for t in cfg["tasks"] for how in ways for k in range(args.episodes)]
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
            table[task][how] = {
                "success": wins / len(rows),
                "ci95": list(wilson_interval(wins, len(rows))),
                "episodes": len(rows),
                "mean_steps_of_successes": float(np.mean([e["steps"] for e in rows if e["success"]])) if wins else None,
                "modes": {m: modes.count(m) for m in sorted(set(modes))},
            }
    seconds = time.perf_counter() - started
    print(f"{'task':<28}" + "".join(f"{how:>24}" for how in ways))
    for task, cells in table.items():
        line = "".join(f"{c['success']:>8.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]  " for c in cells.values())
        print(f"{task:<28}{line}")
    print(f"{len(episodes)} episodes in {seconds:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"data": args.data, "seeds": {"start": start, "count": args.episodes}, "seconds": seconds,
                  "table": table, "episodes": episodes}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
