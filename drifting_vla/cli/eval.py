"""Evaluate a checkpoint in simulation: success rate per task, per-episode JSON, rollout videos.

    python scripts/simulate_eval.py checkpoint=runs/2026-01-01_12-00-00
    python scripts/simulate_eval.py checkpoint=exports/drawer          # an export (save_pretrained), or a hub repo id
    python scripts/simulate_eval.py checkpoint=<dir> tasks=[drawer-open-v3] episodes=10 workers=2 \
        execution=ensemble output=eval/drawer
    python scripts/simulate_eval.py checkpoint=<dir> seeds.start=200000 seeds.count=50   # fresh seeds
    python scripts/simulate_eval.py remote=ws://127.0.0.1:8000 seed=0 episodes=10   # through scripts/serve.py
    python scripts/simulate_eval.py checkpoint=<dir> plugins=[my_package.robot]     # a simulator of your own

Seeds: env seeds `seeds.start` .. `seeds.start + seeds.count - 1` (each task resets episode k with
the k-th), by default the checkpoint's data.eval_seeds; `episodes=N` takes the first N. A seed the
checkpoint trained on (data.train_seeds) is refused, naming the overlap.

Names in the checkpoint (data.name, encoders, the objective) only select registered things; a
simulator of your own is registered by a module you name in `plugins` (drifting_vla/plugins.py).

`seed=S` seeds every chunk's noise from (S, env slot, episode, chunk), so an in-process run and a
run through a server (`remote=`) with the same seed execute the same actions and reach the same
success; both run the chunk queue (`execution=chunk`).

Writes <output>/summary.json ({"success_rate", "ci95", "per_task", "episodes", ...}),
<output>/episodes.jsonl and <output>/videos/ (rollout and trajectory videos), and prints the success
table. `wandb_mode=online|offline` also logs the success rates and the trajectory videos
(`eval/trajectory_video`) as a WandB run under <output>/wandb. Keys: drifting_vla/configs/eval.yaml.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from drifting_vla.envs import NO_SIMULATOR, simulation_config
from drifting_vla.envs.seeds import evaluation_seeds
from drifting_vla.evaluation.results import EvalSummary
from drifting_vla.evaluation.rollout import evaluate, protocol_label
from drifting_vla.formats.config import EvalScriptConfig
from drifting_vla.formats.export import local_policy_dir, read_saved_policy
from drifting_vla.formats.validation import validate_eval_config
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.logging.trajectory_video import TRAJECTORY_VIDEO_KEY
from drifting_vla.logging.wandb_logger import RunLogger
from drifting_vla.plugins import load_plugins
from drifting_vla.serving import ChunkedPolicy, PolicyClient
from drifting_vla.serving.server import predict_chunks

log = logging.getLogger("simulate_eval")
DEFAULT_EPISODES = 25
"""Episodes per task for a checkpoint whose data config has no eval_seeds and a command line without seeds."""


@hydra.main(config_path="../configs", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> float:
    config = validate_eval_config(cfg)
    load_plugins(config.plugins)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    policy, data_cfg, checkpoint, method = _policy(config)
    data_cfg = simulation_config(data_cfg)
    if data_cfg is None:
        raise SystemExit(f"{checkpoint}: {NO_SIMULATOR} when training (this script reads it from the checkpoint's config)")
    log.info("checkpoint %s; %s; %s", checkpoint, method, policy.describe())
    seeds = _seeds(config, data_cfg)
    output = Path(config.output)
    settings = asdict(config)
    settings.pop("remote_token")  # a secret: never written to disk
    summary = evaluate(
        policy,
        data_cfg,
        tasks=config.tasks,
        seeds=seeds,
        num_workers=config.workers,
        output_dir=output,
        videos_per_task=config.videos_per_task,
        max_episode_steps=config.max_episode_steps,
        progress=config.progress,
        protocol=protocol_label(data_cfg, method, policy.execution_label),
        record={"checkpoint": checkpoint, "eval": settings},
    )
    print(summary.format_table())
    print(f"wrote {output / 'summary.json'}")
    if config.wandb_mode != "disabled":
        _log_to_wandb(summary, output, config.wandb_mode, config.wandb_project, settings)
    return summary.success_rate


def _seeds(config: EvalScriptConfig, data_cfg) -> list[int]:
    """The env seeds every task is evaluated on: `seeds.start` .. + `seeds.count` when given, else
    the checkpoint's data.eval_seeds, else (a config without them, RLBench's) 0 .. 24; the first
    `episodes` of them, and never a seed of the checkpoint's data.train_seeds."""
    if config.seeds.start is not None:
        return evaluation_seeds(data_cfg, config.episodes, {"start": config.seeds.start, "count": config.seeds.count})
    if data_cfg.get("eval_seeds"):
        return evaluation_seeds(data_cfg, config.episodes)
    episodes = config.episodes or DEFAULT_EPISODES
    log.warning("the checkpoint's data config has no eval_seeds: using seeds 0..%d (choose others with "
                "seeds.start=S seeds.count=N)", episodes - 1)
    return evaluation_seeds(data_cfg, episodes, {"start": 0, "count": episodes})


