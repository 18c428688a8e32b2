"""Vision encoders: camera images in, visual tokens out.

    images uint8 [B, V, 3, H, W]  --preprocess (torch, on device)-->  float [B*V, 3, S, S]
        --backbone-->  [B*V, N, D]  --+ camera embedding-->  tokens [B, V*N, D]

Two backbones sit behind one interface (registered with `register_vision_encoder`, models/registry.py;
picked by `model.vision.name`):

- `dinov2`: Hugging Face `Dinov2Model` (hub id such as `facebook/dinov2-large`, or a local
  directory), frozen. It runs once per observation under `torch.inference_mode()`, in bf16 on GPU.
- `cnn`: a small ResNet-like CNN with GroupNorm trained from scratch, for the offline embedded
  default where no pretrained image weights can be fetched. GroupNorm rather than BatchNorm because
  batches of a few dozen observations make batch statistics noisy and the policy runs at batch 1.

Several cameras share one backbone; a learned camera embedding tells their tokens apart. With an
observation history (`data.n_obs_steps` = n > 1) every frame of the n steps goes through the same
backbone and a learned step embedding tells the steps apart:

    images uint8 [B, n, V, 3, H, W] --backbone--> [B, n, V, N, D] + camera[v] + step[s] --> tokens [B, n*V*N, D]
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from drifting_vla.models.frozen import FrozenModule, frozen_forward
from drifting_vla.models.registry import build_encoder, register_vision_encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float [N, 3, size, size], resized and ImageNet-normalized.

    Done in torch on the images' device so no torchvision is needed and the uint8 tensors travel to
    the GPU at a quarter of the float size.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 [N, 3, H, W] in 0..255, got {images.dtype}")
    x = images.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@register_vision_encoder("dinov2")
class Dinov2Backbone(FrozenModule):
    """Frozen DINOv2 (HF transformers). Returns all output tokens (CLS, registers, patches)."""

    def __init__(
        self, name_or_path: str, pretrained: bool, input_size: int, arch: dict | None = None, revision: str | None = None
    ):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        if pretrained:
            self.model = self.load_source(Dinov2Model, name_or_path, revision, "model.vision")
        else:
            self.model = Dinov2Model(Dinov2Config(**(arch or {})))
        patch = self.model.config.patch_size
        if input_size % patch:
            raise ValueError(
                f"model.vision.input_size={input_size} is not a multiple of the DINOv2 patch size "
                f"{patch}; use e.g. {round(input_size / patch) * patch}"
            )
        self.input_size = input_size
        self.out_dim = self.model.config.hidden_size
        n_extra = 1 + getattr(self.model.config, "num_register_tokens", 0)
        self.num_tokens = (input_size // patch) ** 2 + n_extra
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> float32 [N, num_tokens, out_dim] (a normal tensor, not an inference one)."""
        with frozen_forward(images.device):
            pixels = preprocess_images(images, self.input_size)
            tokens = self.model(pixel_values=pixels).last_hidden_state.float()
        # Clone outside inference mode: inference tensors cannot be saved for backward by the
        # trainable layers that consume them.
        return tokens.clone()


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm; a strided 1x1 shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(groups, c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + self.shortcut(x))


@register_vision_encoder("cnn")
class CNNBackbone(nn.Module):
    """A small ResNet-like CNN trained from scratch; feature-map cells become tokens.

    A stride-2 stem then one residual block per stage, each stage halving the resolution and
    doubling the width: input_size 64 with 3 stages gives an 4x4 map -> 16 tokens of width
    4 * width. A learned position embedding keeps where each token came from, since the fusion's
    attention is otherwise blind to order.
    """

    frozen = False

    def __init__(self, input_size: int, width: int = 32, num_stages: int = 3, groups: int = 8):
        super().__init__()
        self.input_size = input_size
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.GroupNorm(groups, width), nn.SiLU()
        )
        channels = [width * 2**i for i in range(num_stages)]
        self.stages = nn.Sequential(
            *[ResidualBlock(c_in, c_out, 2, groups) for c_in, c_out in zip([width] + channels[:-1], channels, strict=True)]
        )
        side = input_size // 2 ** (num_stages + 1)
        if side < 1:
            raise ValueError(f"model.vision.input_size={input_size} is too small for {num_stages} stages")
        self.out_dim = channels[-1]
        self.num_tokens = side * side
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, self.out_dim))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero the last norm of each residual branch so every block starts as its shortcut.
        for block in self.stages:
            nn.init.zeros_(block.norm2.weight)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 3, H, W] -> [N, num_tokens, out_dim]."""
        x = self.stages(self.stem(preprocess_images(images, self.input_size)))
        return x.flatten(2).transpose(1, 2) + self.pos_embed


class VisionEncoder(nn.Module):
    """Shared backbone over V cameras (and n history steps) plus learned camera and step embeddings.

    images uint8 [B, V, 3, H, W] -> tokens [B, V * num_tokens, out_dim]                  (n = 1)
    images uint8 [B, n, V, 3, H, W] -> tokens [B, n * V * num_tokens, out_dim], oldest step first

    Without history there is no step embedding at all, so a single-observation model has exactly
    the parameters (and the outputs) it had before histories existed.
    """

    def __init__(self, backbone: nn.Module, num_cameras: int, num_obs_steps: int = 1):
        super().__init__()
        self.backbone = backbone
        self.num_cameras = num_cameras
        self.num_obs_steps = num_obs_steps
        self.out_dim = backbone.out_dim
        self.camera_embed = nn.Parameter(torch.zeros(num_cameras, 1, backbone.out_dim))
        nn.init.normal_(self.camera_embed, std=0.02)
        if num_obs_steps > 1:
            self.step_embed = nn.Parameter(torch.zeros(num_obs_steps, 1, 1, backbone.out_dim))
            nn.init.normal_(self.step_embed, std=0.02)

    @property
    def observation_shape(self) -> tuple[int, ...]:
        """The dims between batch and frame: (V,), or (n, V) with a history."""
        return (self.num_cameras,) if self.num_obs_steps == 1 else (self.num_obs_steps, self.num_cameras)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        lead = self.observation_shape
        if images.ndim != len(lead) + 4 or tuple(images.shape[1:-3]) != lead:
            history = "" if self.num_obs_steps == 1 else f"{self.num_obs_steps} steps (data.n_obs_steps, oldest first) x "
            raise ValueError(
                f"expected images [B, {', '.join(map(str, lead))}, 3, H, W]: {history}one per camera in data.cameras, "
                f"got {tuple(images.shape)}"
            )
        frames = images.flatten(0, -4)
        return self.embed(self.backbone(frames).unflatten(0, images.shape[:-3]))

    def embed(self, backbone_tokens: torch.Tensor) -> torch.Tensor:
        """The trainable part after the backbone: [B, (n,) V, N, D] -> [B, (n *) V * N, D]. Called
        directly with features cached from a frozen backbone (training.feature_cache)."""
        tokens = backbone_tokens.float() + self.camera_embed
        if self.num_obs_steps > 1:
            tokens = tokens + self.step_embed
        return tokens.flatten(1, -2)


def build_vision_encoder(cfg, num_cameras: int, pretrained: bool, num_obs_steps: int = 1) -> VisionEncoder:
    """Build from `model.vision` (name, input_size and the backbone's own keys)."""
    return VisionEncoder(build_encoder("vision", cfg, pretrained=pretrained), num_cameras, num_obs_steps)

