"""The Hydra configs, shipped inside the package so an installed copy can compose them:

    from hydra import compose, initialize_config_module
    with initialize_config_module("drifting_vla.configs", version_base=None):
        cfg = compose("config", overrides=["model=tiny"])

`scripts/*.py` point Hydra at this folder (`config_path="../drifting_vla/configs"`).
"""

import pathlib

CONFIG_DIR = pathlib.Path(__file__).resolve().parent
"""This folder: config.yaml, eval.yaml, serve.yaml and the groups model/ data/ training/ experiment/."""
