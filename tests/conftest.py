"""Every test runs offline and headless: no hub, no WandB account, no display."""

import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MUJOCO_GL", "egl")
# The scripts that tests start load `plugins=[tests.fake_envs]`: the checkout is on their path, as a
# user's plugin package would be.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pathlib.Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))

import tests.fake_envs  # noqa: E402, F401  registers the test simulators `scripted` and `drift`
from tests.helpers import tiny_bpe_file, tiny_cfg, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def pretrained_dirs(tmp_path_factory) -> dict:
    """Tiny DINOv2 and CLIP text checkpoints saved with save_pretrained, as a user's local copies."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, Dinov2Config, Dinov2Model

    from drifting_vla.models.language_encoder import clip_tokenizer_from_bpe

    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    dinov2 = Dinov2Model(
        Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28, patch_size=14)
    )
    dinov2.save_pretrained(root / "dinov2")
    tokenizer = clip_tokenizer_from_bpe(tiny_bpe_file(root / "bpe.txt.gz"))
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return {"dinov2": root / "dinov2", "clip": root / "clip", "dinov2_model": dinov2, "clip_model": clip}


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "run", tiny_cfg())
