"""Model case: what one-step generation buys at inference, against the iterative samplers.

One action chunk for one observation (batch 1), drawn through `objective.sample` (the code the
policy, validation and the server run) by each objective on the SAME network: flow matching with
10 Euler steps (the baseline row), DDIM 10 and DDPM 100, then drifting with 1 NFE and its
speed-up over each. Every row includes one `encode_condition`, which any sampler pays once per
chunk; `encoders_share` is that call alone over the row. `control_hz` is the control rate the
chunk latency allows when the policy executes `training.eval.execute_steps` actions per chunk
(at most the chunk length T) before the next call.

On CPU these run on one thread: at batch 1 the ops are too small to split, and with a second
busy process on the machine, two OpenMP threads were measured 100x slower than one (every
parallel region waits for the descheduled thread). What a training step costs is the train case
(`benchmarks/train.py`); the GPU figures, compiled and with CUDA graphs, are the gpu case.

dit_s runs everywhere (the embedded default, random-init CNN + MiniLM, no download); dit_b2 runs
when `--device cuda` (random weights, `pretrained=false`: speed does not depend on the weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from drifting_vla.benchmarks.inputs import compose_config, objective_named, synthetic_batch
from drifting_vla.benchmarks.timing import Row, time_call
from drifting_vla.models import build_model
from drifting_vla.models.drifting_vla import Condition
from drifting_vla.specs import default_execute_steps

ITERATIVE = {"flow10": ("flow_matching", 10, None), "ddim10": ("diffusion", 10, "ddim"), "ddpm100": ("diffusion", 100, "ddpm")}
"""The baselines (objective, nfe, sampler): the first is the row drifting's speed-up is read against."""
ONE_STEP = ("drifting", 1, None)


def run(args) -> list[Row]:
    device = torch.device(args.device)
    cases = [[]]
    if device.type == "cuda":
        cases.append(["experiment=rlbench_18", "model.pretrained=false"])
    rows = []
    for overrides in cases:
        cfg = compose_config(overrides)
        model = build_model(cfg).to(device).eval()
        obs = synthetic_batch(cfg, device, batch_size=1)
        encode = inference(device, lambda obs=obs, model=model: model.encode_condition(obs))
        with one_cpu_thread(device):
            rows += chunk_latency_rows("model", f"{cfg.model.name} chunk, batch 1", model, cfg, encode, time_call(encode))
    return rows


def inference(device: torch.device, fn: Callable):
    """`fn` as the policy runs it: inference mode, bf16 autocast on CUDA."""

    def call():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return fn()

    return call


def chunk_latency_rows(
    case: str, title: str, model, cfg, condition_of: Callable[[], Condition], encode_seconds: float | None = None, **timing
) -> list[Row]:
    """Seconds for one chunk at batch 1 by every protocol on `model`, each chunk starting from
    `condition_of()` (encode_condition: end to end; a fixed condition: the head alone). The
    iterative rows first, then drifting's against them; `encode_seconds` adds each row's encoder
    share. `timing`: keyword arguments of `time_call`."""
    device = next(model.parameters()).device
    protocols = {**ITERATIVE, "drifting1": ONE_STEP}
    names, seconds = {}, {}
    for key, (objective_name, nfe, sampler) in protocols.items():
        objective = objective_named(cfg, objective_name)
        names[key] = f"{title}: {objective.label(nfe, sampler)}"
        draw = inference(device, lambda o=objective, n=nfe, s=sampler: o.sample(model, condition_of(), 1, n, s))
        seconds[key] = time_call(draw, **timing)
    configured = cfg.training.eval.execute_steps
    execute = default_execute_steps(model.horizon) if configured is None else min(int(configured), model.horizon)

    def notes(key: str) -> dict:
        extra = {"control_hz": f"{execute / seconds[key]:.0f}"}
        if encode_seconds is not None:
            extra["encoders_share"] = f"{encode_seconds / seconds[key]:.0%}"
        return extra

    baseline = next(iter(ITERATIVE))
    rows = [Row(case, names[key], seconds[key], extra=notes(key)) for key in ITERATIVE]
    speedups = {f"vs_{key}": f"{seconds[key] / seconds['drifting1']:.1f}x" for key in ITERATIVE if key != baseline}
    rows.append(Row(case, names["drifting1"], seconds["drifting1"], names[baseline], {**speedups, **notes("drifting1")}))
    return rows


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """One torch thread on a CPU device (see the module docstring); nothing on CUDA."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
