"""The closed-loop policy: a trained DriftingVLA, its normalizer and its configs, behind two calls.

    policy = DriftingPolicy.from_checkpoint("runs/x/checkpoints")       # newest whole checkpoint, EMA weights
    policy = DriftingPolicy.from_pretrained("me/drifting-drawer")       # an export (a directory or a hub repo)
    policy.save_pretrained("exports/drawer"); policy.push_to_hub("me/drifting-drawer")   # formats/export.py
    policy.export_onnx("drawer.onnx")           # one ONNX graph, observation to chunk (onnx_export.py)
    chunk = policy.predict_action_chunk(obs)    # [B, T, A] raw units, through the checkpoint's objective
    policy = DriftingPolicy.from_checkpoint(path, nfe=10)                # a flow/diffusion run: 10 steps
    action = policy.select_action(obs)          # [B, A]: the action to execute now, per env
    policy.reset()                              # new episodes (or policy.reset(env_index) for one env)

`obs` is a batch in the dataset's collated format: images uint8 [B, V, 3, H, W], proprio [B, S],
instruction list[str] (B); one unbatched observation (images [V, 3, H, W], proprio [S], one
instruction string) is taken as a batch of one. Row b of every batch is env b (or `env_ids[b]`).

Observation history: a policy trained with `data.n_obs_steps` = n > 1 (recorded in its checkpoint)
conditions on the last n observations. `select_action` takes this control step's observation and
keeps each env's window itself (inference/history.py; `reset()` at each episode's start), exactly
as the dataset built it for training; `predict_action_chunk` is stateless and takes the window:
images [B, n, V, 3, H, W] and proprio [B, n, S], oldest first (a dataset batch as it comes).

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

    The average is taken per component kind (`ensemble_actions`): rotations as 6D rotations, since
    q and -q are one rotation (their component-wise mean is zero) and a mean of unit quaternions
    is not unit; binary states (gripper kind) are averaged, then thresholded at 0.5 (a vote).

No non-finite action leaves the policy: out-of-range proprio and non-finite chunks raise named
errors (`predict_action_chunks`, drifting_vla/safety.py); a refused `select_action` leaves every
env's queue and observation window as it was.

The network is unchanged by either mode: it always predicts a whole chunk from one observation.
Action sanitization belongs to the env (Meta-World clips to [-1, 1]; RLBench normalizes the
quaternion, bounds the workspace and binarizes the gripper and ignore_collisions).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from drifting_vla.data.normalization import Normalizer
from drifting_vla.envs import check_saved_env_names
from drifting_vla.formats.config import EXECUTION_MODES
from drifting_vla.formats.export import (
    EXPORT_CONFIG_FILE,
    NORMALIZATION_FILE,
    local_policy_dir,
    read_saved_policy,
)
from drifting_vla.formats.validation import training_config
from drifting_vla.formats.weights import load_weights, pin_referenced_revisions, read_saved_file
from drifting_vla.inference.card import save_policy, upload_export
from drifting_vla.inference.history import ObservationHistory
from drifting_vla.models.drifting_vla import DriftingVLA, build_model
from drifting_vla.objectives import Objective, build_objective
from drifting_vla.precision import autocast_dtype
from drifting_vla.rotations import quaternion_to_rotation6d, rotation6d_to_quaternion
from drifting_vla.safety import (
    PROPRIO_LIMIT,
    NonFiniteActions,
    PolicyRefusal,
    ProprioOutOfRange,
    non_finite_rows,
)
from drifting_vla.specs import ActionSpec, default_execute_steps


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
        cfg: Mapping | None = None,
        precision: str = "auto",
    ) -> None:
        """`cfg`: the run's resolved config, which `save_pretrained` needs to rebuild the network
        (`from_checkpoint` sets it). `precision`: the run's `training.precision` (drifting_vla/precision.py),
        so the policy samples as validation did."""
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
        self.n_obs_steps = int(model.n_obs_steps)
        if execute_steps is None:
            execute_steps = default_execute_steps(self.horizon)
        if not 1 <= execute_steps <= self.horizon:
            raise ValueError(f"execute_steps must be in [1, horizon={self.horizon}], got {execute_steps}")
        if ensemble_decay < 0:
            raise ValueError(f"ensemble_decay must be >= 0, got {ensemble_decay}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        self.normalizer = normalizer.to(self.device)
        self.autocast_dtype = autocast_dtype(precision, self.device)
        self.action_spec = spec
        self.execution = execution
        self.execute_steps = int(execute_steps)
        self.ensemble_decay = float(ensemble_decay)
        self._queues: dict[int, deque] = {}  # chunk mode: actions left to execute, per env
        self._chunks: dict[int, list[tuple[int, np.ndarray]]] = {}  # ensemble: (start step, chunk)
        self._steps: dict[int, int] = {}  # ensemble: control steps taken, per env
        self.replanned: list[int] = []  # envs that drew a new chunk in the latest select_action (videos mark them)
        self._history = ObservationHistory(self.n_obs_steps)  # the last n observations, per env
        self.cfg = None if cfg is None else dict(cfg)
        self.checkpoint: Path | None = None  # where the weights were loaded from

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", **kwargs) -> DriftingPolicy:
        """Load a saved policy: an export (`save_pretrained`), a checkpoint step (which holds the
        export of its EMA policy), or the newest whole step of a run.

        Frozen pretrained encoders that the directory references (pretrained_weights.json) are
        loaded from their source at the recorded revision and hash-checked; every other weight is
        built at random (`model.pretrained=false`, architectures from the config's `arch` keys) and
        loaded strictly from model.safetensors. The objective is the one recorded in the config;
        `nfe` and `sampler` (kwargs) choose how it samples (default: the recorded sampling, else
        the objective's), and it samples at the run's `training.precision`. Returns a policy whose
        `cfg` is the run's resolved config. Weights holding NaN or Inf are refused.
        """
        saved = read_saved_policy(path)
        cfg = saved.cfg
        check_saved_env_names(cfg, saved.path / EXPORT_CONFIG_FILE)
        model = build_model(pin_referenced_revisions(cfg, saved.references))
        load_weights(model, saved.weights, saved.references)
        _check_finite_weights(model, saved.weights)
        action_spec = ActionSpec.from_config(cfg["data"]["action_spec"])
        normalizer = read_saved_file(saved.path / NORMALIZATION_FILE, lambda _file: Normalizer.from_dict(
            saved.normalization, action_spec, proprio_dim=int(cfg["data"]["proprio_dim"])))
        training = training_config(cfg.get("training", {}))
        objective = build_objective(training)
        kwargs.setdefault("precision", training.precision)
        kwargs.setdefault("nfe", saved.nfe)
        kwargs.setdefault("sampler", saved.sampler)
        policy = cls(model, normalizer, objective, device=device, cfg=cfg, **kwargs)
        policy.checkpoint = saved.path
        return policy

    @classmethod
    def from_pretrained(
        cls,
        pretrained_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
        device: str = "cpu",
        **kwargs,
    ) -> DriftingPolicy:
        """`from_checkpoint` on a local directory (an export, a checkpoint or a run), or on a hub
        repo id downloaded into the hub cache (offline: found there, or a clear error). The hub
        arguments are huggingface_hub's; `kwargs`
        are the policy's (nfe, sampler, execution, ...)."""
        directory = local_policy_dir(
            pretrained_name_or_path, revision=revision, cache_dir=cache_dir, force_download=force_download,
            token=token, local_files_only=local_files_only,
        )
        return cls.from_checkpoint(directory, device=device, **kwargs)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, evaluation: str | os.PathLike | None = None, repo_id: str | None = None
    ) -> Path:
        """Write the export (formats/export.py) into `save_directory`: the weights this policy
        runs, its config and objective with this policy's nfe and sampler as the export's default,
        the normalizer, and a model card. Its evaluation table comes from `evaluation` (a
        summary.json of scripts/simulate_eval.py) or else from the run's own final evaluation of
        this checkpoint; `repo_id` names the policy in the card's commands."""
        return save_policy(self, Path(save_directory), repo_id, evaluation)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload Drifting-VLA policy",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        evaluation: str | os.PathLike | None = None,
    ) -> str:
        """save_pretrained into a temporary directory and upload it as one commit (creating the
        repo if needed); returns the commit's URL. Offline (HF_HUB_OFFLINE=1) it fails at once."""
        return upload_export(
            self, repo_id, token=token, private=private, commit_message=commit_message, branch=branch,
            create_pr=create_pr, evaluation=evaluation,
        )

    def export_onnx(self, path: str | os.PathLike, instructions: list[str] | None = None) -> Path:
        """Write this policy's observation-to-chunk path (preprocessing, encoders, fusion, DiT,
        decoder, normalization; the sampler's loop unrolled at this policy's nfe) as one ONNX
        graph with its metadata (onnx_export.py; run it with onnx_policy.OnnxPolicy, no torch).
        Language features are stored for `data.instructions` plus `instructions`."""
        from drifting_vla.inference.onnx_export import export_onnx

        return export_onnx(self, path, instructions)

    # ------------------------------------------------------------------------------------------
    # One generator call

    @torch.inference_mode()
    def predict_action_chunk(self, obs: Mapping, generator: torch.Generator | None = None) -> np.ndarray:
        """obs batch -> [B, T, A] float32 actions in raw units (numpy, like `select_action`).
        One `objective.sample` call with this policy's nfe; every random draw comes from
        `generator` (CPU), so a seeded generator gives the same chunk on any device. One unbatched
        observation gives [T, A]. With n_obs_steps = n > 1, `obs` holds the window of the last n
        observations (module docstring)."""
        return self.predict_action_chunks(obs, 1, generator)[..., 0, :, :]

    def predict_action_chunks(self, obs: Mapping, num_samples: int, generator: torch.Generator | None = None) -> np.ndarray:
        """`num_samples` chunks per observation, [B, G, T, A] raw units ([G, T, A] for one
        unbatched observation), from the same single `objective.sample` call that
        `predict_action_chunk` executes the first of: for measuring what the policy would do
        (`lab/one_positive.score_checkpoint`), not for acting.

        The finite-action guarantee lives here, the one method every inference path calls:
        ProprioOutOfRange for proprio the normalization cannot represent, NonFiniteActions for a
        chunk holding NaN or Inf, each naming the batch rows (drifting_vla/safety.py)."""
        if isinstance(obs["instruction"], str):
            return self.predict_action_chunks(_as_batch(obs, self.n_obs_steps), num_samples, generator)[0]
        images = torch.as_tensor(obs["images"]).to(self.device)
        if self.n_obs_steps > 1 and images.ndim != 6:
            raise ValueError(
                f"this policy conditions on the last {self.n_obs_steps} observations (data.n_obs_steps): give images "
                f"[B, {self.n_obs_steps}, V, 3, H, W] and proprio [B, {self.n_obs_steps}, S], oldest first, got images "
                f"{tuple(images.shape)}; or call select_action with each step's observation, which keeps the window "
                "(reset() at each episode's start)"
            )
        proprio = torch.as_tensor(obs["proprio"], dtype=torch.float32).to(self.device)
        batch = {
            "images": images,
            "proprio": self._representable(self.normalizer.normalize("proprio", proprio)),
            "instruction": list(obs["instruction"]),
        }
        training = self.model.training  # the trainer's model goes back to train mode after
        self.model.eval()
        try:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                condition = self.model.encode_condition(batch)
                chunks = self.objective.sample(self.model, condition, num_samples, self.nfe, self.sampler, generator)
        finally:
            self.model.train(training)
        actions = self.normalizer.unnormalize("actions", chunks.float()).cpu().numpy()
        bad = non_finite_rows(actions)
        if bad:
            raise NonFiniteActions(
                f"the policy ({self.checkpoint or 'in memory'}) drew non-finite actions for batch row(s) {bad}; nothing "
                "was returned. Its weights or the observation of those rows are not what it was trained on", bad)
        return actions

    def _representable(self, proprio: torch.Tensor) -> torch.Tensor:
        """Normalized proprio [B, (n,) S] as given, or ProprioOutOfRange naming the rows and
        dimensions past `PROPRIO_LIMIT` (drifting_vla/safety.py says why they are refused)."""
        outside = ~(proprio.abs() <= PROPRIO_LIMIT)  # NaN compares False: outside too
        if not outside.any():
            return proprio
        rows = outside.flatten(1).any(1).nonzero().flatten().tolist()
        dims = sorted(set(outside.nonzero()[:, -1].tolist()))
        raise ProprioOutOfRange(
            f"proprio of batch row(s) {rows} is outside what this policy's normalization represents at dimension(s) "
            f"{dims}: more than {PROPRIO_LIMIT:g} half-ranges of the training data from its centre (training range "
            f"min {self.normalizer.stats['proprio']['min']}, max {self.normalizer.stats['proprio']['max']}). Send proprio "
            "in the units the policy was trained on", rows)

    # ------------------------------------------------------------------------------------------
    # Closed loop

    def reset(self, env_index: int | None = None) -> None:
        """Forget queued actions, past chunks and past observations: of every env, or of env
        `env_index` only. Call it at the start of every episode."""
        for state in (self._queues, self._chunks, self._steps):
            if env_index is None:
                state.clear()
            else:
                state.pop(env_index, None)
        self._history.reset(env_index)

    def select_action(self, obs: Mapping, env_ids: Sequence[int] | None = None) -> np.ndarray:
        """The action to execute now, float32 [B, A] raw units, given this control step's
        observation; row b belongs to env `env_ids[b]` (default: env b). Envs that need a new chunk
        share ONE generator call. One unbatched observation gives [A]. Call it on every control
        step of an episode: with an observation history, each call records that step."""
        if isinstance(obs["instruction"], str):
            return self.select_action(_as_batch(obs, 1), env_ids)[0]
        env_ids = list(range(len(obs["instruction"]))) if env_ids is None else list(env_ids)
        before = self._history.saved()
        obs = self._history.push_batch(obs, env_ids)
        try:
            if self.execution == "chunk":
                return self._select_from_queue(obs, env_ids)
            return self._select_ensembled(obs, env_ids)
        except PolicyRefusal:  # no env took this step: the caller may ask again for the other rows
            self._history.restore(before)
            raise

    def _select_from_queue(self, obs: Mapping, env_ids: list[int]) -> np.ndarray:
        replan = [b for b, env in enumerate(env_ids) if not self._queues.get(env)]
        self.replanned = [env_ids[b] for b in replan]
        if replan:
            try:
                chunks = self.predict_action_chunk(_rows(obs, replan))
            except PolicyRefusal as refusal:  # its rows are those of the replanning subset
                refusal.rows = [replan[r] for r in refusal.rows]
                raise
            for b, chunk in zip(replan, chunks, strict=True):
                self._queues[env_ids[b]] = deque(chunk[: self.execute_steps])
        return np.stack([self._queues[env].popleft() for env in env_ids])

    def _select_ensembled(self, obs: Mapping, env_ids: list[int]) -> np.ndarray:
        chunks = self.predict_action_chunk(obs)
        self.replanned = list(env_ids)
        actions = []
        for env, chunk in zip(env_ids, chunks, strict=True):
            t = self._steps.get(env, 0)
            live = [(s, c) for s, c in self._chunks.get(env, []) if t - s < self.horizon]
            live.append((t, chunk))
            self._chunks[env], self._steps[env] = live, t + 1
            weights = np.exp(-self.ensemble_decay * np.arange(len(live)))  # oldest first
            candidates = np.stack([c[t - s] for s, c in live])
            actions.append(ensemble_actions(candidates, weights, self.action_spec))
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


