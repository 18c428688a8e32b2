"""Check that a suite's scripted experts do what its demonstrations claim (`scripts/verify_experts.py`).

With the route experts (`expert: routes`) every task is run three ways on the same seeds: each
route alone and the per-step average of the two routes' actions. A multimodal suite is sound when
each route succeeds alone and the average fails, so that a policy averaging the demonstrations
fails where one committing to a route succeeds. With one expert per task (Meta-World's `stock`,
ALOHA's `scripted`) it reports each task's success, which bounds what a policy imitating them can
reach. The label of the way each episode went (`mode`) is counted, which checks the labeller
against the route the expert was told to take. Seeds are the config's evaluation seeds, the ones
policies are scored on.

How an episode is driven is the suite's: Meta-World's experts act on the current state (the
average queries both route experts each step); ALOHA's plan a joint trajectory from the reset state
that is replayed as the demonstrations are (the average is of the two planned trajectories), and
succeed when the reward reaches 4.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from drifting_vla.envs import reused_env
from drifting_vla.envs.aloha_env import AlohaEnv, run_expert_episode
from drifting_vla.envs.aloha_experts import ROUTES as ALOHA_ROUTES
from drifting_vla.envs.metaworld_env import MetaWorldEnv
from drifting_vla.envs.metaworld_routes import ROUTES as METAWORLD_ROUTES
from drifting_vla.envs.metaworld_routes import RouteExpert
from drifting_vla.envs.seeds import evaluation_seeds
from drifting_vla.evaluation.results import wilson_interval

AVERAGE = "average"


@dataclass(frozen=True)
class ExpertCheck:
    routes: tuple[str, ...]
    """The routes of the suite's two-route expert (`expert: routes`)."""
    episode: Callable[[dict, str, int, str], dict]
    """(data config, task, seed, how: a route, the average or the config's expert) -> `success`,
    `mode` and what else the suite measures of an episode."""


def _metaworld_episode(cfg: dict, task: str, seed: int, how: str) -> dict:
    # one small camera: the experts read the state, the images only cost time
    env = reused_env(MetaWorldEnv, {**cfg, "cameras": ["corner"], "image_size": 16}, task)
    env.reset(seed)
    experts = {route: RouteExpert(task, route) for route in METAWORLD_ROUTES} if cfg["expert"] == "routes" else {}
    success, steps, mode = False, 0, None
    while steps < env.max_episode_steps and not success:
        steps += 1
        if how == AVERAGE:
            action = np.mean([expert.get_action(env.state) for expert in experts.values()], axis=0)
        elif how in experts:
            action = experts[how].get_action(env.state)
        else:
            action = env.expert_action()
        result = env.step(action)
        mode, success = result.info.get("mode", mode), result.success
    return {"success": success, "steps": steps, "mode": mode}


def _aloha_episode(cfg: dict, task: str, seed: int, how: str) -> dict:
    env = reused_env(AlohaEnv, cfg, task)
    if how == AVERAGE:
        actions = np.mean([env.expert_actions(seed, route) for route in ALOHA_ROUTES], axis=0)
    else:
        actions = env.expert_actions(seed, how if how in ALOHA_ROUTES else None)
    episode = run_expert_episode(env, seed, actions)
    return {"success": bool(episode["success"]), "mode": episode["mode"], "max_reward": float(env.max_reward)}


CHECKS = {
    "metaworld": ExpertCheck(METAWORLD_ROUTES, _metaworld_episode),
    "aloha": ExpertCheck(ALOHA_ROUTES, _aloha_episode),
}
"""By the data config's `name`: the suites with scripted experts."""


def ways(cfg: dict) -> list[str]:
    """How each task is run: each route and their average, or the config's one expert."""
    return [*CHECKS[cfg["name"]].routes, AVERAGE] if cfg["expert"] == "routes" else [str(cfg["expert"])]


def check_experts(cfg: dict, episodes: int, workers: int) -> dict:
    """Run the first `episodes` evaluation seeds of every task each way, in `workers` spawned
    processes; return `seeds`, `seconds`, `table` ({task: {how: figures}}) and every episode."""
    if cfg.get("name") not in CHECKS:
        raise ValueError(f"data config {cfg.get('name')!r} has no scripted experts to check; checked: {sorted(CHECKS)}")
    os.environ.setdefault("MUJOCO_GL", "egl")  # the worker processes render offscreen, as rollout.evaluate's do
    seeds = evaluation_seeds(cfg, episodes)
    jobs = [(cfg, task, seed, how) for task in cfg["tasks"] for how in ways(cfg) for seed in seeds]
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(max(1, workers)) as pool:
        results = list(tqdm(pool.imap(_run, jobs), total=len(jobs), desc="expert episodes", unit="ep"))
    table = {task: {how: _figures([e for e in results if e["task"] == task and e["how"] == how]) for how in ways(cfg)}
             for task in cfg["tasks"]}
    return {"seeds": {"start": seeds[0], "count": len(seeds)}, "seconds": time.perf_counter() - started, "table": table,
            "episodes": results}


def _run(job: tuple) -> dict:
    """Worker: one episode, in the env this process keeps for the task."""
    cfg, task, seed, how = job
    return {"task": task, "seed": seed, "how": how, **CHECKS[cfg["name"]].episode(cfg, task, seed, how)}


def _figures(episodes: list[dict]) -> dict:
    """Success with its 95% Wilson interval, the failed seeds, the counts of the labels episodes
    carry (none for an expert without routes) and, where the suite's episodes end at success
    (Meta-World), the mean length of the successful ones."""
    wins = sum(e["success"] for e in episodes)
    modes = [e["mode"] for e in episodes if e["mode"] is not None]
    steps = [e["steps"] for e in episodes if e["success"] and "steps" in e]
    return {
        "success": wins / len(episodes),
        "ci95": list(wilson_interval(wins, len(episodes))),
        "episodes": len(episodes),
        "failed_seeds": [e["seed"] for e in episodes if not e["success"]],
        "mean_steps_of_successes": float(np.mean(steps)) if steps else None,
        "modes": {m: modes.count(m) for m in sorted(set(modes))},
    }


def format_table(table: dict) -> str:
    """One row a task, one column a way: success [95% interval]."""
    width = max(len(task) for task in table) + 2
    hows = list(next(iter(table.values())))
    lines = [f"{'task':<{width}}" + "".join(f"{how:>21}  " for how in hows)]
    for task, cells in table.items():
        lines.append(f"{task:<{width}}" + "".join(f"{c['success']:>8.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]  "
                                                  for c in cells.values()))
    return "\n".join(lines)
