"""The Meta-World expert demonstrations, collected (and cached) by the shared demo store
(`demo_store.py`: its layout, hashing and guarantees).

    store = ensure_metaworld_demos(data_cfg)      # collects what is missing, returns the store dir

What is Meta-World's own: the cameras are the config's, the expert is Meta-World's scripted policy
(`stock`) or the two-route wall experts (`routes`, whose version then joins the hash), the goal may
be appended to proprio (`observe_goal`), and the store is keyed by the installed metaworld and
mujoco versions.
"""

from __future__ import annotations

from drifting_vla.data.demo_store import DemoSuite
from drifting_vla.envs.metaworld_env import TASK_INSTRUCTIONS, MetaWorldEnv, run_expert_episode
from drifting_vla.envs.metaworld_routes import EXPERT_VERSION as ROUTE_EXPERT_VERSION
from drifting_vla.formats.config import MetaWorldDataConfig


def _settings(cfg) -> dict:
    settings = {
        "cameras": [str(c) for c in cfg["cameras"]],
        "expert": str(cfg.get("expert", "stock")),
        "observe_goal": bool(cfg.get("observe_goal", False)),
    }
    if settings["expert"] != "stock":
        settings["expert_version"] = ROUTE_EXPERT_VERSION
    return settings


METAWORLD = DemoSuite(name="Meta-World", default_root=MetaWorldDataConfig.root, simulator_packages=("metaworld", "mujoco"),
                      instructions=TASK_INSTRUCTIONS, settings=_settings, env=MetaWorldEnv, run_episode=run_expert_episode)
collection_config, store_dir, ensure_metaworld_demos = METAWORLD.collection_config, METAWORLD.store_dir, METAWORLD.ensure_demos
