"""A policy as a Hub repository: the files `save_pretrained` writes and `from_pretrained` reads.

    policy.save_pretrained("exports/drawer")                        # a directory, readable by a person
    policy.push_to_hub("me/drifting-drawer")                        # the same files, one commit
    DriftingPolicy.from_pretrained("me/drifting-drawer")            # or the directory, or a checkpoint

Layout (huggingface_hub's ModelHubMixin conventions: config.json + model.safetensors + README.md):

    model.safetensors         the weights the policy runs (the EMA weights), frozen pretrained
                              encoders left out
    config.json               {"format", "format_version", "objective": {name, nfe, sampler},
                               "config": the run's resolved config}
    normalization.json        the action/proprio statistics (`Normalizer.to_dict`)
    pretrained_weights.json   the frozen pretrained encoders by source, revision and sha256
                              (training/checkpoint.py), when the model has any
    README.md                 the model card: evaluation table and the command that reproduces it
    complete                  written last: the size and sha256 of each file above (the checkpoint's
                              marker, training/checkpoint.py), checked on every load

The policy classes do not subclass `ModelHubMixin`: its `from_pretrained` passes config.json keys
that match constructor parameter names (`objective`, `device`, `execution`, ...) into the
constructor, so a downloaded file would choose arguments. Here config.json is read with `json`, a
checkpoint's config.yaml with `yaml.safe_load`, and the names in either only ever select something
already registered (`check_untrusted_config`).

An export is copied, uploaded and downloaded, and a file damaged at the same size on the way (a bad
sector, a flipped bit) would load as weights nobody trained: like a checkpoint, it carries the
sha256 of its files and is refused, naming the file, when one differs. Nothing inside the
directory can switch that check off: a `complete` marker is always checked, whatever config.json
says; a file that steers loading but is not in the marker (a pretrained_weights.json added
later) is refused; and a `format_version` other than this reader's (older, newer, missing, not a
number) is refused, naming the file and the key, unless the caller passes
`trust_unverified_files=True`, which loads an older export whose files cannot be checked.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from drifting_vla.envs import ENVS, unregistered_env_message
from drifting_vla.specs import default_execute_steps
from drifting_vla.training.checkpoint import (
    COMPLETE_MARKER,
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    NORMALIZATION_FILE,
    REFERENCES_FILE,
    find_latest_valid_checkpoint,
    marker_problem,
    pretrained_sources,
    read_references,
    read_saved_file,
    resolve_checkpoint,
    split_referenced,
    write_complete_marker,
    write_references,
)
from drifting_vla.training.config import training_config, validate_saved_config

log = logging.getLogger(__name__)

EXPORT_CONFIG_FILE = "config.json"
MODEL_CARD_FILE = "README.md"
EXPORT_FORMAT = "drifting-vla-policy"
EXPORT_FORMAT_VERSION = 2
"""1: the files; 2 adds the `complete` marker with their sha256, which a version-2 export must have."""
EXPORT_FILES = [MODEL_FILE, EXPORT_CONFIG_FILE, NORMALIZATION_FILE, REFERENCES_FILE, MODEL_CARD_FILE, COMPLETE_MARKER]
REPRODUCE_KEYS = ("tasks", "episodes", "seed", "execution", "execute_steps", "ensemble_decay", "max_episode_steps")
"""Evaluation settings a reproduce command repeats; simulate_eval's summary (`eval`) and the
trainer's `training.eval` share these names."""


@dataclass
class SavedPolicy:
    """What a checkpoint or an export directory holds, read but not yet built into a model."""

    path: Path
    cfg: dict  # the run's resolved config
    normalization: dict
    references: dict[str, dict]  # frozen pretrained encoders not stored (read_references)
    weights: list[Path]  # safetensors files, each laid over the one before (model, then EMA)
    nfe: int | None = None  # an export's sampling; None: the objective's default
    sampler: str | None = None


