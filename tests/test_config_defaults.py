"""Each setting is declared once: the schema (drifting_vla/formats/config.py) holds the defaults,
and the base YAML files that restate them beside their reasons must agree with it, key by key.
A preset (quickstart.yaml, an experiment) overrides values; it never adds a key."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from drifting_vla.formats import config as schemas
from drifting_vla.formats.config import (
    DATA_SCHEMAS,
    LANGUAGE_SCHEMAS,
    VISION_SCHEMAS,
    EvalConfig,
    EvalScriptConfig,
    ExecutionConfig,
    RunConfig,
    ServerConfig,
    ServeScriptConfig,
    TrainingConfig,
)
from drifting_vla.formats.validation import (
    refuse_renamed_overrides,
    training_config,
    validate_eval_config,
    validate_run_config,
    validate_serve_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "drifting_vla" / "configs"
REQUIRED = "???"


def composed(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(name, overrides=list(overrides))


def schema_defaults(schema: type) -> dict:
    """The schema's defaults as plain values; a required key reads "???"."""
    return OmegaConf.to_container(OmegaConf.structured(schema))


def disagreements(key: str, yaml_node: dict, defaults: dict, must_name_all: bool) -> list[str]:
    """`key.sub: what is wrong` for each key of `yaml_node` the schema lacks or gives another
    default; with `must_name_all`, also each key of the schema the YAML leaves out."""
    found = [f"{key}.{name}: not in the schema" for name in sorted(set(yaml_node) - set(defaults))]
    if must_name_all:
        found += [f"{key}.{name}: missing from the YAML" for name in sorted(set(defaults) - set(yaml_node))]
    for name in sorted(set(yaml_node) & set(defaults)):
        value, default = yaml_node[name], defaults[name]
        if default == REQUIRED:
            continue
        if isinstance(value, dict) and isinstance(default, dict):
            found += disagreements(f"{key}.{name}", value, default, must_name_all)
        elif value != default:
            found.append(f"{key}.{name}: YAML {value!r} != schema {default!r}")
    return found


def test_the_schema_defaults_are_those_of_the_gpu_design_card_baseline_yaml():
    training = OmegaConf.to_container(composed("config", "training=baseline").training, resolve=True)
    assert disagreements("training", training, schema_defaults(TrainingConfig), must_name_all=True) == []


def test_the_default_panel_schedule_names_every_panel():
    from drifting_vla.logging.visualizations import PANELS

    assert set(schemas.PANEL_FREQUENCIES) == set(PANELS)


def test_the_quickstart_preset_only_overrides_keys_of_the_schema():
    training = OmegaConf.to_container(composed("config").training, resolve=True)
    assert [line for line in disagreements("training", training, schema_defaults(TrainingConfig), True)
            if "YAML" not in line] == []
    assert training_config(training).max_steps == 3000  # a preset: its values, over the schema's


def test_the_run_level_keys_of_config_yaml_are_the_schema_defaults():
    cfg = OmegaConf.to_container(composed("config"), resolve=True)
    run = {name: value for name, value in cfg.items() if name not in ("model", "data", "training")}
    defaults = {name: value for name, value in schema_defaults(RunConfig).items() if name not in ("model", "data", "training")}
    assert disagreements("", run, defaults, must_name_all=True) == []


def test_eval_yaml_is_the_evaluation_schema_defaults(monkeypatch):
    monkeypatch.delenv("DRIFTING_VLA_SERVE_TOKEN", raising=False)
    cfg = composed("eval")
    node = {name: (OmegaConf.select(cfg, name) if name != "output" else REQUIRED) for name in cfg}
    assert disagreements("", node, schema_defaults(EvalScriptConfig), must_name_all=True) == []


def test_serve_yaml_is_the_server_schema_defaults(monkeypatch):
    monkeypatch.delenv("DRIFTING_VLA_SERVE_TOKEN", raising=False)
    node = OmegaConf.to_container(composed("serve"), resolve=True)
    assert disagreements("", node, schema_defaults(ServeScriptConfig), must_name_all=True) == []


BASE_DATA_CONFIG = {"aloha": "aloha_transfer_cube"}
"""A dataset whose base YAML is named after its first suite rather than the dataset."""


