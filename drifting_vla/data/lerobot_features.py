"""The data keys a LeRobot v3.0 dataset already answers: `data=lerobot data.root=DIR` (or
`data.repo_id=...`) needs no other key, because meta/info.json says what they would be.

    keys = data_keys(cfg.data, info["features"], info_path, export, export_path)
    # {"cameras": [...], "proprio_dim": S, "action_spec": {"components": [...]}}

A key left unset (null) is read from the dataset:

    cameras      every feature of dtype video or image, in meta/info.json's order
    proprio_dim  the size of the state feature (`data.state_key`, observation.state by default)
    action_spec  the layout meta/drifting_vla.json records (our own exports, see lerobot_writer.py),
                 else one `raw` component named "action" of the action feature's size: min/max
                 scaled to [-1, 1], predicted by a linear head. A quaternion or a binary gripper is
                 only treated as one where a layout says so; the raw layout assumes nothing.

A key that is set wins and is checked against meta/info.json: a camera the dataset lacks or that
is no image, a size other than the feature's, is an error naming the key, the feature and the file.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

from drifting_vla.specs import ActionComponent, ActionSpec

IMAGE_DTYPES = ("video", "image")
RAW_ACTION = "action"
"""The component name of the default (raw) action layout."""


def image_features(features: Mapping) -> list[str]:
    """The keys of every video and image feature, in meta/info.json's order."""
    return [key for key, feature in features.items() if feature.get("dtype") in IMAGE_DTYPES]


def resolve_cameras(cameras, features: Mapping, info_path: pathlib.Path) -> list[str]:
    """`cameras` (data.cameras) checked to name image or video features; None: all of them."""
    images = image_features(features)
    if cameras is None:
        if not images:
            raise ValueError(f"{info_path} declares no video or image feature (features: {sorted(features)}); "
                             "this policy needs at least one camera")
        return images
    cameras = [str(c) for c in cameras]
    missing = [key for key in cameras if key not in features]
    if missing:
        raise KeyError(f"data.cameras names feature(s) {missing} that are not in {info_path}; its image and video "
                       f"features are {images} (leave data.cameras unset for all of them); it has {sorted(features)}")
    not_images = [key for key in cameras if key not in images]
    if not_images or not cameras:
        raise ValueError(f"data.cameras must name image or video features of {info_path}; got {not_images or cameras}, "
                         f"the dataset's are {images} (leave data.cameras unset for all of them)")
    return cameras


def feature_size(features: Mapping, key: str, key_config: str, info_path: pathlib.Path) -> int:
    """N of the vector feature `key`, whose shape must be [N] (`key_config` names the data key
    that chose it, for the error)."""
    if key not in features:
        raise KeyError(f"feature {key!r} ({key_config}) is not in {info_path}; it has {sorted(features)}")
    feature = features[key]
    shape = list(feature.get("shape") or [])
    if len(shape) != 1 or feature.get("dtype") in (*IMAGE_DTYPES, "string"):
        raise ValueError(f"feature {key!r} ({key_config}) in {info_path} is {feature.get('dtype')} of shape {shape}, "
                         f"not a vector [N]; name a vector feature with {key_config}")
    return int(shape[0])


def check_size(given, config_key: str, feature: str, size: int, key_config: str, info_path: pathlib.Path) -> int:
    """The size `given` in the data config (`config_key`), which must be the feature's `size`;
    None: `size`."""
    if given is None:
        return size
    if int(given) != size:
        raise ValueError(
            f"{config_key} gives {given} values but feature {feature!r} has shape [{size}] in {info_path}; "
            f"make {config_key} match ({size} values), leave it unset (null) to read it from the dataset, "
            f"or name another feature with {key_config}"
        )
    return size


def resolve_action_spec(given, export: Mapping, export_path: pathlib.Path, action_key: str, size: int,
                        info_path: pathlib.Path) -> ActionSpec:
    """data.action_spec when given (its components must sum to the action feature's `size`), else
    the layout the export metadata records, else one raw component of `size`."""
    if given is not None:
        spec = ActionSpec.from_config(given)
        if spec.dim != size:
            raise ValueError(
                f"data.action_spec gives {spec.dim} values ({', '.join(f'{c.name}: {c.dim}' for c in spec.components)}) "
                f"but feature {action_key!r} has shape [{size}] in {info_path}; make its components sum to {size}, "
                f"leave data.action_spec unset (null) to read it from the dataset, or name another feature with data.action_key"
            )
        return spec
    recorded = export.get("action_spec")
    if recorded is None:
        return ActionSpec((ActionComponent(RAW_ACTION, "raw", size),))
    try:
        spec = ActionSpec.from_config(recorded)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{export_path}: action_spec {recorded!r} is not an action layout ({e}); "
                         "export the dataset again or set data.action_spec") from e
    if spec.dim != size:
        raise ValueError(f"{export_path} records an action_spec of {spec.dim} values but feature {action_key!r} has "
                         f"shape [{size}] in {info_path}; export the dataset again or set data.action_spec")
    return spec


def data_keys(cfg: Mapping, features: Mapping, info_path: pathlib.Path, export: Mapping, export_path: pathlib.Path) -> dict:
    """{"cameras", "proprio_dim", "action_spec"} of the data config `cfg` (data=lerobot), each
    the given value checked against the dataset or, when null, read from it. `features` are
    those of `info_path` (meta/info.json), `export` the content of `export_path`
    (meta/drifting_vla.json; {} when the dataset has none)."""
    state_key, action_key = str(cfg.get("state_key") or "observation.state"), str(cfg.get("action_key") or "action")
    state_size = feature_size(features, state_key, "data.state_key", info_path)
    action_size = feature_size(features, action_key, "data.action_key", info_path)
    return {
        "cameras": resolve_cameras(cfg.get("cameras"), features, info_path),
        "proprio_dim": check_size(cfg.get("proprio_dim"), "data.proprio_dim", state_key, state_size, "data.state_key", info_path),
        "action_spec": resolve_action_spec(cfg.get("action_spec"), export, export_path, action_key, action_size, info_path).to_config(),
    }
