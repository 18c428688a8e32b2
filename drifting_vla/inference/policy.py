"""The closed-loop policy: a trained DriftingVLA, its normalizer and its configs, behind two calls.

    policy = DriftingPolicy.from_checkpoint("runs/x/checkpoints")       # newest whole checkpoint, EMA weights
    chunk = policy.predict_action_chunk(obs)    # [B, T, A] raw units, through the checkpoint's objective
    policy = DriftingPolicy.from_checkpoint(path, nfe=10)                # a flow/diffusion run: 10 steps
    action = policy.select_action(obs)          # [B, A]: the action to execute now, per env
    policy.reset()                              # new episodes (or policy.reset(env_index) for one env)

`obs` is a batch in the dataset's collated format: images uint8 [B, V, 3, H, W], proprio [B, S],
instruction list[str] (B); one unbatched observation (images [V, 3, H, W], proprio [S], one
instruction string) is taken as a batch of one. Row b of every batch is env b (or `env_ids[b]`).

Chunks are drawn by the objective the checkpoint was trained with (`objective.sample`, the same
call validation makes), with `nfe` network evaluations: 1 for drifting and regression.

How chunk steps and control steps line up (horizon T = 8):

    chunk queue, execute_steps k = 4: replan every k control steps, execute the first k actions

        control step t    0  1  2  3  4  5  6  7  8  ...
        chunk @ t=0       a0 a1 a2 a3 .  .  .  .          (a4..a7 dropped)
        chunk @ t=4                   a0 a1 a2 a3 .  .  .  .
        chunk @ t=8                               a0 ...
        generator calls   ^           ^           ^       one per k steps

    temporal ensembling (ACT): a new chunk every control step; the action at step t averages every
    chunk that covers t, weighted w_i = exp(-k * i), i = 0 for the OLDEST chunk (k = ensemble_decay)

        control step t    0  1  2  3  4  ...
        chunk @ t=0       a0 a1 a2 a3 a4 ...
        chunk @ t=1          a0 a1 a2 a3 ...
        chunk @ t=2             a0 a1 a2 ...
        action @ t=2  =  (w0 * c0[2] + w1 * c1[1] + w2 * c2[0]) / (w0 + w1 + w2)
        generator calls   ^  ^  ^  ^  ^                 one per step (batched over envs)

The network is unchanged by either mode: it always predicts a whole chunk from one observation.
Action sanitization belongs to the env (Meta-World clips to [-1, 1]; RLBench normalizes the
quaternion, bounds the workspace and binarizes the gripper).
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import yaml

from drifting_vla.data.normalization import Normalizer
from drifting_vla.models.drifting_vla import DriftingVLA, build_model
from drifting_vla.specs import ActionSpec
from drifting_vla.training.checkpoint import (
    CONFIG_FILE,
    EMA_FILE,
    MODEL_FILE,
    NORMALIZATION_FILE,
    load_weights,
    resolve_checkpoint,
)
from drifting_vla.training.config import training_config
from drifting_vla.training.objectives import Objective, build_objective

EXECUTION_MODES = ("chunk", "ensemble")


class DriftingPolicy:
    """A DriftingVLA with its normalizer and objective, run in closed loop over a batch of envs."""

    def __init__(
        self,
        model: DriftingVLA,
        normalizer: Normalizer,
        objective: Objective,
        execution: str = "chunk",
        execute_steps: int | None = None,
        ensemble_decay: float = 0.01,
        nfe: int | None = None,
        sampler: str | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if execution not in EXECUTION_MODES:
            raise ValueError(f"unknown execution mode {execution!r}; choose one of {EXECUTION_MODES}")
        spec = model.action_spec
        if normalizer.action_spec != spec:
            raise ValueError(
                f"the normalizer's action spec {normalizer.action_spec.to_config()} does not match the "
                f"model's {spec.to_config()}; use the normalization statistics saved with the checkpoint"
            )
        self.objective = objective
        self.nfe, self.sampler = objective.resolve(nfe, sampler)
        self.horizon = int(model.horizon)
        if execute_steps is None:  # half the chunk: Diffusion Policy's 8 of 16
            execute_steps = max(1, self.horizon // 2)
        if not 1 <= execute_steps <= self.horizon:
            raise ValueError(f"execute_steps must be in [1, horizon={self.horizon}], got {execute_steps}")
        if ensemble_decay < 0:
            raise ValueError(f"ensemble_decay must be >= 0, got {ensemble_decay}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.normalizer = normalizer.to(self.device)
        self.action_spec = spec
        self.execution = execution
        self.execute_steps = int(execute_steps)
        self.ensemble_decay = float(ensemble_decay)
        self._queues: dict[int, deque] = {}  # chunk mode: actions left to execute, per env
        self._chunks: dict[int, list[tuple[int, np.ndarray]]] = {}  # ensemble: (start step, chunk)
        self._steps: dict[int, int] = {}  # ensemble: control steps taken, per env

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", **kwargs) -> DriftingPolicy:
        """Load a checkpoint (or the newest whole one of a run) with its EMA weights.

        The model is built with `model.pretrained=false` (architectures from the config's `arch`
        keys, no download): model.safetensors holds every weight, frozen encoders included, and the
        EMA weights (trainable parameters) are laid over it. The objective is the one recorded in
        the checkpoint's config; `nfe` and `sampler` (kwargs) choose how it samples. Returns a policy
        whose `cfg` is the run's resolved config.
        """
        from safetensors.torch import load_file

        path = resolve_checkpoint(path)
        cfg = yaml.safe_load((path / CONFIG_FILE).read_text())
        cfg["model"]["pretrained"] = False
        model = build_model(cfg)
        load_weights(model, path / MODEL_FILE)
        ema = load_file(str(path / EMA_FILE), device="cpu")
        unknown = sorted(set(ema) - set(model.state_dict()))
        if unknown:
            raise KeyError(f"{path / EMA_FILE} has weights the model lacks: {unknown[:5]}")
        model.load_state_dict(ema, strict=False)
        action_spec = ActionSpec.from_config(cfg["data"]["action_spec"])
        normalizer = Normalizer.from_dict(
            json.loads((path / NORMALIZATION_FILE).read_text()),
            action_spec,
            proprio_dim=int(cfg["data"]["proprio_dim"]),
        )
        objective = build_objective(training_config(cfg.get("training", {})))
        policy = cls(model, normalizer, objective, device=device, **kwargs)
        policy.cfg = cfg
        policy.checkpoint = path
        return policy

    # ------------------------------------------------------------------------------------------
    # One generator call

    @torch.inference_mode()
    def predict_action_chunk(self, obs: Mapping, generator: torch.Generator | None = None) -> np.ndarray:
        """obs batch -> [B, T, A] float32 actions in raw units (numpy, like `select_action`).
        One `objective.sample` call with this policy's nfe; every random draw comes from
        `generator` (CPU), so a seeded generator gives the same chunk on any device. One unbatched
        observation gives [T, A]."""
        if isinstance(obs["instruction"], str):
            return self.predict_action_chunk(_as_batch(obs), generator)[0]
        images = torch.as_tensor(obs["images"]).to(self.device)
        proprio = torch.as_tensor(obs["proprio"], dtype=torch.float32).to(self.device)
        batch = {
            "images": images,
            "proprio": self.normalizer.normalize("proprio", proprio),
            "instruction": list(obs["instruction"]),
        }
        training = self.model.training  # the trainer's model goes back to train mode after
        self.model.eval()
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                condition = self.model.encode_condition(batch)
                chunk = self.objective.sample(self.model, condition, 1, self.nfe, self.sampler, generator)[:, 0]
        finally:
            self.model.train(training)
        return self.normalizer.unnormalize("actions", chunk.float()).cpu().numpy()

    # ------------------------------------------------------------------------------------------
    # Closed loop

    def reset(self, env_index: int | None = None) -> None:
        """Forget queued actions and past chunks: of every env, or of env `env_index` only."""
        for state in (self._queues, self._chunks, self._steps):
            if env_index is None:
                state.clear()
            else:
                state.pop(env_index, None)

    def select_action(self, obs: Mapping, env_ids: Sequence[int] | None = None) -> np.ndarray:
        """The action to execute now, float32 [B, A] raw units; row b belongs to env `env_ids[b]`
        (default: env b). Envs that need a new chunk share ONE generator call. One unbatched
        observation gives [A]."""
        if isinstance(obs["instruction"], str):
            return self.select_action(_as_batch(obs), env_ids)[0]
        env_ids = list(range(len(obs["instruction"]))) if env_ids is None else list(env_ids)
        if self.execution == "chunk":
            return self._select_from_queue(obs, env_ids)
        return self._select_ensembled(obs, env_ids)

    def _select_from_queue(self, obs: Mapping, env_ids: list[int]) -> np.ndarray:
        replan = [b for b, env in enumerate(env_ids) if not self._queues.get(env)]
        if replan:
            chunks = self.predict_action_chunk(_rows(obs, replan))
            for b, chunk in zip(replan, chunks, strict=True):
                self._queues[env_ids[b]] = deque(chunk[: self.execute_steps])
        return np.stack([self._queues[env].popleft() for env in env_ids])

    def _select_ensembled(self, obs: Mapping, env_ids: list[int]) -> np.ndarray:
        chunks = self.predict_action_chunk(obs)
        actions = []
        for env, chunk in zip(env_ids, chunks, strict=True):
            t = self._steps.get(env, 0)
            live = [(s, c) for s, c in self._chunks.get(env, []) if t - s < self.horizon]
            live.append((t, chunk))
            self._chunks[env], self._steps[env] = live, t + 1
            weights = np.exp(-self.ensemble_decay * np.arange(len(live)))  # oldest first
            candidates = np.stack([c[t - s] for s, c in live])
            actions.append((weights[:, None] * candidates).sum(0) / weights.sum())
        return np.stack(actions).astype(np.float32)

    @property
    def method(self) -> str:
        """The objective, sampler and NFE this policy samples with, e.g. 'diffusion/ddim nfe=10'."""
        return self.objective.label(self.nfe, self.sampler)

    @property
    def execution_label(self) -> str:
        if self.execution == "chunk":
            return f"chunk {self.execute_steps}/{self.horizon}"
        return f"ensemble decay {self.ensemble_decay:g}"

    def describe(self) -> str:
        mode = f"chunk queue (execute {self.execute_steps} of {self.horizon})"
        if self.execution == "ensemble":
            mode = f"temporal ensembling (horizon {self.horizon}, decay {self.ensemble_decay:g})"
        return f"DriftingPolicy on {self.device}: {self.method}, {mode}"


def _as_batch(obs: Mapping) -> Mapping:
    """One unbatched observation (a single instruction string) -> a batch of one."""
    images, proprio = torch.as_tensor(obs["images"]), torch.as_tensor(obs["proprio"])
    if images.dim() != 4 or proprio.dim() != 1:
        raise ValueError(
            f"one observation needs images [V, 3, H, W] and proprio [S], got {tuple(images.shape)} and "
            f"{tuple(proprio.shape)}; a batch needs images [B, V, 3, H, W], proprio [B, S] and a list of B instructions"
        )
    return {**obs, "images": images[None], "proprio": proprio[None], "instruction": [obs["instruction"]]}


def _rows(obs: Mapping, rows: list[int]) -> dict:
    """The batch restricted to `rows` (images, proprio and instruction; other keys dropped)."""
    index = torch.as_tensor(rows)
    return {
        "images": torch.as_tensor(obs["images"])[index],
        "proprio": torch.as_tensor(obs["proprio"])[index],
        "instruction": [obs["instruction"][r] for r in rows],
    }

