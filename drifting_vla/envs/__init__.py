"""Simulators behind one interface (`base_env.BaseEnv`), chosen by the data config's `name`.

    env = make_env(cfg.data, "drawer-open-v3")      # MetaWorldEnv.from_config(cfg.data, task)

The registry maps a name to an import path (`"module:Class"`), not to a class, so a worker process
started with `spawn` is handed the import path its parent resolved and builds the same env from
plain strings, and the simulator module is only imported where an env is actually built (RLBench
exists only inside its Docker image).

A name is only ever looked up here, never imported: `data.name` comes from a config that may be a
downloaded checkpoint, and a checkpoint is data. An env defined outside the package is registered
by the user's own code, `register_env("my_robot", "my_package.envs:MyEnv")`, for example in a
module named on the command line of the scripts (`plugins=[my_package.envs]`, see
`drifting_vla.plugins`).
"""

from __future__ import annotations

import copy
import importlib

ENVS: dict[str, str] = {
    "metaworld": "drifting_vla.envs.metaworld_env:MetaWorldEnv",
    "aloha": "drifting_vla.envs.aloha_env:AlohaEnv",
    "rlbench": "drifting_vla.envs.rlbench_env:RLBenchEnv",
}


def register_env(name: str, import_path: str) -> None:
    """Register `"module:Class"` (a `BaseEnv` with a `from_config(data_cfg, task)` classmethod)
    under `name`, the value a data config's `name` selects it by."""
    if ":" not in import_path:
        raise ValueError(f"env import path must look like 'module:Class', got {import_path!r}")
    ENVS[name] = import_path


def unregistered_env_message(name: str, plugins=None) -> str:
    """Why `name` selects no simulator, and how a user who trusts the code behind it registers it."""
    recorded = f" The run's config records plugins={list(plugins)}: name them if you trust them." if plugins else ""
    return (
        f"data.name={name!r} is not a registered simulator {sorted(ENVS)}. A name read from a config "
        f"(a checkpoint, an export, a server) only selects a registered simulator and never imports code. "
        f"To evaluate in a simulator of your own, register it in a module of yours "
        f"(drifting_vla.envs.register_env({name!r}, 'module:Class')) and name that module on the command "
        f"line: plugins=[your.module].{recorded}"
    )


def check_saved_env_names(cfg: dict, file) -> None:
    """A saved config's simulator names of the `module:Class` form are refused unless the user
    registered them under that very name: a name is never imported, and a run of an earlier
    version that named one says how to register it."""
    data = cfg["data"]
    simulator = data.get("simulator")
    names = [data.get("name"), simulator.get("name") if isinstance(simulator, dict) else None]
    for name in names:
        if name is not None and ":" in str(name) and str(name) not in ENVS:
            raise ValueError(f"{file}: {unregistered_env_message(str(name), cfg.get('plugins'))}")


def env_import_path(data_cfg) -> str:
    """The registered import path of the env class for a data config's `name`."""
    name = str(data_cfg["name"])
    if name not in ENVS:
        raise ValueError(unregistered_env_message(name))
    return ENVS[name]


def checked_env_import_path(data_cfg, tasks) -> str:
    """`env_import_path`, after checking that the simulator knows every one of `tasks` (a list of
    names), so that a misspelt task is refused before any worker or episode starts."""
    import_path = env_import_path(data_cfg)
    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be a list of task names, e.g. [{tasks}], got {tasks!r}")
    known = env_class(import_path).known_tasks()
    unknown = [t for t in tasks if known is not None and t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} for the simulator {data_cfg['name']!r}; valid names: {sorted(known)}")
    return import_path


NO_SIMULATOR = (
    "the dataset records no simulator (data.simulator is null), so closed-loop evaluation is disabled; "
    "datasets exported by `scripts/collect_demos.py --format lerobot` record Meta-World, others can set "
    "data.simulator to a registered simulator's data config"
)


def simulation_config(data_cfg) -> dict | None:
    """The data config a simulator is built from, or None when there is no simulator to evaluate in.

    A dataset recorded in a simulator without being one itself (a LeRobot export of Meta-World
    demos) names it in `data.simulator`, a data config of that simulator (name, tasks, cameras,
    step limit, seeds) laid over the dataset's own (action spec, image size, horizon). A data
    config without the key is its simulator's config already.
    """
    data = dict(data_cfg)
    if "simulator" not in data:
        return data
    simulator = data["simulator"]
    if simulator == "auto":
        raise ValueError("data.simulator=auto is resolved from the dataset when it is built (the trainer does it); "
                         "build the dataset first or set data.simulator to a simulator's data config")
    return {**data, **dict(simulator)} if simulator else None


def env_class(import_path: str) -> type:
    module_name, _, class_name = import_path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_env(data_cfg, task: str, **kwargs):
    """Build the env of `data_cfg.name` for `task` with the data config's observation settings."""
    return env_class(env_import_path(data_cfg)).from_config(data_cfg, task, **kwargs)


_REUSED: tuple[type, dict, str, object] | None = None


def reused_env(env_cls: type, data_cfg: dict, task: str):
    """This process's env of `env_cls` for `task` with `data_cfg`'s settings, built by `from_config`
    on first use and kept while later calls ask for the same: a worker of a pool runs the episodes
    of one task in a row, and building an env (a MuJoCo model, a GL context) can cost more than an
    episode. Any other request closes it and builds the new one."""
    global _REUSED
    if _REUSED is None or _REUSED[:3] != (env_cls, data_cfg, task):
        close_reused_env()
        _REUSED = (env_cls, copy.deepcopy(data_cfg), task, env_cls.from_config(data_cfg, task))
    return _REUSED[3]


def close_reused_env() -> None:
    """Close the env `reused_env` keeps (when this process is done with it)."""
    global _REUSED
    if _REUSED is not None:
        _REUSED[3].close()
        _REUSED = None
