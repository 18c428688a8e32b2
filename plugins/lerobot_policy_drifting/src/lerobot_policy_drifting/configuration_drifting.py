"""LeRobot's config type `drifting`: LeRobot's fields, mapped onto drifting-vla's own configs.

    LeRobot (this class)                     drifting-vla (what build_model / build_objective read)
    input_features  VISUAL keys (in order)   data.cameras        one camera per image key
                    STATE / ENV keys [S_i]   data.proprio_dim    sum of S_i: concatenated, in order
    output_features action [A]               data.action_spec    one `raw` component of size A
    chunk_size                               data.horizon        T
    n_obs_steps                              data.n_obs_steps    n: observation history
    model (+ model_overrides)                model               drifting_vla/configs/model/<name>.yaml
    objective, num_samples, temperatures     training.*          drifting_vla/configs/training/baseline.yaml
      (+ objective_overrides)
    optimizer_* / scheduler_* (None)         training.*          the same baseline.yaml values

Every setting left at None takes drifting-vla's own default from its packaged YAML, so the plugin
never carries a second copy of a default. Normalization is LeRobot's processor's job (MIN_MAX maps
state and actions to [-1, 1], as drifting-vla's own normalizer does for raw components); images
must reach the network unnormalized, since its vision encoder applies its own statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.optim.optimizers import AdamWConfig
from lerobot.optim.schedulers import CosineDecayWithWarmupSchedulerConfig
from lerobot.utils.constants import ACTION, OBS_STATE
from omegaconf import DictConfig, OmegaConf

from drifting_vla.objectives import OBJECTIVES
from drifting_vla.specs import default_execute_steps

PROPRIO_TYPES = (FeatureType.STATE, FeatureType.ENV)
"""Input types the network reads as one proprio vector."""

SUPPORTED_POSITIVES = ("self", "queue")
"""`drifting.positives.source` values that need nothing beyond a LeRobot batch (neighbour
positives need drifting-vla's own dataset index)."""


@PreTrainedConfig.register_subclass("drifting")
@dataclass
class DriftingConfig(PreTrainedConfig):
    """A one-step Drifting-VLA policy (images + task + state -> an action chunk in one forward pass).

    n_obs_steps: observations the network sees, the current one and n - 1 before it (LeRobot's
    datasets repeat an episode's first frame before its start, as drifting-vla's do).
    chunk_size: T, actions predicted per chunk. n_action_steps: actions executed from each chunk
    before the next is predicted (None: drifting-vla's default, a quarter of the chunk).
    model: a drifting-vla model preset (tiny, dit_s, dit_b2, dit_l2); model_overrides: OmegaConf
    dot-list edits of it, e.g. ["dit.depth=6", "vision.input_size=96"]. instructions: the
    vocabulary of a `task_embedding` language encoder, filled in from the dataset's tasks.
    objective: drifting | regression | flow_matching | diffusion (one network, the loss and the
    sampler change); num_samples: G chunks per observation in a drifting step; temperatures: the
    drifting kernel's; objective_overrides: dot-list edits of the rest of the objective settings,
    e.g. ["drifting.grouping=timestep"]. num_inference_steps / sampler: the sampler's NFE and
    variant (None: the objective's default; drifting is always 1 step).
    """

    n_obs_steps: int = 1
    chunk_size: int = 16
    n_action_steps: int | None = None

    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.MIN_MAX,
            "ACTION": NormalizationMode.MIN_MAX,
        }
    )

    model: str = "dit_s"
    model_overrides: list[str] = field(default_factory=list)
    instructions: list[str] | None = None

    objective: str = "drifting"
    num_samples: int | None = None
    temperatures: list[float] | None = None
    objective_overrides: list[str] = field(default_factory=list)
    num_inference_steps: int | None = None
    sampler: str | None = None

    optimizer_lr: float | None = None
    optimizer_betas: tuple[float, float] | None = None
    optimizer_eps: float = 1e-8
    optimizer_weight_decay: float | None = None
    optimizer_grad_clip_norm: float | None = None
    scheduler_warmup_steps: int | None = None
    scheduler_decay_steps: int | None = None
    scheduler_min_lr_ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_obs_steps < 1:
            raise ValueError(f"policy.n_obs_steps={self.n_obs_steps} must be >= 1 (1: the current observation only)")
        if self.n_action_steps is None:
            self.n_action_steps = default_execute_steps(self.chunk_size)
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise ValueError(
                f"policy.n_action_steps={self.n_action_steps} must be in 1..policy.chunk_size={self.chunk_size}"
            )
        visual = NormalizationMode(self.normalization_mapping.get("VISUAL", NormalizationMode.IDENTITY))
        if visual is not NormalizationMode.IDENTITY:
            raise ValueError(
                f"policy.normalization_mapping VISUAL={visual.value}: images must reach the network as [0, 1] "
                f"(its vision encoder normalizes them itself); use IDENTITY"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"policy.objective={self.objective!r} is unknown; choose from {sorted(OBJECTIVES)}")
        self.training_config()  # unknown override keys and unsupported positives fail here, not mid-run
        self.model_preset()

    @property
    def observation_delta_indices(self) -> list[int] | None:
        """Frames t - n + 1 .. t, oldest first; None for the current frame alone (no history dim)."""
        return None if self.n_obs_steps == 1 else list(range(1 - self.n_obs_steps, 1))

    @property
    def action_delta_indices(self) -> list[int]:
        """The chunk starts at the current frame: actions t .. t + T - 1."""
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None

    @property
    def proprio_features(self) -> dict[str, PolicyFeature]:
        """The STATE and ENV inputs (observation.state, observation.environment_state, ...), in
        order: the network sees them concatenated as its proprio vector."""
        return {k: ft for k, ft in (self.input_features or {}).items() if ft.type in PROPRIO_TYPES}

    def validate_features(self) -> None:
        """The network needs at least one camera, 1-D state inputs (at least one) and a 1-D `action`."""
        present = sorted(self.input_features or {})
        if not self.image_features:
            raise ValueError(f"the drifting policy needs at least one image input; the inputs are {present}")
        if not self.proprio_features:
            raise ValueError(f"the drifting policy needs a state input such as {OBS_STATE!r}; the inputs are {present}")
        not_vectors = {k: ft.shape for k, ft in self.proprio_features.items() if len(ft.shape) != 1}
        if not_vectors:
            raise ValueError(f"the drifting policy reads state inputs as vectors; these are not 1-D: {not_vectors}")
        unused = [k for k, ft in (self.input_features or {}).items() if ft.type not in (FeatureType.VISUAL, *PROPRIO_TYPES)]
        if unused:
            raise ValueError(
                f"the drifting policy has no encoder for the inputs {unused}; leave them out of policy.input_features"
            )
        action = self.action_feature
        if action is None or len(action.shape) != 1:
            outputs = sorted(self.output_features or {})
            raise ValueError(f"the drifting policy needs a 1-D {ACTION!r} output; the outputs are {outputs}")

    def model_preset(self) -> DictConfig:
        """drifting_vla/configs/model/<model>.yaml with `model_overrides` applied (unknown keys are errors)."""
        path = resources.files("drifting_vla.configs") / "model" / f"{self.model}.yaml"
        if not path.is_file():
            presets = sorted(p.name.removesuffix(".yaml") for p in (resources.files("drifting_vla.configs") / "model").iterdir())
            raise ValueError(f"policy.model={self.model!r} is not a drifting-vla model preset; choose from {presets}")
        return _with_overrides(OmegaConf.load(path), self.model_overrides, "policy.model_overrides")

    def network_config(self) -> dict:
        """What drifting_vla.models.build_model reads: `model` and the data-shaped keys."""
        data = {
            "action_spec": {"components": [{"name": ACTION, "kind": "raw", "dim": self.action_feature.shape[0]}]},
            "cameras": list(self.image_features),
            "proprio_dim": sum(ft.shape[0] for ft in self.proprio_features.values()),
            "horizon": self.chunk_size,
            "n_obs_steps": self.n_obs_steps,
        }
        if self.instructions is not None:
            data["instructions"] = list(self.instructions)
        return {"model": self.model_preset(), "data": data}

    def uses_task_embeddings(self) -> bool:
        return self.model_preset().language.name == "task_embedding"

    def training_config(self) -> DictConfig:
        """drifting_vla/configs/training/baseline.yaml with this config's objective settings: what
        drifting_vla.objectives.build_objective reads, and the optimizer defaults."""
        cfg = OmegaConf.load(resources.files("drifting_vla.configs") / "training" / "baseline.yaml")
        cfg.objective = self.objective
        if self.num_samples is not None:
            cfg.num_samples = self.num_samples
        if self.temperatures is not None:
            cfg.drifting.temperatures = list(self.temperatures)
        cfg = _with_overrides(cfg, self.objective_overrides, "policy.objective_overrides")
        source = cfg.drifting.positives.source
        if self.objective == "drifting" and source not in SUPPORTED_POSITIVES:
            raise ValueError(
                f"drifting.positives.source={source!r} needs drifting-vla's dataset index; in LeRobot use one of "
                f"{SUPPORTED_POSITIVES}"
            )
        return cfg

    def get_optimizer_preset(self) -> AdamWConfig:
        """AdamW as drifting-vla trains (the policy's parameter groups keep decay off norms and biases)."""
        t = self.training_config()
        return AdamWConfig(
            lr=_given(self.optimizer_lr, t.learning_rate),
            betas=tuple(_given(self.optimizer_betas, t.betas)),
            eps=self.optimizer_eps,
            weight_decay=_given(self.optimizer_weight_decay, t.weight_decay),
            grad_clip_norm=_given(self.optimizer_grad_clip_norm, t.grad_clip),
        )

    def get_scheduler_preset(self) -> CosineDecayWithWarmupSchedulerConfig:
        """Linear warmup, cosine decay to min_lr_ratio x lr (LeRobot shrinks both phases to fit a
        run shorter than the decay steps)."""
        t = self.training_config()
        lr = _given(self.optimizer_lr, t.learning_rate)
        return CosineDecayWithWarmupSchedulerConfig(
            num_warmup_steps=_given(self.scheduler_warmup_steps, t.warmup_steps),
            num_decay_steps=_given(self.scheduler_decay_steps, t.max_steps),
            peak_lr=lr,
            decay_lr=lr * _given(self.scheduler_min_lr_ratio, t.min_lr_ratio),
        )


def _given(value, default):
    return default if value is None else value


def _with_overrides(cfg: DictConfig, overrides: list[str], where: str) -> DictConfig:
    """cfg with the dot-list `overrides` merged; a key cfg lacks is an error naming it."""
    OmegaConf.set_struct(cfg, True)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as err:
        raise ValueError(f"{where}={list(overrides)}: {err}") from err
