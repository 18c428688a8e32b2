"""Train case: training samples/s of the embedded default, through the trainer's own pieces.

A drifting step (G = 8 chunks per observation, DriftingLoss, backward, AdamW) against the
regression baseline's step on the same network (G = 1, MSE), measured in the same run: the ratio
is what the generative objective costs per step. Extras give the share of a drifting step spent
in the drift field (loss forward + its backward) and in the observation encoders.
Synthetic batches in the dataset's format, so the figure is the step alone (the loader is
`benchmarks/data.py`).

Feature cache: a step that runs a frozen DINOv2 backbone on the images against the same step
reading cached backbone features (`training.feature_cache=true`). On CPU the backbone is a
ViT-S/14 at 56 px in dit_s (random weights: the cost is the architecture's); on GPU, dit_b2's
DINOv2-L/14 at 224 px.
"""

from __future__ import annotations

import torch

from benchmarks.inputs import compose_config, synthetic_batch
from benchmarks.timing import Row, time_call
from drifting_vla.models import build_model
from drifting_vla.training.objectives import build_objective
from drifting_vla.training.optimizer import OptimizerConfig, build_optimizer

CPU_FROZEN_BACKBONE = [
    "model.pretrained=false",
    "~model.vision",
    "+model.vision={name: dinov2, name_or_path: random, input_size: 56, arch: {hidden_size: 384, "
    "num_hidden_layers: 12, num_attention_heads: 6, intermediate_size: 1536, patch_size: 14, image_size: 56}}",
]


def run(args) -> list[Row]:
    device = torch.device(args.device)
    overrides = ["device=" + device.type]
    if device.type == "cuda":
        overrides += ["experiment=rlbench_18", "model.pretrained=false"]
    rows = _objective_rows(compose_config(overrides), device)
    return rows + _feature_cache_rows(compose_config(overrides + ([] if device.type == "cuda" else CPU_FROZEN_BACKBONE)), device)


def _step_fn(model, objective, batch, device):
    """One optimizer step of `objective` on `batch`, as the trainer takes it."""
    optimizer = build_optimizer(model, OptimizerConfig(learning_rate=1e-4, warmup_steps=0, max_steps=10))
    noise = model.sample_noise(len(batch["actions"]), objective.num_samples, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = objective(model, batch, batch["actions"], noise)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _feature_cache_rows(cfg, device) -> list[Row]:
    model = build_model(cfg).to(device).train()
    batch = synthetic_batch(cfg, device)
    objective = build_objective(cfg.training)
    with torch.no_grad():
        images = batch["images"]
        features = model.vision_encoder.backbone(images.flatten(0, 1)).unflatten(0, images.shape[:2])
    cached = {**batch, "vision_features": features}
    label = f"{cfg.model.name}+{cfg.model.vision.name} B={cfg.training.batch_size}"
    base = f"{label} frozen backbone every step"
    return [
        Row("train", base, time_call(_step_fn(model, objective, batch, device), warmup=1, repeats=3)),
        Row("train", f"{label} feature cache", time_call(_step_fn(model, objective, cached, device), warmup=1, repeats=3), base),
    ]


def _objective_rows(cfg, device) -> list[Row]:
    model = build_model(cfg).to(device).train()
    batch = synthetic_batch(cfg, device)
    label = f"{cfg.model.name} B={cfg.training.batch_size}"
    rows, timings = [], {}
    for objective_name in ("regression", "drifting"):
        cfg.training.objective = objective_name
        timings[objective_name] = time_call(_step_fn(model, build_objective(cfg.training), batch, device), warmup=2, repeats=5)
    samples = int(cfg.training.batch_size)
    base = f"{label} regression step (G=1)"
    rows.append(Row("train", base, timings["regression"], extra={"samples/s": round(samples / timings["regression"], 1)}))
    shares = _drifting_shares(model, batch, build_objective(cfg.training), timings["drifting"], device)
    rows.append(Row("train", f"{label} drifting step (G={cfg.training.num_samples})", timings["drifting"], base,
                    {"samples/s": round(samples / timings["drifting"], 1), **shares}))
    if device.type == "cuda":
        rows[-1].extra["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return rows


def _drifting_shares(model, batch, objective, step_seconds: float, device) -> dict:
    """Share of a drifting step in the field (loss fwd+bwd on fixed samples) and in encode_condition."""
    samples = model(batch, objective.num_samples, model.sample_noise(len(batch["actions"]), objective.num_samples, device)).detach()

    def field():
        x = samples.clone().requires_grad_(True)
        objective.loss(x, batch["actions"][:, None]).loss.backward()

    def encode():
        with torch.no_grad():
            model.encode_condition(batch)

    field_seconds = time_call(field, warmup=1, repeats=5)
    encode_seconds = time_call(encode, warmup=1, repeats=5)
    return {"drift_field_share": f"{field_seconds / step_seconds:.1%}", "encoders_share": f"{encode_seconds / step_seconds:.1%}"}
