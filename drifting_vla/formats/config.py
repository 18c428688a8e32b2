"""The schema of every config group: a wrong type, an out-of-range number or an unknown key is an
error naming the key, raised when a run, an evaluation or a server starts, not later.

    validate_run_config(cfg)        # drifting-train's config: seed, device, plugins, data.*, model.*, training.*
    validate_saved_config(cfg)      # a checkpoint's or an export's: the same groups, without the run-start checks
    training_config(cfg.training)   # -> TrainingConfig: training.* over its defaults, what the trainer reads
    validate_eval_config(cfg)       # -> EvalScriptConfig: drifting-eval's keys (configs/eval.yaml)
    validate_serve_config(cfg)      # -> ServeScriptConfig: drifting-serve's keys (configs/serve.yaml)

Each setting is declared once, here, with its default; the base YAML files restate the defaults
beside their reasons and a test keeps the two equal (tests/test_config_defaults.py). The keys an
evaluation executes with (`ExecutionConfig`) are shared by `training.eval` and drifting-eval, and
the server's (`ServerConfig`) by the server and drifting-serve.

Each group is a dataclass. Merging a config into it (OmegaConf structured configs) refuses unknown
keys and wrong types: `training.max_steps=abc`, and `data.tasks=close_jar`, a string where a list
belongs that would otherwise be read as the list of its characters. A field's range or choices
ride in its metadata (`setting(ge=1)`, `setting(min_items=1)` for a list), and one walk checks
them all (`_check_rules`), so a new key gets its check where it is declared: `training.grad_clip=-1`,
which would turn descent into ascent, fails as `config key training.grad_clip=-1.0 must be > 0`.
A number is also always finite: `inf` and `nan` pass no setting. Hydra's struct mode already
refuses unknown keys given on the command line; the schema also catches those mistyped in YAML.

`data.*` is checked against its dataset's schema (`DATA_SCHEMAS`, by `data.name`), `model.vision`
and `model.language` against their encoder's. A dataset or encoder a plugin registers declares its
own keys the same way, a subclass of `DataConfig` (`EncoderConfig`) with `setting()` fields: a
dataset gives it to `register_dataset(name, schema=...)` (drifting_vla/data/registry.py), an encoder
puts it in `VISION_SCHEMAS` (`LANGUAGE_SCHEMAS`) under its name; one that declares none is
checked on the keys all of them share, and its other keys are its builder's.
"""

from __future__ import annotations

import math
import operator
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from drifting_vla.specs import COMPONENT_KINDS

# ----------------------------------------------------------------------------------------------
# How a field carries its rule