def is_export(path: Path) -> bool:
    return (path / EXPORT_CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def read_saved_policy(path: str | os.PathLike, trust_unverified_files: bool = False) -> SavedPolicy:
    """An export directory, a checkpoint directory, or the newest whole checkpoint of a run.
    `trust_unverified_files`: load an export of another format_version, whose files cannot be
    checked against the hashes they were written with (module docstring)."""
    path = Path(path).expanduser()
    if is_export(path):
        file = path / EXPORT_CONFIG_FILE
        saved = read_saved_file(file, lambda f: json.loads(f.read_text()))
        if not isinstance(saved, dict) or saved.get("format") != EXPORT_FORMAT or not {"config", "objective"} <= saved.keys():
            found = f"format {saved.get('format')!r}, keys {sorted(saved)}" if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(
                f"{file} is not a Drifting-VLA policy ({found}; expected "
                f"format {EXPORT_FORMAT!r} with 'config' and 'objective'): export one with DriftingPolicy.save_pretrained"
            )
        _check_format_version(file, saved.get("format_version"), trust_unverified_files)
        _check_export_files(path, marker_required=saved.get("format_version") == EXPORT_FORMAT_VERSION)
        cfg, objective = saved["config"], saved["objective"]
        check_untrusted_config(cfg, file)
        trained = cfg.get("training", {}).get("objective", "drifting")
        if objective.get("name") != trained:
            raise ValueError(f"{file}: objective.name={objective.get('name')!r} but config.training.objective={trained!r}; re-export the policy")
        return SavedPolicy(path, cfg, _read_normalization(path), read_references(path),
                           [path / MODEL_FILE], objective.get("nfe"), objective.get("sampler"))
    path = resolve_checkpoint(path)
    cfg = read_saved_file(path / CONFIG_FILE, lambda f: yaml.safe_load(f.read_text()))
    check_untrusted_config(cfg, path / CONFIG_FILE)
    return SavedPolicy(path, cfg, _read_normalization(path), read_references(path), [path / MODEL_FILE, path / EMA_FILE])


def _check_format_version(file: Path, version, trust_unverified_files: bool) -> None:
    """config.json's `format_version` is this reader's, or the caller accepted unverified files."""
    if version == EXPORT_FORMAT_VERSION and type(version) is int:
        return
    if type(version) is not int:
        shown = "is missing" if version is None else f"is {version!r}, not a version number"
        raise ValueError(f"{file}: key 'format_version' {shown}; this drifting-vla writes and reads "
                         f"{EXPORT_FORMAT_VERSION}. The file was edited or damaged: get the export again")
    if version > EXPORT_FORMAT_VERSION:
        raise ValueError(f"{file}: key 'format_version' is {version}; this drifting-vla reads "
                         f"{EXPORT_FORMAT_VERSION}: upgrade drifting-vla")
    if not trust_unverified_files:
        raise ValueError(
            f"{file}: key 'format_version' is {version}, older than this reader's {EXPORT_FORMAT_VERSION}: its files "
            "cannot all be checked against the hashes they were written with, so anyone who could edit them could "
            "change what the policy does. Export it again with this drifting-vla (save_pretrained), or, if you trust "
            "where it came from, load it with trust_unverified_files=True"
        )
    log.warning("%s: format_version %d loaded with trust_unverified_files=True: files without a recorded hash are "
                "not checked", file, version)


def _check_export_files(path: Path, marker_required: bool) -> None:
    """Every file of the export at `path` holds what was saved (its sha256 in the marker). A
    marker, when there is one, is always checked; only an older export loaded on trust
    (`marker_required` False) may lack it."""
    if not marker_required and not (path / COMPLETE_MARKER).is_file():
        return
    problem = marker_problem(path)
    if problem is not None:
        raise FileNotFoundError(
            f"export {path} is not whole: {problem}. Export it again (DriftingPolicy.save_pretrained), or download "
            "it again (DriftingPolicy.from_pretrained(repo_id, force_download=True), or `hf download REPO_ID "
            "--local-dir DIR --force-download`)"
        )


def _read_normalization(directory: Path) -> dict:
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
    a string where a list belongs would otherwise be read as its characters. A simulator name of
    the `module:Class` form is refused unless the user registered it under that very name: an env
    name is never imported (`drifting_vla.envs`), and a run of an earlier version that named one
    says how to register it."""
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
            "and seal it (drifting_vla.training.checkpoint.seal_checkpoint), or use another checkpoint."
        ) from None
    data = cfg["data"]
    simulator = data.get("simulator")
    names = [data.get("name"), simulator.get("name") if isinstance(simulator, dict) else None]
    for name in names:
        if name is not None and ":" in str(name) and str(name) not in ENVS:
            raise ValueError(f"{file}: {unregistered_env_message(str(name), cfg.get('plugins'))}")


# ----------------------------------------------------------------------------------------------
# Writing


def write_export(policy, directory: Path, repo_id: str | None, evaluation: str | os.PathLike | None) -> Path:
    """Every file of the layout above into `directory` (created; existing files replaced)."""
    from safetensors.torch import save_file

    if policy.cfg is None:
        raise ValueError(
            "save_pretrained needs the run's resolved config to rebuild the network: load the policy with "
            "DriftingPolicy.from_checkpoint / from_pretrained, or pass cfg= when constructing it"
        )
    directory.mkdir(parents=True, exist_ok=True)
    # Over an earlier export: its marker goes first and config.json (which says a marker must be
    # there) comes next, so a save cut short is refused as unfinished, never read as half old, half new.
    (directory / COMPLETE_MARKER).unlink(missing_ok=True)
    config = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "objective": {"name": policy.objective.name, "nfe": policy.nfe, "sampler": policy.sampler, "method": policy.method},
        "config": policy.cfg,
    }
    (directory / EXPORT_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    weights = {k: v.detach().cpu().contiguous() for k, v in policy.model.state_dict().items()}
    stored, references = split_referenced(weights, pretrained_sources(policy.model))
    save_file(stored, str(directory / MODEL_FILE), metadata={"format": "pt"})
    (directory / REFERENCES_FILE).unlink(missing_ok=True)
    write_references(directory, references)
    (directory / NORMALIZATION_FILE).write_text(json.dumps(policy.normalizer.to_dict(), indent=2))
    summary = _evaluation_summary(policy, evaluation)
    target = repo_id or str(directory)
    (directory / MODEL_CARD_FILE).write_text(model_card(policy, target, references, summary))
    write_complete_marker(directory, [name for name in EXPORT_FILES if (directory / name).is_file()])
    return directory


def _evaluation_summary(policy, evaluation: str | os.PathLike | None) -> dict | None:
    """The summary.json given, else the run's own final evaluation when it evaluated the very
    checkpoint the policy was loaded from (the trainer saves, then evaluates, the last step)."""
    if evaluation is not None:
        return json.loads(Path(evaluation).read_text())
    checkpoint = getattr(policy, "checkpoint", None)
    if checkpoint is None or is_export(Path(checkpoint)):
        return None
    checkpoint = Path(checkpoint)
    summary_file = checkpoint.parent.parent / "summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    step = json.loads((checkpoint / COMPLETE_MARKER).read_text())["step"]
    evaluated_here = summary["step"] == step if "step" in summary else find_latest_valid_checkpoint(checkpoint.parent) == checkpoint
    return summary if evaluated_here else None


def reproduce_command(policy, target: str, summary: dict) -> str:
    """`python scripts/simulate_eval.py checkpoint=<target> ...` with the evaluation's settings; nfe
    and sampler always spelled out, since the export's default sampling may differ, and so is the
    execution horizon, since a default may change after the card is written."""
    settings = dict(summary.get("eval") or training_config(policy.cfg.get("training", {})).eval)
    if settings.get("execute_steps") is None:
        settings["execute_steps"] = default_execute_steps(policy.horizon)
    nfe, sampler = policy.objective.resolve(settings.get("nfe"), settings.get("sampler"))
    args = [f"checkpoint={target}"]
    for key in REPRODUCE_KEYS:
        value = settings.get(key)
        if value is None or (key == "ensemble_decay" and settings.get("execution") != "ensemble"):
            continue
        args.append(f"{key}=[{','.join(map(str, value))}]" if isinstance(value, list) else f"{key}={value}")
    args.append(f"nfe={nfe}")
    if sampler is not None:
        args.append(f"sampler={sampler}")
    return "python scripts/simulate_eval.py " + " ".join(args)


def model_card(policy, target: str, references: dict[str, dict], summary: dict | None) -> str:
    """README.md: what the policy is, how it scored and how to score it again, what it needs."""
    cfg = policy.cfg
    data, model = cfg["data"], cfg["model"]
    lines = [
        "---",
        "library_name: drifting-vla",
        f"tags: [robotics, drifting-vla, {policy.objective.name}, {data['name']}]",
        "---",
        "",
        f"# {target}",
        "",
        f"A Drifting-VLA policy (`{model.get('name', '?')}`) trained with the `{policy.objective.name}` "
        f"objective; it samples with `{policy.method}`. Observations: {len(data['cameras'])} camera(s) "
        f"({', '.join(data['cameras'])}), proprio of {data['proprio_dim']} dims, an instruction"
        f"{_history_note(policy.n_obs_steps)}; "
        f"actions: chunks of {data['horizon']} x [{', '.join(policy.action_spec.names)}] on `{data['name']}`.",
        "",
        "## Evaluation",
        "",
    ]
    if summary is None:
        lines.append("Not evaluated.")
    else:
        lines += [
            f"Protocol: `{summary.get('protocol')}`, {summary['episodes']} episodes on evaluation seeds.",
            "",
            "| task | success | 95% CI | episodes |",
            "|---|---|---|---|",
        ]
        for task, rate in summary["per_task"].items():
            lo, hi = summary["per_task_ci95"][task]
            lines.append(f"| {task} | {rate:.3f} | [{lo:.2f}, {hi:.2f}] | {summary['per_task_episodes'][task]} |")
        lo, hi = summary["ci95"]
        lines += [
            f"| **overall** | **{summary['success_rate']:.3f}** | [{lo:.2f}, {hi:.2f}] | {summary['episodes']} |",
            "",
            "Reproduce:",
            "",
            "```bash",
            reproduce_command(policy, target, summary),
            "```",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from drifting_vla.inference.policy import DriftingPolicy",
        "",
        f'policy = DriftingPolicy.from_pretrained("{target}")',
        "chunk = policy.predict_action_chunk(obs)   # [B, T, A] in raw action units",
        "action = policy.select_action(obs)         # closed loop, one call per control step; reset() per episode",
        "```",
    ]
    if references:
        lines += [
            "",
            "## Frozen encoders (not in this repository)",
            "",
            "Loading builds them from their source (the hub or its cache, a local directory, an installed "
            "package) and refuses weights whose sha256 differs.",
            "",
            "| weights | config | source | revision | parameters | sha256 |",
            "|---|---|---|---|---|---|",
        ]
        for prefix, ref in references.items():
            lines.append(
                f"| `{prefix}` | `{ref['config_key']}` | {ref['source']} | {ref.get('revision') or '-'} | "
                f"{ref['parameters']:,} | `{ref['sha256'][:16]}...` |"
            )
    return "\n".join(lines) + "\n"


def _history_note(n_obs_steps: int) -> str:
    if n_obs_steps == 1:
        return ""
    return (f", each for the last {n_obs_steps} control steps (`select_action` keeps them; "
            "`predict_action_chunk` takes them stacked, oldest first)")


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


def upload_export(policy, repo_id: str, *, token, private, commit_message, branch, create_pr, evaluation) -> str:
    """create_repo (if missing), save_pretrained into a temporary directory, upload_folder: one
    commit. Fails at once when offline."""
    import tempfile

    from huggingface_hub import HfApi, is_offline_mode

    if is_offline_mode():
        raise RuntimeError(
            f"push_to_hub({repo_id!r}) needs the hub, but HF_HUB_OFFLINE=1 is set: unset it where the hub is "
            f"reachable, or save_pretrained(DIR) now and upload later with `hf upload {repo_id} DIR`"
        )
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_export(policy, Path(tmp) / "policy", repo_id, evaluation)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=branch, create_pr=create_pr
        )
    return str(getattr(commit, "commit_url", commit))
