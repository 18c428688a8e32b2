"""EMA warmup and swap, AdamW parameter groups, warmup + cosine schedule."""

import math

import pytest
import torch
from torch import nn

from drifting_vla.training.ema import EMA, ema_decay
from drifting_vla.training.optimizer import (
    OptimizerConfig,
    build_optimizer,
    build_scheduler,
    parameter_groups,
    warmup_cosine,
)


class TinyPolicy(nn.Module):
    """A frozen encoder (with a buffer), a trainable head with a norm, an embedding and a pos_embed."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.encoder.requires_grad_(False)
        self.task_embedding = nn.Embedding(5, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 2, 4))
        self.head = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        self.head_norm = nn.BatchNorm1d(2)


def test_ema_decay_warms_up_then_caps_at_max_decay():
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(10, 0.999) == pytest.approx(11 / 20)
    assert ema_decay(10**6, 0.999) == 0.999


def test_ema_update_is_the_warmed_up_lerp():
    model = TinyPolicy()
    ema = EMA(model, max_decay=0.99)
    before = model.head[0].weight.detach().clone()
    with torch.no_grad():
        model.head[0].weight.add_(1.0)
    decay = ema.update(model, step=0)
    expected = decay * before + (1 - decay) * model.head[0].weight
    torch.testing.assert_close(ema.shadow["head.0.weight"], expected)


def test_ema_tracks_only_trainable_parts_and_shares_frozen_encoders():
    ema = EMA(TinyPolicy())
    assert not any(name.startswith("encoder.") for name in ema.shadow)
    assert {"head.0.weight", "pos_embed", "head_norm.running_mean"} <= set(ema.shadow)


def test_ema_applied_to_swaps_in_ema_weights_and_restores_raw_weights():
    model = TinyPolicy()
    ema = EMA(model)
    raw = model.head[2].weight.detach().clone()
    ema.shadow["head.2.weight"].fill_(7.0)
    with ema.applied_to(model):
        assert torch.all(model.head[2].weight == 7.0)
    torch.testing.assert_close(model.head[2].weight, raw)


def test_ema_state_dict_round_trip_and_mismatch_is_an_error():
    model = TinyPolicy()
    ema = EMA(model)
    ema.shadow["pos_embed"].fill_(3.0)
    other = EMA(TinyPolicy())
    other.load_state_dict(ema.state_dict())
    assert torch.all(other.shadow["pos_embed"] == 3.0)
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"pos_embed": torch.zeros(1, 2, 4)})


def test_no_weight_decay_on_biases_norms_embeddings_and_frozen_parameters_are_left_out():
    model = TinyPolicy()
    decay_group, no_decay_group = parameter_groups(model, weight_decay=0.1)
    decayed = {id(p) for p in decay_group["params"]}
    assert decayed == {id(model.head[0].weight), id(model.head[2].weight)}
    assert no_decay_group["weight_decay"] == 0.0
    not_decayed = {id(p) for p in no_decay_group["params"]}
    for p in (
        model.head[0].bias,
        model.head[1].weight,
        model.task_embedding.weight,
        model.pos_embed,
    ):
        assert id(p) in not_decayed
    assert not {id(p) for p in model.encoder.parameters()} & (decayed | not_decayed)


def test_optimizer_is_fused_adamw_on_cpu_parameters():
    optimizer = build_optimizer(TinyPolicy(), OptimizerConfig())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True


def test_warmup_is_linear_then_cosine_reaches_min_lr_ratio():
    lr = [warmup_cosine(s, warmup_steps=4, max_steps=12, min_lr_ratio=0.1) for s in range(14)]
    assert lr[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr[4] == pytest.approx(1.0)
    assert lr[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr[12] == pytest.approx(0.1) and lr[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[4:], lr[5:], strict=False))


def test_scheduler_applies_the_multiplier_to_the_configured_learning_rate():
    cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=2, max_steps=10)
    optimizer = build_optimizer(TinyPolicy(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3])


def test_invalid_schedule_config_names_the_key():
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimizerConfig(warmup_steps=20, max_steps=10)