def setting(default: Any = MISSING, *, factory=None, ge=None, gt=None, le=None, lt=None, choices=None,
            min_items=None, max_items=None, unique=None):
    """A schema field. `ge`, `gt`, `le`, `lt` bound a number (each number of a list); `choices` is
    a tuple of allowed values, or a function returning them (a registry plugins may extend);
    `min_items`, `max_items` bound the length of a list; `unique` refuses a list naming an item
    twice. Without a default the key is required."""
    given = (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices), ("min_items", min_items),
             ("max_items", max_items), ("unique", unique))
    rules = {k: v for k, v in given if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


BOUNDS = (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="), ("lt", operator.lt, "<"))


SAMPLERS = (None, "ddim", "ddpm")
EXECUTION_MODES = ("chunk", "ensemble")

# ----------------------------------------------------------------------------------------------
# training.*


@dataclass(kw_only=True)
class PositivesConfig:
    source: str = setting("self", choices=("self", "queue", "neighbours"))
    k: int = setting(4, ge=1)
    weight: float = setting(1.0, gt=0)
    queue_size: int = setting(256, ge=1)
    exclude_own_episode: bool = True


@dataclass(kw_only=True)
class DriftingConfig:
    temperatures: list[float] = setting(factory=lambda: [0.02, 0.05, 0.2, 1.0], gt=0, min_items=1)
    affinity_floor: float = setting(1e-6, ge=0)
    grouping: str = setting("chunk", choices=("chunk", "timestep", "dimension"))
    positives: PositivesConfig = setting(factory=PositivesConfig)


@dataclass(kw_only=True)
class FlowMatchingConfig:
    time_distribution: str = setting("beta", choices=("uniform", "beta"))
    beta_alpha: float = setting(1.5, gt=0)


@dataclass(kw_only=True)
class DiffusionConfig:
    num_train_timesteps: int = setting(100, ge=2)
    prediction_type: str = setting("epsilon", choices=("epsilon", "sample"))
    clip_sample: bool = True


@dataclass(kw_only=True)
class AugmentationConfig:
    random_shift: int = setting(0, ge=0)  # pixels of DrQ random shift; 0: off (it lost at the embedded budget)


@dataclass(kw_only=True)
class DistributedConfig:
    strategy: str = setting("ddp", choices=("ddp", "fsdp"))
    backend: str = setting("auto", choices=("auto", "nccl", "gloo"))


@dataclass(kw_only=True)
class ExecutionConfig:
    """How a policy executes its chunks in closed loop and how it samples them: the keys that
    `training.eval` and the evaluation script (configs/eval.yaml) share."""

    execution: str = setting("chunk", choices=EXECUTION_MODES)
    execute_steps: int | None = setting(None, ge=1)
    ensemble_decay: float = setting(0.01, ge=0)
    nfe: int | None = setting(None, ge=1)
    sampler: str | None = setting(None, choices=SAMPLERS)


@dataclass(kw_only=True)
class EvalConfig(ExecutionConfig):
    every: int = setting(0, ge=0)
    at_end: bool = True
    episodes: int = setting(25, ge=1)
    workers: int = setting(8, ge=1)
    videos_per_task: int = setting(2, ge=0)


@dataclass(kw_only=True)
class PanelSchedule:
    frequency: int = setting(0, ge=0)


PANEL_FREQUENCIES = {
    "a1_drifting_field": 1000, "a2_lambda_v_trend": 500, "a3_prediction_vs_ground_truth": 1000, "a4_error_radar": 1000,
    "a5_loss_and_drift_norms": 500, "b1_action_distributions": 2000, "b2_error_heatmap": 2000,
    "b4_end_effector_trajectory": 2000, "c1_sample_transport": 2000, "c2_mode_coverage": 5000,
}
"""Steps between renders of each training panel (docs/training_panels.md): a panel costs 0.2-0.7 s
of CPU on rank 0, so the cheap trend panels come most often."""


@dataclass(kw_only=True)
class WandbConfig:
    mode: str = setting("offline", choices=("online", "offline", "disabled"))
    project: str = "drifting-vla"
    name: str | None = None
    visualizations: dict[str, PanelSchedule] = setting(
        factory=lambda: {name: PanelSchedule(frequency=steps) for name, steps in PANEL_FREQUENCIES.items()})


@dataclass(kw_only=True)
class TrainingConfig:
    """Every default here is that of GPU training of the full model (dit_b2); configs/training/baseline.yaml restates them
    with their reasons (tests/test_config_defaults.py keeps the two equal) and the presets
    (configs/training/quickstart.yaml) override some."""

    objective: str = setting("drifting")  # a name in drifting_vla.objectives.OBJECTIVES (build_objective checks it)
    max_steps: int = setting(100000, ge=1)
    batch_size: int = setting(64, ge=1)
    num_samples: int = setting(8, ge=1)
    grad_accum_steps: int = setting(1, ge=1)
    learning_rate: float = setting(1e-4, gt=0)
    weight_decay: float = setting(0.05, ge=0)
    betas: list[float] = setting(factory=lambda: [0.9, 0.95], ge=0, lt=1, min_items=2, max_items=2)
    warmup_steps: int = setting(1000, ge=0)
    min_lr_ratio: float = setting(0.1, ge=0, le=1)
    grad_clip: float = setting(1.0, gt=0)
    ema_decay: float = setting(0.9999, ge=0, lt=1)
    precision: str = setting("auto", choices=("auto", "bf16", "fp32"))
    compile: bool = False
    num_threads: int | None = setting(None, ge=1)
    nan_policy: str = setting("stop", choices=("stop", "skip"))
    max_skipped_fraction: float = setting(0.05, ge=0, le=1)
    drifting: DriftingConfig = setting(factory=DriftingConfig)
    flow_matching: FlowMatchingConfig = setting(factory=FlowMatchingConfig)
    diffusion: DiffusionConfig = setting(factory=DiffusionConfig)
    log_every: int = setting(50, ge=1)
    val_every: int = setting(2000, ge=0)
    val_batches: int = setting(8, ge=1)
    checkpoint_every: int = setting(5000, ge=1)
    keep_checkpoints: int = setting(3, ge=1)
    resume: str | None = None
    feature_cache: bool = False
    augmentation: AugmentationConfig = setting(factory=AugmentationConfig)
    distributed: DistributedConfig = setting(factory=DistributedConfig)
    eval: EvalConfig = setting(factory=EvalConfig)
    wandb: WandbConfig = setting(factory=WandbConfig)


# ----------------------------------------------------------------------------------------------
# data.*


@dataclass(kw_only=True)
class ActionComponentConfig:
    name: str = setting()
    kind: str = setting(choices=COMPONENT_KINDS)
    dim: int = setting(ge=1)


@dataclass(kw_only=True)
class ActionSpecConfig:
    components: list[ActionComponentConfig] = setting()


@dataclass(kw_only=True)
class SeedRange:
    start: int = setting(ge=0)
    count: int = setting(ge=1)


MAX_IMAGE_SIZE = 1024
"""The largest data.image_size: [B, V, 3, S, S] uint8 batches and the encoders' patch grids grow with
S^2 (a 1024 px, 2-camera batch of 64 is 400 MB before any network); the models here are trained at
32..224 px. Past it a typo (image_size=22400) would fail far from the key, in a framebuffer or in memory."""


@dataclass(kw_only=True)
class DataConfig:
    """The keys every dataset shares (and the simulator settings evaluation reads)."""

    name: str = setting()
    tasks: list[str] | None = setting(None, min_items=1)
    cameras: list[str] = setting(min_items=1, unique=True)
    image_size: int | None = setting(None, ge=1, le=MAX_IMAGE_SIZE)
    proprio_dim: int = setting(ge=1)
    horizon: int = setting(ge=1)
    n_obs_steps: int = setting(1, ge=1)  # observations per sample: the current one and n-1 before it
    action_spec: ActionSpecConfig = setting()
    control_hz: float | None = setting(None, gt=0)
    max_episode_steps: int | None = setting(None, ge=1)
    train_seeds: SeedRange | None = None
    eval_seeds: SeedRange | None = None
    holdout_every: int | None = setting(None, ge=2)  # every Nth episode is the val split, held out of train
    num_workers: int = setting(0, ge=0)
    skip_corrupt: bool = False
    instructions: list[str] | None = None  # learned task embeddings' vocabulary (the trainer fills it in)
    simulator: Any = None  # null, auto, or a registered simulator's data config (drifting_vla.envs)


@dataclass(kw_only=True)
class MetaWorldDataConfig(DataConfig):
    tasks: list[str] = setting(min_items=1)
    image_size: int = setting(ge=1, le=MAX_IMAGE_SIZE)
    max_episode_steps: int = setting(ge=1)
    train_seeds: SeedRange = setting()
    eval_seeds: SeedRange = setting()
    control_hz: float = setting(80.0, gt=0)  # MuJoCo's 2.5 ms timestep x frame_skip 5
    root: str | None = "~/.cache/drifting_vla/metaworld"  # null: this default
    privileged_state: bool = False
    observe_goal: bool = False
    expert: str = setting("stock", choices=("stock", "routes"))
    collect_workers: int = setting(2, ge=1)
    holdout_every: int = setting(10, ge=2)


@dataclass(kw_only=True)
class AlohaDataConfig(DataConfig):
    tasks: list[str] = setting(min_items=1)
    image_size: int = setting(64, ge=1, le=MAX_IMAGE_SIZE)
    max_episode_steps: int = setting(400, ge=1)  # ACT's and LeRobot's evaluation length (8 s)
    train_seeds: SeedRange = setting()
    eval_seeds: SeedRange = setting()
    control_hz: float = setting(50.0, gt=0)  # gym-aloha's DT of 0.02 s
    root: str | None = "~/.cache/drifting_vla/aloha"
    render_mode: str = setting("fast", choices=("fast", "faithful"))
    expert: str = setting("scripted", choices=("scripted", "routes"))
    collect_workers: int = setting(2, ge=1)
    holdout_every: int = setting(10, ge=2)


@dataclass(kw_only=True)
class RLBenchDataConfig(DataConfig):
    root: str = setting()
    tasks: list[str] = setting(min_items=1)
    cache_dir: str | None = setting()  # null: decode the PNGs at every read
    repo_id: str | None = "hqfang/RLBench-18-Tasks"
    split: str = setting("train", choices=("train", "val", "test"))
    image_size: int | None = setting(128, ge=1, le=MAX_IMAGE_SIZE)  # PerAct's frames are 128 px
    control_hz: float | None = setting(20.0, gt=0)  # CoppeliaSim's 50 ms step
    keyframes: bool = True
    max_episodes_per_task: int | None = setting(None, ge=1)
    control: str | None = setting(None, choices=(None, "planner", "ik"))
    workspace_bounds: list[list[float]] | None = None
    ignore_collisions: bool = False
    num_workers: int = setting(8, ge=0)
    eval_seeds: SeedRange | None = setting(factory=lambda: SeedRange(start=0, count=25))  # PerAct's 25 per task


@dataclass(kw_only=True)
class LeRobotDataConfig(DataConfig):
    root: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    image_size: int = setting(64, ge=1, le=MAX_IMAGE_SIZE)
    state_key: str = "observation.state"
    action_key: str = "action"
    # null: read from the dataset's meta/info.json when the run starts (drifting_vla/data/lerobot_features.py)
    cameras: list[str] | None = setting(None, min_items=1, unique=True)
    proprio_dim: int | None = setting(None, ge=1)
    action_spec: ActionSpecConfig | None = None
    holdout_every: int = setting(10, ge=2)
    num_workers: int = setting(2, ge=0)
    simulator: Any = "auto"


DATA_SCHEMAS = {"metaworld": MetaWorldDataConfig, "aloha": AlohaDataConfig, "rlbench": RLBenchDataConfig,
                "lerobot": LeRobotDataConfig}

# ----------------------------------------------------------------------------------------------
# model.*


@dataclass(kw_only=True)
class EncoderConfig:
    name: str = setting()


@dataclass(kw_only=True)
class CNNVisionConfig(EncoderConfig):
    input_size: int = setting(64, ge=1)
    width: int = setting(32, ge=1)
    num_stages: int = setting(3, ge=1)
    groups: int = setting(8, ge=1)


@dataclass(kw_only=True)
class Dinov2VisionConfig(EncoderConfig):
    name_or_path: str = setting()
    revision: str | None = None
    input_size: int = setting(224, ge=1)
    arch: dict[str, Any] | None = None


@dataclass(kw_only=True)
class ClipLanguageConfig(EncoderConfig):
    name_or_path: str = setting()
    revision: str | None = None
    tokenizer: str | None = None
    max_length: int = setting(77, ge=1)
    arch: dict[str, Any] | None = None


@dataclass(kw_only=True)
class MiniLMLanguageConfig(EncoderConfig):
    name_or_path: str | None = None
    revision: str | None = None
    max_length: int = setting(32, ge=1)


@dataclass(kw_only=True)
class TaskEmbeddingLanguageConfig(EncoderConfig):
    dim: int = setting(256, ge=1)
    instructions: list[str] | None = None


VISION_SCHEMAS = {"cnn": CNNVisionConfig, "dinov2": Dinov2VisionConfig}
LANGUAGE_SCHEMAS = {"clip": ClipLanguageConfig, "minilm": MiniLMLanguageConfig, "task_embedding": TaskEmbeddingLanguageConfig}


@dataclass(kw_only=True)
class FusionConfig:
    num_layers: int = setting(2, ge=1)
    num_tokens: int = setting(32, ge=1)


@dataclass(kw_only=True)
class DiTConfig:
    hidden_size: int = setting(ge=1)
    depth: int = setting(ge=1)
    num_heads: int = setting(ge=1)
    mlp_ratio: float = setting(4.0, gt=0)


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "custom"
    pretrained: bool = True
    vision: Any = setting()  # checked against its encoder's schema (VISION_SCHEMAS)
    language: Any = setting()  # (LANGUAGE_SCHEMAS)
    fusion: FusionConfig = setting(factory=FusionConfig)
    dit: DiTConfig = setting()
    decoder_hidden_size: int | None = setting(None, ge=1)
    noise_dim: int | None = setting(None, ge=1)


# ----------------------------------------------------------------------------------------------
# A run, an evaluation, a server


@dataclass(kw_only=True)
class RunConfig:
    seed: int = setting(0, ge=0)
    device: str = "auto"
    run_dir: str | None = None
    plugins: list[str] = setting(factory=list)
    model: Any = setting()  # ModelConfig
    data: Any = setting()  # DATA_SCHEMAS[data.name]
    training: Any = setting(factory=dict)  # TrainingConfig


@dataclass(kw_only=True)
class EvalSeedsConfig:
    """The env seeds scripts/simulate_eval.py evaluates on, start .. start + count - 1: both set,
    or neither (the checkpoint's data.eval_seeds)."""

    start: int | None = setting(None, ge=0)
    count: int | None = setting(None, ge=1)


@dataclass(kw_only=True)
class EvalScriptConfig(ExecutionConfig):
    checkpoint: str | None = None
    remote: str | None = None
    remote_token: str | None = None
    seed: int | None = setting(None, ge=0)
    tasks: list[str] | None = None
    seeds: EvalSeedsConfig = setting(factory=EvalSeedsConfig)
    episodes: int | None = setting(None, ge=1)
    workers: int = setting(2, ge=1)
    output: str = setting()
    videos_per_task: int = setting(2, ge=0)
    max_episode_steps: int | None = setting(None, ge=1)
    device: str = "cpu"
    num_threads: int | None = setting(None, ge=1)
    progress: bool = True
    plugins: list[str] = setting(factory=list)
    wandb_mode: str = setting("disabled", choices=("disabled", "offline", "online"))
    wandb_project: str = "drifting-vla"


@dataclass(kw_only=True)
class ServerConfig:
    """How the policy server listens, authenticates and batches (drifting_vla/serving/server.py);
    the serve script's config (configs/serve.yaml) is this plus what to load."""

    host: str = "127.0.0.1"  # loopback unless told otherwise; anything wider should set a token
    port: int = setting(8000, ge=0, le=65535)  # 0: any free port (read `PolicyServer.port` once ready)
    token: str | None = None  # clients send `Authorization: Bearer <token>`; null or empty: none
    max_batch: int = setting(16, ge=1)  # requests per forward pass
    max_wait_ms: float = setting(2.0, ge=0)  # how long the first request of a batch waits for company
    max_queue: int = setting(64, ge=1)  # requests waiting beyond this are answered "busy" at once
    max_message_mb: float = setting(16.0, gt=0)  # larger frames close that connection (code 1009)
    max_instruction_chars: int = setting(1000, ge=1)  # longer: "too_large" (tokenizing megabytes stalls the model thread)
    max_image_pixels: int = setting(2048 * 2048, ge=1)  # per image (H x W); larger: "too_large"
    decode_threads: int = setting(2, ge=1)  # frames unpacked, checked and resized off the event loop
    control_hz: float | None = setting(None, gt=0)  # None: the checkpoint's data.control_hz

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)


@dataclass(kw_only=True)
class ServeScriptConfig(ServerConfig):
    checkpoint: str = setting()
    instruction_cache: int = setting(1024, ge=1)  # instructions kept encoded, least recently used dropped first
    nfe: int | None = setting(None, ge=1)
    sampler: str | None = setting(None, choices=SAMPLERS)
    device: str = "cpu"
    num_threads: int | None = setting(None, ge=1)
    plugins: list[str] = setting(factory=list)


# ----------------------------------------------------------------------------------------------
# Checking


def check_section(key: str, schema: type, node, open_keys: bool = False) -> DictConfig:
    """`node` (a mapping) merged over `schema`'s defaults and checked, or ValueError naming the key
    (`<key>.<field>`). With `open_keys`, keys the schema does not declare are left unchecked."""
    node = _plain(node)
    if not isinstance(node, dict):
        raise ValueError(f"config key {key or '<root>'} must be a mapping of keys, got {node!r}")
    if open_keys:
        declared = {f.name for f in fields(schema)}
        node = {k: v for k, v in node.items() if k in declared}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as err:
        raise ValueError(_merge_error(key, node, err)) from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ValueError(f"config key {_join(key, missing[0])} is missing: set it in the config or on the command line")
    _check_rules(key, schema, merged)
    return merged


def typed_section(key: str, schema: type, node):
    """`node` merged over `schema`'s defaults and checked (`check_section`), as an instance of
    `schema`: what the code reads, every value of its declared type."""
    return OmegaConf.to_object(check_section(key, schema, node))


def with_data_defaults(data):
    """`data.*` over its dataset's schema defaults, so that a dataset builder reads every key the
    schema declares without a fallback of its own; a dataset registered without a schema gets its
    config as it is. Required keys are not checked here (a run checks them when it starts)."""
    schema = DATA_SCHEMAS.get(str(data["name"]))
    if schema is None:
        return data
    node = _plain(data)
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except OmegaConfBaseException as err:
        raise ValueError(_merge_error("data", node, err)) from None


def training_config(training) -> TrainingConfig:
    """`training.*` merged over the schema's defaults, typed: what the trainer reads and how a saved
    policy builds its objective. Raises ValueError naming an unknown, mistyped or out-of-range key."""
    return typed_section("training", TrainingConfig, OmegaConf.create(_plain(training)))


def validate_training_config(training) -> None:
    """Raise ValueError naming the `training.<key>` that is unknown, mistyped or out of range."""
    training_config(training)


def check_random_shift(setting: int, feature_cache: bool) -> None:
    """A shift with the feature cache is an error: the cached features were computed once from the
    unaugmented images, so shifted images would never reach the model."""
    if setting > 0 and feature_cache:
        raise ValueError(
            f"training.augmentation.random_shift={setting} with training.feature_cache=true: the cache holds "
            "backbone features computed once from the unaugmented images, so shifted images would never reach "
            "the model. Set training.augmentation.random_shift=0 to train on the cache, or "
            "training.feature_cache=false to augment."
        )


def validate_run_config(cfg) -> None:
    """Every group of a training run's config (scripts/train.py, `Trainer`), checked before the
    run reads any data: types, ranges, choices, and the settings that must agree across groups."""
    data, training = _checked_groups(cfg)
    data_name = data.name
    evaluates = training.eval.at_end or training.eval.every > 0
    if evaluates and training.eval.execute_steps is not None and training.eval.execute_steps > data.horizon:
        raise ValueError(
            f"config key training.eval.execute_steps={training.eval.execute_steps} must be in [1, data.horizon={data.horizon}] "
            "(the actions of one chunk)"
        )
    if data_name == "rlbench" and data.keyframes and data.n_obs_steps > 1:
        raise ValueError(
            f"config key data.n_obs_steps={data.n_obs_steps} needs data.keyframes=false: a keyframe policy observes only "
            "on arriving at each keyframe, never at the dense steps a history would hold"
        )
    # A shift with the feature cache is refused here, before any data is read.
    check_random_shift(training.augmentation.random_shift, feature_cache=training.feature_cache)


RESUME_MAY_CHANGE = (
    "run_dir", "device", "plugins",
    "data.root", "data.repo_id", "data.revision", "data.cache_dir", "data.num_workers", "data.collect_workers",
    "data.skip_corrupt", "data.eval_seeds", "data.simulator",
    "training.resume", "training.max_steps", "training.log_every", "training.val_every", "training.val_batches",
    "training.checkpoint_every", "training.keep_checkpoints", "training.num_threads", "training.compile",
    "training.nan_policy", "training.max_skipped_fraction", "training.distributed", "training.eval", "training.wandb",
)
"""What a resumed run may set otherwise than its checkpoint: where the data comes from and how fast
it is read, how long to train, what is logged, saved and evaluated. Every other key shapes what is
trained, and a resume that changed it would train a mix of two runs under the second one's config,
or not even that: the learning rate, betas and weight decay come back with the optimizer's state,
so a new value would be recorded in config.yaml and never used."""


def resume_conflicts(saved, current) -> list[str]:
    """`key: saved -> current` for each setting both configs hold whose values differ, outside
    `RESUME_MAY_CHANGE` (a key one of them lacks, from another drifting-vla version, is not compared)."""
    saved, current = _leaves(_plain(saved)), _leaves(_plain(current))
    return [
        f"{key}: {saved[key]!r} -> {current[key]!r}"
        for key in sorted(saved.keys() & current.keys())
        if saved[key] != current[key] and not any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)
    ]


