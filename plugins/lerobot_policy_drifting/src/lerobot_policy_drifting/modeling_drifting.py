"""drifting-vla's network and objectives behind LeRobot's `PreTrainedPolicy` interface.

A LeRobot batch, after the `drifting` preprocessor (normalized state and actions, on the device):

    observation.images.<cam>  float [B, 3, H, W] in [0, 1]   --resize to the encoder's input, uint8-->
                                                               images   uint8 [B, V, 3, S, S]
    observation.state         float [B, S]                   -->  proprio  [B, S], every STATE / ENV
                                                                   input concatenated in order
    task                      list[str] (B)                   -->  instruction (and the queue's task key)
    action                    float [B, T, A], action_is_pad bool [B, T]
                              --padded steps set to the last real action-->  the objective's expert chunk

With a history (n_obs_steps = n > 1) every camera is [B, n, 3, H, W] and the state [B, n, S],
oldest first (LeRobot's `observation_delta_indices`), and the network gets images
[B, n, V, 3, S, S] and proprio [B, n, S].

`forward` is one training step of drifting-vla's objective (drifting: G chunks per observation and
the drifting loss); `predict_action_chunk` is that objective's sampler (drifting: one network
call); `select_action` executes `n_action_steps` actions of each chunk before predicting the next,
and keeps the last n observations it was given (the first one repeated until there are n):

    step       0   1   2   3   4   5   6   7   8 ...
    network    *               *               *        (n_action_steps = 4, chunk_size = 16)
    action    c0  c1  c2  c3  c0' c1' c2' c3' c0''
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION
from torch import Tensor

from drifting_vla.models import build_model
from drifting_vla.objectives import build_objective
from drifting_vla.training.optimizer import parameter_groups
from lerobot_policy_drifting.configuration_drifting import DriftingConfig

ACTION_IS_PAD = f"{ACTION}_is_pad"
TASK = "task"


class DriftingPolicy(PreTrainedPolicy):
    config_class = DriftingConfig
    name = "drifting"

    def __init__(self, config: DriftingConfig, dataset_meta=None, **kwargs) -> None:
        """dataset_meta (LeRobotDatasetMetadata, given by LeRobot's make_policy): its tasks become
        the vocabulary of a task-embedding language encoder. Other keyword arguments LeRobot's
        factory passes (dataset_stats) are not needed: the processors normalize."""
        del kwargs
        super().__init__(config)
        config.validate_features()
        if config.uses_task_embeddings() and config.instructions is None:
            config.instructions = _dataset_tasks(dataset_meta)
        self.config = config
        self.model = build_model(config.network_config())
        self.objective = build_objective(config.training_config())
        self.nfe, self.sampler = self.objective.resolve(config.num_inference_steps, config.sampler)
        self.reset()

    def get_optim_params(self) -> list[dict]:
        """drifting-vla's AdamW groups: decay on weight matrices only; frozen encoders left out."""
        return parameter_groups(self.model, self.config.get_optimizer_preset().weight_decay)

    def reset(self) -> None:
        """Forget the queued actions and the observation history (call when an episode starts)."""
        self._action_queue: deque[Tensor] = deque(maxlen=self.config.n_action_steps)
        self._history: dict[str, deque[Tensor]] = {
            key: deque(maxlen=self.config.n_obs_steps) for key in (*self.config.image_features, *self.config.proprio_features)
        }

    def forward(self, batch: dict) -> tuple[Tensor, dict]:
        """The objective's training loss on one normalized batch, and its metrics as floats
        (drifting: loss, lambda_V and the per-temperature drift norms)."""
        obs = self._observation(batch)
        actions = hold_padded_steps(batch[ACTION], batch.get(ACTION_IS_PAD))
        draws = self.objective.training_inputs(len(actions), self.model.horizon, self.model.noise_dim, None)
        inputs = {k: v.to(actions.device) for k, v in draws.items()}
        out = self.objective(self.model, obs, actions, inputs)
        return out.loss, {k: float(v) for k, v in out.metrics.items()}

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict, **kwargs) -> Tensor:
        """Normalized actions [B, chunk_size, A] from the objective's sampler (drifting: one call).
        With a history the batch holds it, as in training ([B, n, ...] per camera and state)."""
        del kwargs
        condition = self.model.encode_condition(self._observation(batch))
        return self.objective.sample(self.model, condition, 1, self.nfe, self.sampler)[:, 0]

    @torch.no_grad()
    def select_action(self, batch: dict, **kwargs) -> Tensor:
        """The next normalized action [B, A] for one observation (no history dim); a new chunk
        every `n_action_steps` calls."""
        del kwargs
        batch = self._remember(batch)
        if not self._action_queue:
            chunk = self.predict_action_chunk(batch)[:, : self.config.n_action_steps]
            self._action_queue.extend(chunk.transpose(0, 1))
        return self._action_queue.popleft()

    def _remember(self, batch: dict) -> dict:
        """The batch with each camera and the state replaced by its last n observations, stacked
        on dim 1 (unchanged for n = 1)."""
        if self.config.n_obs_steps == 1:
            return batch
        for key, history in self._history.items():
            if key not in batch:
                continue  # _observation names what is missing
            if history:
                history.append(batch[key])
            else:  # the episode's first observation stands in for the steps before it
                history.extend([batch[key]] * history.maxlen)
        return {**batch, **{key: torch.stack(list(history), dim=1) for key, history in self._history.items() if history}}

    def _observation(self, batch: dict) -> dict:
        """A LeRobot batch -> drifting-vla's observation dict (see the module docstring)."""
        size = self.model.vision_encoder.backbone.input_size
        missing = [key for key in (*self.config.image_features, *self.config.proprio_features, TASK) if key not in batch]
        if missing:
            raise KeyError(
                f"the batch lacks {missing} (it has {sorted(batch)}); the drifting policy reads every camera and "
                f"state of policy.input_features and the instruction under {TASK!r}"
            )
        frames = [to_uint8_frames(batch[key].flatten(0, -4), size).unflatten(0, batch[key].shape[:-3])
                  for key in self.config.image_features]
        images = torch.stack(frames, dim=-4)  # [B, V, 3, S, S], or [B, n, V, 3, S, S]
        tasks = [batch[TASK]] if isinstance(batch[TASK], str) else list(batch[TASK])
        proprio = torch.cat([batch[key].float() for key in self.config.proprio_features], dim=-1)
        return {"images": images, "proprio": proprio, "instruction": tasks, "task": tasks}


