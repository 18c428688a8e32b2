"""The Hydra configs, shipped inside the package so an installed copy can compose them:

    from hydra import compose, initialize_config_module
    with initialize_config_module("drifting_vla.configs", version_base=None):
        cfg = compose("config", overrides=["model=tiny"])

`scripts/*.py` point Hydra at this folder (`config_path="../drifting_vla/configs"`).
"""

import pathlib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
"""This folder: config.yaml, eval.yaml, serve.yaml and the groups model/ data/ training/ experiment/."""


def data_config(name: str) -> dict:
    """The data group's config `name` (e.g. `metaworld_multimodal`) as Hydra composes it for
    `scripts/train.py data=<name>`, its defaults applied: one definition for the scripts that
    need a data config without a training run (demo collection, expert checks)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    known = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
    if name not in known:
        raise ValueError(f"unknown data config {name!r}; valid: {known}")
    with initialize_config_dir(str(CONFIG_DIR / "data"), version_base=None):
        return OmegaConf.to_container(compose(name), resolve=True)
