"""Closed-loop evaluation in simulation: episodes run in parallel worker processes, success rates
with Wilson intervals, per-episode records and videos (rollout.py). `SimulationEvaluator` is what
the training loop is handed to score its EMA policy; `scripts/simulate_eval.py` calls `evaluate`
on a saved policy."""

from __future__ import annotations

from pathlib import Path

from drifting_vla.evaluation.results import EvalSummary
from drifting_vla.evaluation.rollout import evaluate, protocol_label
from drifting_vla.formats.validation import training_config


class SimulationEvaluator:
    """`training.eval` of a run's config, applied to whatever policy the trainer hands over."""

    def __init__(self, cfg) -> None:
        self.data, self.settings = cfg.data, training_config(cfg.training).eval

    def __call__(self, policy, output_dir: Path) -> EvalSummary:
        e = self.settings
        return evaluate(policy, self.data, episodes=e.episodes, num_workers=e.workers, output_dir=output_dir,
                        videos_per_task=e.videos_per_task,
                        protocol=protocol_label(self.data, policy.method, policy.execution_label))


__all__ = ["EvalSummary", "SimulationEvaluator", "evaluate", "protocol_label"]
