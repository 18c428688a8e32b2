"""Objectives on one network: each owns its training loss AND its sampler.

An objective is the only place that knows what the network's input x and time t are and what its
output means, so training, validation, panels, the closed-loop policy and the benchmarks all draw
chunks through `objective.sample(...)`: what is evaluated is what was trained. A checkpoint records
`training.objective`, and a loaded policy rebuilds the same objective.

    objective            network input x, t                      output      sample (nfe network calls)
    drifting             noise, t = 0                            chunk       1: the output
    regression           zeros, t = 0                            chunk       1: the output
    flow_matching        x_t = t eps + (1 - t) a, t in [0, 1]    eps - a     Euler from t = 1 to 0
    diffusion            x_k = sqrt(ab_k) a + sqrt(1 - ab_k) eps eps or a    DDIM (eta 0) or DDPM (eta 1)

Padded chunk steps (past an episode's end) repeat the episode's last action, and EVERY objective
learns them as the "hold" target: no objective masks them. This is Diffusion Policy's rule, and
the only one the drifting loss can follow, since its drift problems span the whole chunk.

A new objective is one class in `OBJECTIVES`; the trainer and the policy never change.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from drifting_vla.data.neighbours import NeighbourIndex, NeighbourPositives
from drifting_vla.data.sample_queue import SampleQueue
from drifting_vla.objectives.losses import DriftingLoss


@dataclass
class ObjectiveOutput:
    """loss: scalar. metrics: 0-dim detached tensors (no host sync until the caller logs them)."""

    loss: Tensor
    metrics: dict[str, Tensor]


class Objective(ABC):
    """What the trainer and the policy rely on. Subclasses set `name`, `num_samples` (chunks per
    observation in a training step), `default_nfe`, `samplers` (first is the default; None for a
    sampler with no variants) and implement `training_inputs`, `__call__` and `_sample`."""

    name: str
    num_samples: int = 1
    default_nfe: int = 1
    max_nfe: int = 1
    samplers: tuple[str | None, ...] = (None,)

    @abstractmethod
    def training_inputs(self, batch_size: int, horizon: int, noise_dim: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The random draws of one training step for `batch_size` observations, every tensor with
        the observation on dim 0, drawn on the CPU from `generator` (the trainer draws them for the
        global batch and slices each rank's share)."""

    @abstractmethod
    def __call__(self, model, obs: dict, actions: Tensor, inputs: dict[str, Tensor]) -> ObjectiveOutput:
        """The training loss of `model` (possibly DDP-wrapped) on normalized expert chunks [B, T, A]."""

    def resolve(self, nfe: int | None = None, sampler: str | None = None) -> tuple[int, str | None]:
        """(nfe, sampler) with defaults filled in; an error naming the objective for a bad value."""
        nfe = self.default_nfe if nfe is None else int(nfe)
        sampler = self.samplers[0] if sampler is None else str(sampler)
        if not 1 <= nfe <= self.max_nfe:
            allowed = "1 (it is a one-step generator)" if self.max_nfe == 1 else f"1..{self.max_nfe}"
            raise ValueError(f"nfe={nfe} is not valid for the {self.name} objective: use {allowed}")
        if sampler not in self.samplers:
            raise ValueError(f"sampler={sampler!r} is not valid for the {self.name} objective: choose from {self.samplers}")
        return nfe, sampler

    def label(self, nfe: int | None = None, sampler: str | None = None) -> str:
        """e.g. 'drifting nfe=1', 'diffusion/ddim nfe=10': names a sampling protocol in results."""
        nfe, sampler = self.resolve(nfe, sampler)
        return f"{self.name}{'' if sampler is None else '/' + sampler} nfe={nfe}"

    @torch.no_grad()
    def sample(
        self,
        model,
        condition,
        num_samples: int = 1,
        nfe: int | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """`num_samples` chunks per observation of `condition`, [B, G, T, A], normalized actions.
        Every random draw comes from `generator` on the CPU: same generator state, same chunks."""
        nfe, sampler = self.resolve(nfe, sampler)
        return self._sample(model, condition, num_samples, nfe, sampler, generator)

    @abstractmethod
    def _sample(self, model, condition, num_samples, nfe, sampler, generator) -> Tensor:
        """`sample` with nfe and sampler resolved."""

    def state_dict(self) -> dict:
        """What a resumed run needs beyond the weights (drifting's sample queue or neighbour table);
        tensors and plain values."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state

    def training_datasets(self, train_set, val_set):
        """The (train, val) datasets this objective trains and validates on: the given ones,
        unless it needs more in a batch than the data gives (drifting's neighbour positives)."""
        return train_set, val_set

    @torch.no_grad()
    def field(self, samples: Tensor, actions: Tensor) -> Tensor:
        """Where training moves each sample [B, G, T, A] (the panels draw it): the expert minus the
        sample, unless an objective knows better (drifting: its drift field)."""
        return actions[:, None] - samples


def _unwrap(model):
    """The DriftingVLA inside a data-parallel wrapper (DDP keeps it as `.module`)."""
    return getattr(model, "module", model)


def _require_action_sized_noise(model, objective: str) -> None:
    model = _unwrap(model)
    if model.noise_dim != model.action_spec.network_dim:
        raise ValueError(
            f"the {objective} objective feeds noisy action chunks to the network, so model.noise_dim must "
            f"equal the network's action dimension {model.action_spec.network_dim} (got {model.noise_dim}); set model.noise_dim=null"
        )


def _mse(prediction: Tensor, target: Tensor) -> ObjectiveOutput:
    loss = (prediction.float() - target.float()).square().mean()
    return ObjectiveOutput(loss, {"loss": loss.detach()})


class DriftingObjective(Objective):
    """G chunks per observation from G noise draws; one drift problem per observation with the
    expert chunk as positive, plus `positives.k` extra positives (`training.drifting.positives`):

        source       extra positives of an observation
        self         none
        queue        chunks of the same task drawn from a queue that only training batches fill
                     (validation runs without grad and leaves it alone)
        neighbours   the expert chunks of its k nearest training observations of the same task
                     (`data/neighbours.py`), carried by the batch as `neighbour_actions`

    Extra positives enter the observation's own problem like the expert chunk, with column weight
    `positives.weight` (the expert's is 1)."""

    name = "drifting"

    def __init__(self, cfg) -> None:
        d, p = cfg.drifting, cfg.drifting.positives
        self.num_samples = int(cfg.num_samples)
        self.loss = DriftingLoss(tuple(d.temperatures), affinity_floor=float(d.affinity_floor), grouping=str(d.grouping))
        self.source, self.extra_positives = str(p.source), int(p.k)
        self.extra_weight, self.exclude_own_episode = float(p.weight), bool(p.exclude_own_episode)
        self.queue = SampleQueue(capacity_per_task=int(p.queue_size)) if self.source == "queue" else None
        self.train_positives: NeighbourPositives | None = None

    def training_datasets(self, train_set, val_set):
        """With neighbour positives, both splits' items carry their training neighbours' chunks.
        The index is built here, from the data alone (seconds; `data/neighbours.py`), by every
        rank alike: each holds the whole training split."""
        if self.source != "neighbours":
            return train_set, val_set
        index = NeighbourIndex(train_set, self.extra_positives, self.exclude_own_episode)
        self.train_positives = NeighbourPositives(train_set, index.neighbours(), index.chunks)
        val = None if val_set is None else NeighbourPositives(val_set, index.query(val_set), index.chunks)
        return self.train_positives, val

    def training_inputs(self, batch_size, horizon, noise_dim, generator):
        inputs = {"noise": torch.randn((batch_size, self.num_samples, horizon, noise_dim), generator=generator)}
        if self.queue is not None:  # which queued chunks serve as extra positives
            inputs["queue_draws"] = torch.rand((batch_size, self.extra_positives), generator=generator)
        return inputs

    def __call__(self, model, obs, actions, inputs):
        samples = _unwrap(model).to_actions(model(obs, inputs["noise"]))
        if self.source == "self":
            out = self.loss(samples, actions[:, None])
        else:
            extra = self._extra_positives(obs, actions, inputs)
            weights = torch.tensor([1.0] + [self.extra_weight] * extra.shape[1])
            out = self.loss(samples, torch.cat([actions[:, None], extra], dim=1), pos_weight=weights)
        return ObjectiveOutput(out.loss, out.metrics)

    def _extra_positives(self, obs, actions, inputs) -> Tensor:
        """[B, k, T, A] normalized chunks."""
        if self.source == "neighbours":
            if "neighbour_actions" not in obs:
                raise ValueError("positives.source=neighbours but the batch has no neighbour_actions: train on the "
                                 "datasets objective.training_datasets() returns")
            return obs["neighbour_actions"].to(actions)
        if torch.is_grad_enabled():
            self.queue.push(list(obs["task"]), actions.detach())
        return self.queue.sample(list(obs["task"]), self.extra_positives, inputs["queue_draws"]).to(actions)

    def _sample(self, model, condition, num_samples, nfe, sampler, generator):
        noise = model.sample_noise(condition.batch_size, num_samples, condition.pooled.device, generator)
        return model.to_actions(model.predict(condition, noise))

    def state_dict(self) -> dict:
        """The queue, or the training split's neighbour table: a resumed run trains on the
        neighbours the killed one had, even where a rebuild elsewhere (another CPU's arithmetic)
        would break a near-tie the other way. Validation's are rebuilt: they move no weight."""
        if self.queue is not None:
            return {"queue": self.queue.state_dict()}
        return {} if self.train_positives is None else {"neighbours": self.train_positives.neighbours}

    def load_state_dict(self, state: dict) -> None:
        if self.queue is not None and "queue" in state:
            self.queue.load_state_dict(state["queue"])
        if self.train_positives is not None and "neighbours" in state:
            saved, built = state["neighbours"], self.train_positives.neighbours
            if saved.shape != built.shape:
                raise ValueError(
                    f"the checkpoint's neighbour table is {tuple(saved.shape)} (samples x k) and this run's is "
                    f"{tuple(built.shape)}: resume with the same data and training.drifting.positives.k"
                )
            self.train_positives.neighbours = saved

    @torch.no_grad()
    def field(self, samples, actions):
        return self.loss(samples, actions[:, None]).field


class RegressionObjective(Objective):
    """The simplest baseline: the same network fed zeros (not noise) at t = 0, trained by MSE to
    the expert chunk; deterministic in training and at inference."""

    name = "regression"

    def __init__(self, cfg) -> None:
        del cfg

    def training_inputs(self, batch_size, horizon, noise_dim, generator):
        return {}

    def __call__(self, model, obs, actions, inputs):
        zeros = actions.new_zeros((len(actions), 1, _unwrap(model).horizon, _unwrap(model).noise_dim))
        return _mse(_unwrap(model).to_actions(model(obs, zeros))[:, 0], actions)

    def _sample(self, model, condition, num_samples, nfe, sampler, generator):
        zeros = condition.pooled.new_zeros((condition.batch_size, 1, model.horizon, model.noise_dim))
        return model.to_actions(model.predict(condition, zeros)).expand(-1, num_samples, -1, -1)


class FlowMatchingObjective(Objective):
    """Rectified flow (pi0's convention): x_t = t eps + (1 - t) a, the network predicts the
    velocity eps - a, sampling integrates dx/dt from t = 1 (noise) to 0 with `nfe` Euler steps.
    t ~ uniform, or pi0's Beta(alpha, 1) on [0.001, 1], which favours noisy times."""

    name = "flow_matching"
    default_nfe = 10
    max_nfe = 1000

    def __init__(self, cfg) -> None:
        f = cfg.flow_matching
        self.time_distribution = str(f.time_distribution)
        self.beta_alpha = float(f.beta_alpha)

    def training_inputs(self, batch_size, horizon, noise_dim, generator):
        u = torch.rand((batch_size, 1), generator=generator)
        # Beta(alpha, 1) by inverse CDF (its CDF is t^alpha), so the draw follows the generator.
        t = u if self.time_distribution == "uniform" else 0.001 + 0.999 * u.pow(1.0 / self.beta_alpha)
        return {"noise": torch.randn((batch_size, 1, horizon, noise_dim), generator=generator), "t": t}

    def __call__(self, model, obs, actions, inputs):
        _require_action_sized_noise(model, self.name)
        eps, t = inputs["noise"], inputs["t"]
        a = actions[:, None]
        x_t = t[..., None, None] * eps + (1 - t[..., None, None]) * a
        return _mse(model(obs, x_t, t), eps - a)

    def _sample(self, model, condition, num_samples, nfe, sampler, generator):
        _require_action_sized_noise(model, self.name)
        x = model.sample_noise(condition.batch_size, num_samples, condition.pooled.device, generator)
        for i in range(nfe):
            t = x.new_full(x.shape[:2], 1.0 - i / nfe)
            x = x - model.predict(condition, x, t) / nfe
        return x


class DiffusionObjective(Objective):
    """DDPM with Diffusion Policy's defaults: 100 training timesteps, the squaredcos_cap_v2 noise
    schedule, epsilon (or sample) prediction, predicted chunks clipped to the normalized range.
    Sampling with `nfe` steps on trailing timesteps (so 1 step starts from pure noise): DDIM
    (eta = 0) or DDPM (eta = 1; with nfe = 100 this is exactly the ancestral sampler)."""

    name = "diffusion"
    samplers = ("ddim", "ddpm")
    default_nfe = 10

    def __init__(self, cfg) -> None:
        d = cfg.diffusion
        self.num_train_timesteps = int(d.num_train_timesteps)
        self.max_nfe = self.num_train_timesteps
        self.prediction_type = str(d.prediction_type)
        self.clip_sample = bool(d.clip_sample)
        self.alphas_cumprod = _squaredcos_cap_v2_alphas_cumprod(self.num_train_timesteps)

    def _time(self, k: Tensor) -> Tensor:
        """Integer timestep k in [0, K) -> the network's t in [0, 1)."""
        return k.float() / self.num_train_timesteps

    def training_inputs(self, batch_size, horizon, noise_dim, generator):
        return {
            "noise": torch.randn((batch_size, 1, horizon, noise_dim), generator=generator),
            "k": torch.randint(0, self.num_train_timesteps, (batch_size, 1), generator=generator),
        }

    def __call__(self, model, obs, actions, inputs):
        _require_action_sized_noise(model, self.name)
        eps, k = inputs["noise"], inputs["k"]
        ab = self.alphas_cumprod.to(actions.device)[k][..., None, None]
        a = actions[:, None]
        x_k = ab.sqrt() * a + (1 - ab).sqrt() * eps
        target = eps if self.prediction_type == "epsilon" else a
        return _mse(model(obs, x_k, self._time(k)), target)

    def _sample(self, model, condition, num_samples, nfe, sampler, generator):
        _require_action_sized_noise(model, self.name)
        eta = 0.0 if sampler == "ddim" else 1.0
        x = model.sample_noise(condition.batch_size, num_samples, condition.pooled.device, generator)
        ab = self.alphas_cumprod.to(x.device)
        steps = [round(self.num_train_timesteps - i * self.num_train_timesteps / nfe) - 1 for i in range(nfe)]
        for i, k in enumerate(steps):
            ab_t = ab[k]
            ab_prev = ab[steps[i + 1]] if i + 1 < nfe else ab.new_tensor(1.0)
            out = model.predict(condition, x, x.new_full(x.shape[:2], k / self.num_train_timesteps))
            x0 = (x - (1 - ab_t).sqrt() * out) / ab_t.sqrt() if self.prediction_type == "epsilon" else out
            if self.clip_sample:
                x0 = x0.clamp(-1.0, 1.0)
            eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()  # consistent with the clipped x0
            sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma.square()).clamp_min(0).sqrt() * eps
            if eta > 0 and i + 1 < nfe:
                x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
        return x


def _squaredcos_cap_v2_alphas_cumprod(num_steps: int, max_beta: float = 0.999) -> Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021) as betas capped at 0.999, accumulated: [K] fp32."""
    alpha_bar = [math.cos((i / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(num_steps + 1)]
    betas = torch.tensor([min(1 - alpha_bar[i + 1] / alpha_bar[i], max_beta) for i in range(num_steps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0).float()


OBJECTIVES: dict[str, type[Objective]] = {
    "drifting": DriftingObjective,
    "regression": RegressionObjective,
    "flow_matching": FlowMatchingObjective,
    "diffusion": DiffusionObjective,
}


def build_objective(training_cfg) -> Objective:
    name = str(training_cfg.objective)
    if name not in OBJECTIVES:
        raise ValueError(f"training.objective={name!r} is unknown; choose from {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](training_cfg)