def to_uint8_frames(images: Tensor, size: int) -> Tensor:
    """float [B, 3, H, W] in [0, 1] -> uint8 [B, 3, size, size], resized (antialiased) first so that
    cameras of different sizes stack; the network's own preprocessing then finds the right size."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected camera images [B, 3, H, W], got {tuple(images.shape)}")
    x = images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def hold_padded_steps(actions: Tensor, is_pad: Tensor | None) -> Tensor:
    """actions [B, T, A] with every padded step (is_pad [B, T], past the episode's end) replaced
    by the chunk's last real action: drifting-vla learns padding as "hold", for every objective
    (the drifting loss compares whole chunks, so it cannot mask steps), whatever the padding held."""
    if is_pad is None:
        return actions
    real = ~is_pad.bool()
    if not real[:, 0].all():
        raise ValueError(f"{ACTION_IS_PAD} marks the first step of a chunk as padding; a chunk must start with a real action")
    steps = torch.arange(real.shape[1], device=real.device).expand_as(real)
    last_real = torch.where(real, steps, 0).cummax(1).values  # [B, T]: the latest real step at or before t
    return actions.gather(1, last_real[..., None].expand_as(actions))


def _dataset_tasks(dataset_meta) -> list[str]:
    if dataset_meta is None:
        raise ValueError(
            "this model preset embeds tasks (language.name=task_embedding) and needs their vocabulary: build the "
            "policy with LeRobot's make_policy(cfg, ds_meta=...) or set policy.instructions"
        )
    return sorted(str(task) for task in dataset_meta.tasks.index)
