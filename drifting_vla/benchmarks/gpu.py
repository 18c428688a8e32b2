"""GPU case: every GPU figure of the project in ONE prepared run of at most 8 minutes.

    python scripts/benchmark.py gpu --json gpu.json         # one H100/H200, random weights, no hub
    python scripts/benchmark.py gpu --quickstart            # + the quickstart end to end
    python scripts/benchmark.py gpu --smoke --device cpu    # every code path, tiny sizes, < 1 min

A GPU is lent for minutes, so the run is written and tested before it gets one: `--smoke --device
cpu` goes through every section with a tiny model (tests/test_benchmarks.py), and only what needs
CUDA (peak memory, CUDA graphs) is left out of it. Each section first checks the time left of
`--budget-s` and is skipped, with a row saying so, rather than overrun; they run in the order
matmul, dit_b2 training eager, inference eager, training compiled, inference compiled and CUDA
graphs, dit_l2 training eager and compiled, quickstart, so the aims' figures come first:

1. bf16 matmul rate of this card (8192^3), measured: the peak the MFU is read against.
2. Training step of dit_b2, then dit_l2 (`model.pretrained=false`, synthetic batches at the
   config's batch size): drifting G = 8 against flow matching G = 1 on the same network, with
   images through the frozen encoders and with the feature cache (backbone features passed as
   `vision_features`, as the trainer does); eager, then with `training.compile` (torch.compile of
   the DiT). Notes: observations/s; the step's split into frozen encoders, drift field and
   optimizer (each timed alone, `benchmarks.train.step_split`) and the network's forward and
   backward (the rest); peak memory; MFU of the trainable part = FLOPs of one step minus those of
   the frozen encoders (counted by FlopCounterMode, not estimated) / (step - frozen encoders) /
   the rate of (1).
3. Inference at batch 1 in bf16 (dit_b2): the model case's rows (`benchmarks.model`: flow 10,
   DDIM 10, DDPM 100, drifting 1, all through `objective.sample`) end to end and for the head
   alone (a fixed condition), eager, with torch.compile of the DiT, and with mode
   "reduce-overhead" (CUDA graphs); `control_hz` is the control rate each latency allows.
4. `--quickstart`: `drifting-train` from an empty demo cache on Meta-World (collection,
   training on the GPU, rollouts on the CPU cores), sized to fit: 1,000 steps instead of 3,000,
   20 episodes per task instead of 50, no videos, task embeddings instead of MiniLM. Its time is
   kept back from the sections before it.

The wheels the GPU machine lacks, and the exact command: docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from drifting_vla.benchmarks.inputs import compose_config, objective_named, synthetic_batch
from drifting_vla.benchmarks.model import chunk_latency_rows, inference, one_cpu_thread
from drifting_vla.benchmarks.timing import Row, peak_memory, reset_peak_memory, time_call
from drifting_vla.benchmarks.train import (
    TrainingStep,
    frozen_encoders,
    step_split,
    with_cached_features,
)
from drifting_vla.models import build_model

TRAINING_OBJECTIVES = ("flow_matching", "drifting")
"""Compared on one network; the first is the baseline row."""

FEATURE_SOURCES = ("images", "feature cache")


@dataclass(frozen=True)
class Sizes:
    """What one run measures and how long each section may need (skipped with less time left)."""

    models: tuple[str, ...]  # model configs trained; the first is also the inference model
    overrides: tuple[str, ...]  # Hydra overrides for every model
    matmul: int  # n of the n x n x n bf16 product giving the peak rate
    compile: dict  # torch.compile keyword arguments
    timing: dict  # time_call keyword arguments
    quickstart: tuple[str, ...]  # scripts/train.py overrides
    needs_s: dict[str, float]


TASK_EMBEDDINGS = ("~model.language", "+model.language={name:task_embedding}")
"""The quickstart's language encoder replaced whole by learned task embeddings: MiniLM's weights ship
in an 88 MB package, more than travels to the GPU machine."""


GPU = Sizes(
    models=("dit_b2", "dit_l2"),
    # The GPU machine has no hub: random weights, and the CLIP tokenizer from open_clip's BPE file.
    overrides=("data=rlbench", "training=baseline", "model.pretrained=false", "model.language.tokenizer=open_clip"),
    matmul=8192,
    compile={"dynamic": False},  # static shapes, as in a training run (one G) and at batch 1
    timing={},
    quickstart=(
        *TASK_EMBEDDINGS,
        "data.collect_workers=14", "training.max_steps=1000", "training.eval.episodes=20", "training.eval.workers=14",
        "training.eval.videos_per_task=0",  # videos need imageio-ffmpeg: one more (30 MB) wheel to carry
    ),
    needs_s={"matmul": 10, "train": 60, "train compiled": 150, "inference": 60, "inference compiled": 150, "quickstart": 240},
)

SMOKE = Sizes(
    models=("tiny",),
    overrides=(
        "data=rlbench", "training=baseline", "model.pretrained=false", "training.batch_size=4",
        "model.language.instructions=[task number 0,task number 1,task number 2,task number 3,task number 4]",
        "~model.vision",  # a frozen backbone, so the encoder split and the feature cache run
        "+model.vision={name: dinov2, name_or_path: random, input_size: 28, arch: {hidden_size: 32, "
        "num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64, patch_size: 14, image_size: 28}}",
    ),
    matmul=128,
    # dynamo traces the DiT; Inductor's code generation would take a minute on 2 cores
    compile={"backend": "eager", "dynamic": False},
    timing={"warmup": 1, "repeats": 1, "min_seconds": 0.0},
    quickstart=(
        *TASK_EMBEDDINGS, "data.tasks=[drawer-close-v3]", "data.train_seeds.count=2", "data.max_episode_steps=100",
        "data.collect_workers=1", "training.max_steps=2", "training.warmup_steps=1", "training.batch_size=4", "training.val_every=0",
        "training.eval.episodes=1", "training.eval.workers=1", "training.eval.videos_per_task=0",
    ),
    needs_s={"matmul": 1, "train": 1, "train compiled": 1, "inference": 1, "inference compiled": 1, "quickstart": 1},
)


class Budget:
    """Seconds left of the run's `total` for the next section, `reserve` held back for the last."""

    def __init__(self, total: float, reserve: float) -> None:
        self.end, self.reserve = time.perf_counter() + total, reserve

    def left(self) -> float:
        return self.end - self.reserve - time.perf_counter()