def _log_to_wandb(summary: EvalSummary, output: Path, mode: str, project: str, settings: dict) -> None:
    """The success rates (the trainer's `sim/` keys) and the trajectory videos as one WandB run."""
    rates = summary.to_dict()
    with RunLogger(output, mode=mode, project=project, run_name=f"eval {output.name}", config=settings) as logger:
        logger.log_metrics({"sim/success_rate": rates["success_rate"],
                            **{f"sim/success_rate/{task}": rate for task, rate in rates["per_task"].items()}}, step=0)
        logger.log_video_files(TRAJECTORY_VIDEO_KEY, summary.trajectory_videos, step=0)


def _policy(config: EvalScriptConfig):
    """(policy for evaluate, the checkpoint's data config, the checkpoint's path, the sampling
    method) for `config`: a DriftingPolicy in-process; with `seed` or `remote`, a seeded chunk queue
    over the local policy or over the server (which samples with its own nfe and sampler)."""
    if config.remote is None and config.checkpoint is None:
        raise ValueError("give checkpoint=<dir> (in-process) or remote=ws://HOST:PORT (a policy server)")
    if (config.remote is not None or config.seed is not None) and config.execution != "chunk":
        raise ValueError("remote= and seed= evaluate with the chunk queue; set execution=chunk")
    execute_steps, seed = config.execute_steps, config.seed
    if config.remote is not None:
        client = PolicyClient(config.remote, token=config.remote_token)
        meta = client.metadata
        policy = ChunkedPolicy(client.predict, meta["horizon"], execute_steps, seed, meta.get("n_obs_steps", 1))
        if config.nfe is not None or config.sampler is not None:
            raise ValueError("nfe= and sampler= are the server's settings with remote=: start scripts/serve.py with them")
        # Either data config only names a simulator: evaluate() builds registered ones alone.
        data = meta["data"] if config.checkpoint is None else _data_config(config.checkpoint)
        return policy, data, meta["checkpoint"], meta["method"]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    if seed is None:
        policy = DriftingPolicy.from_pretrained(
            config.checkpoint,
            device=device,
            execution=config.execution,
            execute_steps=execute_steps,
            ensemble_decay=config.ensemble_decay,
            nfe=config.nfe,
            sampler=config.sampler,
        )
        return policy, policy.cfg["data"], str(policy.checkpoint), policy.method
    local = DriftingPolicy.from_pretrained(config.checkpoint, device=device, nfe=config.nfe, sampler=config.sampler)
    predict = lambda obs, chunk_seed: predict_chunks(local, [obs], chunk_seed)[0]  # noqa: E731
    chunked = ChunkedPolicy(predict, local.horizon, execute_steps, seed, local.n_obs_steps)
    return chunked, local.cfg["data"], str(local.checkpoint), local.method


def _data_config(checkpoint) -> dict:
    return read_saved_policy(local_policy_dir(checkpoint)).cfg["data"]


if __name__ == "__main__":
    main()
