"""Checking a config when a program starts, so that a wrong type, an out-of-range number or an
unknown key is an error naming the key before any data is read, not a failure hours later.

    validate_run_config(cfg)        # drifting-train's config: seed, device, plugins, data.*, model.*, training.*
    validate_saved_config(cfg)      # a checkpoint's or an export's: the same groups, without the run-start checks
    training_config(cfg.training)   # -> TrainingConfig: training.* over its defaults, what the trainer reads
    validate_eval_config(cfg)       # -> EvalScriptConfig: drifting-eval's keys (configs/eval.yaml)
    validate_serve_config(cfg)      # -> ServeScriptConfig: drifting-serve's keys (configs/serve.yaml)

Each group is checked against its schema (formats/config.py) by the one walk that enforces every
field's rule (formats/settings.py): `data.*` against its dataset's by `data.name`, `model.vision`
and `model.language` against their encoder's by name, a name with no registered schema on the keys
all of them share. What no single field can say is checked here: settings that must agree across
groups (the evaluation's execution steps against the horizon), the keys a resumed run may not
change, and keys of earlier configs that now have another name.
"""

from __future__ import annotations

from dataclasses import MISSING

from omegaconf import DictConfig, OmegaConf

from drifting_vla.formats.config import (
    DATA_SCHEMAS,
    LANGUAGE_SCHEMAS,
    VISION_SCHEMAS,
    DataConfig,
    EncoderConfig,
    EvalScriptConfig,
    ExportOnnxScriptConfig,
    ModelConfig,
    RunConfig,
    ServeScriptConfig,
    TrainingConfig,
)
from drifting_vla.formats.settings import check_section, join_key, over_defaults, plain, typed_section


def validate_run_config(cfg) -> None:
    """Every group of a training run's config (scripts/train.py, `Trainer`), checked before the
    run reads any data: types, ranges, choices, and the settings that must agree across groups."""
    data, training = _checked_groups(cfg)
    data_name = data.name
    evaluates = training.eval.at_end or training.eval.every > 0
    if evaluates and training.eval.execute_steps is not None and training.eval.execute_steps > data.horizon:
        raise ValueError(
            f"config key training.eval.execute_steps={training.eval.execute_steps} must be in [1, data.horizon={data.horizon}] "
            "(the actions of one chunk)"
        )
    if data_name == "rlbench" and data.keyframes and data.n_obs_steps > 1:
        raise ValueError(
            f"config key data.n_obs_steps={data.n_obs_steps} needs data.keyframes=false: a keyframe policy observes only "
            "on arriving at each keyframe, never at the dense steps a history would hold"
        )
    # A shift with the feature cache is refused here, before any data is read.
    check_random_shift(training.augmentation.random_shift, feature_cache=training.feature_cache)


def validate_saved_config(cfg) -> None:
    """The config a checkpoint or an export holds, group by group: types, ranges, choices. The
    checks between groups are the training run's (its evaluation's settings against the horizon,
    say), not the policy's."""
    _checked_groups(cfg)


def _checked_groups(cfg) -> tuple[DictConfig, DictConfig]:
    """(data, training) of a run's config, after checking each group against its schema."""
    run = check_section("", RunConfig, cfg)
    _refuse_renamed_keys(run)
    data_name = str(OmegaConf.select(run, "data.name", default=""))
    data = check_section("data", DATA_SCHEMAS.get(data_name, DataConfig), run.data, open_keys=data_name not in DATA_SCHEMAS)
    model = check_section("model", ModelConfig, run.model)
    if model.dit.hidden_size % model.dit.num_heads:  # each attention head takes an equal share of the width
        raise ValueError(f"config key model.dit.num_heads={model.dit.num_heads} must divide "
                         f"model.dit.hidden_size={model.dit.hidden_size}")
    for part, schemas in (("vision", VISION_SCHEMAS), ("language", LANGUAGE_SCHEMAS)):
        name = str(OmegaConf.select(model, f"{part}.name", default=""))
        check_section(f"model.{part}", schemas.get(name, EncoderConfig), model[part], open_keys=name not in schemas)
    return data, training_config(run.training)


def check_random_shift(setting: int, feature_cache: bool) -> None:
    """A shift with the feature cache is an error: the cached features were computed once from the
    unaugmented images, so shifted images would never reach the model."""
    if setting > 0 and feature_cache:
        raise ValueError(
            f"training.augmentation.random_shift={setting} with training.feature_cache=true: the cache holds "
            "backbone features computed once from the unaugmented images, so shifted images would never reach "
            "the model. Set training.augmentation.random_shift=0 to train on the cache, or "
            "training.feature_cache=false to augment."
        )


