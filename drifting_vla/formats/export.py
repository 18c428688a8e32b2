"""The saved policy: the files `save_pretrained` writes, every checkpoint step holds, and one
reader (`read_saved_policy`) serves to `from_pretrained`, `from_checkpoint`, evaluation, serving
and the hub.

    policy.save_pretrained("exports/drawer")                        # a directory, readable by a person
    policy.push_to_hub("me/drifting-drawer")                        # the same files, one commit
    DriftingPolicy.from_pretrained("me/drifting-drawer")            # or the directory, or a checkpoint step

Layout (huggingface_hub's ModelHubMixin conventions: config.json + model.safetensors + README.md):

    model.safetensors         the weights the policy runs (the EMA weights), frozen pretrained
                              encoders left out
    config.json               {"format", "format_version", "objective": {name, nfe, sampler, method},
                               "config": the run's resolved config}
    normalization.json        the action/proprio statistics (`Normalizer.to_dict`)
    pretrained_weights.json   the frozen pretrained encoders by source, revision and sha256
                              (formats/weights.py), when the model has any
    README.md                 the model card: evaluation table and the command that reproduces it
    complete                  written last: the size and sha256 of each file (formats/checkpoint.py),
                              checked on every load

A checkpoint step directory is this export plus the training state (training/checkpoint.py:
`training_model.safetensors`, the raw weights, and `training_state.pt`), all under one marker, so
a step directory is itself a policy `from_pretrained` loads.

The policy classes do not subclass `ModelHubMixin`: its `from_pretrained` passes config.json keys
that match constructor parameter names (`objective`, `device`, `execution`, ...) into the
constructor, so a downloaded file would choose arguments. Here config.json is read with `json`,
and the names in it only ever select something already registered (`check_untrusted_config`).

An export is copied, uploaded and downloaded, and a file damaged at the same size on the way (a bad
sector, a flipped bit) would load as weights nobody trained: it carries the sha256 of its files and
is refused, naming the file, when one differs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from drifting_vla.formats.checkpoint import (
    COMPLETE_MARKER,
    FORMAT_VERSION,
    is_step_dir,
    marker_problem,
    resolve_checkpoint,
)
from drifting_vla.formats.validation import validate_saved_config
from drifting_vla.formats.weights import (
    MODEL_FILE,
    REFERENCES_FILE,
    read_references,
    read_saved_file,
    write_references,
)

EXPORT_CONFIG_FILE = "config.json"
NORMALIZATION_FILE = "normalization.json"
MODEL_CARD_FILE = "README.md"
EXPORT_FORMAT = "drifting-vla-policy"
EXPORT_FILES = [MODEL_FILE, EXPORT_CONFIG_FILE, NORMALIZATION_FILE, REFERENCES_FILE, MODEL_CARD_FILE, COMPLETE_MARKER]


@dataclass
class SavedPolicy:
    """What an export (or a checkpoint step, which holds one) contains, read but not yet built
    into a model."""

    path: Path
    cfg: dict  # the run's resolved config
    normalization: dict
    references: dict[str, dict]  # frozen pretrained encoders not stored (read_references)
    weights: Path  # model.safetensors: the weights the policy runs
    nfe: int | None = None  # the recorded sampling; None: the objective's default
    sampler: str | None = None


def is_export(path: Path) -> bool:
    return (path / EXPORT_CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def read_saved_policy(path: str | os.PathLike) -> SavedPolicy:
    """An export directory, a checkpoint step directory, or the newest whole checkpoint of a run
    (its checkpoints/ folder or the run directory): the one reader of a saved policy."""
    path = Path(path).expanduser()
    if not is_export(path) or is_step_dir(path):  # a checkpoint's damage is reported as a checkpoint's
        path = resolve_checkpoint(path)
    file = path / EXPORT_CONFIG_FILE
    saved = read_export_config(path)
    cfg, objective = saved["config"], saved["objective"]
    check_untrusted_config(cfg, file)
    trained = cfg.get("training", {}).get("objective", "drifting")
    if not isinstance(objective, dict) or objective.get("name") != trained:
        raise ValueError(f"{file}: objective={objective!r} but config.training.objective={trained!r}; re-export the policy")
    return SavedPolicy(path, cfg, read_normalization(path), read_references(path), path / MODEL_FILE,
                       objective.get("nfe"), objective.get("sampler"))


def read_export_config(path: Path) -> dict:
    """config.json of the whole directory at `path`, after checking its format, its version and
    every file's hash; its "config" is not yet checked against the schema (`check_untrusted_config`)."""
    file = path / EXPORT_CONFIG_FILE
    saved = read_saved_file(file, lambda f: json.loads(f.read_text()))
    if not isinstance(saved, dict) or saved.get("format") != EXPORT_FORMAT or not {"config", "objective"} <= saved.keys():
        keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(
            f"{file} is not a Drifting-VLA policy (keys {keys}; expected format {EXPORT_FORMAT!r} with 'config' and "
            "'objective'): export one with DriftingPolicy.save_pretrained"
        )
    if type(saved.get("format_version")) is not int or saved["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version={saved.get('format_version')!r}, but this drifting-vla reads format_version "
            f"{FORMAT_VERSION} only: load it with the version that wrote it and save_pretrained it again"
        )
    problem = marker_problem(path)
    if problem is not None:
        raise FileNotFoundError(
            f"{path} is not whole: {problem}. Export it again (DriftingPolicy.save_pretrained), or download "
            "it again (DriftingPolicy.from_pretrained(repo_id, force_download=True), or `hf download REPO_ID "
            "--local-dir DIR --force-download`)"
        )
    return saved