def _leaves(node, prefix: str = "") -> dict:
    """{dotted key: value} of the mappings in `node`; lists are values."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {key: value for k, v in node.items() for key, value in _leaves(v, _join(prefix, str(k))).items()}


def validate_saved_config(cfg) -> None:
    """The config a checkpoint or an export holds, group by group: types, ranges, choices. The
    checks between groups are the training run's (its evaluation's settings against the horizon,
    say), not the policy's."""
    _checked_groups(cfg)


def _checked_groups(cfg) -> tuple[DictConfig, DictConfig]:
    """(data, training) of a run's config, after checking each group against its schema."""
    run = check_section("", RunConfig, cfg)
    _refuse_renamed_keys(run)
    data_name = str(OmegaConf.select(run, "data.name", default=""))
    data = check_section("data", DATA_SCHEMAS.get(data_name, DataConfig), run.data, open_keys=data_name not in DATA_SCHEMAS)
    model = check_section("model", ModelConfig, run.model)
    if model.dit.hidden_size % model.dit.num_heads:  # each attention head takes an equal share of the width
        raise ValueError(f"config key model.dit.num_heads={model.dit.num_heads} must divide "
                         f"model.dit.hidden_size={model.dit.hidden_size}")
    for part, schemas in (("vision", VISION_SCHEMAS), ("language", LANGUAGE_SCHEMAS)):
        name = str(OmegaConf.select(model, f"{part}.name", default=""))
        check_section(f"model.{part}", schemas.get(name, EncoderConfig), model[part], open_keys=name not in schemas)
    return data, training_config(run.training)


