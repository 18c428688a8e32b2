"""Model case: what one-step generation buys at inference.

One action chunk for one observation (batch 1), one generator pass (1 NFE), against the same
network called 10 times in a row on the same condition: the cost of a 10-step iterative sampler
(diffusion / flow matching with 10 NFE) on this exact network. Both include one
`encode_condition`, which any sampler pays once. On CPU these run on one thread: at batch 1 the
ops are too small to split, and with a second busy process on the machine, two OpenMP threads
were measured 100x slower than one (every parallel region waits for the descheduled thread).
What a training step costs is the train case (`benchmarks/train.py`).

dit_s runs everywhere (the embedded default, random-init CNN + MiniLM, no download); dit_b2 runs
when `--device cuda` (random weights, `pretrained=false`: speed does not depend on the weights).
"""

from __future__ import annotations

import torch

from benchmarks.inputs import compose_config, synthetic_batch
from benchmarks.timing import Row, time_call
from drifting_vla.models import build_model

BASELINE_STEPS = 10


def run(args) -> list[Row]:
    device = torch.device(args.device)
    cases = [[]]
    if device.type == "cuda":
        cases.append(["experiment=rlbench_18", "model.pretrained=false"])
    return [row for overrides in cases for row in _latency_rows(compose_config(overrides), device)]


def _latency_rows(cfg, device: torch.device) -> list[Row]:
    model = build_model(cfg).to(device).eval()
    obs = synthetic_batch(cfg, device, batch_size=1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    @torch.inference_mode()
    def one_step():
        with autocast:
            return model.generate(model.encode_condition(obs), num_samples=1)

    @torch.inference_mode()
    def iterative():
        with autocast:
            condition = model.encode_condition(obs)
            for _ in range(BASELINE_STEPS):
                out = model.generate(condition, num_samples=1)
            return out

    threads = torch.get_num_threads()
    used = 1 if device.type == "cpu" else threads
    extra = {"device": str(device), "T": int(cfg.data.horizon), "A": model.action_spec.dim,
             "V": len(cfg.data.cameras), "threads": used}
    torch.set_num_threads(used)
    base = f"{cfg.model.name} latency: {BASELINE_STEPS}-NFE sampler, same net"
    rows = [
        Row("model", base, time_call(iterative), extra=extra),
        Row("model", f"{cfg.model.name} latency: one-step (1 NFE), batch 1", time_call(one_step), base, extra),
    ]
    torch.set_num_threads(threads)
    return rows