def read_normalization(directory: Path) -> dict:
    """normalization.json: what `Normalizer.to_dict` wrote, {"stats", "action_spec"}."""

    def parse(file: Path) -> dict:
        data = json.loads(file.read_text())
        if not isinstance(data, dict) or not {"stats", "action_spec"} <= data.keys():
            raise ValueError(f"it holds {sorted(data) if isinstance(data, dict) else type(data).__name__}, "
                             "not 'stats' and 'action_spec'")
        return data

    return read_saved_file(directory / NORMALIZATION_FILE, parse)


def check_untrusted_config(cfg: dict, file: Path) -> None:
    """A checkpoint's or an export's config may only name registered things, and holds what a run's
    config holds. `${...}` strings would be resolved by OmegaConf (reading environment variables);
    a saved config is resolved, so none belongs in one, and they are refused before anything
    reads it. Every key is then checked for type and range like a run's (`validate_saved_config`):
    a string where a list belongs would otherwise be read as its characters. (Simulator names are
    checked where a policy is built: `drifting_vla.envs.check_saved_env_names`.)"""
    stack = [("", cfg)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{key}.{k}".lstrip("."), v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, str) and "${" in value:
            raise ValueError(f"{file}: {key}={value!r} is an interpolation; a saved config holds plain values only")
    try:
        validate_saved_config(cfg)
    except ValueError as error:
        raise ValueError(
            f"{file}: {error}. Another drifting-vla version wrote it, or it was edited: correct the key in the file "
            "and seal it (drifting_vla.formats.checkpoint.seal_checkpoint), or use another checkpoint."
        ) from None


# ----------------------------------------------------------------------------------------------
# Writing


def write_policy_files(
    directory: Path,
    *,
    cfg: Mapping,
    objective: Mapping,
    weights: Mapping[str, torch.Tensor],
    references: Mapping[str, dict],
    normalization: Mapping,
    card: str,
) -> list[str]:
    """The files of the layout above, except the marker, into `directory`; returns their names.
    `objective` is {name, nfe, sampler, method}, `weights` the full state to store (referenced
    encoders already split off, `formats.weights.split_referenced`)."""
    from safetensors.torch import save_file

    config = {"format": EXPORT_FORMAT, "format_version": FORMAT_VERSION, "objective": dict(objective), "config": dict(cfg)}
    (directory / EXPORT_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(directory / MODEL_FILE),
              metadata={"format": "pt"})
    (directory / REFERENCES_FILE).unlink(missing_ok=True)
    write_references(directory, references)
    (directory / NORMALIZATION_FILE).write_text(json.dumps(dict(normalization), indent=2, default=_json_default))
    (directory / MODEL_CARD_FILE).write_text(card)
    return [name for name in EXPORT_FILES if (directory / name).is_file()]


def _json_default(value):
    """Tensors and arrays in the normalization stats become nested lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"normalization stats hold a {type(value).__name__}, which is not JSON data")


# ----------------------------------------------------------------------------------------------
# The hub


def local_policy_dir(name_or_path: str | os.PathLike, **download_kwargs) -> Path:
    """A local directory as it is; a hub repo id downloaded (only the export's files) into the hub
    cache, or found there when offline. `download_kwargs` go to `huggingface_hub.snapshot_download`
    (revision, cache_dir, token, force_download, local_files_only)."""
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        raise FileNotFoundError(f"no policy at {name_or_path}: no such directory, and not a hub repo id") from None
    try:
        folder = Path(snapshot_download(str(name_or_path), allow_patterns=EXPORT_FILES, **download_kwargs))
    except LocalEntryNotFoundError as err:
        offline = " (HF_HUB_OFFLINE=1)" if is_offline_mode() else ""
        raise FileNotFoundError(
            f"{name_or_path!r} is not a directory here, and as a hub repo id it is not in the local hub cache"
            f"{offline}. Download it where the hub is reachable (`hf download {name_or_path} --local-dir DIR`) "
            "and pass DIR, or, for a local policy, check the path."
        ) from err
    if not is_export(folder):
        raise ValueError(f"the hub repo {name_or_path} holds no exported Drifting-VLA policy ({EXPORT_CONFIG_FILE} + {MODEL_FILE})")
    return folder