def run(args) -> list[Row]:
    device = torch.device(args.device)
    with one_cpu_thread(device):  # the CPU smoke's tiny ops: two threads on a busy CPU were 10x slower
        return _run(args, SMOKE if args.smoke else GPU, device)


def _run(args, sizes: Sizes, device: torch.device) -> list[Row]:
    budget = Budget(args.budget_s, sizes.needs_s["quickstart"] if args.quickstart else 0.0)
    rows = _section(budget, sizes.needs_s["matmul"], "bf16 matmul", lambda: [_matmul_row(device, sizes)])
    peak = 2 * sizes.matmul**3 / rows[0].seconds if rows[0].seconds else None  # flop/s
    flops: dict[tuple[str, str, str], int] = {}  # counted in the eager sections, read by the compiled ones
    inference_variants = {"eager": ["eager"], "compile": ["compile", "CUDA graphs"]}
    for model_name in sizes.models:
        cfg = compose_config([f"model={model_name}", *sizes.overrides])
        for variant, kwargs in (("eager", None), ("compile", sizes.compile)):
            needs = sizes.needs_s["train" if kwargs is None else "train compiled"]
            rows += _section(budget, needs, f"{model_name} training, {variant}",
                             partial(_training_rows, cfg, device, variant, kwargs, sizes.timing, flops, peak))
            if model_name == sizes.models[0]:  # before the next training section: the latency aim comes first
                rows += [row for v in inference_variants[variant] for row in _inference_section(cfg, device, sizes, budget, v)]
    if args.quickstart:
        budget.reserve = 0.0
        rows += _section(budget, sizes.needs_s["quickstart"], "quickstart", lambda: [_quickstart_row(device, sizes, budget.left())])
    return rows


def _section(budget: Budget, needs_s: float, title: str, rows: Callable[[], list[Row]]) -> list[Row]:
    """`rows()` if the budget has `needs_s` left, else one row saying it was skipped. A section
    that raises becomes a row saying so: the run is one lease of a GPU, and one broken section
    must not cost the others' figures (scripts/benchmark.py still exits non-zero)."""
    left = budget.left()
    if left < needs_s:
        return [Row("gpu", title, None, extra={"skipped": f"{max(left, 0):.0f} s of the budget left, needs {needs_s:.0f} s"})]
    start = time.perf_counter()
    try:
        out = rows()
    except Exception as err:  # noqa: BLE001 (reported in the table and on stderr, not swallowed)
        traceback.print_exc()
        return [Row("gpu", title, None, extra={"failed": f"{type(err).__name__}: {err}"[:300]})]
    print(f"[gpu] {title}: {time.perf_counter() - start:.0f} s, {budget.left():.0f} s of the budget left", flush=True)
    return out


def _matmul_row(device: torch.device, sizes: Sizes) -> Row:
    n = sizes.matmul
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = time_call(lambda: a @ b, **sizes.timing)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # The card and the PyTorch build travel with the figures: a JSON file read later names both.
    extra = {"TFLOP/s": round(2 * n**3 / seconds / 1e12, 1), "device": card, "torch": torch.__version__}
    return Row("gpu", f"bf16 matmul {n}x{n}x{n}", seconds, extra=extra)


def _build(cfg, device: torch.device):
    """The model with its parameters created on `device` (a 1B-parameter init on the CPU takes long)."""
    with torch.device(device):
        return build_model(cfg).to(device)


