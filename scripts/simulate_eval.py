"""Evaluate a checkpoint in simulation: success rate per task, per-episode JSON, rollout videos.

    python scripts/simulate_eval.py checkpoint=runs/2026-01-01_12-00-00
    python scripts/simulate_eval.py checkpoint=<dir> tasks=[drawer-open-v3] episodes=10 workers=2 \
        execution=ensemble output=eval/drawer

Writes <output>/summary.json ({"success_rate", "ci95", "per_task", "episodes", ...}),
<output>/episodes.jsonl and <output>/videos/, and prints the success table. Keys: configs/eval.yaml.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from drifting_vla.envs import NO_SIMULATOR, simulation_config  # noqa: E402
from drifting_vla.inference.policy import DriftingPolicy  # noqa: E402
from drifting_vla.inference.rollout import evaluate, evaluation_seeds, protocol_label  # noqa: E402

log = logging.getLogger("simulate_eval")


@hydra.main(config_path="../configs", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> float:
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else str(cfg.device)
    policy = DriftingPolicy.from_checkpoint(
        cfg.checkpoint,
        device=device,
        execution=cfg.execution,
        execute_steps=cfg.execute_steps,
        ensemble_decay=float(cfg.ensemble_decay),
    )
    data_cfg = simulation_config(policy.cfg["data"])
    if data_cfg is None:
        raise SystemExit(f"{policy.checkpoint} was trained on data.name={policy.cfg['data']['name']!r}: {NO_SIMULATOR}")
    log.info("checkpoint %s; %s", policy.checkpoint, policy.describe())
    seeds = evaluation_seeds(data_cfg, cfg.episodes) if "eval_seeds" in data_cfg else None
    if seeds is None:
        episodes = int(cfg.episodes or 25)
        seeds = list(range(episodes))
        log.warning("data config has no eval_seeds: using seeds 0..%d", episodes - 1)
    output = Path(cfg.output)
    summary = evaluate(
        policy,
        data_cfg,
        tasks=list(cfg.tasks) if cfg.tasks is not None else None,
        seeds=seeds,
        num_workers=int(cfg.workers),
        output_dir=output,
        videos_per_task=int(cfg.videos_per_task),
        max_episode_steps=cfg.max_episode_steps,
        progress=bool(cfg.progress),
        protocol=protocol_label(data_cfg, cfg.execution),
    )
    result = {**summary.to_dict(), "checkpoint": str(policy.checkpoint), "eval": OmegaConf.to_container(cfg, resolve=True)}
    (output / "summary.json").write_text(json.dumps(result, indent=2))
    print(summary.format_table())
    print(f"wrote {output / 'summary.json'}")
    return summary.success_rate


if __name__ == "__main__":
    main()