RENAMED_KEYS = {
    "data.val_every": ("data.holdout_every", "every Nth episode held out for validation; training.val_every is "
                                             "the number of steps between validations"),
}
"""Keys of earlier configs that now have another name: a config naming one is refused, naming the new one."""


def _refuse_renamed_keys(run: DictConfig) -> None:
    for old in RENAMED_KEYS:
        if OmegaConf.select(run, old, default=MISSING) is not MISSING:
            raise ValueError(f"config key {_renamed(old)}: rename it in the config")


def refuse_renamed_overrides(overrides: list[str]) -> None:
    """A command-line override of a renamed key (`data.val_every=3`, `+data.val_every=3`) is refused
    naming the new key, where Hydra would only say that the config has no such key."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RENAMED_KEYS:
            raise ValueError(f"override {override}: {_renamed(key)}")


def _renamed(old: str) -> str:
    new, meaning = RENAMED_KEYS[old]
    return f"{old} is now {new} ({meaning})"


def validate_eval_config(cfg) -> EvalScriptConfig:
    """The evaluation script's keys (configs/eval.yaml), typed."""
    config = typed_section("", EvalScriptConfig, cfg)
    seeds = config.seeds
    if (seeds.start is None) != (seeds.count is None):
        given, missing = ("seeds.start", "seeds.count") if seeds.count is None else ("seeds.count", "seeds.start")
        raise ValueError(f"config key {given} is set without {missing}: give both (the seeds seeds.start .. "
                         "seeds.start + seeds.count - 1), or neither for the checkpoint's data.eval_seeds")
    return config