def _check_finite_weights(model: DriftingVLA, file: Path) -> None:
    """Refuse weights holding NaN or Inf: such a policy acts with NaN on some or every input."""
    bad = [key for key, value in model.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise ValueError(
            f"the weights loaded from {file} hold NaN or Inf in {len(bad)} tensor(s), e.g. {bad[:3]}; "
            "a policy with them would act with non-finite actions. Load another checkpoint, or the one before it"
        )


def ensemble_actions(candidates: np.ndarray, weights: np.ndarray, action_spec: ActionSpec) -> np.ndarray:
    """The weighted mean of actions [N, A] (raw units) with weights [N] -> one action [A].

    Per component kind: a quaternion is averaged as a 6D rotation (equal for q and -q, continuous)
    and turned back into a unit quaternion with qw >= 0; a gripper-kind (binary) component is
    averaged and thresholded at 0.5, a vote weighted like the rest; other kinds are plain means."""
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    parts = []
    for component, sl in zip(action_spec.components, action_spec.slices().values(), strict=True):
        values = np.asarray(candidates[:, sl], dtype=np.float64)
        if component.kind == "quaternion":
            mean = w @ quaternion_to_rotation6d(torch.from_numpy(values)).numpy()
            parts.append(rotation6d_to_quaternion(torch.from_numpy(mean)).numpy())
        elif component.kind == "gripper":
            parts.append((w @ values > 0.5).astype(np.float64))
        else:
            parts.append(w @ values)
    return np.concatenate(parts)


def _as_batch(obs: Mapping, steps: int) -> Mapping:
    """One unbatched observation (a single instruction string) of `steps` steps -> a batch of one."""
    images, proprio = torch.as_tensor(obs["images"]), torch.as_tensor(obs["proprio"])
    history = 0 if steps == 1 else 1
    if images.dim() != 4 + history or proprio.dim() != 1 + history:
        lead = "" if steps == 1 else f"{steps}, "
        raise ValueError(
            f"one observation needs images [{lead}V, 3, H, W] and proprio [{lead}S], got {tuple(images.shape)} and "
            f"{tuple(proprio.shape)}; a batch needs images [B, {lead}V, 3, H, W], proprio [B, {lead}S] and a list of B instructions"
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

