"""An encoder registers once: its class and the schema of its keys, in one call, and a config is
checked against that schema the way a dataset's is."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from drifting_vla.formats.config import LANGUAGE_SCHEMAS, VISION_SCHEMAS, DataConfig
from drifting_vla.formats.validation import validate_run_config, validate_saved_config
from drifting_vla.models import LANGUAGE_ENCODERS, VISION_BACKBONES, build_model, register_vision_encoder
from tests.helpers import compose_config

PLUGIN_ENCODER = '''
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from drifting_vla.formats.config import EncoderConfig
from drifting_vla.formats.settings import setting
from drifting_vla.models import register_vision_encoder


@dataclass(kw_only=True)
class PatchMeanConfig(EncoderConfig):
    patch: int = setting(8, ge=1)
    dim: int = setting(16, ge=1)


@register_vision_encoder("patch_mean", schema=PatchMeanConfig)
class PatchMean(nn.Module):
    """uint8 [N, 3, H, W] -> [N, (H/patch) * (W/patch), dim]: each patch's mean colour, projected."""

    def __init__(self, patch: int, dim: int):  # the schema holds the defaults
        super().__init__()
        self.patch, self.out_dim = patch, dim
        self.proj = nn.Linear(3, dim)

    def forward(self, images):
        cells = F.avg_pool2d(images.float() / 255, self.patch)
        return self.proj(cells.flatten(2).transpose(1, 2))
'''


@pytest.fixture
def patch_mean(tmp_path, monkeypatch):
    """The plugin's module imported as a user's `plugins=[patch_mean_plugin]` would be; its
    registrations go with the test."""
    from drifting_vla.plugins import load_plugins

    (tmp_path / "patch_mean_plugin.py").write_text(PLUGIN_ENCODER)
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugins(["patch_mean_plugin"])
    yield sys.modules["patch_mean_plugin"]
    VISION_BACKBONES.pop("patch_mean")
    VISION_SCHEMAS.pop("patch_mean")
    sys.modules.pop("patch_mean_plugin")


def run_config(**vision):
    cfg = compose_config(["experiment=tiny_cpu", "run_dir=/tmp/unused"])
    with open_dict(cfg):
        cfg.model.vision = {"name": "patch_mean", **vision}
        cfg.data.instructions = ["reach the goal"]  # the tiny model's task embedding embeds them
    return cfg


def test_the_built_in_encoders_have_a_class_and_a_schema_under_each_name():
    assert set(VISION_BACKBONES) == set(VISION_SCHEMAS)
    assert set(LANGUAGE_ENCODERS) == set(LANGUAGE_SCHEMAS)


def test_one_call_registers_a_plugin_encoder_s_class_and_schema(patch_mean):
    assert VISION_BACKBONES["patch_mean"] is patch_mean.PatchMean
    assert VISION_SCHEMAS["patch_mean"] is patch_mean.PatchMeanConfig


def test_a_plugin_encoder_s_keys_are_checked_against_its_schema_naming_the_key(patch_mean):
    validate_run_config(run_config(patch=8, dim=16))
    with pytest.raises(ValueError, match=re.escape("config key model.vision.pach is unknown")):
        validate_run_config(run_config(pach=8))
    with pytest.raises(ValueError, match=re.escape("config key model.vision.dim=0 must be >= 1")):
        validate_run_config(run_config(dim=0))
    with pytest.raises(ValueError, match=re.escape("config key model.vision.pach is unknown")):
        validate_saved_config(OmegaConf.to_container(run_config(pach=8), resolve=True))


def test_the_model_builds_with_a_plugin_encoder_and_encodes_through_it(patch_mean):
    cfg = run_config(patch=8, dim=12)
    model = build_model(cfg)
    assert isinstance(model.vision_encoder.backbone, patch_mean.PatchMean)
    cameras, size = len(cfg.data.cameras), 32
    images = torch.randint(0, 256, (2, cameras, 3, size, size), dtype=torch.uint8)
    assert model.vision_encoder(images).shape == (2, cameras * (size // 8) ** 2, 12)
    observation = {"images": images, "proprio": torch.randn(2, cfg.data.proprio_dim), "instruction": ["reach the goal"] * 2}
    chunks = model(observation, model.sample_noise(2, 3, torch.device("cpu")))
    assert chunks.shape == (2, 3, cfg.data.horizon, model.action_spec.network_dim) and torch.isfinite(chunks).all()


def test_a_key_the_config_omits_takes_its_schema_s_default(patch_mean):
    backbone = build_model(run_config(dim=12)).vision_encoder.backbone
    assert (backbone.patch, backbone.out_dim) == (8, 12)


def test_a_schema_that_is_not_an_encoder_config_is_refused_naming_the_call():
    with pytest.raises(TypeError, match=r"register_vision_encoder\('bad', schema=.*DataConfig.*EncoderConfig"):
        register_vision_encoder("bad", schema=DataConfig)