def validate_serve_config(cfg) -> ServeScriptConfig:
    """The serve script's keys (configs/serve.yaml), typed: the server reads it as its `ServerConfig`."""
    return typed_section("", ServeScriptConfig, cfg)


def _plain(node):
    """A config (OmegaConf or plain) as plain dicts and lists, interpolations resolved."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, (dict, list)):
        return OmegaConf.to_container(OmegaConf.create(node), resolve=True)
    return node


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _merge_error(key: str, node: dict, err: OmegaConfBaseException) -> str:
    full_key = getattr(err, "full_key", None) or "?"
    name = _join(key, full_key)
    message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    value = OmegaConf.select(OmegaConf.create(node), full_key, default=None) if full_key != "?" else None
    if "is not a ListConfig" in message:
        return f"config key {name}={value!r} must be a list, e.g. {name}=[{value}]"
    if "not in" in message and "Key" in message:
        return f"config key {name} is unknown ({message})"
    return f"config key {name}: {message}"


def _check_rules(key: str, schema: type, node) -> None:
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        name, value = _join(key, f.name), node[f.name]
        if value is None:
            continue
        nested = _dataclass_in(hints[f.name])
        if nested is not None:
            if isinstance(value, ListConfig):
                for i, item in enumerate(value):
                    _check_rules(f"{name}[{i}]", nested, item)
            elif isinstance(value, DictConfig) and not is_dataclass(OmegaConf.get_type(value)):
                for item_key, item in value.items():
                    _check_rules(f"{name}.{item_key}", nested, item)
            else:
                _check_rules(name, nested, value)
            continue
        _check_value(name, value, f.metadata)


def _check_value(name: str, value, rules) -> None:
    choices = rules.get("choices")
    if callable(choices):
        choices = choices()
    if isinstance(value, ListConfig):
        _check_length(name, list(value), rules.get("min_items", 0), rules.get("max_items"))
        twice = sorted({str(item) for item in value if list(value).count(item) > 1})
        if rules.get("unique") and twice:
            raise ValueError(f"config key {name}={list(value)} names {twice} more than once; name each once")
    for item in value if isinstance(value, ListConfig) else [value]:
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"config key {name}={_shown(value)} must be a finite number")
        if choices is not None and item not in choices:
            raise ValueError(f"config key {name}={item!r}; choose from {tuple(choices)}")
        for rule, holds, words in BOUNDS:
            if rule in rules and not holds(item, rules[rule]):
                raise ValueError(f"config key {name}={_shown(value)} must be {words} {rules[rule]}")


def _check_length(name: str, items: list, least: int, most: int | None) -> None:
    if least <= len(items) and (most is None or len(items) <= most):
        return
    wanted = f"exactly {least}" if least == most else f"at least {least}" if most is None else f"{least} to {most}"
    raise ValueError(f"config key {name}={items} must hold {wanted} item(s)")


def _shown(value):
    return list(value) if isinstance(value, ListConfig) else value


def _dataclass_in(hint) -> type | None:
    """The dataclass a field holds: itself, or inside `X | None`, `list[X]`, `dict[str, X]`."""
    if is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


@dataclass(kw_only=True)
class ExportOnnxScriptConfig:
    """scripts/export_onnx.py's keys (configs/export_onnx.yaml)."""

    checkpoint: str = setting()
    output: str = setting()
    instructions: list[str] = setting(factory=list)
    nfe: int | None = setting(None, ge=1)
    sampler: str | None = setting(None, choices=SAMPLERS)
    verify: bool = True
    plugins: list[str] = setting(factory=list)


def validate_export_onnx_config(cfg) -> ExportOnnxScriptConfig:
    """The ONNX export script's keys (configs/export_onnx.yaml), typed."""
    return typed_section("", ExportOnnxScriptConfig, cfg)
