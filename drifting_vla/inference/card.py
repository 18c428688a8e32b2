"""What a saved policy says about itself, and how it reaches the hub: the model card (README.md:
what the policy is, how it scored, the command that scores it again) and `save_pretrained` /
`push_to_hub` composed from the file layout of formats/export.py."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from drifting_vla.formats.checkpoint import COMPLETE_MARKER, step_of, write_complete_marker
from drifting_vla.formats.export import write_policy_files
from drifting_vla.formats.validation import training_config
from drifting_vla.formats.weights import pretrained_sources, split_referenced
from drifting_vla.objectives import Objective
from drifting_vla.specs import ActionSpec, default_execute_steps

REPRODUCE_KEYS = ("tasks", "episodes", "seed", "execution", "execute_steps", "ensemble_decay", "max_episode_steps")
"""Evaluation settings a reproduce command repeats; simulate_eval's summary (`eval`) and the
trainer's `training.eval` share these names."""


@dataclass
class CardSubject:
    """What a card describes: a run's resolved config and the objective it samples with. A
    `DriftingPolicy` is one; a checkpoint being written builds one from its config."""

    cfg: dict
    objective: Objective
    nfe: int
    sampler: str | None

    @classmethod
    def of(cls, cfg: dict, objective: Objective, nfe: int | None = None, sampler: str | None = None) -> CardSubject:
        return cls(cfg, objective, *objective.resolve(nfe, sampler))

    @property
    def method(self) -> str:
        return self.objective.label(self.nfe, self.sampler)

    @property
    def horizon(self) -> int:
        return int(self.cfg["data"]["horizon"])

    @property
    def n_obs_steps(self) -> int:
        return int(self.cfg["data"].get("n_obs_steps", 1))

    @property
    def action_spec(self) -> ActionSpec:
        return ActionSpec.from_config(self.cfg["data"]["action_spec"])


def objective_record(policy: CardSubject) -> dict:
    """config.json's "objective": the name the weights were trained with and how they sample."""
    return {"name": policy.objective.name, "nfe": policy.nfe, "sampler": policy.sampler, "method": policy.method}


def export_description(cfg: dict, objective: Objective, target: str, nfe: int | None = None,
                       sampler: str | None = None) -> dict:
    """`save_checkpoint`'s `objective` and `card` for a step of the run `cfg` trained with
    `objective`: how the saved policy samples, and its card (not yet evaluated) once the frozen
    encoders it references are known."""
    subject = CardSubject.of(cfg, objective, nfe, sampler)
    return {"objective": objective_record(subject),
            "card": lambda references: model_card(subject, target, references, None)}


def save_policy(policy, directory: Path, repo_id: str | None, evaluation: str | os.PathLike | None) -> Path:
    """`DriftingPolicy.save_pretrained`: the export of `policy` into `directory` (created; an
    earlier export there replaced)."""
    if policy.cfg is None:
        raise ValueError(
            "save_pretrained needs the run's resolved config to rebuild the network: load the policy with "
            "DriftingPolicy.from_checkpoint / from_pretrained, or pass cfg= when constructing it"
        )
    directory.mkdir(parents=True, exist_ok=True)
    # Over an earlier export: its marker goes first, so a save cut short is refused as unfinished,
    # never read as half old, half new.
    (directory / COMPLETE_MARKER).unlink(missing_ok=True)
    stored, references = split_referenced(policy.model.state_dict(), pretrained_sources(policy.model))
    card = model_card(policy, repo_id or str(directory), references, _evaluation_summary(policy, evaluation))
    names = write_policy_files(directory, cfg=policy.cfg, objective=objective_record(policy), weights=stored,
                               references=references, normalization=policy.normalizer.to_dict(), card=card)
    write_complete_marker(directory, names)
    return directory


def _evaluation_summary(policy, evaluation: str | os.PathLike | None) -> dict | None:
    """The summary.json given, else the run's own final evaluation when it evaluated the very
    checkpoint step the policy was loaded from (the trainer saves, then evaluates, the last step)."""
    if evaluation is not None:
        return json.loads(Path(evaluation).read_text())
    checkpoint = getattr(policy, "checkpoint", None)
    if checkpoint is None or "step" not in json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text()):
        return None
    summary_file = Path(checkpoint).parent.parent / "summary.json"
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    return summary if summary.get("step") == step_of(checkpoint) else None


def reproduce_command(policy: CardSubject, target: str, summary: dict) -> str:
    """`drifting-eval checkpoint=<target> ...` with the evaluation's settings; nfe
    and sampler always spelled out, since the export's default sampling may differ, and so is the
    execution horizon, since a default may change after the card is written."""
    settings = dict(summary.get("eval") or asdict(training_config(policy.cfg.get("training", {})).eval))
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
    return "drifting-eval " + " ".join(args)


def model_card(policy: CardSubject, target: str, references: dict[str, dict], summary: dict | None) -> str:
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
        "from drifting_vla import DriftingPolicy",
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
        folder = save_policy(policy, Path(tmp) / "policy", repo_id, evaluation)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=branch, create_pr=create_pr
        )
    return str(getattr(commit, "commit_url", commit))