def training_config(training) -> TrainingConfig:
    """`training.*` merged over the schema's defaults, typed: what the trainer reads and how a saved
    policy builds its objective. Raises ValueError naming an unknown, mistyped or out-of-range key."""
    return typed_section("training", TrainingConfig, OmegaConf.create(plain(training)))


def validate_training_config(training) -> None:
    """Raise ValueError naming the `training.<key>` that is unknown, mistyped or out of range."""
    training_config(training)


def with_data_defaults(data):
    """`data.*` over its dataset's schema defaults, so that a dataset builder reads every key the
    schema declares without a fallback of its own; a dataset registered without a schema gets its
    config as it is. Required keys are not checked here (a run checks them when it starts)."""
    schema = DATA_SCHEMAS.get(str(data["name"]))
    if schema is None:
        return data
    return over_defaults("data", schema, plain(data))


def validate_eval_config(cfg) -> EvalScriptConfig:
    """The evaluation script's keys (configs/eval.yaml), typed."""
    config = typed_section("", EvalScriptConfig, cfg)
    seeds = config.seeds
    if (seeds.start is None) != (seeds.count is None):
        given, missing = ("seeds.start", "seeds.count") if seeds.count is None else ("seeds.count", "seeds.start")
        raise ValueError(f"config key {given} is set without {missing}: give both (the seeds seeds.start .. "
                         "seeds.start + seeds.count - 1), or neither for the checkpoint's data.eval_seeds")
    return config


def validate_serve_config(cfg) -> ServeScriptConfig:
    """The serve script's keys (configs/serve.yaml), typed: the server reads it as its `ServerConfig`."""
    return typed_section("", ServeScriptConfig, cfg)


def validate_export_onnx_config(cfg) -> ExportOnnxScriptConfig:
    """The ONNX export script's keys (configs/export_onnx.yaml), typed."""
    return typed_section("", ExportOnnxScriptConfig, cfg)


RESUME_MAY_CHANGE = (
    "run_dir", "device", "plugins",
    "data.root", "data.repo_id", "data.revision", "data.cache_dir", "data.num_workers", "data.collect_workers",
    "data.skip_corrupt", "data.eval_seeds", "data.simulator",
    "training.resume", "training.max_steps", "training.log_every", "training.val_every", "training.val_batches",
    "training.checkpoint_every", "training.keep_checkpoints", "training.num_threads", "training.compile",
    "training.nan_policy", "training.max_skipped_fraction", "training.distributed", "training.eval", "training.wandb",
)
"""What a resumed run may set otherwise than its checkpoint: where the data comes from and how fast
it is read, how long to train, what is logged, saved and evaluated. Every other key shapes what is
trained, and a resume that changed it would train a mix of two runs under the second one's config,
or not even that: the learning rate, betas and weight decay come back with the optimizer's state,
so a new value would be recorded in config.yaml and never used."""


def resume_conflicts(saved, current) -> list[str]:
    """`key: saved -> current` for each setting both configs hold whose values differ, outside
    `RESUME_MAY_CHANGE` (a key one of them lacks, from another drifting-vla version, is not compared)."""
    saved, current = _leaves(plain(saved)), _leaves(plain(current))
    return [
        f"{key}: {saved[key]!r} -> {current[key]!r}"
        for key in sorted(saved.keys() & current.keys())
        if saved[key] != current[key] and not any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)
    ]


def _leaves(node, prefix: str = "") -> dict:
    """{dotted key: value} of the mappings in `node`; lists are values."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {key: value for k, v in node.items() for key, value in _leaves(v, join_key(prefix, str(k))).items()}


RENAMED_KEYS = {
    "data.val_every": ("data.holdout_every", "every Nth episode held out for validation; training.val_every is "
                                             "the number of steps between validations"),
}
"""Keys of earlier configs that now have another name: a config naming one is refused, naming the new one."""


def _refuse_renamed_keys(run: DictConfig) -> None:
    for old in RENAMED_KEYS:
        if OmegaConf.select(run, old, default=MISSING) is not MISSING:
            raise ValueError(f"config key {_renamed(old)}: rename it in the config")


def refuse_renamed_overrides(overrides: list[str]) -> None:
    """A command-line override of a renamed key (`data.val_every=3`, `+data.val_every=3`) is refused
    naming the new key, where Hydra would only say that the config has no such key."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RENAMED_KEYS:
            raise ValueError(f"override {override}: {_renamed(key)}")


def _renamed(old: str) -> str:
    new, meaning = RENAMED_KEYS[old]
    return f"{old} is now {new} ({meaning})"