@pytest.mark.parametrize("name", sorted(DATA_SCHEMAS))
def test_each_dataset_s_base_yaml_names_only_its_schema_s_keys_at_their_defaults(name):
    data = OmegaConf.to_container(composed("config", f"data={BASE_DATA_CONFIG.get(name, name)}").data, resolve=True)
    assert disagreements("data", data, schema_defaults(DATA_SCHEMAS[name]), must_name_all=False) == []


@pytest.mark.parametrize("group", sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
def test_each_model_yaml_names_only_keys_of_the_model_and_encoder_schemas(group):
    model = OmegaConf.to_container(composed("config", f"model={group}").model, resolve=True)
    known = schema_defaults(schemas.ModelConfig)
    assert set(model) <= set(known)
    for part, registry in (("vision", VISION_SCHEMAS), ("language", LANGUAGE_SCHEMAS)):
        assert set(model[part]) <= set(schema_defaults(registry[model[part]["name"]])), part


def test_the_design_card_model_is_the_model_schema_defaults():
    """dit_b2 is the full GPU model: the fusion and DiT settings it names are the schema's."""
    model = OmegaConf.to_container(composed("config", "model=dit_b2").model, resolve=True)
    shared = {key: model[key] for key in ("pretrained", "fusion", "dit", "noise_dim")}
    assert disagreements("model", shared, schema_defaults(schemas.ModelConfig), must_name_all=False) == []


@pytest.mark.parametrize("group", ["dit_b2", "dit_s"])
def test_the_design_cards_encoders_are_their_schema_defaults(group):
    """Each encoder's defaults are those of the model config that uses it (dit_b2 on a GPU, dit_s
    on a CPU). `arch` is left out: it describes the checkpoint `name_or_path` names (the network
    built when model.pretrained=false), not a setting of the encoder."""
    model = OmegaConf.to_container(composed("config", f"model={group}").model, resolve=True)
    for part, registry in (("vision", VISION_SCHEMAS), ("language", LANGUAGE_SCHEMAS)):
        node = {key: value for key, value in model[part].items() if key != "arch"}
        assert disagreements(f"model.{part}", node, schema_defaults(registry[node["name"]]), must_name_all=False) == []


def test_training_eval_and_the_eval_script_share_one_execution_schema():
    execution = {f.name for f in fields(ExecutionConfig)}
    assert issubclass(EvalConfig, ExecutionConfig) and issubclass(EvalScriptConfig, ExecutionConfig)
    assert execution == {"execution", "execute_steps", "ensemble_decay", "nfe", "sampler"}
    assert not any(name in vars(EvalConfig).get("__annotations__", {}) for name in execution)
    assert not any(name in vars(EvalScriptConfig).get("__annotations__", {}) for name in execution)


def test_validation_returns_the_typed_settings_the_code_reads(monkeypatch):
    monkeypatch.delenv("DRIFTING_VLA_SERVE_TOKEN", raising=False)
    training = training_config(composed("config").training)
    assert isinstance(training, TrainingConfig) and isinstance(training.eval, EvalConfig)
    assert isinstance(training.learning_rate, float) and training.betas == [0.9, 0.95]
    assert training.wandb.visualizations["a1_drifting_field"].frequency == 1000
    server = validate_serve_config(composed("serve", "checkpoint=runs/x", "max_message_mb=2"))
    assert isinstance(server, ServerConfig) and server.max_message_bytes == 2 * 2**20 and server.token is None
    evaluation = validate_eval_config(composed("eval", "checkpoint=runs/x", "output=/tmp/unused", "execution=ensemble"))
    assert isinstance(evaluation, EvalScriptConfig) and evaluation.execution == "ensemble"


def test_the_renamed_holdout_stride_is_refused_under_its_old_name_naming_the_new_one():
    cfg = composed("config", "experiment=tiny_cpu", "run_dir=/tmp/unused")
    validate_run_config(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg.data.val_every = 3
    with pytest.raises(ValueError, match=r"config key data\.val_every is now data\.holdout_every"):
        validate_run_config(cfg)
    for override in ("data.val_every=3", "+data.val_every=3"):
        with pytest.raises(ValueError, match=r"data\.val_every is now data\.holdout_every"):
            refuse_renamed_overrides([override])
    refuse_renamed_overrides(["training.val_every=3", "data.holdout_every=3"])
