"""Model case: what one-step generation buys, and what a training step costs.

- latency: one action chunk for one observation (batch 1), one generator pass (1 NFE), against the
  same network called 10 times in a row on the same condition, the cost of a 10-step iterative
  sampler (diffusion / flow matching with 10 NFE) on this exact network. Both include one
  `encode_condition`, which any sampler pays once. On CPU these run on one thread: at batch 1 the
  ops are too small to split, and with a second busy process on the machine, two OpenMP threads
  were measured 100x slower than one (every parallel region waits for the descheduled thread).
- training step: forward of G samples per observation, DriftingLoss, backward, AdamW step, against
  the forward pass alone (how much backward + loss + optimizer add).

dit_s runs everywhere (the embedded default, random-init CNN + MiniLM, no download); dit_b2 runs
when `--device cuda` (random weights, `pretrained=false`: speed does not depend on the weights).
"""

from __future__ import annotations

import pathlib

import torch
import yaml

from benchmarks.timing import Row, time_call
from drifting_vla.models import build_model
from drifting_vla.training.losses import DriftingLoss

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASELINE_STEPS = 10
NUM_SAMPLES = 8  # G, generated chunks per observation in training


def run(args) -> list[Row]:
    device = torch.device(args.device)
    cases = [("dit_s", "metaworld", 32)]
    if device.type == "cuda":
        cases.append(("dit_b2", "rlbench", 64))
    rows: list[Row] = []
    for model_name, data_name, batch_size in cases:
        rows += _bench(model_name, data_name, batch_size, device)
    return rows


def _bench(model_name: str, data_name: str, batch_size: int, device: torch.device) -> list[Row]:
    cfg = {"model": _load(f"model/{model_name}.yaml"), "data": _load(f"data/{data_name}.yaml")}
    cfg["model"]["pretrained"] = model_name == "dit_s"  # MiniLM ships in a package; nothing else downloads
    model = build_model(cfg).to(device)
    data = cfg["data"]
    extra = {"device": str(device), "T": data["horizon"], "A": model.action_spec.dim, "V": len(data["cameras"])}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    obs1 = _observation(data, 1, device)
    model.eval()

    @torch.inference_mode()
    def one_step():
        with autocast:
            return model.generate(model.encode_condition(obs1), num_samples=1)

    @torch.inference_mode()
    def iterative():
        with autocast:
            condition = model.encode_condition(obs1)
            for _ in range(BASELINE_STEPS):
                out = model.generate(condition, num_samples=1)
            return out

    threads = torch.get_num_threads()
    latency_extra = {**extra, "threads": 1 if device.type == "cpu" else threads}
    torch.set_num_threads(latency_extra["threads"])
    base_latency = f"{model_name} latency: {BASELINE_STEPS}-NFE sampler, same net"
    rows = [
        Row("model", base_latency, time_call(iterative), extra=latency_extra),
        Row("model", f"{model_name} latency: one-step (1 NFE), batch 1", time_call(one_step), base_latency, latency_extra),
    ]
    torch.set_num_threads(threads)

    obs = _observation(data, batch_size, device)
    model.train()
    loss_fn = DriftingLoss()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, fused=device.type == "cuda")

    def forward_only():
        with torch.no_grad(), autocast:
            model(obs, num_samples=NUM_SAMPLES)

    def train_step():
        with autocast:
            x = model(obs, num_samples=NUM_SAMPLES)
        loss = loss_fn(x.float(), obs["actions"][:, None]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_extra = {**extra, "B": batch_size, "G": NUM_SAMPLES, "threads": threads}
    base_train = f"{model_name} forward only, B={batch_size} G={NUM_SAMPLES}"
    rows += [
        Row("model", base_train, time_call(forward_only, repeats=5), extra=step_extra),
        Row("model", f"{model_name} train step (drifting loss + AdamW)", time_call(train_step, repeats=5), base_train, step_extra),
    ]
    return rows


def _observation(data: dict, batch_size: int, device: torch.device) -> dict:
    size, cameras = data["image_size"], len(data["cameras"])
    return {
        "images": torch.randint(0, 256, (batch_size, cameras, 3, size, size), dtype=torch.uint8, device=device),
        "proprio": torch.randn(batch_size, data["proprio_dim"], device=device),
        "instruction": [f"task {i % 5}" for i in range(batch_size)],
        "actions": torch.rand(batch_size, data["horizon"], _action_dim(data), device=device) * 2 - 1,
    }


def _action_dim(data: dict) -> int:
    return sum(int(c["dim"]) for c in data["action_spec"]["components"])


def _load(relative: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / relative).read_text())
