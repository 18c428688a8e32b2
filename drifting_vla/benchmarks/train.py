"""Train case: training throughput per objective on one network, through the trainer's own pieces.

One optimizer step (objective forward, backward, AdamW) of each objective on the SAME network
and batch, measured in the same run: regression (G = 1, the baseline row), flow matching and
diffusion (G = 1, one noisy chunk per observation) and drifting (G = 8 chunks per observation,
DriftingLoss). The ratios are what each generative objective costs per step; observations/s is
the batch over the step. Extras split the drifting step: the drift field (loss forward + its
backward on fixed samples) and the frozen encoders, each timed alone (`step_split`).
Synthetic batches in the dataset's format, so the figure is the step alone (the loader is
`benchmarks/data.py`).

Feature cache: a step that runs a frozen DINOv2 backbone on the images against the same step
reading cached backbone features (`training.feature_cache=true`). On CPU the backbone is a
ViT-S/14 at 56 px in dit_s (random weights: the cost is the architecture's); on GPU, dit_b2's
DINOv2-L/14 at 224 px.
"""

from __future__ import annotations

import torch

from drifting_vla.benchmarks.inputs import compose_config, objective_named, synthetic_batch
from drifting_vla.benchmarks.timing import Row, peak_memory, reset_peak_memory, time_call
from drifting_vla.models import build_model
from drifting_vla.objectives.methods import DriftingObjective
from drifting_vla.training.optimizer import OptimizerConfig, build_optimizer

OBJECTIVES = ("regression", "flow_matching", "diffusion", "drifting")
"""Compared on one network; the first is the baseline row."""

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


class TrainingStep:
    """One optimizer step of `objective` on `batch`, as the trainer takes it (bf16 autocast on
    CUDA), with the same random draws (noise, times) every call: a callable for `time_call`."""

    def __init__(self, model, objective, batch: dict, device: torch.device) -> None:
        self.model, self.objective, self.batch, self.device = model, objective, batch, device
        self.optimizer = build_optimizer(model, OptimizerConfig(learning_rate=1e-4, warmup_steps=0, max_steps=10))
        draws = objective.training_inputs(len(batch["actions"]), model.horizon, model.noise_dim, torch.Generator().manual_seed(0))
        self.inputs = {key: value.to(device) for key, value in draws.items()}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def backward(self) -> None:
        """Forward and backward: gradients for the optimizer, nothing updated yet."""
        with self.autocast():
            out = self.objective(self.model, self.batch, self.batch["actions"], self.inputs)
        out.loss.backward()

    def __call__(self) -> None:
        self.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def step_split(step: TrainingStep, **timing) -> dict[str, float]:
    """Seconds of the parts of a step that are not the trainable network, each timed alone:
    `frozen_encoders` (a frozen vision backbone on the images, unless the batch carries cached
    features, and a frozen text encoder, which caches by instruction), `drift_field` (drifting's
    loss forward + backward on fixed samples; 0 for the MSE objectives) and `optimizer` (the AdamW
    update). What is left of the step is the network's forward and backward."""
    frozen = frozen_encoders(step.model, step.batch)
    split = {"frozen_encoders": time_call(frozen, **timing) if frozen else 0.0, "drift_field": 0.0}
    if isinstance(step.objective, DriftingObjective):
        # Eager: a compiled network would compile once more for this one no-grad call.
        with torch.no_grad(), step.autocast(), torch.compiler.set_stance("force_eager"):
            samples = step.model.to_actions(step.model(step.batch, step.inputs["noise"]))
        positives = step.batch["actions"][:, None]

        def field():
            x = samples.clone().requires_grad_(True)
            with step.autocast():
                out = step.objective.loss(x, positives)
            out.loss.backward()

        split["drift_field"] = time_call(field, **timing)
    step.backward()
    split["optimizer"] = time_call(step.optimizer.step, **timing)
    step.optimizer.zero_grad(set_to_none=True)
    return split


def frozen_encoders(model, batch: dict):
    """A call running what a step runs of the frozen encoders on `batch`, or None if it runs none."""
    backbone, language = model.vision_encoder.backbone, model.language_encoder
    parts = []
    if getattr(backbone, "frozen", False) and "vision_features" not in batch:
        parts.append(lambda: backbone(batch["images"].flatten(0, 1)))
    if getattr(language, "frozen", False):
        parts.append(lambda: language(list(batch["instruction"])))
    if not parts:
        return None
    return lambda: [part() for part in parts]


@torch.no_grad()
def with_cached_features(model, batch: dict) -> dict:
    """`batch` plus the frozen backbone's features of its images, as the feature cache stores them
    (bf16 on GPU, fp32 on CPU: `training/feature_cache.py`), so a step skips the backbone."""
    images = batch["images"]
    features = model.vision_encoder.backbone(images.flatten(0, 1)).unflatten(0, images.shape[:2])
    return {**batch, "vision_features": features.to(torch.bfloat16 if images.is_cuda else torch.float32)}


def _feature_cache_rows(cfg, device) -> list[Row]:
    model = build_model(cfg).to(device).train()
    batch = synthetic_batch(cfg, device)
    objective = objective_named(cfg, "drifting")
    label = f"{cfg.model.name}+{cfg.model.vision.name} B={cfg.training.batch_size}"
    base = f"{label} frozen backbone every step"
    cached = with_cached_features(model, batch)
    return [
        Row("train", base, time_call(TrainingStep(model, objective, batch, device), warmup=1, repeats=3)),
        Row("train", f"{label} feature cache", time_call(TrainingStep(model, objective, cached, device), warmup=1, repeats=3), base),
    ]


def _objective_rows(cfg, device) -> list[Row]:
    model = build_model(cfg).to(device).train()
    batch = synthetic_batch(cfg, device)
    observations = len(batch["actions"])
    rows = []
    for name in OBJECTIVES:
        step = TrainingStep(model, objective_named(cfg, name), batch, device)
        reset_peak_memory(device)
        seconds = time_call(step, warmup=2, repeats=5)
        extra = {"obs/s": round(observations / seconds, 1), **peak_memory(device)}
        if isinstance(step.objective, DriftingObjective):
            split = step_split(step, warmup=1, repeats=5)
            extra.update({f"{part}_share": f"{s / seconds:.1%}" for part, s in split.items() if part != "optimizer"})
        baseline = rows[0].name if rows else None
        rows.append(Row("train", f"{cfg.model.name} B={observations} {name} step (G={step.objective.num_samples})", seconds, baseline, extra))
    return rows