def trainable_flops(step: TrainingStep) -> int:
    """FLOPs of one step outside the frozen encoders, counted by FlopCounterMode (forward and
    backward of every matmul, convolution and attention; the optimizer's elementwise work is not
    counted, as MFU conventionally does not). A first, uncounted step fills the text encoder's
    per-instruction cache, as in every step after the first."""
    step()
    with FlopCounterMode(display=False) as total:
        step()
    frozen = frozen_encoders(step.model, step.batch)
    if frozen is None:
        return total.get_total_flops()
    with FlopCounterMode(display=False) as encoders:
        frozen()
    return total.get_total_flops() - encoders.get_total_flops()


def _training_rows(cfg, device, variant: str, compile_kwargs: dict | None, timing: dict, flops: dict, peak: float | None) -> list[Row]:
    """Steps of each objective on each feature source; `compile_kwargs` None: eager."""
    torch._dynamo.reset()  # compiled code of an earlier section's model must not count against the recompile limit
    model = _build(cfg, device).train()
    images = synthetic_batch(cfg, device)
    batches = {"images": images, "feature cache": with_cached_features(model, images)}
    if compile_kwargs is not None:
        model.dit.compile(**compile_kwargs)  # as the trainer does for training.compile
    rows = []
    for source in FEATURE_SOURCES:
        for name in TRAINING_OBJECTIVES:
            step = TrainingStep(model, objective_named(cfg, name), batches[source], device)
            key = (cfg.model.name, source, name)
            if compile_kwargs is None:
                flops[key] = trainable_flops(step)
            reset_peak_memory(device)
            seconds = time_call(step, **timing)
            memory = peak_memory(device)
            split = step_split(step, **timing)
            trainable_seconds = seconds - split["frozen_encoders"]
            shares = {**split, "network": seconds - sum(split.values())}
            extra = {"obs/s": round(len(images["actions"]) / seconds, 1), **{k: f"{v / seconds:.0%}" for k, v in shares.items()}}
            if key in flops:
                extra["TFLOP/step"] = round(flops[key] / 1e12, 3)
                extra["MFU"] = f"{flops[key] / trainable_seconds / peak:.1%}" if peak else "n/a (no matmul rate)"
            title = f"{cfg.model.name} B={len(images['actions'])} {variant}, {source}:"
            baseline = None if name == TRAINING_OBJECTIVES[0] else f"{title} {TRAINING_OBJECTIVES[0]} G=1"
            rows.append(Row("gpu", f"{title} {name} G={step.objective.num_samples}", seconds, baseline, {**extra, **memory}))
            del step  # its AdamW state: two copies of the trainable weights
    return rows


def _inference_section(cfg, device: torch.device, sizes: Sizes, budget: Budget, variant: str) -> list[Row]:
    """Inference rows of one variant: eager, compile (the DiT) or CUDA graphs (compile mode
    "reduce-overhead")."""
    kwargs = {"eager": None, "compile": sizes.compile, "CUDA graphs": {**sizes.compile, "mode": "reduce-overhead"}}[variant]
    title = f"{cfg.model.name} inference, {variant}"
    if variant == "CUDA graphs" and device.type != "cuda":
        return [Row("gpu", title, None, extra={"skipped": "CUDA graphs need a CUDA device"})]
    needs = sizes.needs_s["inference" if kwargs is None else "inference compiled"]
    return _section(budget, needs, title, partial(_inference_rows, cfg, device, variant, kwargs, sizes.timing))


def _inference_rows(cfg, device: torch.device, variant: str, compile_kwargs: dict | None, timing: dict) -> list[Row]:
    """One chunk at batch 1 per protocol, end to end and head only; `compile_kwargs` None: eager."""
    torch._dynamo.reset()
    model = _build(cfg, device).eval()
    if compile_kwargs is not None:
        model.dit.compile(**compile_kwargs)
    obs = synthetic_batch(cfg, device, batch_size=1)
    encode = inference(device, lambda: model.encode_condition(obs))
    condition = encode()
    title = f"{cfg.model.name} chunk, {variant}"
    return [
        *chunk_latency_rows("gpu", f"{title}, end to end", model, cfg, encode, time_call(encode, **timing), **timing),
        *chunk_latency_rows("gpu", f"{title}, head only", model, cfg, lambda: condition, **timing),
    ]


def _quickstart_row(device: torch.device, sizes: Sizes, timeout_s: float) -> Row:
    """`drifting-train` from an empty demo cache: collection, training on `device`, evaluation."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "drifting_vla.cli.train", f"hydra.run.dir={run_dir}", f"data.root={tmp}/demos",
                   f"device={device.type}", "training.wandb.mode=disabled", *sizes.quickstart]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(timeout_s, 1.0))
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"drifting-train exited with {done.returncode}:\n{done.stderr[-3000:]}")
        summary = json.loads((run_dir / "summary.json").read_text())
    return Row("gpu", "quickstart end to end (collect, train, evaluate)", seconds,
               extra={"success_rate": summary["success_rate"], "episodes": summary["episodes"], "overrides": " ".join(sizes.quickstart)})
