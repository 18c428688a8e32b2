"""Tiny datasets in the exact on-disk layouts, for tests and examples (no simulator needed).

`write_rlbench_fixture` writes PerAct-format episodes whose pickles name the real RLBench classes
(`rlbench.demo.Demo`, `rlbench.backend.observation.Observation`), as the downloaded data does.
"""

from __future__ import annotations

import contextlib
import pathlib
import pickle
import sys
import types

import numpy as np
from PIL import Image

from drifting_vla.data.transforms import canonical_quaternion

_RLBENCH_CLASSES = {"rlbench.demo": "Demo", "rlbench.backend.observation": "Observation"}


@contextlib.contextmanager
def _fake_rlbench_modules():
    """Make `rlbench.demo.Demo` / `rlbench.backend.observation.Observation` importable while
    pickling (pickle checks that the named class exists), then remove every trace."""
    names = ["rlbench", "rlbench.backend", *_RLBENCH_CLASSES]
    saved = {n: sys.modules.get(n) for n in names}
    classes = {}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    for module, cls_name in _RLBENCH_CLASSES.items():
        cls = type(cls_name, (), {"__module__": module})
        setattr(sys.modules[module], cls_name, cls)
        classes[cls_name] = cls
    try:
        yield classes
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def write_rlbench_fixture(
    root: str | pathlib.Path,
    tasks: tuple[str, ...] = ("close_jar",),
    episodes: int = 2,
    steps: int = 10,
    cameras: tuple[str, ...] = ("front", "wrist"),
    image_size: int = 16,
    seed: int = 0,
    records_ignore_collisions: bool = True,
) -> pathlib.Path:
    """Write `episodes` episodes of `steps` steps per task under `root/<task>/all_variations/...`.

    The gripper closes halfway and the arm moves smoothly, so dense and keyframe targets differ.
    Observations carry `ignore_collisions` (1.0 at every 4th step) as PerAct's fork of RLBench
    records it, unless `records_ignore_collisions` is false (upstream RLBench's observations).
    Returns `root`.
    """
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    with _fake_rlbench_modules() as classes:
        for task in tasks:
            for n in range(episodes):
                ep = root / task / "all_variations" / "episodes" / f"episode{n}"
                ep.mkdir(parents=True, exist_ok=True)
                observations = [_observation(classes["Observation"], rng, t, steps, cameras) for t in range(steps)]
                if records_ignore_collisions:
                    for t, obs in enumerate(observations):
                        obs.ignore_collisions = np.array(1.0 if t % 4 == 0 else 0.0)
                demo = classes["Demo"]()
                demo._observations, demo.random_seed, demo.num_reset_attempts = observations, n, 0
                _dump(ep / "low_dim_obs.pkl", demo)
                phrase = task.replace("_", " ")
                _dump(ep / "variation_descriptions.pkl", [phrase, f"please {phrase}", f"{phrase} now"])
                _dump(ep / "variation_number.pkl", n % 2)
                for cam in cameras:
                    for kind in ("rgb", "depth"):
                        (ep / f"{cam}_{kind}").mkdir(exist_ok=True)
                    for t in range(steps):
                        rgb = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
                        Image.fromarray(rgb).save(ep / f"{cam}_rgb" / f"{t}.png")
                        Image.fromarray(pack_depth(np.full((image_size, image_size), 0.5))).save(ep / f"{cam}_depth" / f"{t}.png")
    return root


def pack_depth(v: np.ndarray) -> np.ndarray:
    """Normalized depth in [0, 1] -> 24-bit RGB uint8 [H, W, 3] (RLBench's encoding)."""
    q = np.round(np.clip(v, 0, 1) * (2**24 - 1)).astype(np.int64)
    return np.stack([(q >> 16) & 255, (q >> 8) & 255, q & 255], -1).astype(np.uint8)


def _observation(cls, rng, t: int, steps: int, cameras) -> object:
    obs = cls()
    quat = canonical_quaternion(rng.normal(size=4))
    if t % 2:  # store some with qw < 0: the loader must canonicalize
        quat = -quat
    moving = t not in (steps // 2 - 1, steps - 3)
    obs.__dict__.update(
        gripper_pose=np.concatenate([[0.1 * t, 0.0, 1.0], quat]).astype(np.float64),
        gripper_open=1.0 if t < steps // 2 else 0.0,
        joint_positions=rng.normal(size=7),
        joint_velocities=np.full(7, 0.5 if moving else 0.0),
        misc={
            **{f"{c}_camera_near": 0.01 for c in cameras},
            **{f"{c}_camera_far": 4.51 for c in cameras},
            **{f"{c}_camera_extrinsics": np.eye(4) for c in cameras},
        },
        **{f"{c}_{k}": None for c in cameras for k in ("rgb", "depth", "mask", "point_cloud")},
    )
    return obs


def _dump(path: pathlib.Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
